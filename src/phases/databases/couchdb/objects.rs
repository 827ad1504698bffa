//! The Kubernetes objects of a CouchDB cluster, built from the stack alone
//! (a pure builder over `manifests/couchdb.yaml.hbs`), and the names they
//! give its members: pod `NAME-i`, node `couchdb@NAME-i.NAME-headless.NS.svc.cluster.local`.

use crate::phases::databases::pods::RollingSet;
use std::collections::BTreeMap;

use base64::Engine as _;
use serde::Serialize;
use serde_json::json;

use super::credentials::Credentials;
use crate::model::Database;
use crate::phases::kube::kinds::Stage;
use crate::phases::kube::manifest::{ManifestError, Object, Renderer};

/// The ini file of the cluster's ConfigMap.
pub const CONFIG_KEY: &str = "10-stack.ini";
/// The port CouchDB serves HTTP on.
pub const PORT: u16 = 5984;
/// CouchDB's own default of copies per shard range.
const DEFAULT_COPIES: u32 = 3;

/// Where a cluster lives and what its members are called.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub cluster: String,
    pub namespace: String,
}

impl Names {
    pub fn new(cluster: &str, namespace: &str) -> Names {
        Names {
            cluster: cluster.to_string(),
            namespace: namespace.to_string(),
        }
    }

    /// The StatefulSet of the members, as `stack upgrade` rolls it.
    pub fn rolling_sets(&self, replicas: u32) -> Vec<RollingSet> {
        vec![RollingSet {
            statefulset: self.cluster.clone(),
            container: "couchdb".into(),
            replicas,
        }]
    }

    pub fn pod(&self, ordinal: u32) -> String {
        format!("{}-{ordinal}", self.cluster)
    }

    pub fn headless(&self) -> String {
        format!("{}-headless", self.cluster)
    }

    /// The Erlang node name of member `ordinal`.
    pub fn node(&self, ordinal: u32) -> String {
        format!(
            "couchdb@{}.{}.{}.svc.cluster.local",
            self.pod(ordinal),
            self.headless(),
            self.namespace
        )
    }

    /// The pod a node name belongs to, when it is one of this cluster's.
    pub fn pod_of(&self, node: &str) -> Option<String> {
        let host = node.strip_prefix("couchdb@")?;
        let suffix = format!(".{}.{}.svc.cluster.local", self.headless(), self.namespace);
        let pod = host.strip_suffix(&suffix)?;
        let ordinal = pod.strip_prefix(&format!("{}-", self.cluster))?;
        ordinal.parse::<u32>().ok().map(|_| pod.to_string())
    }

    /// The members' nodes for `replicas` members.
    pub fn nodes(&self, replicas: u32) -> Vec<String> {
        (0..replicas).map(|i| self.node(i)).collect()
    }

    /// The Secret holding the admin's name and password.
    pub fn admin_secret(&self) -> String {
        format!("{}-admin", self.cluster)
    }

    pub fn internal_secret(&self) -> String {
        format!("{}-internal", self.cluster)
    }

    pub fn config_map(&self) -> String {
        format!("{}-config", self.cluster)
    }

    /// The URL of a database through the client Service, inside the cluster.
    pub fn service_url(&self, database: &str) -> String {
        format!(
            "http://{}.{}.svc.cluster.local:{PORT}/{}",
            self.cluster,
            self.namespace,
            encode_database(database)
        )
    }

    /// The labels that select the cluster's pods.
    pub fn selector(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("app.kubernetes.io/name".to_string(), "couchdb".to_string()),
            (
                "app.kubernetes.io/instance".to_string(),
                self.cluster.clone(),
            ),
        ])
    }

    /// The labels of the client Service (what the ServiceMonitor selects).
    pub fn client_labels(&self) -> BTreeMap<String, String> {
        let mut labels = self.selector();
        labels.insert("app.kubernetes.io/component".into(), "client".into());
        labels
    }
}

/// The server uuid in the cluster's ConfigMap as the cluster keeps it.
pub fn uuid_of(config: &serde_json::Value) -> Option<String> {
    config["data"][CONFIG_KEY]
        .as_str()?
        .lines()
        .find_map(|l| l.trim().strip_prefix("uuid = "))
        .map(|u| u.trim().to_string())
        .filter(|u| !u.is_empty())
}

/// A database name in a URL path: `/` is part of CouchDB names and is escaped.
pub fn encode_database(name: &str) -> String {
    name.replace('/', "%2F")
}

/// Copies per range of databases made without their own `n`: the stack's
/// `n`, else CouchDB's 3, at most one per member.
pub fn default_copies(db: &Database) -> u32 {
    db.couchdb
        .as_ref()
        .and_then(|c| c.copies)
        .unwrap_or(DEFAULT_COPIES)
        .min(db.replicas.max(1))
}

#[derive(Serialize)]
struct Encoded {
    username: String,
    password: String,
    erlang_cookie: String,
    couchdb_secret: String,
}

#[derive(Serialize)]
struct Args<'a> {
    name: &'a str,
    namespace: &'a str,
    image: String,
    replicas: u32,
    storage: String,
    storage_class: Option<&'a str>,
    shards: u32,
    copies: u32,
    seedlist: String,
    uuid: &'a str,
    credentials: Option<Encoded>,
    /// JSON objects (valid YAML flow).
    labels: String,
    peer_labels: String,
    client_labels: String,
    selector: String,
}

/// The cluster's objects. Without `credentials` (a stack being checked or
/// destroyed, never applied) the Secrets have no data and the uuid is empty.
pub fn objects(
    renderer: &Renderer,
    db: &Database,
    namespace: &str,
    credentials: Option<&Credentials>,
) -> Result<Vec<Object>, ManifestError> {
    let names = Names::new(&db.name, namespace);
    let settings = db.couchdb.as_ref();
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let selector = names.selector();
    let mut peers = selector.clone();
    peers.insert("app.kubernetes.io/component".into(), "peers".into());
    let args = Args {
        name: &db.name,
        namespace,
        image: db.image.to_string(),
        replicas: db.replicas,
        storage: crate::phases::kube::manifest::quantity(db.storage),
        storage_class: db.storage_class.as_deref(),
        shards: settings.map_or(2, |c| c.shards),
        copies: default_copies(db),
        seedlist: names.nodes(db.replicas).join(","),
        uuid: credentials.map_or("", |c| c.uuid.as_str()),
        credentials: credentials.map(|c| Encoded {
            username: b64(&c.username),
            password: b64(&c.password),
            erlang_cookie: b64(&c.erlang_cookie),
            couchdb_secret: b64(&c.couchdb_secret),
        }),
        labels: json!(selector).to_string(),
        peer_labels: json!(peers).to_string(),
        client_labels: json!(names.client_labels()).to_string(),
        selector: json!(selector).to_string(),
    };
    renderer.objects("couchdb", &args, Stage::Databases)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{
        ByteSize, CouchdbSettings, DatabaseKind, ImageRef, UpgradePolicy, UpgradeRule,
    };

    fn names() -> Names {
        Names::new("docs", "demo")
    }

    #[test]
    fn node_names_go_through_the_headless_service_and_back_to_their_pod() {
        let n = names();
        assert_eq!(
            n.node(2),
            "couchdb@docs-2.docs-headless.demo.svc.cluster.local"
        );
        assert_eq!(n.pod_of(&n.node(2)).as_deref(), Some("docs-2"));
        assert_eq!(
            n.pod_of("couchdb@docs-2.other-headless.demo.svc.cluster.local"),
            None
        );
        assert_eq!(
            n.pod_of("couchdb@docs-x.docs-headless.demo.svc.cluster.local"),
            None
        );
    }

    #[test]
    fn quantities_are_written_the_way_kubernetes_writes_them() {
        use crate::phases::kube::manifest::quantity;
        assert_eq!(quantity(ByteSize::gib(10)), "10Gi");
        assert_eq!(quantity(ByteSize(512 << 20)), "512Mi");
        assert_eq!(quantity(ByteSize(1000)), "1000");
    }

    fn cluster(replicas: u32) -> Database {
        Database {
            kind: DatabaseKind::Couchdb,
            name: "docs".into(),
            image: ImageRef::parse("couchdb:3.5.1").unwrap(),
            replicas,
            storage: ByteSize::gib(10),
            storage_class: (replicas > 1).then(|| "microk8s-hostpath".to_string()),
            upgrade: UpgradeRule::policy(UpgradePolicy::Patch),
            shm_size: None,
            repository: None,
            couchdb: Some(CouchdbSettings {
                shards: 2,
                copies: None,
                rebalance: true,
                databases: Vec::new(),
                replications: Vec::new(),
            }),
            sync_acks: None,
            license_secret: None,
        }
    }

    /// Stand-in secrets, so the snapshots do not change with every run.
    fn credentials() -> Credentials {
        Credentials {
            username: "admin".into(),
            password: "stand-in-password".into(),
            erlang_cookie: "stand-in-cookie".into(),
            couchdb_secret: "stand-in-secret".into(),
            uuid: "0123456789abcdef0123456789abcdef".into(),
        }
    }

    /// The objects of a 1- and a 3-member cluster, each of its Kubernetes
    /// type, pinned as rendered.
    #[test]
    fn objects_of_one_and_three_members_are_pinned_and_typed() {
        for replicas in [1, 3] {
            let objects = objects(
                &Renderer::new(),
                &cluster(replicas),
                "demo",
                Some(&credentials()),
            )
            .unwrap();
            let kinds: Vec<&str> = objects.iter().map(|o| o.kind.kind).collect();
            assert_eq!(
                kinds,
                [
                    "Secret",
                    "Secret",
                    "ConfigMap",
                    "Service",
                    "Service",
                    "PodDisruptionBudget",
                    "StatefulSet"
                ]
            );
            for object in &objects {
                assert_eq!(object.stage, Stage::Databases);
                crate::phases::kube::schema::check(object.kind, &object.body)
                    .unwrap_or_else(|e| panic!("{} {}: {e}", object.kind.kind, object.name));
            }
            let bodies: Vec<&serde_json::Value> = objects.iter().map(|o| &o.body).collect();
            insta::assert_json_snapshot!(format!("couchdb-{replicas}"), bodies);
        }
    }

    #[test]
    fn without_credentials_the_secrets_carry_no_data() {
        let objects = objects(&Renderer::new(), &cluster(3), "demo", None).unwrap();
        for secret in objects.iter().filter(|o| o.kind.kind == "Secret") {
            assert!(secret.body.get("data").is_none(), "{}", secret.body);
        }
    }
}
