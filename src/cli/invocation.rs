//! The command line a run was started with, as the state names it (in its
//! lock, in its history), and the openings of a stack's state built from
//! it, in one place for every subcommand.

use std::time::Duration;

use crate::engine::{Cancel, Opening};
use crate::state::LockHolder;

/// `stack` and the arguments after it, each quoted when it has a space.
pub fn command_line() -> String {
    std::iter::once("stack".to_string())
        .chain(std::env::args().skip(1).map(|arg| {
            if arg.is_empty() || arg.contains(char::is_whitespace) {
                format!("'{}'", arg.replace('\'', "'\\''"))
            } else {
                arg
            }
        }))
        .collect::<Vec<_>>()
        .join(" ")
}

/// For a command that changes the stack, waiting up to `lock_timeout`
/// for its lock (`--lock-timeout`).
pub fn writing(lock_timeout: Duration, cancel: &Cancel) -> Opening {
    Opening::write(&command_line(), lock_timeout, cancel)
}

/// For a command that only reads it.
pub fn reading(cancel: &Cancel) -> Opening {
    Opening::read(cancel)
}

/// This process as the holder of a lock it takes itself.
pub fn holder() -> LockHolder {
    LockHolder::this_process(&command_line())
}
