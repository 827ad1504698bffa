//! The few API calls stack makes, over kube's client: LIST a kind by label
//! selector, server-side apply under stack's field manager, GET, DELETE,
//! and the events of an object. Every call has a timeout and is retried
//! after transient errors (see `retry`); objects travel as JSON so any kind
//! in the table can be handled the same way.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::ApiResource;
use serde_json::Value;

use super::drift::FIELD_MANAGER;
use super::kinds::Kind;
use super::retry::{self, RetryLog};

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot use kubeconfig {} (context {context})", path.display())]
    Config {
        path: PathBuf,
        context: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("cannot make a Kubernetes client for context {context}")]
    Client {
        context: String,
        #[source]
        source: kube::Error,
    },
    #[error("{verb} {what} on cluster {context} failed: {reason}")]
    Api {
        verb: &'static str,
        what: String,
        context: String,
        reason: String,
    },
}

/// A connected cluster.
pub struct Cluster {
    client: kube::Client,
    /// The same connection without the retry layer, for requests that go
    /// through the API server's proxy to a pod: what an answer means there
    /// (a 500 from a database) is the caller's to judge.
    direct: kube::Client,
    context: String,
    /// How many requests this run sent (`plan` reports it with `-v`).
    requests: AtomicUsize,
}

/// An API error as the API server put it (`409 Conflict: …`), anything else with its causes.
fn describe(err: &kube::Error) -> String {
    match err {
        kube::Error::Api(status) => {
            format!("{} {}: {}", status.code, status.reason, status.message)
        }
        other => crate::error_chain::error_chain(other),
    }
}

fn pod_resource() -> ApiResource {
    ApiResource {
        group: String::new(),
        version: "v1".into(),
        api_version: "v1".into(),
        kind: "Pod".into(),
        plural: "pods".into(),
    }
}

fn not_found(err: &kube::Error) -> bool {
    matches!(err, kube::Error::Api(status) if status.code == 404)
}

impl Cluster {
    /// A client for `context`, its retries counted in `retries`.
    pub async fn connect(
        kubeconfig: &Path,
        context: &str,
        retries: &RetryLog,
    ) -> Result<Cluster, ClusterError> {
        let config_error = |source| ClusterError::Config {
            path: kubeconfig.to_path_buf(),
            context: context.to_string(),
            source,
        };
        let file = Kubeconfig::read_from(kubeconfig).map_err(config_error)?;
        let options = KubeConfigOptions {
            context: Some(context.to_string()),
            ..KubeConfigOptions::default()
        };
        let mut config = kube::Config::from_custom_kubeconfig(file, &options)
            .await
            .map_err(config_error)?;
        config.headers.push((
            http::header::USER_AGENT,
            http::HeaderValue::from_static(concat!("stack/", env!("CARGO_PKG_VERSION"))),
        ));
        config.connect_timeout = Some(Duration::from_secs(10));
        config.read_timeout = Some(Duration::from_secs(60));
        config.write_timeout = Some(Duration::from_secs(60));
        // Retried by stack's own layer, which logs and counts every retry.
        config.default_retry = false;
        let client_error = |source| ClusterError::Client {
            context: context.to_string(),
            source,
        };
        let direct = kube::client::ClientBuilder::try_from(config.clone())
            .map_err(client_error)?
            .build();
        let client = kube::client::ClientBuilder::try_from(config)
            .map_err(client_error)?
            .with_layer(retries)
            .build();
        Ok(Cluster {
            client,
            direct,
            context: context.to_string(),
            requests: AtomicUsize::new(0),
        })
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::Relaxed)
    }

    /// The client for proxied requests (no retry layer).
    pub fn direct(&self) -> kube::Client {
        self.direct.clone()
    }

    /// The context, as errors name the cluster.
    pub fn context(&self) -> &str {
        &self.context
    }

    /// The pods in `namespace` matching `selector`, with one request.
    pub async fn pods(&self, namespace: &str, selector: &str) -> Result<Vec<Value>, ClusterError> {
        let list = self
            .api(&pod_resource(), Some(namespace))
            .list(&ListParams::default().labels(selector))
            .await
            .map_err(self.failed("listing", format!("pods {selector} in {namespace}")))?;
        Ok(list
            .items
            .into_iter()
            .map(|item| serde_json::to_value(item).expect("an object serialises"))
            .collect())
    }

    /// Deletes a pod (its controller makes it again); one already gone is fine.
    pub async fn delete_pod(&self, namespace: &str, name: &str) -> Result<(), ClusterError> {
        let api = self.api(&pod_resource(), Some(namespace));
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(err) if not_found(&err) => Ok(()),
            Err(err) => Err(self.failed("deleting", format!("pod {namespace}/{name}"))(
                err,
            )),
        }
    }

    fn api(&self, resource: &ApiResource, namespace: Option<&str>) -> Api<DynamicObject> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        match namespace {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, resource),
            None => Api::all_with(self.client.clone(), resource),
        }
    }

    fn failed(&self, verb: &'static str, what: String) -> impl FnOnce(kube::Error) -> ClusterError {
        let context = self.context.clone();
        move |err| {
            let mut reason = describe(&err);
            if retry::is_transient(&err) {
                reason.push_str(&format!(" (a transient error that outlasted {} retries: what finished is recorded in state, and the next run continues from there)", retry::MAX_RETRIES));
            }
            ClusterError::Api {
                verb,
                what,
                context,
                reason,
            }
        }
    }

    /// Every object of `kind` in every namespace matching `selector`, with
    /// one request; `None` when the cluster does not serve the kind.
    pub async fn list(
        &self,
        kind: &Kind,
        selector: &str,
    ) -> Result<Option<Vec<Value>>, ClusterError> {
        let api = self.api(&kind.resource(), None);
        match api.list(&ListParams::default().labels(selector)).await {
            Ok(list) => Ok(Some(
                list.items
                    .into_iter()
                    .map(|item| {
                        let mut item = serde_json::to_value(item).expect("an object serialises");
                        // A LIST's items carry no apiVersion and kind.
                        item["apiVersion"] = Value::from(kind.api_version);
                        item["kind"] = Value::from(kind.kind);
                        item
                    })
                    .collect(),
            )),
            Err(err) if not_found(&err) => Ok(None),
            Err(err) => Err(self.failed("listing", kind.plural.to_string())(err)),
        }
    }

    pub async fn get(
        &self,
        kind: &Kind,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Option<Value>, ClusterError> {
        let api = self.api(&kind.resource(), namespace);
        let what = || format!("{} {}", kind.kind, super::manifest::id(namespace, name));
        match api.get_opt(name).await {
            Ok(found) => Ok(found.map(|o| serde_json::to_value(o).expect("an object serialises"))),
            Err(err) => Err(self.failed("reading", what())(err)),
        }
    }

    /// Whether the cluster has the CustomResourceDefinition `name`.
    pub async fn has_crd(&self, name: &str) -> Result<bool, ClusterError> {
        let crds = ApiResource {
            group: "apiextensions.k8s.io".into(),
            version: "v1".into(),
            api_version: "apiextensions.k8s.io/v1".into(),
            kind: "CustomResourceDefinition".into(),
            plural: "customresourcedefinitions".into(),
        };
        match self.api(&crds, None).get_opt(name).await {
            Ok(found) => Ok(found.is_some()),
            Err(err) => Err(self
                .failed("reading", format!("CustomResourceDefinition {name}"))(
                err
            )),
        }
    }

    /// Server-side apply under stack's field manager, taking over fields
    /// another manager changed (the plan showed who). With `dry_run` the API
    /// server validates and defaults the object and keeps nothing.
    pub async fn apply(
        &self,
        kind: &Kind,
        namespace: Option<&str>,
        name: &str,
        body: &Value,
        dry_run: bool,
    ) -> Result<Value, ClusterError> {
        self.apply_as(FIELD_MANAGER, kind, namespace, name, body, dry_run)
            .await
    }

    /// Server-side apply under field manager `manager`, taking over the
    /// fields it sets (`stack upgrade` sets a StatefulSet's image and
    /// partition this way, leaving the rest to stack's own apply).
    pub async fn apply_as(
        &self,
        manager: &str,
        kind: &Kind,
        namespace: Option<&str>,
        name: &str,
        body: &Value,
        dry_run: bool,
    ) -> Result<Value, ClusterError> {
        let api = self.api(&kind.resource(), namespace);
        let mut params = PatchParams::apply(manager).force();
        params.dry_run = dry_run;
        let verb = if dry_run {
            "dry-run applying"
        } else {
            "applying"
        };
        let what = format!("{} {}", kind.kind, super::manifest::id(namespace, name));
        api.patch(name, &params, &Patch::Apply(body))
            .await
            .map(|o| serde_json::to_value(o).expect("an object serialises"))
            .map_err(self.failed(verb, what))
    }

    /// Deletes an object; one already gone is fine.
    pub async fn delete(
        &self,
        kind: &Kind,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<(), ClusterError> {
        let api = self.api(&kind.resource(), namespace);
        let what = format!("{} {}", kind.kind, super::manifest::id(namespace, name));
        match api.delete(name, &DeleteParams::background()).await {
            Ok(_) => Ok(()),
            Err(err) if not_found(&err) => Ok(()),
            Err(err) => Err(self.failed("deleting", what)(err)),
        }
    }

    /// The latest events about an object, oldest first, as `reason: message` lines.
    pub async fn events(&self, namespace: &str, name: &str) -> Result<Vec<String>, ClusterError> {
        let events = ApiResource {
            group: String::new(),
            version: "v1".into(),
            api_version: "v1".into(),
            kind: "Event".into(),
            plural: "events".into(),
        };
        let params = ListParams::default().fields(&format!("involvedObject.name={name}"));
        let list = self
            .api(&events, Some(namespace))
            .list(&params)
            .await
            .map_err(self.failed("listing", format!("events of {namespace}/{name}")))?;
        let mut lines: Vec<(String, String)> = list
            .items
            .into_iter()
            .map(|event| {
                let at = event.data["lastTimestamp"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                let line = format!(
                    "{} {}: {}",
                    event.data["type"].as_str().unwrap_or("Normal"),
                    event.data["reason"].as_str().unwrap_or("?"),
                    event.data["message"].as_str().unwrap_or("").trim()
                );
                (at, line)
            })
            .collect();
        lines.sort();
        Ok(lines
            .into_iter()
            .rev()
            .take(5)
            .rev()
            .map(|(_, l)| l)
            .collect())
    }
}
