//! AllegroGraph 8.x multi-master replication (MMR) clusters: what stack
//! reads of one (its pods and the controlling instance's replication
//! status), the cluster it makes on the controlling instance, the members
//! it takes out or sends back to join, its health gate and its `status`.
//!
//! Who does what. In the pod (`manifests/allegrograph-member.sh`, a sidecar
//! of every copy, so it works while stack is not running): a copy joins
//! the cluster under its pod name (`growCluster` on the controlling
//! instance, after a `remove` of that name, so a copy that came back empty
//! replaces its old self), joins again when its AllegroGraph restarts
//! empty, and leaves (`remove?instanceName=`) when its pod is stopped.
//! stack: makes the cluster (`createCluster` on the controlling instance,
//! which makes the repository), removes members no pod backs any more (a
//! copy killed without its sidecar's goodbye), restarts a copy that runs
//! but is not a member (it joins again empty), and waits until the
//! controlling instance lists every copy as running.
//!
//! Facts this follows (Franz's MMR documentation and Kubernetes example):
//! createCluster and growCluster take `host`, `port`, `user`, `password`
//! and `instanceName` as query values, growCluster is sent to the
//! controlling instance and names the new instance's host; the super user
//! of `AGRAPH_SUPER_USER`/`_PASSWORD` is made at the first start only.
//! The JSON of `repl/status` is read leniently (`instances[]` with
//! `instanceName` and `state`): its shape is not checked against a real
//! server here.

pub mod api;
pub mod objects;

use std::time::{Duration, Instant};

use http::Method;
use k8s_openapi::api::core::v1::Pod as PodObject;
use serde_json::Value;

use crate::engine::{Cancel, Level};
use crate::model::Database;
use crate::phases::databases::pod_http::PodHttpError;
use crate::phases::databases::pods::{self, Pod};
use crate::phases::kube::{Cluster, ClusterError};
use api::{encode, Api};
use objects::{Credentials, Names, PORT};

/// How often waits look again.
const POLL: Duration = Duration::from_millis(500);
/// How long a copy outside the cluster may take to join by itself before
/// it is restarted.
const JOIN_GRACE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum AgraphError {
    #[error(transparent)]
    Api(#[from] PodHttpError),
    #[error("AllegroGraph cluster {cluster}: cannot list its pods")]
    Pods {
        cluster: String,
        #[source]
        source: ClusterError,
    },
    #[error("AllegroGraph cluster {cluster}: cannot restart pod {pod}: {reason}")]
    Restart {
        cluster: String,
        pod: String,
        reason: String,
    },
    #[error("AllegroGraph cluster {cluster}: {what} (waited {})", humantime::format_duration(*waited))]
    Timeout {
        cluster: String,
        what: String,
        waited: Duration,
    },
    #[error("AllegroGraph cluster {cluster}: stopped while waiting until {what}")]
    Stopped { cluster: String, what: String },
    #[error("AllegroGraph cluster {cluster}: repository {repository} exists on the controlling instance but is not a replication cluster; delete it (or name another `repository`) so stack can make the cluster")]
    Standalone { cluster: String, repository: String },
}

/// One instance of the cluster as the controlling instance lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub name: String,
    pub state: String,
    pub controlling: bool,
}

/// What the controlling instance says of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Formed {
    /// The controlling instance does not answer.
    Unknown,
    /// No repository.
    Absent,
    /// The repository, not a cluster.
    Standalone,
    /// A cluster and its instances.
    Cluster(Vec<Instance>),
}

/// What stack read of a cluster.
#[derive(Debug, Clone)]
pub struct Live {
    pub pods: Vec<Pod>,
    pub formed: Formed,
    /// Why the cluster is `Unknown`, when something was said.
    pub why: Option<String>,
}

/// `repl/status` as a list of instances.
pub fn instances(status: &Value) -> Vec<Instance> {
    status["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| {
            Some(Instance {
                name: i["instanceName"].as_str()?.to_string(),
                state: i["state"].as_str().unwrap_or("unknown").to_string(),
                controlling: i["controlling"].as_bool().unwrap_or(false),
            })
        })
        .collect()
}

/// How the membership of a cluster differs from the stack's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Membership {
    /// Members whose pods go in this plan (scaled away): they leave by themselves.
    pub leaving: Vec<String>,
    /// Members no pod backs: removed.
    pub dead: Vec<String>,
    /// Copies that run but are not running members: restarted.
    pub outside: Vec<String>,
    /// Copies whose pods do not run yet.
    pub pending: Vec<String>,
}

impl Membership {
    pub fn drift(&self) -> bool {
        !self.dead.is_empty() || !self.outside.is_empty()
    }

    pub fn is_empty(&self) -> bool {
        self.leaving.is_empty() && self.dead.is_empty() && self.outside.is_empty()
    }
}

/// One AllegroGraph cluster of the stack.
pub struct Agraph {
    pub db: Database,
    pub names: Names,
    healthy: Duration,
}

impl Agraph {
    pub fn new(db: &Database, namespace: &str, healthy: Duration) -> Agraph {
        Agraph {
            db: db.clone(),
            names: Names::new(&db.name, namespace),
            healthy,
        }
    }

    pub fn repository(&self) -> &str {
        self.db.repository.as_deref().unwrap_or("main")
    }

    fn repl(&self, rest: &str) -> String {
        format!("/repositories/{}/repl/{rest}", self.repository())
    }

    /// The copies the stack wants, by pod (and instance) name.
    pub fn wanted(&self) -> Vec<String> {
        (0..self.db.replicas).map(|i| self.names.copy(i)).collect()
    }

    pub async fn pods(&self, cluster: &Cluster) -> Result<Vec<Pod>, AgraphError> {
        pods::list(cluster, &self.names.namespace, &self.names.selector())
            .await
            .map_err(|source| AgraphError::Pods {
                cluster: self.db.name.clone(),
                source,
            })
    }

    fn ready(live: &Live, pod: &str) -> bool {
        live.pods.iter().any(|p| p.name == pod && p.ready)
    }

    /// Reads the cluster: its pods and, from a ready controlling instance,
    /// the replication status (else whether the repository exists).
    pub async fn read(
        &self,
        cluster: &Cluster,
        api: &Api,
        cancel: &Cancel,
        level: Level,
    ) -> Result<Live, AgraphError> {
        let pods = self.pods(cluster).await?;
        let controlling = self.names.controlling();
        let mut live = Live {
            pods,
            formed: Formed::Unknown,
            why: None,
        };
        if !Agraph::ready(&live, &controlling) {
            live.why = Some(format!("pod {controlling} is not ready"));
            return Ok(live);
        }
        let status = api
            .call(
                &controlling,
                Method::GET,
                &self.repl("status"),
                None,
                cancel,
                level,
            )
            .await;
        let cut = |body: &Value| {
            let text = match body {
                Value::String(t) => t.trim().to_string(),
                other => other.to_string(),
            };
            text.chars().take(200).collect::<String>()
        };
        live.formed = match status {
            Ok(answer) if answer.ok() => {
                let listed = instances(&answer.body);
                if listed
                    .iter()
                    .any(|i| i.controlling || i.name == controlling)
                {
                    Formed::Cluster(listed)
                } else {
                    // Not what this is built to read: act on nothing.
                    live.why = Some(format!(
                        "repl/status not understood (it lists no controlling instance): {}",
                        cut(&answer.body)
                    ));
                    Formed::Unknown
                }
            }
            Ok(answer) if matches!(answer.status, 400 | 404) => {
                match api
                    .call(
                        &controlling,
                        Method::GET,
                        "/repositories",
                        None,
                        cancel,
                        level,
                    )
                    .await
                {
                    Ok(list) if list.ok() => {
                        let there = list.body.as_array().into_iter().flatten().any(|r| {
                            r["id"].as_str() == Some(self.repository())
                                || r.as_str() == Some(self.repository())
                        });
                        if there {
                            Formed::Standalone
                        } else {
                            Formed::Absent
                        }
                    }
                    Ok(list) => {
                        live.why = Some(format!(
                            "GET /repositories answered {}: {}",
                            list.status,
                            cut(&list.body)
                        ));
                        Formed::Unknown
                    }
                    Err(err @ PodHttpError::Stopped { .. }) => return Err(err.into()),
                    Err(err) => {
                        live.why = Some(crate::error_chain::error_chain(&err));
                        Formed::Unknown
                    }
                }
            }
            Ok(answer) => {
                live.why = Some(format!(
                    "repl/status answered {}: {}",
                    answer.status,
                    cut(&answer.body)
                ));
                Formed::Unknown
            }
            Err(err @ PodHttpError::Stopped { .. }) => return Err(err.into()),
            Err(err) => {
                live.why = Some(crate::error_chain::error_chain(&err));
                Formed::Unknown
            }
        };
        Ok(live)
    }

    /// How the members differ from the copies the stack wants.
    pub fn membership(&self, live: &Live) -> Option<Membership> {
        let Formed::Cluster(instances) = &live.formed else {
            return None;
        };
        let wanted = self.wanted();
        let controlling = self.names.controlling();
        let mut out = Membership::default();
        for instance in instances {
            if instance.controlling
                || instance.name == controlling
                || wanted.contains(&instance.name)
            {
                continue;
            }
            if live.pods.iter().any(|p| p.name == instance.name) {
                out.leaving.push(instance.name.clone());
            } else {
                out.dead.push(instance.name.clone());
            }
        }
        for copy in &wanted {
            let running = instances
                .iter()
                .any(|i| i.name == *copy && i.state == "running");
            if running {
                continue;
            }
            if Agraph::ready(live, copy) {
                out.outside.push(copy.clone());
            } else {
                out.pending.push(copy.clone());
            }
        }
        Some(out)
    }

    /// What keeps the cluster from being healthy; empty when it is.
    pub fn unhealthy(&self, live: &Live) -> Vec<String> {
        let controlling = self.names.controlling();
        let mut problems = Vec::new();
        match &live.formed {
            Formed::Unknown => {
                problems.push(match &live.why {
                    Some(why) => format!("the controlling instance {controlling}: {why}"),
                    None => format!("the controlling instance {controlling} does not answer"),
                });
                return problems;
            }
            Formed::Absent => problems.push(format!(
                "the controlling instance has no repository {}",
                self.repository()
            )),
            Formed::Standalone => problems.push(format!(
                "repository {} on the controlling instance is not a cluster",
                self.repository()
            )),
            Formed::Cluster(instances) => {
                for instance in instances.iter().filter(|i| i.state != "running") {
                    problems.push(format!("member {} is {}", instance.name, instance.state));
                }
                for copy in self.wanted() {
                    if !instances.iter().any(|i| i.name == copy) {
                        problems.push(format!("copy {copy} is not a member"));
                    }
                }
                let wanted = self.wanted();
                for instance in instances {
                    if !instance.controlling
                        && instance.name != controlling
                        && !wanted.contains(&instance.name)
                    {
                        problems.push(format!(
                            "member {} is not one of the stack's copies",
                            instance.name
                        ));
                    }
                }
            }
        }
        problems
    }

    async fn sleep(&self, cancel: &Cancel, what: &str) -> Result<(), AgraphError> {
        cancel
            .until(Level::Now, tokio::time::sleep(POLL))
            .await
            .map_err(|_| AgraphError::Stopped {
                cluster: self.db.name.clone(),
                what: what.to_string(),
            })
    }

    /// Reads until `done` says nothing is missing, within `timeouts.healthy`.
    async fn wait<F>(
        &self,
        cluster: &Cluster,
        api: &Api,
        cancel: &Cancel,
        what: &str,
        mut done: F,
    ) -> Result<Live, AgraphError>
    where
        F: FnMut(&Live) -> Option<String>,
    {
        let begun = Instant::now();
        loop {
            let live = self.read(cluster, api, cancel, Level::Now).await?;
            let Some(problem) = done(&live) else {
                return Ok(live);
            };
            if begun.elapsed() >= self.healthy {
                return Err(AgraphError::Timeout {
                    cluster: self.db.name.clone(),
                    what: format!("not {what}: {problem}"),
                    waited: self.healthy,
                });
            }
            self.sleep(cancel, what).await?;
        }
    }

    /// Formation: once the controlling instance answers, `createCluster`
    /// (which makes the repository) unless it is a cluster already.
    pub async fn form(
        &self,
        cluster: &Cluster,
        api: &Api,
        credentials: &Credentials,
        cancel: &Cancel,
    ) -> Result<(), AgraphError> {
        let live = self
            .wait(
                cluster,
                api,
                cancel,
                "the controlling instance answers",
                |live| {
                    (live.formed == Formed::Unknown).then(|| {
                        live.why
                            .clone()
                            .unwrap_or_else(|| "it does not answer".into())
                    })
                },
            )
            .await?;
        match live.formed {
            Formed::Cluster(_) => return Ok(()),
            Formed::Standalone => {
                return Err(AgraphError::Standalone {
                    cluster: self.db.name.clone(),
                    repository: self.repository().to_string(),
                })
            }
            Formed::Absent | Formed::Unknown => {}
        }
        let controlling = self.names.controlling();
        let path = format!(
            "{}?host={}&port={PORT}&user={}&password={}&instanceName={}",
            self.repl("createCluster"),
            encode(&self.names.controlling_host()),
            encode(&credentials.username),
            encode(&credentials.password),
            encode(&controlling)
        );
        api.expect(&controlling, Method::PUT, &path, cancel, Level::Now)
            .await?;
        Ok(())
    }

    /// Membership: once the pods of copies scaled away are gone, every
    /// member no copy backs is removed; copies that run outside the cluster
    /// are restarted (they come back empty and join again).
    pub async fn set_membership(
        &self,
        cluster: &Cluster,
        api: &Api,
        cancel: &Cancel,
    ) -> Result<(), AgraphError> {
        let wanted = self.wanted();
        let live = self
            .wait(
                cluster,
                api,
                cancel,
                "the copies scaled away are gone",
                |live| {
                    let going: Vec<&str> = live
                        .pods
                        .iter()
                        .filter(|p| {
                            self.names
                                .copy_ordinal(&p.name)
                                .is_some_and(|o| o >= self.db.replicas)
                        })
                        .map(|p| p.name.as_str())
                        .collect();
                    if !going.is_empty() {
                        return Some(format!("pods {} still run", going.join(", ")));
                    }
                    (live.formed == Formed::Unknown)
                        .then(|| "the controlling instance does not answer".into())
                },
            )
            .await?;
        let Some(membership) = self.membership(&live) else {
            return Ok(());
        };
        let controlling = self.names.controlling();
        for member in membership.dead.iter().chain(&membership.leaving) {
            let path = format!("{}?instanceName={}", self.repl("remove"), encode(member));
            let answer = api
                .call(&controlling, Method::PUT, &path, None, cancel, Level::Now)
                .await?;
            // A member its sidecar took out meanwhile is fine.
            let gone = self
                .read(cluster, api, cancel, Level::Now)
                .await
                .ok()
                .and_then(|l| match l.formed {
                    Formed::Cluster(instances) => {
                        Some(!instances.iter().any(|i| i.name == *member))
                    }
                    _ => None,
                })
                .unwrap_or(false);
            if !answer.ok() && !gone {
                return Err(api.refused(&controlling, "PUT", &path, &answer).into());
            }
        }
        if membership.outside.is_empty() {
            return Ok(());
        }
        // A copy outside may be joining right now (its sidecar copies the
        // repository): it gets a while to finish before it is restarted.
        let begun = Instant::now();
        let mut outside = membership.outside;
        while begun.elapsed() < JOIN_GRACE.min(self.healthy) {
            self.sleep(cancel, "the copies outside the cluster have joined")
                .await?;
            let live = self.read(cluster, api, cancel, Level::Now).await?;
            match self.membership(&live) {
                Some(now) => outside.retain(|p| now.outside.contains(p)),
                None => return Ok(()),
            }
            if outside.is_empty() {
                return Ok(());
            }
        }
        outside.retain(|p| wanted.contains(p));
        self.restart(cluster, &outside, cancel).await
    }

    /// Deletes the pods of `copies`; their StatefulSet makes them again,
    /// empty, and their sidecars join them to the cluster.
    async fn restart(
        &self,
        cluster: &Cluster,
        copies: &[String],
        cancel: &Cancel,
    ) -> Result<(), AgraphError> {
        let pods: kube::Api<PodObject> =
            kube::Api::namespaced(cluster.direct(), &self.names.namespace);
        let params = kube::api::DeleteParams::default();
        for pod in copies {
            let delete = tokio::time::timeout(Duration::from_secs(30), pods.delete(pod, &params));
            let deleted =
                cancel
                    .until(Level::Now, delete)
                    .await
                    .map_err(|_| AgraphError::Stopped {
                        cluster: self.db.name.clone(),
                        what: format!("pod {pod} is restarted"),
                    })?;
            let Ok(deleted) = deleted else {
                return Err(AgraphError::Restart {
                    cluster: self.db.name.clone(),
                    pod: pod.clone(),
                    reason: "no answer within 30s".into(),
                });
            };
            match deleted {
                Ok(_) => {}
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(err) => {
                    return Err(AgraphError::Restart {
                        cluster: self.db.name.clone(),
                        pod: pod.clone(),
                        reason: crate::error_chain::error_chain(&err),
                    })
                }
            }
        }
        Ok(())
    }

    /// Restarts every copy that runs (after the cluster was made again).
    pub async fn restart_copies(
        &self,
        cluster: &Cluster,
        cancel: &Cancel,
    ) -> Result<(), AgraphError> {
        let copies: Vec<String> = self
            .pods(cluster)
            .await?
            .into_iter()
            .filter(|p| self.names.copy_ordinal(&p.name).is_some())
            .map(|p| p.name)
            .collect();
        self.restart(cluster, &copies, cancel).await
    }

    /// The health gate: the controlling instance lists itself and every
    /// copy as running members, and nothing else, within `timeouts.healthy`.
    pub async fn gate(
        &self,
        cluster: &Cluster,
        api: &Api,
        cancel: &Cancel,
    ) -> Result<(), AgraphError> {
        self.wait(cluster, api, cancel, "healthy", |live| {
            let problems = self.unhealthy(live);
            (!problems.is_empty()).then(|| problems.join("; "))
        })
        .await
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ByteSize, DatabaseKind, ImageRef, UpgradePolicy, UpgradeRule};
    use serde_json::json;

    fn agraph(replicas: u32) -> Agraph {
        let db = Database {
            kind: DatabaseKind::Allegrograph,
            name: "graph".into(),
            image: ImageRef::parse("franzinc/agraph:v8.4.0").unwrap(),
            replicas,
            storage: ByteSize::gib(5),
            storage_class: None,
            upgrade: UpgradeRule::policy(UpgradePolicy::Patch),
            shm_size: Some(ByteSize::gib(1)),
            repository: Some("kg".into()),
            couchdb: None,
            sync_acks: None,
            license_secret: None,
        };
        Agraph::new(&db, "shop", Duration::from_secs(60))
    }

    fn live(pods: &[(&str, bool)], members: &[(&str, &str)]) -> Live {
        let status = json!({"instances": members.iter().map(|(n, s)| json!({
            "instanceName": n, "state": s, "controlling": *n == "graph-controlling-0"
        })).collect::<Vec<_>>()});
        Live {
            pods: pods
                .iter()
                .map(|(n, r)| Pod {
                    name: n.to_string(),
                    ready: *r,
                })
                .collect(),
            formed: Formed::Cluster(instances(&status)),
            why: None,
        }
    }

    #[test]
    fn members_no_pod_backs_are_dead_and_running_copies_outside_are_restarted() {
        let g = agraph(2);
        let l = live(
            &[
                ("graph-controlling-0", true),
                ("graph-copy-0", true),
                ("graph-copy-1", true),
            ],
            &[
                ("graph-controlling-0", "running"),
                ("graph-copy-0", "running"),
                ("graph-copy-7", "unreachable"),
            ],
        );
        let m = g.membership(&l).unwrap();
        assert_eq!(m.dead, ["graph-copy-7"]);
        assert_eq!(m.outside, ["graph-copy-1"]);
        assert!(m.drift());
        assert_eq!(
            g.unhealthy(&l),
            [
                "member graph-copy-7 is unreachable",
                "copy graph-copy-1 is not a member",
                "member graph-copy-7 is not one of the stack's copies"
            ]
        );
    }

    #[test]
    fn copies_scaled_away_leave_by_themselves_and_are_no_drift() {
        let g = agraph(1);
        let l = live(
            &[
                ("graph-controlling-0", true),
                ("graph-copy-0", true),
                ("graph-copy-1", true),
            ],
            &[
                ("graph-controlling-0", "running"),
                ("graph-copy-0", "running"),
                ("graph-copy-1", "running"),
            ],
        );
        let m = g.membership(&l).unwrap();
        assert_eq!(m.leaving, ["graph-copy-1"]);
        assert!(!m.drift());
        let healthy = live(
            &[("graph-controlling-0", true), ("graph-copy-0", true)],
            &[
                ("graph-controlling-0", "running"),
                ("graph-copy-0", "running"),
            ],
        );
        assert!(g.membership(&healthy).unwrap().is_empty());
        assert!(g.unhealthy(&healthy).is_empty());
    }
}
