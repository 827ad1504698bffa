//! CouchDB 3.5 clusters: what stack reads of one (its pods, `_membership`,
//! the shard maps, its `_replicator` documents and their scheduler states),
//! the changes it plans from that (formation, membership, shard placement,
//! declared databases, replications), how it applies each through
//! CouchDB's own API, its health gate and its `status`.
//!
//! Facts this is built to (DESIGN.md, checked against CouchDB 3.5.0):
//! nodes mesh by the seedlist alone; `/_up` answers 404 while a node seeds;
//! `finish_cluster` answers 500 while a seed is not connected and 400 once
//! finished; removing a node from `/_node/_local/_nodes` never rewrites the
//! shard maps, so copies are moved first; replication jobs sit in
//! `initializing` for about a minute after any membership change.

pub mod api;
pub mod credentials;
pub mod objects;
pub mod placement;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use http::Method;
use serde_json::{json, Value};

use crate::engine::{Cancel, Level};
use crate::model::{Database, ReplicationTarget};
use crate::phases::kube::{Cluster, ClusterError};
use api::{Api, ApiError};
use credentials::Credentials;
use objects::{encode_database, Names};
use placement::Layout;

/// The system databases `finish_cluster` makes.
pub const SYSTEM_DATABASES: [&str; 2] = ["_replicator", "_users"];
/// How often waits look again.
const POLL: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum CouchError {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("CouchDB cluster {cluster}: cannot list its pods")]
    Pods {
        cluster: String,
        #[source]
        source: ClusterError,
    },
    #[error("CouchDB cluster {cluster}: {what} (waited {})", humantime::format_duration(*waited))]
    Timeout {
        cluster: String,
        what: String,
        waited: Duration,
    },
    #[error("CouchDB cluster {cluster}: stopped while waiting until {what}")]
    Stopped { cluster: String, what: String },
    #[error("CouchDB cluster {cluster}: no pod answers (none is ready)")]
    NoPod { cluster: String },
    #[error("CouchDB cluster {cluster}: {problem}")]
    Unexpected { cluster: String, problem: String },
}

/// A pod of the cluster as Kubernetes reports it, and the node it says it is.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub pod: String,
    pub ordinal: u32,
    pub ready: bool,
    /// What `GET /_node/_local` on the pod answered.
    pub node: Option<String>,
}

/// What one read of a cluster found.
#[derive(Debug, Clone, Default)]
pub struct Live {
    pub members: Vec<Member>,
    /// The pod the cluster-wide reads went to; `None` when no pod answered.
    pub answered_by: Option<String>,
    pub cluster_nodes: Vec<String>,
    pub all_nodes: Vec<String>,
    /// Every database's shard map (`/_node/_local/_dbs`), by name.
    pub maps: BTreeMap<String, Value>,
    /// This stack's `_replicator` documents, by id.
    pub replicator: BTreeMap<String, Value>,
    /// The scheduler's view of those documents, by document id.
    pub scheduler: BTreeMap<String, Value>,
}

impl Live {
    pub fn answering(&self) -> bool {
        self.answered_by.is_some()
    }

    /// The ranges of every database and the nodes holding a copy.
    pub fn layout(&self) -> Layout {
        self.maps
            .iter()
            .map(|(db, map)| {
                let ranges = map["by_range"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(range, nodes)| {
                        let mut nodes: Vec<String> = nodes
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(|n| n.as_str().map(str::to_string))
                            .collect();
                        nodes.sort();
                        (range.clone(), nodes)
                    })
                    .collect();
                (db.clone(), ranges)
            })
            .collect()
    }
}

/// One CouchDB cluster of the stack.
pub struct Couchdb {
    pub db: Database,
    pub names: Names,
    /// The stack's name: replication document ids start with it.
    stack: String,
    pub healthy: Duration,
}

/// The id of the `_replicator` document of replication `name`.
pub fn replication_id(stack: &str, cluster: &str, name: &str) -> String {
    format!("stack-{stack}-{cluster}-{name}")
}

impl Couchdb {
    pub fn new(db: &Database, namespace: &str, stack: &str, healthy: Duration) -> Couchdb {
        Couchdb {
            db: db.clone(),
            names: Names::new(&db.name, namespace),
            stack: stack.to_string(),
            healthy,
        }
    }

    fn err(&self, problem: impl Into<String>) -> CouchError {
        CouchError::Unexpected {
            cluster: self.db.name.clone(),
            problem: problem.into(),
        }
    }

    pub fn selector(&self) -> String {
        crate::phases::databases::pods::selector(&self.names.selector())
    }

    /// The nodes the stack wants: one per member.
    pub fn wanted_nodes(&self) -> Vec<String> {
        self.names.nodes(self.db.replicas)
    }

    /// A node as plans show it: its pod when it is one of this cluster's.
    pub fn short(&self, node: &str) -> String {
        self.names.pod_of(node).unwrap_or_else(|| node.to_string())
    }

    pub fn replication_prefix(&self) -> String {
        replication_id(&self.stack, &self.db.name, "")
    }

    /// The cluster's pods, by ordinal.
    pub async fn members(&self, cluster: &Cluster) -> Result<Vec<Member>, CouchError> {
        let pods = cluster
            .pods(&self.names.namespace, &self.selector())
            .await
            .map_err(|source| CouchError::Pods {
                cluster: self.db.name.clone(),
                source,
            })?;
        let prefix = format!("{}-", self.db.name);
        let mut members: Vec<Member> = pods
            .iter()
            .filter_map(|pod| {
                let name = pod["metadata"]["name"].as_str()?;
                let ordinal = name.strip_prefix(&prefix)?.parse().ok()?;
                Some(Member {
                    pod: name.to_string(),
                    ordinal,
                    ready: crate::phases::databases::pods::is_ready(pod),
                    node: None,
                })
            })
            .collect();
        members.sort_by_key(|m| m.ordinal);
        Ok(members)
    }

    /// Reads the cluster: its pods, each ready pod's own node name, and
    /// from one of them the membership, every shard map and this stack's
    /// replications. A fixed number of requests per member, whatever the
    /// number of documents and databases.
    pub async fn read(
        &self,
        cluster: &Cluster,
        api: &Api,
        cancel: &Cancel,
        level: Level,
    ) -> Result<Live, CouchError> {
        let mut live = Live {
            members: self.members(cluster).await?,
            ..Live::default()
        };
        for member in live.members.iter_mut().filter(|m| m.ready) {
            match api
                .call(
                    &member.pod,
                    Method::GET,
                    "/_node/_local",
                    None,
                    cancel,
                    level,
                )
                .await
            {
                Ok(answer) if answer.ok() => {
                    member.node = answer.body["name"].as_str().map(str::to_string);
                }
                Ok(_) => {}
                Err(ApiError::Stopped { .. }) => {
                    return Err(CouchError::Stopped {
                        cluster: self.db.name.clone(),
                        what: "its nodes answered".into(),
                    })
                }
                Err(err) => tracing::debug!(error = %err, "a ready pod did not answer"),
            }
        }
        let Some(pod) = live
            .members
            .iter()
            .filter(|m| m.node.is_some())
            .min_by_key(|m| (m.ordinal >= self.db.replicas, m.ordinal))
            .map(|m| m.pod.clone())
        else {
            return Ok(live);
        };
        let membership = api
            .expect(&pod, Method::GET, "/_membership", None, cancel, level)
            .await?;
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .into_iter()
                .flatten()
                .filter_map(|n| n.as_str().map(str::to_string))
                .collect()
        };
        live.cluster_nodes = strings(&membership["cluster_nodes"]);
        live.all_nodes = strings(&membership["all_nodes"]);
        let maps = api
            .expect(
                &pod,
                Method::GET,
                "/_node/_local/_dbs/_all_docs?include_docs=true",
                None,
                cancel,
                level,
            )
            .await?;
        for row in maps["rows"].as_array().into_iter().flatten() {
            if let (Some(id), doc) = (row["id"].as_str(), &row["doc"]) {
                if !id.starts_with("_design/") && doc.is_object() {
                    live.maps.insert(id.to_string(), doc.clone());
                }
            }
        }
        if live.maps.contains_key("_replicator") {
            let prefix = self.replication_prefix();
            let range = format!(
                "/_replicator/_all_docs?include_docs=true&startkey={}&endkey={}",
                urlencoding(&json!(prefix).to_string()),
                urlencoding(&json!(format!("{prefix}\u{fff0}")).to_string())
            );
            let docs = api
                .expect(&pod, Method::GET, &range, None, cancel, level)
                .await?;
            for row in docs["rows"].as_array().into_iter().flatten() {
                if let Some(id) = row["id"].as_str() {
                    live.replicator.insert(id.to_string(), row["doc"].clone());
                }
            }
            if !live.replicator.is_empty() {
                let jobs = api
                    .expect(
                        &pod,
                        Method::GET,
                        "/_scheduler/docs/_replicator",
                        None,
                        cancel,
                        level,
                    )
                    .await?;
                for job in jobs["docs"].as_array().into_iter().flatten() {
                    if let Some(id) = job["doc_id"].as_str().filter(|id| id.starts_with(&prefix)) {
                        live.scheduler.insert(id.to_string(), job.clone());
                    }
                }
            }
        }
        live.answered_by = Some(pod);
        Ok(live)
    }

    /// What keeps the cluster from being healthy, as sentences; empty when
    /// it is: every member's pod is ready, its own node is in
    /// `cluster_nodes` and connected, nothing else is in `cluster_nodes`,
    /// and the system databases exist.
    pub fn unhealthy(&self, live: &Live) -> Vec<String> {
        let mut problems = Vec::new();
        let wanted = self.wanted_nodes();
        for ordinal in 0..self.db.replicas {
            let pod = self.names.pod(ordinal);
            match live.members.iter().find(|m| m.ordinal == ordinal) {
                None => problems.push(format!("pod {pod} does not exist yet")),
                Some(m) if !m.ready => problems.push(format!("pod {pod} is not ready")),
                Some(Member { node: None, .. }) => {
                    problems.push(format!("pod {pod} does not answer GET /_node/_local"))
                }
                Some(Member {
                    node: Some(node), ..
                }) => {
                    if *node != self.names.node(ordinal) {
                        problems.push(format!(
                            "pod {pod} runs node {node}, not {}",
                            self.names.node(ordinal)
                        ));
                    }
                    if live.answering() && !live.cluster_nodes.contains(node) {
                        problems.push(format!("{} is not in cluster_nodes", self.short(node)));
                    }
                    if live.answering() && !live.all_nodes.contains(node) {
                        problems.push(format!(
                            "{} is not connected (not in all_nodes)",
                            self.short(node)
                        ));
                    }
                }
            }
        }
        for node in live.cluster_nodes.iter().filter(|n| !wanted.contains(n)) {
            problems.push(format!("{node} is in cluster_nodes but no member backs it"));
        }
        if live.answering() {
            for db in SYSTEM_DATABASES {
                if !live.maps.contains_key(db) {
                    problems.push(format!("system database {db} is missing"));
                }
            }
        }
        problems
    }

    /// The layout the stack wants, from the one there is.
    pub fn placement(&self, live: &Live, members: &[String]) -> placement::Placement {
        let settings = self.db.couchdb.as_ref();
        let declared: BTreeMap<&str, Option<u32>> = settings
            .map(|s| {
                s.databases
                    .iter()
                    .map(|d| (d.name.as_str(), d.copies))
                    .collect()
            })
            .unwrap_or_default();
        let cluster_copies = settings.and_then(|s| s.copies);
        placement::place(
            &live.layout(),
            members,
            |db| {
                declared
                    .get(db)
                    .copied()
                    .unwrap_or(cluster_copies)
                    .map(|n| n as usize)
            },
            settings.is_none_or(|s| s.rebalance),
        )
    }

    /// The `_replicator` document of each replication the stack declares;
    /// `credentials` holds every cluster's secrets, `secrets` the user's
    /// (Secret name → username, password). A target cluster without
    /// secrets is an error; a user's Secret not there yet is named in the
    /// document (`auth.fromSecret`) and read when it is written.
    pub fn replication_docs(
        &self,
        own: &Credentials,
        credentials: &BTreeMap<String, Credentials>,
        secrets: &BTreeMap<String, (String, String)>,
    ) -> Result<BTreeMap<String, (String, Value)>, String> {
        let settings = self.db.couchdb.as_ref();
        let auth =
            |user: &str, password: &str| json!({"basic": {"username": user, "password": password}});
        let mut docs = BTreeMap::new();
        for r in settings.into_iter().flat_map(|s| &s.replications) {
            let source = json!({
                "url": self.names.service_url(&r.source),
                "auth": auth(&own.username, &own.password),
            });
            let target = match &r.target {
                ReplicationTarget::Cluster { cluster, database } => {
                    let theirs = credentials.get(cluster).ok_or_else(|| {
                        format!(
                            "replication {}: cluster {cluster} has no credentials yet",
                            r.name
                        )
                    })?;
                    json!({
                        "url": Names::new(cluster, &self.names.namespace).service_url(database),
                        "auth": auth(&theirs.username, &theirs.password),
                    })
                }
                ReplicationTarget::Url { url, credentials } => match credentials {
                    None => json!({"url": url}),
                    // Read when the document is written, when it cannot be now.
                    Some(secret) => match secrets.get(secret) {
                        Some((user, password)) => json!({"url": url, "auth": auth(user, password)}),
                        None => json!({"url": url, "auth": {"fromSecret": secret}}),
                    },
                },
            };
            let doc = json!({
                "source": source,
                "target": target,
                "continuous": true,
                "create_target": true,
            });
            docs.insert(
                replication_id(&self.stack, &self.db.name, &r.name),
                (r.name.clone(), doc),
            );
        }
        Ok(docs)
    }

    /// A ready member to talk to, preferring those that stay.
    async fn pick(&self, cluster: &Cluster) -> Result<String, CouchError> {
        self.members(cluster)
            .await?
            .into_iter()
            .filter(|m| m.ready)
            .min_by_key(|m| (m.ordinal >= self.db.replicas, m.ordinal))
            .map(|m| m.pod)
            .ok_or(CouchError::NoPod {
                cluster: self.db.name.clone(),
            })
    }

    /// Waits until `done` (given a fresh read) says `None`, at most the
    /// stack's `healthy` timeout; the last answer is the error.
    async fn wait<F>(
        &self,
        cluster: &Cluster,
        api: &Api,
        cancel: &Cancel,
        what: &str,
        mut done: F,
    ) -> Result<Live, CouchError>
    where
        F: FnMut(&Live) -> Option<String>,
    {
        let begun = Instant::now();
        loop {
            let live = match self.read(cluster, api, cancel, Level::Now).await {
                Ok(live) => live,
                Err(CouchError::Api(err @ ApiError::Stopped { .. })) => return Err(err.into()),
                Err(CouchError::Api(err)) => {
                    if begun.elapsed() >= self.healthy {
                        return Err(err.into());
                    }
                    tracing::debug!(error = %err, "reading the cluster failed; trying again");
                    self.sleep(cancel, what).await?;
                    continue;
                }
                Err(other) => return Err(other),
            };
            let Some(problem) = done(&live) else {
                return Ok(live);
            };
            if begun.elapsed() >= self.healthy {
                return Err(CouchError::Timeout {
                    cluster: self.db.name.clone(),
                    what: format!("not {what}: {problem}"),
                    waited: self.healthy,
                });
            }
            self.sleep(cancel, what).await?;
        }
    }

    async fn sleep(&self, cancel: &Cancel, what: &str) -> Result<(), CouchError> {
        cancel
            .until(Level::Now, tokio::time::sleep(POLL))
            .await
            .map_err(|_| CouchError::Stopped {
                cluster: self.db.name.clone(),
                what: what.to_string(),
            })
    }

    /// Formation: once every member's pod is ready, `finish_cluster`,
    /// tried again while it answers 500 (a seed not connected yet); a
    /// cluster already finished (400) only gets the system databases it lacks.
    pub async fn form(
        &self,
        cluster: &Cluster,
        api: &Api,
        cancel: &Cancel,
    ) -> Result<(), CouchError> {
        let replicas = self.db.replicas;
        let live = self
            .wait(cluster, api, cancel, "every member answers", |live| {
                (0..replicas)
                    .find(|o| {
                        !live
                            .members
                            .iter()
                            .any(|m| m.ordinal == *o && m.node.is_some())
                    })
                    .map(|o| format!("pod {} is not ready", self.names.pod(o)))
            })
            .await?;
        let pod = live.answered_by.clone().expect("a member answered");
        let begun = Instant::now();
        let body = json!({"action": "finish_cluster"});
        loop {
            let answer = api
                .call(
                    &pod,
                    Method::POST,
                    "/_cluster_setup",
                    Some(&body),
                    cancel,
                    Level::Now,
                )
                .await?;
            match answer.status {
                200..=299 => break,
                400 => break,
                500 if begun.elapsed() < self.healthy => {
                    tracing::debug!(answer = %answer.body, "finish_cluster: a seed is not connected yet");
                    self.sleep(cancel, "finish_cluster succeeds").await?;
                }
                _ => return Err(api.refused(&pod, "POST", "/_cluster_setup", &answer).into()),
            }
        }
        self.create_system_databases(cluster, api, cancel).await
    }

    /// Makes the system databases that are missing (after a finish that
    /// was already done, or when one was deleted out of band).
    pub async fn create_system_databases(
        &self,
        cluster: &Cluster,
        api: &Api,
        cancel: &Cancel,
    ) -> Result<(), CouchError> {
        let pod = self.pick(cluster).await?;
        for db in SYSTEM_DATABASES {
            let answer = api
                .call(
                    &pod,
                    Method::PUT,
                    &format!("/{db}"),
                    None,
                    cancel,
                    Level::Now,
                )
                .await?;
            if !answer.ok() && answer.status != 412 {
                return Err(api.refused(&pod, "PUT", &format!("/{db}"), &answer).into());
            }
        }
        Ok(())
    }

    /// Membership: waits until departing members' pods are gone, then adds
    /// every wanted node missing from `_nodes` and deletes every node no
    /// member backs, so `_membership` lists exactly the members.
    pub async fn set_membership(
        &self,
        cluster: &Cluster,
        api: &Api,
        cancel: &Cancel,
    ) -> Result<(), CouchError> {
        let replicas = self.db.replicas;
        let live = self
            .wait(cluster, api, cancel, "departing members are gone", |live| {
                live.members
                    .iter()
                    .find(|m| m.ordinal >= replicas)
                    .map(|m| format!("pod {} is still there", m.pod))
                    .or_else(|| (!live.answering()).then(|| "no member answers".to_string()))
            })
            .await?;
        let pod = live.answered_by.clone().expect("a member answered");
        let wanted = self.wanted_nodes();
        for node in wanted.iter().filter(|n| !live.cluster_nodes.contains(n)) {
            let path = format!("/_node/_local/_nodes/{node}");
            let answer = api
                .call(
                    &pod,
                    Method::PUT,
                    &path,
                    Some(&json!({})),
                    cancel,
                    Level::Now,
                )
                .await?;
            if !answer.ok() && answer.status != 409 {
                return Err(api.refused(&pod, "PUT", &path, &answer).into());
            }
        }
        for node in live.cluster_nodes.iter().filter(|n| !wanted.contains(n)) {
            let path = format!("/_node/_local/_nodes/{node}");
            let doc = api
                .call(&pod, Method::GET, &path, None, cancel, Level::Now)
                .await?;
            if doc.status == 404 {
                continue;
            }
            let rev = doc.body["_rev"].as_str().unwrap_or_default();
            let delete = format!("{path}?rev={rev}");
            let answer = api
                .call(&pod, Method::DELETE, &delete, None, cancel, Level::Now)
                .await?;
            if !answer.ok() && answer.status != 404 {
                return Err(api.refused(&pod, "DELETE", &delete, &answer).into());
            }
        }
        Ok(())
    }

    /// Moves shard copies to `target` by the documented procedure: add the
    /// new copies to each database's shard map, start internal replication
    /// (`_sync_shards`) and wait until every member reports no internal
    /// replication jobs, then drop the surplus copies. Nothing is dropped
    /// before its data is on the new copy.
    pub async fn move_shards(
        &self,
        cluster: &Cluster,
        api: &Api,
        cancel: &Cancel,
        target: &Layout,
    ) -> Result<(), CouchError> {
        let holders: BTreeSet<String> = target
            .values()
            .flat_map(|r| r.values().flatten().cloned())
            .collect();
        let live = self
            .wait(
                cluster,
                api,
                cancel,
                "every new holder is connected",
                |live| {
                    holders
                        .iter()
                        .find(|n| !live.all_nodes.contains(n))
                        .map(|n| format!("{} is not connected", self.short(n)))
                },
            )
            .await?;
        let pod = live.answered_by.clone().expect("a member answered");
        let (add, drop) = placement::moves(&live.layout(), target);
        let touched: BTreeSet<&String> = add.iter().map(|(db, _, _)| db).collect();
        for db in &touched {
            self.edit_map(api, &pod, cancel, db, &add, "add").await?;
        }
        for db in &touched {
            let path = format!("/{}/_sync_shards", encode_database(db));
            let answer = api
                .call(&pod, Method::POST, &path, None, cancel, Level::Now)
                .await?;
            if !answer.ok() {
                return Err(api.refused(&pod, "POST", &path, &answer).into());
            }
        }
        if !touched.is_empty() {
            self.wait_synced(api, cancel, &live).await?;
        }
        let dropped: BTreeSet<&String> = drop.iter().map(|(db, _, _)| db).collect();
        for db in dropped {
            self.edit_map(api, &pod, cancel, db, &drop, "remove")
                .await?;
        }
        Ok(())
    }

    /// Applies `op` (`add` or `remove`) of the copies in `moves` that are
    /// `db`'s to its shard map: changelog, `by_node` and `by_range` together.
    async fn edit_map(
        &self,
        api: &Api,
        pod: &str,
        cancel: &Cancel,
        db: &str,
        moves: &[placement::ShardCopy],
        op: &str,
    ) -> Result<(), CouchError> {
        let path = format!("/_node/_local/_dbs/{}", encode_database(db));
        let mut map = api
            .expect(pod, Method::GET, &path, None, cancel, Level::Now)
            .await?;
        for (_, range, node) in moves.iter().filter(|(d, _, _)| d == db) {
            let by_range = map["by_range"][range.as_str()]
                .as_array_mut()
                .ok_or_else(|| self.err(format!("the shard map of {db} has no range {range}")))?;
            let present = by_range.iter().any(|n| n == node.as_str());
            match (op, present) {
                ("add", false) => by_range.push(json!(node)),
                ("remove", true) => by_range.retain(|n| n != node.as_str()),
                _ => continue,
            }
            if !map["by_node"].is_object() {
                map["by_node"] = json!({});
            }
            let by_node = &mut map["by_node"][node.as_str()];
            if !by_node.is_array() {
                *by_node = json!([]);
            }
            let ranges = by_node.as_array_mut().expect("an array");
            if op == "add" {
                ranges.push(json!(range));
                ranges.sort_by(|a, b| a.as_str().cmp(&b.as_str()));
            } else {
                ranges.retain(|r| r != range.as_str());
            }
            if ranges.is_empty() {
                map["by_node"]
                    .as_object_mut()
                    .expect("an object")
                    .remove(node.as_str());
            }
            if !map["changelog"].is_array() {
                map["changelog"] = json!([]);
            }
            map["changelog"]
                .as_array_mut()
                .expect("an array")
                .push(json!([op, range, node]));
        }
        let answer = api
            .call(pod, Method::PUT, &path, Some(&map), cancel, Level::Now)
            .await?;
        if answer.ok() {
            Ok(())
        } else {
            Err(api.refused(pod, "PUT", &path, &answer).into())
        }
    }

    /// Waits until every connected member reports no internal replication
    /// jobs, twice in a row.
    async fn wait_synced(&self, api: &Api, cancel: &Cancel, live: &Live) -> Result<(), CouchError> {
        let begun = Instant::now();
        let members: Vec<&Member> = live.members.iter().filter(|m| m.node.is_some()).collect();
        let mut quiet = 0;
        while quiet < 2 {
            self.sleep(cancel, "internal replication has filled the new copies")
                .await?;
            let mut busy = None;
            for m in &members {
                let system = api
                    .expect(
                        &m.pod,
                        Method::GET,
                        "/_node/_local/_system",
                        None,
                        cancel,
                        Level::Now,
                    )
                    .await?;
                let jobs = system["internal_replication_jobs"].as_u64().unwrap_or(0);
                if jobs > 0 {
                    busy = Some(format!("{} has {jobs} internal replication jobs", m.pod));
                    break;
                }
            }
            match busy {
                None => quiet += 1,
                Some(problem) => {
                    quiet = 0;
                    if begun.elapsed() >= self.healthy {
                        return Err(CouchError::Timeout {
                            cluster: self.db.name.clone(),
                            what: format!("new shard copies not filled: {problem}"),
                            waited: self.healthy,
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// Makes a declared database (one already there is fine).
    pub async fn create_database(
        &self,
        cluster: &Cluster,
        api: &Api,
        cancel: &Cancel,
        name: &str,
    ) -> Result<(), CouchError> {
        let settings = self
            .db
            .couchdb
            .as_ref()
            .ok_or_else(|| self.err("not CouchDB"))?;
        let db = settings
            .databases
            .iter()
            .find(|d| d.name == name)
            .ok_or_else(|| self.err(format!("database {name} is not declared")))?;
        let copies = db
            .copies
            .unwrap_or_else(|| objects::default_copies(&self.db));
        let mut path = format!("/{}?q={}&n={copies}", encode_database(name), db.shards);
        if db.partitioned {
            path.push_str("&partitioned=true");
        }
        let pod = self.pick(cluster).await?;
        let answer = api
            .call(&pod, Method::PUT, &path, None, cancel, Level::Now)
            .await?;
        match answer.status {
            200..=299 | 412 => Ok(()),
            _ => Err(api.refused(&pod, "PUT", &path, &answer).into()),
        }
    }

    /// Writes a replication's document (its current revision taken first).
    pub async fn put_replication(
        &self,
        cluster: &Cluster,
        api: &Api,
        cancel: &Cancel,
        id: &str,
        doc: &Value,
    ) -> Result<(), CouchError> {
        let pod = self.pick(cluster).await?;
        let path = format!("/_replicator/{id}");
        let mut body = doc.clone();
        let current = api
            .call(&pod, Method::GET, &path, None, cancel, Level::Now)
            .await?;
        if current.ok() {
            body["_rev"] = current.body["_rev"].clone();
        }
        let answer = api
            .call(&pod, Method::PUT, &path, Some(&body), cancel, Level::Now)
            .await?;
        if answer.ok() {
            Ok(())
        } else {
            Err(api.refused(&pod, "PUT", &path, &answer).into())
        }
    }

    pub async fn delete_replication(
        &self,
        cluster: &Cluster,
        api: &Api,
        cancel: &Cancel,
        id: &str,
    ) -> Result<(), CouchError> {
        let pod = self.pick(cluster).await?;
        let path = format!("/_replicator/{id}");
        let current = api
            .call(&pod, Method::GET, &path, None, cancel, Level::Now)
            .await?;
        if current.status == 404 {
            return Ok(());
        }
        let rev = current.body["_rev"].as_str().unwrap_or_default();
        let delete = format!("{path}?rev={rev}");
        let answer = api
            .call(&pod, Method::DELETE, &delete, None, cancel, Level::Now)
            .await?;
        if answer.ok() || answer.status == 404 {
            Ok(())
        } else {
            Err(api.refused(&pod, "DELETE", &delete, &answer).into())
        }
    }

    /// Waits until the cluster is healthy (see [`Couchdb::unhealthy`]).
    pub async fn gate(
        &self,
        cluster: &Cluster,
        api: &Api,
        cancel: &Cancel,
    ) -> Result<Live, CouchError> {
        self.wait(cluster, api, cancel, "healthy", |live| {
            let problems = self.unhealthy(live);
            (!problems.is_empty()).then(|| problems.join("; "))
        })
        .await
    }
}

/// Percent-encodes a query value.
fn urlencoding(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
