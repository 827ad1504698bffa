//! What `stack daemon` did, as Prometheus metrics on a local port: when
//! each job last ran and how it ended, the drift it found, the upgrades'
//! outcomes. The server answers one small request at a time with a short
//! read timeout, so no client can make it hold more than a request's bytes.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::engine::{Cancel, Level};

/// The longest request read; more is refused.
const REQUEST_LIMIT: usize = 8 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// A job of the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Job {
    /// A refresh-only plan.
    Drift,
    /// A registry check and the rollout of what it found.
    Upgrade,
}

impl Job {
    fn label(self) -> &'static str {
        match self {
            Job::Drift => "drift",
            Job::Upgrade => "upgrade",
        }
    }
}

#[derive(Default)]
struct Counters {
    /// (stack, job) → (when, succeeded).
    last: BTreeMap<(String, Job), (f64, bool)>,
    /// (stack, job, succeeded) → runs.
    runs: BTreeMap<(String, Job, bool), u64>,
    /// stack → changes the last drift check found.
    drift: BTreeMap<String, usize>,
    /// (stack, database, result) → upgrades.
    upgrades: BTreeMap<(String, String, String), u64>,
}

/// The daemon's metrics, shared by its jobs and its server.
#[derive(Default)]
pub struct Metrics {
    counters: Mutex<Counters>,
}

fn seconds(time: SystemTime) -> f64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A label value, escaped as the text format asks.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    fn with<T>(&self, f: impl FnOnce(&mut Counters) -> T) -> T {
        f(&mut self.counters.lock().expect("metrics lock"))
    }

    /// A job of `stack` ended at `at`.
    pub fn ran(&self, stack: &str, job: Job, succeeded: bool, at: SystemTime) {
        self.with(|c| {
            c.last
                .insert((stack.to_string(), job), (seconds(at), succeeded));
            *c.runs
                .entry((stack.to_string(), job, succeeded))
                .or_default() += 1;
        });
    }

    /// A drift check of `stack` found `drift` things changed outside stack.
    pub fn drift(&self, stack: &str, drift: usize) {
        self.with(|c| c.drift.insert(stack.to_string(), drift));
    }

    /// An upgrade of `database` ended with `result` (`succeeded`, `rolled-back`, `failed`).
    pub fn upgraded(&self, stack: &str, database: &str, result: &str) {
        self.with(|c| {
            *c.upgrades
                .entry((stack.to_string(), database.to_string(), result.to_string()))
                .or_default() += 1;
        });
    }

    /// The metrics in Prometheus' text format.
    pub fn render(&self) -> String {
        self.with(|c| {
            let mut out = String::new();
            header(
                &mut out,
                "stack_daemon_last_run_timestamp_seconds",
                "gauge",
                "When a job of a stack last ended (Unix time).",
            );
            for ((stack, job), (at, _)) in &c.last {
                let _ = writeln!(
                    out,
                    "stack_daemon_last_run_timestamp_seconds{{stack=\"{}\",job=\"{}\"}} {at}",
                    label(stack),
                    job.label()
                );
            }
            header(
                &mut out,
                "stack_daemon_last_run_success",
                "gauge",
                "Whether a job's last run succeeded (1) or failed (0).",
            );
            for ((stack, job), (_, ok)) in &c.last {
                let _ = writeln!(
                    out,
                    "stack_daemon_last_run_success{{stack=\"{}\",job=\"{}\"}} {}",
                    label(stack),
                    job.label(),
                    u8::from(*ok)
                );
            }
            header(
                &mut out,
                "stack_daemon_runs_total",
                "counter",
                "Job runs, by result.",
            );
            for ((stack, job, ok), n) in &c.runs {
                let _ = writeln!(
                    out,
                    "stack_daemon_runs_total{{stack=\"{}\",job=\"{}\",result=\"{}\"}} {n}",
                    label(stack),
                    job.label(),
                    if *ok { "ok" } else { "error" }
                );
            }
            header(
                &mut out,
                "stack_daemon_drift_changes",
                "gauge",
                "Things the last drift check of a stack found changed outside stack (0: none).",
            );
            for (stack, n) in &c.drift {
                let _ = writeln!(
                    out,
                    "stack_daemon_drift_changes{{stack=\"{}\"}} {n}",
                    label(stack)
                );
            }
            header(
                &mut out,
                "stack_daemon_upgrades_total",
                "counter",
                "Database image upgrades, by result (succeeded, rolled-back, failed).",
            );
            for ((stack, database, result), n) in &c.upgrades {
                let _ = writeln!(
                    out,
                    "stack_daemon_upgrades_total{{stack=\"{}\",database=\"{}\",result=\"{}\"}} {n}",
                    label(stack),
                    label(database),
                    label(result)
                );
            }
            out
        })
    }

    /// Serves `GET /metrics` on `listener` until the stop reaches `Soon`.
    pub async fn serve(&self, listener: TcpListener, cancel: &Cancel) {
        loop {
            let Ok(accepted) = cancel.until(Level::Soon, listener.accept()).await else {
                return;
            };
            if let Ok((stream, _)) = accepted {
                let _ = cancel.until(Level::Soon, self.answer(stream)).await;
            }
        }
    }

    async fn answer(&self, mut stream: TcpStream) {
        let mut request = Vec::new();
        let mut buffer = [0u8; 1024];
        let read = async {
            while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < REQUEST_LIMIT {
                match stream.read(&mut buffer).await {
                    Ok(0) | Err(_) => return false,
                    Ok(n) => request.extend_from_slice(&buffer[..n]),
                }
            }
            true
        };
        if !matches!(tokio::time::timeout(READ_TIMEOUT, read).await, Ok(true)) {
            return;
        }
        let line = String::from_utf8_lossy(&request);
        let line = line.lines().next().unwrap_or_default();
        let (status, kind, body) = match line.split(' ').collect::<Vec<_>>().as_slice() {
            ["GET", "/metrics", _] => (
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                self.render(),
            ),
            ["GET", _, _] => (
                "404 Not Found",
                "text/plain",
                "stack daemon: metrics are at /metrics\n".to_string(),
            ),
            _ => (
                "405 Method Not Allowed",
                "text/plain",
                "only GET\n".to_string(),
            ),
        };
        let answer = format!(
            "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = tokio::time::timeout(READ_TIMEOUT, stream.write_all(answer.as_bytes())).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_in_the_text_format_with_escaped_labels() {
        let metrics = Metrics::default();
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        metrics.ran("demo", Job::Drift, true, at);
        metrics.ran("demo", Job::Upgrade, false, at);
        metrics.drift("demo", 2);
        metrics.upgraded("demo", "do\"cs", "rolled-back");
        let text = metrics.render();
        for line in [
            "# TYPE stack_daemon_last_run_timestamp_seconds gauge",
            "stack_daemon_last_run_timestamp_seconds{stack=\"demo\",job=\"drift\"} 100",
            "stack_daemon_last_run_success{stack=\"demo\",job=\"upgrade\"} 0",
            "stack_daemon_runs_total{stack=\"demo\",job=\"upgrade\",result=\"error\"} 1",
            "stack_daemon_drift_changes{stack=\"demo\"} 2",
            "stack_daemon_upgrades_total{stack=\"demo\",database=\"do\\\"cs\",result=\"rolled-back\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
    }
}
