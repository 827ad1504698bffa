//! immudb 1.x primaries with read replicas: what stack reads of one (its
//! pods, the primary's users, every pod's last committed transactions),
//! the replication user it makes on the primary, its health gate (every
//! replica has caught up with the primary) and its `status` (lag per
//! replica).
//!
//! Facts this is built to (immudb's source; see `api`): a server-level
//! replica replicates `systemdb` and `defaultdb`, logged in to the primary
//! as a user with admin permission (254) on each (what ExportTx needs);
//! CreateUser cannot grant on `systemdb`, ChangePermission can; the
//! superuser's password applies at the first start only; `/readyz` answers
//! 200 as soon as the server listens, so readiness says nothing about
//! replication, and the gate reads the metrics instead.

pub mod api;
pub mod objects;

use std::time::{Duration, Instant};

use http::Method;
use serde_json::json;

use crate::engine::{Cancel, Level};
use crate::model::Database;
use crate::phases::databases::pod_http::PodHttpError;
use crate::phases::databases::pods::{self, Pod};
use crate::phases::kube::{Cluster, ClusterError};
use api::{Api, User};
use objects::{Credentials, Names};

/// How often waits look again.
const POLL: Duration = Duration::from_millis(500);
/// immudb's admin permission on a database.
pub const ADMIN_PERMISSION: u64 = 254;
/// The databases a server-level replica replicates.
pub const REPLICATED: [&str; 2] = ["defaultdb", "systemdb"];

#[derive(Debug, thiserror::Error)]
pub enum ImmuError {
    #[error(transparent)]
    Api(#[from] PodHttpError),
    #[error("immudb cluster {cluster}: cannot list its pods")]
    Pods {
        cluster: String,
        #[source]
        source: ClusterError,
    },
    #[error("immudb cluster {cluster}: {what} (waited {})", humantime::format_duration(*waited))]
    Timeout {
        cluster: String,
        what: String,
        waited: Duration,
    },
    #[error("immudb cluster {cluster}: stopped while waiting until {what}")]
    Stopped { cluster: String, what: String },
}

/// What stack read of a cluster.
#[derive(Debug, Clone, Default)]
pub struct Live {
    pub pods: Vec<Pod>,
    /// The primary's users; `None` when the primary did not answer.
    pub users: Option<Vec<User>>,
}

/// How far one replica is behind the primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lag {
    pub pod: String,
    /// Transactions behind, the most of any replicated database; `None`
    /// when the replica's metrics could not be read.
    pub transactions: Option<u64>,
    pub why: Option<String>,
}

/// One immudb cluster of the stack.
pub struct Immudb {
    pub db: Database,
    pub names: Names,
    healthy: Duration,
}

impl Immudb {
    pub fn new(db: &Database, namespace: &str, healthy: Duration) -> Immudb {
        Immudb {
            db: db.clone(),
            names: Names::new(&db.name, namespace),
            healthy,
        }
    }

    /// Whether `user` has what replication needs.
    pub fn can_replicate(user: &User) -> bool {
        user.active
            && REPLICATED
                .iter()
                .all(|db| user.permissions.get(*db) == Some(&ADMIN_PERMISSION))
    }

    pub async fn pods(&self, cluster: &Cluster) -> Result<Vec<Pod>, ImmuError> {
        pods::list(cluster, &self.names.namespace, &self.names.selector())
            .await
            .map_err(|source| ImmuError::Pods {
                cluster: self.db.name.clone(),
                source,
            })
    }

    fn ready(&self, live: &Live, pod: &str) -> bool {
        live.pods.iter().any(|p| p.name == pod && p.ready)
    }

    /// Reads the cluster: its pods and, from a ready primary, its users.
    pub async fn read(
        &self,
        cluster: &Cluster,
        api: &Api,
        cancel: &Cancel,
        level: Level,
    ) -> Result<Live, ImmuError> {
        let mut live = Live {
            pods: self.pods(cluster).await?,
            users: None,
        };
        let primary = self.names.primary();
        if self.ready(&live, &primary) {
            match api.users(&primary, cancel, level).await {
                Ok(users) => live.users = Some(users),
                Err(err @ PodHttpError::Stopped { .. }) => return Err(err.into()),
                Err(err) => tracing::debug!(error = %err, "the primary did not list its users"),
            }
        }
        Ok(live)
    }

    /// The replication user as the primary has it; `None` when it has none.
    pub fn replicator<'a>(&self, live: &'a Live, credentials: &Credentials) -> Option<&'a User> {
        live.users
            .as_ref()?
            .iter()
            .find(|u| u.name == credentials.replicator)
    }

    async fn sleep(&self, cancel: &Cancel, what: &str) -> Result<(), ImmuError> {
        cancel
            .until(Level::Now, tokio::time::sleep(POLL))
            .await
            .map_err(|_| ImmuError::Stopped {
                cluster: self.db.name.clone(),
                what: what.to_string(),
            })
    }

    /// Makes the replication user on the primary (once its pod is ready)
    /// and grants it admin permission on the replicated databases.
    pub async fn ensure_replicator(
        &self,
        cluster: &Cluster,
        api: &Api,
        credentials: &Credentials,
        cancel: &Cancel,
    ) -> Result<(), ImmuError> {
        let begun = Instant::now();
        let primary = self.names.primary();
        let what = "the primary lists its users";
        let users = loop {
            let live = self.read(cluster, api, cancel, Level::Now).await?;
            if let Some(users) = live.users {
                break users;
            }
            if begun.elapsed() >= self.healthy {
                return Err(ImmuError::Timeout {
                    cluster: self.db.name.clone(),
                    what: format!("pod {primary} is not ready or does not answer"),
                    waited: self.healthy,
                });
            }
            self.sleep(cancel, what).await?;
        };
        let name = &credentials.replicator;
        let existing = users.iter().find(|u| u.name == *name);
        if existing.is_none() {
            let b64 = |s: &str| {
                use base64::Engine as _;
                base64::engine::general_purpose::STANDARD.encode(s)
            };
            let body = json!({
                "user": b64(name),
                "password": b64(&credentials.replicator_password),
                "permission": ADMIN_PERMISSION,
                "database": "defaultdb",
            });
            api.expect(
                &primary,
                Method::POST,
                "/api/user",
                Some(&body),
                cancel,
                Level::Now,
            )
            .await?;
        }
        // immudb refuses to change the permissions of an inactive user.
        if existing.is_some_and(|u| !u.active) {
            let body = json!({"active": true, "username": name});
            api.expect(
                &primary,
                Method::POST,
                "/api/user/setactiveUser",
                Some(&body),
                cancel,
                Level::Now,
            )
            .await?;
        }
        for db in REPLICATED {
            let has = existing.and_then(|u| u.permissions.get(db)) == Some(&ADMIN_PERMISSION);
            if has || (existing.is_none() && db == "defaultdb") {
                continue;
            }
            let body = json!({
                "action": "GRANT",
                "username": name,
                "database": db,
                "permission": ADMIN_PERMISSION,
            });
            api.expect(
                &primary,
                Method::POST,
                "/api/user/changepermission",
                Some(&body),
                cancel,
                Level::Now,
            )
            .await?;
        }
        Ok(())
    }

    /// Each replica's lag behind the primary's last committed transactions.
    pub async fn lags(
        &self,
        live: &Live,
        api: &Api,
        cancel: &Cancel,
        level: Level,
    ) -> Result<Vec<Lag>, ImmuError> {
        let read = |pod: String| async move {
            match api.committed(&pod, cancel, level).await {
                Ok(c) => Ok(Ok(c)),
                Err(err @ PodHttpError::Stopped { .. }) => Err(ImmuError::from(err)),
                Err(err) => Ok(Err(crate::error_chain::error_chain(&err))),
            }
        };
        let primary = self.names.primary();
        let head = if self.ready(live, &primary) {
            read(primary.clone()).await?
        } else {
            Err(format!("pod {primary} is not ready"))
        };
        let mut out = Vec::new();
        for ordinal in 0..self.db.replicas {
            let pod = self.names.replica(ordinal);
            let lag = if !live.pods.iter().any(|p| p.name == pod) {
                Err(format!("pod {pod} does not exist yet"))
            } else if !self.ready(live, &pod) {
                Err(format!("pod {pod} is not ready"))
            } else {
                match (&head, read(pod.clone()).await?) {
                    (Err(why), _) => Err(format!("the primary's metrics: {why}")),
                    (_, Err(why)) => Err(why),
                    (Ok(head), _) if REPLICATED.iter().any(|db| !head.contains_key(*db)) => {
                        Err(format!(
                            "the primary's metrics have no {} of {}",
                            api::LAST_COMMITTED,
                            REPLICATED.join(" and ")
                        ))
                    }
                    (Ok(head), Ok(mine)) => Ok(REPLICATED
                        .iter()
                        .map(|db| head[*db].saturating_sub(mine.get(*db).copied().unwrap_or(0)))
                        .max()
                        .unwrap_or(0)),
                }
            };
            out.push(match lag {
                Ok(n) => Lag {
                    pod,
                    transactions: Some(n),
                    why: None,
                },
                Err(why) => Lag {
                    pod,
                    transactions: None,
                    why: Some(why),
                },
            });
        }
        Ok(out)
    }

    /// What keeps the cluster from being healthy; empty when it is.
    pub fn unhealthy(&self, live: &Live, lags: &[Lag], credentials: &Credentials) -> Vec<String> {
        let mut problems = Vec::new();
        let primary = self.names.primary();
        if !self.ready(live, &primary) {
            problems.push(format!("pod {primary} is not ready"));
        } else if live.users.is_none() {
            problems.push(format!("pod {primary} does not list its users"));
        } else if self.db.replicas > 0
            && !self
                .replicator(live, credentials)
                .is_some_and(Immudb::can_replicate)
        {
            problems.push(format!(
                "the primary has no user {} with admin permission on {}",
                credentials.replicator,
                REPLICATED.join(" and ")
            ));
        }
        for lag in lags {
            match (lag.transactions, &lag.why) {
                (Some(0), _) => {}
                (Some(n), _) => problems.push(format!(
                    "{} is {n} transaction{} behind the primary",
                    lag.pod,
                    if n == 1 { "" } else { "s" }
                )),
                (None, Some(why)) => problems.push(why.clone()),
                (None, None) => problems.push(format!("{} has no metrics", lag.pod)),
            }
        }
        problems
    }

    /// The health gate: the primary answers, the replication user is
    /// there, and every replica's last committed transaction of each
    /// replicated database has reached the primary's, within `timeouts.healthy`.
    pub async fn gate(
        &self,
        cluster: &Cluster,
        api: &Api,
        credentials: &Credentials,
        cancel: &Cancel,
    ) -> Result<(), ImmuError> {
        let begun = Instant::now();
        let what = "every replica has caught up with the primary";
        loop {
            let live = self.read(cluster, api, cancel, Level::Now).await?;
            let lags = self.lags(&live, api, cancel, Level::Now).await?;
            let problems = self.unhealthy(&live, &lags, credentials);
            if problems.is_empty() {
                return Ok(());
            }
            if begun.elapsed() >= self.healthy {
                return Err(ImmuError::Timeout {
                    cluster: self.db.name.clone(),
                    what: format!("not healthy: {}", problems.join("; ")),
                    waited: self.healthy,
                });
            }
            self.sleep(cancel, what).await?;
        }
    }
}
