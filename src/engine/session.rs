//! A session: one stack's phases, its state and its artifacts, opened once
//! and driven through plan → apply, status and the leftover check. It is the
//! one door the command line (and anything else that drives a stack) uses.
//!
//! Applying walks the stage list forward for what is made or changed, each
//! stage gated on its health before the next starts, then backward for
//! what is removed; a destroy plan is all removals, so it goes backward.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::apply::{Batch, BatchError, Failure, Ledger, Outcome};
use super::cancel::{Cancel, Level, StopReason, Stopped};
use super::events::{Event, Events};
use super::phase::{
    EndpointStatus, Expiring, Leftovers, NodeStatus, Phase, PhaseError, PlanInput, Prepared,
    Retries, StageInput, StatusPart,
};
use super::plan::{Action, Change, Mode, Plan, StageRef};
use crate::artifacts::{Artifact, Artifacts};
use crate::files::FileError;
use crate::state::{LockHolder, Record, State, StateBackend, StateError, StateLock};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Artifacts(#[from] FileError),
    #[error("{stage}: cannot plan")]
    Plan {
        stage: StageRef,
        #[source]
        source: PhaseError,
    },
    #[error("{stage}: {} of {total} changes failed (finished ones are recorded in state; run again to continue):\n{}", failures.len(), failures.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Failed {
        stage: StageRef,
        total: usize,
        failures: Vec<Failure>,
    },
    #[error("{stage} {doing}")]
    Stage {
        stage: StageRef,
        doing: &'static str,
        #[source]
        source: PhaseError,
    },
    #[error("cannot check what is left of {stage}")]
    Leftovers {
        stage: StageRef,
        #[source]
        source: PhaseError,
    },
    #[error("{stage}: cannot look for expiring environments")]
    Environments {
        stage: StageRef,
        #[source]
        source: PhaseError,
    },
    #[error("{stage}: cannot read its status")]
    Status {
        stage: StageRef,
        #[source]
        source: PhaseError,
    },
    #[error("interrupted{} {during}{}", signal.map(|s| format!(" by {}", s.signal_name())).unwrap_or_default(), resume.map(|(mode, serial)| resumed(mode, serial)).unwrap_or_default())]
    Stopped {
        during: String,
        signal: Option<StopReason>,
        /// For a stop while applying: the plan's mode and the state's serial.
        resume: Option<(Mode, u64)>,
    },
    #[error("this plan was made from state serial {planned}, but the state is at serial {current} now: plan again")]
    StalePlan { planned: u64, current: u64 },
    #[error("this plan is of stack `{plan}`, not `{session}`")]
    OtherStack { plan: String, session: String },
    #[error(
        "a refresh-only plan reports drift and is never applied (`stack up` repairs the drift)"
    )]
    RefreshOnly,
    #[error("not applied: {} of stack {stack} were made by another state of it (another checkout, or a lost state file):\n{}\nuse another stack name, or take them over into a new state with --adopt", if things.len() == 1 { "this one" } else { "these" }, things.join("\n"))]
    Foreign { stack: String, things: Vec<String> },
    #[error("not applied: the plan of stack {stack} cannot be applied as the stack stands; nothing was changed:\n{}", reasons.iter().map(|r| format!("  {r}")).collect::<Vec<_>>().join("\n"))]
    Blocked { stack: String, reasons: Vec<String> },
    #[error("--adopt takes things over only into a new state; the state of stack {0} already records resources")]
    AdoptIntoUsedState(String),
    #[error("the state of stack {0} was opened without its lock: it cannot be changed")]
    ReadOnly(String),
}

fn resumed(mode: Mode, serial: u64) -> String {
    let verb = if mode == Mode::Destroy { "down" } else { "up" };
    format!("; what finished is recorded in state (serial {serial}): the next `stack {verb}` continues from there")
}

/// Whether a session may change the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Holds the lock: plan and apply.
    Write,
    /// Reads the state without the lock: status.
    Read,
}

/// How a session opens its stack's state.
#[derive(Debug, Clone)]
pub struct Opening {
    pub access: Access,
    /// The command line that opens it (`stack up`): named in the lock and
    /// in the state's history.
    pub command: String,
    /// How long to wait for a lock another run holds; zero fails at once.
    pub lock_timeout: Duration,
    /// Ends the wait for the lock.
    pub cancel: Cancel,
}

impl Opening {
    /// For a command that only reads (it takes no lock, so it names none).
    pub fn read(cancel: &Cancel) -> Opening {
        Opening {
            access: Access::Read,
            command: String::new(),
            lock_timeout: Duration::ZERO,
            cancel: cancel.clone(),
        }
    }

    /// For a command that changes the stack, waiting up to `lock_timeout` for its lock.
    pub fn write(command: &str, lock_timeout: Duration, cancel: &Cancel) -> Opening {
        Opening {
            access: Access::Write,
            command: command.to_string(),
            lock_timeout,
            cancel: cancel.clone(),
        }
    }
}

/// The state of a session, locked (or read) before the phases are built.
pub struct StateHandle {
    backend: Box<dyn StateBackend>,
    lock: Option<Box<dyn StateLock>>,
    state: State,
}

impl StateHandle {
    pub async fn open(
        backend: Box<dyn StateBackend>,
        opening: &Opening,
        stack: &str,
        provider: &str,
    ) -> Result<StateHandle, EngineError> {
        let (lock, state) = match opening.access {
            Access::Write => {
                let holder = LockHolder::this_process(&opening.command);
                let lock = opening
                    .cancel
                    .until(Level::Soon, backend.lock(holder, opening.lock_timeout))
                    .await
                    .map_err(|_| EngineError::Stopped {
                        during: format!("while waiting for the lock of {}", backend.location()),
                        signal: opening.cancel.reason(),
                        resume: None,
                    })??;
                let state = lock.load().await?;
                (Some(lock), state)
            }
            Access::Read => (
                None,
                backend
                    .read()
                    .await?
                    .unwrap_or_else(|| State::new(stack, provider)),
            ),
        };
        Ok(StateHandle {
            backend,
            lock,
            state,
        })
    }

    /// The state as it was read.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// The state's own id, which what it makes is marked with.
    pub fn lineage(&self) -> &str {
        &self.state.lineage
    }
}

/// What to plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanRequest {
    pub mode: Mode,
    /// Take over what another state of the stack made (into a new state only).
    pub adopt: bool,
}

impl From<Mode> for PlanRequest {
    fn from(mode: Mode) -> PlanRequest {
        PlanRequest { mode, adopt: false }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct ApplyOptions {
    /// How many independent changes of a stage may run at once.
    pub parallelism: usize,
}

/// What an apply did.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Applied {
    pub applied: Vec<Outcome>,
    pub state_serial: u64,
    pub state_location: String,
    /// Calls retried after transient errors, by service (none when no call was).
    pub retries: Vec<Retries>,
}

/// What `down` found still there.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Remains {
    pub left: Vec<String>,
    /// What was checked, one sentence per stage that checked something.
    pub checked: Vec<String>,
}

/// What `stack status` shows.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub stack: String,
    pub provider: String,
    pub state_file: String,
    /// `None` before the first `up`.
    pub state_serial: Option<u64>,
    pub recorded_resources: usize,
    pub ssh_key: Option<PathBuf>,
    pub ssh_user: Option<String>,
    /// Whether the stack has a Kubernetes cluster (made or existing).
    pub cluster: bool,
    pub kubeconfig: Option<PathBuf>,
    pub context: Option<String>,
    pub nodes: Vec<NodeStatus>,
    pub endpoints: Vec<EndpointStatus>,
    pub ca_certificate: Option<PathBuf>,
    pub grafana: Option<String>,
    pub databases: Vec<super::phase::DatabaseStatus>,
    pub stages: Vec<StageRef>,
}

pub struct Session {
    stack: String,
    provider: String,
    phases: Vec<Arc<dyn Phase>>,
    stages: Vec<StageRef>,
    handle: StateHandle,
    artifacts: Artifacts,
    plans: AtomicU64,
}

impl Session {
    /// A session over `phases`, in the order of the stage list.
    pub fn new(
        stack: &str,
        provider: &str,
        handle: StateHandle,
        phases: Vec<Arc<dyn Phase>>,
        artifacts: Artifacts,
    ) -> Session {
        let of = phases.len();
        let stages = phases
            .iter()
            .enumerate()
            .map(|(i, phase)| StageRef {
                number: i + 1,
                of,
                name: phase.name().to_string(),
            })
            .collect();
        Session {
            stack: stack.to_string(),
            provider: provider.to_string(),
            phases,
            stages,
            handle,
            artifacts,
            plans: AtomicU64::new(1),
        }
    }

    pub fn state_location(&self) -> String {
        self.handle.backend.location()
    }

    pub fn artifacts(&self) -> &Artifacts {
        &self.artifacts
    }

    /// A stop outside an apply: nothing was changed.
    fn stopped(&self, during: String, cancel: &Cancel) -> EngineError {
        EngineError::Stopped {
            during,
            signal: cancel.reason(),
            resume: None,
        }
    }

    /// Reads the live world stage by stage and plans what `mode` asks for.
    pub async fn plan(
        &self,
        request: impl Into<PlanRequest>,
        cancel: &Cancel,
        events: &Events,
    ) -> Result<Plan, EngineError> {
        let PlanRequest { mode, adopt } = request.into();
        if adopt && !self.handle.state.resources.is_empty() {
            return Err(EngineError::AdoptIntoUsedState(self.stack.clone()));
        }
        let plan_id = self.plans.fetch_add(1, Ordering::Relaxed);
        let phase_mode = match mode {
            Mode::RefreshOnly => Mode::Normal,
            other => other,
        };
        let state = &self.handle.state;
        let mut parts = Vec::new();
        let mut upstream: Vec<Change> = Vec::new();
        for (phase, stage) in self.phases.iter().zip(&self.stages) {
            events.emit(Event::Refreshing {
                stage: stage.clone(),
            });
            let records = state.only(|r| phase.owns(r));
            let input = PlanInput {
                mode: phase_mode,
                stage,
                state,
                records: &records,
                upstream: &upstream,
                plan_id,
                adopt,
                cancel,
                events,
            };
            let part = cancel
                .until(Level::Soon, phase.plan(input))
                .await
                .map_err(|_| self.stopped(format!("while planning {stage}"), cancel))?
                .map_err(|source| EngineError::Plan {
                    stage: stage.clone(),
                    source,
                })?;
            upstream.extend(part.changes.iter().cloned().map(|mut c| {
                c.stage = Some(stage.clone());
                c
            }));
            parts.push((stage.clone(), part));
        }
        let orphans: Vec<&Record> = state
            .resources
            .iter()
            .filter(|r| !self.phases.iter().any(|p| p.owns(r)))
            .collect();
        let mut plan = Plan::assemble(&self.stack, &self.provider, mode, state.serial, parts);
        plan.plan_id = plan_id;
        if !orphans.is_empty() && mode != Mode::RefreshOnly {
            plan.forget
                .extend(orphans.iter().map(|r| r.address.clone()));
            plan.notes.push(format!(
                "{} recorded resource{} belong{} to no stage of this stack (a section was removed from the stack file): {} dropped from the state, and what {} made is left as it is",
                orphans.len(),
                if orphans.len() == 1 { "" } else { "s" },
                if orphans.len() == 1 { "s" } else { "" },
                if orphans.len() == 1 { "it is" } else { "they are" },
                if orphans.len() == 1 { "it" } else { "they" },
            ));
        }
        events.emit(Event::PlanReady {
            summary: plan.summary,
        });
        Ok(plan)
    }

    /// Applies exactly `plan`: refused when the state moved since it was made.
    pub async fn apply(
        &mut self,
        plan: &Plan,
        options: &ApplyOptions,
        cancel: &Cancel,
        events: &Events,
    ) -> Result<Applied, EngineError> {
        if plan.stack != self.stack {
            return Err(EngineError::OtherStack {
                plan: plan.stack.clone(),
                session: self.stack.clone(),
            });
        }
        if plan.mode == Mode::RefreshOnly {
            return Err(EngineError::RefreshOnly);
        }
        if !plan.foreign.is_empty() {
            return Err(EngineError::Foreign {
                stack: self.stack.clone(),
                things: plan
                    .foreign
                    .iter()
                    .map(|o| {
                        format!(
                            "  {} ({}): {}",
                            o.address,
                            o.id,
                            o.handling.foreign.as_deref().unwrap_or_default()
                        )
                    })
                    .collect(),
            });
        }
        if !plan.blocked.is_empty() {
            return Err(EngineError::Blocked {
                stack: self.stack.clone(),
                reasons: plan.blocked.clone(),
            });
        }
        if plan.state_serial != self.handle.state.serial {
            return Err(EngineError::StalePlan {
                planned: plan.state_serial,
                current: self.handle.state.serial,
            });
        }
        let location = self.state_location();
        let Some(lock) = self.handle.lock.as_mut() else {
            return Err(EngineError::ReadOnly(self.stack.clone()));
        };
        let mut ledger = Ledger {
            lock: lock.as_mut(),
            state: &mut self.handle.state,
        };
        if plan.has_bookkeeping() {
            for live in &plan.adopt {
                ledger.state.put(Record {
                    address: live.address.clone(),
                    kind: live.kind.clone(),
                    id: Some(live.id.clone()),
                    attrs: live.attrs.clone(),
                    pending_token: None,
                });
            }
            for address in &plan.forget {
                ledger.state.remove(address);
            }
            ledger.save().await?;
        }
        let run = Run {
            phases: &self.phases,
            stages: &self.stages,
            plan,
            options,
            cancel,
            events,
        };
        let mut outcomes = Vec::new();
        let result = run.all(&mut ledger, &mut outcomes).await;
        let serial = ledger.state.serial;
        match result {
            Ok(()) => Ok(Applied {
                applied: outcomes,
                state_serial: serial,
                state_location: location,
                retries: self.retries(),
            }),
            Err(Halt::Stopped(during)) => Err(EngineError::Stopped {
                during,
                signal: cancel.reason(),
                resume: Some((plan.mode, serial)),
            }),
            Err(Halt::Error(err)) => Err(err),
        }
    }

    /// The state as it stands.
    pub fn state(&self) -> &State {
        &self.handle.state
    }

    /// Saves records of what a caller did outside a plan (an image rollout),
    /// under the session's lock; the state's new serial.
    pub async fn record(&mut self, records: Vec<Record>) -> Result<u64, EngineError> {
        let Some(lock) = self.handle.lock.as_mut() else {
            return Err(EngineError::ReadOnly(self.stack.clone()));
        };
        for record in records {
            self.handle.state.put(record);
        }
        lock.save(&mut self.handle.state).await?;
        Ok(self.handle.state.serial)
    }

    /// The retries of the session's calls so far, one entry per service that retried.
    pub fn retries(&self) -> Vec<Retries> {
        let mut all: Vec<Retries> = Vec::new();
        for retries in self.phases.iter().filter_map(|p| p.retries()) {
            match all.iter_mut().find(|r| r.service == retries.service) {
                Some(known) => known.count += retries.count,
                None => all.push(retries),
            }
        }
        all.retain(|r| r.count > 0);
        all
    }

    /// What each stage finds still there (after `down`).
    pub async fn leftovers(&self, cancel: &Cancel) -> Result<Remains, EngineError> {
        let mut remains = Remains::default();
        for (phase, stage) in self.phases.iter().zip(&self.stages).rev() {
            let found: Leftovers = cancel
                .until(Level::Soon, phase.leftovers())
                .await
                .map_err(|_| {
                    self.stopped(format!("while checking what is left of {stage}"), cancel)
                })?
                .map_err(|source| EngineError::Leftovers {
                    stage: stage.clone(),
                    source,
                })?;
            remains.left.extend(found.left);
            remains.checked.extend(found.checked);
        }
        Ok(remains)
    }

    /// The expiring environments of the stack and of its runs, as the
    /// stages find them by their marks (for `stack gc`), soonest first.
    pub async fn environments(&self, cancel: &Cancel) -> Result<Vec<Expiring>, EngineError> {
        let mut found: Vec<Expiring> = Vec::new();
        for (phase, stage) in self.phases.iter().zip(&self.stages) {
            let part = cancel
                .until(Level::Soon, phase.environments())
                .await
                .map_err(|_| {
                    self.stopped(format!("while looking for environments in {stage}"), cancel)
                })?
                .map_err(|source| EngineError::Environments {
                    stage: stage.clone(),
                    source,
                })?;
            for env in part {
                for thing in env.things {
                    Expiring::merge(
                        &mut found,
                        &env.name,
                        env.run.as_deref(),
                        env.expires,
                        thing,
                    );
                }
            }
        }
        found.sort_by(|a, b| (a.expires, &a.name).cmp(&(b.expires, &b.name)));
        Ok(found)
    }

    /// After a `down` that left nothing: removes the stack's artifacts and,
    /// when it records nothing, its state and lock, so nothing of the stack
    /// is left on this machine either. Whether the state was removed.
    pub async fn forget(mut self) -> Result<bool, EngineError> {
        self.artifacts.remove_all()?;
        if !self.handle.state.resources.is_empty() {
            return Ok(false);
        }
        let Some(lock) = self.handle.lock.take() else {
            return Ok(false);
        };
        lock.remove().await?;
        Ok(true)
    }

    /// The stack as it stands: state, artifacts, and each stage's part.
    pub async fn status(&self, cancel: &Cancel) -> Result<Status, EngineError> {
        let state = &self.handle.state;
        let ssh_key = self.artifacts.path(&Artifact::SshKey);
        let mut status = Status {
            stack: self.stack.clone(),
            provider: self.provider.clone(),
            state_file: self.state_location(),
            state_serial: (state.serial > 0).then_some(state.serial),
            recorded_resources: state.resources.len(),
            ssh_key: ssh_key.exists().then_some(ssh_key),
            ssh_user: None,
            cluster: false,
            kubeconfig: None,
            context: None,
            nodes: Vec::new(),
            endpoints: Vec::new(),
            ca_certificate: None,
            grafana: None,
            databases: Vec::new(),
            stages: self.stages.clone(),
        };
        for (phase, stage) in self.phases.iter().zip(&self.stages) {
            let part: StatusPart = cancel
                .until(Level::Soon, phase.status(state))
                .await
                .map_err(|_| self.stopped(format!("while reading {stage}"), cancel))?
                .map_err(|source| EngineError::Status {
                    stage: stage.clone(),
                    source,
                })?;
            status.nodes.extend(part.nodes);
            status.endpoints.extend(part.endpoints);
            status.ssh_user = status.ssh_user.or(part.ssh_user);
            status.cluster |= part.cluster;
            if let (None, Some((path, context))) = (&status.kubeconfig, part.kubeconfig) {
                status.kubeconfig = Some(path);
                status.context = Some(context);
            }
            status.ca_certificate = status.ca_certificate.or(part.ca_certificate);
            status.grafana = status.grafana.or(part.grafana);
            status.databases.extend(part.databases);
        }
        Ok(status)
    }
}

/// Why applying stopped early.
enum Halt {
    /// A stop was asked for; where.
    Stopped(String),
    Error(EngineError),
}

impl From<StateError> for Halt {
    fn from(err: StateError) -> Halt {
        Halt::Error(err.into())
    }
}

/// One apply of a plan.
struct Run<'a> {
    phases: &'a [Arc<dyn Phase>],
    stages: &'a [StageRef],
    plan: &'a Plan,
    options: &'a ApplyOptions,
    cancel: &'a Cancel,
    events: &'a Events,
}

impl Run<'_> {
    fn changes_of(&self, stage: &StageRef, removals: bool) -> Vec<Change> {
        self.plan
            .changes
            .iter()
            .filter(|c| c.stage_number() == stage.number)
            .filter(|c| (c.action == Action::Delete) == removals)
            .cloned()
            .collect()
    }

    fn input<'b>(
        &'b self,
        stage: &'b StageRef,
        changes: &'b [Change],
        state: &'b State,
    ) -> StageInput<'b> {
        StageInput {
            stage,
            mode: self.plan.mode,
            changes,
            plan: &self.plan.changes,
            plan_id: self.plan.plan_id,
            state,
            cancel: self.cancel,
            events: self.events,
        }
    }

    /// Runs one of a stage's hooks, ended by the first stop request.
    async fn hook(
        &self,
        stage: &StageRef,
        doing: &'static str,
        during: &str,
        work: crate::future::BoxFuture<'_, Result<(), PhaseError>>,
    ) -> Result<(), Halt> {
        match self.cancel.until(Level::Soon, work).await {
            Err(Stopped { .. }) => Err(Halt::Stopped(format!("{during} {stage}"))),
            Ok(Err(source)) => Err(Halt::Error(EngineError::Stage {
                stage: stage.clone(),
                doing,
                source,
            })),
            Ok(Ok(())) => Ok(()),
        }
    }

    /// Stops when a stop was asked for; `at` says where (`before stage …`).
    fn check_stop(&self, at: impl FnOnce() -> String) -> Result<(), Halt> {
        if self.cancel.level() >= Level::Soon {
            return Err(Halt::Stopped(at()));
        }
        Ok(())
    }

    async fn batch(
        &self,
        phase: &Arc<dyn Phase>,
        stage: &StageRef,
        changes: &[Change],
        ledger: &mut Ledger<'_>,
        outcomes: &mut Vec<Outcome>,
    ) -> Result<(), Halt> {
        let batch = Batch {
            phase,
            stage,
            changes,
            parallelism: self.options.parallelism,
            cancel: self.cancel,
            events: self.events,
        };
        batch.run(ledger, outcomes).await.map_err(|err| match err {
            BatchError::Failed { total, failures } => Halt::Error(EngineError::Failed {
                stage: stage.clone(),
                total,
                failures,
            }),
            BatchError::Stopped { done, total, .. } => {
                Halt::Stopped(format!("in {stage} after {done} of {total} changes"))
            }
            BatchError::State(err) => err.into(),
        })
    }

    async fn all(&self, ledger: &mut Ledger<'_>, outcomes: &mut Vec<Outcome>) -> Result<(), Halt> {
        let stages = self.phases.iter().zip(self.stages);
        // Forward: what is made or changed, each stage gated before the next.
        let last = self
            .plan
            .changes
            .iter()
            .filter(|c| c.action != Action::Delete)
            .map(Change::stage_number)
            .max()
            .unwrap_or(0);
        for (phase, stage) in stages.clone().take(last) {
            self.check_stop(|| format!("before {stage}"))?;
            let changes = self.changes_of(stage, false);
            if !changes.is_empty() {
                let prepared = match self
                    .cancel
                    .until(
                        Level::Soon,
                        phase.prepare(self.input(stage, &changes, ledger.state)),
                    )
                    .await
                {
                    Err(_) => return Err(Halt::Stopped(format!("while checking {stage}"))),
                    Ok(Err(source)) => {
                        return Err(Halt::Error(EngineError::Stage {
                            stage: stage.clone(),
                            doing: "refused its changes",
                            source,
                        }))
                    }
                    Ok(Ok(prepared)) => prepared,
                };
                if let Prepared::Skip(reason) = prepared {
                    self.events.emit(Event::StageSkipped {
                        stage: stage.clone(),
                        reason,
                    });
                    continue;
                }
                self.batch(phase, stage, &changes, ledger, outcomes).await?;
            }
            self.check_stop(|| {
                if changes.is_empty() {
                    format!("before {stage}")
                } else {
                    format!("after the changes of {stage}, before its health gate")
                }
            })?;
            let begun = Instant::now();
            let state = ledger.state.clone();
            self.hook(
                stage,
                "is not healthy",
                "while waiting for",
                phase.gate(self.input(stage, &changes, &state)),
            )
            .await?;
            self.events.emit(Event::GatePassed {
                stage: stage.clone(),
                seconds: begun.elapsed().as_secs_f64(),
            });
        }
        // Backward: what is removed, the last stage's first.
        for (phase, stage) in stages.clone().rev() {
            let removals = self.changes_of(stage, true);
            if removals.is_empty() {
                continue;
            }
            self.check_stop(|| format!("before the removals of {stage}"))?;
            self.batch(phase, stage, &removals, ledger, outcomes)
                .await?;
        }
        for (phase, stage) in stages {
            let changes: Vec<Change> = self
                .plan
                .changes
                .iter()
                .filter(|c| c.stage_number() == stage.number)
                .cloned()
                .collect();
            let state = ledger.state.clone();
            self.hook(
                stage,
                "could not finish",
                "while finishing",
                phase.finish(self.input(stage, &changes, &state)),
            )
            .await?;
        }
        Ok(())
    }
}
