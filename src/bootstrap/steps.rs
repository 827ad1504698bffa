//! The bootstrap as data: every step with its description, the node it runs
//! on, its command, a hint for when it fails, whether a failure stops the run
//! and how often it is tried. Built from the stack alone (no I/O), so the plan
//! can list the steps before any node exists.

use serde_json::{json, Value};

use crate::cloudinit::DONE_MARKER;
use crate::model::{Addon, Kubernetes, Role, Stack, StorageKind};

/// Every bootstrap address starts with this.
pub const PREFIX: &str = "microk8s.";

pub const CONNECT: &str = "microk8s.ssh";
pub const CLOUD_INIT: &str = "microk8s.cloud-init";
pub const HOSTS: &str = "microk8s.hosts";
pub const READY: &str = "microk8s.ready";
pub const JOIN: &str = "microk8s.join";
pub const ADDON: &str = "microk8s.addon";
pub const CERTIFICATE: &str = "microk8s.certificate";
pub const KUBECONFIG: &str = "microk8s.kubeconfig";

/// The microk8s command on a node (root's, through sudo).
pub const MICROK8S: &str = "sudo /snap/bin/microk8s";

/// Whether a resource kind belongs to the bootstrap.
pub fn is_bootstrap(kind: &str) -> bool {
    kind.starts_with(PREFIX)
}

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

/// What a step does; the runner turns it into commands on the nodes.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Connect over SSH, trusting only the pinned host key.
    Connect,
    /// `cloud-init status --wait`, then the user-data's done marker.
    CloudInit,
    /// Write every node's private address into `/etc/hosts`.
    Hosts,
    /// `microk8s status --wait-ready`, bounded by the stack's timeout.
    Ready,
    /// `add-node` on the first node with a fresh token, `join` on this one.
    Join { worker: bool },
    /// `microk8s enable NAME` on the first node.
    Enable { name: &'static str },
    /// Make the API server's certificate valid for the address users reach.
    Certificate,
    /// `microk8s config` on the first node, rewritten and written locally.
    Kubeconfig,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// 1-based position in the whole bootstrap, and how many steps there are.
    pub number: usize,
    pub of: usize,
    pub address: String,
    pub kind: &'static str,
    pub description: String,
    /// The key of the node it runs on.
    pub node: String,
    /// The command as the user would type it (tokens and addresses filled in when run).
    pub command: String,
    pub hint: &'static str,
    /// A failure stops the run; otherwise it is reported and tried again next run.
    pub fatal: bool,
    /// How many times it is tried before it fails.
    pub attempts: u32,
    pub action: Action,
    /// What the stack wants of it, as compared with the record and the live cluster.
    pub attrs: Value,
}

/// The minor version of a `1.NN/risk` channel.
pub fn minor(channel: &str) -> u32 {
    channel
        .split('/')
        .next()
        .and_then(|v| v.split('.').nth(1))
        .and_then(|m| m.parse().ok())
        .unwrap_or(0)
}

/// The ingress controller microk8s's `ingress` addon runs on a channel.
pub fn ingress_controller(channel: &str) -> &'static str {
    if minor(channel) >= 35 {
        "traefik"
    } else {
        "nginx"
    }
}

/// The microk8s addons to enable, one at a time, in this order: dns, storage,
/// ingress, then monitoring (which goes after all nodes joined).
pub fn addon_names(kubernetes: &Kubernetes) -> Vec<&'static str> {
    let minor = minor(&kubernetes.channel);
    let mut names = Vec::new();
    for addon in [
        Addon::Dns,
        Addon::Storage,
        Addon::Ingress,
        Addon::Monitoring,
    ] {
        if !kubernetes.addons.contains(&addon) {
            continue;
        }
        match addon {
            Addon::Dns => names.push("dns"),
            Addon::Storage => match kubernetes.storage {
                StorageKind::Hostpath => names.push("hostpath-storage"),
                StorageKind::Openebs => names.extend(["community", "openebs"]),
            },
            Addon::Ingress => names.push("ingress"),
            Addon::Monitoring => names.push(if minor >= 25 {
                "observability"
            } else {
                "prometheus"
            }),
        }
    }
    names
}

/// Settings of how the nodes are reached, which decide some steps.
#[derive(Debug, Clone, Copy)]
pub struct Reach {
    /// cloud-init already wrote every node into `/etc/hosts`.
    pub hosts_in_user_data: bool,
    /// Users reach the API on a loopback address, which microk8s's certificate covers.
    pub api_on_loopback: bool,
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
    let mut out = Vec::new();
    let mut push = |kind: &'static str,
                    suffix: &str,
                    node: &NodeRef,
                    description: String,
                    command: String,
                    hint: &'static str,
                    (fatal, attempts): (bool, u32),
                    action: Action,
                    attrs: Value| {
        out.push(Step {
            number: 0,
            of: 0,
            address: format!("{kind}.{suffix}"),
            kind,
            description,
            node: node.key.clone(),
            command,
            hint,
            fatal,
            attempts,
            action,
            attrs,
        });
    };
    for node in &nodes {
        let host = &node.hostname;
        push(
            CONNECT,
            &node.key,
            node,
            format!("wait for SSH on {host}"),
            "true".to_string(),
            "is the node running (`stack status`) and is port 22 reachable from here (network.allowedCidrs)?",
            (true, 1),
            Action::Connect,
            json!({ "node": host }),
        );
        push(
            CLOUD_INIT,
            &node.key,
            node,
            format!("wait for cloud-init on {host}"),
            format!("cloud-init status --wait --long && test -f {DONE_MARKER}"),
            "cloud-init's errors are above; the whole log is /var/log/cloud-init-output.log on the node (`stack ssh NODE`)",
            (true, 1),
            Action::CloudInit,
            json!({ "node": host }),
        );
        if !reach.hosts_in_user_data {
            push(
                HOSTS,
                &node.key,
                node,
                format!("write every node into /etc/hosts on {host}"),
                "sudo sh -c 'sed … /etc/hosts; echo ADDRESS HOSTNAME … >> /etc/hosts'".to_string(),
                "a join is refused when a node's hostname does not resolve; check /etc/hosts on the node",
                (true, 2),
                Action::Hosts,
                json!({ "node": host }),
            );
        }
        push(
            READY,
            &node.key,
            node,
            format!("wait for microk8s {} on {host}", kubernetes.channel),
            format!("{MICROK8S} status --wait-ready --timeout {wait}"),
            "microk8s did not come up: `sudo microk8s inspect` on the node collects its logs; raise timeouts.ready on a slow host",
            (true, 1),
            Action::Ready,
            json!({ "node": host, "channel": kubernetes.channel, "ready": true }),
        );
    }
    for node in nodes.iter().skip(1) {
        let worker = node.role == Role::Worker;
        push(
            JOIN,
            &node.key,
            node,
            format!(
                "join {} to the cluster{}",
                node.hostname,
                if worker { " as a worker" } else { "" }
            ),
            format!(
                "{MICROK8S} add-node --token TOKEN on {}; {MICROK8S} join ADDRESS:25000/TOKEN{} on {}",
                first.hostname,
                if worker { " --worker" } else { "" },
                node.hostname
            ),
            "each attempt uses a new token (a failed join burns it); port 25000 and the node's hostname must be reachable from the first node",
            (true, 3),
            Action::Join { worker },
            json!({ "node": node.hostname, "via": first.hostname, "worker": worker }),
        );
    }
    for name in addon_names(kubernetes) {
        let monitoring = matches!(name, "observability" | "prometheus");
        let mut attrs = json!({ "name": name, "enabled": true });
        if name == "ingress" {
            attrs["controller"] = json!(ingress_controller(&kubernetes.channel));
        }
        push(
            ADDON,
            name,
            first,
            format!("enable addon {name} on {}", first.hostname),
            format!("{MICROK8S} enable {name}"),
            match name {
                "openebs" => "openebs needs iscsid (open-iscsi) on every node and the community addon first",
                "community" => "the community addons are fetched from GitHub: the first node needs outbound HTTPS",
                _ => "microk8s enables one addon at a time; `sudo microk8s status` on the node shows what it is doing",
            },
            // Monitoring is not needed for the cluster to work: a failure is reported and tried next run.
            (!monitoring, 3),
            Action::Enable { name },
            attrs,
        );
    }
    if !reach.api_on_loopback {
        push(
            CERTIFICATE,
            "api",
            first,
            format!("make the API certificate of {} valid for its public address", first.hostname),
            format!("sudo sed -i '/#MOREIPS/i IP.99 = ADDRESS' /var/snap/microk8s/current/certs/csr.conf.template; {MICROK8S} refresh-certs --cert server.crt"),
            "without it kubectl refuses the API server's certificate for the public address",
            (true, 2),
            Action::Certificate,
            json!({ "node": first.hostname }),
        );
    }
    push(
        KUBECONFIG,
        "main",
        first,
        format!("fetch the kubeconfig from {}", first.hostname),
        format!("{MICROK8S} config"),
        "the API server must be running on the first node",
        (true, 2),
        Action::Kubeconfig,
        json!({ "path": kubeconfig_path, "context": stack.name }),
    );
    let of = out.len();
    for (i, step) in out.iter_mut().enumerate() {
        step.number = i + 1;
        step.of = of;
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The steps one per line, as a snapshot pins them.
    fn listing(steps: &[Step]) -> String {
        steps
            .iter()
            .map(|s| {
                format!(
                    "{:>2}/{} {:<32} {}{}\n      $ {}\n",
                    s.number,
                    s.of,
                    s.address,
                    s.description,
                    if s.fatal { "" } else { " (not fatal)" },
                    s.command
                )
            })
            .collect()
    }

    /// A two-group stack (one control node, two workers) with these cluster settings.
    pub fn stack(provider: &str, kubernetes: &str) -> Stack {
        let image = if provider.contains("kvm") {
            "\n    image: {path: base.qcow2}"
        } else {
            ""
        };
        let text = format!(
            "version: 1\nname: demo\nprovider: {provider}\nnodes:\n  - name: control{image}\n  - name: worker\n    count: 2\n    role: worker{image}\nkubernetes: {kubernetes}\n"
        );
        crate::model::load_str(std::path::Path::new("stack.yaml"), &text).unwrap()
    }

    /// The combinations of channel, storage and monitoring the snapshots pin.
    pub const COMBINATIONS: &[(&str, &str)] = &[
        ("nginx-hostpath", "{channel: 1.32/stable}"),
        ("traefik-hostpath", "{channel: 1.35/stable}"),
        (
            "nginx-openebs-observability",
            "{channel: 1.34/stable, storage: openebs, addons: [dns, storage, ingress, monitoring]}",
        ),
        (
            "traefik-openebs-observability",
            "{channel: 1.35/stable, storage: openebs, addons: [dns, storage, ingress, monitoring]}",
        ),
        (
            "prometheus-alias",
            "{channel: 1.24/stable, addons: [dns, monitoring]}",
        ),
    ];

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

    #[test]
    fn addon_names_follow_the_channel() {
        let names = |k: &str| addon_names(stack(KVM, k).kubernetes.as_ref().unwrap());
        assert_eq!(
            names("{channel: 1.32/stable}"),
            ["dns", "hostpath-storage", "ingress"]
        );
        assert_eq!(
            names("{storage: openebs, addons: [monitoring, storage]}"),
            ["community", "openebs", "observability"],
            "the fixed order, whatever order the stack lists them in"
        );
        assert_eq!(
            names("{channel: 1.24/stable, addons: [monitoring]}"),
            ["prometheus"]
        );
        assert_eq!(ingress_controller("1.34/stable"), "nginx");
        assert_eq!(ingress_controller("1.35/edge"), "traefik");
    }

    #[test]
    fn no_steps_for_an_existing_cluster_or_plain_vms() {
        let existing = crate::model::load_str(
            std::path::Path::new("stack.yaml"),
            "version: 1\nname: demo\nprovider: {kvm: {}}\nkubernetes: {kubeconfig: kube.yaml}\n",
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
