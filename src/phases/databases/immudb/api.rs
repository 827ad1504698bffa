//! immudb's REST gateway (port 8080, `/api/…`) and metrics server (port
//! 9497), reached pod by pod through the Kubernetes API server's proxy
//! (`pod_http`). The gateway takes the token of `POST /api/login` as
//! `Authorization: Bearer`, which the API server deletes; grpc-gateway also
//! forwards `Grpc-Metadata-Authorization` as the same gRPC metadata, so the
//! token goes there. A token is kept per pod and fetched again once on 401.
//!
//! Facts this follows (immudb's source, `pkg/api/schema/schema.proto`,
//! `pkg/server/webserver.go`): `bytes` fields (user names and passwords of
//! login and CreateUser) travel base64; ChangePermission's `username` is
//! plain text; a failing CreateUser answers 500 (an untyped error), so
//! users are listed before one is made; a missing or stale token is also
//! a 500 (`not logged in`), not a 401.

use std::collections::BTreeMap;

use base64::Engine as _;
use http::Method;
use serde_json::{json, Value};

use super::objects::{HTTP_PORT, METRICS_PORT};
use crate::engine::{Cancel, Level};
use crate::phases::databases::pod_http::{Answer, Call, PodHttp, PodHttpError};

/// The gauge the replicas' progress is read from.
pub const LAST_COMMITTED: &str = "immudb_last_committed_trx_id";

/// One immudb cluster's API, logged in as one user.
pub struct Api {
    http: PodHttp,
    username: String,
    password: String,
    tokens: tokio::sync::Mutex<BTreeMap<String, String>>,
}

fn b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// A user as ListUsers answers it: its name and its permission per database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub permissions: BTreeMap<String, u64>,
    pub active: bool,
}

impl Api {
    pub fn new(
        client: kube::Client,
        cluster: &str,
        namespace: &str,
        username: &str,
        password: &str,
    ) -> Api {
        Api {
            http: PodHttp::new(client, namespace, format!("immudb cluster {cluster}")),
            username: username.to_string(),
            password: password.to_string(),
            tokens: tokio::sync::Mutex::new(BTreeMap::new()),
        }
    }

    pub fn requests(&self) -> usize {
        self.http.requests()
    }

    pub fn refused(&self, pod: &str, method: &str, path: &str, answer: &Answer) -> PodHttpError {
        self.http.refused(pod, method, path, answer)
    }

    async fn send(
        &self,
        pod: &str,
        (port, method, path): (u16, &Method, &str),
        headers: &[(&'static str, String)],
        body: Option<&Value>,
        (cancel, level): (&Cancel, Level),
    ) -> Result<Answer, PodHttpError> {
        let call = Call {
            pod,
            port,
            method,
            path,
            headers,
            body,
        };
        self.http.send(call, cancel, level).await
    }

    async fn log_in(
        &self,
        pod: &str,
        cancel: &Cancel,
        level: Level,
    ) -> Result<String, PodHttpError> {
        let body = json!({"user": b64(&self.username), "password": b64(&self.password)});
        let path = "/api/login";
        let answer = self
            .send(
                pod,
                (HTTP_PORT, &Method::POST, path),
                &[],
                Some(&body),
                (cancel, level),
            )
            .await?;
        match answer.body["token"].as_str() {
            Some(token) if answer.ok() => Ok(token.to_string()),
            _ => Err(self.refused(pod, "POST", path, &answer)),
        }
    }

    /// A request to the REST gateway as the API's user.
    pub async fn call(
        &self,
        pod: &str,
        method: Method,
        path: &str,
        body: Option<&Value>,
        cancel: &Cancel,
        level: Level,
    ) -> Result<Answer, PodHttpError> {
        for fresh in [false, true] {
            let token = {
                let mut tokens = self.tokens.lock().await;
                if fresh || !tokens.contains_key(pod) {
                    let token = self.log_in(pod, cancel, level).await?;
                    tokens.insert(pod.to_string(), token);
                }
                tokens.get(pod).cloned().unwrap_or_default()
            };
            let headers = [("grpc-metadata-authorization", format!("Bearer {token}"))];
            let answer = self
                .send(
                    pod,
                    (HTTP_PORT, &method, path),
                    &headers,
                    body,
                    (cancel, level),
                )
                .await?;
            if logged_out(&answer) && !fresh {
                continue;
            }
            return Ok(answer);
        }
        unreachable!("the second attempt returns")
    }

    /// A gateway request that must succeed: its JSON answer.
    pub async fn expect(
        &self,
        pod: &str,
        method: Method,
        path: &str,
        body: Option<&Value>,
        cancel: &Cancel,
        level: Level,
    ) -> Result<Value, PodHttpError> {
        let name = method.to_string();
        let answer = self.call(pod, method, path, body, cancel, level).await?;
        if answer.ok() {
            Ok(answer.body)
        } else {
            Err(self.refused(pod, &name, path, &answer))
        }
    }

    /// The server's users with their permissions.
    pub async fn users(
        &self,
        pod: &str,
        cancel: &Cancel,
        level: Level,
    ) -> Result<Vec<User>, PodHttpError> {
        let answer = self
            .expect(pod, Method::GET, "/api/user/list", None, cancel, level)
            .await?;
        Ok(parse_users(&answer))
    }

    /// Each database's last committed transaction, from the pod's metrics
    /// (no credentials: the metrics server has none).
    pub async fn committed(
        &self,
        pod: &str,
        cancel: &Cancel,
        level: Level,
    ) -> Result<BTreeMap<String, u64>, PodHttpError> {
        let path = "/metrics";
        let answer = self
            .send(
                pod,
                (METRICS_PORT, &Method::GET, path),
                &[],
                None,
                (cancel, level),
            )
            .await?;
        match &answer.body {
            Value::String(text) if answer.ok() => Ok(last_committed(text)),
            _ => Err(self.refused(pod, "GET", path, &answer)),
        }
    }
}

/// Whether an answer says the token is no longer good: immudb answers 500
/// (an untyped error) `not logged in` or `invalid token` after a restart,
/// which ends every session, or after the user's permissions changed.
fn logged_out(answer: &Answer) -> bool {
    let message = answer.body["message"]
        .as_str()
        .or_else(|| answer.body["error"].as_str())
        .unwrap_or_default();
    answer.status == 401
        || (answer.status == 500
            && (message.contains("not logged in") || message.contains("invalid token")))
}

/// ListUsers' answer: names are base64 (`bytes`), permissions plain.
pub fn parse_users(answer: &Value) -> Vec<User> {
    answer["users"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|u| {
            let name = base64::engine::general_purpose::STANDARD
                .decode(u["user"].as_str()?)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())?;
            let permissions = u["permissions"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| {
                    Some((
                        p["database"].as_str()?.to_string(),
                        p["permission"].as_u64()?,
                    ))
                })
                .collect();
            Some(User {
                name,
                permissions,
                active: u["active"].as_bool().unwrap_or(false),
            })
        })
        .collect()
}

/// `immudb_last_committed_trx_id` by its `db` label, from a Prometheus
/// text exposition (other labels, such as 1.9's `index`, are ignored; the
/// highest value of a database wins).
pub fn last_committed(text: &str) -> BTreeMap<String, u64> {
    let mut out: BTreeMap<String, u64> = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(LAST_COMMITTED) else {
            continue;
        };
        let Some((labels, value)) = rest.strip_prefix('{').and_then(|r| r.split_once('}')) else {
            continue;
        };
        let Some(db) = labels.split(',').find_map(|l| {
            l.trim()
                .strip_prefix("db=\"")
                .and_then(|v| v.strip_suffix('"'))
        }) else {
            continue;
        };
        let Some(value) = value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|v| v.is_finite() && *v >= 0.0)
        else {
            continue;
        };
        let entry = out.entry(db.to_string()).or_default();
        *entry = (*entry).max(value as u64);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_committed_gauge_is_read_by_database_whatever_the_other_labels() {
        let text = "# HELP immudb_last_committed_trx_id The highest id of committed transaction\n\
                    # TYPE immudb_last_committed_trx_id gauge\n\
                    immudb_last_committed_trx_id{db=\"defaultdb\"} 7\n\
                    immudb_last_committed_trx_id{db=\"systemdb\",index=\"index\"} 3\n\
                    immudb_last_committed_trx_idx{db=\"other\"} 9\n\
                    immudb_last_indexed_trx_id{db=\"defaultdb\"} 5\n\
                    immudb_last_committed_trx_id{db=\"broken\"} NaN\n";
        let got = last_committed(text);
        assert_eq!(
            got,
            BTreeMap::from([("defaultdb".into(), 7), ("systemdb".into(), 3)])
        );
    }

    #[test]
    fn users_come_with_their_permissions_by_database() {
        let answer = json!({"users": [
            {"user": b64("immudb"), "permissions": [{"database": "*", "permission": 255}], "active": true},
            {"user": b64("stack_replicator"), "permissions": [
                {"database": "defaultdb", "permission": 254},
                {"database": "systemdb", "permission": 254}], "active": true},
            {"user": "not base64!", "permissions": []}
        ]});
        let users = parse_users(&answer);
        assert_eq!(users.len(), 2);
        assert_eq!(users[1].name, "stack_replicator");
        assert_eq!(users[1].permissions["systemdb"], 254);
    }
}
