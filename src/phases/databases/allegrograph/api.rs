//! AllegroGraph's HTTP API (port 10035), reached through the Kubernetes API
//! server's port-forward (`pods/POD/portforward`, a WebSocket) with HTTP/1.1
//! on the forwarded stream. AllegroGraph takes only HTTP Basic auth (or a
//! client certificate), and the API server deletes the `Authorization`
//! header on its pod proxy, so the proxy the other kinds use cannot carry
//! its credentials; a port-forward is a plain TCP tunnel to the pod.
//!
//! One forward per request; every request has a timeout (30 s for a read,
//! 120 s for a change), ends when the run is stopped, reads its answer up
//! to a bound, and names the cluster, the pod and the request (with a
//! `password` query value shown as `***`) when it fails. A forward that
//! cannot connect (the pod not running, nothing listening yet) is retried
//! a few times; a change that may have reached the pod is not sent again.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine as _;
use http_body_util::BodyExt as _;
use k8s_openapi::api::core::v1::Pod;
use serde_json::Value;

use super::objects::PORT;
use crate::engine::{Cancel, Level};
use crate::phases::databases::pod_http::{Answer, PodHttpError};

/// How long a read may take, and a change (createCluster, remove).
const READ_TIMEOUT: Duration = Duration::from_secs(30);
const CHANGE_TIMEOUT: Duration = Duration::from_secs(120);
/// Retries of a forward that did not get through.
const RETRIES: u32 = 3;
/// The longest answer read.
const MAX_ANSWER: usize = 16 << 20;

/// A path as errors show it: the value of `password` hidden.
pub fn shown(path: &str) -> String {
    let Some((base, query)) = path.split_once('?') else {
        return path.to_string();
    };
    let query: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some(("password", _)) => "password=***".to_string(),
            _ => pair.to_string(),
        })
        .collect();
    format!("{base}?{}", query.join("&"))
}

/// Percent-encodes a query value.
pub fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One AllegroGraph cluster's API, as its super user.
pub struct Api {
    client: kube::Client,
    namespace: String,
    cluster: String,
    authorization: String,
    requests: AtomicUsize,
}

impl Api {
    pub fn new(
        client: kube::Client,
        cluster: &str,
        namespace: &str,
        username: &str,
        password: &str,
    ) -> Api {
        let basic =
            base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
        Api {
            client,
            namespace: namespace.to_string(),
            cluster: format!("AllegroGraph cluster {cluster}"),
            authorization: format!("Basic {basic}"),
            requests: AtomicUsize::new(0),
        }
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::Relaxed)
    }

    fn error(&self, pod: &str, method: &http::Method, path: &str, reason: String) -> PodHttpError {
        PodHttpError::Request {
            cluster: self.cluster.clone(),
            pod: pod.to_string(),
            method: method.to_string(),
            path: shown(path),
            reason,
        }
    }

    /// An answer that is not a success, as an error (its body cut short).
    pub fn refused(&self, pod: &str, method: &str, path: &str, answer: &Answer) -> PodHttpError {
        let mut body = match &answer.body {
            Value::String(text) => text.trim().to_string(),
            other => other.to_string(),
        };
        if let Some((cut, _)) = body.char_indices().nth(300) {
            body.truncate(cut);
        }
        PodHttpError::Refused {
            cluster: self.cluster.clone(),
            pod: pod.to_string(),
            method: method.to_string(),
            path: shown(path),
            status: answer.status,
            body,
        }
    }

    /// One request over a fresh forward: `Err` says what went wrong, and
    /// whether trying again may help.
    async fn send_once(
        &self,
        pod: &str,
        method: &http::Method,
        path: &str,
        body: Option<&str>,
    ) -> Result<Answer, (String, bool)> {
        let pods: kube::Api<Pod> = kube::Api::namespaced(self.client.clone(), &self.namespace);
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut forward = pods
            .portforward(pod, &[PORT])
            .await
            .map_err(|e| (crate::error_chain::error_chain(&e), true))?;
        let stream = forward
            .take_stream(PORT)
            .ok_or_else(|| ("the forward has no stream".to_string(), true))?;
        let failure = forward.take_error(PORT);
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| (e.to_string(), true))?;
        let driver = tokio::spawn(connection);
        let mut request = http::Request::builder()
            .method(method.clone())
            .uri(path)
            .header(http::header::HOST, format!("localhost:{PORT}"))
            .header(http::header::AUTHORIZATION, &self.authorization)
            .header(http::header::ACCEPT, "application/json")
            .header(http::header::CONNECTION, "close");
        if body.is_some() {
            request = request.header(http::header::CONTENT_TYPE, "text/plain");
        }
        let request = request
            .body(http_body_util::Full::new(bytes::Bytes::from(
                body.unwrap_or_default().to_string(),
            )))
            .map_err(|e| (e.to_string(), false))?;
        let result = async {
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| e.to_string())?;
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
            Ok::<_, String>(Answer {
                status,
                headers,
                body,
            })
        }
        .await;
        driver.abort();
        forward.abort();
        match result {
            Ok(answer) => Ok(answer),
            Err(reason) => {
                // Once a change may have gone out, it is not sent again.
                let again = method == http::Method::GET;
                // Why the forward broke, as the API server said it.
                let said = match failure {
                    Some(failure) => tokio::time::timeout(Duration::from_secs(2), failure)
                        .await
                        .ok()
                        .flatten(),
                    None => None,
                };
                Err((said.unwrap_or(reason), again))
            }
        }
    }

    /// A request as the super user; `path` carries the query.
    pub async fn call(
        &self,
        pod: &str,
        method: http::Method,
        path: &str,
        body: Option<&str>,
        cancel: &Cancel,
        level: Level,
    ) -> Result<Answer, PodHttpError> {
        let stopped = || PodHttpError::Stopped {
            cluster: self.cluster.clone(),
            pod: pod.to_string(),
            method: method.to_string(),
            path: shown(path),
        };
        let limit = if method == http::Method::GET {
            READ_TIMEOUT
        } else {
            CHANGE_TIMEOUT
        };
        let mut attempt = 0;
        loop {
            let once = tokio::time::timeout(limit, self.send_once(pod, &method, path, body));
            let result = cancel.until(level, once).await.map_err(|_| stopped())?;
            let (reason, again) = match result {
                Ok(Ok(answer)) => return Ok(answer),
                Ok(Err(failed)) => failed,
                Err(_) => (format!("no answer within {}s", limit.as_secs()), false),
            };
            if !again || attempt == RETRIES {
                return Err(self.error(pod, &method, path, reason));
            }
            attempt += 1;
            tracing::debug!(cluster = %self.cluster, pod, path = %shown(path), attempt, %reason, "retrying an AllegroGraph request");
            let wait = Duration::from_millis(250 << attempt);
            cancel
                .until(level, tokio::time::sleep(wait))
                .await
                .map_err(|_| stopped())?;
        }
    }

    /// A request that must succeed: its answer's body.
    pub async fn expect(
        &self,
        pod: &str,
        method: http::Method,
        path: &str,
        cancel: &Cancel,
        level: Level,
    ) -> Result<Value, PodHttpError> {
        let name = method.to_string();
        let answer = self.call(pod, method, path, None, cancel, level).await?;
        if answer.ok() {
            Ok(answer.body)
        } else {
            Err(self.refused(pod, &name, path, &answer))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_in_the_query_is_never_shown() {
        assert_eq!(
            shown("/repositories/kg/repl/createCluster?host=h&password=s3cret&instanceName=x"),
            "/repositories/kg/repl/createCluster?host=h&password=***&instanceName=x"
        );
        assert_eq!(shown("/version"), "/version");
        assert_eq!(encode("a b/c"), "a%20b%2Fc");
    }
}
