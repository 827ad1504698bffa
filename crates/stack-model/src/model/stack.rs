//! The resolved stack: what the planner and the phases use, every default
//! filled in. Everything else in `model` turns a file into one of these.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use super::values::{ByteSize, Checksum, ImageRef, TagPattern, VersionRange};
use super::yaml::Pos;

/// A resolved stack: every default filled in.
#[derive(Debug, Clone, Serialize)]
pub struct Stack {
    pub name: String,
    /// The stack file this came from.
    pub file: PathBuf,
    /// `None` for a stack that only deploys to an existing cluster.
    pub provider: Option<Provider>,
    pub network: Network,
    pub nodes: Vec<NodeGroup>,
    pub kubernetes: Option<Kubernetes>,
    pub databases: Vec<Database>,
    pub ingress: Option<Ingress>,
    pub monitoring: Option<Monitoring>,
    pub upgrades: Option<Upgrades>,
    pub timeouts: Timeouts,
    pub tags: BTreeMap<String, String>,
    /// How long an environment of the stack may live (`ttl:`, or `--ttl`):
    /// every resource carries its expiry, and `stack gc` removes it once
    /// that has passed.
    pub ttl: Option<Duration>,
    /// Where the stack's state is kept.
    pub state: StateSettings,
    /// The run this is the environment of (`stack run`); never from the file.
    pub run: Option<RunMarks>,
    /// When the environment expires, in seconds since the epoch: `ttl` after
    /// the state was made. Set when a session opens; never from the file.
    pub expires: Option<u64>,
    /// Sections present in the file whose behaviour is not built yet (their
    /// positions are in `positions`).
    pub unbuilt: Vec<UnbuiltSection>,
    /// Where fields that are checked after resolving were written.
    #[serde(skip)]
    pub positions: Positions,
}

/// Where a stack's state is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "camelCase", tag = "backend")]
pub enum StateSettings {
    /// `.stack/NAME.state.json` next to the stack file.
    #[default]
    Local,
    /// A PostgreSQL database shared by a team.
    Postgres { url: String },
}

/// What marks the environment of one `stack run`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct RunMarks {
    /// The run's short id, the suffix of the environment's name.
    pub id: String,
    /// The name of the stack the run is of.
    pub of: String,
}

/// Where fields were written, by field path (`nodes[0].image`,
/// `kubernetes.manifests[1]`), for the checks that run on the resolved
/// stack (files that must exist, rendered user-data) to point into the file.
#[derive(Debug, Clone, Default)]
pub struct Positions(BTreeMap<String, Pos>);

impl Positions {
    pub fn insert(&mut self, path: impl Into<String>, pos: Pos) {
        self.0.insert(path.into(), pos);
    }

    /// Where `path` was written, or the nearest enclosing field that was;
    /// the start of the file when none was.
    pub fn of(&self, path: &str) -> Pos {
        let mut path = path;
        loop {
            if let Some(pos) = self.0.get(path) {
                return *pos;
            }
            match path.rfind(['.', '[']) {
                Some(end) => path = &path[..end],
                None => return Pos { line: 1, column: 1 },
            }
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct UnbuiltSection {
    pub path: String,
    pub what: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum Provider {
    Ec2(Ec2Settings),
    Kvm(KvmSettings),
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Ec2Settings {
    pub region: Option<String>,
    pub profile: Option<String>,
    pub endpoint: Option<String>,
    pub vpc_id: Option<String>,
    pub subnet_id: Option<String>,
    pub ami: Option<String>,
    pub instance_type: String,
    pub ssh_user: String,
    /// How many times an EC2 call is retried after a transient error.
    pub max_retries: u32,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KvmSettings {
    pub accel: Accel,
    pub ssh_user: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Auto,
    Kvm,
    Tcg,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Network {
    /// Private network of a KVM stack.
    pub cidr: Option<ipnet::IpNet>,
    /// Who may reach SSH and the Kubernetes API.
    pub allowed_cidrs: Vec<ipnet::IpNet>,
    /// Who may reach HTTP and HTTPS ingress.
    pub ingress_cidrs: Vec<ipnet::IpNet>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Control,
    Worker,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeGroup {
    pub name: String,
    pub count: u32,
    pub role: Role,
    pub disk: ByteSize,
    /// EC2 only.
    pub instance_type: Option<String>,
    /// EC2 only.
    pub ami: Option<String>,
    /// EC2 only.
    pub subnet_id: Option<String>,
    /// KVM only.
    pub cpus: Option<u32>,
    /// KVM only.
    pub memory: Option<ByteSize>,
    /// KVM only.
    pub image: Option<BaseImage>,
    /// Extra commands cloud-init runs once at first boot.
    pub runcmd: Vec<String>,
    /// The group's own user-data template (handlebars), in place of the built-in one.
    pub user_data: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum BaseImage {
    /// Downloaded once into the image cache and checked against its
    /// checksum. With `kernel` and `initrd` (local files) it is a root file
    /// system booted directly, as with `Path`.
    Url {
        url: String,
        checksum: Checksum,
        kernel: Option<PathBuf>,
        initrd: Option<PathBuf>,
    },
    /// A local disk image; with `kernel` and `initrd` it is a root file
    /// system booted directly.
    Path {
        path: PathBuf,
        kernel: Option<PathBuf>,
        initrd: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Addon {
    Dns,
    Storage,
    Ingress,
    Monitoring,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageKind {
    Hostpath,
    Openebs,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Kubernetes {
    pub channel: String,
    pub addons: Vec<Addon>,
    pub storage: StorageKind,
    pub kubeconfig: Option<PathBuf>,
    pub context: Option<String>,
    /// Where the stack's own objects go (default: the stack's name).
    pub namespace: String,
    /// The user's manifest files and folders, resolved against the stack file's folder.
    pub manifests: Vec<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DatabaseKind {
    Couchdb,
    Allegrograph,
    Immudb,
}

impl DatabaseKind {
    pub fn default_image(self) -> &'static str {
        match self {
            DatabaseKind::Couchdb => "couchdb:3.5.1",
            DatabaseKind::Allegrograph => "franzinc/agraph:v8.4.0",
            DatabaseKind::Immudb => "codenotary/immudb:1.11.0",
        }
    }

    pub fn default_replicas(self) -> u32 {
        match self {
            DatabaseKind::Couchdb => 3,
            DatabaseKind::Allegrograph => 2,
            DatabaseKind::Immudb => 1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UpgradePolicy {
    None,
    Patch,
    Minor,
    Major,
}

/// Which newer images of a database `stack upgrade` may roll out.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UpgradeRule {
    /// How far from the current version a candidate may be.
    pub policy: UpgradePolicy,
    /// A requirement every candidate version must also meet.
    pub range: Option<VersionRange>,
    /// A pattern every candidate tag must match as a whole.
    pub tags: Option<TagPattern>,
    /// Whether pre-release versions (`3.6.0-rc.1`) may be candidates.
    pub prerelease: bool,
}

impl UpgradeRule {
    /// The rule of a database whose `upgrade` is only a policy.
    pub fn policy(policy: UpgradePolicy) -> Self {
        UpgradeRule {
            policy,
            range: None,
            tags: None,
            prerelease: false,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Database {
    pub kind: DatabaseKind,
    pub name: String,
    pub image: ImageRef,
    /// CouchDB: cluster members; AllegroGraph: copies besides the
    /// controlling instance; immudb: read replicas.
    pub replicas: u32,
    pub storage: ByteSize,
    /// The StorageClass of the members' volumes; `None`: the cluster's default.
    pub storage_class: Option<String>,
    pub upgrade: UpgradeRule,
    /// AllegroGraph only.
    pub shm_size: Option<ByteSize>,
    /// AllegroGraph only.
    pub repository: Option<String>,
    /// CouchDB only.
    pub couchdb: Option<CouchdbSettings>,
    /// immudb only: the replicas that must hold a transaction before the
    /// primary commits it (synchronous replication); `None`: asynchronous.
    pub sync_acks: Option<u32>,
    /// AllegroGraph only: the Secret (key `license`) with the license;
    /// `None`: the free edition's limit of 5 million triples.
    pub license_secret: Option<String>,
}

/// What a CouchDB cluster holds and how it spreads it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CouchdbSettings {
    /// `q`: shard ranges of a database made without its own.
    pub shards: u32,
    /// `n` as the stack gives it: copies of each shard range of every
    /// database not declared with its own (system databases and those
    /// clients make). Without it databases keep the copies they have, and
    /// new ones get CouchDB's 3 (at most one a member).
    pub copies: Option<u32>,
    /// Give new members shard copies when the cluster grows.
    pub rebalance: bool,
    pub databases: Vec<CouchDatabase>,
    pub replications: Vec<Replication>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CouchDatabase {
    pub name: String,
    pub shards: u32,
    /// Its own `n`, else the cluster's.
    pub copies: Option<u32>,
    pub partitioned: bool,
}

/// A continuous replication of one database of the cluster.
#[derive(Debug, Clone, Serialize)]
pub struct Replication {
    pub name: String,
    pub source: String,
    pub target: ReplicationTarget,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ReplicationTarget {
    /// A database of a CouchDB cluster of the same stack.
    Cluster { cluster: String, database: String },
    /// A database anywhere; `credentials` names a Secret with `username` and `password`.
    Url {
        url: String,
        credentials: Option<String>,
    },
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum TlsSource {
    StackCa,
    Secret(String),
    Issuer(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum TcpExposure {
    NodePort,
    EntryPoint,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Ingress {
    pub domain: String,
    pub tls: TlsSource,
    pub class_name: Option<String>,
    pub tcp: TcpExposure,
    /// Services of the user's manifests to expose (databases bring their own).
    pub endpoints: Vec<Endpoint>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Http,
    Tcp,
}

/// A service port reachable from outside the cluster: HTTP through the
/// ingress at `name.domain`, TCP as the stack's `tcp` setting says.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    pub name: String,
    pub service: String,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Monitoring {
    pub service_monitors: bool,
    pub dashboards: bool,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Upgrades {
    /// Five-field cron; `None`: upgrades run only when `stack upgrade` is run.
    pub schedule: Option<String>,
    /// How long after a scheduled time an upgrade may still start.
    pub window: Duration,
    pub health_timeout: Duration,
    pub rollback: bool,
    /// Registries besides loopback ones that may be reached over plain
    /// HTTP (`host` or `host:port`).
    pub insecure_registries: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Timeouts {
    /// How long an instance or VM may take to reach `running`.
    pub running: Duration,
    /// How long deleting an instance or VM may take.
    pub delete: Duration,
    /// How long a VM may take from start to SSH and cloud-init done.
    pub ready: Duration,
    /// How long a stage's Kubernetes objects may take to become ready, or to be gone.
    pub healthy: Duration,
}

impl Stack {
    /// The environment of run `id`: the stack renamed `NAME-ID`, its own
    /// namespace (`NAMESPACE-ID` when one was written), so runs of one
    /// stack at the same time never share a thing.
    pub fn for_run(&self, id: &str) -> Stack {
        let mut run = self.clone();
        run.name = format!("{}-{id}", self.name);
        if let Some(kubernetes) = &mut run.kubernetes {
            kubernetes.namespace = if kubernetes.namespace == self.name {
                run.name.clone()
            } else {
                format!("{}-{id}", kubernetes.namespace)
            };
        }
        run.run = Some(RunMarks {
            id: id.to_string(),
            of: self.name.clone(),
        });
        run
    }

    /// The folder holding this stack's state, key and lock: `.stack` next to the file.
    pub fn state_dir(&self) -> PathBuf {
        self.file
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default()
            .join(".stack")
    }

    /// `ec2`, `kvm`, or `kubernetes` for a stack that deploys to an
    /// existing cluster and makes no machines.
    pub fn provider_name(&self) -> &'static str {
        match self.provider {
            Some(Provider::Ec2(_)) if !self.nodes.is_empty() => "ec2",
            Some(Provider::Kvm(_)) if !self.nodes.is_empty() => "kvm",
            _ => "kubernetes",
        }
    }

    /// Diagnostics about this stack's file.
    pub fn diagnostics(&self) -> crate::diag::Diagnostics {
        crate::diag::Diagnostics::new(&self.file)
    }
}
