//! The stack file: read (`model::load`), decoded, validated and resolved into
//! the typed model, with its diagnostics (`diag`). A crate of its own so that
//! it builds, tests and fuzzes without the rest of `stack`; `stack`
//! re-exports both modules at the same paths.

pub mod diag;
pub mod model;
