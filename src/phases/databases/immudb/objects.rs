//! The Kubernetes objects of an immudb primary with read replicas, built
//! from the stack alone (a pure builder over `manifests/immudb.yaml.hbs`),
//! the names they give its pods and Services, and its generated secrets.

use crate::phases::databases::pods::RollingSet;
use std::collections::BTreeMap;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::model::Database;
use crate::phases::databases::random::{random_text, RandomError, ALNUM};
use crate::phases::kube::kinds::Stage;
use crate::phases::kube::manifest::{ManifestError, Object, Renderer};

/// immudb's superuser (its name is fixed; its password is ours).
pub const SUPERUSER: &str = "immudb";
/// The user the replicas log in to the primary as. immudb user names are
/// letters, digits and underscores.
pub const REPLICATOR: &str = "stack_replicator";
/// The web server (the REST gateway) and the metrics server.
pub const HTTP_PORT: u16 = 8080;
pub const METRICS_PORT: u16 = 9497;

/// Where a cluster lives and what its pods and Services are called.
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

    /// The replicas' StatefulSet, then the primary's, as `stack upgrade`
    /// rolls them.
    pub fn rolling_sets(&self, replicas: u32) -> Vec<RollingSet> {
        let set = |role: &str, replicas| RollingSet {
            statefulset: format!("{}-{role}", self.cluster),
            container: "immudb".into(),
            replicas,
        };
        vec![set("replica", replicas), set("primary", 1)]
    }

    pub fn primary(&self) -> String {
        format!("{}-primary-0", self.cluster)
    }

    pub fn replica(&self, ordinal: u32) -> String {
        format!("{}-replica-{ordinal}", self.cluster)
    }

    pub fn admin_secret(&self) -> String {
        format!("{}-admin", self.cluster)
    }

    pub fn replication_secret(&self) -> String {
        format!("{}-replication", self.cluster)
    }

    /// Every pod of the cluster.
    pub fn selector(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("app.kubernetes.io/name".to_string(), "immudb".to_string()),
            (
                "app.kubernetes.io/instance".to_string(),
                self.cluster.clone(),
            ),
        ])
    }

    /// The pods of one role (`primary`, `replica`).
    pub fn role_selector(&self, role: &str) -> BTreeMap<String, String> {
        let mut labels = self.selector();
        labels.insert("app.kubernetes.io/component".into(), role.into());
        labels
    }

    /// The labels of the headless Service (what the ServiceMonitor selects).
    pub fn peer_labels(&self) -> BTreeMap<String, String> {
        self.role_selector("peers")
    }

    /// Inside the cluster: the write and the read endpoints (gRPC).
    pub fn endpoints(&self) -> (String, String) {
        let host = |service: &str| {
            format!(
                "{}-{service}.{}.svc.cluster.local:3322",
                self.cluster, self.namespace
            )
        };
        (host("write"), host("read"))
    }
}

/// The generated secrets of one cluster: the superuser's password (set at
/// the primary's first start) and the replication user's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Credentials {
    pub username: String,
    pub password: String,
    pub replicator: String,
    pub replicator_password: String,
}

/// A password immudb's strength rule takes (8 to 32 characters, an
/// uppercase letter, a digit and a symbol), even where the server no longer
/// checks it: 29 random letters and digits, then one of each class.
fn password(cluster: &str) -> Result<String, RandomError> {
    let what = format!("immudb cluster {cluster}");
    Ok(format!(
        "{}{}{}.",
        random_text(ALNUM, 29, &what)?,
        random_text(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", 1, &what)?,
        random_text(b"0123456789", 1, &what)?
    ))
}

impl Credentials {
    pub fn generate(cluster: &str) -> Result<Credentials, RandomError> {
        Ok(Credentials {
            username: SUPERUSER.into(),
            password: password(cluster)?,
            replicator: REPLICATOR.into(),
            replicator_password: password(cluster)?,
        })
    }

    /// The secrets as the cluster's Secrets hold them, each Secret on its
    /// own (the superuser's password lives on the primary's volume from its
    /// first start, so it is never made anew while its Secret is there);
    /// what is missing is generated.
    pub fn from_cluster(
        cluster: &str,
        admin: Option<&Value>,
        replication: Option<&Value>,
    ) -> Result<Credentials, RandomError> {
        let field = |secret: Option<&Value>, key: &str| -> Option<String> {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(secret?["data"][key].as_str()?)
                .ok()?;
            String::from_utf8(bytes).ok().filter(|s| !s.is_empty())
        };
        let pair =
            |secret: Option<&Value>| Some((field(secret, "username")?, field(secret, "password")?));
        let (username, superuser_password) = match pair(admin) {
            Some(found) => found,
            None => (SUPERUSER.to_string(), password(cluster)?),
        };
        let (replicator, replicator_password) = match pair(replication) {
            Some(found) => found,
            None => (REPLICATOR.to_string(), password(cluster)?),
        };
        Ok(Credentials {
            username,
            password: superuser_password,
            replicator,
            replicator_password,
        })
    }
}

#[derive(Serialize)]
struct Encoded {
    username: String,
    password: String,
    replicator: String,
    replicator_password: String,
}

#[derive(Serialize)]
struct Set {
    name: String,
    replicas: u32,
    replica: bool,
    selector: String,
}

#[derive(Serialize)]
struct ReplicaService {
    name: String,
    selector: String,
}

#[derive(Serialize)]
struct Args<'a> {
    name: &'a str,
    namespace: &'a str,
    image: String,
    storage: String,
    storage_class: Option<&'a str>,
    sync_acks: Option<u32>,
    credentials: Option<Encoded>,
    /// JSON objects (valid YAML flow).
    labels: String,
    peer_labels: String,
    selector: String,
    primary_selector: String,
    replica_selector: String,
    sets: Vec<Set>,
    replica_services: Vec<ReplicaService>,
}

/// The cluster's objects. Without `credentials` (a stack being checked or
/// destroyed, never applied) the Secrets have no data.
pub fn objects(
    renderer: &Renderer,
    db: &Database,
    namespace: &str,
    credentials: Option<&Credentials>,
) -> Result<Vec<Object>, ManifestError> {
    let names = Names::new(&db.name, namespace);
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let flow = |labels: &BTreeMap<String, String>| json!(labels).to_string();
    let primary = names.role_selector("primary");
    let replica = names.role_selector("replica");
    let args = Args {
        name: &db.name,
        namespace,
        image: db.image.to_string(),
        storage: crate::phases::kube::manifest::quantity(db.storage),
        storage_class: db.storage_class.as_deref(),
        sync_acks: db.sync_acks,
        credentials: credentials.map(|c| Encoded {
            username: b64(&c.username),
            password: b64(&c.password),
            replicator: b64(&c.replicator),
            replicator_password: b64(&c.replicator_password),
        }),
        labels: flow(&names.selector()),
        peer_labels: flow(&names.peer_labels()),
        selector: flow(&names.selector()),
        primary_selector: flow(&primary),
        replica_selector: flow(&replica),
        sets: vec![
            Set {
                name: format!("{}-primary", db.name),
                replicas: 1,
                replica: false,
                selector: flow(&primary),
            },
            Set {
                name: format!("{}-replica", db.name),
                replicas: db.replicas,
                replica: true,
                selector: flow(&replica),
            },
        ],
        replica_services: (0..db.replicas)
            .map(|i| {
                let mut one = replica.clone();
                one.insert(
                    "statefulset.kubernetes.io/pod-name".into(),
                    names.replica(i),
                );
                ReplicaService {
                    name: format!("{}-read-{i}", db.name),
                    selector: flow(&one),
                }
            })
            .collect(),
    };
    renderer.objects("immudb", &args, Stage::Databases)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ByteSize, DatabaseKind, ImageRef, UpgradePolicy, UpgradeRule};

    fn db(replicas: u32, sync_acks: Option<u32>) -> Database {
        Database {
            kind: DatabaseKind::Immudb,
            name: "ledger".into(),
            image: ImageRef::parse("codenotary/immudb:1.11.0").unwrap(),
            replicas,
            storage: ByteSize::gib(5),
            storage_class: Some("microk8s-hostpath".into()),
            upgrade: UpgradeRule::policy(UpgradePolicy::Patch),
            shm_size: None,
            repository: None,
            couchdb: None,
            sync_acks,
            license_secret: None,
        }
    }

    /// Stand-in secrets, so the snapshots do not change with every run.
    fn credentials() -> Credentials {
        Credentials {
            username: SUPERUSER.into(),
            password: "stand-in-password".into(),
            replicator: REPLICATOR.into(),
            replicator_password: "stand-in-replicator".into(),
        }
    }

    /// The objects of a primary with 1 and with 3 replicas (synchronous
    /// with 2 acknowledgements), each of its Kubernetes type, pinned as rendered.
    #[test]
    fn objects_of_one_and_three_replicas_are_pinned_and_typed() {
        for (replicas, acks) in [(1, None), (3, Some(2))] {
            let objects = objects(
                &Renderer::new(),
                &db(replicas, acks),
                "shop",
                Some(&credentials()),
            )
            .unwrap();
            for object in &objects {
                assert_eq!(object.stage, Stage::Databases);
                crate::phases::kube::schema::check(object.kind, &object.body)
                    .unwrap_or_else(|e| panic!("{} {}: {e}", object.kind.kind, object.name));
            }
            let bodies: Vec<&Value> = objects.iter().map(|o| &o.body).collect();
            insta::assert_json_snapshot!(format!("immudb-{replicas}"), bodies);
        }
    }

    #[test]
    fn without_replicas_the_replica_set_is_empty_and_typed() {
        let objects = objects(&Renderer::new(), &db(0, None), "shop", None).unwrap();
        let set = objects
            .iter()
            .find(|o| o.name == "ledger-replica")
            .expect("the replica StatefulSet");
        assert_eq!(set.body["spec"]["replicas"], 0);
        for secret in objects.iter().filter(|o| o.kind.kind == "Secret") {
            assert!(secret.body.get("data").is_none(), "{}", secret.body);
        }
    }

    #[test]
    fn generated_passwords_follow_immudbs_strength_rule() {
        let c = Credentials::generate("ledger").unwrap();
        for p in [&c.password, &c.replicator_password] {
            assert!((8..=32).contains(&p.len()), "{p}");
            assert!(p.chars().any(|c| c.is_ascii_uppercase()), "{p}");
            assert!(p.chars().any(|c| c.is_ascii_digit()), "{p}");
            assert!(p.chars().any(|c| c.is_ascii_punctuation()), "{p}");
        }
        assert_ne!(c.password, c.replicator_password);
        assert!(c
            .replicator
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_'));
    }

    #[test]
    fn the_read_service_selects_replicas_only() {
        let objects = objects(&Renderer::new(), &db(2, None), "shop", None).unwrap();
        let service = |name: &str| {
            objects
                .iter()
                .find(|o| o.kind.kind == "Service" && o.name == name)
                .unwrap_or_else(|| panic!("no Service {name}"))
                .body["spec"]["selector"]
                .clone()
        };
        assert_eq!(
            service("ledger-read")["app.kubernetes.io/component"],
            "replica"
        );
        assert_eq!(
            service("ledger-write")["app.kubernetes.io/component"],
            "primary"
        );
        assert_eq!(
            service("ledger-read-1")["statefulset.kubernetes.io/pod-name"],
            "ledger-replica-1"
        );
        assert!(objects.iter().all(|o| o.name != "ledger-read-2"));
    }
}
