//! One cancellation token for a whole run, made by the caller (the CLI makes
//! it in `main` and feeds it the signals it receives).
//!
//! It has two levels, as Ctrl-C has in Terraform: the first request asks to
//! stop soon (changes under way finish and are recorded, nothing new starts,
//! waits that are not changes stop), the second to stop now (changes under
//! way are abandoned; creates have their idempotency tokens recorded, so the
//! next run finds what they made). Every wait in the engine and the phases
//! races its work against the level that ends it.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::watch;

/// Why a stop was asked for; it decides the exit code the CLI returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StopReason {
    /// SIGINT (Ctrl-C).
    Interrupt,
    /// SIGTERM.
    Terminate,
}

impl StopReason {
    pub fn signal_name(self) -> &'static str {
        match self {
            StopReason::Interrupt => "SIGINT",
            StopReason::Terminate => "SIGTERM",
        }
    }
}

/// How far a stop has gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Running,
    /// Finish the changes under way, start nothing new, end every other wait.
    Soon,
    /// Abandon everything at once.
    Now,
}

#[derive(Debug, Clone, Copy)]
struct Stop {
    level: Level,
    reason: Option<StopReason>,
}

/// Stopped before the work finished, at `level`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("stopped ({level:?})")]
pub struct Stopped {
    pub level: Level,
}

/// The run's cancellation token; clones share it.
#[derive(Debug, Clone)]
pub struct Cancel {
    sender: Arc<watch::Sender<Stop>>,
}

impl Default for Cancel {
    fn default() -> Self {
        Self::new()
    }
}

impl Cancel {
    pub fn new() -> Self {
        let (sender, _) = watch::channel(Stop {
            level: Level::Running,
            reason: None,
        });
        Cancel {
            sender: Arc::new(sender),
        }
    }

    /// Asks to stop: the first request means soon, any later one now.
    /// Returns the level reached.
    pub fn request(&self, reason: StopReason) -> Level {
        let mut reached = Level::Soon;
        self.sender.send_modify(|stop| {
            stop.level = match stop.level {
                Level::Running => Level::Soon,
                _ => Level::Now,
            };
            stop.reason.get_or_insert(reason);
            reached = stop.level;
        });
        reached
    }

    pub fn level(&self) -> Level {
        self.sender.borrow().level
    }

    /// Why the first stop was asked for, once one was.
    pub fn reason(&self) -> Option<StopReason> {
        self.sender.borrow().reason
    }

    /// Resolves once the stop has reached `level`.
    pub async fn reached(&self, level: Level) {
        let mut receiver = self.sender.subscribe();
        // The sender lives as long as `self`, so waiting cannot fail.
        let _ = receiver.wait_for(|stop| stop.level >= level).await;
    }

    /// Runs `work` unless, or until, the stop reaches `level`.
    pub async fn until<F: Future>(&self, level: Level, work: F) -> Result<F::Output, Stopped> {
        if self.level() >= level {
            return Err(Stopped { level });
        }
        tokio::select! {
            biased;
            _ = self.reached(level) => Err(Stopped { level }),
            done = work => Ok(done),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn the_first_request_is_soon_the_second_now_and_waits_end_at_their_level() {
        let cancel = Cancel::new();
        assert_eq!(cancel.level(), Level::Running);
        let waiting = {
            let cancel = cancel.clone();
            tokio::spawn(async move {
                cancel
                    .until(Level::Now, tokio::time::sleep(Duration::from_secs(60)))
                    .await
            })
        };
        assert_eq!(cancel.request(StopReason::Terminate), Level::Soon);
        assert_eq!(
            cancel
                .until(Level::Soon, std::future::pending::<()>())
                .await,
            Err(Stopped { level: Level::Soon }),
            "a wait that ends at the first request ends at once"
        );
        assert!(
            !waiting.is_finished(),
            "a wait that ends only at the second goes on"
        );
        assert_eq!(cancel.request(StopReason::Interrupt), Level::Now);
        assert_eq!(waiting.await.unwrap(), Err(Stopped { level: Level::Now }));
        assert_eq!(
            cancel.reason(),
            Some(StopReason::Terminate),
            "the first reason counts"
        );
    }
}
