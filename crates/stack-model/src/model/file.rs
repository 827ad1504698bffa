//! The stack file as the user wrote it: optional fields stay optional and
//! every value keeps its position, so cross-field checks can point at it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use super::stack::{Accel, Addon, BaseImage, DatabaseKind, Role, StorageKind};
use super::stack::{Protocol, TcpExposure, UpgradePolicy};
use super::values::{ByteSize, ImageRef, TagPattern, VersionRange};
use super::yaml::Pos;

/// A value and where it was written.
#[derive(Debug, Clone, PartialEq)]
pub struct Spanned<T> {
    pub value: T,
    pub pos: Pos,
}

pub type Opt<T> = Option<Spanned<T>>;

#[derive(Debug, Clone)]
pub struct StackFile {
    /// Where the stack's mapping starts.
    pub pos: Pos,
    pub name: Spanned<String>,
    /// Required unless the stack only deploys to an existing cluster.
    pub provider: Opt<ProviderFile>,
    pub network: Option<NetworkFile>,
    pub nodes: Opt<Vec<NodeGroupFile>>,
    pub kubernetes: Opt<KubernetesFile>,
    pub databases: Opt<Vec<DatabaseFile>>,
    pub ingress: Opt<IngressFile>,
    pub monitoring: Opt<MonitoringFile>,
    pub upgrades: Opt<UpgradesFile>,
    pub timeouts: Option<TimeoutsFile>,
    pub tags: Opt<BTreeMap<String, Spanned<String>>>,
    pub ttl: Opt<Duration>,
    pub state: Opt<StateFile>,
}

/// `state:`, where the stack's state is kept.
#[derive(Debug, Clone)]
pub struct StateFile {
    pub backend: Opt<StateBackendKind>,
    pub url: Opt<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateBackendKind {
    Local,
    Postgres,
}

#[derive(Debug, Clone)]
pub enum ProviderFile {
    Ec2(Box<Ec2File>),
    Kvm(KvmFile),
}

#[derive(Debug, Clone, Default)]
pub struct Ec2File {
    pub region: Opt<String>,
    pub profile: Opt<String>,
    pub endpoint: Opt<String>,
    pub vpc_id: Opt<String>,
    pub subnet_id: Opt<String>,
    pub ami: Opt<String>,
    pub instance_type: Opt<String>,
    pub ssh_user: Opt<String>,
    pub max_retries: Opt<u32>,
}

#[derive(Debug, Clone, Default)]
pub struct KvmFile {
    pub accel: Opt<Accel>,
    pub ssh_user: Opt<String>,
}

#[derive(Debug, Clone, Default)]
pub struct NetworkFile {
    pub cidr: Opt<ipnet::IpNet>,
    pub allowed_cidrs: Opt<Vec<Spanned<ipnet::IpNet>>>,
    pub ingress_cidrs: Opt<Vec<Spanned<ipnet::IpNet>>>,
}

#[derive(Debug, Clone)]
pub struct NodeGroupFile {
    pub pos: Pos,
    pub name: Spanned<String>,
    pub count: Opt<u32>,
    pub role: Opt<Role>,
    pub disk: Opt<ByteSize>,
    pub instance_type: Opt<String>,
    pub ami: Opt<String>,
    pub subnet_id: Opt<String>,
    pub cpus: Opt<u32>,
    pub memory: Opt<ByteSize>,
    pub image: Opt<BaseImage>,
    pub runcmd: Opt<Vec<Spanned<String>>>,
    pub user_data: Opt<PathBuf>,
}

#[derive(Debug, Clone, Default)]
pub struct KubernetesFile {
    pub channel: Opt<String>,
    pub addons: Opt<Vec<Spanned<Addon>>>,
    pub storage: Opt<StorageKind>,
    pub kubeconfig: Opt<PathBuf>,
    pub context: Opt<String>,
    pub namespace: Opt<String>,
    pub manifests: Opt<Vec<Spanned<PathBuf>>>,
}

#[derive(Debug, Clone)]
pub struct DatabaseFile {
    pub pos: Pos,
    pub kind: Spanned<DatabaseKind>,
    pub name: Spanned<String>,
    pub image: Opt<ImageRef>,
    pub replicas: Opt<u32>,
    pub storage: Opt<ByteSize>,
    pub upgrade: Opt<UpgradeRuleFile>,
    pub storage_class: Opt<String>,
    pub shm_size: Opt<ByteSize>,
    pub repository: Opt<String>,
    pub shards: Opt<u32>,
    pub copies: Opt<u32>,
    pub rebalance: Opt<bool>,
    pub databases: Opt<Vec<CouchDatabaseFile>>,
    pub replications: Opt<Vec<ReplicationFile>>,
    pub sync_acks: Opt<u32>,
    pub license_secret: Opt<String>,
}

/// A database's `upgrade`: a policy alone, or a mapping with a range, a
/// tag pattern and whether pre-releases count.
#[derive(Debug, Clone, Default)]
pub struct UpgradeRuleFile {
    pub policy: Opt<UpgradePolicy>,
    pub range: Opt<VersionRange>,
    pub tags: Opt<TagPattern>,
    pub prerelease: Opt<bool>,
}

/// A database a CouchDB cluster holds (`databases[i].databases[j]`).
#[derive(Debug, Clone)]
pub struct CouchDatabaseFile {
    pub name: Spanned<String>,
    pub shards: Opt<u32>,
    pub copies: Opt<u32>,
    pub partitioned: Opt<bool>,
}

#[derive(Debug, Clone)]
pub struct ReplicationFile {
    pub name: Spanned<String>,
    pub source: Spanned<String>,
    pub target: Spanned<ReplicationTargetFile>,
}

#[derive(Debug, Clone)]
pub enum ReplicationTargetFile {
    /// A database of a CouchDB cluster of the same stack.
    Cluster {
        cluster: Spanned<String>,
        database: Spanned<String>,
    },
    /// A CouchDB database anywhere, its credentials in a Secret.
    Url {
        url: Spanned<String>,
        credentials: Opt<String>,
    },
}

#[derive(Debug, Clone)]
pub enum TlsFile {
    StackCa,
    Secret(String),
    Issuer(String),
}

#[derive(Debug, Clone)]
pub struct IngressFile {
    pub domain: Spanned<String>,
    pub tls: Opt<TlsFile>,
    pub class_name: Opt<String>,
    pub tcp: Opt<TcpExposure>,
    pub endpoints: Opt<Vec<EndpointFile>>,
}

#[derive(Debug, Clone)]
pub struct EndpointFile {
    pub name: Spanned<String>,
    pub service: Spanned<String>,
    pub port: Spanned<u32>,
    pub protocol: Opt<Protocol>,
}

#[derive(Debug, Clone, Default)]
pub struct MonitoringFile {
    pub service_monitors: Opt<bool>,
    pub dashboards: Opt<bool>,
}

#[derive(Debug, Clone)]
pub struct UpgradesFile {
    pub schedule: Opt<String>,
    pub window: Opt<Duration>,
    pub health_timeout: Opt<Duration>,
    pub rollback: Opt<bool>,
    pub insecure_registries: Opt<Vec<Spanned<String>>>,
}

#[derive(Debug, Clone, Default)]
pub struct TimeoutsFile {
    pub running: Opt<Duration>,
    pub delete: Opt<Duration>,
    pub ready: Opt<Duration>,
    pub healthy: Opt<Duration>,
}
