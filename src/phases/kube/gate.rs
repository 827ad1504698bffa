//! A stage's health gate: its objects are ready as `kubectl rollout status`
//! judges a rollout (the current generation observed, every replica updated,
//! no old replica left, the updated ones available), Jobs succeed and
//! Ingresses get an address, within the stack's `timeouts.healthy`. An object
//! that is not ready is described with why, its conditions and its latest
//! events.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::cluster::{Cluster, ClusterError};
use super::kinds::{Kind, Readiness};
use super::manifest::{self, Object};
use crate::engine::{Event, Events, StageRef};

/// How often a wait reads the cluster again.
pub const POLL: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("not ready after {}:\n{}", humantime::format_duration(*timeout), details.join("\n"))]
    NotReady {
        timeout: Duration,
        details: Vec<String>,
    },
    #[error("{}", details.join("\n"))]
    Failed { details: Vec<String> },
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

/// `Ok(None)` when ready, `Ok(Some(why not yet))`, or `Err(why it never will be)`.
pub fn readiness(kind: &Kind, live: &Value) -> Result<Option<String>, String> {
    let status = &live["status"];
    let count = |v: &Value| v.as_i64().unwrap_or(0);
    let generation = count(&live["metadata"]["generation"]);
    let observed = count(&status["observedGeneration"]);
    let condition = |kind: &str| {
        status["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == kind)
    };
    let holds = |kind: &str| condition(kind).is_some_and(|c| c["status"] == "True");
    let waiting = |why: String| Ok(Some(why));
    match (kind.readiness, kind.kind) {
        (Readiness::Exists, _) => Ok(None),
        (Readiness::Rollout, _) if observed < generation || observed == 0 => {
            waiting("the current generation is not observed yet".to_string())
        }
        (Readiness::Rollout, "Deployment") => {
            if condition("Progressing").is_some_and(|c| c["reason"] == "ProgressDeadlineExceeded") {
                return Err("the rollout exceeded its progress deadline".to_string());
            }
            let want = live["spec"]["replicas"].as_i64().unwrap_or(1);
            let replicas = count(&status["replicas"]);
            let updated = count(&status["updatedReplicas"]);
            let available = count(&status["availableReplicas"]);
            if updated < want {
                waiting(format!("{updated} of {want} new replicas updated"))
            } else if replicas > updated {
                waiting(format!(
                    "{} old replica{} pending termination",
                    replicas - updated,
                    if replicas - updated == 1 { "" } else { "s" }
                ))
            } else if available < updated {
                waiting(format!(
                    "{available} of {updated} updated replicas available"
                ))
            } else {
                Ok(None)
            }
        }
        (Readiness::Rollout, "StatefulSet") => {
            let want = live["spec"]["replicas"].as_i64().unwrap_or(1);
            let ready = count(&status["readyReplicas"]);
            let updated = count(&status["updatedReplicas"]);
            let strategy = &live["spec"]["updateStrategy"];
            if strategy["type"] == "OnDelete" {
                return Ok(None);
            }
            if ready < want {
                return waiting(format!("{ready} of {want} ready, {updated} updated"));
            }
            let partition = strategy["rollingUpdate"]["partition"].as_i64().unwrap_or(0);
            if partition > 0 {
                return if updated < want - partition {
                    waiting(format!(
                        "{updated} of {} updated above the partition",
                        want - partition
                    ))
                } else {
                    Ok(None)
                };
            }
            if status["currentRevision"] != status["updateRevision"] {
                return waiting(format!("{ready} of {want} ready, {updated} updated"));
            }
            Ok(None)
        }
        (Readiness::Rollout, _) => {
            let want = count(&status["desiredNumberScheduled"]);
            let updated = count(&status["updatedNumberScheduled"]);
            let available = count(&status["numberAvailable"]);
            if updated < want || available < want {
                waiting(format!(
                    "{available} of {want} pods available, {updated} updated"
                ))
            } else {
                Ok(None)
            }
        }
        (Readiness::Job, _) => {
            if holds("Failed") {
                return Err(format!(
                    "the Job failed ({} failed pods)",
                    count(&status["failed"])
                ));
            }
            if holds("Complete") {
                Ok(None)
            } else {
                waiting(format!("{} succeeded so far", count(&status["succeeded"])))
            }
        }
        (Readiness::Address, _) => {
            if status["loadBalancer"]["ingress"]
                .as_array()
                .is_some_and(|a| !a.is_empty())
            {
                Ok(None)
            } else {
                waiting("no address from the ingress controller yet".to_string())
            }
        }
    }
}

/// An object that is not ready: why, its conditions and its latest events.
async fn describe(cluster: &Cluster, object: &Object, why: &str, live: Option<&Value>) -> String {
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

/// Waits until every one of `objects` is ready (one LIST per kind a poll),
/// telling `events` how many are; fails at once when one never will be.
pub async fn wait_ready(
    cluster: &Cluster,
    stack: &str,
    objects: &[&Object],
    timeout: Duration,
    stage: &StageRef,
    events: &Events,
) -> Result<(), GateError> {
    if objects.is_empty() {
        return Ok(());
    }
    let selector = manifest::selector(stack);
    let deadline = Instant::now() + timeout;
    let mut told = None;
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
        for object in objects {
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
                details.push(describe(cluster, object, &why, Some(&item)).await);
            }
            return Err(GateError::Failed { details });
        }
        let ready = objects.len() - waiting.len();
        if told != Some(ready) {
            told = Some(ready);
            events.emit(Event::GateWaiting {
                stage: stage.clone(),
                ready,
                total: objects.len(),
                waiting: waiting
                    .iter()
                    .map(|(o, why)| format!("{} {}: {why}", o.kind.kind, o.id()))
                    .collect(),
                limit: timeout,
            });
        }
        if waiting.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let mut details = Vec::new();
            for (object, why) in waiting {
                let item = live.get(&object.address());
                details.push(describe(cluster, object, &why, item).await);
            }
            return Err(GateError::NotReady { timeout, details });
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::super::kinds;
    use super::*;
    use serde_json::json;

    #[test]
    fn statefulsets_jobs_and_ingresses() {
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

    #[test]
    fn a_deployment_with_an_old_pod_still_serving_is_not_rolled_out() {
        let deployment = kinds::find("apps/v1", "Deployment").unwrap();
        // An image change to 2 replicas, half way: both new pods updated and
        // available, an old one still there (what the gate once let through).
        let halfway = json!({"metadata": {"generation": 3}, "spec": {"replicas": 2},
            "status": {"observedGeneration": 3, "replicas": 3, "updatedReplicas": 2,
                       "availableReplicas": 2, "unavailableReplicas": 1}});
        assert_eq!(
            readiness(deployment, &halfway),
            Ok(Some("1 old replica pending termination".to_string()))
        );
        let done = json!({"metadata": {"generation": 3}, "spec": {"replicas": 2},
            "status": {"observedGeneration": 3, "replicas": 2, "updatedReplicas": 2,
                       "availableReplicas": 2}});
        assert_eq!(readiness(deployment, &done), Ok(None));
        let stale = json!({"metadata": {"generation": 4}, "spec": {"replicas": 2},
            "status": {"observedGeneration": 3, "replicas": 2, "updatedReplicas": 2,
                       "availableReplicas": 2}});
        assert!(readiness(deployment, &stale).unwrap().is_some());
        let stuck = json!({"metadata": {"generation": 3}, "spec": {"replicas": 2},
            "status": {"observedGeneration": 3, "conditions": [
                {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}]}});
        assert!(readiness(deployment, &stuck).is_err());
    }
}
