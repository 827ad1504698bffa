//! Why one throttled or failed EC2 call does not stop a run: every call is
//! retried after throttling, a 5xx answer, a timeout or a broken connection
//! (not a refused one: nothing listens there), up to
//! `provider.ec2.maxRetries` times, with exponential backoff and full
//! jitter; an interceptor logs each retry at debug level, naming the
//! operation and the error, and counts them for the run's summary.
//!
//! This is the SDK's standard retry mode, as Terraform's AWS provider uses
//! (25 retries). Its adaptive mode adds a client-side rate limiter that,
//! after one throttling answer, holds a short burst of calls like a run's to
//! about one call a second with waits of several seconds: measured through a
//! proxy that throttles or fails a fifth of the calls, an `up` of ten
//! instances took 44 s in adaptive mode and 2-8 s in standard mode.
//!
//! Retrying is safe: reads are reads, RunInstances carries the create's
//! client token, and the other creates find what an earlier attempt made by
//! its tags or name.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_ec2::config::http::HttpResponse;
use aws_sdk_ec2::config::interceptors::{
    BeforeTransmitInterceptorContextRef, FinalizerInterceptorContextRef, InterceptorContext,
};
use aws_sdk_ec2::config::retry::{ClassifyRetry, RetryAction, RetryConfig};
use aws_sdk_ec2::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::orchestrator::{Metadata, OrchestratorError};
use aws_smithy_runtime_api::client::retries::RequestAttempts;
use aws_smithy_types::config_bag::{Storable, StoreReplace};

/// The first retry waits up to this long (full jitter), each later one up
/// to twice as long as the one before it, never more than [`MAX_BACKOFF`].
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(200);
pub const MAX_BACKOFF: Duration = Duration::from_secs(20);

/// The client's retry settings: `max_retries` retries after the first attempt.
pub fn retry_config(max_retries: u32) -> RetryConfig {
    RetryConfig::standard()
        .with_max_attempts(max_retries + 1)
        .with_initial_backoff(INITIAL_BACKOFF)
        .with_max_backoff(MAX_BACKOFF)
}

/// A refused connection is not retried: nothing listens at the endpoint
/// (a wrong `provider.ec2.endpoint`, an emulator not started), and waiting
/// would only make the error come minutes later.
#[derive(Debug)]
pub struct RefusedIsFinal;

/// Whether an error is, or was caused by, a refused connection.
fn refused(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(err) = cause {
        let io = err.downcast_ref::<std::io::Error>();
        if io.is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused) {
            return true;
        }
        cause = err.source();
    }
    false
}

impl ClassifyRetry for RefusedIsFinal {
    fn classify_retry(&self, ctx: &InterceptorContext) -> RetryAction {
        match ctx.output_or_error() {
            Some(Err(error)) if error.as_connector_error().is_some_and(|c| refused(c)) => {
                RetryAction::RetryForbidden
            }
            _ => RetryAction::NoActionIndicated,
        }
    }

    fn name(&self) -> &'static str {
        "a refused connection is final"
    }
}

/// Counts and logs the retries of one client's calls.
#[derive(Debug, Clone, Default)]
pub struct RetryLog {
    retries: Arc<AtomicUsize>,
}

impl RetryLog {
    /// How many retries the client made so far.
    pub fn count(&self) -> usize {
        self.retries.load(Ordering::Relaxed)
    }
}

/// Why the last attempt of a call failed, kept for the retry that follows.
#[derive(Debug, Clone)]
struct FailedAttempt(String);

impl Storable for FailedAttempt {
    type Storer = StoreReplace<Self>;
}

/// The error code in an EC2 error answer
/// (`<Response><Errors><Error><Code>…</Code>…`).
fn error_code(body: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(body).ok()?;
    let start = text.find("<Code>")? + "<Code>".len();
    let end = start + text[start..].find("</Code>")?;
    Some(text[start..end].trim())
}

/// An attempt's failure in a few words: the error code and HTTP status, or
/// what went wrong on the connection.
fn describe<E>(error: &OrchestratorError<E>, response: Option<&HttpResponse>) -> String {
    if let Some(response) = response {
        let status = response.status().as_u16();
        return match response.body().bytes().and_then(error_code) {
            Some(code) => format!("{code} (HTTP {status})"),
            None => format!("HTTP {status}"),
        };
    }
    match error.as_connector_error() {
        Some(err) if err.is_timeout() => "a timeout".to_string(),
        Some(err) if err.is_io() => "a connection error".to_string(),
        Some(_) => "a failed dispatch".to_string(),
        None if error.is_timeout_error() => "a timeout".to_string(),
        None => "an error".to_string(),
    }
}

impl Intercept for RetryLog {
    fn name(&self) -> &'static str {
        "stack retry log"
    }

    fn read_after_attempt(
        &self,
        context: &FinalizerInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        if let Some(Err(error)) = context.output_or_error() {
            let why = describe(error, context.response());
            cfg.interceptor_state().store_put(FailedAttempt(why));
        }
        Ok(())
    }

    fn read_before_attempt(
        &self,
        _context: &BeforeTransmitInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let attempt = cfg.load::<RequestAttempts>().map_or(1, |a| a.attempts());
        if attempt > 1 {
            self.retries.fetch_add(1, Ordering::Relaxed);
            let operation = cfg.load::<Metadata>().map_or("an EC2 call", |m| m.name());
            let after = cfg
                .load::<FailedAttempt>()
                .map_or("an error", |f| f.0.as_str());
            let of = cfg.load::<RetryConfig>().map_or(0, |c| c.max_attempts());
            tracing::debug!(
                operation,
                error = after,
                attempt,
                of,
                "retrying an EC2 call after a transient error"
            );
        }
        Ok(())
    }
}

/// Whether the SDK retries an error like this one: throttling, a 5xx
/// answer, a timeout or a broken connection. When one is what a call ends
/// with, every retry was spent on it.
pub fn is_transient<E: ProvideErrorMetadata>(err: &SdkError<E, HttpResponse>) -> bool {
    use aws_runtime::retries::classifiers::{THROTTLING_ERRORS, TRANSIENT_ERRORS};
    match err {
        SdkError::TimeoutError(_) | SdkError::ResponseError(_) => true,
        SdkError::DispatchFailure(failure) => {
            (failure.is_io() || failure.is_timeout())
                && failure.as_connector_error().is_none_or(|c| !refused(c))
        }
        SdkError::ServiceError(service) => {
            let status = service.raw().status().as_u16();
            let code = service.err().code().unwrap_or_default();
            status >= 500
                || status == 429
                || THROTTLING_ERRORS.contains(&code)
                || TRANSIENT_ERRORS.contains(&code)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_code_is_read_from_an_ec2_error_answer() {
        let body = b"<?xml version=\"1.0\"?><Response><Errors><Error><Code>RequestLimitExceeded</Code><Message>Request limit exceeded.</Message></Error></Errors><RequestID>1</RequestID></Response>";
        assert_eq!(error_code(body), Some("RequestLimitExceeded"));
        assert_eq!(error_code(b"<html>bad gateway</html>"), None);
    }

    #[test]
    fn max_retries_are_retries_after_the_first_attempt() {
        let config = retry_config(25);
        assert_eq!(config.max_attempts(), 26);
        assert_eq!(
            config.mode(),
            aws_sdk_ec2::config::retry::RetryMode::Standard
        );
        assert_eq!(retry_config(0).max_attempts(), 1);
    }
}
