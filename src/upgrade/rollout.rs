//! Rolls a database cluster onto another image one member at a time, each
//! member gated on its pod's readiness and then on the database's own
//! health, and rolls a failed rollout back so the cluster ends whole on the
//! image it had.
//!
//! Each StatefulSet gets a partitioned rolling update: the image and a
//! partition equal to its size (nothing moves), then the partition lowered
//! one ordinal at a time from the highest, so the StatefulSet controller
//! replaces exactly one member per step. Replicas and copies go before the
//! primary or controlling instance. Both fields are applied with
//! server-side apply under a field manager of their own, so stack's own
//! apply keeps the rest of the object. A rollback applies the old image the
//! same way, after deleting the failed member's pod: the controller does not
//! replace a pod that never became ready (kubernetes/kubernetes#67250), and a
//! deleted pod comes back on the revision its ordinal is due.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::engine::{Cancel, Event, Events, Level};
use crate::phases::databases::pods::{self, RollingSet};
use crate::phases::kube::{kinds, Cluster, ClusterError};

/// The field manager of the image and partition a rollout sets.
pub const FIELD_MANAGER: &str = "stack-upgrade";

/// How often a member's pod is read while it is replaced.
const POLL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error("database {database}: cannot roll StatefulSet {statefulset}")]
    Cluster {
        database: String,
        statefulset: String,
        #[source]
        source: ClusterError,
    },
    #[error("database {database}: the rollout was interrupted at pod {pod}; members may run either image: run `stack upgrade` again to finish it, or `stack up` to go back to the stack file's image")]
    Stopped { database: String, pod: String },
}

/// One rollout: a database from one image to another.
pub struct Rollout {
    pub database: String,
    pub namespace: String,
    pub from: String,
    pub to: String,
    /// In the order they are rolled.
    pub sets: Vec<RollingSet>,
    /// How long a member may take to be ready and the cluster healthy.
    pub health_timeout: Duration,
    /// Whether a failed member rolls the cluster back.
    pub rollback: bool,
}

/// How a rollout ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    Succeeded,
    /// `pod` failed; the cluster is back on the old image.
    RolledBack {
        pod: String,
        reason: String,
    },
    /// `pod` failed and the cluster was left as it stood; `rollback` says
    /// why the rollback failed, when one ran.
    Failed {
        pod: String,
        reason: String,
        rollback: Option<String>,
    },
}

/// Why a member step did not pass.
enum StepError {
    Unhealthy(String),
    Stopped,
    Cluster(String, ClusterError),
}

impl Rollout {
    fn pod(set: &RollingSet, ordinal: u32) -> String {
        format!("{}-{ordinal}", set.statefulset)
    }

    /// Sets `image` and `partition` on `set`.
    async fn apply(
        &self,
        cluster: &Cluster,
        set: &RollingSet,
        image: &str,
        partition: u32,
    ) -> Result<(), ClusterError> {
        let body = json!({
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": {"name": set.statefulset, "namespace": self.namespace},
            "spec": {
                "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"partition": partition}},
                "template": {"spec": {"containers": [{"name": set.container, "image": image}]}},
            },
        });
        let kind = kinds::find("apps/v1", "StatefulSet").expect("StatefulSet is a known kind");
        cluster
            .apply_as(
                FIELD_MANAGER,
                kind,
                Some(&self.namespace),
                &set.statefulset,
                &body,
                false,
            )
            .await
            .map(|_| ())
    }

    /// Waits until member `ordinal` of `set` runs the StatefulSet's update
    /// revision and is ready.
    async fn member_ready(
        &self,
        cluster: &Cluster,
        set: &RollingSet,
        ordinal: u32,
        deadline: Instant,
        cancel: &Cancel,
    ) -> Result<(), StepError> {
        let kind = kinds::find("apps/v1", "StatefulSet").expect("StatefulSet is a known kind");
        let pod = Self::pod(set, ordinal);
        let selector = format!("statefulset.kubernetes.io/pod-name={pod}");
        let failed = |e| StepError::Cluster(set.statefulset.clone(), e);
        loop {
            let sts = cluster
                .get(kind, Some(&self.namespace), &set.statefulset)
                .await
                .map_err(failed)?
                .unwrap_or(Value::Null);
            let found = cluster
                .pods(&self.namespace, &selector)
                .await
                .map_err(failed)?;
            let why = member_state(&sts, found.first());
            let Some(why) = why else {
                return Ok(());
            };
            if Instant::now() >= deadline {
                return Err(StepError::Unhealthy(format!(
                    "pod {pod} was not ready on the new revision within {}: {why}",
                    humantime::format_duration(self.health_timeout)
                )));
            }
            if cancel
                .until(Level::Soon, tokio::time::sleep(POLL))
                .await
                .is_err()
            {
                return Err(StepError::Stopped);
            }
        }
    }

    /// Replaces member `ordinal` of `set` with `image`, then waits for it
    /// and for the cluster's health.
    async fn step(
        &self,
        cluster: &Cluster,
        set: &RollingSet,
        ordinal: u32,
        image: &str,
        health: &impl AsyncFn(Duration) -> Result<(), String>,
        cancel: &Cancel,
    ) -> Result<(), StepError> {
        let deadline = Instant::now() + self.health_timeout;
        self.apply(cluster, set, image, ordinal)
            .await
            .map_err(|e| StepError::Cluster(set.statefulset.clone(), e))?;
        self.member_ready(cluster, set, ordinal, deadline, cancel)
            .await?;
        let left = deadline.saturating_duration_since(Instant::now());
        if cancel.level() >= Level::Soon {
            return Err(StepError::Stopped);
        }
        health(left).await.map_err(StepError::Unhealthy)
    }

    /// Rolls every set onto `self.to`; on a failed member, back onto `self.from`.
    pub async fn run(
        &self,
        cluster: &Cluster,
        health: impl AsyncFn(Duration) -> Result<(), String>,
        cancel: &Cancel,
        events: &Events,
    ) -> Result<Ended, RolloutError> {
        for (index, set) in self.sets.iter().enumerate() {
            self.apply(cluster, set, &self.to, set.replicas)
                .await
                .map_err(|source| self.cluster_error(set, source))?;
            for ordinal in (0..set.replicas).rev() {
                let pod = Self::pod(set, ordinal);
                events.emit(Event::MemberRolling {
                    database: self.database.clone(),
                    pod: pod.clone(),
                    image: self.to.clone(),
                    limit: self.health_timeout,
                });
                let started = Instant::now();
                match self
                    .step(cluster, set, ordinal, &self.to, &health, cancel)
                    .await
                {
                    Ok(()) => events.emit(Event::MemberHealthy {
                        database: self.database.clone(),
                        pod,
                        seconds: started.elapsed().as_secs_f64(),
                    }),
                    Err(StepError::Stopped) => {
                        return Err(RolloutError::Stopped {
                            database: self.database.clone(),
                            pod,
                        })
                    }
                    Err(StepError::Cluster(statefulset, source)) => {
                        return Err(RolloutError::Cluster {
                            database: self.database.clone(),
                            statefulset,
                            source,
                        })
                    }
                    Err(StepError::Unhealthy(reason)) => {
                        return self
                            .fail(cluster, index, ordinal, reason, &health, cancel, events)
                            .await
                    }
                }
            }
        }
        Ok(Ended::Succeeded)
    }

    #[allow(clippy::too_many_arguments)]
    async fn fail(
        &self,
        cluster: &Cluster,
        index: usize,
        ordinal: u32,
        reason: String,
        health: &impl AsyncFn(Duration) -> Result<(), String>,
        cancel: &Cancel,
        events: &Events,
    ) -> Result<Ended, RolloutError> {
        let pod = Self::pod(&self.sets[index], ordinal);
        if !self.rollback {
            return Ok(Ended::Failed {
                pod,
                reason,
                rollback: None,
            });
        }
        events.emit(Event::RollingBack {
            database: self.database.clone(),
            pod: pod.clone(),
            image: self.from.clone(),
            reason: reason.clone(),
        });
        match self
            .roll_back(cluster, index, ordinal, health, cancel)
            .await
        {
            Ok(()) => Ok(Ended::RolledBack { pod, reason }),
            Err(StepError::Stopped) => Err(RolloutError::Stopped {
                database: self.database.clone(),
                pod,
            }),
            Err(StepError::Unhealthy(why)) => Ok(Ended::Failed {
                pod,
                reason,
                rollback: Some(why),
            }),
            Err(StepError::Cluster(statefulset, source)) => Ok(Ended::Failed {
                pod,
                reason,
                rollback: Some(format!(
                    "StatefulSet {statefulset}: {}",
                    crate::error_chain::error_chain(&source)
                )),
            }),
        }
    }

    /// Puts `self.from` back on every set the rollout touched, the failed
    /// one first, its failed member before the others.
    async fn roll_back(
        &self,
        cluster: &Cluster,
        index: usize,
        failed: u32,
        health: &impl AsyncFn(Duration) -> Result<(), String>,
        cancel: &Cancel,
    ) -> Result<(), StepError> {
        for (i, set) in self.sets[..=index].iter().enumerate().rev() {
            let failed_here = (i == index).then_some(failed);
            self.apply(cluster, set, &self.from, set.replicas)
                .await
                .map_err(|e| StepError::Cluster(set.statefulset.clone(), e))?;
            if let Some(ordinal) = failed_here {
                let pod = Self::pod(set, ordinal);
                cluster
                    .delete_pod(&self.namespace, &pod)
                    .await
                    .map_err(|e| StepError::Cluster(set.statefulset.clone(), e))?;
                let deadline = Instant::now() + self.health_timeout;
                self.member_ready(cluster, set, ordinal, deadline, cancel)
                    .await?;
            }
            for ordinal in (0..set.replicas).rev() {
                let deadline = Instant::now() + self.health_timeout;
                self.apply(cluster, set, &self.from, ordinal)
                    .await
                    .map_err(|e| StepError::Cluster(set.statefulset.clone(), e))?;
                self.member_ready(cluster, set, ordinal, deadline, cancel)
                    .await?;
            }
        }
        health(self.health_timeout)
            .await
            .map_err(StepError::Unhealthy)
    }

    fn cluster_error(&self, set: &RollingSet, source: ClusterError) -> RolloutError {
        RolloutError::Cluster {
            database: self.database.clone(),
            statefulset: set.statefulset.clone(),
            source,
        }
    }
}

/// Why a member is not done yet (`None`: it runs the StatefulSet's update
/// revision and is ready).
fn member_state(sts: &Value, pod: Option<&Value>) -> Option<String> {
    let generation = sts["metadata"]["generation"].as_i64().unwrap_or(0);
    let observed = sts["status"]["observedGeneration"].as_i64().unwrap_or(-1);
    if observed < generation {
        return Some("the StatefulSet controller has not seen the change yet".into());
    }
    let Some(update) = sts["status"]["updateRevision"].as_str() else {
        return Some("the StatefulSet reports no update revision".into());
    };
    let Some(pod) = pod else {
        return Some("the pod is not there (being replaced)".into());
    };
    let revision = pod["metadata"]["labels"]["controller-revision-hash"]
        .as_str()
        .unwrap_or_default();
    if revision != update {
        return Some(format!(
            "the pod is on revision {revision}, not {update} yet"
        ));
    }
    if pods::is_ready(pod) {
        return None;
    }
    let waiting = pod["status"]["containerStatuses"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| {
            let waiting = &c["state"]["waiting"];
            let reason = waiting["reason"].as_str()?;
            Some(format!(
                "container {}: {reason}",
                c["name"].as_str().unwrap_or("?")
            ))
        })
        .collect::<Vec<_>>();
    Some(if waiting.is_empty() {
        format!(
            "the pod is {} and not ready",
            pod["status"]["phase"].as_str().unwrap_or("Pending")
        )
    } else {
        format!("the pod is not ready ({})", waiting.join(", "))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sts(generation: i64, observed: i64, update: &str) -> Value {
        json!({"metadata": {"generation": generation},
               "status": {"observedGeneration": observed, "updateRevision": update}})
    }

    fn pod(revision: &str, ready: bool) -> Value {
        json!({"metadata": {"labels": {"controller-revision-hash": revision}},
               "status": {"phase": "Running",
                          "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
                          "containerStatuses": [{"name": "couchdb", "state": if ready { json!({"running": {}}) } else { json!({"waiting": {"reason": "CrashLoopBackOff"}}) }}]}})
    }

    #[test]
    fn a_member_is_done_on_the_update_revision_and_ready() {
        assert_eq!(member_state(&sts(3, 3, "r2"), Some(&pod("r2", true))), None);
    }

    #[test]
    fn a_member_is_not_done_before_the_controller_saw_the_change_or_on_the_old_revision() {
        let unseen = member_state(&sts(3, 2, "r1"), Some(&pod("r1", true))).unwrap();
        assert!(unseen.contains("has not seen"), "{unseen}");
        let old = member_state(&sts(3, 3, "r2"), Some(&pod("r1", true))).unwrap();
        assert!(old.contains("revision r1, not r2"), "{old}");
        let gone = member_state(&sts(3, 3, "r2"), None).unwrap();
        assert!(gone.contains("not there"), "{gone}");
        let crashing = member_state(&sts(3, 3, "r2"), Some(&pod("r2", false))).unwrap();
        assert!(crashing.contains("CrashLoopBackOff"), "{crashing}");
    }
}
