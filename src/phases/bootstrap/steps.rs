//! The bootstrap as data: every step with its description, the node it runs
//! on, the commands it runs, a hint for when it fails, whether a failure
//! stops the run and how often it is tried. Built from the stack alone (no
//! I/O), so the plan can list the steps before any node exists.
//!
//! A step's commands are the ones that run: values known only then (a join
//! token, the first node's address) are placeholders that the runner fills
//! in (`Command::filled`), and plans and snapshots show them by name
//! (`Command::shown`). Nothing else in the bootstrap writes a command a
//! step runs.

use serde_json::{json, Value};

use crate::cloudinit::DONE_MARKER;
use crate::microk8s::{addon_names, ingress_controller, MICROK8S};
use crate::model::{Role, Stack};

pub const CONNECT: &str = "microk8s.ssh";
pub const CLOUD_INIT: &str = "microk8s.cloud-init";
pub const HOSTS: &str = "microk8s.hosts";
pub const READY: &str = "microk8s.ready";
pub const JOIN: &str = "microk8s.join";
pub const ADDON: &str = "microk8s.addon";
pub const CERTIFICATE: &str = "microk8s.certificate";
pub const KUBECONFIG: &str = "microk8s.kubeconfig";

/// Every bootstrap kind starts with this.
pub const PREFIX: &str = "microk8s.";

/// A node of the stack as the bootstrap sees it, before it exists.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeRef {
    /// `control[0]`
    pub key: String,
    pub hostname: String,
    pub role: Role,
}

/// The stack's nodes in order: the first one is where the cluster starts.
pub fn nodes(stack: &Stack) -> Vec<NodeRef> {
    let mut nodes: Vec<NodeRef> = stack
        .nodes
        .iter()
        .flat_map(|g| {
            (0..g.count).map(move |i| NodeRef {
                key: format!("{}[{i}]", g.name),
                hostname: format!("{}-{}-{i}", stack.name, g.name),
                role: g.role,
            })
        })
        .collect();
    // A control node first: it starts the cluster and the others join it.
    nodes.sort_by_key(|n| n.role == Role::Worker);
    nodes
}

/// A value a command gets only when it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Var {
    /// A fresh join token (a failed join burns it).
    Token,
    /// The first node's private address, where the others join.
    JoinAddress,
    /// The address users reach the first node's API at.
    PublicAddress,
    /// Every node as `'ADDRESS HOSTNAME'` words.
    HostsLines,
}

impl Var {
    fn name(self) -> &'static str {
        match self {
            Var::Token => "TOKEN",
            Var::JoinAddress => "JOIN_ADDRESS",
            Var::PublicAddress => "PUBLIC_ADDRESS",
            Var::HostsLines => "HOSTS_LINES",
        }
    }
}

/// The values of the placeholders, when the command runs.
#[derive(Debug, Clone, Default)]
pub struct Vars {
    pub token: String,
    pub join_address: String,
    pub public_address: String,
    pub hosts_lines: String,
}

impl Vars {
    /// The same values with the join token hidden, for messages.
    pub fn hidden(&self) -> Vars {
        Vars {
            token: if self.token.is_empty() {
                String::new()
            } else {
                "(token hidden)".to_string()
            },
            ..self.clone()
        }
    }

    fn get(&self, var: Var) -> &str {
        match var {
            Var::Token => &self.token,
            Var::JoinAddress => &self.join_address,
            Var::PublicAddress => &self.public_address,
            Var::HostsLines => &self.hosts_lines,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Text(String),
    Var(Var),
}

/// A shell command, with placeholders for what is known only when it runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Command(Vec<Piece>);

impl From<&str> for Piece {
    fn from(text: &str) -> Piece {
        Piece::Text(text.to_string())
    }
}

impl From<String> for Piece {
    fn from(text: String) -> Piece {
        Piece::Text(text)
    }
}

impl From<Var> for Piece {
    fn from(var: Var) -> Piece {
        Piece::Var(var)
    }
}

/// `command!["microk8s join ", Var::JoinAddress, ":25000/", Var::Token]`
macro_rules! command {
    ($($piece:expr),+ $(,)?) => {
        Command(vec![$(Piece::from($piece)),+])
    };
}

impl Command {
    /// As plans show it: placeholders by name.
    pub fn shown(&self) -> String {
        self.0
            .iter()
            .map(|p| match p {
                Piece::Text(t) => t.as_str(),
                Piece::Var(v) => v.name(),
            })
            .collect()
    }

    /// As it runs.
    pub fn filled(&self, vars: &Vars) -> String {
        self.0
            .iter()
            .map(|p| match p {
                Piece::Text(t) => t.as_str(),
                Piece::Var(v) => vars.get(*v),
            })
            .collect()
    }
}

/// One command of a step, on one node.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    /// The key of the node it runs on.
    pub node: String,
    pub hostname: String,
    pub command: Command,
    /// Bounded by the stack's `timeouts.ready` (it waits for something),
    /// else by the short bound of a quick command.
    pub long: bool,
}

/// What a step does besides running its commands.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Tried until SSH answers with the pinned host key, up to `timeouts.ready`.
    Connect,
    CloudInit,
    Hosts,
    /// Records the node as ready.
    Ready,
    /// A fresh token for every attempt.
    Join,
    Enable {
        name: &'static str,
    },
    /// Records the address the certificate covers.
    Certificate,
    /// Writes the output, rewritten, as the stack's kubeconfig.
    Kubeconfig,
}

/// What to run first when a field of the step drifted.
#[derive(Debug, Clone, PartialEq)]
pub struct Repair {
    pub field: &'static str,
    pub run: Run,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// 1-based position in the whole bootstrap, and how many steps there are.
    pub number: usize,
    pub of: usize,
    pub address: String,
    pub kind: &'static str,
    pub description: String,
    /// The key of the node it is about.
    pub node: String,
    /// What runs, in order.
    pub runs: Vec<Run>,
    /// Text the last command's output must contain for the step to succeed.
    pub expect: Option<&'static str>,
    pub repairs: Vec<Repair>,
    pub hint: &'static str,
    /// A failure stops the run; otherwise it is reported and tried again next run.
    pub fatal: bool,
    /// How many times it is tried before it fails.
    pub attempts: u32,
    pub action: Action,
    /// What the stack wants of it, as compared with the record and the live cluster.
    pub attrs: Value,
}

/// Settings of how the nodes are reached, which decide some steps.
#[derive(Debug, Clone, Copy)]
pub struct Reach {
    /// cloud-init already wrote every node into `/etc/hosts`.
    pub hosts_in_user_data: bool,
    /// Users reach the API on a loopback address, which microk8s's certificate covers.
    pub api_on_loopback: bool,
}

/// The command that undoes a removed step on the first node: disables an
/// addon, removes a node from the cluster. `None` when there is nothing to undo.
pub fn undo(kind: &str, id: &str) -> Option<Command> {
    match kind {
        ADDON => Some(command![format!("{MICROK8S} disable {id}")]),
        JOIN => Some(command![format!("{MICROK8S} remove-node {id} --force")]),
        _ => None,
    }
}

/// Every step of the stack's bootstrap; empty when the stack has no cluster
/// to make (no `kubernetes`, or an existing cluster by kubeconfig).
pub fn steps(stack: &Stack, reach: Reach, kubeconfig_path: &str) -> Vec<Step> {
    let Some(kubernetes) = stack.kubernetes.as_ref().filter(|k| k.kubeconfig.is_none()) else {
        return Vec::new();
    };
    let nodes = nodes(stack);
    let Some(first) = nodes.first() else {
        return Vec::new();
    };
    let wait = stack.timeouts.ready.as_secs();
    let m = MICROK8S;
    let on = |node: &NodeRef, long: bool, command: Command| Run {
        node: node.key.clone(),
        hostname: node.hostname.clone(),
        command,
        long,
    };
    let mut out: Vec<Step> = Vec::new();
    let step = |kind: &'static str,
                suffix: &str,
                node: &NodeRef,
                description: String,
                runs: Vec<Run>,
                hint: &'static str,
                (fatal, attempts): (bool, u32),
                action: Action,
                attrs: Value| {
        Step {
            number: 0,
            of: 0,
            address: format!("{kind}.{suffix}"),
            kind,
            description,
            node: node.key.clone(),
            runs,
            expect: None,
            repairs: Vec::new(),
            hint,
            fatal,
            attempts,
            action,
            attrs,
        }
    };
    for node in &nodes {
        let host = &node.hostname;
        out.push(step(
            CONNECT,
            &node.key,
            node,
            format!("wait for SSH on {host}"),
            vec![on(node, false, command!["true"])],
            "is the node running (`stack status`) and is port 22 reachable from here (network.allowedCidrs)?",
            (true, 1),
            Action::Connect,
            json!({ "node": host }),
        ));
        out.push(step(
            CLOUD_INIT,
            &node.key,
            node,
            format!("wait for cloud-init on {host}"),
            vec![on(node, true, command![format!(
                "cloud-init status --wait --long || {{ echo; sudo cat /run/cloud-init/result.json; exit 1; }}; test -f {DONE_MARKER} || {{ echo 'cloud-init finished without writing {DONE_MARKER}'; exit 1; }}"
            )])],
            "cloud-init's errors are above; the whole log is /var/log/cloud-init-output.log on the node (`stack ssh NODE`)",
            (true, 1),
            Action::CloudInit,
            json!({ "node": host }),
        ));
        if !reach.hosts_in_user_data {
            let begin = format!("# nodes of stack {}", stack.name);
            let end = format!("# end of nodes of stack {}", stack.name);
            out.push(step(
                HOSTS,
                &node.key,
                node,
                format!("write every node into /etc/hosts on {host}"),
                vec![on(node, false, command![
                    format!("sudo sed -i '/^{begin}$/,/^{end}$/d' /etc/hosts && printf '%s\\n' '{begin}' "),
                    Var::HostsLines,
                    format!(" '{end}' | sudo tee -a /etc/hosts >/dev/null"),
                ])],
                "a join is refused when a node's hostname does not resolve; check /etc/hosts on the node",
                (true, 2),
                Action::Hosts,
                json!({ "node": host }),
            ));
        }
        out.push(step(
            READY,
            &node.key,
            node,
            format!("wait for microk8s {} on {host}", kubernetes.channel),
            vec![on(node, true, command![format!("{m} status --wait-ready --timeout {wait}")])],
            "microk8s did not come up: `sudo microk8s inspect` on the node collects its logs; raise timeouts.ready on a slow host",
            (true, 1),
            Action::Ready,
            json!({ "node": host, "channel": kubernetes.channel, "ready": true }),
        ));
        if let Some(step) = out.last_mut() {
            // `--timeout` does not exit non-zero: the output says whether it runs.
            step.expect = Some("microk8s is running");
            step.repairs.push(Repair {
                field: "channel",
                run: on(
                    node,
                    true,
                    command![format!(
                    "sudo snap refresh microk8s --channel={} && sudo snap refresh --hold microk8s",
                    kubernetes.channel
                )],
                ),
            });
        }
    }
    for node in nodes.iter().skip(1) {
        let worker = node.role == Role::Worker;
        out.push(step(
            JOIN,
            &node.key,
            node,
            format!(
                "join {} to the cluster{}",
                node.hostname,
                if worker { " as a worker" } else { "" }
            ),
            vec![
                on(first, false, command![
                    format!("{m} add-node --token "),
                    Var::Token,
                    format!(" --token-ttl {}", wait.max(600)),
                ]),
                on(node, true, command![
                    format!("{m} join "),
                    Var::JoinAddress,
                    ":25000/",
                    Var::Token,
                    if worker { " --worker" } else { "" },
                ]),
            ],
            "each attempt uses a new token (a failed join burns it); port 25000 and the node's hostname must be reachable from the first node",
            (true, 3),
            Action::Join,
            json!({ "node": node.hostname, "via": first.hostname, "worker": worker }),
        ));
    }
    for name in addon_names(kubernetes) {
        let monitoring = matches!(name, "observability" | "prometheus");
        let mut attrs = json!({ "name": name, "enabled": true });
        if name == "ingress" {
            attrs["controller"] = json!(ingress_controller(&kubernetes.channel));
        }
        out.push(step(
            ADDON,
            name,
            first,
            format!("enable addon {name} on {}", first.hostname),
            vec![on(first, true, command![format!("{m} enable {name}")])],
            match name {
                "openebs" => "openebs needs iscsid (open-iscsi) on every node and the community addon first",
                "community" => "the community addons are fetched from GitHub: the first node needs outbound HTTPS",
                _ => "microk8s enables one addon at a time; `sudo microk8s status` on the node shows what it is doing",
            },
            // Monitoring is not needed for the cluster to work: a failure is reported and tried next run.
            (!monitoring, 3),
            Action::Enable { name },
            attrs,
        ));
    }
    if !reach.api_on_loopback {
        let template = "/var/snap/microk8s/current/certs/csr.conf.template";
        out.push(step(
            CERTIFICATE,
            "api",
            first,
            format!(
                "make the API certificate of {} valid for its public address",
                first.hostname
            ),
            vec![on(
                first,
                true,
                command![
                    "grep -qx 'IP.99 = ",
                    Var::PublicAddress,
                    format!("' {template} || {{ sudo sed -i '/#MOREIPS/i IP.99 = "),
                    Var::PublicAddress,
                    format!("' {template} && {m} refresh-certs --cert server.crt; }}"),
                ],
            )],
            "without it kubectl refuses the API server's certificate for the public address",
            (true, 2),
            Action::Certificate,
            json!({ "node": first.hostname }),
        ));
    }
    out.push(step(
        KUBECONFIG,
        "main",
        first,
        format!("fetch the kubeconfig from {}", first.hostname),
        vec![on(first, false, command![format!("{m} config")])],
        "the API server must be running on the first node",
        (true, 2),
        Action::Kubeconfig,
        json!({ "path": kubeconfig_path, "context": stack.name }),
    ));
    let of = out.len();
    for (i, step) in out.iter_mut().enumerate() {
        step.number = i + 1;
        step.of = of;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::microk8s::fixtures::{stack, COMBINATIONS};

    /// The steps with every command they run, as a snapshot pins them.
    fn listing(steps: &[Step]) -> String {
        let mut out = String::new();
        for s in steps {
            out.push_str(&format!(
                "{:>2}/{} {:<32} {}{}\n",
                s.number,
                s.of,
                s.address,
                s.description,
                if s.fatal { "" } else { " (not fatal)" },
            ));
            for run in &s.runs {
                out.push_str(&format!(
                    "      {} $ {}\n",
                    run.hostname,
                    run.command.shown()
                ));
            }
            if let Some(expect) = s.expect {
                out.push_str(&format!("      (output must say `{expect}`)\n"));
            }
            for repair in &s.repairs {
                out.push_str(&format!(
                    "      when {} drifted: {} $ {}\n",
                    repair.field,
                    repair.run.hostname,
                    repair.run.command.shown()
                ));
            }
        }
        out
    }

    const KVM: &str = "{kvm: {}}";
    const LOCAL: Reach = Reach {
        hosts_in_user_data: true,
        api_on_loopback: true,
    };

    #[test]
    fn steps_for_each_addon_and_channel() {
        for (name, kubernetes) in COMBINATIONS {
            let steps = steps(&stack(KVM, kubernetes), LOCAL, ".stack/demo.kubeconfig");
            insta::assert_snapshot!(format!("steps_{name}"), listing(&steps));
        }
    }

    #[test]
    fn ec2_writes_hosts_and_the_certificate_itself() {
        let stack = stack("{ec2: {ami: ami-12c6146b}}", "{}");
        let remote = Reach {
            hosts_in_user_data: false,
            api_on_loopback: false,
        };
        insta::assert_snapshot!(listing(&steps(&stack, remote, ".stack/demo.kubeconfig")));
    }

    /// What runs is what the snapshot shows, with each placeholder's value
    /// in its place: the runner has no commands of its own to drift from it.
    #[test]
    fn the_commands_that_run_are_the_ones_shown_with_their_values() {
        let stack = stack("{ec2: {ami: ami-12c6146b}}", "{}");
        let remote = Reach {
            hosts_in_user_data: false,
            api_on_loopback: false,
        };
        let vars = Vars {
            token: "0123456789abcdef0123456789abcdef".into(),
            join_address: "10.0.0.5".into(),
            public_address: "203.0.113.9".into(),
            hosts_lines: "'10.0.0.5 demo-control-0'".into(),
        };
        let join = steps(&stack, remote, "k")
            .into_iter()
            .find(|s| s.kind == JOIN)
            .unwrap();
        let run: Vec<String> = join.runs.iter().map(|r| r.command.filled(&vars)).collect();
        assert_eq!(
            run,
            [
                "sudo /snap/bin/microk8s add-node --token 0123456789abcdef0123456789abcdef --token-ttl 600",
                "sudo /snap/bin/microk8s join 10.0.0.5:25000/0123456789abcdef0123456789abcdef --worker",
            ]
        );
        for step in steps(&stack, remote, "k") {
            for run in &step.runs {
                let shown = run
                    .command
                    .shown()
                    .replace("TOKEN", &vars.token)
                    .replace("JOIN_ADDRESS", &vars.join_address)
                    .replace("PUBLIC_ADDRESS", &vars.public_address)
                    .replace("HOSTS_LINES", &vars.hosts_lines);
                assert_eq!(run.command.filled(&vars), shown, "{}", step.address);
            }
        }
    }

    #[test]
    fn no_steps_for_an_existing_cluster_or_plain_vms() {
        let existing = crate::model::load_str(
            std::path::Path::new("stack.yaml"),
            "version: 1\nname: demo\nkubernetes: {kubeconfig: kube.yaml}\n",
        )
        .unwrap();
        assert!(steps(&existing, LOCAL, "k").is_empty());
        let plain = crate::model::load_str(
            std::path::Path::new("stack.yaml"),
            "version: 1\nname: demo\nprovider: {kvm: {}}\nnodes: [{name: a, image: {path: a.qcow2}}]\n",
        )
        .unwrap();
        assert!(steps(&plain, LOCAL, "k").is_empty());
    }
}
