//! `stack daemon`: stacks kept checked and current without a person
//! watching. For each stack file it runs a refresh-only plan every
//! `drift_every` (drift is reported, never repaired: `stack up` does that)
//! and, inside the windows of the stack's `upgrades.schedule`, the upgrade
//! `stack upgrade` would make. Each job opens the stack afresh (the file is
//! read again, the state locked for the job only), so a user's `stack up`
//! between jobs is not blocked and an edited file is picked up. What the
//! jobs do goes to a `DaemonLog` and to the metrics.

pub mod metrics;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::engine::{Cancel, EngineError, Events, Level, Mode, Opening};
use crate::model;
use crate::phases;
use crate::upgrade::{self, apply::Rolled};
use metrics::{Job, Metrics};

/// What the daemon is asked to do.
pub struct Options {
    pub files: Vec<PathBuf>,
    /// How often each stack gets a refresh-only plan.
    pub drift_every: Duration,
    /// Run a drift check and an upgrade of every stack at start, due or not.
    pub now: bool,
    /// Upgrades may roll out (`--yes`); without it they are only checked.
    pub approved: bool,
}

/// One thing the daemon did, as it logs it.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum DaemonEvent {
    /// A refresh-only plan: `drift` things changed outside stack.
    DriftChecked {
        stack: String,
        drift: usize,
        seconds: f64,
    },
    /// The upgrade of a stack found nothing to roll out.
    UpToDate { stack: String },
    /// Upgrades were found but not rolled out (no approval, or the stack
    /// is not in step with its file).
    UpgradeHeld {
        stack: String,
        databases: Vec<String>,
        reason: String,
    },
    Upgraded {
        stack: String,
        #[serde(flatten)]
        rolled: Rolled,
    },
    Failed {
        stack: String,
        job: Job,
        error: String,
    },
    /// When the next scheduled upgrade of a stack is.
    Scheduled { stack: String, next: String },
}

pub trait DaemonLog: Send + Sync {
    fn log(&self, event: DaemonEvent);
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

/// The stack's name for logs and metrics before (or without) loading it.
fn stack_name(file: &std::path::Path) -> String {
    model::load(file).map_or_else(|_| file.display().to_string(), |s| s.name)
}

/// Why a job failed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Load(#[from] model::LoadError),
    #[error(transparent)]
    Open(#[from] phases::OpenError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Upgrade(#[from] Box<upgrade::apply::ApplyError>),
    #[error(transparent)]
    Schedule(#[from] upgrade::schedule::ScheduleError),
}

/// One stack's refresh-only plan (which keeps only drift): (stack, drift).
async fn drift_check(file: &std::path::Path, cancel: &Cancel) -> Result<(String, usize), JobError> {
    let stack = model::load(file)?;
    phases::check(&stack)?;
    let opening = Opening::write("stack daemon (drift check)", Duration::ZERO, cancel);
    let session = phases::open(&stack, &opening).await?;
    let plan = session
        .plan(Mode::RefreshOnly, cancel, &Events::discard())
        .await?;
    Ok((stack.name, plan.changes.len()))
}

/// One stack's upgrade, when `schedule_due` says it is due (or forced).
async fn upgrade_pass(
    file: &std::path::Path,
    forced: bool,
    options: &Options,
    log: &dyn DaemonLog,
    metrics: &Metrics,
    cancel: &Cancel,
) -> Result<Option<String>, JobError> {
    let stack = model::load(file)?;
    phases::check(&stack)?;
    let opening = Opening::write("stack daemon (upgrade)", Duration::ZERO, cancel);
    let mut session = phases::open(&stack, &opening).await?;
    let due = upgrade::apply::due(&stack, &session, SystemTime::now()).map_err(Box::new)?;
    if due.is_none() && !forced {
        return Ok(None);
    }
    let outcome = upgrade::apply::scheduled(
        &stack,
        &mut session,
        options.approved,
        due,
        cancel,
        &Events::discard(),
    )
    .await
    .map_err(Box::new)?;
    match outcome {
        upgrade::apply::Scheduled::UpToDate => log.log(DaemonEvent::UpToDate {
            stack: stack.name.clone(),
        }),
        upgrade::apply::Scheduled::Held { databases, reason } => {
            log.log(DaemonEvent::UpgradeHeld {
                stack: stack.name.clone(),
                databases,
                reason,
            })
        }
        upgrade::apply::Scheduled::Rolled(rolled) => {
            for rolled in rolled {
                metrics.upgraded(&stack.name, &rolled.database, rolled.result.as_str());
                log.log(DaemonEvent::Upgraded {
                    stack: stack.name.clone(),
                    rolled,
                });
            }
        }
    }
    Ok(Some(stack.name))
}

/// Runs until the stop reaches `Soon`; a job under way finishes first
/// (a rollout stops between members, recorded, as `stack upgrade` does).
pub async fn run(options: &Options, metrics: Arc<Metrics>, log: &dyn DaemonLog, cancel: &Cancel) {
    let start = Instant::now();
    let mut drift_due: Vec<Instant> = vec![start; options.files.len()];
    let mut forced = options.now;
    loop {
        for (i, file) in options.files.iter().enumerate() {
            if cancel.level() >= Level::Soon {
                return;
            }
            if Instant::now() >= drift_due[i] || forced {
                drift_due[i] = Instant::now() + options.drift_every;
                let began = Instant::now();
                match drift_check(file, cancel).await {
                    Ok((stack, drift)) => {
                        metrics.ran(&stack, Job::Drift, true, SystemTime::now());
                        metrics.drift(&stack, drift);
                        log.log(DaemonEvent::DriftChecked {
                            stack,
                            drift,
                            seconds: began.elapsed().as_secs_f64(),
                        });
                    }
                    Err(err) => {
                        let stack = stack_name(file);
                        metrics.ran(&stack, Job::Drift, false, SystemTime::now());
                        log.log(DaemonEvent::Failed {
                            stack,
                            job: Job::Drift,
                            error: crate::error_chain::error_chain(&err),
                        });
                    }
                }
            }
            if cancel.level() >= Level::Soon {
                return;
            }
            match upgrade_pass(file, forced, options, log, &metrics, cancel).await {
                Ok(Some(stack)) => {
                    metrics.ran(&stack, Job::Upgrade, true, SystemTime::now());
                    if let Ok(Some(next)) = next_scheduled(file) {
                        log.log(DaemonEvent::Scheduled {
                            stack,
                            next: rfc3339(next),
                        });
                    }
                }
                Ok(None) => {}
                Err(err) => {
                    let stack = stack_name(file);
                    metrics.ran(&stack, Job::Upgrade, false, SystemTime::now());
                    log.log(DaemonEvent::Failed {
                        stack,
                        job: Job::Upgrade,
                        error: crate::error_chain::error_chain(&err),
                    });
                }
            }
        }
        forced = false;
        // Schedules are minutes apart; drift checks at their interval.
        let next_drift = drift_due.iter().min().copied().unwrap_or(start);
        let pause = next_drift
            .saturating_duration_since(Instant::now())
            .min(Duration::from_secs(30));
        if cancel
            .until(Level::Soon, tokio::time::sleep(pause))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// The next scheduled upgrade time of the stack in `file`, when it has a schedule.
fn next_scheduled(file: &std::path::Path) -> Result<Option<SystemTime>, JobError> {
    let stack = model::load(file)?;
    let Some(schedule) = stack.upgrades.as_ref().and_then(|u| u.schedule.clone()) else {
        return Ok(None);
    };
    Ok(upgrade::schedule::next(&schedule, SystemTime::now())?)
}
