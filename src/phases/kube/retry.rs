//! Why one overloaded or dropped API call does not stop a run: a layer
//! around the Kubernetes client retries every call after 429 Too Many
//! Requests (waiting at least its Retry-After), 500, 502, 503 and 504
//! answers, and reset, cut or timed-out connections, with exponential
//! backoff and full jitter, a bounded number of times. Each retry is a debug
//! log line naming the call and why, and is counted for the run's summary.
//!
//! Retrying is safe for the calls stack makes: GET, LIST, server-side apply
//! (applying the same object twice is applying it once) and DELETE (one
//! already gone is fine). The waits are part of the call, so a stop of the
//! run ends them as it ends the call.

use std::future::Future;
use std::hash::BuildHasher;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Request, Response, StatusCode};
use kube::client::Body;
use tower::buffer::Buffer;
use tower::{BoxError, Layer, Service, ServiceExt as _};

/// Retries after the first attempt; with the waits below, a call gives up
/// after about half a minute of trouble.
pub const MAX_RETRIES: u32 = 8;
/// The first retry waits up to this long (full jitter), each later one up
/// to twice as long as the one before it, never more than [`MAX_BACKOFF`].
const INITIAL_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A Retry-After longer than this is not waited for whole.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// The answers a call is tried again after.
fn retried_status(status: StatusCode) -> bool {
    matches!(status.as_u16(), 429 | 500 | 502 | 503 | 504)
}

/// Whether an error on the way there or back is the connection's: reset,
/// cut before the answer was complete, or timed out.
pub fn connection_trouble(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(err) = cause {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            if matches!(
                io.kind(),
                ConnectionReset | ConnectionAborted | BrokenPipe | TimedOut | UnexpectedEof
            ) {
                return true;
            }
        }
        if let Some(hyper) = err.downcast_ref::<hyper::Error>() {
            if hyper.is_incomplete_message() || hyper.is_canceled() || hyper.is_timeout() {
                return true;
            }
        }
        cause = err.source();
    }
    false
}

/// Whether a call's final error is one the layer retries: when a call ends
/// with one, every retry was spent on it.
pub fn is_transient(err: &kube::Error) -> bool {
    match err {
        kube::Error::Api(status) => StatusCode::from_u16(status.code).is_ok_and(retried_status),
        kube::Error::HyperError(err) => connection_trouble(err),
        kube::Error::Service(err) => connection_trouble(err.as_ref()),
        _ => false,
    }
}

/// The wait before retry number `retry` (from 1): a random share of the
/// exponential bound, so clients that failed together do not come back together.
fn backoff(retry: u32) -> Duration {
    let bound = INITIAL_BACKOFF
        .saturating_mul(1 << (retry - 1).min(16))
        .min(MAX_BACKOFF);
    let random = std::collections::hash_map::RandomState::new().hash_one((retry, Instant::now()));
    bound.mul_f64((random % 1_000_000) as f64 / 1_000_000.0)
}

/// The Retry-After of an answer, in seconds (the form the API server uses).
fn retry_after<B>(response: &Response<B>) -> Option<Duration> {
    let seconds: u64 = response
        .headers()
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(seconds).min(MAX_RETRY_AFTER))
}

/// The same request again, when its body can be sent twice (every body
/// stack sends can).
fn again(request: &Request<Body>) -> Option<Request<Body>> {
    let mut copy = Request::builder()
        .method(request.method().clone())
        .uri(request.uri().clone())
        .version(request.version())
        .body(request.body().try_clone()?)
        .ok()?;
    *copy.headers_mut() = request.headers().clone();
    *copy.extensions_mut() = request.extensions().clone();
    Some(copy)
}

/// Counts the retries of one client's calls; clones share the count.
#[derive(Debug, Clone, Default)]
pub struct RetryLog {
    retries: Arc<AtomicUsize>,
}

impl RetryLog {
    pub fn count(&self) -> usize {
        self.retries.load(Ordering::Relaxed)
    }
}

impl<S> Layer<S> for RetryLog
where
    S: Service<Request<Body>, Error = BoxError> + Send + 'static,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
{
    type Service = Retrying<S>;

    fn layer(&self, inner: S) -> Retrying<S> {
        Retrying {
            inner: Buffer::new(inner, 1024),
            log: self.clone(),
        }
    }
}

/// The client's service with retries around it.
pub struct Retrying<S: Service<Request<Body>>> {
    inner: Buffer<Request<Body>, S::Future>,
    log: RetryLog,
}

impl<S, B> Service<Request<Body>> for Retrying<S>
where
    S: Service<Request<Body>, Response = Response<B>, Error = BoxError> + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<B>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<B>, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        // The ready handle goes with this call; the one left is made ready by the next.
        let fresh = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, fresh);
        let log = self.log.clone();
        Box::pin(async move {
            let call = format!("{} {}", request.method(), request.uri().path());
            let mut request = request;
            let mut retry = 0;
            loop {
                let spare = again(&request);
                let result = inner.call(request).await;
                let why = match &result {
                    Ok(response) if retried_status(response.status()) => {
                        Some((response.status().to_string(), retry_after(response)))
                    }
                    Err(err) if connection_trouble(err.as_ref()) => Some((err.to_string(), None)),
                    _ => None,
                };
                let (Some((why, after)), Some(next)) = (why, spare) else {
                    return result;
                };
                if retry == MAX_RETRIES {
                    return result;
                }
                retry += 1;
                log.retries.fetch_add(1, Ordering::Relaxed);
                let wait = backoff(retry).max(after.unwrap_or_default());
                tracing::debug!(
                    call = %call,
                    error = %why,
                    retry,
                    of = MAX_RETRIES,
                    wait_ms = wait.as_millis() as u64,
                    "retrying a Kubernetes API call after a transient error"
                );
                tokio::time::sleep(wait).await;
                inner.ready().await?;
                request = next;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_grow_and_stay_bounded() {
        for retry in 1..=MAX_RETRIES + 4 {
            let bound = INITIAL_BACKOFF
                .saturating_mul(1 << (retry - 1))
                .min(MAX_BACKOFF);
            assert!(backoff(retry) <= bound, "retry {retry}");
        }
    }

    #[test]
    fn retry_after_is_read_in_seconds_and_capped() {
        let answer = |value: &str| {
            Response::builder()
                .status(429)
                .header("Retry-After", value)
                .body(())
                .unwrap()
        };
        assert_eq!(retry_after(&answer("3")), Some(Duration::from_secs(3)));
        assert_eq!(retry_after(&answer("86400")), Some(MAX_RETRY_AFTER));
        assert_eq!(retry_after(&answer("Wed, 21 Oct 2015 07:28:00 GMT")), None);
    }

    #[test]
    fn a_reset_connection_is_trouble_and_a_refused_one_is_not() {
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(connection_trouble(&reset));
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(!connection_trouble(&refused));
    }
}
