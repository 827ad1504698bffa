//! The cluster on the nodes. cloud-init installs microk8s (see `cloudinit`);
//! `stack` follows over SSH with the pinned host keys and makes one cluster:
//! waits for each node, joins the others to the first, enables the addons one
//! at a time and fetches a kubeconfig. Each step (`steps`) is a resource of
//! the plan, recorded in state when it finishes, so a re-run continues where
//! the last one stopped; refresh reads the cluster back for drift.

pub mod kubeconfig;
pub mod steps;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use self::steps::{Action, Step};
use crate::files::{failed, sha256_hex, write_private, FileError};
use crate::plan::{Change, Observed, Plan, Resource};
use crate::provider::{Applier, Provider, SshNode};
use crate::ssh::{self, SshError};
use crate::state::{Record, State};

/// How many lines of a failed command's output an error shows.
const OUTPUT_LINES: usize = 15;
/// The longest a single quick command (probe, add-node, config) may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// The pause between attempts of a step.
const RETRY_PAUSE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("step {number} of {of} failed on {node}: {description}\n  command: {command}\n  {outcome}\n  last output:\n{output}\n  hint: {hint}")]
    Step {
        number: usize,
        of: usize,
        node: String,
        description: String,
        command: String,
        outcome: String,
        output: String,
        hint: String,
    },
    #[error("no step of the bootstrap is called {0}")]
    UnknownStep(String),
    #[error("node {node} is not running or not recorded yet (run `stack up`)")]
    NoNode { node: String },
    #[error("cannot find how to reach the nodes: {0}")]
    Infra(String),
    #[error(transparent)]
    Ssh(#[from] SshError),
    #[error(transparent)]
    Kubeconfig(#[from] kubeconfig::KubeconfigError),
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
        m = steps::MICROK8S
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

pub struct Bootstrap<P: Provider> {
    provider: Arc<P>,
    stack_name: String,
    key_path: PathBuf,
    wait: Duration,
    steps: Vec<Step>,
    kubeconfig_path: PathBuf,
}

impl<P: Provider> Bootstrap<P> {
    pub fn new(
        provider: Arc<P>,
        stack: &crate::model::Stack,
        key_path: &Path,
        kubeconfig_path: &Path,
    ) -> Self {
        let reach = steps::Reach {
            hosts_in_user_data: provider.private_addresses_in_advance(),
            api_on_loopback: provider.api_on_loopback(),
        };
        let steps = steps::steps(stack, reach, &kubeconfig_path.display().to_string());
        Bootstrap {
            provider,
            stack_name: stack.name.clone(),
            key_path: key_path.to_path_buf(),
            wait: stack.timeouts.ready,
            steps,
            kubeconfig_path: kubeconfig_path.to_path_buf(),
        }
    }

    pub fn desired(&self) -> Vec<Resource> {
        self.steps
            .iter()
            .map(|s| Resource {
                address: s.address.clone(),
                kind: s.kind.to_string(),
                attrs: s.attrs.clone(),
                replace_on: &[],
            })
            .collect()
    }

    fn first_key(&self) -> Option<&str> {
        self.steps.first().map(|s| s.node.as_str())
    }

    async fn ssh_nodes(&self, state: &State) -> Result<BTreeMap<String, SshNode>, BootstrapError> {
        Ok(self
            .provider
            .ssh_nodes(state)
            .await
            .map_err(|e| BootstrapError::Infra(crate::output::error_chain(&e)))?
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

    /// Reads back, for each recorded step, whether it still holds: the
    /// channel and readiness of every node, its membership in the cluster,
    /// the enabled addons and the local kubeconfig. Nodes in `fresh` (made or
    /// replaced by this plan) are not asked: their steps run again.
    pub async fn refresh(
        &self,
        state: &State,
        fresh: &BTreeSet<String>,
    ) -> Result<Vec<Observed>, BootstrapError> {
        let records: Vec<&Record> = state
            .resources
            .iter()
            .filter(|r| steps::is_bootstrap(&r.kind))
            .collect();
        let Some(first_key) = self.first_key() else {
            return Ok(Vec::new());
        };
        if records.is_empty() || fresh.contains(first_key) {
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
        let mut observed = Vec::new();
        for record in records {
            let Some(id) = record.id.clone() else {
                continue;
            };
            let Some(step) = self.steps.iter().find(|s| s.address == record.address) else {
                // No longer a step of the stack: an addon or node removed.
                let still_there = match (&cluster, record.kind.as_str()) {
                    (Some(view), steps::ADDON) => view.enabled.contains(&id),
                    (Some(view), steps::JOIN) => view.nodes.contains_key(&id),
                    _ => false,
                };
                if still_there {
                    observed.push(Observed {
                        address: record.address.clone(),
                        kind: record.kind.clone(),
                        id,
                        attrs: record.attrs.clone(),
                    });
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
                Action::Join { .. } => {
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
                    let current = std::fs::read(&self.kubeconfig_path)
                        .ok()
                        .map(|b| sha256_hex(&b));
                    if current.as_deref() != record.attrs["sha256"].as_str() {
                        continue;
                    }
                }
                Action::Connect | Action::CloudInit | Action::Hosts | Action::Certificate => {}
            }
            observed.push(Observed {
                address: record.address.clone(),
                kind: record.kind.clone(),
                id,
                attrs,
            });
        }
        Ok(observed)
    }

    /// Marks the plan's bootstrap changes with their step numbers and says why
    /// the steps of new or replaced nodes run again.
    pub fn annotate(&self, plan: &mut Plan, fresh: &BTreeSet<String>) {
        let first_fresh = self.first_key().is_some_and(|k| fresh.contains(k));
        for change in &mut plan.changes {
            let Some(step) = self.steps.iter().find(|s| s.address == change.address) else {
                continue;
            };
            change.step = Some(crate::plan::StepRef {
                number: step.number,
                of: step.of,
                description: step.description.clone(),
            });
            if change.before.is_some() && (first_fresh || fresh.contains(&step.node)) {
                change.drift = false;
                change.reason = "the node is new or replaced in this plan".to_string();
            }
        }
        plan.recount();
    }

    /// Runs `command` on `node`, failing the step when it exits non-zero.
    async fn run_on(
        &self,
        step: &Step,
        node: &SshNode,
        command: &str,
        timeout: Duration,
    ) -> Result<String, BootstrapError> {
        match ssh::run(&self.target(node), command, timeout).await {
            Ok((0, output)) => Ok(output),
            Ok((code, output)) => Err(self.failure(
                step,
                &node.hostname,
                command,
                format!("exit status {code}"),
                &output,
            )),
            Err(err @ SshError::HostKeyMismatch { .. }) => Err(err.into()),
            Err(err) => Err(self.failure(step, &node.hostname, command, err.to_string(), "")),
        }
    }

    fn failure(
        &self,
        step: &Step,
        node: &str,
        command: &str,
        outcome: String,
        output: &str,
    ) -> BootstrapError {
        BootstrapError::Step {
            number: step.number,
            of: step.of,
            node: node.to_string(),
            description: step.description.clone(),
            command: command.to_string(),
            outcome,
            output: last_lines(output, OUTPUT_LINES),
            hint: step.hint.to_string(),
        }
    }

    /// Tries until SSH answers with the pinned key (never past a wrong key).
    async fn wait_for_ssh(&self, step: &Step, node: &SshNode) -> Result<(), BootstrapError> {
        let start = Instant::now();
        loop {
            match ssh::run(&self.target(node), "true", Duration::from_secs(10)).await {
                Ok(_) => return Ok(()),
                Err(err @ SshError::HostKeyMismatch { .. }) => return Err(err.into()),
                Err(err) if start.elapsed() >= self.wait => {
                    return Err(self.failure(
                        step,
                        &node.hostname,
                        "ssh",
                        format!(
                            "no SSH within timeouts.ready ({})",
                            humantime::format_duration(self.wait)
                        ),
                        &err.to_string(),
                    ))
                }
                Err(_) => tokio::time::sleep(Duration::from_secs(2)).await,
            }
        }
    }

    /// One attempt of a step; `Ok` carries what to record besides the step's attrs.
    async fn attempt(
        &self,
        step: &Step,
        nodes: &BTreeMap<String, SshNode>,
    ) -> Result<Value, BootstrapError> {
        let node = nodes
            .get(&step.node)
            .ok_or_else(|| BootstrapError::NoNode {
                node: step.node.clone(),
            })?;
        let first =
            self.first_key()
                .and_then(|k| nodes.get(k))
                .ok_or_else(|| BootstrapError::NoNode {
                    node: self.first_key().unwrap_or_default().to_string(),
                })?;
        let m = steps::MICROK8S;
        let wait = self.wait.as_secs();
        // The stack's own bound on a wait, a little past the remote one.
        let bounded = self.wait + Duration::from_secs(30);
        match &step.action {
            Action::Connect => self.wait_for_ssh(step, node).await?,
            Action::CloudInit => {
                let command = format!(
                    "cloud-init status --wait --long || {{ echo; sudo cat /run/cloud-init/result.json; exit 1; }}; test -f {marker} || {{ echo 'cloud-init finished without writing {marker}'; exit 1; }}",
                    marker = crate::cloudinit::DONE_MARKER
                );
                self.run_on(step, node, &command, bounded).await?;
            }
            Action::Hosts => {
                let begin = format!("# nodes of stack {}", self.stack_name);
                let end = format!("# end of nodes of stack {}", self.stack_name);
                let mut lines = vec![begin.clone()];
                lines.extend(
                    nodes
                        .values()
                        .map(|n| format!("{} {}", n.private_ip, n.hostname)),
                );
                lines.push(end.clone());
                let command = format!(
                    "sudo sed -i '/^{begin}$/,/^{end}$/d' /etc/hosts && printf '%s\\n' {} | sudo tee -a /etc/hosts >/dev/null",
                    lines.iter().map(|l| format!("'{l}'")).collect::<Vec<_>>().join(" ")
                );
                self.run_on(step, node, &command, COMMAND_TIMEOUT).await?;
            }
            Action::Ready => {
                let command = format!("{m} status --wait-ready --timeout {wait}");
                let output = self.run_on(step, node, &command, bounded).await?;
                // `--timeout` does not exit non-zero: the output says whether it runs.
                if !output.contains("microk8s is running") {
                    return Err(self.failure(
                        step,
                        &node.hostname,
                        &command,
                        "microk8s is not running".to_string(),
                        &output,
                    ));
                }
                return Ok(json!({ "ready": true }));
            }
            Action::Join { worker } => {
                let token = join_token();
                let add = format!("{m} add-node --token {token} --token-ttl {}", wait.max(600));
                self.run_on(step, first, &add, COMMAND_TIMEOUT).await?;
                let join = format!(
                    "{m} join {}:25000/{token}{}",
                    first.private_ip,
                    if *worker { " --worker" } else { "" }
                );
                self.run_on(step, node, &join, bounded).await?;
            }
            Action::Enable { name } => {
                self.run_on(step, first, &format!("{m} enable {name}"), bounded)
                    .await?;
            }
            Action::Certificate => {
                let address = &first.api.0;
                let template = "/var/snap/microk8s/current/certs/csr.conf.template";
                let command = format!(
                    "grep -qx 'IP.99 = {address}' {template} || {{ sudo sed -i '/#MOREIPS/i IP.99 = {address}' {template} && {m} refresh-certs --cert server.crt; }}"
                );
                self.run_on(step, first, &command, bounded).await?;
                return Ok(json!({ "address": address }));
            }
            Action::Kubeconfig => {
                let config = self
                    .run_on(step, first, &format!("{m} config"), COMMAND_TIMEOUT)
                    .await?;
                let server = format!("https://{}:{}", first.api.0, first.api.1);
                let config = kubeconfig::for_user(&config, &self.stack_name, &server)?;
                let text = kubeconfig::render(&config);
                write_private(&self.kubeconfig_path, text.as_bytes())
                    .map_err(failed("write", &self.kubeconfig_path))?;
                return Ok(json!({ "server": server, "sha256": sha256_hex(text.as_bytes()) }));
            }
        }
        Ok(json!({}))
    }

    async fn run_step(&self, address: &str, state: &State) -> Result<Record, BootstrapError> {
        let step = self
            .steps
            .iter()
            .find(|s| s.address == address)
            .ok_or_else(|| BootstrapError::UnknownStep(address.to_string()))?;
        let mut attempt = 1;
        loop {
            let nodes = self.ssh_nodes(state).await?;
            match self.attempt(step, &nodes).await {
                Ok(extra) => {
                    let node = &nodes[&step.node];
                    let mut attrs = step.attrs.clone();
                    for (key, value) in extra.as_object().into_iter().flatten() {
                        attrs[key] = value.clone();
                    }
                    attrs["nodeId"] = json!(node.id);
                    let id = match &step.action {
                        Action::Enable { name } => name.to_string(),
                        Action::Kubeconfig => self.kubeconfig_path.display().to_string(),
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
                Err(err @ BootstrapError::Step { .. }) if attempt < step.attempts => {
                    tracing::warn!("attempt {attempt} of {}: {err}", step.attempts);
                    attempt += 1;
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Err(err) => return Err(err),
            }
        }
    }
}

impl<P: Provider> Applier for Bootstrap<P> {
    type Error = BootstrapError;

    /// Steps run one at a time in the plan's order; nothing else to wait for.
    fn dependencies(&self, _kind: &str) -> &'static [&'static str] {
        &[]
    }

    fn is_fatal(&self, change: &Change) -> bool {
        self.steps
            .iter()
            .find(|s| s.address == change.address)
            .is_none_or(|s| s.fatal)
    }

    async fn create(
        &self,
        resource: &Resource,
        _token: &str,
        state: &State,
    ) -> Result<Record, BootstrapError> {
        self.run_step(&resource.address, state).await
    }

    async fn update(&self, change: &Change, state: &State) -> Result<Record, BootstrapError> {
        let step = self
            .steps
            .iter()
            .find(|s| s.address == change.address)
            .ok_or_else(|| BootstrapError::UnknownStep(change.address.clone()))?;
        if step.action == Action::Ready {
            let channel = step.attrs["channel"].as_str().unwrap_or_default();
            let drifted = change.fields.iter().any(|f| f.path == "channel");
            if drifted {
                let nodes = self.ssh_nodes(state).await?;
                let node = nodes
                    .get(&step.node)
                    .ok_or_else(|| BootstrapError::NoNode {
                        node: step.node.clone(),
                    })?;
                let command = format!("sudo snap refresh microk8s --channel={channel} && sudo snap refresh --hold microk8s");
                self.run_on(step, node, &command, self.wait).await?;
            }
        }
        self.run_step(&change.address, state).await
    }

    async fn delete(&self, kind: &str, id: &str) -> Result<(), BootstrapError> {
        let command = match kind {
            steps::ADDON => format!("{} disable {id}", steps::MICROK8S),
            steps::JOIN => format!("{} remove-node {id} --force", steps::MICROK8S),
            // The other steps leave nothing to undo apart from the node itself.
            _ => return Ok(()),
        };
        let Some(first_key) = self.first_key() else {
            return Ok(());
        };
        let nodes = self.ssh_nodes(&State::new(&self.stack_name, "")).await?;
        let first = nodes.get(first_key).ok_or_else(|| BootstrapError::NoNode {
            node: first_key.to_string(),
        })?;
        match ssh::run(&self.target(first), &command, self.wait).await? {
            (0, _) => Ok(()),
            (code, output) => Err(BootstrapError::Step {
                number: 0,
                of: 0,
                node: first.hostname.clone(),
                description: format!("undo {kind} {id}"),
                command,
                outcome: format!("exit status {code}"),
                output: last_lines(&output, OUTPUT_LINES),
                hint: "run the command on the node by hand (`stack ssh`) to see why".to_string(),
            }),
        }
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
