//! The bootstrap phase: the cluster on the nodes. cloud-init installs
//! microk8s (see `cloudinit`); `stack` follows over SSH with the pinned host
//! keys and makes one cluster: waits for each node, joins the others to the
//! first, enables the addons one at a time and fetches a kubeconfig. Each
//! step (`steps`) is a resource of the plan, recorded in state when it
//! finishes, so a re-run continues where the last one stopped; refresh
//! reads the cluster back for drift.
//!
//! It reaches the nodes through the infrastructure's [`Nodes`] capability
//! and knows nothing else of EC2 or KVM.

pub mod steps;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use self::steps::{Action, Run, Step, Vars};
use crate::artifacts::{Artifact, Artifacts};
use crate::engine::{
    Action as ChangeAction, Change, ChangeInput, Event, Handling, Level, Mode, Observed, Phase,
    PhaseError, PlanInput, PlanPart, Resource, StatusPart, StepRef,
};
use crate::error_chain::error_chain;
use crate::files::{sha256_hex, FileError};
use crate::future::BoxFuture;
use crate::microk8s::MICROK8S;
use crate::model::Stack;
use crate::nodes::{Nodes, SshNode};
use crate::ssh::{self, SshError};
use crate::state::{Record, State};

/// How many lines of a failed command's output an error shows.
const OUTPUT_LINES: usize = 15;
/// The longest a single quick command (probe, add-node, config) may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// The pause between attempts of a step.
const RETRY_PAUSE: Duration = Duration::from_secs(5);

/// A step that failed on a node: which, with what, and the hint.
#[derive(Debug, thiserror::Error)]
#[error("step {number} of {of} failed on {node}: {description}\n  command: {command}\n  {outcome}\n  last output:\n{output}\n  hint: {hint}")]
pub struct StepFailure {
    number: usize,
    of: usize,
    node: String,
    description: String,
    command: String,
    outcome: String,
    output: String,
    hint: String,
}

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error(transparent)]
    Step(Box<StepFailure>),
    #[error("no step of the bootstrap is called {0}")]
    UnknownStep(String),
    #[error("node {node} is not running or not recorded yet (run `stack up`)")]
    NoNode { node: String },
    #[error("cannot find how to reach the nodes: {0}")]
    Infra(String),
    #[error(transparent)]
    Ssh(#[from] SshError),
    #[error(transparent)]
    Kubeconfig(#[from] crate::kubeconfig::KubeconfigError),
    #[error(transparent)]
    Io(#[from] FileError),
}

/// The last `n` lines of a command's output, indented.
fn last_lines(output: &str, n: usize) -> String {
    let lines: Vec<&str> = output.lines().collect();
    let start = lines.len().saturating_sub(n);
    if lines.is_empty() {
        return "    (none)".to_string();
    }
    lines[start..]
        .iter()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A fresh join token: 32 hex characters from the OS's random source, as
/// `microk8s add-node --token` wants.
fn join_token() -> String {
    use ssh_key::rand_core::{OsRng, RngCore};
    let mut bytes = [0u8; 16];
    OsRng.fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What a probe of the first node read from the cluster.
#[derive(Debug, Default)]
struct ClusterView {
    /// Node name → its Ready condition is True.
    nodes: BTreeMap<String, bool>,
    enabled: BTreeSet<String>,
}

/// Splits the probe's output into its `--- name` sections.
fn sections(output: &str) -> BTreeMap<&str, Vec<&str>> {
    let mut out: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    let mut current = "";
    for line in output.lines() {
        if let Some(name) = line.strip_prefix("--- ") {
            current = name.trim();
            out.entry(current).or_default();
        } else if !current.is_empty() {
            out.entry(current).or_default().push(line);
        }
    }
    out
}

/// The snap's tracked channel, from `snap list microk8s`.
fn tracking(lines: &[&str]) -> Option<String> {
    lines
        .iter()
        .find(|l| l.starts_with("microk8s "))
        .and_then(|l| l.split_whitespace().nth(3))
        .map(str::to_string)
}

const PROBE_CHANNEL: &str = "echo '--- snap'; snap list microk8s 2>&1";

fn probe_cluster_command() -> String {
    format!(
        "{PROBE_CHANNEL}; echo '--- nodes'; {m} kubectl get nodes -o jsonpath='{{range .items[*]}}{{.metadata.name}} {{.status.conditions[?(@.type==\"Ready\")].status}}{{\"\\n\"}}{{end}}' 2>&1; echo '--- addons'; {m} status --format short 2>&1",
        m = MICROK8S
    )
}

fn parse_cluster(output: &str) -> ClusterView {
    let sections = sections(output);
    let mut view = ClusterView::default();
    for line in sections.get("nodes").into_iter().flatten() {
        let mut words = line.split_whitespace();
        if let (Some(name), Some(ready)) = (words.next(), words.next()) {
            view.nodes.insert(name.to_string(), ready == "True");
        }
    }
    for line in sections.get("addons").into_iter().flatten() {
        // `core/dns: enabled`
        if let Some((name, status)) = line.trim().split_once(": ") {
            if let Some((_, addon)) = name.split_once('/') {
                if status.trim() == "enabled" {
                    view.enabled.insert(addon.to_string());
                }
            }
        }
    }
    view
}

/// Tells that `step` begins a wait of at most `limit`: `SSH on control-0`
/// for a step that waits for something, else the step itself.
fn waiting(input: &ChangeInput<'_>, step: &Step, limit: Duration) {
    let what = match step.description.strip_prefix("wait for ") {
        Some(what) => what.to_string(),
        None => format!(
            "step {} of {} to {}",
            step.number, step.of, step.description
        ),
    };
    input.events.emit(Event::WaitStarted {
        stage: input.stage.clone(),
        address: step.address.clone(),
        what,
        limit,
    });
}

pub struct Bootstrap {
    nodes: Arc<dyn Nodes>,
    stack_name: String,
    key_path: PathBuf,
    wait: Duration,
    steps: Vec<Step>,
    artifacts: Artifacts,
}

impl Bootstrap {
    /// The bootstrap of the stack's cluster on the nodes `nodes` reaches;
    /// `None` when the stack makes no cluster.
    pub fn for_stack(
        stack: &Stack,
        nodes: Arc<dyn Nodes>,
        key_path: PathBuf,
        artifacts: &Artifacts,
    ) -> Option<Bootstrap> {
        let reach = steps::Reach {
            hosts_in_user_data: nodes.addresses_in_advance(),
            api_on_loopback: nodes.api_on_loopback(),
        };
        let kubeconfig = artifacts.path(&Artifact::Kubeconfig);
        let steps = steps::steps(stack, reach, &kubeconfig.display().to_string());
        if steps.is_empty() {
            return None;
        }
        Some(Bootstrap {
            nodes,
            stack_name: stack.name.clone(),
            key_path,
            wait: stack.timeouts.ready,
            steps,
            artifacts: artifacts.clone(),
        })
    }

    fn first_key(&self) -> &str {
        self.steps.first().map_or("", |s| s.node.as_str())
    }

    fn step(&self, address: &str) -> Result<&Step, BootstrapError> {
        self.steps
            .iter()
            .find(|s| s.address == address)
            .ok_or_else(|| BootstrapError::UnknownStep(address.to_string()))
    }

    /// The steps as resources; the steps of nodes this plan makes or
    /// replaces (all of them when it is the first node) run again.
    fn desired(&self, records: &State, fresh: &BTreeSet<String>) -> Vec<Resource> {
        let first_fresh = fresh.contains(self.first_key());
        self.steps
            .iter()
            .map(|s| {
                let again =
                    (first_fresh || fresh.contains(&s.node)) && records.get(&s.address).is_some();
                Resource {
                    address: s.address.clone(),
                    kind: s.kind.to_string(),
                    attrs: s.attrs.clone(),
                    handling: Handling {
                        rebuild: again
                            .then(|| "the node is new or replaced in this plan".to_string()),
                        step: Some(StepRef {
                            number: s.number,
                            of: s.of,
                            description: s.description.clone(),
                        }),
                        optional: !s.fatal,
                        ..Handling::default()
                    },
                }
            })
            .collect()
    }

    async fn ssh_nodes(&self, state: &State) -> Result<BTreeMap<String, SshNode>, BootstrapError> {
        Ok(self
            .nodes
            .ssh_nodes(state)
            .await
            .map_err(|e| BootstrapError::Infra(error_chain(e.as_ref())))?
            .into_iter()
            .map(|n| (n.key.clone(), n))
            .collect())
    }

    fn target<'a>(&'a self, node: &'a SshNode) -> ssh::Target<'a> {
        ssh::Target {
            node: &node.hostname,
            address: node.ssh,
            user: &node.user,
            key_path: &self.key_path,
            pinned_host_key: &node.host_key,
        }
    }

    async fn plan_part(&self, input: PlanInput<'_>) -> Result<PlanPart, PhaseError> {
        if input.mode == Mode::Destroy {
            // Removing the nodes removes the cluster: its steps are only forgotten.
            return Ok(crate::engine::plan::forget_all(input.records));
        }
        // Nodes this plan makes or replaces run all their steps again.
        let fresh: BTreeSet<String> = self
            .steps
            .iter()
            .map(|s| s.node.clone())
            .filter(|key| {
                let address = self.nodes.node_address(key);
                input.upstream.iter().any(|c| {
                    c.address == address
                        && matches!(c.action, ChangeAction::Create | ChangeAction::Replace)
                })
            })
            .collect();
        let observed = self
            .refresh(input.records, input.state, &fresh)
            .await
            .map_err(|e| Box::new(ReadError(self.stack_name.clone(), e)))?;
        Ok(crate::engine::plan::diff(
            &self.desired(input.records, &fresh),
            input.records,
            &observed,
        ))
    }

    /// Reads back, for each recorded step, whether it still holds: the
    /// channel and readiness of every node, its membership in the cluster,
    /// the enabled addons and the local kubeconfig. Nodes in `fresh` (made or
    /// replaced by this plan) are not asked: their steps run again.
    async fn refresh(
        &self,
        records: &State,
        state: &State,
        fresh: &BTreeSet<String>,
    ) -> Result<Vec<Observed>, BootstrapError> {
        let first_key = self.first_key();
        if records.resources.is_empty() || fresh.contains(first_key) {
            return Ok(Vec::new());
        }
        let nodes = self.ssh_nodes(state).await?;
        // What each reachable node says; the first node also speaks for the cluster.
        let mut channels: BTreeMap<&str, Option<String>> = BTreeMap::new();
        let mut cluster = None;
        for (key, node) in &nodes {
            if fresh.contains(key) {
                continue;
            }
            let command = if key == first_key {
                probe_cluster_command()
            } else {
                PROBE_CHANNEL.to_string()
            };
            match ssh::run(&self.target(node), &command, COMMAND_TIMEOUT).await {
                Ok((_, output)) => {
                    channels.insert(
                        key,
                        tracking(sections(&output).get("snap").map_or(&[][..], |v| v)),
                    );
                    if key == first_key {
                        cluster = Some(parse_cluster(&output));
                    }
                }
                Err(err @ SshError::HostKeyMismatch { .. }) => return Err(err.into()),
                Err(err) => tracing::warn!(node = %node.hostname, "cannot read the node: {err}"),
            }
        }
        let kubeconfig_sha = self
            .artifacts
            .read(&Artifact::Kubeconfig)?
            .map(|bytes| sha256_hex(&bytes));
        let mut observed = Vec::new();
        for record in &records.resources {
            let Some(id) = record.id.clone() else {
                continue;
            };
            let seen = |attrs: Value| Observed {
                address: record.address.clone(),
                kind: record.kind.clone(),
                id: id.clone(),
                attrs,
                handling: Handling::default(),
            };
            let Some(step) = self.steps.iter().find(|s| s.address == record.address) else {
                // No longer a step of the stack: an addon or node removed.
                let still_there = match (&cluster, record.kind.as_str()) {
                    (Some(view), steps::ADDON) => view.enabled.contains(&id),
                    (Some(view), steps::JOIN) => view.nodes.contains_key(&id),
                    _ => false,
                };
                if still_there {
                    observed.push(seen(record.attrs.clone()));
                }
                continue;
            };
            let Some(node) = nodes.get(&step.node) else {
                continue;
            };
            if fresh.contains(&step.node)
                || record.attrs["nodeId"].as_str() != Some(node.id.as_str())
            {
                continue;
            }
            let mut attrs = record.attrs.clone();
            match &step.action {
                Action::Ready => match (channels.get(step.node.as_str()), &cluster) {
                    (Some(channel), Some(view)) => {
                        attrs["channel"] = json!(channel);
                        attrs["ready"] =
                            json!(view.nodes.get(&node.hostname).copied().unwrap_or(false));
                    }
                    (None, _) => attrs["ready"] = json!(false),
                    _ => {}
                },
                Action::Join => {
                    if cluster
                        .as_ref()
                        .is_some_and(|v| !v.nodes.contains_key(&node.hostname))
                    {
                        continue;
                    }
                }
                Action::Enable { name } => {
                    if let Some(view) = &cluster {
                        attrs["enabled"] = json!(view.enabled.contains(*name));
                    }
                }
                Action::Kubeconfig => {
                    if kubeconfig_sha.as_deref() != record.attrs["sha256"].as_str() {
                        continue;
                    }
                }
                Action::Connect | Action::CloudInit | Action::Hosts | Action::Certificate => {}
            }
            observed.push(seen(attrs));
        }
        Ok(observed)
    }

    fn failure(
        &self,
        step: &Step,
        node: &str,
        command: &str,
        outcome: String,
        output: &str,
    ) -> BootstrapError {
        BootstrapError::Step(Box::new(StepFailure {
            number: step.number,
            of: step.of,
            node: node.to_string(),
            description: step.description.clone(),
            command: command.to_string(),
            outcome,
            output: last_lines(output, OUTPUT_LINES),
            hint: step.hint.to_string(),
        }))
    }

    /// Runs one of a step's commands on its node, failing the step when it
    /// exits non-zero; a long one is told as a wait.
    async fn run(
        &self,
        step: &Step,
        run: &Run,
        nodes: &BTreeMap<String, SshNode>,
        vars: &Vars,
        input: &ChangeInput<'_>,
    ) -> Result<String, BootstrapError> {
        let node = nodes.get(&run.node).ok_or_else(|| BootstrapError::NoNode {
            node: run.node.clone(),
        })?;
        let command = run.command.filled(vars);
        // Messages never show a join token: it stays valid for a while.
        let shown = run.command.filled(&vars.hidden());
        let timeout = if run.long {
            // The stack's own bound on a wait, a little past the remote one.
            let timeout = self.wait + Duration::from_secs(30);
            waiting(input, step, timeout);
            timeout
        } else {
            COMMAND_TIMEOUT
        };
        match ssh::run(&self.target(node), &command, timeout).await {
            Ok((0, output)) => Ok(output),
            Ok((code, output)) => Err(self.failure(
                step,
                &node.hostname,
                &shown,
                format!("exit status {code}"),
                &output,
            )),
            Err(err @ SshError::HostKeyMismatch { .. }) => Err(err.into()),
            Err(err) => Err(self.failure(step, &node.hostname, &shown, err.to_string(), "")),
        }
    }

    /// Runs the step's command until SSH answers with the pinned key (never
    /// past a wrong key), within `timeouts.ready`.
    async fn wait_for_ssh(
        &self,
        step: &Step,
        nodes: &BTreeMap<String, SshNode>,
        input: &ChangeInput<'_>,
    ) -> Result<(), BootstrapError> {
        let start = Instant::now();
        waiting(input, step, self.wait);
        for run in &step.runs {
            let node = nodes.get(&run.node).ok_or_else(|| BootstrapError::NoNode {
                node: run.node.clone(),
            })?;
            let command = run.command.filled(&Vars::default());
            loop {
                match ssh::run(&self.target(node), &command, Duration::from_secs(10)).await {
                    Ok(_) => break,
                    Err(err @ SshError::HostKeyMismatch { .. }) => return Err(err.into()),
                    Err(err) if start.elapsed() >= self.wait => {
                        return Err(self.failure(
                            step,
                            &node.hostname,
                            &command,
                            format!(
                                "no SSH within timeouts.ready ({})",
                                humantime::format_duration(self.wait)
                            ),
                            &err.to_string(),
                        ))
                    }
                    Err(err) if input.cancel.level() != Level::Running => {
                        return Err(self.failure(
                            step,
                            &node.hostname,
                            &command,
                            "stopped waiting: the run is stopping".to_string(),
                            &err.to_string(),
                        ))
                    }
                    Err(_) => tokio::time::sleep(Duration::from_secs(2)).await,
                }
            }
        }
        Ok(())
    }

    /// One attempt of a step: its commands in order; `Ok` carries what to
    /// record besides the step's attrs.
    async fn attempt(
        &self,
        step: &Step,
        nodes: &BTreeMap<String, SshNode>,
        input: &ChangeInput<'_>,
    ) -> Result<Value, BootstrapError> {
        if step.action == Action::Connect {
            self.wait_for_ssh(step, nodes, input).await?;
            return Ok(json!({}));
        }
        let first = nodes
            .get(self.first_key())
            .ok_or_else(|| BootstrapError::NoNode {
                node: self.first_key().to_string(),
            })?;
        let vars = Vars {
            token: if step.action == Action::Join {
                join_token()
            } else {
                String::new()
            },
            join_address: first.private_ip.clone(),
            public_address: first.api.0.clone(),
            hosts_lines: nodes
                .values()
                .map(|n| format!("'{} {}'", n.private_ip, n.hostname))
                .collect::<Vec<_>>()
                .join(" "),
        };
        let mut output = String::new();
        let mut last = None;
        for run in &step.runs {
            output = self.run(step, run, nodes, &vars, input).await?;
            last = Some(run);
        }
        if let (Some(expect), Some(run)) = (step.expect, last) {
            if !output.contains(expect) {
                let node = nodes.get(&run.node).map_or("", |n| n.hostname.as_str());
                return Err(self.failure(
                    step,
                    node,
                    &run.command.filled(&vars.hidden()),
                    format!("the output does not say `{expect}`"),
                    &output,
                ));
            }
        }
        Ok(match &step.action {
            Action::Ready => json!({ "ready": true }),
            Action::Certificate => json!({ "address": vars.public_address }),
            Action::Kubeconfig => {
                let server = format!("https://{}:{}", first.api.0, first.api.1);
                let config = crate::kubeconfig::for_user(&output, &self.stack_name, &server)?;
                let text = crate::kubeconfig::render(&config);
                self.artifacts
                    .write(&Artifact::Kubeconfig, text.as_bytes())?;
                json!({ "server": server, "sha256": sha256_hex(text.as_bytes()) })
            }
            _ => json!({}),
        })
    }

    /// Runs a step, trying again up to its attempts (unless the run is stopping).
    async fn run_step(
        &self,
        step: &Step,
        input: &ChangeInput<'_>,
    ) -> Result<Record, BootstrapError> {
        let mut attempt = 1;
        loop {
            let nodes = self.ssh_nodes(input.state).await?;
            match self.attempt(step, &nodes, input).await {
                Ok(extra) => {
                    let node = nodes
                        .get(&step.node)
                        .ok_or_else(|| BootstrapError::NoNode {
                            node: step.node.clone(),
                        })?;
                    let mut attrs = step.attrs.clone();
                    for (key, value) in extra.as_object().into_iter().flatten() {
                        attrs[key] = value.clone();
                    }
                    attrs["nodeId"] = json!(node.id);
                    let id = match &step.action {
                        Action::Enable { name } => name.to_string(),
                        Action::Kubeconfig => self
                            .artifacts
                            .path(&Artifact::Kubeconfig)
                            .display()
                            .to_string(),
                        _ => node.hostname.clone(),
                    };
                    return Ok(Record {
                        address: step.address.clone(),
                        kind: step.kind.to_string(),
                        id: Some(id),
                        attrs,
                        pending_token: None,
                    });
                }
                Err(err @ BootstrapError::Step(_))
                    if attempt < step.attempts && input.cancel.level() == Level::Running =>
                {
                    input.events.warn(
                        Some(input.stage),
                        format!(
                            "{}: attempt {attempt} of {} failed, trying again: {}",
                            step.address,
                            step.attempts,
                            err.to_string().lines().next().unwrap_or_default()
                        ),
                    );
                    attempt += 1;
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// Runs the repairs of the fields that drifted, then the step itself.
    async fn repair(
        &self,
        change: &Change,
        input: &ChangeInput<'_>,
    ) -> Result<Record, BootstrapError> {
        let step = self.step(&change.address)?;
        for repair in &step.repairs {
            if change
                .fields
                .iter()
                .any(|f| f.path.to_string() == repair.field)
            {
                let nodes = self.ssh_nodes(input.state).await?;
                self.run(step, &repair.run, &nodes, &Vars::default(), input)
                    .await?;
            }
        }
        self.run_step(step, input).await
    }

    /// Undoes what a removed step did (an addon disabled, a node removed).
    async fn undo(&self, kind: &str, id: &str, state: &State) -> Result<(), BootstrapError> {
        let Some(command) = steps::undo(kind, id) else {
            return Ok(());
        };
        let command = command.filled(&Vars::default());
        let nodes = self.ssh_nodes(state).await?;
        let first = nodes
            .get(self.first_key())
            .ok_or_else(|| BootstrapError::NoNode {
                node: self.first_key().to_string(),
            })?;
        match ssh::run(&self.target(first), &command, self.wait).await? {
            (0, _) => Ok(()),
            (code, output) => Err(BootstrapError::Step(Box::new(StepFailure {
                number: 0,
                of: 0,
                node: first.hostname.clone(),
                description: format!("undo {kind} {id}"),
                command,
                outcome: format!("exit status {code}"),
                output: last_lines(&output, OUTPUT_LINES),
                hint: "run the command on the node by hand (`stack ssh`) to see why".to_string(),
            }))),
        }
    }

    async fn apply_change(
        &self,
        change: &Change,
        input: ChangeInput<'_>,
    ) -> Result<Option<Record>, PhaseError> {
        Ok(match change.action {
            ChangeAction::Create | ChangeAction::Replace => {
                Some(self.run_step(self.step(&change.address)?, &input).await?)
            }
            ChangeAction::Update => Some(self.repair(change, &input).await?),
            ChangeAction::Delete => {
                let id = change.id.as_deref().unwrap_or_default();
                self.undo(&change.kind, id, input.state).await?;
                None
            }
        })
    }
}

/// The cluster could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read the cluster of stack {0}")]
struct ReadError(String, #[source] BootstrapError);

impl Phase for Bootstrap {
    fn name(&self) -> &str {
        "cluster bootstrap"
    }

    fn owns(&self, record: &Record) -> bool {
        record.kind.starts_with(steps::PREFIX)
    }

    fn plan<'a>(&'a self, input: PlanInput<'a>) -> BoxFuture<'a, Result<PlanPart, PhaseError>> {
        Box::pin(self.plan_part(input))
    }

    fn apply<'a>(
        &'a self,
        change: &'a Change,
        input: ChangeInput<'a>,
    ) -> BoxFuture<'a, Result<Option<Record>, PhaseError>> {
        Box::pin(self.apply_change(change, input))
    }

    fn status<'a>(&'a self, _state: &'a State) -> BoxFuture<'a, Result<StatusPart, PhaseError>> {
        Box::pin(async move {
            let path = self.artifacts.path(&Artifact::Kubeconfig);
            Ok(StatusPart {
                kubeconfig: path.exists().then(|| (path, self.stack_name.clone())),
                ..StatusPart::default()
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_tokens_are_32_hex_characters_and_fresh() {
        let (a, b) = (join_token(), join_token());
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn the_probe_reads_channel_nodes_and_addons() {
        let output = "--- snap\nName      Version  Rev   Tracking       Publisher   Notes\nmicrok8s  v1.32.3  7964  1.32/stable    canonical** classic\n--- nodes\ndemo-control-0 True\ndemo-worker-0 False\n--- addons\nmicrok8s is running\nhigh-availability: no\n  core/dns: enabled\n  core/ingress: disabled\n  community/openebs: enabled\n";
        assert_eq!(
            tracking(&sections(output)["snap"]),
            Some("1.32/stable".to_string())
        );
        let view = parse_cluster(output);
        assert_eq!(view.nodes.get("demo-control-0"), Some(&true));
        assert_eq!(view.nodes.get("demo-worker-0"), Some(&false));
        assert_eq!(
            view.enabled.iter().map(String::as_str).collect::<Vec<_>>(),
            ["dns", "openebs"]
        );
    }
}
