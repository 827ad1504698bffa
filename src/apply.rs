//! Applies exactly the plan that was shown: changes in dependency order,
//! independent ones in parallel up to a bound, state written after every
//! finished change so an interrupted run loses nothing it made.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::signal::unix::{signal, SignalKind};
use tokio::task::JoinSet;

use crate::output::{error_chain, Reporter};
use crate::plan::{Action, Change, Plan, Resource};
use crate::provider::Applier;
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
fn dependencies<P: Applier>(applier: &P, changes: &[Change]) -> Vec<Vec<usize>> {
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
                            && applier
                                .dependencies(&other.kind)
                                .contains(&change.kind.as_str())
                    } else {
                        other.action != Action::Delete
                            && applier
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

async fn run_change<P: Applier>(
    applier: Arc<P>,
    change: Change,
    token: String,
    snapshot: State,
) -> Result<Option<Record>, P::Error> {
    match change.action {
        Action::Create => applier
            .create(&resource_of(&change), &token, &snapshot)
            .await
            .map(Some),
        Action::Update => applier.update(&change, &snapshot).await.map(Some),
        Action::Replace => {
            if let Some(id) = &change.id {
                applier.delete(&change.kind, id).await?;
            }
            applier
                .create(&resource_of(&change), &token, &snapshot)
                .await
                .map(Some)
        }
        Action::Delete => {
            let id = change.id.as_deref().unwrap_or_default();
            applier.delete(&change.kind, id).await.map(|()| None)
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

/// Applies `changes` (a plan's, or one phase of it) with `applier`.
pub async fn apply<P: Applier>(
    applier: Arc<P>,
    changes: &[Change],
    store: &mut dyn StateStore,
    state: &mut State,
    parallelism: usize,
    reporter: &Reporter,
) -> Result<Vec<Outcome>, ApplyError> {
    let deps = dependencies(applier.as_ref(), changes);
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
                let applier = applier.clone();
                let snapshot = state.clone();
                running.spawn(async move {
                    let begun = Instant::now();
                    let result = run_change(applier, change, token, snapshot).await;
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
                let message = format!(
                    "  {} {}: {}",
                    change.action.symbol(),
                    change.address,
                    error_chain(&err)
                );
                reporter.finish(&change.address, "failed", elapsed);
                if applier.is_fatal(change) {
                    failures.push(message);
                } else {
                    // Not recorded: the next run tries it again.
                    finished[i] = true;
                    reporter.line(&format!(
                        "warning: a change that does not stop the run failed (the next run tries again):\n{message}"
                    ));
                }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{plan as make_plan, Observed};
    use crate::state::LocalStateStore;
    use serde_json::json;
    use std::sync::Mutex;

    #[derive(Debug, thiserror::Error)]
    #[error("scripted failure of {0}")]
    struct ScriptedError(String);

    /// A test double of a provider: every call takes a little time and is
    /// logged, and one address can be made to fail. No cloud is involved.
    struct ScriptedProvider {
        log: Mutex<Vec<(String, &'static str)>>,
        fail: Option<String>,
    }

    impl ScriptedProvider {
        async fn call(&self, address: &str) -> Result<(), ScriptedError> {
            self.log
                .lock()
                .unwrap()
                .push((address.to_string(), "start"));
            tokio::time::sleep(Duration::from_millis(20)).await;
            self.log.lock().unwrap().push((address.to_string(), "end"));
            match &self.fail {
                Some(fail) if fail == address => Err(ScriptedError(address.to_string())),
                _ => Ok(()),
            }
        }

        fn position(&self, address: &str, event: &str) -> usize {
            let log = self.log.lock().unwrap();
            log.iter()
                .position(|(a, e)| a == address && *e == event)
                .unwrap_or_else(|| panic!("no {event} of {address}"))
        }

        fn max_concurrent(&self) -> usize {
            let mut now = 0usize;
            let mut max = 0;
            for (_, event) in self.log.lock().unwrap().iter() {
                if *event == "start" {
                    now += 1;
                    max = max.max(now);
                } else {
                    now -= 1;
                }
            }
            max
        }
    }

    impl Applier for ScriptedProvider {
        type Error = ScriptedError;

        fn dependencies(&self, kind: &str) -> &'static [&'static str] {
            if kind == "instance" {
                &["key_pair", "security_group"]
            } else {
                &[]
            }
        }

        async fn create(
            &self,
            resource: &Resource,
            _token: &str,
            _state: &State,
        ) -> Result<Record, ScriptedError> {
            self.call(&resource.address).await?;
            Ok(Record {
                address: resource.address.clone(),
                kind: resource.kind.clone(),
                id: Some(format!("id-{}", resource.address)),
                attrs: resource.attrs.clone(),
                pending_token: None,
            })
        }

        async fn update(&self, change: &Change, _state: &State) -> Result<Record, ScriptedError> {
            self.call(&change.address).await?;
            Ok(Record {
                address: change.address.clone(),
                kind: change.kind.clone(),
                id: change.id.clone(),
                attrs: change.after.clone().unwrap_or_default(),
                pending_token: None,
            })
        }

        async fn delete(&self, _kind: &str, id: &str) -> Result<(), ScriptedError> {
            self.call(id.trim_start_matches("id-")).await
        }
    }

    fn resources() -> Vec<Resource> {
        let mut out = vec![
            Resource {
                address: "kp".into(),
                kind: "key_pair".into(),
                attrs: json!({"n": 1}),
                replace_on: &[],
            },
            Resource {
                address: "sg".into(),
                kind: "security_group".into(),
                attrs: json!({"n": 1}),
                replace_on: &[],
            },
        ];
        for i in 0..6 {
            out.push(Resource {
                address: format!("vm{i}"),
                kind: "instance".into(),
                attrs: json!({"n": 1}),
                replace_on: &[],
            });
        }
        out
    }

    fn provider(fail: Option<&str>) -> Arc<ScriptedProvider> {
        Arc::new(ScriptedProvider {
            log: Mutex::new(Vec::new()),
            fail: fail.map(str::to_string),
        })
    }

    #[tokio::test]
    async fn creates_wait_for_dependencies_deletes_go_in_reverse_and_parallelism_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = LocalStateStore::open(dir.path(), "demo", "test").unwrap();
        let mut state = State::new("demo", "test");
        let up = provider(None);
        let plan = make_plan("demo", "test", &resources(), &state, &[]);
        let outcomes = apply(
            up.clone(),
            &plan.changes,
            &mut store,
            &mut state,
            3,
            &Reporter::Plain,
        )
        .await
        .unwrap();
        assert_eq!(outcomes.len(), 8);
        for vm in (0..6).map(|i| format!("vm{i}")) {
            assert!(up.position(&vm, "start") > up.position("kp", "end"));
            assert!(up.position(&vm, "start") > up.position("sg", "end"));
        }
        assert_eq!(up.max_concurrent(), 3);
        assert_eq!(
            store.load().unwrap().resources.len(),
            8,
            "every finished change is recorded"
        );

        let live: Vec<Observed> = state
            .resources
            .iter()
            .map(|r| Observed {
                address: r.address.clone(),
                kind: r.kind.clone(),
                id: r.id.clone().unwrap(),
                attrs: r.attrs.clone(),
            })
            .collect();
        let down = provider(None);
        let destroy = crate::plan::destroy("demo", "test", &state, &live);
        apply(
            down.clone(),
            &destroy.changes,
            &mut store,
            &mut state,
            10,
            &Reporter::Plain,
        )
        .await
        .unwrap();
        for vm in (0..6).map(|i| format!("vm{i}")) {
            assert!(down.position("kp", "start") > down.position(&vm, "end"));
            assert!(down.position("sg", "start") > down.position(&vm, "end"));
        }
        assert!(store.load().unwrap().resources.is_empty());
    }

    #[tokio::test]
    async fn a_failure_starts_nothing_new_and_keeps_what_finished() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = LocalStateStore::open(dir.path(), "demo", "test").unwrap();
        let mut state = State::new("demo", "test");
        let failing = provider(Some("sg"));
        let plan = make_plan("demo", "test", &resources(), &state, &[]);
        let err = apply(
            failing.clone(),
            &plan.changes,
            &mut store,
            &mut state,
            10,
            &Reporter::Plain,
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("1 of 8 changes failed"), "{err}");
        assert!(
            err.to_string().contains("+ sg: scripted failure of sg"),
            "{err}"
        );
        assert!(
            failing
                .log
                .lock()
                .unwrap()
                .iter()
                .all(|(a, _)| !a.starts_with("vm")),
            "no instance may start"
        );
        let saved = store.load().unwrap();
        assert_eq!(saved.get("kp").and_then(|r| r.id.as_deref()), Some("id-kp"));
        let sg = saved.get("sg").unwrap();
        assert!(
            sg.id.is_none() && sg.pending_token.is_some(),
            "the failed create keeps its token for the re-run"
        );
    }
}
