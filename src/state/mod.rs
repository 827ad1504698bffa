//! What `stack` last applied, kept so that plans can tell drift from intent
//! and an interrupted run can resume.
//!
//! State sits behind [`StateBackend`]: an explicit lock held for a whole run
//! and a compare-and-swap on the serial, so a writer that lost track of the
//! stored state (a second handle, a restored copy) fails instead of
//! overwriting it. The default backend is a local file next to the stack
//! (`local`); one for teams can sit behind the same two traits.

mod local;
mod store;

pub use local::LocalBackend;
pub use store::*;
