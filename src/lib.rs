//! `stack`: a declarative environment provisioner.
//!
//! Data flows one way: the command line (`cli`) opens a session on a stack
//! through its stage list (`phases`: infrastructure, bootstrap, the
//! Kubernetes stages), which the engine (`engine`) plans and applies with
//! its state (`state`) and artifacts (`artifacts`); image upgrades of the
//! databases (`upgrade`) ask their registries; below are the typed
//! model of the stack file (`model`) and small leaves.

pub mod artifacts;
pub mod cli;
pub mod cloudinit;
pub mod daemon;
pub mod engine;
pub mod error_chain;
pub mod expiry;
pub mod files;
pub mod future;
pub mod keys;
pub mod kubeconfig;
pub mod microk8s;
pub mod nodes;
pub mod phases;
pub mod run;
pub mod ssh;
pub mod state;
pub mod templates;
pub mod upgrade;
pub mod yamljson;

// The stack file's model and its diagnostics live in crates/stack-model.
pub use stack_model::{diag, model};
