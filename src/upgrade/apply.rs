//! Rolls the chosen images out on a stack's databases, one database after
//! another, under the session's state lock: each upgrade is recorded as
//! running before its first member moves and with its result after, and a
//! successful one pins the new image, so the state tells what runs even
//! after an interruption.

use std::time::SystemTime;

use serde::Serialize;

use super::check::{self, Outcome, Report};
use super::docker_config::{DockerConfig, DockerConfigError};
use super::registry::{Registries, RegistryError};
use super::rollout::{Ended, Rollout, RolloutError};
use super::schedule::{self, ScheduleError};
use crate::engine::{Cancel, EngineError, Events, ImageUpgrade, Mode, Session, UpgradeResult};
use crate::model::Stack;
use crate::phases::databases::{self, pins, DatabasesError};
use crate::phases::{self, OpenError};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Databases(#[from] Box<DatabasesError>),
    #[error(transparent)]
    Rollout(#[from] Box<RolloutError>),
    #[error("stack {0} has no database cluster `{1}`")]
    NoDatabase(String, String),
    #[error(transparent)]
    DockerConfig(#[from] DockerConfigError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    #[error("{} of {total} database{} could not be checked, so nothing was rolled out:\n{}", failures.len(), if *total == 1 { "" } else { "s" }, failures.iter().map(|f| format!("  {f}")).collect::<Vec<_>>().join("\n"))]
    Check { total: usize, failures: Vec<String> },
}

/// A database's image to roll out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Target {
    pub database: String,
    /// What it runs now.
    pub from: String,
    /// Pinned by digest.
    pub to: String,
}

/// What became of a target.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rolled {
    pub database: String,
    pub from: String,
    pub to: String,
    pub result: UpgradeResult,
    /// The member that failed and why, when one did.
    pub detail: Option<String>,
}

fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// Rolls `targets` out on the stack of `file` (as the stack file says it)
/// through `session`, which holds the state's lock.
pub async fn roll_out(
    file: &Stack,
    session: &mut Session,
    targets: &[Target],
    cancel: &Cancel,
    events: &Events,
) -> Result<Vec<Rolled>, ApplyError> {
    let (health_timeout, rollback) = file.upgrades.as_ref().map_or(
        (crate::model::defaults::UPGRADE_HEALTH_TIMEOUT, true),
        |u| (u.health_timeout, u.rollback),
    );
    let running = pins::running(file, session.state());
    let Some(databases) = phases::databases_alone(&running, session.artifacts(), health_timeout)?
    else {
        return Ok(Vec::new());
    };
    let credentials = databases
        .recorded_credentials(session.state())
        .await
        .map_err(Box::new)?;
    let namespace = running
        .stack
        .kubernetes
        .as_ref()
        .map(|k| k.namespace.clone())
        .unwrap_or_default();
    let mut out = Vec::new();
    for target in targets {
        let Some(named) = file.databases.iter().find(|d| d.name == target.database) else {
            return Err(ApplyError::NoDatabase(
                file.name.clone(),
                target.database.clone(),
            ));
        };
        let mut entry = ImageUpgrade {
            from: target.from.clone(),
            to: target.to.clone(),
            started: now(),
            finished: None,
            result: UpgradeResult::Running,
            detail: None,
        };
        let record = pins::history_record(session.state(), &target.database, &entry);
        session.record(vec![record]).await?;
        let rollout = Rollout {
            database: target.database.clone(),
            namespace: namespace.clone(),
            from: target.from.clone(),
            to: target.to.clone(),
            sets: databases.rolling_sets(&target.database),
            health_timeout,
            rollback,
        };
        let health = async |_left| {
            databases
                .health(&target.database, &credentials, cancel)
                .await
                .map_err(|e| crate::error_chain::error_chain(&e))
        };
        let cluster = databases.cluster().await.map_err(Box::new)?;
        let ended = rollout
            .run(cluster, health, cancel, events)
            .await
            .map_err(Box::new)?;
        entry.finished = Some(now());
        let mut records = Vec::new();
        match &ended {
            Ended::Succeeded => {
                entry.result = UpgradeResult::Succeeded;
                records.push(pins::pin_record(
                    &target.database,
                    &pins::Pin {
                        image: target.to.clone(),
                        file_image: named.image.to_string(),
                        since: now(),
                    },
                ));
            }
            Ended::RolledBack { pod, reason } => {
                entry.result = UpgradeResult::RolledBack;
                entry.detail = Some(format!("{pod}: {reason}"));
            }
            Ended::Failed {
                pod,
                reason,
                rollback,
            } => {
                entry.result = UpgradeResult::Failed;
                entry.detail = Some(match rollback {
                    Some(why) => format!("{pod}: {reason}; the rollback failed too: {why}"),
                    None => format!("{pod}: {reason}; left as it stood (rollback: false)"),
                });
            }
        }
        records.push(pins::history_record(
            session.state(),
            &target.database,
            &entry,
        ));
        session.record(records).await?;
        out.push(Rolled {
            database: target.database.clone(),
            from: entry.from,
            to: entry.to,
            result: entry.result,
            detail: entry.detail,
        });
        if entry.result != UpgradeResult::Succeeded {
            // The databases after it keep their images: a failure needs a look first.
            break;
        }
    }
    Ok(out)
}

/// The images pinned by upgrades and in force, as `--write` puts them into
/// the stack file: (database, image).
pub fn pins_in_force(file: &Stack, session: &Session) -> Vec<(String, String)> {
    let running = databases::pins::running(file, session.state());
    running
        .stack
        .databases
        .iter()
        .zip(&file.databases)
        .filter(|(run, named)| run.image != named.image)
        .map(|(run, _)| (run.name.clone(), run.image.to_string()))
        .collect()
}

/// The registry client of a run: the user's Docker credentials and the
/// stack's insecure registries.
pub fn registries(file: &Stack) -> Result<Registries, ApplyError> {
    let insecure = file
        .upgrades
        .as_ref()
        .map(|u| u.insecure_registries.clone())
        .unwrap_or_default();
    Ok(Registries::new(DockerConfig::load()?, &insecure)?)
}

/// Every database's check against the image it runs now (pinned or the
/// file's), and the upgrades it found.
pub struct Proposal {
    pub report: Report,
    pub targets: Vec<Target>,
}

/// Checks every database's registry for the image its rule allows; a
/// failed check of any of them is an error (nothing is rolled out then).
pub async fn propose(
    file: &Stack,
    session: &Session,
    registries: &Registries,
    cancel: &Cancel,
) -> Result<Proposal, ApplyError> {
    let running = pins::running(file, session.state());
    let report = check::check(&running.stack, |d| d.image.clone(), registries, cancel).await;
    let failures: Vec<String> = report
        .failures()
        .map(|e| crate::error_chain::error_chain(e))
        .collect();
    if !failures.is_empty() {
        return Err(ApplyError::Check {
            total: report.databases.len(),
            failures,
        });
    }
    let targets = report
        .databases
        .iter()
        .filter_map(|d| match &d.outcome {
            Outcome::Candidate(found) => Some(Target {
                database: d.database.clone(),
                from: d.image.clone(),
                to: found.reference.clone(),
            }),
            _ => None,
        })
        .collect();
    Ok(Proposal { report, targets })
}

/// Why the stack cannot be upgraded as it stands, when it cannot: an
/// upgrade rolls images only on a stack in step with its file, so that
/// what it rolls is what the file describes.
pub async fn out_of_step(
    session: &Session,
    cancel: &Cancel,
    events: &Events,
) -> Result<Option<String>, ApplyError> {
    let plan = session.plan(Mode::Normal, cancel, events).await?;
    if plan.is_empty() {
        return Ok(None);
    }
    Ok(Some(format!(
        "stack {} is not in step with its file ({} change{} to apply; `stack plan` shows them): run `stack up`, then upgrade",
        plan.stack,
        plan.changes.len(),
        if plan.changes.len() == 1 { "" } else { "s" }
    )))
}

/// The scheduled time whose upgrade is due at `now`, when the stack has a
/// schedule and one is.
pub fn due(
    file: &Stack,
    session: &Session,
    now: SystemTime,
) -> Result<Option<SystemTime>, ApplyError> {
    let Some(upgrades) = &file.upgrades else {
        return Ok(None);
    };
    let Some(cron) = &upgrades.schedule else {
        return Ok(None);
    };
    Ok(schedule::due(
        cron,
        upgrades.window,
        pins::served(session.state()),
        now,
    )?)
}

/// What a scheduled upgrade did.
pub enum Scheduled {
    UpToDate,
    /// Upgrades found and not rolled out, and why.
    Held {
        databases: Vec<String>,
        reason: String,
    },
    Rolled(Vec<Rolled>),
}

/// The upgrade of scheduled time `due` (`None`: one asked for outside the
/// schedule): the time recorded as served first (one attempt per scheduled
/// time), then checked and, with `approved` and a stack in step with its
/// file, rolled out.
pub async fn scheduled(
    file: &Stack,
    session: &mut Session,
    approved: bool,
    due: Option<SystemTime>,
    cancel: &Cancel,
    events: &Events,
) -> Result<Scheduled, ApplyError> {
    if let Some(due) = due {
        session.record(vec![pins::served_record(due)]).await?;
    }
    let registries = registries(file)?;
    let proposal = propose(file, session, &registries, cancel).await?;
    if proposal.targets.is_empty() {
        return Ok(Scheduled::UpToDate);
    }
    let databases = proposal
        .targets
        .iter()
        .map(|t| format!("{}: {} -> {}", t.database, t.from, t.to))
        .collect();
    if !approved {
        return Ok(Scheduled::Held {
            databases,
            reason: "not approved: run the daemon with --yes to roll upgrades out".into(),
        });
    }
    if let Some(reason) = out_of_step(session, cancel, events).await? {
        return Ok(Scheduled::Held { databases, reason });
    }
    let rolled = roll_out(file, session, &proposal.targets, cancel, events).await?;
    Ok(Scheduled::Rolled(rolled))
}
