//! `stack`: a declarative environment provisioner.
//!
//! A stack file is loaded into a typed model (`model`), turned into desired
//! resources by a provider (`provider`), compared with the recorded state
//! (`state`) and the live world into a plan (`plan`), and applied (`apply`).
//! `commands` holds one thin function per CLI subcommand (`cli`).

pub mod apply;
pub mod bootstrap;
pub mod cli;
pub mod cloudinit;
pub mod commands;
pub mod diag;
pub mod files;
pub mod keys;
pub mod kube;
pub mod model;
pub mod output;
pub mod plan;
pub mod provider;
pub mod ssh;
pub mod state;
pub mod templates;
pub mod yamljson;
