//! Off a terminal nothing moves while a change or a health gate waits, so
//! a log could not tell a slow wait from a hung run: every wait still under
//! way is told again, with its elapsed time and its limit, at least every
//! 30 s (`STACK_HEARTBEAT` sets the seconds, for tests and for CI logs).
//! The ticker is a thread of the renderer, stopped when the renderer goes.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::engine::Event;

/// Seconds between two heartbeat lines of one wait, unless `STACK_HEARTBEAT` says otherwise.
const EVERY: Duration = Duration::from_secs(30);

/// The interval `STACK_HEARTBEAT` asks for (whole seconds, at least 1),
/// else 30 s; a value that is no such number is told and ignored.
pub fn interval() -> (Duration, Option<String>) {
    match std::env::var("STACK_HEARTBEAT") {
        Err(_) => (EVERY, None),
        Ok(value) => match value.trim().parse::<u64>() {
            Ok(seconds) if seconds >= 1 => (Duration::from_secs(seconds), None),
            _ => (
                EVERY,
                Some(format!(
                    "warning: STACK_HEARTBEAT={value:?} is not a whole number of seconds (1 or more); heartbeat lines come every {}s",
                    EVERY.as_secs()
                )),
            ),
        },
    }
}

/// One thing under way: a change, a wait of a change, or a health gate.
struct Wait {
    /// `ec2.instance.web[0]: still creating`.
    doing: String,
    since: Instant,
    limit: Option<Duration>,
    /// When a line last told of it (when it began, at first).
    told: Instant,
}

/// What is under way, and which of it is due for a heartbeat line.
pub struct UnderWay {
    every: Duration,
    waits: BTreeMap<String, Wait>,
}

fn gate_key(number: usize) -> String {
    format!("stage {number}")
}

impl UnderWay {
    pub fn new(every: Duration) -> UnderWay {
        UnderWay {
            every,
            waits: BTreeMap::new(),
        }
    }

    fn begin(&mut self, key: String, doing: String, limit: Option<Duration>, now: Instant) {
        self.waits.insert(
            key,
            Wait {
                doing,
                since: now,
                limit,
                told: now,
            },
        );
    }

    /// Follows `event`, seen at `now`: what begins, what ends.
    pub fn observe(&mut self, event: &Event, now: Instant) {
        match event {
            Event::ChangeStarted {
                address, action, ..
            } => self.begin(
                address.clone(),
                format!("{address}: still {}", action.verbs().0),
                None,
                now,
            ),
            Event::WaitStarted {
                address,
                what,
                limit,
                ..
            } => self.begin(
                address.clone(),
                format!("{address}: still waiting for {what}"),
                Some(*limit),
                now,
            ),
            Event::ChangeFinished { address, .. } | Event::ChangeFailed { address, .. } => {
                self.waits.remove(address);
            }
            Event::GateWaiting {
                stage,
                ready,
                total,
                waiting,
                limit,
            } => {
                let key = gate_key(stage.number);
                if waiting.is_empty() {
                    self.waits.remove(&key);
                    return;
                }
                let doing = format!(
                    "{stage}: still waiting for {} of {total} object{} to be ready",
                    total - ready,
                    if *total == 1 { "" } else { "s" }
                );
                match self.waits.get_mut(&key) {
                    Some(wait) => wait.doing = doing,
                    None => self.begin(key, doing, Some(*limit), now),
                }
            }
            Event::GatePassed { stage, .. } => {
                self.waits.remove(&gate_key(stage.number));
            }
            Event::MemberRolling {
                database,
                pod,
                limit,
                ..
            } => self.begin(
                pod.clone(),
                format!("database {database}: still waiting for {pod} to be healthy"),
                Some(*limit),
                now,
            ),
            Event::MemberHealthy { pod, .. } | Event::RollingBack { pod, .. } => {
                self.waits.remove(pod);
            }
            Event::Refreshing { .. }
            | Event::PlanReady { .. }
            | Event::StageSkipped { .. }
            | Event::Warning { .. }
            | Event::Stopping { .. } => {}
        }
    }

    /// When the next line is due (an interval from `now` when nothing waits).
    fn next_due(&self, now: Instant) -> Instant {
        self.waits
            .values()
            .map(|w| w.told + self.every)
            .min()
            .unwrap_or(now + self.every)
    }

    /// The lines due at `now`, each wait then counted as told.
    pub fn due(&mut self, now: Instant) -> Vec<String> {
        let mut lines = Vec::new();
        for wait in self.waits.values_mut() {
            if now < wait.told + self.every {
                continue;
            }
            wait.told = now;
            let elapsed = short(now - wait.since);
            lines.push(match wait.limit {
                Some(limit) => format!("… {} ({elapsed} of {})", wait.doing, short(limit)),
                None => format!("… {} ({elapsed})", wait.doing),
            });
        }
        lines
    }
}

/// `1h2m`, `1m30s`, `45s`: whole seconds, zero parts left out.
pub fn short(duration: Duration) -> String {
    let seconds = duration.as_secs();
    let parts = [
        (seconds / 3600, "h"),
        (seconds / 60 % 60, "m"),
        (seconds % 60, "s"),
    ];
    let shown: String = parts
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, unit)| format!("{n}{unit}"))
        .collect();
    if shown.is_empty() {
        "0s".to_string()
    } else {
        shown
    }
}

/// The ticker thread that writes the due lines on stderr.
pub struct Heartbeat {
    under_way: Arc<Mutex<UnderWay>>,
    stop: Option<mpsc::Sender<()>>,
    ticker: Option<JoinHandle<()>>,
}

impl Heartbeat {
    /// Starts ticking at `every`.
    pub fn start(every: Duration) -> Heartbeat {
        let under_way = Arc::new(Mutex::new(UnderWay::new(every)));
        let (stop, stopped) = mpsc::channel::<()>();
        let shared = Arc::clone(&under_way);
        let ticker = std::thread::spawn(move || loop {
            let now = Instant::now();
            let next = shared.lock().expect("heartbeat lock").next_due(now);
            match stopped.recv_timeout(next.saturating_duration_since(now)) {
                Err(RecvTimeoutError::Timeout) => {}
                Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
            }
            let lines = shared.lock().expect("heartbeat lock").due(Instant::now());
            let mut err = std::io::stderr().lock();
            for line in lines {
                let _ = writeln!(err, "{line}");
            }
        });
        Heartbeat {
            under_way,
            stop: Some(stop),
            ticker: Some(ticker),
        }
    }

    pub fn observe(&self, event: &Event) {
        self.under_way
            .lock()
            .expect("heartbeat lock")
            .observe(event, Instant::now());
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(ticker) = self.ticker.take() {
            let _ = ticker.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Action, StageRef};

    fn stage() -> StageRef {
        StageRef {
            number: 2,
            of: 3,
            name: "cluster bootstrap".to_string(),
        }
    }

    #[test]
    fn a_wait_is_told_every_interval_with_its_elapsed_time_and_limit_until_its_change_ends() {
        let start = Instant::now();
        let at = |seconds: u64| start + Duration::from_secs(seconds);
        let mut under_way = UnderWay::new(Duration::from_secs(30));
        let address = "bootstrap.connect.control-0".to_string();
        under_way.observe(
            &Event::ChangeStarted {
                stage: stage(),
                address: address.clone(),
                action: Action::Create,
            },
            at(0),
        );
        assert_eq!(under_way.next_due(at(0)), at(30));
        assert_eq!(under_way.due(at(29)), Vec::<String>::new());
        assert_eq!(
            under_way.due(at(30)),
            ["… bootstrap.connect.control-0: still creating (30s)"]
        );
        under_way.observe(
            &Event::WaitStarted {
                stage: stage(),
                address: address.clone(),
                what: "SSH on control-0".to_string(),
                limit: Duration::from_secs(600),
            },
            at(40),
        );
        assert_eq!(under_way.due(at(60)), Vec::<String>::new());
        assert_eq!(
            under_way.due(at(130)),
            ["… bootstrap.connect.control-0: still waiting for SSH on control-0 (1m30s of 10m)"]
        );
        assert_eq!(under_way.next_due(at(130)), at(160));
        under_way.observe(
            &Event::ChangeFailed {
                stage: stage(),
                address,
                action: Action::Create,
                error: "no SSH".to_string(),
                seconds: 150.0,
                stops_run: true,
            },
            at(150),
        );
        assert_eq!(under_way.due(at(3600)), Vec::<String>::new());
    }

    #[test]
    fn a_gate_is_told_with_what_it_still_waits_for_until_it_passes() {
        let start = Instant::now();
        let at = |seconds: u64| start + Duration::from_secs(seconds);
        let mut under_way = UnderWay::new(Duration::from_secs(30));
        let waiting = |ready: usize| Event::GateWaiting {
            stage: stage(),
            ready,
            total: 3,
            waiting: vec!["StatefulSet apps/web: 0 of 3 ready".to_string(); 3 - ready],
            limit: Duration::from_secs(3900),
        };
        under_way.observe(&waiting(0), at(0));
        under_way.observe(&waiting(1), at(10));
        assert_eq!(
            under_way.due(at(30)),
            ["… stage 2 of 3 (cluster bootstrap): still waiting for 2 of 3 objects to be ready (30s of 1h5m)"]
        );
        under_way.observe(
            &Event::GatePassed {
                stage: stage(),
                seconds: 40.0,
            },
            at(40),
        );
        assert_eq!(under_way.due(at(90)), Vec::<String>::new());
    }
}
