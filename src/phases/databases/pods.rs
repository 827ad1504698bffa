//! The pods of a database cluster as Kubernetes reports them: every kind
//! lists its pods by its labels and reads their readiness the same way.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::phases::kube::{Cluster, ClusterError};

/// A StatefulSet `stack upgrade` rolls to a new image one member at a
/// time, from the highest ordinal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollingSet {
    pub statefulset: String,
    /// The container whose image changes (sidecars keep theirs).
    pub container: String,
    pub replicas: u32,
}

/// A pod of a cluster: its name and whether it is ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    pub name: String,
    pub ready: bool,
}

/// Whether a pod is ready and not being deleted.
pub fn is_ready(pod: &Value) -> bool {
    pod["metadata"]["deletionTimestamp"].is_null()
        && pod["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

/// Labels as a label selector (`k=v,k=v`).
pub fn selector(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The pods with `labels` in `namespace`, by name.
pub async fn list(
    cluster: &Cluster,
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> Result<Vec<Pod>, ClusterError> {
    let pods = cluster.pods(namespace, &selector(labels)).await?;
    let mut out: Vec<Pod> = pods
        .iter()
        .filter_map(|p| {
            Some(Pod {
                name: p["metadata"]["name"].as_str()?.to_string(),
                ready: is_ready(p),
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}
