//! HTTP to one database pod through the Kubernetes API server's proxy
//! (`/api/v1/namespaces/NS/pods/POD:PORT/proxy/…`) with the kubeconfig's
//! credentials: no port-forward, no ingress, no DNS on the user's machine.
//! The API server keeps the `Authorization` header for itself (it deletes
//! it once it has authenticated the caller), so each database logs in its
//! own way on top of this (CouchDB with a session cookie, immudb with a
//! token in a `Grpc-Metadata-` header).
//!
//! Every request has a timeout and ends when the run is stopped; an answer
//! is read up to a bound; every failure names the cluster, the pod and the
//! request. Answers that are the database's own are returned for the caller
//! to judge; only the API server's transient trouble (429, 502, 504, a
//! dropped connection) is retried here, a few times.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http_body_util::BodyExt as _;
use serde_json::Value;

use crate::engine::{Cancel, Level};

/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Retries of the API server's transient answers.
const RETRIES: u32 = 4;
/// The longest answer read (CouchDB's shard maps of many databases fit well within).
const MAX_ANSWER: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum PodHttpError {
    #[error("{cluster}: {method} {path} on pod {pod} failed: {reason}")]
    Request {
        cluster: String,
        pod: String,
        method: String,
        path: String,
        reason: String,
    },
    #[error("{cluster}: {method} {path} on pod {pod} answered {status}: {body}")]
    Refused {
        cluster: String,
        pod: String,
        method: String,
        path: String,
        status: u16,
        body: String,
    },
    #[error("{cluster}: stopped during {method} {path} on pod {pod}")]
    Stopped {
        cluster: String,
        pod: String,
        method: String,
        path: String,
    },
}

/// One request: to which pod and port, what, with which extra headers.
pub struct Call<'a> {
    pub pod: &'a str,
    pub port: u16,
    pub method: &'a http::Method,
    pub path: &'a str,
    pub headers: &'a [(&'static str, String)],
    pub body: Option<&'a Value>,
}

/// One answer: its status, its headers and its body (JSON when it parses,
/// else a string; `null` when it had none).
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Value,
}

impl Answer {
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// The pods of one database cluster, reached through the API server.
pub struct PodHttp {
    client: kube::Client,
    namespace: String,
    /// How errors name the cluster: "CouchDB cluster docs".
    cluster: String,
    requests: AtomicUsize,
}

impl PodHttp {
    pub fn new(client: kube::Client, namespace: &str, cluster: String) -> PodHttp {
        PodHttp {
            client,
            namespace: namespace.to_string(),
            cluster,
            requests: AtomicUsize::new(0),
        }
    }

    /// How many requests reached the API server so far.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::Relaxed)
    }

    fn error(&self, call: &Call<'_>, reason: String) -> PodHttpError {
        PodHttpError::Request {
            cluster: self.cluster.clone(),
            pod: call.pod.to_string(),
            method: call.method.to_string(),
            path: call.path.to_string(),
            reason,
        }
    }

    fn stopped(&self, call: &Call<'_>) -> PodHttpError {
        PodHttpError::Stopped {
            cluster: self.cluster.clone(),
            pod: call.pod.to_string(),
            method: call.method.to_string(),
            path: call.path.to_string(),
        }
    }

    /// An answer that is not a success, as an error (its body cut short).
    pub fn refused(&self, pod: &str, method: &str, path: &str, answer: &Answer) -> PodHttpError {
        let mut body = match &answer.body {
            Value::String(text) => text.clone(),
            other => other.to_string(),
        };
        if let Some((cut, _)) = body.char_indices().nth(300) {
            body.truncate(cut);
        }
        PodHttpError::Refused {
            cluster: self.cluster.clone(),
            pod: pod.to_string(),
            method: method.to_string(),
            path: path.to_string(),
            status: answer.status,
            body,
        }
    }

    async fn send_once(&self, call: &Call<'_>) -> Result<Answer, String> {
        let uri = format!(
            "/api/v1/namespaces/{}/pods/{}:{}/proxy{}",
            self.namespace, call.pod, call.port, call.path
        );
        let mut request = http::Request::builder()
            .method(call.method.clone())
            .uri(uri)
            .header(http::header::ACCEPT, "application/json, text/plain")
            .header(http::header::CONTENT_TYPE, "application/json");
        for (name, value) in call.headers {
            request = request.header(*name, value);
        }
        let data = call
            .body
            .map(|b| b.to_string().into_bytes())
            .unwrap_or_default();
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
        let headers = response.headers().clone();
        let collected = http_body_util::Limited::new(response.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?;
        let bytes = collected.to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Ok(Answer {
            status,
            headers,
            body,
        })
    }

    /// One request, retried after the API server's transient trouble, each
    /// attempt within the timeout, ended by a stop at `level`.
    pub async fn send(
        &self,
        call: Call<'_>,
        cancel: &Cancel,
        level: Level,
    ) -> Result<Answer, PodHttpError> {
        let mut attempt = 0;
        loop {
            let once = tokio::time::timeout(REQUEST_TIMEOUT, self.send_once(&call));
            let result = cancel
                .until(level, once)
                .await
                .map_err(|_| self.stopped(&call))?;
            let transient = match &result {
                Ok(Ok(answer)) => matches!(answer.status, 429 | 502 | 504),
                Ok(Err(_)) | Err(_) => true,
            };
            if !transient || attempt == RETRIES {
                return match result {
                    Ok(Ok(answer)) => Ok(answer),
                    Ok(Err(reason)) => Err(self.error(&call, reason)),
                    Err(_) => Err(self.error(
                        &call,
                        format!("no answer within {}s", REQUEST_TIMEOUT.as_secs()),
                    )),
                };
            }
            attempt += 1;
            tracing::debug!(cluster = %self.cluster, pod = call.pod, method = %call.method, path = call.path, attempt, "retrying a database request after a transient error");
            let wait = Duration::from_millis(200 << attempt);
            if cancel.until(level, tokio::time::sleep(wait)).await.is_err() {
                return Err(self.stopped(&call));
            }
        }
    }
}
