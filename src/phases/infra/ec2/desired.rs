//! What an EC2 stack wants, built without any I/O: the key pair, the
//! security group and its rules, and one instance per node.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde_json::{json, Value};

use crate::cloudinit::{self, NodeSeed};
use crate::engine::{FieldPath, Handling, PriorFields, ReplaceRule, Resource};
use crate::files::sha256_hex;
use crate::keys::key_material;
use crate::model::{Ec2Settings, Stack};
use crate::templates::TemplateError;

pub const KEY_PAIR: &str = "key_pair";
pub const SECURITY_GROUP: &str = "security_group";
pub const INSTANCE: &str = "instance";

pub const KEY_PAIR_ADDRESS: &str = "ec2.key_pair.main";
pub const SECURITY_GROUP_ADDRESS: &str = "ec2.security_group.main";

/// The tag every resource of a stack carries.
pub const STACK_TAG: &str = "stack";
/// The tag that says which address a resource is.
pub const ADDRESS_TAG: &str = "stack:address";
/// The tag naming the state that made a resource (its lineage).
pub const LINEAGE_TAG: &str = "stack:lineage";
/// The tag with the sha256 of an instance's user data, set at launch: EC2
/// does not return user data with the instance, so this is how an instance
/// a stopped run made but did not record is compared with the stack.
pub const USER_DATA_TAG: &str = "stack:userdata";
/// When the environment expires (RFC 3339, UTC), for `stack gc`.
pub const EXPIRES_TAG: &str = "stack:expires";
/// The run a resource is of, and the stack that run is of.
pub const RUN_TAG: &str = "stack:run";
pub const RUN_OF_TAG: &str = "stack:run-of";

pub const SSH_PORT: i32 = 22;
/// microk8s serves the Kubernetes API here.
pub const KUBE_API_PORT: i32 = 16443;

/// The resource name used for the key pair and the security group.
pub fn resource_name(stack: &str) -> String {
    format!("stack-{stack}")
}

pub fn instance_address(group: &str, index: u32) -> String {
    format!("ec2.{INSTANCE}.{group}[{index}]")
}

fn tags(stack: &Stack, lineage: &str, address: &str, name: &str) -> Value {
    let mut tags: BTreeMap<String, String> = stack.tags.clone();
    tags.insert(LINEAGE_TAG.to_string(), lineage.to_string());
    tags.insert(STACK_TAG.to_string(), stack.name.clone());
    tags.insert(ADDRESS_TAG.to_string(), address.to_string());
    tags.insert("Name".to_string(), name.to_string());
    if let Some(expires) = stack.expires {
        tags.insert(EXPIRES_TAG.to_string(), crate::expiry::rfc3339(expires));
    }
    if let Some(run) = &stack.run {
        tags.insert(RUN_TAG.to_string(), run.id.clone());
        tags.insert(RUN_OF_TAG.to_string(), run.of.clone());
    }
    json!(tags)
}

/// Where an ingress rule lets traffic come from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Source {
    Cidr(String),
    /// Members of the same security group.
    SelfGroup,
    Group(String),
}

/// One ingress rule, written as `tcp 22 from 10.0.0.0/8` or `all from self`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct IngressRule {
    /// `tcp`, `udp`, `icmp` or `all`.
    pub protocol: String,
    pub ports: Option<(i32, i32)>,
    pub source: Source,
}

impl fmt::Display for IngressRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.protocol)?;
        match self.ports {
            Some((from, to)) if from == to => write!(f, " {from}")?,
            Some((from, to)) => write!(f, " {from}-{to}")?,
            None => {}
        }
        match &self.source {
            Source::Cidr(cidr) => write!(f, " from {cidr}"),
            Source::SelfGroup => write!(f, " from self"),
            Source::Group(id) => write!(f, " from {id}"),
        }
    }
}

impl FromStr for IngressRule {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (head, source) = text
            .split_once(" from ")
            .ok_or_else(|| format!("rule without source: {text}"))?;
        let mut words = head.split_whitespace();
        let protocol = words.next().ok_or("rule without protocol")?.to_string();
        let ports = match words.next() {
            None => None,
            Some(range) => {
                let (from, to) = range.split_once('-').unwrap_or((range, range));
                Some((
                    from.parse().map_err(|_| format!("bad port in {text}"))?,
                    to.parse().map_err(|_| format!("bad port in {text}"))?,
                ))
            }
        };
        let source = match source {
            "self" => Source::SelfGroup,
            id if id.starts_with("sg-") => Source::Group(id.to_string()),
            cidr => Source::Cidr(cidr.to_string()),
        };
        Ok(IngressRule {
            protocol,
            ports,
            source,
        })
    }
}

/// SSH and the Kubernetes API from `allowedCidrs`, HTTP(S) from
/// `ingressCidrs`, everything between members; nothing else.
pub fn ingress_rules(stack: &Stack) -> Vec<IngressRule> {
    let tcp = |port: i32, cidr: &ipnet::IpNet| IngressRule {
        protocol: "tcp".to_string(),
        ports: Some((port, port)),
        source: Source::Cidr(cidr.to_string()),
    };
    let mut rules = vec![IngressRule {
        protocol: "all".to_string(),
        ports: None,
        source: Source::SelfGroup,
    }];
    for cidr in &stack.network.allowed_cidrs {
        rules.push(tcp(SSH_PORT, cidr));
        rules.push(tcp(KUBE_API_PORT, cidr));
    }
    for cidr in &stack.network.ingress_cidrs {
        rules.push(tcp(80, cidr));
        rules.push(tcp(443, cidr));
    }
    rules.sort();
    rules.dedup();
    rules
}

/// The rules as text, sorted as refresh sorts what it reads back.
fn ingress_text(stack: &Stack) -> Vec<String> {
    let mut rules: Vec<String> = ingress_rules(stack)
        .iter()
        .map(ToString::to_string)
        .collect();
    rules.sort();
    rules
}

/// Host keys by host name: (private key in OpenSSH form, public key).
pub type HostKeys = BTreeMap<String, (String, String)>;

/// One instance to make.
pub struct InstanceSpec {
    pub address: String,
    pub hostname: String,
    pub user_data: String,
}

/// A node's host name.
pub fn hostname(stack: &Stack, group: &str, index: u32) -> String {
    format!("{}-{group}-{index}", stack.name)
}

/// Each instance with its user-data; `host_keys` gives a node's host key
/// (private OpenSSH form, public key) by host name. EC2 assigns private
/// addresses at launch, so `/etc/hosts` is written by the bootstrap instead.
pub fn instances(
    stack: &Stack,
    settings: &Ec2Settings,
    public_key: &str,
    host_keys: &HostKeys,
) -> Result<Vec<InstanceSpec>, TemplateError> {
    let mut out = Vec::new();
    for group in &stack.nodes {
        for index in 0..group.count {
            let hostname = hostname(stack, &group.name, index);
            let (host_private, host_public) = host_keys
                .get(&hostname)
                .map_or(("", ""), |(private, public)| {
                    (private.as_str(), public.as_str())
                });
            let user_data = cloudinit::user_data(&NodeSeed {
                stack,
                group,
                hostname: &hostname,
                user: &settings.ssh_user,
                authorized_key: public_key,
                host_private,
                host_public,
                hosts: &[],
            })?;
            out.push(InstanceSpec {
                address: instance_address(&group.name, index),
                hostname,
                user_data,
            });
        }
    }
    Ok(out)
}

/// Tags the stack set before still count; a change at one of `replace`
/// makes the resource again.
fn handling(replace: &[&str]) -> Handling {
    Handling::default()
        .replace(replace.iter().map(|p| ReplaceRule::at(p)).collect())
        .prior_fields(PriorFields::Under(vec![FieldPath::parse("tags")]))
}

/// An instance is made after the key pair and the group, and removed before them.
pub fn instance_handling() -> Handling {
    handling(&[
        "ami",
        "rootVolumeGiB",
        "keyName",
        "securityGroup",
        "userDataSha256",
        "subnetId",
    ])
    .waits_for([KEY_PAIR_ADDRESS, SECURITY_GROUP_ADDRESS])
}

/// Every resource of the stack with the attributes `stack` manages.
pub fn resources(
    stack: &Stack,
    settings: &Ec2Settings,
    public_key: &str,
    host_keys: &HostKeys,
    lineage: &str,
) -> Result<Vec<Resource>, TemplateError> {
    let name = resource_name(&stack.name);
    let mut resources = vec![
        Resource {
            address: KEY_PAIR_ADDRESS.to_string(),
            kind: KEY_PAIR.to_string(),
            attrs: json!({
                "name": name,
                "publicKeySha256": sha256_hex(key_material(public_key).as_bytes()),
                "tags": tags(stack, lineage, KEY_PAIR_ADDRESS, &name),
            }),
            handling: handling(&["name", "publicKeySha256"]),
        },
        {
            let mut attrs = json!({
                "name": name,
                "description": format!("stack {}: nodes of the stack", stack.name),
                "ingress": ingress_text(stack),
                "tags": tags(stack, lineage, SECURITY_GROUP_ADDRESS, &name),
            });
            if let Some(vpc) = &settings.vpc_id {
                attrs["vpcId"] = json!(vpc);
            }
            Resource {
                address: SECURITY_GROUP_ADDRESS.to_string(),
                kind: SECURITY_GROUP.to_string(),
                attrs,
                handling: handling(&["name", "description", "vpcId"]),
            }
        },
    ];
    let specs = instances(stack, settings, public_key, host_keys)?;
    let mut specs = specs.into_iter();
    for group in &stack.nodes {
        for _ in 0..group.count {
            let spec = specs.next().expect("one spec per node");
            let mut attrs = json!({
                "ami": group.ami.as_ref().or(settings.ami.as_ref()),
                "instanceType": group.instance_type.as_ref().unwrap_or(&settings.instance_type),
                "rootVolumeGiB": group.disk.as_gib_ceil(),
                "keyName": name,
                "securityGroup": name,
                "userDataSha256": sha256_hex(spec.user_data.as_bytes()),
                "state": "running",
                "tags": tags(stack, lineage, &spec.address, &spec.hostname),
            });
            if let Some(subnet) = group.subnet_id.as_ref().or(settings.subnet_id.as_ref()) {
                attrs["subnetId"] = json!(subnet);
            }
            resources.push(Resource {
                address: spec.address,
                kind: INSTANCE.to_string(),
                attrs,
                handling: instance_handling(),
            });
        }
    }
    Ok(resources)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Provider;

    const PUBLIC_KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDlcRDUzHuYNBQ2XzLkqM1twyC5Bj1MZ4bc0PiTjxFau stack-demo";

    /// Fixed stand-ins for generated host keys, so that snapshots are stable.
    pub fn test_host_keys(stack: &Stack) -> HostKeys {
        stack
            .nodes
            .iter()
            .flat_map(|g| (0..g.count).map(move |i| hostname(stack, &g.name, i)))
            .map(|h| {
                let private = format!("-----BEGIN OPENSSH PRIVATE KEY-----\nhost key of {h}\n-----END OPENSSH PRIVATE KEY-----\n");
                let public = format!("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHostKeyHostKeyHostKeyHostKeyHostKeyHost {h}");
                (h, (private, public))
            })
            .collect()
    }

    #[test]
    fn example_stack_resources_snapshot() {
        let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("stacks/aws.yaml");
        let stack = crate::model::load(&file).unwrap();
        let Some(Provider::Ec2(settings)) = &stack.provider else {
            panic!("stacks/aws.yaml is an ec2 stack")
        };
        let resources = resources(
            &stack,
            settings,
            PUBLIC_KEY,
            &test_host_keys(&stack),
            "0123456789abcdef",
        )
        .unwrap();
        insta::assert_json_snapshot!(resources);
    }

    #[test]
    fn nothing_is_open_to_the_world_unless_asked() {
        let file = std::path::Path::new("stack.yaml");
        let stack = crate::model::load_str(
            file,
            "version: 1\nname: closed\nprovider: {ec2: {ami: ami-12c6146b}}\nnodes: [{name: a}]\n",
        )
        .unwrap();
        assert_eq!(ingress_text(&stack), vec!["all from self".to_string()]);
    }

    #[test]
    fn rules_round_trip_through_text() {
        for text in [
            "tcp 22 from 10.0.0.0/8",
            "all from self",
            "tcp 80-443 from sg-123",
            "udp 53 from ::/0",
        ] {
            let rule: IngressRule = text.parse().unwrap();
            assert_eq!(rule.to_string(), text);
        }
    }
}
