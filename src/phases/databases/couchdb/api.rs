//! CouchDB's HTTP API, reached pod by pod through the Kubernetes API
//! server's proxy (`/api/v1/namespaces/NS/pods/POD:5984/proxy/…`) with the
//! kubeconfig's credentials: no port-forward, no ingress, no DNS on the
//! user's machine. The API server keeps the `Authorization` header for
//! itself, so CouchDB is logged into with a session cookie (`POST
//! /_session`), one per pod: a cookie is signed with `COUCHDB_SECRET` and
//! the admin's password salt, and each node salts the password from its
//! environment anew at every start (until `finish_cluster` copies one
//! node's hash to all), so another node's cookie may be refused.
//!
//! Every request has a timeout and ends when the run is stopped; every
//! failure names the cluster, the pod and the request. Answers that are
//! CouchDB's (404 while seeding, 500 while a seed is missing) are returned
//! for the caller to judge; only the API server's own transient trouble
//! (429, 502, 504, a dropped connection) is retried here, a few times.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http_body_util::BodyExt as _;
use serde_json::{json, Value};

use super::credentials::Credentials;
use crate::engine::{Cancel, Level};

/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Retries of the API server's transient answers.
const RETRIES: u32 = 4;
/// The longest answer read (shard maps of many databases fit well within).
const MAX_ANSWER: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("CouchDB cluster {cluster}: {method} {path} on pod {pod} failed: {reason}")]
    Request {
        cluster: String,
        pod: String,
        method: String,
        path: String,
        reason: String,
    },
    #[error("CouchDB cluster {cluster}: {method} {path} on pod {pod} answered {status}: {body}")]
    Refused {
        cluster: String,
        pod: String,
        method: String,
        path: String,
        status: u16,
        body: String,
    },
    #[error("CouchDB cluster {cluster}: stopped during {method} {path} on pod {pod}")]
    Stopped {
        cluster: String,
        pod: String,
        method: String,
        path: String,
    },
}

/// One request: to which pod, what.
struct Call<'a> {
    pod: &'a str,
    method: &'a http::Method,
    path: &'a str,
    body: Option<&'a Value>,
}

/// One answer: its status and its JSON body (`null` when it had none).
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
}

impl Answer {
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// One CouchDB cluster's API.
pub struct Api {
    client: kube::Client,
    cluster: String,
    namespace: String,
    credentials: Credentials,
    /// The session cookie (`AuthSession=…`) of each pod logged into.
    sessions: tokio::sync::Mutex<std::collections::BTreeMap<String, String>>,
    requests: AtomicUsize,
}

impl Api {
    pub fn new(
        client: kube::Client,
        cluster: &str,
        namespace: &str,
        credentials: Credentials,
    ) -> Api {
        Api {
            client,
            cluster: cluster.to_string(),
            namespace: namespace.to_string(),
            credentials,
            sessions: tokio::sync::Mutex::new(Default::default()),
            requests: AtomicUsize::new(0),
        }
    }

    /// How many requests reached the API server so far.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::Relaxed)
    }

    fn error(&self, pod: &str, method: &str, path: &str, reason: String) -> ApiError {
        ApiError::Request {
            cluster: self.cluster.clone(),
            pod: pod.to_string(),
            method: method.to_string(),
            path: path.to_string(),
            reason,
        }
    }

    /// An answer that is not a success, as an error.
    pub fn refused(&self, pod: &str, method: &str, path: &str, answer: &Answer) -> ApiError {
        let mut body = answer.body.to_string();
        body.truncate(300);
        ApiError::Refused {
            cluster: self.cluster.clone(),
            pod: pod.to_string(),
            method: method.to_string(),
            path: path.to_string(),
            status: answer.status,
            body,
        }
    }

    /// One request as it goes out, with the session cookie when there is one.
    async fn send_once(
        &self,
        call: &Call<'_>,
        cookie: Option<&str>,
    ) -> Result<(u16, Option<String>, Value), String> {
        let Call {
            pod,
            method,
            path,
            body,
        } = *call;
        let uri = format!(
            "/api/v1/namespaces/{}/pods/{pod}:{}/proxy{path}",
            self.namespace,
            super::objects::PORT
        );
        let mut request = http::Request::builder()
            .method(method.clone())
            .uri(uri)
            .header(http::header::ACCEPT, "application/json")
            .header(http::header::CONTENT_TYPE, "application/json");
        if let Some(cookie) = cookie {
            request = request.header(http::header::COOKIE, cookie);
        }
        let data = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
        let request = request
            .body(kube::client::Body::from(data))
            .map_err(|e| e.to_string())?;
        self.requests.fetch_add(1, Ordering::Relaxed);
        let response = self
            .client
            .send(request)
            .await
            .map_err(|e| crate::error_chain::error_chain(&e))?;
        let status = response.status().as_u16();
        let set_cookie = response
            .headers()
            .get_all(http::header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|v| {
                v.split(';')
                    .next()
                    .filter(|c| c.trim_start().starts_with("AuthSession="))
                    .map(|c| c.trim().to_string())
            });
        let collected = http_body_util::Limited::new(response.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?;
        let bytes = collected.to_bytes();
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Ok((status, set_cookie, value))
    }

    /// One request, retried after the API server's transient trouble, each
    /// attempt within the timeout, ended by a stop at `level`.
    async fn send(
        &self,
        call: Call<'_>,
        cookie: Option<&str>,
        cancel: &Cancel,
        level: Level,
    ) -> Result<(u16, Option<String>, Value), ApiError> {
        let Call {
            pod, method, path, ..
        } = call;
        let mut attempt = 0;
        loop {
            let once = tokio::time::timeout(REQUEST_TIMEOUT, self.send_once(&call, cookie));
            let result = cancel
                .until(level, once)
                .await
                .map_err(|_| ApiError::Stopped {
                    cluster: self.cluster.clone(),
                    pod: pod.to_string(),
                    method: method.to_string(),
                    path: path.to_string(),
                })?;
            let transient = match &result {
                Ok(Ok((status, _, _))) => matches!(status, 429 | 502 | 504),
                Ok(Err(_)) | Err(_) => true,
            };
            if !transient || attempt == RETRIES {
                return match result {
                    Ok(Ok(answer)) => Ok(answer),
                    Ok(Err(reason)) => Err(self.error(pod, method.as_str(), path, reason)),
                    Err(_) => Err(self.error(
                        pod,
                        method.as_str(),
                        path,
                        format!("no answer within {}s", REQUEST_TIMEOUT.as_secs()),
                    )),
                };
            }
            attempt += 1;
            tracing::debug!(cluster = %self.cluster, pod, %method, path, attempt, "retrying a CouchDB request after a transient error");
            let wait = Duration::from_millis(200 << attempt);
            if cancel.until(level, tokio::time::sleep(wait)).await.is_err() {
                return Err(ApiError::Stopped {
                    cluster: self.cluster.clone(),
                    pod: pod.to_string(),
                    method: method.to_string(),
                    path: path.to_string(),
                });
            }
        }
    }

    /// Logs in on `pod`.
    async fn log_in(&self, pod: &str, cancel: &Cancel, level: Level) -> Result<String, ApiError> {
        let body =
            json!({"name": self.credentials.username, "password": self.credentials.password});
        let call = Call {
            pod,
            method: &http::Method::POST,
            path: "/_session",
            body: Some(&body),
        };
        let (status, cookie, answer) = self.send(call, None, cancel, level).await?;
        match cookie {
            Some(cookie) if (200..300).contains(&status) => Ok(cookie),
            _ => Err(self.refused(
                pod,
                "POST",
                "/_session",
                &Answer {
                    status,
                    body: answer,
                },
            )),
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
            let call = Call {
                pod,
                method: &method,
                path,
                body,
            };
            let (status, _, answer) = self.send(call, cookie.as_deref(), cancel, level).await?;
            if status == 401 && !fresh {
                continue;
            }
            return Ok(Answer {
                status,
                body: answer,
            });
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
