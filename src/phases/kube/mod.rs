//! The Kubernetes stages: the stack's objects applied to its cluster (the
//! one the bootstrap made, or an existing one named by kubeconfig) with
//! server-side apply, one phase per stage (namespaces and secrets,
//! workloads, ingress, monitoring), each gated on its objects' health; drift
//! read with one LIST per kind; prune of what carries the stack's labels but
//! is no longer declared; and an inventory in the cluster naming the kinds
//! and objects the stack made, so another machine or a lost state file still
//! finds them.
//!
//! The four stages share one [`Kube`]: one client, and one read of the
//! cluster per plan, made by the first stage that plans.

mod cluster;
pub mod drift;
mod gate;
pub mod kinds;
pub mod manifest;
mod refresh;
mod retry;
pub mod schema;
pub mod tls;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::artifacts::{Artifact, Artifacts};
use crate::engine::{
    Action, Change, ChangeInput, EndpointStatus, Expiring, Leftovers, Mode, Observed, Phase,
    PhaseError, PlanInput, PlanPart, Prepared, PriorFields, Resource, Retries, StageInput,
    StatusPart,
};
use crate::files::FileError;
use crate::future::BoxFuture;
use crate::model::{Stack, TlsSource};
use crate::state::{Record, State};
pub use cluster::{Cluster, ClusterError};
use gate::GateError;
use kinds::{Kind, Readiness, Stage, CHANGE_KIND_PREFIX};
use manifest::{ManifestError, Object, CA_ADDRESS, CA_KIND};
use refresh::Refreshed;
use tls::{Material, TlsError};

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Gate(#[from] GateError),
    #[error("the state's record of the stack CA cannot be read: {0}")]
    CaRecord(serde_json::Error),
    #[error("cannot keep the CA certificate")]
    Export(#[from] FileError),
    #[error("{change_kind} is not a kind stack applies")]
    UnknownKind { change_kind: String },
    #[error("the API server refused in a dry run, before anything of the stage changed:\n{}", refusals.join("\n"))]
    DryRun { refusals: Vec<String> },
    #[error("still there {} after deleting them: {}", humantime::format_duration(*timeout), left.join(", "))]
    NotGone {
        timeout: Duration,
        left: Vec<String>,
    },
    #[error("{}: the existing cluster's kubeconfig {} {problem}", file.display(), kubeconfig.display())]
    ExistingCluster {
        file: PathBuf,
        kubeconfig: PathBuf,
        problem: String,
    },
    #[error(transparent)]
    Kubeconfig(#[from] crate::kubeconfig::KubeconfigError),
    #[error("the plan being applied is not one of this session's latest: plan again")]
    NotPlanned,
    #[error("cannot work out the secrets of the stack's database clusters")]
    Secrets(#[source] PhaseError),
}

/// Objects another phase brings to the cluster (the database clusters'),
/// rendered with secrets it keeps: the Kubernetes layer applies, diffs,
/// prunes and inventories them with the stack's own.
pub trait Contribution: Send + Sync {
    /// The secrets to render with: as `state` recorded them, else as the
    /// cluster keeps them (`cluster`, when it can be read), else new.
    fn secrets<'a>(
        &'a self,
        state: &'a State,
        cluster: Option<&'a Cluster>,
    ) -> BoxFuture<'a, Result<serde_json::Value, PhaseError>>;

    /// The objects; without `secrets` (a stack being checked or destroyed)
    /// they are never applied.
    fn objects(
        &self,
        renderer: &manifest::Renderer,
        secrets: Option<&serde_json::Value>,
    ) -> Result<Vec<Object>, ManifestError>;
}

/// The objects a contribution brings, or none.
fn contributed<'a>(
    contribution: Option<&'a Arc<dyn Contribution>>,
    secrets: Option<&'a serde_json::Value>,
) -> impl Fn(&manifest::Renderer) -> Result<Vec<Object>, ManifestError> + 'a {
    move |renderer| match contribution {
        Some(c) => c.objects(renderer, secrets),
        None => Ok(Vec::new()),
    }
}

/// Where the cluster is.
#[derive(Debug, Clone)]
pub struct Target {
    pub kubeconfig: PathBuf,
    pub context: String,
}

/// The kubeconfig and context of an existing cluster, checked to be usable.
fn existing_cluster(stack: &Stack) -> Result<Option<Target>, KubeError> {
    let Some(path) = stack.kubernetes.as_ref().and_then(|k| k.kubeconfig.clone()) else {
        return Ok(None);
    };
    let path = match (path.strip_prefix("~"), std::env::var_os("HOME")) {
        (Ok(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ if path.is_relative() => stack.file.parent().unwrap_or(Path::new("")).join(&path),
        _ => path,
    };
    let problem = |problem: String| KubeError::ExistingCluster {
        file: stack.file.clone(),
        kubeconfig: path.clone(),
        problem,
    };
    let text =
        std::fs::read_to_string(&path).map_err(|e| problem(format!("cannot be read: {e}")))?;
    let config = crate::kubeconfig::parse(&text, &path.display().to_string())?;
    let context = match stack.kubernetes.as_ref().and_then(|k| k.context.clone()) {
        Some(context) => context,
        None => config["current-context"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| {
                problem("has no current-context: name one with kubernetes.context".to_string())
            })?,
    };
    let known: Vec<&str> = config["contexts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str())
        .collect();
    if !known.contains(&context.as_str()) {
        return Err(problem(format!(
            "has no context `{context}` (it has: {})",
            known.join(", ")
        )));
    }
    Ok(Some(Target {
        kubeconfig: path,
        context,
    }))
}

/// What one plan read and rendered, shared by the stages.
struct View {
    objects: Vec<Object>,
    ca: Option<Material>,
    /// `None` when the cluster was not read.
    refreshed: Option<Refreshed>,
    reachable: bool,
    /// The contributed objects' secrets they were rendered with.
    secrets: serde_json::Value,
}

/// What a plan knows of the cluster (see [`Kube::planned`]).
pub struct Planned {
    pub secrets: serde_json::Value,
    pub read: bool,
}

/// The stack's Kubernetes objects and the cluster they go to.
pub struct Kube {
    stack: Stack,
    namespace: String,
    healthy: Duration,
    /// Whether the stack made the cluster (it goes with the nodes).
    made: bool,
    target: Target,
    artifacts: Artifacts,
    /// The objects as rendered without the stack CA: their stages and
    /// endpoints do not depend on it.
    plain: Vec<Object>,
    /// The stage of each of them, by address.
    stages: BTreeMap<String, Stage>,
    cluster: tokio::sync::OnceCell<Cluster>,
    /// The objects another phase brings.
    contribution: Option<Arc<dyn Contribution>>,
    /// The retries of the cluster's calls.
    retries: retry::RetryLog,
    /// The views of the latest plans, by plan id.
    views: tokio::sync::Mutex<Vec<(u64, Arc<View>)>>,
}

/// How many plans' views are kept for applying them.
const VIEWS_KEPT: usize = 4;

/// Whether a record is of a Kubernetes object or of the stack CA.
fn is_kube(kind: &str) -> bool {
    kind.starts_with(CHANGE_KIND_PREFIX)
}

/// Where the stack's cluster is: the existing one it names, or the one it
/// makes (whose kubeconfig the bootstrap writes); `None` without a cluster.
pub fn target(stack: &Stack, artifacts: &Artifacts) -> Result<Option<Target>, KubeError> {
    if stack.kubernetes.is_none() {
        return Ok(None);
    }
    Ok(Some(existing_cluster(stack)?.unwrap_or_else(|| Target {
        kubeconfig: artifacts.path(&Artifact::Kubeconfig),
        context: stack.name.clone(),
    })))
}

/// What can be checked of the Kubernetes part without a cluster: an existing
/// cluster's kubeconfig has the context, and every object (the stack's own
/// manifests and the built-in ones) reads, renders and fits its schema.
pub fn check(
    stack: &Stack,
    contribution: Option<&Arc<dyn Contribution>>,
    diags: &mut crate::diag::Diagnostics,
) {
    if let Err(err) = existing_cluster(stack) {
        diags.push(
            stack.positions.of("kubernetes.kubeconfig"),
            "kubernetes.kubeconfig",
            "a kubeconfig with the context to deploy to",
            crate::error_chain::error_chain(&err),
        );
    }
    let Err(err) = manifest::render(stack, None, &contributed(contribution, None)) else {
        return;
    };
    let source = match &err {
        ManifestError::Read { path, .. } => Some(path.display().to_string()),
        ManifestError::Invalid { origin, .. } => Some(origin.clone()),
        ManifestError::Render { .. } => None,
    };
    let manifests = stack
        .kubernetes
        .as_ref()
        .map_or(&[][..], |k| &k.manifests[..]);
    let field = source
        .and_then(|source| {
            manifests
                .iter()
                .position(|entry| source.starts_with(&entry.display().to_string()))
        })
        .map_or_else(
            || "kubernetes".to_string(),
            |i| format!("kubernetes.manifests[{i}]"),
        );
    diags.push(
        stack.positions.of(&field),
        &field,
        "manifests that can be read and applied",
        crate::error_chain::error_chain(&err),
    );
}

impl Kube {
    /// The Kubernetes part of a stack; `None` when it has none.
    pub fn for_stack(
        stack: &Stack,
        artifacts: &Artifacts,
        contribution: Option<Arc<dyn Contribution>>,
    ) -> Result<Option<Arc<Kube>>, KubeError> {
        let Some(target) = target(stack, artifacts)? else {
            return Ok(None);
        };
        let made = stack
            .kubernetes
            .as_ref()
            .is_some_and(|k| k.kubeconfig.is_none());
        // Objects that cannot be rendered (a manifest folder gone) do not
        // keep a stack from being destroyed: `check` and a normal plan
        // report them.
        let plain = manifest::render(stack, None, &contributed(contribution.as_ref(), None))
            .unwrap_or_default();
        Ok(Some(Arc::new(Kube {
            namespace: stack
                .kubernetes
                .as_ref()
                .map_or_else(|| stack.name.clone(), |k| k.namespace.clone()),
            healthy: stack.timeouts.healthy,
            made,
            target,
            artifacts: artifacts.clone(),
            stages: plain.iter().map(|o| (o.address(), o.stage)).collect(),
            plain,
            stack: stack.clone(),
            cluster: tokio::sync::OnceCell::new(),
            contribution,
            retries: retry::RetryLog::default(),
            views: tokio::sync::Mutex::new(Vec::new()),
        })))
    }

    /// The client of the stack's cluster (connected on first use).
    pub async fn client(&self) -> Result<&Cluster, KubeError> {
        self.cluster().await
    }

    /// What a plan knows of the cluster, for the phase that contributes
    /// objects: the secrets they were rendered with, and whether the
    /// cluster was read (it is not while the stack makes it).
    pub async fn planned(&self, input: &PlanInput<'_>) -> Result<Planned, KubeError> {
        let view = self.view(input).await?;
        Ok(Planned {
            secrets: view.secrets.clone(),
            read: view.refreshed.is_some(),
        })
    }

    /// The secrets a plan's contributed objects were rendered with.
    pub async fn planned_secrets(&self, plan_id: u64) -> Result<serde_json::Value, KubeError> {
        Ok(self.view_of(plan_id).await?.secrets.clone())
    }

    /// The kubeconfig of the stack's cluster.
    pub fn kubeconfig(&self) -> &Path {
        &self.target.kubeconfig
    }

    /// One of the stages, as a phase of the stage list.
    pub fn stage(self: &Arc<Self>, stage: Stage) -> Arc<dyn Phase> {
        Arc::new(KubeStage {
            kube: self.clone(),
            stage,
        })
    }

    fn stage_of(&self, address: &str, change_kind: &str) -> Stage {
        self.stages
            .get(address)
            .copied()
            .or_else(|| Kind::of_change(change_kind).map(|k| k.stage))
            .unwrap_or(Stage::Foundation)
    }

    fn uses_stack_ca(&self) -> bool {
        self.stack
            .ingress
            .as_ref()
            .is_some_and(|i| matches!(i.tls, TlsSource::StackCa))
    }

    async fn cluster(&self) -> Result<&Cluster, KubeError> {
        Ok(self
            .cluster
            .get_or_try_init(|| {
                Cluster::connect(&self.target.kubeconfig, &self.target.context, &self.retries)
            })
            .await?)
    }

    /// The stack CA the state recorded.
    fn recorded_ca(state: &State) -> Result<Option<Material>, KubeError> {
        state
            .get(CA_ADDRESS)
            .map(|r| serde_json::from_value::<Material>(r.attrs.clone()))
            .transpose()
            .map_err(KubeError::CaRecord)
    }

    /// The stack CA as the cluster keeps it, for a machine without the
    /// state that made it.
    async fn ca_in_cluster(&self) -> Result<Option<Material>, KubeError> {
        let cluster = self.cluster().await?;
        let secrets = kinds::find("v1", "Secret").expect("Secret is a known kind");
        let ns = Some(self.namespace.as_str());
        let ca = cluster
            .get(secrets, ns, &manifest::ca_secret_name(&self.stack.name))
            .await?;
        let tls = cluster
            .get(secrets, ns, &manifest::tls_secret_name(&self.stack))
            .await?;
        Ok(match (ca, tls) {
            (Some(ca), Some(tls)) => manifest::material_from_secrets(&ca, &tls),
            _ => None,
        })
    }

    /// Renders the objects and reads the cluster, once per plan. A cluster
    /// the stack made is read only when it stands as it is: nodes or
    /// bootstrap steps about to change mean its API may not answer now, so
    /// the objects are planned against the state.
    async fn view(&self, input: &PlanInput<'_>) -> Result<Arc<View>, KubeError> {
        let mut views = self.views.lock().await;
        if let Some((_, view)) = views.iter().find(|(id, _)| *id == input.plan_id) {
            return Ok(view.clone());
        }
        let rebuilding = input.upstream.iter().any(|c| !is_kube(&c.kind));
        let reachable = !self.made || (self.target.kubeconfig.exists() && !rebuilding);
        let destroy = input.mode == Mode::Destroy;
        let ca = if self.uses_stack_ca() {
            let known = match Self::recorded_ca(input.state)? {
                // Without the state that made it, the CA comes from the cluster.
                None if reachable && !destroy => self.ca_in_cluster().await?,
                recorded => recorded,
            };
            let domain = self
                .stack
                .ingress
                .as_ref()
                .map_or("", |i| i.domain.as_str());
            Some(tls::material(&self.stack.name, domain, known)?)
        } else {
            None
        };
        // The contributed objects' secrets: as recorded, else as the
        // cluster keeps them (a machine without the state), else new.
        let secrets = match &self.contribution {
            Some(contribution) => {
                let cluster = if reachable && !destroy {
                    Some(self.cluster().await?)
                } else {
                    None
                };
                contribution
                    .secrets(input.state, cluster)
                    .await
                    .map_err(KubeError::Secrets)?
            }
            None => serde_json::Value::Null,
        };
        let objects = match manifest::render(
            &self.stack,
            ca.as_ref(),
            &contributed(self.contribution.as_ref(), Some(&secrets)),
        ) {
            Err(_) if destroy => Vec::new(),
            rendered => rendered?,
        };
        let records = input.state.only(|r| is_kube(&r.kind));
        let nothing = objects.is_empty() && records.resources.is_empty();
        let refreshed = if nothing || !reachable || (destroy && self.made) {
            None
        } else {
            let cluster = self.cluster().await?;
            let read = refresh::Read {
                cluster,
                stack: &self.stack.name,
                namespace: &self.namespace,
                objects: &objects,
                records: &records,
                every_kind: destroy,
            };
            let refreshed = read.run().await?;
            tracing::info!(requests = refreshed.requests, "read the cluster");
            Some(refreshed)
        };
        let view = Arc::new(View {
            objects,
            ca,
            refreshed,
            reachable,
            secrets,
        });
        views.push((input.plan_id, view.clone()));
        if views.len() > VIEWS_KEPT {
            views.remove(0);
        }
        Ok(view)
    }

    /// The view of the plan being applied.
    async fn view_of(&self, plan_id: u64) -> Result<Arc<View>, KubeError> {
        self.views
            .lock()
            .await
            .iter()
            .find(|(id, _)| *id == plan_id)
            .map(|(_, view)| view.clone())
            .ok_or(KubeError::NotPlanned)
    }

    /// What the stack wants of a stage; without the Prometheus Operator the
    /// monitoring stage wants nothing.
    fn desired(&self, view: &View, stage: Stage, records: &State) -> Vec<Resource> {
        let monitoring = view.refreshed.as_ref().is_none_or(|r| r.monitoring);
        let ca = view
            .ca
            .iter()
            .filter(|_| stage == Stage::Foundation)
            .map(|material| Resource {
                address: CA_ADDRESS.to_string(),
                kind: CA_KIND.to_string(),
                attrs: serde_json::to_value(material).expect("material serialises"),
                handling: Default::default(),
            });
        let objects = view
            .objects
            .iter()
            .filter(|o| o.stage == stage && (monitoring || stage != Stage::Monitoring))
            .map(|o| {
                let address = o.address();
                let recorded = records.get(&address).map(|r| &r.attrs);
                let handling = refresh::handling(o.kind, o.namespace.as_deref())
                    .replace(o.kind.replace_rules(&o.body, recorded))
                    .prior_fields(PriorFields::All);
                Resource {
                    address,
                    kind: o.kind.change_kind(),
                    attrs: o.body.clone(),
                    handling,
                }
            });
        ca.chain(objects).collect()
    }

    /// What was last applied stands for what is there (the cluster not read).
    fn assumed(records: &State) -> Vec<Observed> {
        records
            .resources
            .iter()
            .filter_map(|r| {
                let kind = Kind::of_change(&r.kind);
                let namespace = r.attrs["metadata"]["namespace"].as_str();
                Some(Observed {
                    address: r.address.clone(),
                    kind: r.kind.clone(),
                    id: r.id.clone()?,
                    attrs: r.attrs.clone(),
                    handling: kind
                        .map(|k| refresh::handling(k, namespace))
                        .unwrap_or_default(),
                })
            })
            .collect()
    }

    async fn plan_stage(&self, stage: Stage, input: PlanInput<'_>) -> Result<PlanPart, KubeError> {
        let view = self.view(&input).await?;
        let records = input.records;
        if input.mode == Mode::Destroy && self.made {
            // Removing the nodes removes the cluster and everything in it:
            // the records are only forgotten.
            return Ok(crate::engine::plan::forget_all(records));
        }
        let observed: Vec<Observed> = match &view.refreshed {
            Some(refreshed) => {
                let mut observed: Vec<Observed> = refreshed
                    .observed
                    .iter()
                    .filter(|o| self.stage_of(&o.address, &o.kind) == stage)
                    .cloned()
                    .collect();
                if stage == Stage::Foundation {
                    if let Some(record) = records.get(CA_ADDRESS) {
                        observed.push(Observed {
                            address: CA_ADDRESS.to_string(),
                            kind: CA_KIND.to_string(),
                            id: "ca".to_string(),
                            attrs: record.attrs.clone(),
                            handling: Default::default(),
                        });
                    }
                }
                observed
            }
            None => Self::assumed(records),
        };
        let mut desired = self.desired(&view, stage, records);
        if view.refreshed.is_none() && self.made {
            // The cluster is being made or changed: what it held may be gone
            // (a first node made again starts an empty cluster), so every
            // object is applied again, and gated, once the bootstrap is done.
            for resource in desired
                .iter_mut()
                .filter(|r| records.get(&r.address).is_some())
            {
                resource.handling.rebuild = Some(
                    "applied again once the bootstrap is done (the cluster is not read while it changes)"
                        .to_string(),
                );
            }
        }
        let mut part = match input.mode {
            Mode::Destroy => crate::engine::plan::destroy(records, &observed),
            _ => crate::engine::plan::diff(&desired, records, &observed),
        };
        if input.mode != Mode::Destroy {
            self.annotate(&mut part, &view, stage);
        }
        Ok(part)
    }

    /// Says what happened out of band: who took a field over, what was
    /// deleted, what appeared, what is being deleted; and what is left out.
    fn annotate(&self, part: &mut PlanPart, view: &View, stage: Stage) {
        let refreshed = view.refreshed.as_ref();
        let ca_secret = manifest::address(
            "Secret",
            Some(&self.namespace),
            &manifest::ca_secret_name(&self.stack.name),
        );
        for change in &mut part.changes {
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
                Action::Create => {
                    if let Some(since) = refreshed.and_then(|r| r.terminating.get(&change.address))
                    {
                        change.reason = format!(
                            "being deleted since {since} (Terminating): made again once it is gone"
                        );
                    }
                }
                Action::Delete if change.before.is_none() => {
                    change.reason =
                        "has the stack's labels but the stack does not declare it: pruned"
                            .to_string();
                }
                Action::Delete => {
                    change.reason = "no longer in the stack: pruned".to_string();
                }
                Action::Update | Action::Replace => {
                    let Some(live) = refreshed.and_then(|r| r.live.get(&change.address)) else {
                        continue;
                    };
                    let taken: Vec<String> = change
                        .fields
                        .iter()
                        .filter(|f| f.drift)
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
            }
        }
        if stage == Stage::Foundation && self.made && !view.reachable {
            part.notes.push(format!(
                "the cluster of stack {} is not read while its nodes or bootstrap change: its objects are planned against the state and applied, and waited for, once the bootstrap is done",
                self.stack.name
            ));
        }
        if stage == Stage::Monitoring
            && refreshed.is_some_and(|r| !r.monitoring)
            && view.objects.iter().any(|o| o.stage == Stage::Monitoring)
        {
            part.notes.push(format!(
                "skipped: the cluster has no Prometheus Operator (CRD {} is missing); enable the monitoring addon and run `stack up` again",
                kinds::SERVICE_MONITOR_CRD
            ));
        }
    }

    /// Waits until an object that is being deleted is gone.
    async fn wait_gone(
        &self,
        kind: &Kind,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<(), KubeError> {
        let cluster = self.cluster().await?;
        let deadline = Instant::now() + self.healthy;
        while cluster.get(kind, namespace, name).await?.is_some() {
            if Instant::now() >= deadline {
                return Err(KubeError::NotGone {
                    timeout: self.healthy,
                    left: vec![manifest::address(kind.kind, namespace, name)],
                });
            }
            tokio::time::sleep(gate::POLL).await;
        }
        Ok(())
    }

    async fn put(&self, change: &Change) -> Result<Record, KubeError> {
        let body = change.after.clone().unwrap_or_default();
        if change.kind == CA_KIND {
            let cert = body["caCert"].as_str().unwrap_or_default();
            self.artifacts
                .write(&Artifact::CaCertificate, cert.as_bytes())?;
            return Ok(Record {
                address: change.address.clone(),
                kind: change.kind.clone(),
                id: Some("ca".to_string()),
                attrs: body,
                pending_token: None,
            });
        }
        let kind = Kind::of_change(&change.kind).ok_or_else(|| KubeError::UnknownKind {
            change_kind: change.kind.clone(),
        })?;
        let name = body["metadata"]["name"].as_str().unwrap_or_default();
        let namespace = body["metadata"]["namespace"].as_str();
        let cluster = self.cluster().await?;
        if change.action == Action::Create {
            // One being deleted (Terminating) must be gone before it is made again.
            if let Some(live) = cluster.get(kind, namespace, name).await? {
                if live["metadata"]["deletionTimestamp"].is_string() {
                    self.wait_gone(kind, namespace, name).await?;
                }
            }
        }
        cluster.apply(kind, namespace, name, &body, false).await?;
        Ok(Record {
            address: change.address.clone(),
            kind: change.kind.clone(),
            id: Some(manifest::id(namespace, name)),
            attrs: body,
            pending_token: None,
        })
    }

    async fn delete(&self, change_kind: &str, id: &str) -> Result<(), KubeError> {
        if change_kind == CA_KIND {
            return Ok(self.artifacts.remove(&Artifact::CaCertificate)?);
        }
        let kind = Kind::of_change(change_kind).ok_or_else(|| KubeError::UnknownKind {
            change_kind: change_kind.to_string(),
        })?;
        let (namespace, name) = match id.split_once('/') {
            Some((ns, name)) => (Some(ns), name),
            None => (None, id),
        };
        self.cluster().await?.delete(kind, namespace, name).await?;
        // Gone means gone: a Namespace is Terminating while its objects go,
        // and an object being replaced must not be applied while it still exists.
        self.wait_gone(kind, namespace, name).await
    }

    async fn apply_change(&self, change: &Change) -> Result<Option<Record>, KubeError> {
        match change.action {
            Action::Create | Action::Update => Ok(Some(self.put(change).await?)),
            Action::Replace => {
                if let Some(id) = &change.id {
                    self.delete(&change.kind, id).await?;
                }
                Ok(Some(self.put(change).await?))
            }
            Action::Delete => {
                self.delete(&change.kind, change.id.as_deref().unwrap_or_default())
                    .await?;
                Ok(None)
            }
        }
    }

    /// Asks the API server to validate a stage's objects before any of them
    /// changes, so an object it refuses stops the stage untouched, with every
    /// refusal at once. Objects in a namespace the same stage makes, and
    /// objects to be made again, can only be checked by applying them.
    async fn dry_run(&self, changes: &[Change]) -> Result<(), KubeError> {
        let cluster = self.cluster().await?;
        let new_namespaces: BTreeSet<&str> = changes
            .iter()
            .filter(|c| c.kind == kinds::NAMESPACE_KIND && c.action == Action::Create)
            .filter_map(|c| c.after.as_ref()?["metadata"]["name"].as_str())
            .collect();
        let mut refusals = Vec::new();
        for change in changes.iter().filter(|c| c.action != Action::Replace) {
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
                refusals.push(format!("  {err}"));
            }
        }
        if refusals.is_empty() {
            Ok(())
        } else {
            Err(KubeError::DryRun { refusals })
        }
    }

    /// Records in the cluster which kinds and objects the stack made:
    /// `objects`, and the kinds of `also` besides theirs.
    async fn write_inventory(
        &self,
        objects: &[Object],
        also: &BTreeSet<String>,
    ) -> Result<(), KubeError> {
        let mut kinds: BTreeSet<String> = objects
            .iter()
            .map(|o| format!("{} {}", o.kind.api_version, o.kind.kind))
            .collect();
        kinds.extend(also.iter().cloned());
        let addresses: Vec<String> = objects.iter().map(Object::address).collect();
        let name = manifest::inventory_name(&self.stack.name);
        let body = json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "labels": {
                    manifest::MANAGED_BY: "stack",
                    manifest::PART_OF: self.stack.name,
                },
            },
            "data": {
                "kinds": kinds.into_iter().collect::<Vec<_>>().join("\n"),
                "objects": addresses.join("\n"),
            },
        });
        let config_map = kinds::find("v1", "ConfigMap").expect("ConfigMap is a known kind");
        self.cluster()
            .await?
            .apply(config_map, Some(&self.namespace), &name, &body, false)
            .await?;
        Ok(())
    }

    /// The stack's endpoints: HTTPS hosts from its Ingresses, TCP ports
    /// from its NodePort Services (read from the cluster when it answers).
    async fn endpoints(&self) -> Vec<EndpointStatus> {
        let mut endpoints = Vec::new();
        for object in &self.plain {
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

/// One stage of the Kubernetes objects.
struct KubeStage {
    kube: Arc<Kube>,
    stage: Stage,
}

impl KubeStage {
    async fn prepare(&self, input: StageInput<'_>) -> Result<Prepared, KubeError> {
        let kube = &self.kube;
        // Planned before the cluster could be read (it was being made), the
        // monitoring stage may find no Prometheus Operator: it says so and
        // skips, the rest of the stack stands.
        if self.stage == Stage::Monitoring
            && !kube
                .cluster()
                .await?
                .has_crd(kinds::SERVICE_MONITOR_CRD)
                .await?
        {
            return Ok(Prepared::Skip(format!(
                "the cluster has no Prometheus Operator (CRD {} is missing)",
                kinds::SERVICE_MONITOR_CRD
            )));
        }
        kube.dry_run(input.changes).await?;
        Ok(Prepared::Proceed)
    }

    /// Waits until every object of the stage this run applies or keeps is
    /// ready. After the first stage, the inventory names every kind the
    /// stack has or had, so a run that stops later still leaves it.
    async fn gate(&self, input: StageInput<'_>) -> Result<(), KubeError> {
        let kube = &self.kube;
        let view = kube.view_of(input.plan_id).await?;
        if self.stage == Stage::Foundation && !view.objects.is_empty() {
            let mut had: BTreeSet<String> = view
                .refreshed
                .iter()
                .flat_map(|r| r.inventory_kinds.iter().cloned())
                .collect();
            had.extend(input.state.resources.iter().filter_map(|r| {
                Kind::of_change(&r.kind).map(|k| format!("{} {}", k.api_version, k.kind))
            }));
            kube.write_inventory(&view.objects, &had).await?;
        }
        let applied: BTreeSet<&str> = input.changes.iter().map(|c| c.address.as_str()).collect();
        let objects: Vec<&Object> = view
            .objects
            .iter()
            .filter(|o| o.stage == self.stage && o.kind.readiness != Readiness::Exists)
            // Monitoring objects not in the plan were left out for want of the CRDs.
            .filter(|o| self.stage != Stage::Monitoring || applied.contains(o.address().as_str()))
            .collect();
        if objects.is_empty() {
            return Ok(());
        }
        let cluster = kube.cluster().await?;
        gate::wait_ready(
            cluster,
            &kube.stack.name,
            &objects,
            kube.healthy,
            input.stage,
            input.events,
        )
        .await?;
        Ok(())
    }

    /// After a whole apply: the inventory names exactly what the stack
    /// declares now; after a destroy of an existing cluster's objects, it goes.
    async fn finish(&self, input: StageInput<'_>) -> Result<(), KubeError> {
        let kube = &self.kube;
        if self.stage != Stage::Foundation {
            return Ok(());
        }
        let objects_changed = input
            .plan
            .iter()
            .any(|c| is_kube(&c.kind) && c.kind != CA_KIND);
        match input.mode {
            Mode::Normal if objects_changed => {
                let view = kube.view_of(input.plan_id).await?;
                if !view.objects.is_empty() {
                    kube.write_inventory(&view.objects, &BTreeSet::new())
                        .await?;
                }
            }
            // Always, even with nothing else left: an interrupted `down` may
            // have removed the objects and not it.
            Mode::Destroy if !kube.made => {
                let config_map = kinds::find("v1", "ConfigMap").expect("ConfigMap is a known kind");
                kube.cluster()
                    .await?
                    .delete(
                        config_map,
                        Some(&kube.namespace),
                        &manifest::inventory_name(&kube.stack.name),
                    )
                    .await?;
            }
            _ => {}
        }
        Ok(())
    }

    /// The expiring environments of the stack and of its runs in an
    /// existing cluster, by their namespaces' labels. (A cluster the stack
    /// made goes with its nodes, which the infrastructure finds.)
    async fn environments(&self) -> Result<Vec<Expiring>, KubeError> {
        let kube = &self.kube;
        if self.stage != Stage::Foundation || kube.made {
            return Ok(Vec::new());
        }
        let stack = &kube.stack;
        let base = stack.run.as_ref().map_or(&stack.name, |r| &r.of);
        let namespaces = kinds::find("v1", "Namespace").expect("Namespace is a kind stack applies");
        let selector = format!("{}=stack,{}", manifest::MANAGED_BY, manifest::EXPIRES_LABEL);
        let cluster = kube.cluster().await?;
        let mut found = Vec::new();
        for namespace in cluster
            .list(namespaces, &selector)
            .await?
            .unwrap_or_default()
        {
            let labels = &namespace["metadata"]["labels"];
            let label = |key: &str| labels[key].as_str();
            let (Some(name), Some(expires)) = (
                label(manifest::PART_OF),
                label(manifest::EXPIRES_LABEL).and_then(|e| e.parse::<u64>().ok()),
            ) else {
                continue;
            };
            if label(manifest::RUN_OF_LABEL).unwrap_or(name) == base {
                let thing = format!(
                    "namespace {}",
                    namespace["metadata"]["name"].as_str().unwrap_or_default()
                );
                Expiring::merge(&mut found, name, label(manifest::RUN_LABEL), expires, thing);
            }
        }
        Ok(found)
    }

    /// What is left with the stack's labels in an existing cluster, every
    /// kind stack applies listed. (A cluster the stack made goes with its nodes.)
    async fn leftovers(&self) -> Result<Leftovers, KubeError> {
        let kube = &self.kube;
        if self.stage != Stage::Foundation || kube.made {
            return Ok(Leftovers::default());
        }
        let cluster = kube.cluster().await?;
        let read = refresh::Read {
            cluster,
            stack: &kube.stack.name,
            namespace: &kube.namespace,
            objects: &[],
            records: &State::new(&kube.stack.name, ""),
            every_kind: true,
        };
        let refreshed = read.run().await?;
        let mut left: Vec<String> = refreshed.observed.into_iter().map(|o| o.address).collect();
        left.extend(
            refreshed
                .terminating
                .into_keys()
                .map(|a| format!("{a} (being deleted)")),
        );
        if refreshed.inventory {
            left.push(manifest::address(
                "ConfigMap",
                Some(&kube.namespace),
                &manifest::inventory_name(&kube.stack.name),
            ));
        }
        let listed = refreshed.kinds_listed.len();
        let unserved: Vec<&str> = kinds::KINDS
            .iter()
            .map(|k| k.kind)
            .filter(|k| !refreshed.kinds_listed.contains(k))
            .collect();
        let which = if unserved.is_empty() {
            format!("all {listed} kinds stack applies were listed")
        } else {
            format!(
                "{listed} kinds stack applies were listed; the cluster does not serve {}",
                unserved.join(", ")
            )
        };
        Ok(Leftovers {
            left,
            checked: Some(format!(
                "Nothing with the labels of stack {} is left in the existing cluster ({which}); the cluster itself is left as it is.",
                kube.stack.name
            )),
        })
    }

    async fn status(&self) -> StatusPart {
        let kube = &self.kube;
        let mut part = StatusPart::default();
        match self.stage {
            Stage::Foundation => {
                part.cluster = true;
                if kube.target.kubeconfig.exists() {
                    part.kubeconfig =
                        Some((kube.target.kubeconfig.clone(), kube.target.context.clone()));
                }
                let ca = kube.artifacts.path(&Artifact::CaCertificate);
                part.ca_certificate = ca.exists().then_some(ca);
            }
            Stage::Ingress => part.endpoints = kube.endpoints().await,
            Stage::Monitoring if kube.stack.monitoring.is_some() => {
                part.grafana = Some(format!(
                    "http://localhost:3000 after `kubectl --kubeconfig {} port-forward -n observability svc/kube-prom-stack-grafana 3000:80`",
                    kube.target.kubeconfig.display()
                ));
            }
            _ => {}
        }
        part
    }
}

impl Phase for KubeStage {
    fn name(&self) -> &str {
        self.stage.name()
    }

    fn owns(&self, record: &Record) -> bool {
        is_kube(&record.kind) && self.kube.stage_of(&record.address, &record.kind) == self.stage
    }

    fn plan<'a>(&'a self, input: PlanInput<'a>) -> BoxFuture<'a, Result<PlanPart, PhaseError>> {
        Box::pin(async move { Ok(self.kube.plan_stage(self.stage, input).await?) })
    }

    fn prepare<'a>(&'a self, input: StageInput<'a>) -> BoxFuture<'a, Result<Prepared, PhaseError>> {
        Box::pin(async move { Ok(self.prepare(input).await?) })
    }

    fn apply<'a>(
        &'a self,
        change: &'a Change,
        _input: ChangeInput<'a>,
    ) -> BoxFuture<'a, Result<Option<Record>, PhaseError>> {
        Box::pin(async move { Ok(self.kube.apply_change(change).await?) })
    }

    fn gate<'a>(&'a self, input: StageInput<'a>) -> BoxFuture<'a, Result<(), PhaseError>> {
        Box::pin(async move { Ok(self.gate(input).await?) })
    }

    fn finish<'a>(&'a self, input: StageInput<'a>) -> BoxFuture<'a, Result<(), PhaseError>> {
        Box::pin(async move { Ok(self.finish(input).await?) })
    }

    fn leftovers(&self) -> BoxFuture<'_, Result<Leftovers, PhaseError>> {
        Box::pin(async move { Ok(self.leftovers().await?) })
    }

    fn environments(&self) -> BoxFuture<'_, Result<Vec<Expiring>, PhaseError>> {
        Box::pin(async move { Ok(self.environments().await?) })
    }

    fn status<'a>(&'a self, _state: &'a State) -> BoxFuture<'a, Result<StatusPart, PhaseError>> {
        Box::pin(async move { Ok(self.status().await) })
    }

    /// The stages share one client: the first stage reports its retries.
    fn retries(&self) -> Option<Retries> {
        (self.stage == Stage::Foundation).then(|| Retries {
            service: "Kubernetes".to_string(),
            count: self.kube.retries.count(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    const STAGES: [Stage; 4] = [
        Stage::Foundation,
        Stage::Workloads,
        Stage::Ingress,
        Stage::Monitoring,
    ];

    fn reference() -> Arc<Kube> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("stacks/reference.yaml");
        let stack = crate::model::load(&path).unwrap();
        let dir = tempfile::tempdir().unwrap();
        Kube::for_stack(&stack, &Artifacts::new(dir.path(), &stack.name), None)
            .unwrap()
            .unwrap()
    }

    /// A cluster the stack makes, being changed (its kubeconfig not there):
    /// not read, so what it held is applied again after the bootstrap, and
    /// its stage gated, as a first node made again starts an empty cluster.
    #[tokio::test]
    async fn objects_of_a_cluster_being_made_again_are_applied_again() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("stacks/local.yaml");
        let stack = crate::model::load(&path).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let kube = Kube::for_stack(&stack, &Artifacts::new(dir.path(), &stack.name), None)
            .unwrap()
            .unwrap();
        let object = kube
            .plain
            .iter()
            .find(|o| o.stage == Stage::Workloads)
            .unwrap();
        let mut state = State::new("local", "kvm");
        state.put(Record {
            address: object.address(),
            kind: object.kind.change_kind(),
            id: Some(object.id()),
            attrs: object.body.clone(),
            pending_token: None,
        });
        let records = state.clone();
        let stage = crate::engine::StageRef {
            number: 4,
            of: 6,
            name: "workloads".into(),
        };
        let input = PlanInput {
            mode: Mode::Normal,
            stage: &stage,
            state: &state,
            records: &records,
            upstream: &[],
            plan_id: 1,
            adopt: false,
            cancel: &crate::engine::Cancel::new(),
            events: &crate::engine::Events::discard(),
        };
        let part = kube.plan_stage(Stage::Workloads, input).await.unwrap();
        let again = part
            .changes
            .iter()
            .find(|c| c.address == object.address())
            .expect("the recorded object is planned");
        assert_eq!(again.action, Action::Create);
        assert!(
            again
                .reason
                .starts_with("applied again once the bootstrap is done"),
            "{}",
            again.reason
        );
    }

    #[test]
    fn records_belong_to_the_stage_of_their_object_or_of_their_kind() {
        let kube = reference();
        let record = |address: &str, kind: &str| Record {
            address: address.to_string(),
            kind: kind.to_string(),
            id: None,
            attrs: Value::Null,
            pending_token: None,
        };
        let stage_of = |r: &Record| {
            STAGES.iter().copied().find(|s| {
                KubeStage {
                    kube: kube.clone(),
                    stage: *s,
                }
                .owns(r)
            })
        };
        assert_eq!(
            stage_of(&record(
                "k8s.demo/Service/ledger-read-tcp",
                "k8s:v1:Service"
            )),
            Some(Stage::Ingress),
            "a TCP endpoint's Service is of the ingress stage"
        );
        assert_eq!(
            stage_of(&record("k8s.demo/Service/gone", "k8s:v1:Service")),
            Some(Stage::Workloads)
        );
        assert_eq!(
            stage_of(&record(
                "k8s.observability/ConfigMap/reference-docs-dashboard",
                "k8s:v1:ConfigMap"
            )),
            Some(Stage::Monitoring)
        );
        assert_eq!(
            stage_of(&record(CA_ADDRESS, CA_KIND)),
            Some(Stage::Foundation)
        );
        assert_eq!(stage_of(&record("ec2.instance.a[0]", "instance")), None);
    }

    #[test]
    fn without_the_prometheus_operator_the_monitoring_stage_wants_nothing_and_says_so() {
        let kube = reference();
        let state = State::new("reference", "kvm");
        let objects = manifest::render(&kube.stack, None, &contributed(None, None)).unwrap();
        let unread = View {
            objects: objects.clone(),
            ca: None,
            refreshed: None,
            reachable: true,
            secrets: serde_json::Value::Null,
        };
        assert!(kube
            .desired(&unread, Stage::Monitoring, &state)
            .iter()
            .any(|r| r.kind == "k8s:monitoring.coreos.com/v1:ServiceMonitor"));
        let without = View {
            objects,
            ca: None,
            refreshed: Some(Refreshed::default()),
            reachable: true,
            secrets: serde_json::Value::Null,
        };
        assert!(kube.desired(&without, Stage::Monitoring, &state).is_empty());
        let mut part = crate::engine::plan::diff(&[], &state, &[]);
        kube.annotate(&mut part, &without, Stage::Monitoring);
        assert!(
            part.notes[0].starts_with("skipped: the cluster has no Prometheus Operator"),
            "{:?}",
            part.notes
        );
    }
}
