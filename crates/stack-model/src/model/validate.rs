//! Rules that span more than one field: unique names, settings that must fit
//! the provider, sections that need other sections. Type and format errors
//! were already reported while decoding.

use std::collections::HashMap;

use super::file::*;
use super::stack::{BaseImage, DatabaseKind, Role};
use super::values::ByteSize;
use super::yaml::Pos;
use crate::diag::Diagnostics;

/// Namespaces a cluster (or a microk8s addon) has of its own.
const RESERVED_NAMESPACES: &[&str] = &["default", "ingress", "observability", "cert-manager"];

/// The tags EC2 allows on one resource, and how many of them stack sets on
/// its own (`Name`, `stack`, `stack:address`, `stack:lineage`,
/// `stack:userdata`).
const EC2_TAGS: usize = 50;
const STACK_TAGS: usize = 5;

pub fn validate(stack: &StackFile, diags: &mut Diagnostics) {
    let provider = stack.provider.as_ref().map(|p| &p.value);
    let is_ec2 = matches!(provider, Some(ProviderFile::Ec2(_)));
    let existing_cluster = stack
        .kubernetes
        .as_ref()
        .and_then(|k| k.value.kubeconfig.as_ref());
    // Only a stack that deploys to an existing cluster makes no machines.
    if provider.is_none() && (stack.nodes.is_some() || existing_cluster.is_none()) {
        diags.push(
            stack.pos,
            "provider",
            "a required field `provider` (`ec2` or `kvm` settings)",
            "no `provider`",
        );
    }

    match (&stack.nodes, existing_cluster) {
        (Some(nodes), Some(kubeconfig)) => diags.push(
            nodes.pos,
            "nodes",
            "no `nodes` when `kubernetes.kubeconfig` names an existing cluster",
            format!("both (kubeconfig at {}:{})", kubeconfig.pos.line, kubeconfig.pos.column),
        ),
        (None, None) if !diags.mentions("nodes") => diags.push(
            stack.name.pos,
            "nodes",
            "a required field `nodes` (the node groups), or `kubernetes.kubeconfig` for an existing cluster",
            "no `nodes`",
        ),
        (Some(nodes), None) if nodes.value.is_empty() => diags.push(
            nodes.pos,
            "nodes",
            "at least one node group",
            "an empty list",
        ),
        _ => {}
    }

    let groups = stack
        .nodes
        .as_ref()
        .map(|n| n.value.as_slice())
        .unwrap_or_default();
    unique(
        diags,
        "nodes",
        groups.iter().map(|g| (&g.name.value, g.name.pos)),
        "name",
        "node group name",
    );

    let ec2_default_ami = match provider {
        Some(ProviderFile::Ec2(ec2)) => ec2.ami.is_some(),
        _ => false,
    };
    // Which settings a node group may have depends on a provider.
    let groups = if provider.is_some() { groups } else { &[] };
    for (i, group) in groups.iter().enumerate() {
        let path = format!("nodes[{i}]");
        let other_provider_field = |field: &str| {
            format!(
                "`{field}` is for the {} provider",
                if is_ec2 { "kvm" } else { "ec2" }
            )
        };
        let misplaced: Vec<(&str, Option<Pos>)> = if is_ec2 {
            vec![
                ("cpus", group.cpus.as_ref().map(|s| s.pos)),
                ("memory", group.memory.as_ref().map(|s| s.pos)),
                ("image", group.image.as_ref().map(|s| s.pos)),
            ]
        } else {
            vec![
                ("instanceType", group.instance_type.as_ref().map(|s| s.pos)),
                ("ami", group.ami.as_ref().map(|s| s.pos)),
                ("subnetId", group.subnet_id.as_ref().map(|s| s.pos)),
            ]
        };
        for (field, pos) in misplaced {
            if let Some(pos) = pos {
                let hint = if is_ec2 {
                    "a setting of the ec2 provider (`instanceType`, `ami`, `subnetId`)"
                } else {
                    "a setting of the kvm provider (`cpus`, `memory`, `image`)"
                };
                diags.push(
                    pos,
                    &format!("{path}.{field}"),
                    hint,
                    other_provider_field(field),
                );
            }
        }
        let (ami_failed, image_failed) = (
            diags.mentions(&format!("{path}.ami")),
            diags.mentions(&format!("{path}.image")),
        );
        if is_ec2 && group.ami.is_none() && !ec2_default_ami && !ami_failed {
            diags.push(
                group.pos,
                &format!("{path}.ami"),
                "an `ami` on the group or on `provider.ec2`",
                "neither",
            );
        }
        if !is_ec2 && group.image.is_none() && !image_failed {
            diags.push(
                group.pos,
                &format!("{path}.image"),
                "a base image (`url` with `sha256` or `sha512`, or `path`) for a kvm node group",
                "no `image`",
            );
        }
        if let Some(disk) = &group.disk {
            let (min, max) = (ByteSize::gib(8), ByteSize::gib(16 * 1024));
            if disk.value < min || disk.value > max {
                diags.push(
                    disk.pos,
                    &format!("{path}.disk"),
                    "a disk from 8GiB to 16TiB",
                    disk.value.to_string(),
                );
            }
        }
        if let Some(memory) = &group.memory {
            if memory.value < ByteSize(512 << 20) {
                diags.push(
                    memory.pos,
                    &format!("{path}.memory"),
                    "at least 512MiB of memory",
                    memory.value.to_string(),
                );
            }
        }
        if let Some(BaseImage::Path { path: image, .. }) = group.image.as_ref().map(|i| &i.value) {
            if image.as_os_str().is_empty() {
                diags.push(
                    group.pos,
                    &format!("{path}.image.path"),
                    "a file path",
                    "an empty path",
                );
            }
        }
    }

    if let Some(network) = &stack.network {
        if let Some(cidr) = &network.cidr {
            if is_ec2 {
                diags.push(
                    cidr.pos,
                    "network.cidr",
                    "`network.cidr` only with the kvm provider (on ec2 the subnet decides addresses)",
                    "`cidr` with provider ec2",
                );
            } else {
                let nodes: u32 = groups
                    .iter()
                    .map(|g| g.count.as_ref().map_or(1, |c| c.value))
                    .sum();
                // Nodes take addresses from .10 up to the last host address.
                let usable = match cidr.value {
                    ipnet::IpNet::V4(net) => net.hosts().count().saturating_sub(9),
                    ipnet::IpNet::V6(_) => 0,
                };
                if usable < nodes as usize {
                    diags.push(
                        cidr.pos,
                        "network.cidr",
                        format!(
                            "an IPv4 network with room for {nodes} nodes from its .10 address up"
                        ),
                        cidr.value.to_string(),
                    );
                }
            }
        }
    }

    if let Some(kubernetes) = &stack.kubernetes {
        let k = &kubernetes.value;
        // The stack owns its namespace: `down` deletes it with all it holds.
        if let Some(namespace) = k.namespace.as_ref().filter(|n| {
            RESERVED_NAMESPACES.contains(&n.value.as_str()) || n.value.starts_with("kube-")
        }) {
            diags.push(
                namespace.pos,
                "kubernetes.namespace",
                "a namespace of the stack's own (`down` deletes it), not one the cluster or its addons use",
                format!("`{}`", namespace.value),
            );
        }
        if let Some(addons) = &k.addons {
            unique(
                diags,
                "kubernetes.addons",
                addons
                    .value
                    .iter()
                    .map(|a| (format!("{:?}", a.value).to_lowercase(), a.pos)),
                "",
                "addon",
            );
        }
        if existing_cluster.is_some() {
            for (field, pos) in [
                ("channel", k.channel.as_ref().map(|s| s.pos)),
                ("addons", k.addons.as_ref().map(|s| s.pos)),
                ("storage", k.storage.as_ref().map(|s| s.pos)),
            ] {
                if let Some(pos) = pos {
                    diags.push(
                        pos,
                        &format!("kubernetes.{field}"),
                        "no cluster settings for an existing cluster (`kubeconfig` is set)",
                        format!("`{field}`"),
                    );
                }
            }
        } else {
            if let Some(context) = &k.context {
                diags.push(
                    context.pos,
                    "kubernetes.context",
                    "`context` only together with `kubeconfig`",
                    "`context` alone",
                );
            }
            if !groups.is_empty()
                && !groups.iter().enumerate().any(|(i, g)| {
                    g.role
                        .as_ref()
                        .map_or(super::defaults::role(i), |r| r.value)
                        == Role::Control
                })
            {
                diags.push(
                    kubernetes.pos,
                    "nodes",
                    "at least one node group with role `control`",
                    "only worker groups",
                );
            }
        }
    }
    let needs_kubernetes = |diags: &mut Diagnostics, pos: Pos, path: &str| {
        if stack.kubernetes.is_none() {
            diags.push(
                pos,
                path,
                "a `kubernetes` section for this to run on",
                "no `kubernetes`",
            );
        }
    };
    if let Some(databases) = &stack.databases {
        if !databases.value.is_empty() {
            needs_kubernetes(diags, databases.pos, "databases");
        }
        unique(
            diags,
            "databases",
            databases.value.iter().map(|d| (&d.name.value, d.name.pos)),
            "name",
            "database name",
        );
        for (i, db) in databases.value.iter().enumerate() {
            database(db, &format!("databases[{i}]"), diags);
        }
        replication_targets(&databases.value, diags);
    }
    if let Some(ingress) = &stack.ingress {
        needs_kubernetes(diags, ingress.pos, "ingress");
        let i = &ingress.value;
        if existing_cluster.is_some() && i.class_name.is_none() {
            diags.push(
                ingress.pos,
                "ingress.className",
                "the IngressClass of the existing cluster's ingress controller (`className`)",
                "none: stack only knows the class of the clusters it makes",
            );
        }
        if let Some(endpoints) = &i.endpoints {
            let databases = stack
                .databases
                .as_ref()
                .map(|d| &d.value[..])
                .unwrap_or(&[]);
            let mut taken: HashMap<&str, String> = databases
                .iter()
                .map(|d| {
                    (
                        d.name.value.as_str(),
                        format!("the database at {}:{}", d.name.pos.line, d.name.pos.column),
                    )
                })
                .collect();
            for (index, endpoint) in endpoints.value.iter().enumerate() {
                let name = endpoint.name.value.as_str();
                match taken.get(name) {
                    Some(first) => diags.push(
                        endpoint.name.pos,
                        &format!("ingress.endpoints[{index}].name"),
                        "an endpoint name of its own (each is a host, NAME.domain)",
                        format!("`{name}`, taken by {first}"),
                    ),
                    None => {
                        taken.insert(
                            name,
                            format!(
                                "the endpoint at {}:{}",
                                endpoint.name.pos.line, endpoint.name.pos.column
                            ),
                        );
                    }
                }
            }
        }
    }
    if let Some(tags) = stack
        .tags
        .as_ref()
        .filter(|t| t.value.len() > EC2_TAGS - STACK_TAGS)
    {
        diags.push(
            tags.pos,
            "tags",
            format!(
                "at most {} tags (EC2 allows {EC2_TAGS} on a resource and stack sets {STACK_TAGS} of its own)",
                EC2_TAGS - STACK_TAGS
            ),
            format!("{} tags", tags.value.len()),
        );
    }
    if let Some(monitoring) = &stack.monitoring {
        needs_kubernetes(diags, monitoring.pos, "monitoring");
    }
    if let Some(upgrades) = &stack.upgrades {
        if stack.databases.as_ref().is_none_or(|d| d.value.is_empty()) {
            diags.push(
                upgrades.pos,
                "upgrades",
                "`databases` for upgrades to roll forward",
                "no databases",
            );
        }
        if let (Some(window), None) = (&upgrades.value.window, &upgrades.value.schedule) {
            diags.push(
                window.pos,
                "upgrades.window",
                "`window` only with a `schedule` (it is how long after a scheduled time an upgrade may still start)",
                "a window without a schedule",
            );
        }
    }
}

fn database(db: &DatabaseFile, path: &str, diags: &mut Diagnostics) {
    let kind = db.kind.value;
    let kind_name = format!("{kind:?}").to_lowercase();
    if let Some(replicas) = &db.replicas {
        let (min, max) = match kind {
            DatabaseKind::Couchdb | DatabaseKind::Allegrograph => (1, 9),
            DatabaseKind::Immudb => (0, 5),
        };
        if !(min..=max).contains(&replicas.value) {
            let what = match kind {
                DatabaseKind::Immudb => "read replicas",
                DatabaseKind::Allegrograph => "copies (besides the controlling instance)",
                DatabaseKind::Couchdb => "members",
            };
            diags.push(
                replicas.pos,
                &format!("{path}.replicas"),
                format!("{min} to {max} {what} for {kind_name}"),
                replicas.value.to_string(),
            );
        }
    }
    if let Some(storage) = &db.storage {
        if storage.value < ByteSize(1 << 30) {
            diags.push(
                storage.pos,
                &format!("{path}.storage"),
                "at least 1GiB of storage",
                storage.value.to_string(),
            );
        }
    }
    let only = |diags: &mut Diagnostics, field: &str, pos: Option<Pos>, owner: DatabaseKind| {
        if let Some(pos) = pos {
            if kind != owner {
                diags.push(
                    pos,
                    &format!("{path}.{field}"),
                    format!(
                        "`{field}` only on {} databases",
                        format!("{owner:?}").to_lowercase()
                    ),
                    format!("`{field}` on {kind_name}"),
                );
            }
        }
    };
    only(
        diags,
        "shmSize",
        db.shm_size.as_ref().map(|s| s.pos),
        DatabaseKind::Allegrograph,
    );
    only(
        diags,
        "repository",
        db.repository.as_ref().map(|s| s.pos),
        DatabaseKind::Allegrograph,
    );
    for (field, pos) in [
        ("q", db.shards.as_ref().map(|s| s.pos)),
        ("n", db.copies.as_ref().map(|s| s.pos)),
        ("rebalance", db.rebalance.as_ref().map(|s| s.pos)),
        ("databases", db.databases.as_ref().map(|s| s.pos)),
        ("replications", db.replications.as_ref().map(|s| s.pos)),
    ] {
        only(diags, field, pos, DatabaseKind::Couchdb);
    }
    only(
        diags,
        "licenseSecret",
        db.license_secret.as_ref().map(|s| s.pos),
        DatabaseKind::Allegrograph,
    );
    only(
        diags,
        "syncAcks",
        db.sync_acks.as_ref().map(|s| s.pos),
        DatabaseKind::Immudb,
    );
    if let Some(acks) = &db.sync_acks {
        let replicas = db
            .replicas
            .as_ref()
            .map_or(DatabaseKind::Immudb.default_replicas(), |r| r.value);
        if kind == DatabaseKind::Immudb && acks.value > replicas {
            diags.push(
                acks.pos,
                &format!("{path}.syncAcks"),
                format!("at most {replicas} (the read replicas that can acknowledge a write; `replicas` is {replicas})"),
                acks.value.to_string(),
            );
        }
    }
    if kind == DatabaseKind::Couchdb {
        couchdb(db, path, diags);
    }
    if let Some(shm) = &db.shm_size {
        if kind == DatabaseKind::Allegrograph && shm.value < ByteSize(1 << 30) {
            diags.push(
                shm.pos,
                &format!("{path}.shmSize"),
                "at least 1GiB of /dev/shm (AllegroGraph needs it)",
                shm.value.to_string(),
            );
        }
    }
}

/// A CouchDB cluster's own checks: no more copies than members, names unique.
fn couchdb(db: &DatabaseFile, path: &str, diags: &mut Diagnostics) {
    let members = db
        .replicas
        .as_ref()
        .map_or(DatabaseKind::Couchdb.default_replicas(), |r| r.value);
    let mut copies = |n: &Option<super::file::Spanned<u32>>, field: String| {
        if let Some(n) = n.as_ref().filter(|n| n.value > members) {
            diags.push(
                n.pos,
                &field,
                format!("at most {members} copies of each shard range (one per member; `replicas` is {members})"),
                n.value.to_string(),
            );
        }
    };
    copies(&db.copies, format!("{path}.n"));
    let databases = db.databases.as_ref().map_or(&[][..], |d| &d.value[..]);
    for (j, d) in databases.iter().enumerate() {
        copies(&d.copies, format!("{path}.databases[{j}].n"));
    }
    unique(
        diags,
        &format!("{path}.databases"),
        databases.iter().map(|d| (&d.name.value, d.name.pos)),
        "name",
        "database name in the cluster",
    );
    if let Some(replications) = &db.replications {
        unique(
            diags,
            &format!("{path}.replications"),
            replications
                .value
                .iter()
                .map(|r| (&r.name.value, r.name.pos)),
            "name",
            "replication name in the cluster",
        );
    }
}

/// Replications that name a cluster: it is a CouchDB cluster of this
/// stack, and a replication into the same cluster goes to another database.
fn replication_targets(databases: &[DatabaseFile], diags: &mut Diagnostics) {
    let couch: Vec<&str> = databases
        .iter()
        .filter(|d| d.kind.value == DatabaseKind::Couchdb)
        .map(|d| d.name.value.as_str())
        .collect();
    for (i, db) in databases.iter().enumerate() {
        let Some(replications) = &db.replications else {
            continue;
        };
        for (j, r) in replications.value.iter().enumerate() {
            let ReplicationTargetFile::Cluster { cluster, database } = &r.target.value else {
                continue;
            };
            let field = format!("databases[{i}].replications[{j}].target");
            if !couch.contains(&cluster.value.as_str()) {
                diags.push(
                    cluster.pos,
                    &format!("{field}.cluster"),
                    format!("a CouchDB cluster of this stack ({})", couch.join(", ")),
                    format!("`{}`", cluster.value),
                );
            } else if cluster.value == db.name.value && database.value == r.source.value {
                diags.push(
                    database.pos,
                    &format!("{field}.database"),
                    "another database than the source (a replication into itself does nothing)",
                    format!("`{}`, the source", database.value),
                );
            }
        }
    }
}

/// Reports every name seen before, pointing at the repeat and the first use.
fn unique<S: AsRef<str>>(
    diags: &mut Diagnostics,
    path: &str,
    names: impl Iterator<Item = (S, Pos)>,
    field: &str,
    what: &str,
) {
    let mut seen: HashMap<String, Pos> = HashMap::new();
    for (i, (name, pos)) in names.enumerate() {
        let name = name.as_ref().to_string();
        match seen.get(&name) {
            Some(first) => diags.push(
                pos,
                &if field.is_empty() {
                    format!("{path}[{i}]")
                } else {
                    format!("{path}[{i}].{field}")
                },
                format!("a unique {what}"),
                format!("`{name}` again (first at {}:{})", first.line, first.column),
            ),
            None => {
                seen.insert(name, pos);
            }
        }
    }
}
