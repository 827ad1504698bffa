//! Applies exactly the plan that was shown: changes in dependency order,
//! independent ones in parallel up to a bound, state written after every
//! finished change so an interrupted run loses nothing it made.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::signal::unix::{signal, SignalKind};
use tokio::task::JoinSet;

use crate::output::Reporter;
use crate::plan::{Action, Change, Plan, Resource};
use crate::provider::Provider;
use crate::state::{Record, State, StateError, StateStore};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{} of {total} changes failed (finished ones are recorded in state; run again to continue):\n{}", failures.len(), failures.join("\n"))]
    Failed { total: usize, failures: Vec<String> },
    #[error("interrupted after {done} of {total} changes (finished ones are recorded in state; run again to continue)")]
    Interrupted { done: usize, total: usize },
    #[error(transparent)]
    State(#[from] StateError),
}

/// A change task's result: its index, how long it took, and the new record
/// (`None` after a delete).
type Finished<E> = (usize, Duration, Result<Option<Record>, E>);

/// One finished change.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Outcome {
    pub address: String,
    pub action: Action,
    pub id: Option<String>,
    pub seconds: f64,
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

/// Which changes each change waits for.
fn dependencies<P: Provider>(provider: &P, changes: &[Change]) -> Vec<Vec<usize>> {
    changes
        .iter()
        .map(|change| {
            changes
                .iter()
                .enumerate()
                .filter(|(_, other)| {
                    if change.action == Action::Delete {
                        // Delete what depends on this kind first.
                        other.action == Action::Delete
                            && provider
                                .dependencies(&other.kind)
                                .contains(&change.kind.as_str())
                    } else {
                        other.action != Action::Delete
                            && provider
                                .dependencies(&change.kind)
                                .contains(&other.kind.as_str())
                    }
                })
                .map(|(i, _)| i)
                .collect()
        })
        .collect()
}

fn resource_of(change: &Change) -> Resource {
    Resource {
        address: change.address.clone(),
        kind: change.kind.clone(),
        attrs: change.after.clone().unwrap_or_default(),
        replace_on: &[],
    }
}

async fn run_change<P: Provider>(
    provider: Arc<P>,
    change: Change,
    token: String,
    snapshot: State,
) -> Result<Option<Record>, P::Error> {
    match change.action {
        Action::Create => provider
            .create(&resource_of(&change), &token, &snapshot)
            .await
            .map(Some),
        Action::Update => provider.update(&change, &snapshot).await.map(Some),
        Action::Replace => {
            if let Some(id) = &change.id {
                provider.delete(&change.kind, id).await?;
            }
            provider
                .create(&resource_of(&change), &token, &snapshot)
                .await
                .map(Some)
        }
        Action::Delete => {
            let id = change.id.as_deref().unwrap_or_default();
            provider.delete(&change.kind, id).await.map(|()| None)
        }
    }
}

fn verb(action: Action) -> (&'static str, &'static str) {
    match action {
        Action::Create => ("creating", "created"),
        Action::Update => ("updating", "updated"),
        Action::Replace => ("replacing", "replaced"),
        Action::Delete => ("deleting", "deleted"),
    }
}

/// Records resources found by tag and drops records of things that are gone.
pub fn bookkeeping(
    plan: &Plan,
    store: &mut dyn StateStore,
    state: &mut State,
) -> Result<(), StateError> {
    if !plan.has_bookkeeping() {
        return Ok(());
    }
    for live in &plan.adopt {
        state.put(Record {
            address: live.address.clone(),
            kind: live.kind.clone(),
            id: Some(live.id.clone()),
            attrs: live.attrs.clone(),
            pending_token: None,
        });
    }
    for address in &plan.forget {
        state.remove(address);
    }
    store.save(state)
}

pub async fn apply<P: Provider>(
    provider: Arc<P>,
    plan: &Plan,
    store: &mut dyn StateStore,
    state: &mut State,
    parallelism: usize,
    reporter: &Reporter,
) -> Result<Vec<Outcome>, ApplyError> {
    bookkeeping(plan, store, state)?;
    let changes = &plan.changes;
    let deps = dependencies(provider.as_ref(), changes);
    let total = changes.len();
    let mut started = vec![false; total];
    let mut finished = vec![false; total];
    let mut outcomes = Vec::new();
    let mut failures = Vec::new();
    let mut interrupted = false;
    let mut running: JoinSet<Finished<P::Error>> = JoinSet::new();
    let mut sigint = signal(SignalKind::interrupt()).ok();
    let mut sigterm = signal(SignalKind::terminate()).ok();

    loop {
        if failures.is_empty() && !interrupted {
            for i in 0..total {
                if running.len() >= parallelism.max(1) {
                    break;
                }
                if started[i] || !deps[i].iter().all(|&d| finished[d]) {
                    continue;
                }
                started[i] = true;
                let change = changes[i].clone();
                let token = if matches!(change.action, Action::Create | Action::Replace) {
                    // Recorded before the call, so a re-run after a crash reuses it.
                    let token = change
                        .token
                        .clone()
                        .unwrap_or_else(|| new_token(&change.address));
                    let recorded = state.get(&change.address).cloned();
                    state.put(Record {
                        address: change.address.clone(),
                        kind: change.kind.clone(),
                        id: recorded.as_ref().and_then(|r| r.id.clone()),
                        attrs: recorded
                            .map(|r| r.attrs)
                            .unwrap_or_else(|| change.after.clone().unwrap_or_default()),
                        pending_token: Some(token.clone()),
                    });
                    store.save(state)?;
                    tracing::debug!(address = %change.address, %token, "recorded the create's token before calling the provider");
                    token
                } else {
                    String::new()
                };
                reporter.start(&change.address, verb(change.action).0);
                let provider = provider.clone();
                let snapshot = state.clone();
                running.spawn(async move {
                    let begun = Instant::now();
                    let result = run_change(provider, change, token, snapshot).await;
                    (i, begun.elapsed(), result)
                });
            }
        }
        if running.is_empty() {
            break;
        }
        let joined = tokio::select! {
            joined = running.join_next() => match joined {
                Some(joined) => Some(joined),
                None => break,
            },
            _ = async { match sigint.as_mut() { Some(s) => { s.recv().await; } None => std::future::pending().await } } => None,
            _ = async { match sigterm.as_mut() { Some(s) => { s.recv().await; } None => std::future::pending().await } } => None,
        };
        let Some(joined) = joined else {
            // A signal: the first lets the changes under way finish, a second
            // stops at once (creates in flight have their tokens recorded).
            if interrupted {
                return Err(ApplyError::Interrupted {
                    done: outcomes.len(),
                    total,
                });
            }
            reporter.line("interrupted: finishing the changes under way, starting no more (again to stop now)");
            interrupted = true;
            continue;
        };
        let (i, elapsed, result) = match joined {
            Ok(done) => done,
            Err(err) => {
                failures.push(format!("  a change task failed: {err}"));
                continue;
            }
        };
        let change = &changes[i];
        match result {
            Ok(record) => {
                finished[i] = true;
                let id = match record {
                    Some(record) => {
                        let id = record.id.clone();
                        state.put(record);
                        id
                    }
                    None => {
                        // Only forget the record if it is the one deleted (not a kept twin).
                        if state.get(&change.address).and_then(|r| r.id.as_deref())
                            == change.id.as_deref()
                        {
                            state.remove(&change.address);
                        }
                        change.id.clone()
                    }
                };
                store.save(state)?;
                let done = verb(change.action).1;
                let message = match &id {
                    Some(id) => format!("{done} {id}"),
                    None => done.to_string(),
                };
                reporter.finish(&change.address, &message, elapsed);
                outcomes.push(Outcome {
                    address: change.address.clone(),
                    action: change.action,
                    id,
                    seconds: elapsed.as_secs_f64(),
                });
            }
            Err(err) => {
                let mut message = format!("  {} {}: {err}", change.action.symbol(), change.address);
                let mut source = std::error::Error::source(&err);
                while let Some(cause) = source {
                    message.push_str(&format!(": {cause}"));
                    source = cause.source();
                }
                reporter.finish(&change.address, "failed", elapsed);
                failures.push(message);
            }
        }
    }
    if !failures.is_empty() {
        return Err(ApplyError::Failed { total, failures });
    }
    if interrupted {
        return Err(ApplyError::Interrupted {
            done: outcomes.len(),
            total,
        });
    }
    Ok(outcomes)
}
