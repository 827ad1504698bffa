//! The database phase: the stack's database clusters, after the workloads
//! and before the ingress. Each kind (CouchDB now) brings its Kubernetes
//! objects (a pure builder the Kubernetes layer renders and applies with
//! server-side apply), and the operations on its own HTTP API that make a
//! cluster of them: formation, membership, shard placement, databases and
//! replications, each a `Change` of the same plan, applied in order
//! (copies move off departing members before the StatefulSet shrinks; new
//! members get copies once they joined). Its gate waits until every
//! cluster is healthy by the database's own account.
//!
//! Every database pod is reached through the Kubernetes API server's proxy
//! with the kubeconfig's credentials.

pub mod allegrograph;
pub mod couchdb;
pub mod immudb;
pub mod pins;
pub mod pod_http;
pub mod pods;
pub mod random;

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine as _;
use serde_json::{json, Value};

use crate::engine::{
    Action, Change, ChangeInput, DatabaseStatus, FieldChange, FieldPath, Mode, Observed, Phase,
    PhaseError, PlanInput, PlanPart, Prepared, ReplicaStatus, ReplicationStatus, Resource,
    StageInput, StatusPart, StepRef,
};
use crate::future::BoxFuture;
use crate::model::{DatabaseKind, Stack};
use crate::phases::kube::manifest::{ManifestError, Object, Renderer};
use crate::phases::kube::{self, kinds, Cluster, Kube, KubeError};
use crate::state::{Record, State};
use allegrograph::Agraph;
use couchdb::api::Api;
use couchdb::credentials::Credentials;
use couchdb::{CouchError, Couchdb, Live};
use immudb::Immudb;
use random::RandomError;

/// The generated secrets of the stack's database clusters, by kind and
/// cluster name.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct DatabaseCredentials {
    #[serde(default)]
    pub couchdb: BTreeMap<String, Credentials>,
    #[serde(default)]
    pub immudb: BTreeMap<String, immudb::objects::Credentials>,
    #[serde(default)]
    pub allegrograph: BTreeMap<String, allegrograph::objects::Credentials>,
}

/// Change kinds of the phase's own resources.
const CREDENTIALS: &str = "couchdb:credentials";
const FORMATION: &str = "couchdb:cluster";
const MEMBERSHIP: &str = "couchdb:membership";
const PLACEMENT: &str = "couchdb:placement";
const DATABASE: &str = "couchdb:database";
const REPLICATION: &str = "couchdb:replication";
const IMMU_CREDENTIALS: &str = "immudb:credentials";
const REPLICATOR: &str = "immudb:replicator";
const AG_CREDENTIALS: &str = "allegrograph:credentials";
const AG_FORMATION: &str = "allegrograph:cluster";
const AG_MEMBERSHIP: &str = "allegrograph:membership";

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error(transparent)]
    Random(#[from] RandomError),
    #[error("the state's record of the secrets of {cluster} cannot be read")]
    Record {
        cluster: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Cluster(#[from] crate::phases::kube::ClusterError),
}

#[derive(Debug, thiserror::Error)]
pub enum DatabasesError {
    #[error(transparent)]
    Couch(#[from] CouchError),
    #[error(transparent)]
    Kube(#[from] KubeError),
    #[error("{0}")]
    Objects(PhaseError),
    #[error("CouchDB cluster {cluster}: the state has no record of its secrets (plan again)")]
    NoCredentials { cluster: String },
    #[error(transparent)]
    Immu(#[from] immudb::ImmuError),
    #[error("immudb cluster {cluster}: the state has no record of its secrets (plan again)")]
    NoImmuCredentials { cluster: String },
    #[error(transparent)]
    Agraph(#[from] allegrograph::AgraphError),
    #[error("AllegroGraph cluster {cluster}: the state has no record of its secrets (plan again)")]
    NoAgraphCredentials { cluster: String },
    #[error("{0} is not a change of the database phase")]
    Unknown(String),
    #[error("CouchDB cluster {cluster}: replication {replication} names Secret {secret}, which is not in namespace {namespace} with keys username and password")]
    MissingSecret {
        cluster: String,
        replication: String,
        secret: String,
        namespace: String,
    },
}

fn record_address(cluster: &str, what: &str) -> String {
    format!("couchdb.{cluster}.{what}")
}

fn immu_address(cluster: &str, what: &str) -> String {
    format!("immudb.{cluster}.{what}")
}

fn agraph_address(cluster: &str, what: &str) -> String {
    format!("allegrograph.{cluster}.{what}")
}

/// A record of generated secrets the state holds, when it holds one.
fn recorded<T: serde::de::DeserializeOwned>(
    state: &State,
    address: &str,
    cluster: String,
) -> Result<Option<T>, CredentialsError> {
    let Some(record) = state.get(address).filter(|r| r.id.is_some()) else {
        return Ok(None);
    };
    serde_json::from_value(record.attrs.clone())
        .map(Some)
        .map_err(|source| CredentialsError::Record { cluster, source })
}

/// The secrets of every database cluster: as the state recorded them, else
/// as the cluster's Secrets hold them (a machine without the state), else new.
async fn credentials(
    clusters: &Clusters,
    state: &State,
    cluster: Option<&Cluster>,
) -> Result<DatabaseCredentials, CredentialsError> {
    let secret = kinds::find("v1", "Secret").expect("Secret is a known kind");
    let mut immu = BTreeMap::new();
    for db in &clusters.immu {
        let name = &db.db.name;
        let address = immu_address(name, "credentials");
        if let Some(found) = recorded(state, &address, format!("immudb cluster {name}"))? {
            immu.insert(name.clone(), found);
            continue;
        }
        let namespace = Some(db.names.namespace.as_str());
        let credentials = match cluster {
            Some(cluster) => {
                let admin = cluster
                    .get(secret, namespace, &db.names.admin_secret())
                    .await?;
                let replication = cluster
                    .get(secret, namespace, &db.names.replication_secret())
                    .await?;
                immudb::objects::Credentials::from_cluster(
                    name,
                    admin.as_ref(),
                    replication.as_ref(),
                )?
            }
            None => immudb::objects::Credentials::generate(name)?,
        };
        immu.insert(name.clone(), credentials);
    }
    let mut agraph = BTreeMap::new();
    for db in &clusters.agraph {
        let name = &db.db.name;
        let address = agraph_address(name, "credentials");
        if let Some(found) = recorded(state, &address, format!("AllegroGraph cluster {name}"))? {
            agraph.insert(name.clone(), found);
            continue;
        }
        let mut found = None;
        if let Some(cluster) = cluster {
            let namespace = Some(db.names.namespace.as_str());
            if let Some(admin) = cluster
                .get(secret, namespace, &db.names.admin_secret())
                .await?
            {
                found = allegrograph::objects::Credentials::from_cluster(&admin);
            }
        }
        let credentials = match found {
            Some(found) => found,
            None => allegrograph::objects::Credentials::generate(name)?,
        };
        agraph.insert(name.clone(), credentials);
    }
    Ok(DatabaseCredentials {
        couchdb: couch_credentials(&clusters.couch, state, cluster).await?,
        immudb: immu,
        allegrograph: agraph,
    })
}

async fn couch_credentials(
    clusters: &[Couchdb],
    state: &State,
    cluster: Option<&Cluster>,
) -> Result<BTreeMap<String, Credentials>, CredentialsError> {
    let mut out = BTreeMap::new();
    for couch in clusters {
        let name = &couch.db.name;
        let address = record_address(name, "credentials");
        if let Some(found) = recorded(state, &address, format!("CouchDB cluster {name}"))? {
            out.insert(name.clone(), found);
            continue;
        }
        let names = &couch.names;
        let namespace = Some(names.namespace.as_str());
        let mut found = None;
        if let Some(cluster) = cluster {
            let secret = kinds::find("v1", "Secret").expect("Secret is a known kind");
            let config = kinds::find("v1", "ConfigMap").expect("ConfigMap is a known kind");
            let admin = cluster
                .get(secret, namespace, &names.admin_secret())
                .await?;
            let internal = cluster
                .get(secret, namespace, &names.internal_secret())
                .await?;
            let ini = cluster.get(config, namespace, &names.config_map()).await?;
            if let (Some(admin), Some(internal), Some(uuid)) = (
                admin,
                internal,
                ini.as_ref().and_then(couchdb::objects::uuid_of),
            ) {
                found = Credentials::from_cluster(&admin, &internal, uuid);
            }
        }
        let credentials = match found {
            Some(found) => found,
            None => Credentials::generate(name)?,
        };
        out.insert(name.clone(), credentials);
    }
    Ok(out)
}

/// The database clusters of a stack, by kind.
struct Clusters {
    couch: Vec<Couchdb>,
    immu: Vec<Immudb>,
    agraph: Vec<Agraph>,
}

impl Clusters {
    /// The clusters of a stack with a `kubernetes` section.
    fn of(stack: &Stack) -> Clusters {
        let Some(kubernetes) = &stack.kubernetes else {
            return Clusters {
                couch: Vec::new(),
                immu: Vec::new(),
                agraph: Vec::new(),
            };
        };
        let ns = &kubernetes.namespace;
        let healthy = stack.timeouts.healthy;
        let of = |kind| stack.databases.iter().filter(move |d| d.kind == kind);
        Clusters {
            couch: of(DatabaseKind::Couchdb)
                .map(|d| Couchdb::new(d, ns, &stack.name, healthy))
                .collect(),
            immu: of(DatabaseKind::Immudb)
                .map(|d| Immudb::new(d, ns, healthy))
                .collect(),
            agraph: of(DatabaseKind::Allegrograph)
                .map(|d| Agraph::new(d, ns, healthy))
                .collect(),
        }
    }

    fn is_empty(&self) -> bool {
        self.couch.is_empty() && self.immu.is_empty() && self.agraph.is_empty()
    }
}

/// The database clusters' Kubernetes objects, as the Kubernetes layer
/// renders, applies and diffs them.
struct Objects {
    clusters: Clusters,
}

impl kube::Contribution for Objects {
    fn secrets<'a>(
        &'a self,
        state: &'a State,
        cluster: Option<&'a Cluster>,
    ) -> BoxFuture<'a, Result<Value, PhaseError>> {
        Box::pin(async move {
            let credentials = credentials(&self.clusters, state, cluster).await?;
            Ok(serde_json::to_value(credentials).expect("credentials serialise"))
        })
    }

    fn objects(
        &self,
        renderer: &Renderer,
        secrets: Option<&Value>,
    ) -> Result<Vec<Object>, ManifestError> {
        let credentials: DatabaseCredentials = secrets
            .and_then(|s| serde_json::from_value(s.clone()).ok())
            .unwrap_or_default();
        let mut out = Vec::new();
        for couch in &self.clusters.couch {
            out.extend(couchdb::objects::objects(
                renderer,
                &couch.db,
                &couch.names.namespace,
                credentials.couchdb.get(&couch.db.name),
            )?);
        }
        for db in &self.clusters.immu {
            out.extend(immudb::objects::objects(
                renderer,
                &db.db,
                &db.names.namespace,
                credentials.immudb.get(&db.db.name),
            )?);
        }
        for db in &self.clusters.agraph {
            out.extend(allegrograph::objects::objects(
                renderer,
                &db.db,
                &db.names.namespace,
                credentials.allegrograph.get(&db.db.name),
            )?);
        }
        Ok(out)
    }
}

/// What the database clusters bring to the Kubernetes layer; `None` without any.
pub fn contribution(stack: &Stack) -> Option<Arc<dyn kube::Contribution>> {
    let clusters = Clusters::of(stack);
    if clusters.is_empty() {
        return None;
    }
    Some(Arc::new(Objects { clusters }))
}

/// The database phase.
pub struct Databases {
    kube: Arc<Kube>,
    /// The clusters' Kubernetes objects, as the Kubernetes layer applies them.
    objects: Arc<dyn Phase>,
    clusters: Vec<Couchdb>,
    immu: Vec<Immudb>,
    agraph: Vec<Agraph>,
    stack: Stack,
    /// What plans say about the images upgrades pinned.
    pin_notes: Vec<String>,
    /// Pins the plan drops from the state.
    stale_pins: Vec<String>,
    /// One API client per cluster and password.
    apis: tokio::sync::Mutex<BTreeMap<String, Arc<Api>>>,
    immu_apis: tokio::sync::Mutex<BTreeMap<String, Arc<immudb::api::Api>>>,
    agraph_apis: tokio::sync::Mutex<BTreeMap<String, Arc<allegrograph::api::Api>>>,
}

/// Whether a record is one of the phase's own (not a Kubernetes object).
fn is_own(record: &Record) -> bool {
    ["couchdb:", "immudb:", "allegrograph:"]
        .iter()
        .any(|prefix| record.kind.starts_with(prefix))
}

/// A cluster's plan, before steps are numbered.
#[derive(Default)]
struct ClusterPlan {
    /// Before the Kubernetes objects change (copies off departing members).
    before: Vec<Change>,
    /// After them, in order.
    after: Vec<Change>,
    resources: Vec<Resource>,
    observed: Vec<Observed>,
    notes: Vec<String>,
    blocked: Vec<String>,
}

fn operation(address: &str, kind: &str, action: Action, reason: String) -> Change {
    let mut change = Change::new(address, kind, action, reason, &Default::default());
    if kind == FORMATION {
        change.after = Some(json!({"systemDatabases": couchdb::SYSTEM_DATABASES}));
    }
    change
}

/// A field of an operation's change, for the plan to show.
fn field(path: &str, observed: Option<Value>, after: Option<Value>, drift: bool) -> FieldChange {
    FieldChange {
        path: FieldPath::parse(path),
        before: None,
        observed,
        after,
        drift,
    }
}

impl Databases {
    /// The phase of a stack with database clusters; `None` without any.
    pub fn for_stack(running: &pins::Running, kube: &Arc<Kube>) -> Option<Databases> {
        let stack = &running.stack;
        let clusters = Clusters::of(stack);
        if clusters.is_empty() {
            return None;
        }
        Some(Databases {
            objects: kube.stage(kinds::Stage::Databases),
            kube: kube.clone(),
            clusters: clusters.couch,
            immu: clusters.immu,
            agraph: clusters.agraph,
            stack: stack.clone(),
            pin_notes: running.notes.clone(),
            stale_pins: running.stale.clone(),
            apis: tokio::sync::Mutex::new(BTreeMap::new()),
            immu_apis: tokio::sync::Mutex::new(BTreeMap::new()),
            agraph_apis: tokio::sync::Mutex::new(BTreeMap::new()),
        })
    }

    async fn api(&self, couch: &Couchdb, credentials: &Credentials) -> Result<Arc<Api>, KubeError> {
        let key = format!("{}\u{0}{}", couch.db.name, credentials.password);
        let mut apis = self.apis.lock().await;
        if let Some(api) = apis.get(&key) {
            return Ok(api.clone());
        }
        let client = self.kube.client().await?.direct();
        let api = Arc::new(Api::new(
            client,
            &couch.db.name,
            &couch.names.namespace,
            credentials.clone(),
        ));
        apis.insert(key, api.clone());
        Ok(api)
    }

    /// The API of an immudb cluster, logged in as its superuser.
    async fn immu_api(
        &self,
        db: &Immudb,
        credentials: &immudb::objects::Credentials,
    ) -> Result<Arc<immudb::api::Api>, KubeError> {
        let key = format!("{}\u{0}{}", db.db.name, credentials.password);
        let mut apis = self.immu_apis.lock().await;
        if let Some(api) = apis.get(&key) {
            return Ok(api.clone());
        }
        let client = self.kube.client().await?.direct();
        let api = Arc::new(immudb::api::Api::new(
            client,
            &db.db.name,
            &db.names.namespace,
            &credentials.username,
            &credentials.password,
        ));
        apis.insert(key, api.clone());
        Ok(api)
    }

    /// The API of an AllegroGraph cluster, as its super user.
    async fn agraph_api(
        &self,
        db: &Agraph,
        credentials: &allegrograph::objects::Credentials,
    ) -> Result<Arc<allegrograph::api::Api>, KubeError> {
        let key = format!("{}\u{0}{}", db.db.name, credentials.password);
        let mut apis = self.agraph_apis.lock().await;
        if let Some(api) = apis.get(&key) {
            return Ok(api.clone());
        }
        let client = self.kube.client().await?.direct();
        let api = Arc::new(allegrograph::api::Api::new(
            client,
            &db.db.name,
            &db.names.namespace,
            &credentials.username,
            &credentials.password,
        ));
        apis.insert(key, api.clone());
        Ok(api)
    }

    /// How many requests the phase sent to database pods this session.
    pub async fn requests(&self) -> usize {
        let couch: usize = self.apis.lock().await.values().map(|a| a.requests()).sum();
        let immu: usize = self
            .immu_apis
            .lock()
            .await
            .values()
            .map(|a| a.requests())
            .sum();
        let agraph: usize = self
            .agraph_apis
            .lock()
            .await
            .values()
            .map(|a| a.requests())
            .sum();
        couch + immu + agraph
    }

    /// The user's Secrets that replication targets name: name → (username, password).
    async fn user_secrets(&self) -> Result<BTreeMap<String, (String, String)>, KubeError> {
        let mut out = BTreeMap::new();
        let wanted: Vec<&String> = self
            .clusters
            .iter()
            .flat_map(|c| c.db.couchdb.iter().flat_map(|s| &s.replications))
            .filter_map(|r| match &r.target {
                crate::model::ReplicationTarget::Url { credentials, .. } => credentials.as_ref(),
                _ => None,
            })
            .collect();
        if wanted.is_empty() {
            return Ok(out);
        }
        let cluster = self.kube.client().await?;
        let secret = kinds::find("v1", "Secret").expect("Secret is a known kind");
        let namespace = &self.clusters[0].names.namespace;
        for name in wanted {
            if let Some(found) = cluster.get(secret, Some(namespace), name).await? {
                let field = |key: &str| {
                    found["data"][key]
                        .as_str()
                        .and_then(|v| base64::engine::general_purpose::STANDARD.decode(v).ok())
                        .and_then(|b| String::from_utf8(b).ok())
                };
                if let (Some(user), Some(password)) = (field("username"), field("password")) {
                    out.insert(name.clone(), (user, password));
                }
            }
        }
        Ok(out)
    }

    async fn plan(&self, input: PlanInput<'_>) -> Result<PlanPart, DatabasesError> {
        let kube_records = input.records.only(|r| !is_own(r) && !pins::is_upgrade(r));
        let own_records = input.records.only(is_own);
        let inner_input = PlanInput {
            mode: input.mode,
            stage: input.stage,
            state: input.state,
            records: &kube_records,
            upstream: input.upstream,
            plan_id: input.plan_id,
            adopt: input.adopt,
            cancel: input.cancel,
            events: input.events,
        };
        let mut objects = self
            .objects
            .plan(inner_input)
            .await
            .map_err(DatabasesError::Objects)?;
        if input.mode == Mode::Destroy {
            // The data goes with the StatefulSet's volumes (or the nodes):
            // the phase's own records are only forgotten.
            objects.forget.extend(
                input
                    .records
                    .resources
                    .iter()
                    .filter(|r| is_own(r) || pins::is_upgrade(r))
                    .map(|r| r.address.clone()),
            );
            return Ok(objects);
        }
        let planned = self.kube.planned(&input).await?;
        let all: DatabaseCredentials =
            serde_json::from_value(planned.secrets.clone()).unwrap_or_default();
        let every = &all.couchdb;
        let secrets = if planned.read {
            self.user_secrets().await?
        } else {
            BTreeMap::new()
        };
        let mut plans = Vec::new();
        for couch in &self.clusters {
            let credentials = every.get(&couch.db.name).cloned().ok_or_else(|| {
                DatabasesError::NoCredentials {
                    cluster: couch.db.name.clone(),
                }
            })?;
            let live = if planned.read {
                let api = self.api(couch, &credentials).await?;
                let cluster = self.kube.client().await?;
                match couch
                    .read(cluster, &api, input.cancel, crate::engine::Level::Soon)
                    .await
                {
                    Ok(live) => Some(live),
                    Err(err @ CouchError::Pods { .. }) => return Err(err.into()),
                    Err(err) => {
                        let mut plan = ClusterPlan::default();
                        plan.notes.push(format!(
                            "CouchDB cluster {} could not be read ({}): planned against the state",
                            couch.db.name,
                            crate::error_chain::error_chain(&err)
                        ));
                        plans.push((
                            record_address(&couch.db.name, "credentials"),
                            CREDENTIALS,
                            couch.db.name.clone(),
                            serde_json::to_value(&credentials).expect("credentials serialise"),
                            plan,
                        ));
                        continue;
                    }
                }
            } else {
                None
            };
            let plan = self.plan_cluster(
                couch,
                &credentials,
                every,
                &secrets,
                live.as_ref(),
                &own_records,
                &objects.changes,
            );
            plans.push((
                record_address(&couch.db.name, "credentials"),
                CREDENTIALS,
                couch.db.name.clone(),
                serde_json::to_value(&credentials).expect("credentials serialise"),
                plan,
            ));
        }
        for db in &self.immu {
            let credentials = all.immudb.get(&db.db.name).cloned().ok_or_else(|| {
                DatabasesError::NoImmuCredentials {
                    cluster: db.db.name.clone(),
                }
            })?;
            let plan = self
                .plan_immudb(
                    db,
                    &credentials,
                    (planned.read, &own_records),
                    &objects.changes,
                    input.cancel,
                )
                .await?;
            plans.push((
                immu_address(&db.db.name, "credentials"),
                IMMU_CREDENTIALS,
                db.db.name.clone(),
                serde_json::to_value(&credentials).expect("credentials serialise"),
                plan,
            ));
        }
        for db in &self.agraph {
            let credentials = all.allegrograph.get(&db.db.name).cloned().ok_or_else(|| {
                DatabasesError::NoAgraphCredentials {
                    cluster: db.db.name.clone(),
                }
            })?;
            let plan = self
                .plan_agraph(
                    db,
                    planned.read,
                    &credentials,
                    &own_records,
                    &objects.changes,
                    input.cancel,
                )
                .await?;
            plans.push((
                agraph_address(&db.db.name, "credentials"),
                AG_CREDENTIALS,
                db.db.name.clone(),
                serde_json::to_value(&credentials).expect("credentials serialise"),
                plan,
            ));
        }
        let mut resources = Vec::new();
        let mut observed = Vec::new();
        let mut before = Vec::new();
        let mut after = Vec::new();
        let mut notes = self.pin_notes.clone();
        let mut blocked = Vec::new();
        for (address, kind, id, credentials, plan) in plans {
            resources.push(Resource {
                address: address.clone(),
                kind: kind.to_string(),
                attrs: credentials,
                handling: Default::default(),
            });
            if let Some(record) = own_records.get(&address).filter(|r| r.id.is_some()) {
                observed.push(Observed {
                    address,
                    kind: kind.to_string(),
                    id,
                    attrs: record.attrs.clone(),
                    handling: Default::default(),
                });
            }
            resources.extend(plan.resources);
            observed.extend(plan.observed);
            before.extend(plan.before);
            after.extend(plan.after);
            notes.extend(plan.notes);
            blocked.extend(plan.blocked);
        }
        // Operations are planned from what is read, not diffed: only a
        // finished formation is kept (so a cluster that does not answer is
        // not finished again); a record left by a stopped run is dropped.
        let operations: Vec<String> = own_records
            .resources
            .iter()
            .filter(|r| {
                [
                    FORMATION,
                    MEMBERSHIP,
                    PLACEMENT,
                    REPLICATOR,
                    AG_FORMATION,
                    AG_MEMBERSHIP,
                ]
                .contains(&r.kind.as_str())
            })
            .map(|r| r.address.clone())
            .collect();
        // A finished operation of a cluster the stack no longer has is
        // forgotten: the cluster added again starts from nothing.
        let prefixes: Vec<String> = self
            .clusters
            .iter()
            .map(|c| format!("couchdb.{}.", c.db.name))
            .chain(self.immu.iter().map(|d| format!("immudb.{}.", d.db.name)))
            .chain(
                self.agraph
                    .iter()
                    .map(|d| format!("allegrograph.{}.", d.db.name)),
            )
            .collect();
        let finished = |address: &String| {
            prefixes.iter().any(|p| address.starts_with(p))
                && own_records.get(address).is_some_and(|r| {
                    [FORMATION, REPLICATOR, AG_FORMATION].contains(&r.kind.as_str())
                        && r.id.is_some()
                })
        };
        let declared = own_records.only(|r| !operations.contains(&r.address));
        let mut part = crate::engine::plan::diff(&resources, &declared, &observed);
        part.forget.extend(self.stale_pins.iter().cloned());
        part.forget.extend(
            operations
                .iter()
                .filter(|a| !finished(a) && !before.iter().chain(&after).any(|c| c.address == **a))
                .cloned(),
        );
        // A database left out of the stack keeps its documents: forgotten, not deleted.
        let (kept, changes): (Vec<Change>, Vec<Change>) = part
            .changes
            .into_iter()
            .partition(|c| c.kind == DATABASE && c.action == Action::Delete);
        part.changes = changes;
        for change in kept {
            notes.push(format!(
                "{} is no longer in the stack: it is left in the cluster with its documents and dropped from the state (delete it with CouchDB's API to remove it)",
                change.address
            ));
            part.forget.push(change.address);
        }
        self.annotate(&mut part.changes);
        Ok(self.sequence(objects, before, part, after, notes, blocked))
    }

    /// Reasons a user can act on, for the changes `diff` made.
    fn annotate(&self, changes: &mut [Change]) {
        for change in changes.iter_mut() {
            match (change.kind.as_str(), change.action) {
                (CREDENTIALS, Action::Create) => {
                    change.reason = "generated for the cluster (admin password, Erlang cookie, COUCHDB_SECRET): kept in the state and in its Secrets".into();
                }
                (AG_CREDENTIALS, Action::Create) => {
                    change.reason = "generated for the cluster (the super user's password, set at each instance's first start): kept in the state and in its Secret".into();
                }
                (IMMU_CREDENTIALS, Action::Create) => {
                    change.reason = "generated for the cluster (the superuser's password, set at the primary's first start, and the replication user's): kept in the state and in its Secrets".into();
                }
                (DATABASE, Action::Create) if change.before.is_some() => {
                    change.reason =
                        "declared in the stack and missing from the cluster: made again".into();
                }
                (DATABASE, Action::Create) => {
                    change.reason =
                        "declared in the stack: made with its q, n and partitioned".into();
                }
                (REPLICATION, Action::Create) if change.before.is_some() => {
                    change.reason = "its _replicator document is missing: written again".into();
                }
                (REPLICATION, Action::Create) => {
                    change.reason =
                        "new in the stack: one _replicator document, continuous, create_target"
                            .into();
                }
                (REPLICATION, Action::Delete) => {
                    change.reason = "no longer in the stack: its _replicator document is deleted (the job stops)".into();
                }
                _ => {}
            }
        }
    }

    /// The phase's part, in the order it is applied: the secrets, copies
    /// moved before the objects change, the objects, then formation,
    /// membership, copies for new members, databases and replications.
    fn sequence(
        &self,
        mut objects: PlanPart,
        before: Vec<Change>,
        declared: PlanPart,
        after: Vec<Change>,
        notes: Vec<String>,
        blocked: Vec<String>,
    ) -> PlanPart {
        let (credentials, rest): (Vec<Change>, Vec<Change>) =
            declared.changes.into_iter().partition(|c| {
                [CREDENTIALS, IMMU_CREDENTIALS, AG_CREDENTIALS].contains(&c.kind.as_str())
            });
        let (removals, rest): (Vec<Change>, Vec<Change>) =
            rest.into_iter().partition(|c| c.action == Action::Delete);
        let (object_removals, object_changes): (Vec<Change>, Vec<Change>) = objects
            .changes
            .drain(..)
            .partition(|c| c.action == Action::Delete);
        let ordered: Vec<Change> = credentials
            .into_iter()
            .chain(before)
            .chain(object_changes)
            .chain(after)
            .chain(rest)
            .collect();
        let of = ordered.len();
        let mut changes: Vec<Change> = ordered
            .into_iter()
            .enumerate()
            .map(|(i, mut change)| {
                change.waits_for.clear();
                change.step = Some(StepRef {
                    number: i + 1,
                    of,
                    description: step_description(&change),
                });
                change
            })
            .collect();
        changes.extend(object_removals);
        changes.extend(removals);
        objects.changes = changes;
        objects.adopt.extend(declared.adopt);
        objects.forget.extend(declared.forget);
        objects.foreign.extend(declared.foreign);
        objects.notes.extend(notes);
        objects.blocked.extend(blocked);
        objects
    }

    /// One cluster's operations and declared resources.
    #[allow(clippy::too_many_arguments)]
    fn plan_cluster(
        &self,
        couch: &Couchdb,
        credentials: &Credentials,
        every: &BTreeMap<String, Credentials>,
        secrets: &BTreeMap<String, (String, String)>,
        live: Option<&Live>,
        records: &State,
        object_changes: &[Change],
    ) -> ClusterPlan {
        let mut plan = ClusterPlan::default();
        let name = &couch.db.name;
        let answering = live.filter(|l| l.answering());
        // Formation: planned when the cluster was never finished, or its
        // StatefulSet is made (again); a finished cluster that does not
        // answer now is left to the health gate.
        let formation = record_address(name, "cluster");
        let formed = records.get(&formation).is_some_and(|r| r.id.is_some());
        let statefulset = format!("/StatefulSet/{name}");
        let made_again = object_changes
            .iter()
            .any(|c| c.action == Action::Create && c.address.ends_with(&statefulset));
        match answering {
            None if !formed || made_again => {
                plan.after.push(operation(
                    &formation,
                    FORMATION,
                    Action::Create,
                    "finish_cluster once every member is ready (makes _users and _replicator)".into(),
                ));
            }
            None => plan.notes.push(format!(
                "CouchDB cluster {name} did not answer (no ready pod): its formation, membership and shard placement are checked by the health gate"
            )),
            Some(live) => {
                let missing: Vec<&str> = couchdb::SYSTEM_DATABASES
                    .iter()
                    .copied()
                    .filter(|db| !live.maps.contains_key(*db))
                    .collect();
                if missing.len() == couchdb::SYSTEM_DATABASES.len() {
                    plan.after.push(operation(
                        &formation,
                        FORMATION,
                        Action::Create,
                        "the cluster was never finished: finish_cluster (makes _users and _replicator)".into(),
                    ));
                } else if !missing.is_empty() {
                    let mut change = operation(
                        &formation,
                        FORMATION,
                        Action::Update,
                        format!("changed out of band: system database {} is missing: made again", missing.join(", ")),
                    );
                    change.drift = true;
                    change.fields.push(field(
                        "systemDatabases",
                        Some(json!(couchdb::SYSTEM_DATABASES.iter().filter(|d| !missing.contains(d)).collect::<Vec<_>>())),
                        Some(json!(couchdb::SYSTEM_DATABASES)),
                        true,
                    ));
                    plan.after.push(change);
                }
            }
        }
        if let Some(live) = answering {
            self.plan_membership(couch, live, &mut plan);
            self.plan_placement(couch, live, &mut plan);
        }
        // Declared databases.
        let settings = couch.db.couchdb.as_ref();
        for db in settings.into_iter().flat_map(|s| &s.databases) {
            let address = format!("couchdb.{name}.database[{}]", db.name);
            let mut attrs = json!({"q": db.shards, "partitioned": db.partitioned});
            match answering {
                Some(live) => {
                    if let Some(map) = live.maps.get(&db.name) {
                        let q = map["by_range"].as_object().map_or(0, |r| r.len());
                        let partitioned = map["props"]["partitioned"].as_bool().unwrap_or(false);
                        let there = json!({"q": q, "partitioned": partitioned});
                        if there != attrs {
                            plan.notes.push(format!(
                                "database {} of CouchDB cluster {name} has q={q}, partitioned={partitioned}; the stack says q={}, partitioned={}: these are fixed when a database is made, so it is left as it is",
                                db.name, db.shards, db.partitioned
                            ));
                            attrs = there.clone();
                        }
                        plan.observed.push(Observed {
                            address: address.clone(),
                            kind: DATABASE.into(),
                            id: db.name.clone(),
                            attrs: there,
                            handling: Default::default(),
                        });
                    }
                }
                None => assume(records, &address, &mut plan.observed),
            }
            plan.resources.push(Resource {
                address,
                kind: DATABASE.into(),
                attrs,
                handling: Default::default(),
            });
        }
        // Replications.
        match couch.replication_docs(credentials, every, secrets) {
            Err(problem) => plan.blocked.push(problem),
            Ok(docs) => {
                for (rname, doc) in docs.values() {
                    if let Some(secret) = doc["target"]["auth"]["fromSecret"].as_str() {
                        plan.notes.push(format!(
                            "replication {rname} of CouchDB cluster {name}: Secret {secret} is not there yet; it is read when the replication is written"
                        ));
                    }
                }
                for (id, (rname, doc)) in &docs {
                    let address = format!("couchdb.{name}.replication[{rname}]");
                    plan.resources.push(Resource {
                        address: address.clone(),
                        kind: REPLICATION.into(),
                        attrs: doc.clone(),
                        handling: Default::default(),
                    });
                    if answering.is_none() {
                        assume(records, &address, &mut plan.observed);
                    }
                    let Some(live) = answering else { continue };
                    let Some(found) = live.replicator.get(id) else {
                        continue;
                    };
                    let kept: serde_json::Map<String, Value> =
                        ["source", "target", "continuous", "create_target"]
                            .iter()
                            .filter_map(|k| found.get(*k).map(|v| (k.to_string(), v.clone())))
                            .collect();
                    plan.observed.push(Observed {
                        address: address.clone(),
                        kind: REPLICATION.into(),
                        id: id.clone(),
                        attrs: Value::Object(kept.clone()),
                        handling: Default::default(),
                    });
                    let job = live.scheduler.get(id);
                    let state = job.and_then(|j| j["state"].as_str()).unwrap_or("");
                    if Value::Object(kept) == *doc && matches!(state, "crashing" | "failed") {
                        let job = job.expect("a state comes from a job");
                        let error = job["info"]["error"].as_str().unwrap_or("no error given");
                        let mut change = operation(
                            &address,
                            REPLICATION,
                            Action::Update,
                            format!(
                                "drift: the job is {state} on {} ({error}; {} errors): its document is written again, which restarts the job",
                                job["node"].as_str().map(|n| couch.short(n)).unwrap_or_else(|| "no node".into()),
                                job["error_count"].as_u64().unwrap_or(0)
                            ),
                        );
                        change.drift = true;
                        change.id = Some(id.clone());
                        change.before = records.get(&address).map(|r| r.attrs.clone());
                        change.observed = Some(doc.clone());
                        change.after = Some(doc.clone());
                        change.fields.push(field(
                            "state",
                            Some(json!(state)),
                            Some(json!("running")),
                            true,
                        ));
                        plan.after.push(change);
                    }
                }
                // Documents of this cluster's replications the stack no longer declares.
                if let Some(live) = answering {
                    for (id, doc) in &live.replicator {
                        if docs.contains_key(id) {
                            continue;
                        }
                        let rname = id
                            .trim_start_matches(&couch.replication_prefix())
                            .to_string();
                        plan.observed.push(Observed {
                            address: format!("couchdb.{name}.replication[{rname}]"),
                            kind: REPLICATION.into(),
                            id: id.clone(),
                            attrs: doc.clone(),
                            handling: Default::default(),
                        });
                    }
                }
            }
        }
        plan
    }

    /// An immudb cluster's operation: the replication user on the primary,
    /// planned from what the primary lists (drift when it lost the user or
    /// its permissions), else from the state.
    async fn plan_immudb(
        &self,
        db: &Immudb,
        credentials: &immudb::objects::Credentials,
        (read, records): (bool, &State),
        object_changes: &[Change],
        cancel: &crate::engine::Cancel,
    ) -> Result<ClusterPlan, DatabasesError> {
        let mut plan = ClusterPlan::default();
        let name = &db.db.name;
        let address = immu_address(name, "replicator");
        // A primary made (again) starts empty: its users are made again too.
        let primary_set = format!("/StatefulSet/{name}-primary");
        let made_again = object_changes.iter().any(|c| {
            matches!(c.action, Action::Create | Action::Replace)
                && c.address.ends_with(&primary_set)
        });
        let recorded = records.get(&address).is_some_and(|r| r.id.is_some()) && !made_again;
        let live = if read {
            let api = self.immu_api(db, credentials).await?;
            let cluster = self.kube.client().await?;
            match db
                .read(cluster, &api, cancel, crate::engine::Level::Soon)
                .await
            {
                Ok(live) => Some(live),
                Err(err @ immudb::ImmuError::Pods { .. }) => return Err(err.into()),
                Err(err) => {
                    plan.notes.push(format!(
                        "immudb cluster {name} could not be read ({}): planned against the state",
                        crate::error_chain::error_chain(&err)
                    ));
                    None
                }
            }
        } else {
            None
        };
        let replicator = &credentials.replicator;
        let wanted = json!({
            "user": replicator,
            "permission": immudb::ADMIN_PERMISSION,
            "databases": immudb::REPLICATED,
        });
        let listed = live
            .as_ref()
            .and_then(|l| l.users.as_ref().map(|_| db.replicator(l, credentials)));
        let mut change = match listed {
            None if recorded => {
                if read {
                    plan.notes.push(format!(
                        "the primary of immudb cluster {name} did not answer (its pod is not ready): its replication user is checked by the health gate"
                    ));
                }
                return Ok(plan);
            }
            None => operation(
                &address,
                REPLICATOR,
                Action::Create,
                format!("the replicas log in to the primary as {replicator}: made there once the primary is ready, with admin permission on defaultdb and systemdb (what replication needs), never the superuser"),
            ),
            Some(None) => {
                let mut change = operation(
                    &address,
                    REPLICATOR,
                    Action::Create,
                    format!("{}user {replicator} is not on the primary: made, with admin permission on defaultdb and systemdb", if recorded { "drift: " } else { "" }),
                );
                change.drift = recorded;
                change
            }
            Some(Some(user)) if !Immudb::can_replicate(user) => {
                let mut change = operation(
                    &address,
                    REPLICATOR,
                    Action::Update,
                    format!("drift: user {replicator} lacks what replication needs on the primary (active, admin permission on defaultdb and systemdb): granted again"),
                );
                change.drift = true;
                change.fields.push(field(
                    "permissions",
                    Some(json!(user.permissions)),
                    Some(json!(immudb::REPLICATED
                        .iter()
                        .map(|d| (d.to_string(), immudb::ADMIN_PERMISSION))
                        .collect::<BTreeMap<_, _>>())),
                    true,
                ));
                change
            }
            Some(Some(_)) => return Ok(plan),
        };
        change.after = Some(wanted);
        plan.after.push(change);
        Ok(plan)
    }

    /// An AllegroGraph cluster's operations: formation (the cluster made on
    /// the controlling instance) and membership (members no pod backs
    /// removed, copies outside the cluster restarted), planned from what
    /// the controlling instance says, else from the state.
    async fn plan_agraph(
        &self,
        db: &Agraph,
        read: bool,
        credentials: &allegrograph::objects::Credentials,
        records: &State,
        object_changes: &[Change],
        cancel: &crate::engine::Cancel,
    ) -> Result<ClusterPlan, DatabasesError> {
        use allegrograph::Formed;
        let mut plan = ClusterPlan::default();
        let name = &db.db.name;
        let repository = db.repository();
        let formation = agraph_address(name, "cluster");
        let formed = records.get(&formation).is_some_and(|r| r.id.is_some());
        let controlling_set = format!("/StatefulSet/{name}-controlling");
        let made_again = object_changes.iter().any(|c| {
            matches!(c.action, Action::Create | Action::Replace)
                && c.address.ends_with(&controlling_set)
        });
        let live = if read {
            let api = self.agraph_api(db, credentials).await?;
            let cluster = self.kube.client().await?;
            match db
                .read(cluster, &api, cancel, crate::engine::Level::Soon)
                .await
            {
                Ok(live) => Some(live),
                Err(err @ allegrograph::AgraphError::Pods { .. }) => return Err(err.into()),
                Err(err) => {
                    plan.notes.push(format!(
                        "AllegroGraph cluster {name} could not be read ({}): planned against the state",
                        crate::error_chain::error_chain(&err)
                    ));
                    None
                }
            }
        } else {
            None
        };
        if let (true, Some(license)) = (read, &db.db.license_secret) {
            let secret = kinds::find("v1", "Secret").expect("Secret is a known kind");
            let cluster = self.kube.client().await?;
            let found = cluster
                .get(secret, Some(&db.names.namespace), license)
                .await
                .map_err(KubeError::from)?;
            if found.is_none_or(|s| s["data"]["license"].as_str().is_none()) {
                plan.blocked.push(format!(
                    "AllegroGraph cluster {name}: licenseSecret names Secret {license}, which is not in namespace {} with key license (its pods could not start)",
                    db.names.namespace
                ));
            }
        }
        let wanted = json!({"repository": repository, "controlling": db.names.controlling()});
        let formation_change = |action, reason: String, drift: bool| {
            let mut change = operation(&formation, AG_FORMATION, action, reason);
            change.drift = drift;
            change.after = Some(wanted.clone());
            change
        };
        match live.as_ref().map(|l| &l.formed) {
            None | Some(Formed::Unknown) if !formed || made_again => {
                plan.after.push(formation_change(
                    Action::Create,
                    format!("createCluster on the controlling instance once it is ready (makes repository {repository}); the copies join it by themselves"),
                    false,
                ));
            }
            None | Some(Formed::Unknown) => {
                if read {
                    plan.notes.push(format!(
                        "the controlling instance of AllegroGraph cluster {name} did not answer: its membership is checked by the health gate"
                    ));
                }
            }
            Some(Formed::Absent) => plan.after.push(formation_change(
                if formed { Action::Update } else { Action::Create },
                if formed {
                    format!("drift: the controlling instance has no repository {repository} (its volumes were lost?): the cluster is made again and the copies restarted to join it")
                } else {
                    format!("createCluster on the controlling instance (makes repository {repository}); the copies join it by themselves")
                },
                formed,
            )),
            Some(Formed::Standalone) => plan.blocked.push(format!(
                "AllegroGraph cluster {name}: repository {repository} exists on the controlling instance but is not a replication cluster; delete it (or name another `repository`) so stack can make the cluster"
            )),
            Some(Formed::Cluster(_)) => {}
        }
        let Some(membership) = live.as_ref().and_then(|l| db.membership(l)) else {
            return Ok(plan);
        };
        if membership.is_empty() {
            return Ok(plan);
        }
        let mut parts = Vec::new();
        if !membership.leaving.is_empty() {
            parts.push(format!(
                "{} leave (each pod's sidecar removes it as the pod stops; what is left is removed)",
                membership.leaving.join(", ")
            ));
        }
        if !membership.dead.is_empty() {
            parts.push(format!(
                "drift: {} no pod backs: removed from the cluster",
                membership.dead.join(", ")
            ));
        }
        if !membership.outside.is_empty() {
            parts.push(format!(
                "drift: {} run but are not members: restarted, to join again empty",
                membership.outside.join(", ")
            ));
        }
        let mut change = operation(
            &agraph_address(name, "membership"),
            AG_MEMBERSHIP,
            Action::Update,
            parts.join("; "),
        );
        change.drift = membership.drift();
        let listed: Vec<String> = match live.as_ref().map(|l| &l.formed) {
            Some(Formed::Cluster(instances)) => instances
                .iter()
                .map(|i| format!("{} ({})", i.name, i.state))
                .collect(),
            _ => Vec::new(),
        };
        let mut members = vec![db.names.controlling()];
        members.extend(db.wanted());
        change.fields.push(field(
            "members",
            Some(json!(listed)),
            Some(json!(members)),
            change.drift,
        ));
        change.after = Some(json!({"members": members}));
        plan.after.push(change);
        Ok(plan)
    }

    fn plan_membership(&self, couch: &Couchdb, live: &Live, plan: &mut ClusterPlan) {
        let wanted = couch.wanted_nodes();
        let joining: Vec<String> = wanted
            .iter()
            .filter(|n| !live.cluster_nodes.contains(n))
            .map(|n| couch.short(n))
            .collect();
        let leaving: Vec<String> = live
            .cluster_nodes
            .iter()
            .filter(|n| !wanted.contains(n))
            .map(|n| couch.short(n))
            .collect();
        if joining.is_empty() && leaving.is_empty() {
            return;
        }
        let existing: Vec<String> = live
            .members
            .iter()
            .filter(|m| m.ordinal < couch.db.replicas)
            .map(|m| m.pod.clone())
            .collect();
        let mut parts = Vec::new();
        let out_of_band: Vec<&String> = joining.iter().filter(|p| existing.contains(p)).collect();
        let new: Vec<&String> = joining.iter().filter(|p| !existing.contains(p)).collect();
        if !out_of_band.is_empty() {
            parts.push(format!(
                "drift: {} run but are not in cluster_nodes: added back",
                list(&out_of_band)
            ));
        }
        if !new.is_empty() {
            parts.push(format!("{} join (through the seedlist)", list(&new)));
        }
        if !leaving.is_empty() {
            parts.push(format!(
                "{} leave: deleted from /_node/_local/_nodes once their pods are gone",
                list(&leaving.iter().collect::<Vec<_>>())
            ));
        }
        let short = |nodes: &[String]| -> Value {
            json!(nodes.iter().map(|n| couch.short(n)).collect::<Vec<_>>())
        };
        // Drift: a member out of the cluster, or a node no pod backs (not
        // one of a member that leaves in this plan).
        let ghosts = live
            .cluster_nodes
            .iter()
            .filter(|n| !wanted.contains(n))
            .any(|n| {
                couch
                    .names
                    .pod_of(n)
                    .is_none_or(|pod| !live.members.iter().any(|m| m.pod == pod))
            });
        let drift = !out_of_band.is_empty() || ghosts;
        let mut change = operation(
            &record_address(&couch.db.name, "membership"),
            MEMBERSHIP,
            Action::Update,
            parts.join("; "),
        );
        change.drift = drift;
        change.fields.push(field(
            "clusterNodes",
            Some(short(&live.cluster_nodes)),
            Some(short(&wanted)),
            drift,
        ));
        plan.after.push(change);
    }

    fn plan_placement(&self, couch: &Couchdb, live: &Live, plan: &mut ClusterPlan) {
        let wanted = couch.wanted_nodes();
        let placed = couch.placement(live, &wanted);
        if !placed.shortfalls.is_empty() {
            let mut short: BTreeMap<&str, (usize, Vec<&str>)> = BTreeMap::new();
            for s in &placed.shortfalls {
                let entry = short.entry(s.database.as_str()).or_default();
                entry.0 = entry.0.max(s.copies);
                entry.1.push(s.range.as_str());
            }
            let most = short.values().map(|(c, _)| *c).max().unwrap_or(0);
            let members = couch.db.replicas;
            plan.blocked.push(format!(
                "CouchDB cluster {}: {} cannot keep their copies on {members} member{}: {}; set `n: {members}` for the cluster (or for those databases) to keep fewer copies, or keep {most} replicas",
                couch.db.name,
                if short.len() == 1 { "this database" } else { "these databases" },
                if members == 1 { "" } else { "s" },
                short
                    .iter()
                    .map(|(db, (copies, ranges))| format!("{db} ({copies} copies of {})", ranges.join(", ")))
                    .collect::<Vec<_>>()
                    .join("; ")
            ));
        }
        let current = live.layout();
        if placed.layout == current {
            return;
        }
        let (add, drop) = couchdb::placement::moves(&current, &placed.layout);
        let departing: Vec<&String> = live
            .cluster_nodes
            .iter()
            .filter(|n| !wanted.contains(n))
            .collect();
        let all_connected = wanted.iter().all(|n| live.all_nodes.contains(n));
        let short_layout = |layout: &couchdb::placement::Layout| -> Value {
            json!(layout
                .iter()
                .map(|(db, ranges)| {
                    (
                        db.clone(),
                        json!(ranges
                            .iter()
                            .map(|(r, nodes)| (
                                r.clone(),
                                json!(nodes.iter().map(|n| couch.short(n)).collect::<Vec<_>>())
                            ))
                            .collect::<serde_json::Map<_, _>>()),
                    )
                })
                .collect::<serde_json::Map<_, _>>())
        };
        let why = if !departing.is_empty() || drop.iter().any(|(_, _, n)| !wanted.contains(n)) {
            "before the StatefulSet shrinks, shard copies leave the members that go"
        } else if !all_connected {
            "new members get shard copies once they joined (rebalance)"
        } else {
            "shard copies are spread evenly (rebalance) and kept at the copies the stack asks for"
        };
        let how = if add.is_empty() {
            format!(
                "{} copies dropped (the members that stay hold every range)",
                drop.len()
            )
        } else {
            format!(
                "{} copies added and filled by internal replication, then {} dropped",
                add.len(),
                drop.len()
            )
        };
        let reason = format!("{why}: {how}");
        let mut change = operation(
            &record_address(&couch.db.name, "placement"),
            PLACEMENT,
            Action::Update,
            reason,
        );
        let before = short_layout(&current);
        let after = short_layout(&placed.layout);
        for (db, ranges) in &placed.layout {
            for (range, nodes) in ranges {
                let had = current.get(db).and_then(|r| r.get(range));
                if had != Some(nodes) {
                    change.fields.push(field(
                        &format!("{db}.{range}"),
                        had.map(|h| json!(h.iter().map(|n| couch.short(n)).collect::<Vec<_>>())),
                        Some(json!(nodes
                            .iter()
                            .map(|n| couch.short(n))
                            .collect::<Vec<_>>())),
                        false,
                    ));
                }
            }
        }
        change.observed = Some(before);
        change.after = Some(json!({"layout": after, "nodes": placed.layout}));
        if all_connected {
            plan.before.push(change);
        } else {
            plan.after.push(change);
        }
    }

    async fn apply(
        &self,
        change: &Change,
        input: ChangeInput<'_>,
    ) -> Result<Option<Record>, DatabasesError> {
        if change.kind.starts_with(kinds::CHANGE_KIND_PREFIX) {
            return self
                .objects
                .apply(change, input)
                .await
                .map_err(DatabasesError::Objects);
        }
        if let Some(db) = self.immu.iter().find(|d| {
            change
                .address
                .starts_with(&format!("immudb.{}.", d.db.name))
        }) {
            return self.apply_immudb(db, change, input).await;
        }
        if let Some(db) = self.agraph.iter().find(|d| {
            change
                .address
                .starts_with(&format!("allegrograph.{}.", d.db.name))
        }) {
            return self.apply_agraph(db, change, input).await;
        }
        let couch = self
            .clusters
            .iter()
            .find(|c| {
                change
                    .address
                    .starts_with(&format!("couchdb.{}.", c.db.name))
            })
            .ok_or_else(|| DatabasesError::Unknown(change.address.clone()))?;
        let record = |id: &str| Record {
            address: change.address.clone(),
            kind: change.kind.clone(),
            id: Some(id.to_string()),
            attrs: change.after.clone().unwrap_or_default(),
            pending_token: None,
        };
        if change.kind == CREDENTIALS {
            return Ok(Some(record(&couch.db.name)));
        }
        let credentials: Credentials = input
            .state
            .get(&record_address(&couch.db.name, "credentials"))
            .and_then(|r| serde_json::from_value(r.attrs.clone()).ok())
            .ok_or_else(|| DatabasesError::NoCredentials {
                cluster: couch.db.name.clone(),
            })?;
        let api = self.api(couch, &credentials).await?;
        let cluster = self.kube.client().await?;
        let cancel = input.cancel;
        match (change.kind.as_str(), change.action) {
            (FORMATION, Action::Create) => {
                couch.form(cluster, &api, cancel).await?;
                return Ok(Some(record(&couch.db.name)));
            }
            (FORMATION, _) => {
                couch.create_system_databases(cluster, &api, cancel).await?;
                return Ok(Some(record(&couch.db.name)));
            }
            (MEMBERSHIP, _) => couch.set_membership(cluster, &api, cancel).await?,
            (PLACEMENT, _) => {
                let target = change
                    .after
                    .as_ref()
                    .and_then(|a| serde_json::from_value(a["nodes"].clone()).ok())
                    .ok_or_else(|| DatabasesError::Unknown(change.address.clone()))?;
                couch.move_shards(cluster, &api, cancel, &target).await?;
            }
            (DATABASE, Action::Create | Action::Update | Action::Replace) => {
                let id = change
                    .id
                    .clone()
                    .unwrap_or_else(|| database_of(&change.address));
                couch.create_database(cluster, &api, cancel, &id).await?;
                return Ok(Some(record(&id)));
            }
            (REPLICATION, Action::Delete) => {
                let id = change.id.clone().unwrap_or_default();
                couch.delete_replication(cluster, &api, cancel, &id).await?;
            }
            (REPLICATION, _) => {
                let name = database_of(&change.address);
                let id = couchdb::replication_id(&self.stack.name, &couch.db.name, &name);
                let mut doc = change.after.clone().unwrap_or_default();
                if let Some(secret) = doc["target"]["auth"]["fromSecret"]
                    .as_str()
                    .map(str::to_string)
                {
                    let secrets = self.user_secrets().await?;
                    let (user, password) =
                        secrets
                            .get(&secret)
                            .ok_or_else(|| DatabasesError::MissingSecret {
                                cluster: couch.db.name.clone(),
                                replication: name.clone(),
                                secret: secret.clone(),
                                namespace: couch.names.namespace.clone(),
                            })?;
                    doc["target"]["auth"] =
                        json!({"basic": {"username": user, "password": password}});
                }
                couch
                    .put_replication(cluster, &api, cancel, &id, &doc)
                    .await?;
                let mut applied = record(&id);
                applied.attrs = doc;
                return Ok(Some(applied));
            }
            _ => return Err(DatabasesError::Unknown(change.address.clone())),
        }
        Ok(None)
    }

    async fn apply_immudb(
        &self,
        db: &Immudb,
        change: &Change,
        input: ChangeInput<'_>,
    ) -> Result<Option<Record>, DatabasesError> {
        let record = Record {
            address: change.address.clone(),
            kind: change.kind.clone(),
            id: Some(db.db.name.clone()),
            attrs: change.after.clone().unwrap_or_default(),
            pending_token: None,
        };
        match change.kind.as_str() {
            IMMU_CREDENTIALS => Ok(Some(record)),
            REPLICATOR => {
                let credentials: immudb::objects::Credentials = input
                    .state
                    .get(&immu_address(&db.db.name, "credentials"))
                    .and_then(|r| serde_json::from_value(r.attrs.clone()).ok())
                    .ok_or_else(|| DatabasesError::NoImmuCredentials {
                        cluster: db.db.name.clone(),
                    })?;
                let api = self.immu_api(db, &credentials).await?;
                let cluster = self.kube.client().await?;
                db.ensure_replicator(cluster, &api, &credentials, input.cancel)
                    .await?;
                Ok(Some(record))
            }
            _ => Err(DatabasesError::Unknown(change.address.clone())),
        }
    }

    async fn apply_agraph(
        &self,
        db: &Agraph,
        change: &Change,
        input: ChangeInput<'_>,
    ) -> Result<Option<Record>, DatabasesError> {
        let record = Record {
            address: change.address.clone(),
            kind: change.kind.clone(),
            id: Some(db.db.name.clone()),
            attrs: change.after.clone().unwrap_or_default(),
            pending_token: None,
        };
        if change.kind == AG_CREDENTIALS {
            return Ok(Some(record));
        }
        let credentials: allegrograph::objects::Credentials = input
            .state
            .get(&agraph_address(&db.db.name, "credentials"))
            .and_then(|r| serde_json::from_value(r.attrs.clone()).ok())
            .ok_or_else(|| DatabasesError::NoAgraphCredentials {
                cluster: db.db.name.clone(),
            })?;
        let api = self.agraph_api(db, &credentials).await?;
        let cluster = self.kube.client().await?;
        let cancel = input.cancel;
        match (change.kind.as_str(), change.action) {
            (AG_FORMATION, action) => {
                db.form(cluster, &api, &credentials, cancel).await?;
                if action == Action::Update {
                    // Made again: the copies belong to the lost cluster and
                    // rejoin once restarted.
                    db.restart_copies(cluster, cancel).await?;
                }
                Ok(Some(record))
            }
            (AG_MEMBERSHIP, _) => {
                db.set_membership(cluster, &api, cancel).await?;
                Ok(None)
            }
            _ => Err(DatabasesError::Unknown(change.address.clone())),
        }
    }

    async fn gate(&self, input: StageInput<'_>) -> Result<(), DatabasesError> {
        self.objects
            .gate(StageInput {
                stage: input.stage,
                mode: input.mode,
                changes: input.changes,
                plan: input.plan,
                plan_id: input.plan_id,
                state: input.state,
                cancel: input.cancel,
                events: input.events,
            })
            .await
            .map_err(DatabasesError::Objects)?;
        if input.mode == Mode::Destroy {
            return Ok(());
        }
        let all: DatabaseCredentials =
            serde_json::from_value(self.kube.planned_secrets(input.plan_id).await?)
                .unwrap_or_default();
        for db in &self.stack.databases {
            // A cluster whose secrets were not planned has nothing to check yet.
            let planned = all.couchdb.contains_key(&db.name)
                || all.immudb.contains_key(&db.name)
                || all.allegrograph.contains_key(&db.name);
            if planned {
                self.health(&db.name, &all, input.cancel).await?;
            }
        }
        Ok(())
    }

    /// Waits until the cluster `database` is healthy by its own account
    /// (the stack's `healthy` timeout bounds the wait).
    pub async fn health(
        &self,
        database: &str,
        all: &DatabaseCredentials,
        cancel: &crate::engine::Cancel,
    ) -> Result<(), DatabasesError> {
        let cluster = self.kube.client().await?;
        if let Some(couch) = self.clusters.iter().find(|c| c.db.name == database) {
            let credentials =
                all.couchdb
                    .get(database)
                    .ok_or_else(|| DatabasesError::NoCredentials {
                        cluster: database.to_string(),
                    })?;
            let api = self.api(couch, credentials).await?;
            couch.gate(cluster, &api, cancel).await?;
        }
        if let Some(db) = self.immu.iter().find(|c| c.db.name == database) {
            let credentials =
                all.immudb
                    .get(database)
                    .ok_or_else(|| DatabasesError::NoImmuCredentials {
                        cluster: database.to_string(),
                    })?;
            let api = self.immu_api(db, credentials).await?;
            db.gate(cluster, &api, credentials, cancel).await?;
        }
        if let Some(db) = self.agraph.iter().find(|c| c.db.name == database) {
            let credentials = all.allegrograph.get(database).ok_or_else(|| {
                DatabasesError::NoAgraphCredentials {
                    cluster: database.to_string(),
                }
            })?;
            let api = self.agraph_api(db, credentials).await?;
            db.gate(cluster, &api, cancel).await?;
        }
        Ok(())
    }

    /// The secrets of every cluster, as the state recorded them (else as
    /// the cluster's Secrets hold them).
    pub async fn recorded_credentials(
        &self,
        state: &State,
    ) -> Result<DatabaseCredentials, DatabasesError> {
        let cluster = self.kube.client().await?;
        credentials(&Clusters::of(&self.stack), state, Some(cluster))
            .await
            .map_err(|e| DatabasesError::Objects(Box::new(e)))
    }

    /// The cluster's API.
    pub async fn cluster(&self) -> Result<&Cluster, DatabasesError> {
        Ok(self.kube.client().await?)
    }

    /// The StatefulSets an image upgrade of `database` rolls, in order:
    /// replicas and copies before the primary or controlling instance.
    pub fn rolling_sets(&self, database: &str) -> Vec<pods::RollingSet> {
        let mut out = Vec::new();
        for couch in self.clusters.iter().filter(|c| c.db.name == database) {
            out.extend(couch.names.rolling_sets(couch.db.replicas));
        }
        for db in self.immu.iter().filter(|c| c.db.name == database) {
            out.extend(db.names.rolling_sets(db.db.replicas));
        }
        for db in self.agraph.iter().filter(|c| c.db.name == database) {
            out.extend(db.names.rolling_sets(db.db.replicas));
        }
        out.retain(|set| set.replicas > 0);
        out
    }

    async fn status(&self, state: &State) -> Vec<DatabaseStatus> {
        let mut out = Vec::new();
        let ingress = self.stack.ingress.as_ref().map(|i| i.domain.clone());
        for couch in &self.clusters {
            let names = &couch.names;
            let mut endpoints = vec![names.service_url("").trim_end_matches('/').to_string()];
            if let Some(domain) = &ingress {
                endpoints.insert(0, format!("https://{}.{domain}", couch.db.name));
            }
            let mut status = self.status_of(
                &couch.db.name,
                "couchdb",
                endpoints,
                (&names.namespace, &names.admin_secret()),
                format!("unknown of {}", couch.db.replicas),
            );
            let credentials: Option<Credentials> = state
                .get(&record_address(&couch.db.name, "credentials"))
                .and_then(|r| serde_json::from_value(r.attrs.clone()).ok());
            let read = async {
                let credentials = credentials.ok_or(DatabasesError::NoCredentials {
                    cluster: couch.db.name.clone(),
                })?;
                let api = self.api(couch, &credentials).await?;
                let cluster = self.kube.client().await?;
                let cancel = crate::engine::Cancel::new();
                Ok::<Live, DatabasesError>(
                    couch
                        .read(cluster, &api, &cancel, crate::engine::Level::Soon)
                        .await?,
                )
            };
            match read.await {
                Err(err) => status.problems.push(crate::error_chain::error_chain(&err)),
                Ok(live) => {
                    let wanted = couch.wanted_nodes();
                    let good = wanted
                        .iter()
                        .filter(|n| live.cluster_nodes.contains(n) && live.all_nodes.contains(n))
                        .count();
                    status.membership = format!("{good} of {}", couch.db.replicas);
                    status.problems = couch.unhealthy(&live);
                    for r in couch.db.couchdb.iter().flat_map(|s| &s.replications) {
                        let id = couchdb::replication_id(&self.stack.name, &couch.db.name, &r.name);
                        let job = live.scheduler.get(&id);
                        status.replications.push(ReplicationStatus {
                            name: r.name.clone(),
                            state: match (live.replicator.contains_key(&id), job) {
                                (false, _) => "no document".into(),
                                (true, None) => "unknown".into(),
                                (true, Some(job)) => {
                                    job["state"].as_str().unwrap_or("unknown").to_string()
                                }
                            },
                            error: job
                                .and_then(|j| j["info"]["error"].as_str())
                                .map(str::to_string),
                        });
                    }
                }
            }
            out.push(status);
        }
        for db in &self.immu {
            out.push(self.immudb_status(db, state).await);
        }
        for db in &self.agraph {
            out.push(self.agraph_status(db, state).await);
        }
        for status in &mut out {
            status.upgrades = pins::history(state, &status.name);
            let name = &status.name;
            status.login = [
                record_address(name, "credentials"),
                immu_address(name, "credentials"),
                agraph_address(name, "credentials"),
            ]
            .iter()
            .find_map(|address| state.get(address))
            .and_then(|record| serde_json::from_value(record.attrs.clone()).ok());
        }
        out
    }

    /// A cluster's status before it is read: where it is reached, which
    /// Secret holds its admin's credentials and the command that prints the
    /// password.
    fn status_of(
        &self,
        name: &str,
        kind: &str,
        endpoints: Vec<String>,
        (namespace, admin_secret): (&str, &str),
        membership: String,
    ) -> DatabaseStatus {
        DatabaseStatus {
            name: name.to_string(),
            kind: kind.to_string(),
            endpoints,
            credentials_secret: format!("{namespace}/{admin_secret}"),
            credentials_command: format!(
                "kubectl --kubeconfig {} -n {namespace} get secret {admin_secret} -o jsonpath='{{.data.password}}' | base64 -d",
                self.kube.kubeconfig().display(),
            ),
            membership,
            problems: Vec::new(),
            replications: Vec::new(),
            replicas: Vec::new(),
            login: None,
            image: self
                .stack
                .databases
                .iter()
                .find(|d| d.name == name)
                .map(|d| d.image.to_string())
                .unwrap_or_default(),
            upgrades: Vec::new(),
        }
    }

    async fn immudb_status(&self, db: &Immudb, state: &State) -> DatabaseStatus {
        let names = &db.names;
        let (write, read) = names.endpoints();
        let mut endpoints = vec![format!("{write} (gRPC, writes)")];
        if db.db.replicas > 0 {
            endpoints.push(format!("{read} (gRPC, reads, replicas only)"));
        }
        if let Some(ingress) = &self.stack.ingress {
            endpoints.insert(0, format!("https://{}.{}", db.db.name, ingress.domain));
        }
        let mut status = self.status_of(
            &db.db.name,
            "immudb",
            endpoints,
            (&names.namespace, &names.admin_secret()),
            format!("unknown of {} replicas in sync", db.db.replicas),
        );
        let credentials: Option<immudb::objects::Credentials> = state
            .get(&immu_address(&db.db.name, "credentials"))
            .and_then(|r| serde_json::from_value(r.attrs.clone()).ok());
        let read = async {
            let credentials = credentials.ok_or(DatabasesError::NoImmuCredentials {
                cluster: db.db.name.clone(),
            })?;
            let api = self.immu_api(db, &credentials).await?;
            let cluster = self.kube.client().await?;
            let cancel = crate::engine::Cancel::new();
            let level = crate::engine::Level::Soon;
            let live = db.read(cluster, &api, &cancel, level).await?;
            let lags = db.lags(&live, &api, &cancel, level).await?;
            Ok::<_, DatabasesError>((db.unhealthy(&live, &lags, &credentials), lags))
        };
        match read.await {
            Err(err) => status.problems.push(crate::error_chain::error_chain(&err)),
            Ok((problems, lags)) => {
                let in_sync = lags.iter().filter(|l| l.transactions == Some(0)).count();
                status.membership = format!("{in_sync} of {} replicas in sync", db.db.replicas);
                status.problems = problems;
                status.replicas = lags
                    .into_iter()
                    .map(|l| ReplicaStatus {
                        pod: l.pod,
                        lag: l.transactions,
                        problem: l.why,
                    })
                    .collect();
            }
        }
        status
    }

    async fn agraph_status(&self, db: &Agraph, state: &State) -> DatabaseStatus {
        let names = &db.names;
        let mut endpoints = vec![names.service_url(db.repository())];
        if let Some(ingress) = &self.stack.ingress {
            endpoints.insert(0, format!("https://{}.{}", db.db.name, ingress.domain));
        }
        let mut status = self.status_of(
            &db.db.name,
            "allegrograph",
            endpoints,
            (&names.namespace, &names.admin_secret()),
            format!("unknown of {} copies running", db.db.replicas),
        );
        let credentials: Option<allegrograph::objects::Credentials> = state
            .get(&agraph_address(&db.db.name, "credentials"))
            .and_then(|r| serde_json::from_value(r.attrs.clone()).ok());
        let read = async {
            let credentials = credentials.ok_or(DatabasesError::NoAgraphCredentials {
                cluster: db.db.name.clone(),
            })?;
            let api = self.agraph_api(db, &credentials).await?;
            let cluster = self.kube.client().await?;
            let cancel = crate::engine::Cancel::new();
            Ok::<_, DatabasesError>(
                db.read(cluster, &api, &cancel, crate::engine::Level::Soon)
                    .await?,
            )
        };
        match read.await {
            Err(err) => status.problems.push(crate::error_chain::error_chain(&err)),
            Ok(live) => {
                if let allegrograph::Formed::Cluster(instances) = &live.formed {
                    let wanted = db.wanted();
                    let running = instances
                        .iter()
                        .filter(|i| wanted.contains(&i.name) && i.state == "running")
                        .count();
                    status.membership = format!("{running} of {} copies running", db.db.replicas);
                }
                status.problems = db.unhealthy(&live);
            }
        }
        status
    }
}

fn list(items: &[&String]) -> String {
    items
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// `couchdb.C.database[NAME]` → `NAME`.
fn database_of(address: &str) -> String {
    address
        .rsplit_once('[')
        .map(|(_, rest)| rest.trim_end_matches(']').to_string())
        .unwrap_or_default()
}

/// What was recorded stands for what is there (the cluster not read).
fn assume(records: &State, address: &str, observed: &mut Vec<Observed>) {
    if let Some(record) = records.get(address) {
        if let Some(id) = &record.id {
            observed.push(Observed {
                address: address.to_string(),
                kind: record.kind.clone(),
                id: id.clone(),
                attrs: record.attrs.clone(),
                handling: Default::default(),
            });
        }
    }
}

fn step_description(change: &Change) -> String {
    match change.kind.as_str() {
        CREDENTIALS | IMMU_CREDENTIALS | AG_CREDENTIALS => "the cluster's secrets".into(),
        AG_FORMATION => "formation".into(),
        AG_MEMBERSHIP => "membership".into(),
        REPLICATOR => "replication user".into(),
        FORMATION => "formation".into(),
        MEMBERSHIP => "membership".into(),
        PLACEMENT => "shard placement".into(),
        DATABASE => "declared database".into(),
        REPLICATION => "replication".into(),
        _ => "Kubernetes object".into(),
    }
}

impl Phase for Databases {
    fn name(&self) -> &str {
        "databases"
    }

    fn owns(&self, record: &Record) -> bool {
        is_own(record) || pins::is_upgrade(record) || self.objects.owns(record)
    }

    fn plan<'a>(&'a self, input: PlanInput<'a>) -> BoxFuture<'a, Result<PlanPart, PhaseError>> {
        Box::pin(async move { Ok(self.plan(input).await?) })
    }

    fn prepare<'a>(&'a self, input: StageInput<'a>) -> BoxFuture<'a, Result<Prepared, PhaseError>> {
        Box::pin(async move {
            let objects: Vec<Change> = input
                .changes
                .iter()
                .filter(|c| c.kind.starts_with(kinds::CHANGE_KIND_PREFIX))
                .cloned()
                .collect();
            self.objects
                .prepare(StageInput {
                    changes: &objects,
                    ..input
                })
                .await
        })
    }

    fn apply<'a>(
        &'a self,
        change: &'a Change,
        input: ChangeInput<'a>,
    ) -> BoxFuture<'a, Result<Option<Record>, PhaseError>> {
        Box::pin(async move { Ok(self.apply(change, input).await?) })
    }

    fn gate<'a>(&'a self, input: StageInput<'a>) -> BoxFuture<'a, Result<(), PhaseError>> {
        Box::pin(async move { Ok(self.gate(input).await?) })
    }

    fn status<'a>(&'a self, state: &'a State) -> BoxFuture<'a, Result<StatusPart, PhaseError>> {
        Box::pin(async move {
            Ok(StatusPart {
                databases: self.status(state).await,
                ..StatusPart::default()
            })
        })
    }
}
