//! Asking before anything is made or removed: only on a terminal, on
//! stderr (stdout carries plans and JSON), and only `yes` counts. Where
//! `stack` cannot ask (no terminal, or a JSON stream on stdout), the run
//! needs `--yes`, as Terraform needs `-auto-approve`.

use std::io::{BufRead, IsTerminal, Write};

use crate::engine::{Cancel, Level};

#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    #[error("not applied: the answer was not `yes`")]
    Declined,
    #[error("not applied: interrupted at the question")]
    Interrupted,
    #[error("not applied: {why}, so stack cannot ask; add --yes to {what}")]
    CannotAsk {
        why: &'static str,
        what: &'static str,
    },
    #[error("cannot read the answer")]
    Read(#[from] std::io::Error),
}

/// Whether the run may go ahead: `--yes`, or `yes` typed on the terminal.
/// Ctrl-C at the question ends it.
pub async fn confirm(
    yes: bool,
    json: bool,
    question: &str,
    what: &'static str,
    cancel: &Cancel,
) -> Result<(), PromptError> {
    if yes {
        return Ok(());
    }
    if json {
        return Err(PromptError::CannotAsk {
            why: "--output json makes stdout a JSON stream",
            what,
        });
    }
    if !std::io::stdin().is_terminal() {
        return Err(PromptError::CannotAsk {
            why: "stdin is not a terminal",
            what,
        });
    }
    let mut err = std::io::stderr().lock();
    write!(err, "{question} Only `yes` is accepted: ")?;
    err.flush()?;
    // A thread of its own: reading blocks, and the process may end while it does.
    let (sender, answer) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut answer = String::new();
        let read = std::io::stdin().lock().read_line(&mut answer);
        let _ = sender.send(read.map(|_| answer));
    });
    tokio::select! {
        answer = answer => match answer {
            Ok(Ok(answer)) if answer.trim() == "yes" => Ok(()),
            Ok(Err(err)) => Err(err.into()),
            _ => Err(PromptError::Declined),
        },
        _ = cancel.reached(Level::Soon) => Err(PromptError::Interrupted),
    }
}
