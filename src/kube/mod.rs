//! The Kubernetes phase: the stack's objects applied to its cluster (the one
//! the bootstrap made, or an existing one named by kubeconfig) with
//! server-side apply, stage by stage with health gates; drift read with one
//! LIST per kind; prune of what carries the stack's labels but is no longer
//! declared; and an inventory in the cluster naming the kinds and objects the
//! stack made, so another machine or a lost state file still finds them.

mod cluster;
pub mod drift;
pub mod kinds;
pub mod manifest;
pub mod schema;
pub mod tls;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::apply::{self, ApplyError, Outcome};
use crate::model::{Stack, TlsSource};
use crate::output::Reporter;
use crate::plan::{Action, Change, Observed, Plan, Resource, StageRef};
use crate::provider::Applier;
use crate::state::{Record, State, StateStore};
pub use cluster::{Cluster, ClusterError};
use kinds::{Kind, Readiness, Stage, CHANGE_KIND_PREFIX};
use manifest::{ManifestError, Object};
use tls::{Material, TlsError};

/// The change kind of the stack's certificate authority (kept in state, not in the cluster).
pub const CA_KIND: &str = "k8s:stack:CertificateAuthority";
pub const CA_ADDRESS: &str = "k8s.stack/CertificateAuthority/ca";
const NAMESPACE_KIND: &str = "k8s:v1:Namespace";
/// How often a wait reads the cluster again.
const POLL: Duration = Duration::from_secs(2);

/// Whether a change belongs to the Kubernetes phase.
pub fn is_kube(kind: &str) -> bool {
    kind.starts_with(CHANGE_KIND_PREFIX)
}

/// Whether a change is of a Secret (whose data plans never print).
pub fn is_secret(kind: &str) -> bool {
    kind == "k8s:v1:Secret"
}

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("the state's record of the stack CA cannot be read: {0}")]
    CaRecord(serde_json::Error),
    #[error("cannot write the CA certificate {}", path.display())]
    Export {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{change_kind} is not a kind stack applies")]
    UnknownKind { change_kind: String },
    #[error("stage {number} of 4 ({name}) is not ready after {}:\n{}", humantime::format_duration(*timeout), details.join("\n"))]
    NotReady {
        number: usize,
        name: &'static str,
        timeout: Duration,
        details: Vec<String>,
    },
    #[error("stage {number} of 4 ({name}) failed:\n{}", details.join("\n"))]
    Failed {
        number: usize,
        name: &'static str,
        details: Vec<String>,
    },
    #[error("still there {} after deleting them: {}", humantime::format_duration(*timeout), left.join(", "))]
    NotGone {
        timeout: Duration,
        left: Vec<String>,
    },
    #[error(transparent)]
    Apply(#[from] ApplyError),
}

/// Where the cluster is.
#[derive(Debug, Clone)]
pub struct Target {
    pub kubeconfig: PathBuf,
    pub context: String,
}

/// What a refresh read.
#[derive(Debug, Default)]
pub struct Refreshed {
    pub observed: Vec<Observed>,
    /// Every live object with the stack's labels, whole, by address.
    pub live: BTreeMap<String, Value>,
    /// Whether the Prometheus Operator's CRDs are installed.
    pub monitoring: bool,
    /// Requests the refresh sent.
    pub requests: usize,
}

/// The stack's Kubernetes objects and the cluster they go to.
pub struct Kube {
    stack: String,
    namespace: String,
    healthy: Duration,
    objects: Vec<Object>,
    ca: Option<Material>,
    ca_export: PathBuf,
    target: Target,
    cluster: tokio::sync::OnceCell<Cluster>,
}

/// Where the CA certificate is exported for the user: next to the state.
pub fn ca_export_path(stack: &Stack) -> PathBuf {
    stack.state_dir().join(format!("{}-ca.crt", stack.name))
}

fn inventory_name(stack: &str) -> String {
    format!("stack-{stack}-inventory")
}

fn config_map() -> &'static Kind {
    kinds::find("v1", "ConfigMap").expect("ConfigMap is a known kind")
}

impl Kube {
    /// Renders the stack's objects. The stack CA is `known` (from the
    /// state, or the cluster's Secrets) when it was made before, else it is
    /// made now (and recorded when applied). `cluster` is a client already
    /// connected to `target`, if there is one.
    pub fn new(
        stack: &Stack,
        known: Option<Material>,
        target: Target,
        cluster: Option<Cluster>,
    ) -> Result<Kube, KubeError> {
        let ca = match &stack.ingress {
            Some(ingress) if matches!(ingress.tls, TlsSource::StackCa) => {
                Some(tls::material(&stack.name, &ingress.domain, known)?)
            }
            _ => None,
        };
        let objects = manifest::render(stack, ca.as_ref())?;
        Ok(Kube {
            stack: stack.name.clone(),
            namespace: stack
                .kubernetes
                .as_ref()
                .map_or_else(|| stack.name.clone(), |k| k.namespace.clone()),
            healthy: stack.timeouts.healthy,
            objects,
            ca,
            ca_export: ca_export_path(stack),
            target,
            cluster: tokio::sync::OnceCell::new_with(cluster),
        })
    }

    /// The stack CA the state recorded.
    pub fn recorded_ca(state: &State) -> Result<Option<Material>, KubeError> {
        state
            .get(CA_ADDRESS)
            .map(|r| serde_json::from_value::<Material>(r.attrs.clone()))
            .transpose()
            .map_err(KubeError::CaRecord)
    }

    /// The stack CA as the cluster keeps it, for a machine without the
    /// state that made it; with the client it connected.
    pub async fn ca_in_cluster(
        stack: &Stack,
        target: &Target,
    ) -> Result<(Option<Material>, Cluster), KubeError> {
        let cluster = Cluster::connect(&target.kubeconfig, &target.context).await?;
        let namespace = stack
            .kubernetes
            .as_ref()
            .map_or(stack.name.as_str(), |k| k.namespace.as_str());
        let secrets = kinds::find("v1", "Secret").expect("Secret is a known kind");
        let ca = cluster
            .get(
                secrets,
                Some(namespace),
                &manifest::ca_secret_name(&stack.name),
            )
            .await?;
        let tls = cluster
            .get(secrets, Some(namespace), &manifest::tls_secret_name(stack))
            .await?;
        let material = match (ca, tls) {
            (Some(ca), Some(tls)) => manifest::material_from_secrets(&ca, &tls),
            _ => None,
        };
        Ok((material, cluster))
    }

    pub fn objects(&self) -> &[Object] {
        &self.objects
    }

    async fn cluster(&self) -> Result<&Cluster, KubeError> {
        Ok(self
            .cluster
            .get_or_try_init(|| Cluster::connect(&self.target.kubeconfig, &self.target.context))
            .await?)
    }

    /// What the stack wants; without the Prometheus Operator the monitoring stage is left out.
    pub fn desired(&self, monitoring: bool) -> Vec<Resource> {
        let ca = self.ca.iter().map(|material| Resource {
            address: CA_ADDRESS.to_string(),
            kind: CA_KIND.to_string(),
            attrs: serde_json::to_value(material).expect("material serialises"),
            replace_on: &[],
        });
        let objects = self
            .objects
            .iter()
            .filter(|o| monitoring || o.stage != Stage::Monitoring)
            .map(|o| Resource {
                address: o.address(),
                kind: o.kind.change_kind(),
                attrs: o.body.clone(),
                replace_on: &[],
            });
        ca.chain(objects).collect()
    }

    /// Reads every object with the stack's labels: one LIST per kind the
    /// stack declares, the inventory names or the state records.
    pub async fn refresh(&self, state: &State) -> Result<Refreshed, KubeError> {
        let cluster = self.cluster().await?;
        let before = cluster.requests();
        let monitoring = cluster.has_crd(kinds::SERVICE_MONITOR_CRD).await?;
        let mut kinds: BTreeSet<&'static str> = BTreeSet::new();
        let mut wanted: Vec<&'static Kind> = self.objects.iter().map(|o| o.kind).collect();
        let inventory = cluster
            .get(
                config_map(),
                Some(&self.namespace),
                &inventory_name(&self.stack),
            )
            .await?;
        if let Some(inventory) = &inventory {
            let listed = inventory["data"]["kinds"].as_str().unwrap_or_default();
            wanted.extend(listed.lines().filter_map(|line| {
                let (api_version, kind) = line.rsplit_once(' ')?;
                kinds::find(api_version, kind)
            }));
        }
        wanted.extend(
            state
                .resources
                .iter()
                .filter_map(|r| Kind::of_change(&r.kind)),
        );
        let desired: BTreeMap<String, &Object> =
            self.objects.iter().map(|o| (o.address(), o)).collect();
        let mut refreshed = Refreshed {
            monitoring,
            ..Refreshed::default()
        };
        let selector = manifest::selector(&self.stack);
        for kind in wanted {
            if !kinds.insert(kind.plural)
                || (kind.stage == Stage::Monitoring && kind.kind == "ServiceMonitor" && !monitoring)
            {
                continue;
            }
            let Some(items) = cluster.list(kind, &selector).await? else {
                continue;
            };
            for item in items {
                let name = item["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                let namespace = item["metadata"]["namespace"].as_str().map(str::to_string);
                if kind.kind == "ConfigMap" && name == inventory_name(&self.stack) {
                    continue;
                }
                let address = manifest::address_of(kind, &item);
                let recorded = state.get(&address).map(|r| &r.attrs);
                let attrs = match desired.get(&address) {
                    Some(object) => drift::project_both(&item, &object.body, recorded),
                    None => json!({
                        "apiVersion": kind.api_version,
                        "kind": kind.kind,
                        "metadata": {
                            "name": name,
                            "namespace": namespace,
                            "labels": item["metadata"]["labels"],
                        },
                    }),
                };
                refreshed.observed.push(Observed {
                    address: address.clone(),
                    kind: kind.change_kind(),
                    id: manifest::id(namespace.as_deref(), &name),
                    attrs,
                });
                refreshed.live.insert(address, item);
            }
        }
        if let Some(record) = state.get(CA_ADDRESS) {
            refreshed.observed.push(Observed {
                address: CA_ADDRESS.to_string(),
                kind: CA_KIND.to_string(),
                id: "ca".to_string(),
                attrs: record.attrs.clone(),
            });
        }
        refreshed.requests = cluster.requests() - before;
        Ok(refreshed)
    }

    /// Places each change in its stage and says what happened out of band:
    /// who took a field over, what was deleted, what appeared.
    pub fn annotate(&self, plan: &mut Plan, refreshed: Option<&Refreshed>) {
        let stages: BTreeMap<String, Stage> = self
            .objects
            .iter()
            .map(|o| (o.address(), o.stage))
            .collect();
        for change in plan.changes.iter_mut().filter(|c| is_kube(&c.kind)) {
            let stage = stages
                .get(&change.address)
                .copied()
                .or_else(|| Kind::of_change(&change.kind).map(|k| k.stage))
                .unwrap_or(Stage::Foundation);
            change.stage = Some(StageRef {
                number: stage.number(),
                of: Stage::ALL.len(),
                name: stage.name().to_string(),
            });
            if plan.mode != crate::plan::Mode::Normal {
                continue;
            }
            let ca_secret = manifest::address(
                "Secret",
                Some(&self.namespace),
                &manifest::ca_secret_name(&self.stack),
            );
            match change.action {
                Action::Create
                    if change.address == CA_ADDRESS
                        && refreshed.is_some_and(|r| r.live.contains_key(&ca_secret)) =>
                {
                    change.reason = format!(
                        "the state has no record of the stack's CA: the one in the cluster ({}) is recorded and exported again",
                        ca_secret.trim_start_matches("k8s.")
                    );
                }
                Action::Delete if change.before.is_none() => {
                    change.drift = true;
                    change.reason =
                        "has the stack's labels but the stack does not declare it: pruned"
                            .to_string();
                }
                Action::Delete => {
                    change.reason = "no longer in the stack: pruned".to_string();
                }
                Action::Update => {
                    let fixed: Vec<&str> = match Kind::of_change(&change.kind) {
                        Some(kind) => change
                            .fields
                            .iter()
                            .filter(|f| kind.is_immutable(&f.path))
                            .map(|f| f.path.as_str())
                            .collect(),
                        None => Vec::new(),
                    };
                    if !fixed.is_empty() {
                        change.action = Action::Replace;
                        change.reason = format!(
                            "{} (the API server does not change {} in place: deleted and made again)",
                            change.reason,
                            fixed.join(", ")
                        );
                    }
                    let Some(live) = refreshed.and_then(|r| r.live.get(&change.address)) else {
                        continue;
                    };
                    let taken: Vec<String> = change
                        .fields
                        .iter()
                        .filter_map(|f| {
                            let owners = drift::other_owners(live, &f.path);
                            (!owners.is_empty()).then(|| {
                                format!("{} is now managed by {}", f.path, owners.join(", "))
                            })
                        })
                        .collect();
                    if !taken.is_empty() {
                        change.reason = format!("{}; {}", change.reason, taken.join("; "));
                    }
                }
                _ => {}
            }
        }
        if refreshed.is_some_and(|r| !r.monitoring)
            && self.objects.iter().any(|o| o.stage == Stage::Monitoring)
        {
            plan.notes.push(format!(
                "stage 4 of 4 (monitoring) skipped: the cluster has no Prometheus Operator (CRD {} is missing); enable the monitoring addon and run `stack up` again",
                kinds::SERVICE_MONITOR_CRD
            ));
        }
        plan.recount();
    }

    /// Applies the phase's changes: the CA and each stage's objects, each
    /// stage waiting for the one before to be ready; then removals in
    /// reverse stage order, waiting until they are gone; then the inventory.
    pub async fn apply(
        self: &Arc<Self>,
        changes: &[Change],
        destroy: bool,
        store: &mut dyn StateStore,
        state: &mut State,
        parallelism: usize,
        reporter: &Reporter,
    ) -> Result<Vec<Outcome>, KubeError> {
        let stage_of = |c: &Change| c.stage.as_ref().map_or(1, |s| s.number);
        let (removals, applies): (Vec<&Change>, Vec<&Change>) =
            changes.iter().partition(|c| c.action == Action::Delete);
        let mut outcomes = Vec::new();
        let last = applies.iter().map(|c| stage_of(c)).max().unwrap_or(0);
        for stage in Stage::ALL.into_iter().filter(|s| s.number() <= last) {
            let batch: Vec<Change> = applies
                .iter()
                .filter(|c| stage_of(c) == stage.number())
                .map(|c| (*c).clone())
                .collect();
            // Planned before the cluster could be read (it was being made),
            // the monitoring stage may find no Prometheus Operator: it says
            // so and skips, the rest of the stack stands.
            if stage == Stage::Monitoring
                && !batch.is_empty()
                && !self
                    .cluster()
                    .await?
                    .has_crd(kinds::SERVICE_MONITOR_CRD)
                    .await?
            {
                reporter.line(&format!(
                    "stage 4 of 4 (monitoring) skipped: the cluster has no Prometheus Operator (CRD {} is missing)",
                    kinds::SERVICE_MONITOR_CRD
                ));
                continue;
            }
            if !batch.is_empty() {
                self.dry_run(stage, &batch).await?;
                outcomes.extend(
                    apply::apply(self.clone(), &batch, store, state, parallelism, reporter).await?,
                );
            }
            self.wait_ready(stage, changes, reporter).await?;
        }
        if destroy && !removals.is_empty() {
            self.cluster()
                .await?
                .delete(
                    config_map(),
                    Some(&self.namespace),
                    &inventory_name(&self.stack),
                )
                .await?;
        }
        for stage in Stage::ALL.into_iter().rev() {
            let batch: Vec<Change> = removals
                .iter()
                .filter(|c| stage_of(c) == stage.number())
                .map(|c| (*c).clone())
                .collect();
            if batch.is_empty() {
                continue;
            }
            outcomes.extend(
                apply::apply(self.clone(), &batch, store, state, parallelism, reporter).await?,
            );
        }
        if !destroy && changes.iter().any(|c| c.kind != CA_KIND) {
            self.write_inventory().await?;
        }
        Ok(outcomes)
    }

    /// Asks the API server to validate a stage's objects before any of them
    /// changes, so an object it refuses stops the stage untouched, with every
    /// refusal at once. Objects in a namespace the same stage makes, and
    /// objects to be replaced, can only be checked by applying them.
    async fn dry_run(&self, stage: Stage, batch: &[Change]) -> Result<(), KubeError> {
        let cluster = self.cluster().await?;
        let new_namespaces: BTreeSet<&str> = batch
            .iter()
            .filter(|c| c.kind == NAMESPACE_KIND && c.action == Action::Create)
            .filter_map(|c| c.after.as_ref()?["metadata"]["name"].as_str())
            .collect();
        let mut refused = Vec::new();
        for change in batch.iter().filter(|c| c.action != Action::Replace) {
            let (Some(kind), Some(body)) = (Kind::of_change(&change.kind), change.after.as_ref())
            else {
                continue;
            };
            let namespace = body["metadata"]["namespace"].as_str();
            if namespace.is_some_and(|ns| new_namespaces.contains(ns)) {
                continue;
            }
            let name = body["metadata"]["name"].as_str().unwrap_or_default();
            if let Err(err) = cluster.apply(kind, namespace, name, body, true).await {
                refused.push(format!("  {err}"));
            }
        }
        if refused.is_empty() {
            return Ok(());
        }
        Err(KubeError::Failed {
            number: stage.number(),
            name: stage.name(),
            details: refused,
        })
    }

    /// Records in the cluster which kinds and objects the stack made.
    async fn write_inventory(&self) -> Result<(), KubeError> {
        let kinds: BTreeSet<String> = self
            .objects
            .iter()
            .map(|o| format!("{} {}", o.kind.api_version, o.kind.kind))
            .collect();
        let objects: Vec<String> = self.objects.iter().map(Object::address).collect();
        let name = inventory_name(&self.stack);
        let body = json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "labels": {
                    manifest::MANAGED_BY: "stack",
                    manifest::PART_OF: self.stack,
                },
            },
            "data": {
                "kinds": kinds.into_iter().collect::<Vec<_>>().join("\n"),
                "objects": objects.join("\n"),
            },
        });
        self.cluster()
            .await?
            .apply(config_map(), Some(&self.namespace), &name, &body, false)
            .await?;
        Ok(())
    }

    /// Waits until every object of `stage` this run applies or keeps is ready.
    async fn wait_ready(
        &self,
        stage: Stage,
        changes: &[Change],
        reporter: &Reporter,
    ) -> Result<(), KubeError> {
        let applied: BTreeSet<&str> = changes.iter().map(|c| c.address.as_str()).collect();
        let mut objects: Vec<&Object> = self
            .objects
            .iter()
            .filter(|o| o.stage == stage && o.kind.readiness != Readiness::Exists)
            .collect();
        // Monitoring objects not in the plan were left out for want of the CRDs.
        if stage == Stage::Monitoring {
            objects.retain(|o| applied.contains(o.address().as_str()));
        }
        if objects.is_empty() {
            return Ok(());
        }
        reporter.line(&format!(
            "stage {} of 4 ({}): waiting for {} object{} to be ready",
            stage.number(),
            stage.name(),
            objects.len(),
            if objects.len() == 1 { "" } else { "s" }
        ));
        let cluster = self.cluster().await?;
        let selector = manifest::selector(&self.stack);
        let deadline = Instant::now() + self.healthy;
        loop {
            let mut live = BTreeMap::new();
            let kinds: BTreeMap<&str, &Kind> =
                objects.iter().map(|o| (o.kind.plural, o.kind)).collect();
            for kind in kinds.into_values() {
                for item in cluster.list(kind, &selector).await?.unwrap_or_default() {
                    live.insert(manifest::address_of(kind, &item), item);
                }
            }
            let mut waiting = Vec::new();
            let mut failed = Vec::new();
            for object in &objects {
                match live.get(&object.address()) {
                    None => waiting.push((*object, "not found".to_string())),
                    Some(item) => match readiness(object.kind, item) {
                        Ok(None) => {}
                        Ok(Some(why)) => waiting.push((*object, why)),
                        Err(why) => failed.push((*object, why, item.clone())),
                    },
                }
            }
            if !failed.is_empty() {
                let mut details = Vec::new();
                for (object, why, item) in failed {
                    details.push(self.describe(cluster, object, &why, Some(&item)).await);
                }
                return Err(KubeError::Failed {
                    number: stage.number(),
                    name: stage.name(),
                    details,
                });
            }
            if waiting.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let mut details = Vec::new();
                for (object, why) in waiting {
                    let item = live.get(&object.address());
                    details.push(self.describe(cluster, object, &why, item).await);
                }
                return Err(KubeError::NotReady {
                    number: stage.number(),
                    name: stage.name(),
                    timeout: self.healthy,
                    details,
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// An object that is not ready: why, its conditions and its latest events.
    async fn describe(
        &self,
        cluster: &Cluster,
        object: &Object,
        why: &str,
        live: Option<&Value>,
    ) -> String {
        let mut text = format!("  {} {}: {why}", object.kind.kind, object.id());
        let conditions: Vec<String> = live
            .and_then(|l| l["status"]["conditions"].as_array())
            .into_iter()
            .flatten()
            .map(|c| {
                format!(
                    "{}={} {} {}",
                    c["type"].as_str().unwrap_or("?"),
                    c["status"].as_str().unwrap_or("?"),
                    c["reason"].as_str().unwrap_or(""),
                    c["message"].as_str().unwrap_or("")
                )
                .trim_end()
                .to_string()
            })
            .collect();
        if !conditions.is_empty() {
            text.push_str(&format!("\n    conditions: {}", conditions.join("; ")));
        }
        if let Some(ns) = &object.namespace {
            match cluster.events(ns, &object.name).await {
                Ok(events) if !events.is_empty() => {
                    text.push_str("\n    recent events:");
                    for event in events {
                        text.push_str(&format!("\n      {event}"));
                    }
                }
                Ok(_) => text.push_str("\n    no events"),
                Err(err) => text.push_str(&format!("\n    events unavailable: {err}")),
            }
        }
        text
    }

    fn export_ca(&self, material: &Value) -> Result<(), KubeError> {
        let cert = material["caCert"].as_str().unwrap_or_default();
        crate::files::write_private(&self.ca_export, cert.as_bytes()).map_err(|source| {
            KubeError::Export {
                path: self.ca_export.clone(),
                source,
            }
        })
    }

    async fn put(
        &self,
        address: &str,
        change_kind: &str,
        body: &Value,
    ) -> Result<Record, KubeError> {
        if change_kind == CA_KIND {
            self.export_ca(body)?;
            return Ok(Record {
                address: address.to_string(),
                kind: change_kind.to_string(),
                id: Some("ca".to_string()),
                attrs: body.clone(),
                pending_token: None,
            });
        }
        let kind = Kind::of_change(change_kind).ok_or_else(|| KubeError::UnknownKind {
            change_kind: change_kind.to_string(),
        })?;
        let name = body["metadata"]["name"].as_str().unwrap_or_default();
        let namespace = body["metadata"]["namespace"].as_str();
        self.cluster()
            .await?
            .apply(kind, namespace, name, body, false)
            .await?;
        Ok(Record {
            address: address.to_string(),
            kind: change_kind.to_string(),
            id: Some(manifest::id(namespace, name)),
            attrs: body.clone(),
            pending_token: None,
        })
    }
}

/// An endpoint as `stack status` lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EndpointStatus {
    pub name: String,
    pub url: String,
}

impl Kube {
    /// The stack's endpoints: HTTPS hosts from its Ingresses, TCP ports
    /// from its NodePort Services (read from the cluster when it answers).
    pub async fn endpoints(&self) -> Vec<EndpointStatus> {
        let mut endpoints = Vec::new();
        for object in &self.objects {
            match (object.kind.kind, object.stage) {
                ("Ingress", _) => {
                    for rule in object.body["spec"]["rules"]
                        .as_array()
                        .into_iter()
                        .flatten()
                    {
                        if let Some(host) = rule["host"].as_str() {
                            endpoints.push(EndpointStatus {
                                name: object.name.clone(),
                                url: format!("https://{host}"),
                            });
                        }
                    }
                }
                ("Service", Stage::Ingress) => {
                    let port = match self.cluster().await {
                        Ok(cluster) => cluster
                            .get(object.kind, object.namespace.as_deref(), &object.name)
                            .await
                            .ok()
                            .flatten()
                            .and_then(|live| live["spec"]["ports"][0]["nodePort"].as_u64())
                            .map_or_else(|| "not assigned yet".to_string(), |p| p.to_string()),
                        Err(_) => "unknown (cluster unreachable)".to_string(),
                    };
                    endpoints.push(EndpointStatus {
                        name: object.name.trim_end_matches("-tcp").to_string(),
                        url: format!("tcp NodePort {port} on every node"),
                    });
                }
                _ => {}
            }
        }
        endpoints
    }
}

/// `Ok(None)` when ready, `Ok(Some(why not yet))`, or `Err(why it never will be)`.
fn readiness(kind: &Kind, live: &Value) -> Result<Option<String>, String> {
    let status = &live["status"];
    let count = |v: &Value| v.as_i64().unwrap_or(0);
    let generation = count(&live["metadata"]["generation"]);
    let observed = count(&status["observedGeneration"]);
    let condition = |kind: &str| {
        status["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == kind && c["status"] == "True")
    };
    let verdict = |ready: bool, why: String| if ready { None } else { Some(why) };
    Ok(match (kind.readiness, kind.kind) {
        (Readiness::Exists, _) => None,
        (Readiness::Rollout, "DaemonSet") => {
            let want = count(&status["desiredNumberScheduled"]);
            let (updated, available) = (
                count(&status["updatedNumberScheduled"]),
                count(&status["numberAvailable"]),
            );
            verdict(
                observed >= generation && updated == want && available == want,
                format!("{available} of {want} pods available, {updated} updated"),
            )
        }
        (Readiness::Rollout, rollout) => {
            let want = live["spec"]["replicas"].as_i64().unwrap_or(1);
            let ready = if rollout == "Deployment" {
                count(&status["availableReplicas"])
            } else {
                count(&status["readyReplicas"])
            };
            let updated = count(&status["updatedReplicas"]);
            let revisions_agree = status["currentRevision"] == status["updateRevision"];
            verdict(
                observed >= generation && ready == want && updated == want && revisions_agree,
                format!(
                    "{ready} of {want} ready, {updated} updated{}",
                    if observed < generation {
                        ", generation not yet observed"
                    } else {
                        ""
                    }
                ),
            )
        }
        (Readiness::Job, _) => {
            if condition("Failed") {
                return Err(format!(
                    "the Job failed ({} failed pods)",
                    count(&status["failed"])
                ));
            }
            verdict(
                condition("Complete"),
                format!("{} succeeded so far", count(&status["succeeded"])),
            )
        }
        (Readiness::Address, _) => verdict(
            status["loadBalancer"]["ingress"]
                .as_array()
                .is_some_and(|a| !a.is_empty()),
            "no address from the ingress controller yet".to_string(),
        ),
    })
}

impl Applier for Kube {
    type Error = KubeError;

    fn dependencies(&self, kind: &str) -> &'static [&'static str] {
        // Stages order the objects; within the first, a namespace comes
        // before what goes into it (and goes after it on removal).
        if kind == NAMESPACE_KIND || kind == CA_KIND {
            &[]
        } else {
            &[NAMESPACE_KIND]
        }
    }

    async fn create(
        &self,
        resource: &Resource,
        _token: &str,
        _state: &State,
    ) -> Result<Record, KubeError> {
        self.put(&resource.address, &resource.kind, &resource.attrs)
            .await
    }

    async fn update(&self, change: &Change, _state: &State) -> Result<Record, KubeError> {
        let body = change.after.clone().unwrap_or_default();
        self.put(&change.address, &change.kind, &body).await
    }

    async fn delete(&self, change_kind: &str, id: &str) -> Result<(), KubeError> {
        if change_kind == CA_KIND {
            return match std::fs::remove_file(&self.ca_export) {
                Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(KubeError::Export {
                    path: self.ca_export.clone(),
                    source: err,
                }),
                _ => Ok(()),
            };
        }
        let kind = Kind::of_change(change_kind).ok_or_else(|| KubeError::UnknownKind {
            change_kind: change_kind.to_string(),
        })?;
        let (namespace, name) = match id.split_once('/') {
            Some((ns, name)) => (Some(ns), name),
            None => (None, id),
        };
        let cluster = self.cluster().await?;
        cluster.delete(kind, namespace, name).await?;
        // Gone means gone: a Namespace is Terminating while its objects go,
        // and an object being replaced must not be applied while it still exists.
        let deadline = Instant::now() + self.healthy;
        while cluster.get(kind, namespace, name).await?.is_some() {
            if Instant::now() >= deadline {
                return Err(KubeError::NotGone {
                    timeout: self.healthy,
                    left: vec![manifest::address(kind.kind, namespace, name)],
                });
            }
            tokio::time::sleep(POLL).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Mode;

    fn reference() -> Kube {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("stacks/reference.yaml");
        let stack = crate::model::load(&path).unwrap();
        let target = Target {
            kubeconfig: PathBuf::from("unused"),
            context: "unused".to_string(),
        };
        Kube::new(&stack, None, target, None).unwrap()
    }

    #[test]
    fn without_the_prometheus_operator_the_monitoring_stage_is_left_out_with_a_note() {
        let kube = reference();
        let all = kube.desired(true);
        let without = kube.desired(false);
        assert!(all
            .iter()
            .any(|r| r.kind == "k8s:monitoring.coreos.com/v1:ServiceMonitor"));
        assert!(without
            .iter()
            .all(|r| !r.address.contains("ServiceMonitor") && !r.address.contains("dashboard")));
        assert!(without.iter().any(|r| r.address == "k8s.demo/Ingress/docs"));
        assert_eq!(
            without.first().map(|r| r.address.as_str()),
            Some(CA_ADDRESS)
        );

        let state = State::new("reference", "kvm");
        let mut plan = crate::plan::plan("reference", "kvm", &without, &state, &[]);
        kube.annotate(&mut plan, Some(&Refreshed::default()));
        assert_eq!(plan.mode, Mode::Normal);
        assert!(
            plan.notes[0].starts_with("stage 4 of 4 (monitoring) skipped"),
            "{:?}",
            plan.notes
        );
        let stages: Vec<usize> = plan
            .changes
            .iter()
            .map(|c| c.stage.as_ref().unwrap().number)
            .collect();
        assert!(stages.windows(2).all(|w| w[0] <= w[1]), "{stages:?}");
        assert!(stages.iter().all(|&s| s < 4));
    }

    #[test]
    fn readiness_reads_rollouts_jobs_and_ingress_addresses() {
        let sts = kinds::find("apps/v1", "StatefulSet").unwrap();
        let rolling = json!({"metadata": {"generation": 2}, "spec": {"replicas": 3},
            "status": {"observedGeneration": 2, "readyReplicas": 3, "updatedReplicas": 2,
                       "currentRevision": "a", "updateRevision": "b"}});
        assert_eq!(
            readiness(sts, &rolling),
            Ok(Some("3 of 3 ready, 2 updated".to_string()))
        );
        let done = json!({"metadata": {"generation": 2}, "spec": {"replicas": 3},
            "status": {"observedGeneration": 2, "readyReplicas": 3, "updatedReplicas": 3,
                       "currentRevision": "b", "updateRevision": "b"}});
        assert_eq!(readiness(sts, &done), Ok(None));
        let job = kinds::find("batch/v1", "Job").unwrap();
        let failed =
            json!({"status": {"failed": 6, "conditions": [{"type": "Failed", "status": "True"}]}});
        assert!(readiness(job, &failed)
            .unwrap_err()
            .contains("6 failed pods"));
        let ingress = kinds::find("networking.k8s.io/v1", "Ingress").unwrap();
        assert!(readiness(ingress, &json!({"status": {}}))
            .unwrap()
            .is_some());
        let served = json!({"status": {"loadBalancer": {"ingress": [{"ip": "10.0.0.1"}]}}});
        assert_eq!(readiness(ingress, &served), Ok(None));
    }
}
