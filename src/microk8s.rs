//! Facts about microk8s that several rooms need: what a channel's version
//! means for its addons and ingress controller. The user-data, the
//! bootstrap and the Kubernetes objects all follow them, so they live here
//! once, in a leaf that depends on the model alone.

use crate::model::{Addon, Kubernetes, StorageKind};

/// The microk8s command on a node (root's, through sudo).
pub const MICROK8S: &str = "sudo /snap/bin/microk8s";

/// The minor version of a `1.NN/risk` channel.
pub fn minor(channel: &str) -> u32 {
    channel
        .split('/')
        .next()
        .and_then(|v| v.split('.').nth(1))
        .and_then(|m| m.parse().ok())
        .unwrap_or(0)
}

/// The ingress controller microk8s's `ingress` addon runs on a channel:
/// NGINX up to 1.34, Traefik from 1.35.
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

/// Stacks the user-data and bootstrap snapshots are made from.
#[cfg(test)]
pub(crate) mod fixtures {
    use crate::model::Stack;

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
}

#[cfg(test)]
mod tests {
    use super::fixtures::stack;
    use super::*;

    #[test]
    fn addon_names_follow_the_channel() {
        let names = |k: &str| addon_names(stack("{kvm: {}}", k).kubernetes.as_ref().unwrap());
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
}
