//! Every default of the stack file, filled in one place.
//!
//! `stacks/reference.yaml` documents the same values; keep them in step.

use std::path::Path;
use std::time::Duration;

use super::file::*;
use super::stack::*;
use super::values::{ByteSize, ImageRef};

pub const EC2_INSTANCE_TYPE: &str = "t3.medium";
pub const EC2_SSH_USER: &str = "ubuntu";
/// As Terraform's AWS provider: enough that a run outlasts a bad minute of throttling.
pub const EC2_MAX_RETRIES: u32 = 25;
pub const KVM_SSH_USER: &str = "stack";
pub const DISK_GIB: u64 = 20;
pub const KVM_CPUS: u32 = 2;
pub const KVM_MEMORY_GIB: u64 = 4;
pub const KVM_CIDR: &str = "10.42.0.0/24";
pub const MICROK8S_CHANNEL: &str = "1.32/stable";
pub const DATABASE_STORAGE_GIB: u64 = 10;
/// CouchDB's own default of shard ranges, `[cluster] q`.
pub const COUCHDB_SHARDS: u32 = 2;
pub const RUNNING_TIMEOUT: Duration = Duration::from_secs(600);
pub const DELETE_TIMEOUT: Duration = Duration::from_secs(600);
pub const READY_TIMEOUT: Duration = Duration::from_secs(600);
pub const HEALTHY_TIMEOUT: Duration = Duration::from_secs(600);
pub const UPGRADE_HEALTH_TIMEOUT: Duration = Duration::from_secs(600);
pub const UPGRADE_WINDOW: Duration = Duration::from_secs(3600);
pub const UPGRADE_POLICY: UpgradePolicy = UpgradePolicy::Patch;

/// The first node group runs the control plane unless the stack says otherwise.
pub fn role(group_index: usize) -> Role {
    if group_index == 0 {
        Role::Control
    } else {
        Role::Worker
    }
}

fn val<T>(value: Option<Spanned<T>>) -> Option<T> {
    value.map(|s| s.value)
}

/// Turns a validated stack file into the resolved model.
pub fn resolve(stack: StackFile, file: &Path) -> Stack {
    let mut unbuilt = Vec::new();
    let mut positions = Positions::default();
    let mut mark = |path: &str, pos, what: &str| {
        positions.insert(path, pos);
        unbuilt.push(UnbuiltSection {
            path: path.to_string(),
            what: what.to_string(),
        })
    };
    if let Some(tcp) = stack.ingress.as_ref().and_then(|i| i.value.tcp.as_ref()) {
        if tcp.value == TcpExposure::EntryPoint {
            mark(
                "ingress.tcp",
                tcp.pos,
                "TCP entry points of the ingress controller",
            );
        }
    }

    let is_ec2 = matches!(
        stack.provider.as_ref().map(|p| &p.value),
        Some(ProviderFile::Ec2(_))
    );
    let provider = stack.provider.map(|p| match p.value {
        ProviderFile::Ec2(ec2) => Provider::Ec2(Ec2Settings {
            region: val(ec2.region),
            profile: val(ec2.profile),
            endpoint: val(ec2.endpoint),
            vpc_id: val(ec2.vpc_id),
            subnet_id: val(ec2.subnet_id),
            ami: val(ec2.ami),
            instance_type: val(ec2.instance_type).unwrap_or_else(|| EC2_INSTANCE_TYPE.to_string()),
            ssh_user: val(ec2.ssh_user).unwrap_or_else(|| EC2_SSH_USER.to_string()),
            max_retries: val(ec2.max_retries).unwrap_or(EC2_MAX_RETRIES),
        }),
        ProviderFile::Kvm(kvm) => Provider::Kvm(KvmSettings {
            accel: val(kvm.accel).unwrap_or(Accel::Auto),
            ssh_user: val(kvm.ssh_user).unwrap_or_else(|| KVM_SSH_USER.to_string()),
        }),
    });
    let network = stack.network.unwrap_or_default();
    let cidrs = |list: Opt<Vec<Spanned<ipnet::IpNet>>>| {
        val(list)
            .unwrap_or_default()
            .into_iter()
            .map(|c| c.value)
            .collect()
    };
    let network = Network {
        cidr: val(network.cidr)
            .or_else(|| (!is_ec2).then(|| KVM_CIDR.parse().expect("default CIDR parses"))),
        allowed_cidrs: cidrs(network.allowed_cidrs),
        ingress_cidrs: cidrs(network.ingress_cidrs),
    };
    if let Some(nodes) = &stack.nodes {
        positions.insert("nodes", nodes.pos);
    }
    if let Some(kubernetes) = &stack.kubernetes {
        positions.insert("kubernetes", kubernetes.pos);
    }
    for (i, group) in stack.nodes.iter().flat_map(|n| n.value.iter()).enumerate() {
        let path = format!("nodes[{i}]");
        positions.insert(&path, group.pos);
        for (key, pos) in [
            ("image", group.image.as_ref().map(|s| s.pos)),
            ("runcmd", group.runcmd.as_ref().map(|s| s.pos)),
            ("userData", group.user_data.as_ref().map(|s| s.pos)),
        ] {
            if let Some(pos) = pos {
                positions.insert(format!("{path}.{key}"), pos);
            }
        }
    }
    if let Some(manifests) = stack
        .kubernetes
        .as_ref()
        .and_then(|k| k.value.manifests.as_ref())
    {
        positions.insert("kubernetes.manifests", manifests.pos);
        for (i, manifest) in manifests.value.iter().enumerate() {
            positions.insert(format!("kubernetes.manifests[{i}]"), manifest.pos);
        }
    }
    if let Some(tags) = &stack.tags {
        positions.insert("tags", tags.pos);
    }
    let nodes = val(stack.nodes)
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, g)| NodeGroup {
            name: g.name.value,
            count: val(g.count).unwrap_or(1),
            role: val(g.role).unwrap_or(role(i)),
            disk: val(g.disk).unwrap_or(ByteSize::gib(DISK_GIB)),
            instance_type: is_ec2.then(|| val(g.instance_type)).flatten(),
            ami: val(g.ami),
            subnet_id: val(g.subnet_id),
            cpus: (!is_ec2).then(|| val(g.cpus).unwrap_or(KVM_CPUS)),
            memory: (!is_ec2).then(|| val(g.memory).unwrap_or(ByteSize::gib(KVM_MEMORY_GIB))),
            image: val(g.image),
            runcmd: val(g.runcmd)
                .unwrap_or_default()
                .into_iter()
                .map(|c| c.value)
                .collect(),
            user_data: val(g.user_data),
        })
        .collect();
    let folder = file.parent().unwrap_or(Path::new(""));
    let name = stack.name.value;
    let kubernetes = val(stack.kubernetes).map(|k| Kubernetes {
        channel: val(k.channel).unwrap_or_else(|| MICROK8S_CHANNEL.to_string()),
        addons: val(k.addons)
            .map(|a| a.into_iter().map(|a| a.value).collect())
            .unwrap_or_else(|| vec![Addon::Dns, Addon::Storage, Addon::Ingress]),
        storage: val(k.storage).unwrap_or(StorageKind::Hostpath),
        kubeconfig: val(k.kubeconfig),
        context: val(k.context),
        namespace: val(k.namespace).unwrap_or_else(|| name.clone()),
        manifests: val(k.manifests)
            .unwrap_or_default()
            .into_iter()
            .map(|m| folder.join(m.value))
            .collect(),
    });
    let databases = val(stack.databases)
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, d)| {
            let kind = d.kind.value;
            let path = format!("databases[{i}]");
            positions.insert(path.clone(), d.pos);
            if let Some(replicas) = &d.replicas {
                positions.insert(format!("{path}.replicas"), replicas.pos);
            }
            if let Some(copies) = &d.copies {
                positions.insert(format!("{path}.n"), copies.pos);
            }
            let is_agraph = kind == DatabaseKind::Allegrograph;
            let replicas = val(d.replicas).unwrap_or(kind.default_replicas());
            let couchdb = (kind == DatabaseKind::Couchdb).then(|| {
                let shards = val(d.shards).unwrap_or(COUCHDB_SHARDS);
                let copies = val(d.copies);
                let databases = val(d.databases).unwrap_or_default();
                for (j, db) in databases.iter().enumerate() {
                    positions.insert(format!("{path}.databases[{j}]"), db.name.pos);
                    if let Some(n) = &db.copies {
                        positions.insert(format!("{path}.databases[{j}].n"), n.pos);
                    }
                }
                CouchdbSettings {
                    shards,
                    copies,
                    rebalance: val(d.rebalance).unwrap_or(true),
                    databases: databases
                        .into_iter()
                        .map(|db| CouchDatabase {
                            name: db.name.value,
                            shards: val(db.shards).unwrap_or(shards),
                            copies: val(db.copies).or(copies),
                            partitioned: val(db.partitioned).unwrap_or(false),
                        })
                        .collect(),
                    replications: val(d.replications)
                        .unwrap_or_default()
                        .into_iter()
                        .map(|r| Replication {
                            name: r.name.value,
                            source: r.source.value,
                            target: match r.target.value {
                                ReplicationTargetFile::Cluster { cluster, database } => {
                                    ReplicationTarget::Cluster {
                                        cluster: cluster.value,
                                        database: database.value,
                                    }
                                }
                                ReplicationTargetFile::Url { url, credentials } => {
                                    ReplicationTarget::Url {
                                        url: url.value,
                                        credentials: val(credentials),
                                    }
                                }
                            },
                        })
                        .collect(),
                }
            });
            Database {
                kind,
                name: d.name.value,
                image: val(d.image).unwrap_or_else(|| {
                    ImageRef::parse(kind.default_image()).expect("default image parses")
                }),
                replicas,
                storage: val(d.storage).unwrap_or(ByteSize::gib(DATABASE_STORAGE_GIB)),
                storage_class: val(d.storage_class),
                upgrade: val(d.upgrade).map_or(UpgradeRule::policy(UPGRADE_POLICY), |u| {
                    UpgradeRule {
                        policy: val(u.policy).unwrap_or(UPGRADE_POLICY),
                        range: val(u.range),
                        tags: val(u.tags),
                        prerelease: val(u.prerelease).unwrap_or(false),
                    }
                }),
                shm_size: is_agraph.then(|| val(d.shm_size).unwrap_or(ByteSize::gib(1))),
                repository: is_agraph
                    .then(|| val(d.repository).unwrap_or_else(|| "main".to_string())),
                couchdb,
                sync_acks: val(d.sync_acks),
                license_secret: val(d.license_secret),
            }
        })
        .collect();
    let ingress = val(stack.ingress).map(|i| Ingress {
        domain: i.domain.value,
        tls: match val(i.tls) {
            None | Some(TlsFile::StackCa) => TlsSource::StackCa,
            Some(TlsFile::Secret(name)) => TlsSource::Secret(name),
            Some(TlsFile::Issuer(name)) => TlsSource::Issuer(name),
        },
        class_name: val(i.class_name),
        tcp: val(i.tcp).unwrap_or(TcpExposure::NodePort),
        endpoints: val(i.endpoints)
            .unwrap_or_default()
            .into_iter()
            .map(|e| Endpoint {
                name: e.name.value,
                service: e.service.value,
                port: e.port.value as u16,
                protocol: val(e.protocol).unwrap_or(Protocol::Http),
            })
            .collect(),
    });
    let monitoring = val(stack.monitoring).map(|m| Monitoring {
        service_monitors: val(m.service_monitors).unwrap_or(true),
        dashboards: val(m.dashboards).unwrap_or(true),
    });
    let upgrades = val(stack.upgrades).map(|u| Upgrades {
        schedule: val(u.schedule),
        window: val(u.window).unwrap_or(UPGRADE_WINDOW),
        health_timeout: val(u.health_timeout).unwrap_or(UPGRADE_HEALTH_TIMEOUT),
        rollback: val(u.rollback).unwrap_or(true),
        insecure_registries: val(u.insecure_registries)
            .unwrap_or_default()
            .into_iter()
            .map(|r| r.value)
            .collect(),
    });
    let timeouts = stack.timeouts.unwrap_or_default();
    Stack {
        name,
        file: file.to_path_buf(),
        provider,
        network,
        nodes,
        kubernetes,
        databases,
        ingress,
        monitoring,
        upgrades,
        timeouts: Timeouts {
            running: val(timeouts.running).unwrap_or(RUNNING_TIMEOUT),
            delete: val(timeouts.delete).unwrap_or(DELETE_TIMEOUT),
            ready: val(timeouts.ready).unwrap_or(READY_TIMEOUT),
            healthy: val(timeouts.healthy).unwrap_or(HEALTHY_TIMEOUT),
        },
        tags: val(stack.tags)
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.value))
            .collect(),
        ttl: val(stack.ttl),
        state: match val(stack.state) {
            Some(StateFile {
                backend:
                    Some(Spanned {
                        value: StateBackendKind::Postgres,
                        ..
                    }),
                url: Some(url),
            }) => StateSettings::Postgres { url: url.value },
            _ => StateSettings::Local,
        },
        run: None,
        expires: None,
        unbuilt,
        positions,
    }
}
