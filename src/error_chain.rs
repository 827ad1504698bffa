//! An error and its causes as short lines: each cause's own message once,
//! never its Debug form. SDK errors often repeat their source in their own
//! message; a cause whose text an earlier line already holds is left out.
//! The CLI prints these as `caused by:` lines (and as the JSON error's
//! `causes`); messages that gather several errors join them on one line.

use std::error::Error;

/// The messages of `err` and of every error under it, repeats left out.
pub fn messages(err: &dyn Error) -> Vec<String> {
    let mut all = vec![err.to_string()];
    let mut source = err.source();
    while let Some(cause) = source {
        all.push(cause.to_string());
        source = cause.source();
    }
    distinct(all)
}

/// `messages` in order, without empty ones and without one whose text an
/// earlier one already holds (`connect failed: refused`, then `refused`).
pub fn distinct(messages: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut kept: Vec<String> = Vec::new();
    for message in messages {
        let message = message.trim();
        if message.is_empty() || kept.iter().any(|k| k.contains(message)) {
            continue;
        }
        kept.push(message.to_string());
    }
    kept
}

/// `error: cause: cause`.
pub fn error_chain(err: &dyn Error) -> String {
    messages(err).join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot reach ec2: {0}")]
    struct Outer(#[source] Middle);

    #[derive(Debug, thiserror::Error)]
    #[error("dispatch failure")]
    struct Middle(#[source] std::io::Error);

    #[test]
    fn a_cause_the_message_already_holds_is_told_once() {
        let err = Outer(Middle(std::io::Error::other("connection refused")));
        assert_eq!(
            messages(&err),
            ["cannot reach ec2: dispatch failure", "connection refused"]
        );
        assert_eq!(
            error_chain(&err),
            "cannot reach ec2: dispatch failure: connection refused"
        );
    }
}
