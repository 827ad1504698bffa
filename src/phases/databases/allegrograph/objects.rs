//! The Kubernetes objects of an AllegroGraph multi-master replication
//! cluster, built from the stack alone (a pure builder over
//! `manifests/allegrograph.yaml.hbs` and the in-pod
//! `manifests/allegrograph-member.sh`), the names they give its instances,
//! and its generated secrets.

use crate::phases::databases::pods::RollingSet;
use std::collections::BTreeMap;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::model::Database;
use crate::phases::databases::random::{random_text, RandomError, ALNUM};
use crate::phases::kube::kinds::Stage;
use crate::phases::kube::manifest::{ManifestError, Object, Renderer};

/// The port AllegroGraph serves HTTP on.
pub const PORT: u16 = 10035;
/// The super user stack sets up (the image's own default name).
pub const SUPER_USER: &str = "admin";
/// The sidecar that runs the member script: the franzinc/agraph image has
/// bash but no curl.
pub const MEMBER_IMAGE: &str = "curlimages/curl:8.11.1";
/// The in-pod part: joins a copy under its pod name, takes it out when the pod goes.
pub const MEMBER_SCRIPT: &str = include_str!("../../../../manifests/allegrograph-member.sh");

/// Where a cluster lives and what its instances are called.
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

    /// The copies' StatefulSet, then the controlling instance's, as `stack
    /// upgrade` rolls them (the copies' sidecar keeps its image).
    pub fn rolling_sets(&self, copies: u32) -> Vec<RollingSet> {
        let set = |role: &str, replicas| RollingSet {
            statefulset: format!("{}-{role}", self.cluster),
            container: "agraph".into(),
            replicas,
        };
        vec![set("copy", copies), set("controlling", 1)]
    }

    /// The controlling instance's pod (and instance name).
    pub fn controlling(&self) -> String {
        format!("{}-controlling-0", self.cluster)
    }

    /// Copy `ordinal`'s pod (and instance name).
    pub fn copy(&self, ordinal: u32) -> String {
        format!("{}-copy-{ordinal}", self.cluster)
    }

    /// The ordinal of a copy's pod name, when it is one of this cluster's.
    pub fn copy_ordinal(&self, pod: &str) -> Option<u32> {
        pod.strip_prefix(&format!("{}-copy-", self.cluster))?
            .parse()
            .ok()
    }

    pub fn controlling_host(&self) -> String {
        format!(
            "{}.{}-controlling.{}.svc.cluster.local",
            self.controlling(),
            self.cluster,
            self.namespace
        )
    }

    pub fn admin_secret(&self) -> String {
        format!("{}-admin", self.cluster)
    }

    pub fn selector(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (
                "app.kubernetes.io/name".to_string(),
                "allegrograph".to_string(),
            ),
            (
                "app.kubernetes.io/instance".to_string(),
                self.cluster.clone(),
            ),
        ])
    }

    pub fn role_selector(&self, role: &str) -> BTreeMap<String, String> {
        let mut labels = self.selector();
        labels.insert("app.kubernetes.io/component".into(), role.into());
        labels
    }

    /// The labels of the client Service (what the ServiceMonitor selects).
    pub fn client_labels(&self) -> BTreeMap<String, String> {
        self.role_selector("client")
    }

    /// The URL of the repository through the client Service, inside the cluster.
    pub fn service_url(&self, repository: &str) -> String {
        format!(
            "http://{}.{}.svc.cluster.local:{PORT}/repositories/{repository}",
            self.cluster, self.namespace
        )
    }
}

/// The generated super user of one cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl Credentials {
    pub fn generate(cluster: &str) -> Result<Credentials, RandomError> {
        Ok(Credentials {
            username: SUPER_USER.into(),
            password: random_text(ALNUM, 32, &format!("AllegroGraph cluster {cluster}"))?,
        })
    }

    /// The credentials as the cluster's Secret holds them.
    pub fn from_cluster(admin: &Value) -> Option<Credentials> {
        let field = |key: &str| -> Option<String> {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(admin["data"][key].as_str()?)
                .ok()?;
            String::from_utf8(bytes).ok().filter(|s| !s.is_empty())
        };
        Some(Credentials {
            username: field("username")?,
            password: field("password")?,
        })
    }
}

#[derive(Serialize)]
struct Encoded {
    username: String,
    password: String,
}

#[derive(Serialize)]
struct Set {
    name: String,
    replicas: u32,
    controlling: bool,
    selector: String,
}

#[derive(Serialize)]
struct Args<'a> {
    name: &'a str,
    namespace: &'a str,
    image: String,
    member_image: &'static str,
    /// A JSON string (valid YAML flow).
    member_script: String,
    repository: &'a str,
    controlling_host: String,
    storage: String,
    storage_class: Option<&'a str>,
    shm_size: String,
    license_secret: Option<&'a str>,
    credentials: Option<Encoded>,
    labels: String,
    client_labels: String,
    selector: String,
    controlling_selector: String,
    copy_selector: String,
    sets: Vec<Set>,
}

/// The cluster's objects. Without `credentials` (a stack being checked or
/// destroyed, never applied) the Secret has no data.
pub fn objects(
    renderer: &Renderer,
    db: &Database,
    namespace: &str,
    credentials: Option<&Credentials>,
) -> Result<Vec<Object>, ManifestError> {
    let names = Names::new(&db.name, namespace);
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let flow = |labels: &BTreeMap<String, String>| json!(labels).to_string();
    let controlling = names.role_selector("controlling");
    let copy = names.role_selector("copy");
    let quantity = crate::phases::kube::manifest::quantity;
    let args = Args {
        name: &db.name,
        namespace,
        image: db.image.to_string(),
        member_image: MEMBER_IMAGE,
        member_script: json!(MEMBER_SCRIPT).to_string(),
        repository: db.repository.as_deref().unwrap_or("main"),
        controlling_host: names.controlling_host(),
        storage: quantity(db.storage),
        storage_class: db.storage_class.as_deref(),
        shm_size: quantity(db.shm_size.unwrap_or(crate::model::ByteSize::gib(1))),
        license_secret: db.license_secret.as_deref(),
        credentials: credentials.map(|c| Encoded {
            username: b64(&c.username),
            password: b64(&c.password),
        }),
        labels: flow(&names.selector()),
        client_labels: flow(&names.client_labels()),
        selector: flow(&names.selector()),
        controlling_selector: flow(&controlling),
        copy_selector: flow(&copy),
        sets: vec![
            Set {
                name: format!("{}-controlling", db.name),
                replicas: 1,
                controlling: true,
                selector: flow(&controlling),
            },
            Set {
                name: format!("{}-copy", db.name),
                replicas: db.replicas,
                controlling: false,
                selector: flow(&copy),
            },
        ],
    };
    renderer.objects("allegrograph", &args, Stage::Databases)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ByteSize, DatabaseKind, ImageRef, UpgradePolicy, UpgradeRule};

    fn db(replicas: u32, license: Option<&str>) -> Database {
        Database {
            kind: DatabaseKind::Allegrograph,
            name: "graph".into(),
            image: ImageRef::parse("franzinc/agraph:v8.4.0").unwrap(),
            replicas,
            storage: ByteSize::gib(5),
            storage_class: None,
            upgrade: UpgradeRule::policy(UpgradePolicy::Patch),
            shm_size: Some(ByteSize::gib(2)),
            repository: Some("kg".into()),
            couchdb: None,
            sync_acks: None,
            license_secret: license.map(str::to_string),
        }
    }

    /// Stand-in secrets, so the snapshots do not change with every run.
    fn credentials() -> Credentials {
        Credentials {
            username: SUPER_USER.into(),
            password: "stand-in-password".into(),
        }
    }

    /// A cluster with 1 and with 3 copies (one licensed), each object of
    /// its Kubernetes type, pinned as rendered.
    #[test]
    fn objects_of_one_and_three_copies_are_pinned_and_typed() {
        for (replicas, license) in [(1, None), (3, Some("agraph-license"))] {
            let objects = objects(
                &Renderer::new(),
                &db(replicas, license),
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
            insta::assert_json_snapshot!(format!("allegrograph-{replicas}"), bodies);
        }
    }

    #[test]
    fn the_member_script_goes_into_its_config_map_as_written() {
        let objects = objects(&Renderer::new(), &db(2, None), "shop", None).unwrap();
        let script = objects
            .iter()
            .find(|o| o.kind.kind == "ConfigMap")
            .unwrap()
            .body["data"]["member.sh"]
            .clone();
        assert_eq!(script, MEMBER_SCRIPT);
        for secret in objects.iter().filter(|o| o.kind.kind == "Secret") {
            assert!(secret.body.get("data").is_none(), "{}", secret.body);
        }
    }

    #[test]
    fn copies_keep_no_volume_and_the_controlling_instance_keeps_two() {
        let objects = objects(&Renderer::new(), &db(2, None), "shop", None).unwrap();
        let set = |name: &str| {
            &objects
                .iter()
                .find(|o| o.kind.kind == "StatefulSet" && o.name == name)
                .unwrap()
                .body
        };
        let claims = |name: &str| {
            set(name)["spec"]["volumeClaimTemplates"]
                .as_array()
                .map_or(0, Vec::len)
        };
        assert_eq!(claims("graph-controlling"), 2);
        assert_eq!(claims("graph-copy"), 0);
        assert_eq!(set("graph-copy")["spec"]["replicas"], 2);
        let shm = &set("graph-copy")["spec"]["template"]["spec"]["volumes"][0];
        assert_eq!(
            shm["emptyDir"],
            json!({"medium": "Memory", "sizeLimit": "2Gi"})
        );
    }
}
