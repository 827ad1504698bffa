//! CouchDB's HTTP API, reached pod by pod through the Kubernetes API
//! server's proxy (`pod_http`). CouchDB is logged into with a session
//! cookie (`POST /_session`), one per pod: a cookie is signed with
//! `COUCHDB_SECRET` and the admin's password salt, and each node salts the
//! password from its environment anew at every start (until
//! `finish_cluster` copies one node's hash to all), so another node's
//! cookie may be refused. CouchDB's own answers (404 while seeding, 500
//! while a seed is missing) are returned for the caller to judge.

use serde_json::{json, Value};

use super::credentials::Credentials;
use crate::engine::{Cancel, Level};
pub use crate::phases::databases::pod_http::{Answer, PodHttpError as ApiError};
use crate::phases::databases::pod_http::{Call, PodHttp};

/// One CouchDB cluster's API.
pub struct Api {
    http: PodHttp,
    credentials: Credentials,
    /// The session cookie (`AuthSession=…`) of each pod logged into.
    sessions: tokio::sync::Mutex<std::collections::BTreeMap<String, String>>,
}

impl Api {
    pub fn new(
        client: kube::Client,
        cluster: &str,
        namespace: &str,
        credentials: Credentials,
    ) -> Api {
        Api {
            http: PodHttp::new(client, namespace, format!("CouchDB cluster {cluster}")),
            credentials,
            sessions: tokio::sync::Mutex::new(Default::default()),
        }
    }

    /// How many requests reached the API server so far.
    pub fn requests(&self) -> usize {
        self.http.requests()
    }

    /// An answer that is not a success, as an error.
    pub fn refused(&self, pod: &str, method: &str, path: &str, answer: &Answer) -> ApiError {
        self.http.refused(pod, method, path, answer)
    }

    /// One request, with the session cookie when there is one.
    async fn send(
        &self,
        pod: &str,
        (method, path, body): (&http::Method, &str, Option<&Value>),
        cookie: Option<&str>,
        cancel: &Cancel,
        level: Level,
    ) -> Result<Answer, ApiError> {
        let headers: Vec<(&'static str, String)> = cookie
            .map(|c| vec![("cookie", c.to_string())])
            .unwrap_or_default();
        let call = Call {
            pod,
            port: super::objects::PORT,
            method,
            path,
            headers: &headers,
            body,
        };
        self.http.send(call, cancel, level).await
    }

    /// Logs in on `pod`.
    async fn log_in(&self, pod: &str, cancel: &Cancel, level: Level) -> Result<String, ApiError> {
        let body =
            json!({"name": self.credentials.username, "password": self.credentials.password});
        let answer = self
            .send(
                pod,
                (&http::Method::POST, "/_session", Some(&body)),
                None,
                cancel,
                level,
            )
            .await?;
        let cookie = answer
            .headers
            .get_all(http::header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|v| {
                v.split(';')
                    .next()
                    .filter(|c| c.trim_start().starts_with("AuthSession="))
                    .map(|c| c.trim().to_string())
            });
        match cookie {
            Some(cookie) if answer.ok() => Ok(cookie),
            _ => Err(self.refused(pod, "POST", "/_session", &answer)),
        }
    }

    /// A request as the cluster's admin: logged in on the pod first when
    /// there is no session there yet, and again once when the session
    /// has expired or the node restarted (401).
    pub async fn call(
        &self,
        pod: &str,
        method: http::Method,
        path: &str,
        body: Option<&Value>,
        cancel: &Cancel,
        level: Level,
    ) -> Result<Answer, ApiError> {
        for fresh in [false, true] {
            let cookie = {
                let mut sessions = self.sessions.lock().await;
                if fresh || !sessions.contains_key(pod) {
                    let cookie = self.log_in(pod, cancel, level).await?;
                    sessions.insert(pod.to_string(), cookie);
                }
                sessions.get(pod).cloned()
            };
            let answer = self
                .send(pod, (&method, path, body), cookie.as_deref(), cancel, level)
                .await?;
            if answer.status == 401 && !fresh {
                continue;
            }
            return Ok(answer);
        }
        unreachable!("the second attempt returns")
    }

    /// A request that must succeed: its JSON answer.
    pub async fn expect(
        &self,
        pod: &str,
        method: http::Method,
        path: &str,
        body: Option<&Value>,
        cancel: &Cancel,
        level: Level,
    ) -> Result<Value, ApiError> {
        let name = method.to_string();
        let answer = self.call(pod, method, path, body, cancel, level).await?;
        if answer.ok() {
            Ok(answer.body)
        } else {
            Err(self.refused(pod, &name, path, &answer))
        }
    }
}
