//! The one trait every phase implements (infrastructure, bootstrap, each
//! Kubernetes stage, …). A phase is one room: it plans its part (refresh,
//! diff, its own annotations), applies one change at a time when asked,
//! checks its health after its changes, reports what is left after a
//! destroy and what `status` shows. The engine walks the phases in the
//! order of its stage list and knows nothing else about them.

use std::path::PathBuf;

use serde::Serialize;

use super::cancel::Cancel;
use super::events::Events;
use super::plan::{Change, Mode, PlanPart, StageRef};
use crate::future::BoxFuture;
use crate::state::{Record, State};

/// A phase's error: its own error type, boxed (each phase has one).
pub type PhaseError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What a phase plans from.
pub struct PlanInput<'a> {
    /// `Normal` or `Destroy` (a refresh-only plan is planned as `Normal`;
    /// the engine keeps only its drift).
    pub mode: Mode,
    pub stage: &'a StageRef,
    /// The whole state.
    pub state: &'a State,
    /// The records this phase owns.
    pub records: &'a State,
    /// The changes the phases before this one planned.
    pub upstream: &'a [Change],
    /// Different for every plan of a session, so phases that share a
    /// refresh (the Kubernetes stages) read the world once per plan.
    pub plan_id: u64,
    /// Take over what another state of the stack made (`--adopt`).
    pub adopt: bool,
    pub cancel: &'a Cancel,
    pub events: &'a Events,
}

/// What one change is applied with.
pub struct ChangeInput<'a> {
    pub stage: &'a StageRef,
    /// The state as it stands, for the records a change depends on.
    pub state: &'a State,
    /// The idempotency token of a create, recorded before the call.
    pub token: &'a str,
    pub cancel: &'a Cancel,
    pub events: &'a Events,
}

/// What a stage's hooks (prepare, gate, finish) see.
pub struct StageInput<'a> {
    pub stage: &'a StageRef,
    pub mode: Mode,
    /// This phase's changes in the pass at hand (in `finish`: all of its
    /// changes, the plan having been applied whole).
    pub changes: &'a [Change],
    /// Every change of the plan.
    pub plan: &'a [Change],
    /// The id of the plan (as `PlanInput::plan_id` gave it when it was made).
    pub plan_id: u64,
    pub state: &'a State,
    pub cancel: &'a Cancel,
    pub events: &'a Events,
}

/// Whether a stage's changes may go ahead.
#[derive(Debug, Clone, PartialEq)]
pub enum Prepared {
    Proceed,
    /// Its changes are left out of this run, for this reason.
    Skip(String),
}

/// What a phase finds still there after a destroy.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Leftovers {
    /// One line per thing still there.
    pub left: Vec<String>,
    /// What was checked, as a sentence for when nothing is left.
    pub checked: Option<String>,
}

/// An environment found by its marks alone (tags, labels, a VM's own
/// record), with no state: what `stack gc` sweeps once it has expired.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Expiring {
    /// The environment's stack name (`NAME`, or `NAME-RUN` for a run's).
    pub name: String,
    /// The run it is the environment of, if one.
    pub run: Option<String>,
    /// When it expires, in seconds since the epoch (the latest of its
    /// things' expiries, so nothing goes before all of it has expired).
    pub expires: u64,
    /// What carries the marks, one line each.
    pub things: Vec<String>,
}

impl Expiring {
    /// Adds a thing of environment `name` to `found`, merging by name.
    pub fn merge(
        found: &mut Vec<Expiring>,
        name: &str,
        run: Option<&str>,
        expires: u64,
        thing: String,
    ) {
        match found.iter_mut().find(|e| e.name == name) {
            Some(env) => {
                env.expires = env.expires.max(expires);
                env.things.push(thing);
            }
            None => found.push(Expiring {
                name: name.to_string(),
                run: run.map(str::to_string),
                expires,
                things: vec![thing],
            }),
        }
    }
}

/// The retries of one service's calls after transient errors (throttling,
/// 5xx answers, dropped connections), counted over the session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Retries {
    /// `EC2`, `Kubernetes`.
    pub service: String,
    pub count: usize,
}

/// A node as `stack status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    pub address: String,
    pub id: String,
    pub state: String,
    pub public_address: Option<String>,
    pub private_address: Option<String>,
    /// How to reach it over SSH with its pinned host key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ssh: Option<SshAccess>,
}

/// Where a node answers SSH, as whom, and the host key it must present.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SshAccess {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub host_key: String,
    /// The names `stack ssh` accepts for the node.
    pub names: Vec<String>,
}

/// An endpoint as `stack status` lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EndpointStatus {
    pub name: String,
    pub url: String,
}

/// A database cluster as `stack status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseStatus {
    pub name: String,
    pub kind: String,
    /// Where clients reach it.
    pub endpoints: Vec<String>,
    /// The Secret (`NAMESPACE/NAME`) with the admin's `username` and `password`.
    pub credentials_secret: String,
    /// The command that prints the admin password.
    pub credentials_command: String,
    /// Members in the cluster and connected, of those wanted (`3 of 3`).
    pub membership: String,
    pub problems: Vec<String>,
    pub replications: Vec<ReplicationStatus>,
    /// Read replicas and how far each is behind its primary (immudb).
    pub replicas: Vec<ReplicaStatus>,
    /// The image it runs: the stack file's, or one `stack upgrade` pinned.
    pub image: String,
    /// Its image upgrades, oldest first.
    pub upgrades: Vec<ImageUpgrade>,
    /// The admin's login, from the state: never printed, only handed to
    /// the command `stack run` runs, in a file of its own.
    #[serde(skip)]
    pub login: Option<Login>,
}

/// A database admin's username and password.
#[derive(Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Login {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Login {{ username: {:?}, password: (redacted) }}",
            self.username
        )
    }
}

/// How an upgrade of a database's image ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpgradeResult {
    /// Under way, or stopped before it ended.
    Running,
    Succeeded,
    /// A member failed its health gate; the cluster is back on `from`.
    RolledBack,
    /// A member failed and the cluster was left as it stood (`rollback:
    /// false`, or the rollback failed too).
    Failed,
}

impl UpgradeResult {
    /// As the JSON output and the metrics spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            UpgradeResult::Running => "running",
            UpgradeResult::Succeeded => "succeeded",
            UpgradeResult::RolledBack => "rolled-back",
            UpgradeResult::Failed => "failed",
        }
    }
}

/// One upgrade of a database's image, as the state keeps it and `stack
/// status` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageUpgrade {
    pub from: String,
    pub to: String,
    /// RFC 3339.
    pub started: String,
    pub finished: Option<String>,
    pub result: UpgradeResult,
    /// Why it failed: the member and its health gate's answer.
    pub detail: Option<String>,
}

/// A read replica as `stack status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaStatus {
    pub pod: String,
    /// Transactions behind the primary; `None` when it could not be read.
    pub lag: Option<u64>,
    /// Why the lag is unknown.
    pub problem: Option<String>,
}

/// A replication as `stack status` shows it: its scheduler state.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicationStatus {
    pub name: String,
    pub state: String,
    pub error: Option<String>,
}

/// A phase's part of `stack status`; the engine puts the parts together.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StatusPart {
    pub nodes: Vec<NodeStatus>,
    pub endpoints: Vec<EndpointStatus>,
    pub ssh_user: Option<String>,
    /// Whether the stack has a Kubernetes cluster (made or existing).
    pub cluster: bool,
    /// The cluster's kubeconfig and context, once there is one.
    pub kubeconfig: Option<(PathBuf, String)>,
    pub ca_certificate: Option<PathBuf>,
    pub grafana: Option<String>,
    /// The database clusters, as the database phase reads them.
    pub databases: Vec<DatabaseStatus>,
}

pub trait Phase: Send + Sync {
    /// As stages are named in messages: `infrastructure`, `workloads`.
    fn name(&self) -> &str;

    /// Whether a record of the state is this phase's.
    fn owns(&self, record: &Record) -> bool;

    /// Reads the phase's part of the live world and plans its changes.
    fn plan<'a>(&'a self, input: PlanInput<'a>) -> BoxFuture<'a, Result<PlanPart, PhaseError>>;

    /// Before the stage's changes are applied: checks them (a dry run), or
    /// says why the stage is skipped in this run.
    fn prepare<'a>(&'a self, input: StageInput<'a>) -> BoxFuture<'a, Result<Prepared, PhaseError>> {
        let _ = input;
        Box::pin(async { Ok(Prepared::Proceed) })
    }

    /// Applies one change; the new record, or `None` after a removal.
    fn apply<'a>(
        &'a self,
        change: &'a Change,
        input: ChangeInput<'a>,
    ) -> BoxFuture<'a, Result<Option<Record>, PhaseError>>;

    /// After the stage's changes (or when a later stage has changes): waits
    /// until what the stage holds is healthy, within the stage's timeout.
    fn gate<'a>(&'a self, input: StageInput<'a>) -> BoxFuture<'a, Result<(), PhaseError>> {
        let _ = input;
        Box::pin(async { Ok(()) })
    }

    /// After the whole plan was applied.
    fn finish<'a>(&'a self, input: StageInput<'a>) -> BoxFuture<'a, Result<(), PhaseError>> {
        let _ = input;
        Box::pin(async { Ok(()) })
    }

    /// After a destroy: what of the phase's is still there.
    fn leftovers(&self) -> BoxFuture<'_, Result<Leftovers, PhaseError>> {
        Box::pin(async { Ok(Leftovers::default()) })
    }

    /// The environments of the stack and of its runs that carry an expiry,
    /// found by their marks alone, where this phase makes things.
    fn environments(&self) -> BoxFuture<'_, Result<Vec<Expiring>, PhaseError>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    /// The phase's part of `stack status`.
    fn status<'a>(&'a self, state: &'a State) -> BoxFuture<'a, Result<StatusPart, PhaseError>> {
        let _ = state;
        Box::pin(async { Ok(StatusPart::default()) })
    }

    /// How often the phase retried its calls so far in the session; phases
    /// that share a client leave it to one of them.
    fn retries(&self) -> Option<Retries> {
        None
    }
}
