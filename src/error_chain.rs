//! An error with its causes on one line, for messages that gather several
//! errors (a stage's failed changes, a node that cannot be read).

/// `error: cause: cause`.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    message
}
