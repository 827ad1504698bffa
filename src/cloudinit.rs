//! The user-data every node boots with, on either provider: its user and the
//! stack's key, its pinned host key, every node in `/etc/hosts` (when the
//! addresses are known before boot), microk8s from the stack's channel with
//! refreshes held, the group's own commands, and a marker when it is done.

use std::path::PathBuf;

use crate::model::{NodeGroup, Stack, StorageKind};
use crate::templates::{self, HostEntry, Microk8sInstall, TemplateError, UserData};

/// Written by the last command of the user-data; the bootstrap waits for it.
pub const DONE_MARKER: &str = "/var/lib/stack/node-done";

/// One node's part of its user-data.
pub struct NodeSeed<'a> {
    pub stack: &'a Stack,
    pub group: &'a NodeGroup,
    pub hostname: &'a str,
    pub user: &'a str,
    pub authorized_key: &'a str,
    /// The host key's private (OpenSSH) and public forms.
    pub host_private: &'a str,
    pub host_public: &'a str,
    pub hosts: &'a [HostEntry],
}

/// How cloud-init installs microk8s for this stack, if it does.
pub fn microk8s_install(stack: &Stack) -> Option<Microk8sInstall> {
    let kubernetes = stack.kubernetes.as_ref()?;
    if kubernetes.kubeconfig.is_some() {
        return None;
    }
    Some(Microk8sInstall {
        channel: kubernetes.channel.clone(),
        iscsi: kubernetes.storage == StorageKind::Openebs
            && kubernetes.addons.contains(&crate::model::Addon::Storage),
    })
}

/// The stack's own user-data template for a group, relative to the stack file.
fn custom_template(stack: &Stack, group: &NodeGroup) -> Option<PathBuf> {
    let path = group.user_data.as_ref()?;
    Some(if path.is_absolute() {
        path.clone()
    } else {
        stack
            .file
            .parent()
            .map(|dir| dir.join(path))
            .unwrap_or_else(|| path.clone())
    })
}

pub fn user_data(node: &NodeSeed) -> Result<String, TemplateError> {
    let indented: Vec<String> = node
        .host_private
        .lines()
        .map(|line| format!("    {line}"))
        .collect();
    let args = UserData {
        stack: node.stack.name.clone(),
        hostname: node.hostname.to_string(),
        user: node.user.to_string(),
        authorized_key: node.authorized_key.trim().to_string(),
        host_private_indented: indented.join("\n"),
        host_public: node.host_public.trim().to_string(),
        hosts: node.hosts.to_vec(),
        install_microk8s: microk8s_install(node.stack).is_some(),
        microk8s: microk8s_install(node.stack).unwrap_or_default(),
        runcmd: node
            .group
            .runcmd
            .iter()
            .map(|c| serde_json::to_string(c).expect("strings serialise"))
            .collect(),
        done_marker: DONE_MARKER,
    };
    templates::user_data(&args, custom_template(node.stack, node.group).as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::microk8s::fixtures::{stack, COMBINATIONS};
    use std::path::Path;

    fn render(stack: &Stack, group: usize, hosts: &[HostEntry]) -> String {
        let group = &stack.nodes[group];
        user_data(&NodeSeed {
            stack,
            group,
            hostname: &format!("{}-{}-0", stack.name, group.name),
            user: "stack",
            authorized_key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDlcRDUzHuYNBQ2XzLkqM1twyC5Bj1MZ4bc0PiTjxFau stack-demo",
            host_private: "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n",
            host_public: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHostKeyHostKeyHostKeyHostKeyHostKeyHost demo-control-0",
            hosts,
        })
        .unwrap()
    }

    fn hosts() -> Vec<HostEntry> {
        (0..3)
            .map(|i| HostEntry {
                address: format!("10.42.0.{}", 10 + i),
                hostname: format!("demo-node-{i}"),
            })
            .collect()
    }

    /// The user-data of every example stack's first node and of every
    /// combination the snapshots pin.
    fn every_user_data() -> Vec<(String, String)> {
        let mut out = Vec::new();
        for file in [
            "stacks/aws.yaml",
            "stacks/local.yaml",
            "stacks/reference.yaml",
        ] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
            let stack = crate::model::load(&path).unwrap();
            out.push((file.to_string(), render(&stack, 0, &hosts())));
        }
        for (name, kubernetes) in COMBINATIONS {
            out.push((
                name.to_string(),
                render(&stack("{kvm: {}}", kubernetes), 0, &hosts()),
            ));
        }
        out
    }

    #[test]
    fn user_data_for_each_addon_and_channel() {
        for (name, kubernetes) in COMBINATIONS {
            insta::assert_snapshot!(
                format!("user_data_{name}"),
                render(&stack("{kvm: {}}", kubernetes), 0, &hosts())
            );
        }
        // Without a cluster: no microk8s, and EC2 (no hosts known in advance) writes no /etc/hosts.
        let plain = crate::model::load_str(
            Path::new("stack.yaml"),
            "version: 1\nname: demo\nprovider: {ec2: {ami: ami-12c6146b}}\nnodes: [{name: node, runcmd: [\"echo 'hello \\\"world\\\"' > /tmp/hello\"]}]\n",
        )
        .unwrap();
        insta::assert_snapshot!("user_data_plain_ec2", render(&plain, 0, &[]));
    }

    /// `cloud-init schema` of Debian's cloud-init package (extracted by
    /// `.ci/run` into ~/.cache/stack/cloud-init, or `STACK_CLOUD_INIT`).
    #[test]
    fn every_rendered_user_data_passes_cloud_init_schema() {
        let root = std::env::var_os("STACK_CLOUD_INIT")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                Path::new(&std::env::var_os("HOME").expect("HOME is set"))
                    .join(".cache/stack/cloud-init/root")
            });
        let packages = root.join("usr/lib/python3/dist-packages");
        assert!(
            packages.join("cloudinit").is_dir(),
            "Debian's cloud-init is not extracted at {} (.ci/run does it)",
            root.display()
        );
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in every_user_data() {
            let file = dir.path().join(format!("{}.yaml", name.replace('/', "-")));
            std::fs::write(&file, &text).unwrap();
            let out = std::process::Command::new("/usr/bin/python3")
                .args(["-m", "cloudinit.cmd.main", "schema", "--config-file"])
                .arg(&file)
                .env("PYTHONPATH", &packages)
                .output()
                .expect("python3 runs");
            let said = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(out.status.success(), "{name}: {said}\n{text}");
            assert!(said.contains("Valid cloud-config"), "{name}: {said}");
        }
    }

    #[test]
    fn a_stacks_own_template_gets_the_same_arguments_in_strict_mode() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("good.hbs"),
            "#cloud-config\nhostname: {{hostname}}\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("bad.hbs"),
            "#cloud-config\nhostname: {{hostnme}}\n",
        )
        .unwrap();
        let load = |template: &str| {
            let file = dir.path().join("stack.yaml");
            let text = format!("version: 1\nname: demo\nprovider: {{kvm: {{}}}}\nnodes: [{{name: a, image: {{path: a.qcow2}}, userData: {template}}}]\n");
            crate::model::load_str(&file, &text).unwrap()
        };
        assert_eq!(
            render(&load("good.hbs"), 0, &[]),
            "#cloud-config\nhostname: demo-a-0\n"
        );
        let stack = load("bad.hbs");
        let err = user_data(&NodeSeed {
            stack: &stack,
            group: &stack.nodes[0],
            hostname: "demo-a-0",
            user: "stack",
            authorized_key: "",
            host_private: "",
            host_public: "",
            hosts: &[],
        })
        .unwrap_err();
        let message = crate::error_chain::error_chain(&err);
        assert!(
            message.contains("bad.hbs") && message.contains("hostnme"),
            "{message}"
        );
    }
}
