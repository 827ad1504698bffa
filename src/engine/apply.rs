//! Applies one stage's batch of changes, exactly as planned: in the order
//! their handling asks for (what a change waits for; steps one at a time),
//! independent ones in parallel up to a bound, the state saved after every
//! finished change so an interrupted run loses nothing it made.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::task::JoinSet;

use super::cancel::{Cancel, Level};
use super::events::{Event, Events};
use super::phase::{ChangeInput, Phase, PhaseError};
use super::plan::{Action, Change, StageRef};
use crate::error_chain::error_chain;
use crate::state::{Record, State, StateError, StateLock};

/// One finished change.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Outcome {
    pub address: String,
    pub action: Action,
    pub id: Option<String>,
    pub seconds: f64,
}

/// One change that failed, with its error's causes.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub address: String,
    pub action: Action,
    pub message: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "  {} {}: {}",
            self.action.symbol(),
            self.address,
            self.message
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("{} of {total} changes failed", failures.len())]
    Failed {
        total: usize,
        failures: Vec<Failure>,
    },
    #[error("stopped after {done} of {total} changes")]
    Stopped {
        level: Level,
        done: usize,
        total: usize,
    },
    #[error(transparent)]
    State(#[from] StateError),
}

/// The state and its lock, saved after every finished change.
pub struct Ledger<'a> {
    pub lock: &'a mut dyn StateLock,
    pub state: &'a mut State,
}

impl Ledger<'_> {
    pub async fn save(&mut self) -> Result<(), StateError> {
        self.lock.save(self.state).await
    }
}

/// A fresh idempotency token: random, and at most 64 ASCII characters as EC2 wants.
fn new_token(address: &str) -> String {
    let random = RandomState::new().hash_one(address);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("stack-{random:016x}-{:x}", nanos as u64)
}

/// Which changes each change waits for: a change made waits for those it
/// names; a removal waits for the removals of what names it; a step waits
/// for every step before it.
fn dependencies(changes: &[Change]) -> Vec<Vec<usize>> {
    changes
        .iter()
        .map(|change| {
            changes
                .iter()
                .enumerate()
                .filter(|(_, other)| {
                    let removal = change.action == Action::Delete;
                    if removal != (other.action == Action::Delete) {
                        return false;
                    }
                    let named = if removal {
                        other.waits_for.contains(&change.address)
                    } else {
                        change.waits_for.contains(&other.address)
                    };
                    let earlier_step = match (&change.step, &other.step) {
                        (Some(mine), Some(theirs)) => theirs.number < mine.number,
                        _ => false,
                    };
                    named || earlier_step
                })
                .map(|(i, _)| i)
                .collect()
        })
        .collect()
}

/// A change task's result: its index, how long it took, and the new record
/// (`None` after a removal).
type Finished = (usize, Duration, Result<Option<Record>, PhaseError>);

pub struct Batch<'a> {
    pub phase: &'a Arc<dyn Phase>,
    pub stage: &'a StageRef,
    pub changes: &'a [Change],
    pub parallelism: usize,
    pub cancel: &'a Cancel,
    pub events: &'a Events,
}

impl Batch<'_> {
    /// Applies the batch; finished changes are in `outcomes` whatever happens.
    pub async fn run(
        &self,
        ledger: &mut Ledger<'_>,
        outcomes: &mut Vec<Outcome>,
    ) -> Result<(), BatchError> {
        let changes = self.changes;
        let deps = dependencies(changes);
        let total = changes.len();
        let mut started = vec![false; total];
        let mut finished = vec![false; total];
        let mut failures = Vec::new();
        let mut done = 0;
        let mut stopping = false;
        // A state that cannot be saved stops the batch like a failure, once
        // the changes under way are in.
        let mut unsaved: Option<StateError> = None;
        let mut running: JoinSet<Finished> = JoinSet::new();
        let mut tasks = std::collections::HashMap::new();

        loop {
            if failures.is_empty() && unsaved.is_none() && !stopping {
                for i in 0..total {
                    // Recording a token waits on the disk: a stop may come meanwhile.
                    if running.len() >= self.parallelism.max(1)
                        || self.cancel.level() != Level::Running
                    {
                        break;
                    }
                    if started[i] || !deps[i].iter().all(|&d| finished[d]) {
                        continue;
                    }
                    started[i] = true;
                    let change = changes[i].clone();
                    let token = if matches!(change.action, Action::Create | Action::Replace) {
                        match self.record_token(&change, ledger).await {
                            Ok(token) => token,
                            Err(err) => {
                                unsaved = Some(err);
                                break;
                            }
                        }
                    } else {
                        String::new()
                    };
                    self.events.emit(Event::ChangeStarted {
                        stage: self.stage.clone(),
                        address: change.address.clone(),
                        action: change.action,
                    });
                    let phase = self.phase.clone();
                    let snapshot = ledger.state.clone();
                    let (stage, cancel, events) =
                        (self.stage.clone(), self.cancel.clone(), self.events.clone());
                    let task = running.spawn(async move {
                        let begun = Instant::now();
                        let input = ChangeInput {
                            stage: &stage,
                            state: &snapshot,
                            token: &token,
                            cancel: &cancel,
                            events: &events,
                        };
                        let result = phase.apply(&change, input).await;
                        (i, begun.elapsed(), result)
                    });
                    tasks.insert(task.id(), i);
                }
            }
            if running.is_empty() {
                break;
            }
            let joined = tokio::select! {
                joined = running.join_next_with_id() => joined,
                _ = self.cancel.reached(Level::Soon), if !stopping => {
                    stopping = true;
                    self.stopping(Level::Soon, running.len());
                    continue;
                }
                _ = self.cancel.reached(Level::Now) => {
                    self.stopping(Level::Now, running.len());
                    running.abort_all();
                    return Err(BatchError::Stopped { level: Level::Now, done, total });
                }
            };
            let Some(joined) = joined else { break };
            let (i, elapsed, result) = match joined {
                Ok((_, finished)) => finished,
                Err(err) => {
                    let change = tasks.get(&err.id()).map(|&i| &changes[i]);
                    failures.push(Failure {
                        address: change.map_or_else(String::new, |c| c.address.clone()),
                        action: change.map_or(Action::Update, |c| c.action),
                        message: format!("the change's task ended: {err}"),
                    });
                    continue;
                }
            };
            let change = &changes[i];
            match result {
                Ok(record) => {
                    finished[i] = true;
                    done += 1;
                    let id = self.record_result(change, record, ledger);
                    if let Err(err) = ledger.save().await {
                        unsaved.get_or_insert(err);
                    }
                    self.events.emit(Event::ChangeFinished {
                        stage: self.stage.clone(),
                        address: change.address.clone(),
                        action: change.action,
                        id: id.clone(),
                        seconds: elapsed.as_secs_f64(),
                    });
                    outcomes.push(Outcome {
                        address: change.address.clone(),
                        action: change.action,
                        id,
                        seconds: elapsed.as_secs_f64(),
                    });
                }
                Err(err) => {
                    let message = error_chain(err.as_ref());
                    self.events.emit(Event::ChangeFailed {
                        stage: self.stage.clone(),
                        address: change.address.clone(),
                        action: change.action,
                        error: message.clone(),
                        seconds: elapsed.as_secs_f64(),
                        stops_run: !change.optional,
                    });
                    if change.optional {
                        // Its record stays as it was (a create's token
                        // included): the next run tries it again.
                        finished[i] = true;
                    } else {
                        failures.push(Failure {
                            address: change.address.clone(),
                            action: change.action,
                            message,
                        });
                    }
                }
            }
        }
        if let Some(err) = unsaved {
            return Err(err.into());
        }
        if !failures.is_empty() {
            return Err(BatchError::Failed { total, failures });
        }
        if started.iter().any(|s| !s) {
            // The run is stopping: what did not start waits for the next run.
            return Err(BatchError::Stopped {
                level: Level::Soon,
                done,
                total,
            });
        }
        Ok(())
    }

    fn stopping(&self, level: Level, running: usize) {
        if let Some(reason) = self.cancel.reason() {
            self.events.emit(Event::Stopping {
                reason,
                level,
                running,
            });
        }
    }

    /// Records a create's token before the call, so a re-run after a crash reuses it.
    async fn record_token(
        &self,
        change: &Change,
        ledger: &mut Ledger<'_>,
    ) -> Result<String, StateError> {
        let token = change
            .token
            .clone()
            .unwrap_or_else(|| new_token(&change.address));
        let recorded = ledger.state.get(&change.address).cloned();
        ledger.state.put(Record {
            address: change.address.clone(),
            kind: change.kind.clone(),
            id: recorded.as_ref().and_then(|r| r.id.clone()),
            attrs: recorded
                .map(|r| r.attrs)
                .unwrap_or_else(|| change.after.clone().unwrap_or_default()),
            pending_token: Some(token.clone()),
        });
        ledger.save().await?;
        tracing::debug!(address = %change.address, %token, "recorded the create's token before applying it");
        Ok(token)
    }

    /// Puts a finished change into the state; the id to report.
    fn record_result(
        &self,
        change: &Change,
        record: Option<Record>,
        ledger: &mut Ledger<'_>,
    ) -> Option<String> {
        match record {
            Some(record) => {
                let id = record.id.clone();
                ledger.state.put(record);
                id
            }
            None => {
                // Only forget the record if it is the one removed (not a kept twin).
                if ledger
                    .state
                    .get(&change.address)
                    .and_then(|r| r.id.as_deref())
                    == change.id.as_deref()
                {
                    ledger.state.remove(&change.address);
                }
                change.id.clone()
            }
        }
    }
}
