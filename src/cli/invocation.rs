//! The command line a run was started with, as the state names it (in its
//! lock, in its history), and the openings of a stack's state built from
//! it, in one place for every subcommand.

use std::time::Duration;

use crate::engine::{Cancel, Opening};
use crate::state::LockHolder;

/// `stack` and the arguments after it, each quoted when it has a space;
/// a command after `--` (`run`'s, `ssh`'s) is shown as `-- …`, since it
/// may carry secrets and history rows are not sealed.
pub fn command_line() -> String {
    shown(std::env::args().skip(1))
}

fn shown(args: impl Iterator<Item = String>) -> String {
    let mut words = vec!["stack".to_string()];
    for arg in args {
        if arg == "--" {
            words.push("-- …".to_string());
            break;
        }
        words.push(if arg.is_empty() || arg.contains(char::is_whitespace) {
            format!("'{}'", arg.replace('\'', "'\\''"))
        } else {
            arg
        });
    }
    words.join(" ")
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_after_the_double_dash_is_not_shown() {
        let args = [
            "run",
            "--yes",
            "ci.yaml",
            "--",
            "./test",
            "--password=hunter2",
        ];
        assert_eq!(
            shown(args.iter().map(|a| a.to_string())),
            "stack run --yes ci.yaml -- …"
        );
        let args = ["up", "--lock-timeout", "5m", "my stack.yaml"];
        assert_eq!(
            shown(args.iter().map(|a| a.to_string())),
            "stack up --lock-timeout 5m 'my stack.yaml'"
        );
    }
}
