//! What the engine and the phases tell whoever drives them, as typed events:
//! the library prints nothing, the CLI renders these (bars on a terminal,
//! plain lines elsewhere, JSON lines with `--output json`), and another
//! caller (a daemon, a test) does what it likes with them.

use std::sync::Arc;
use std::time::Duration;

use serde::{Serialize, Serializer};

use super::cancel::{Level, StopReason};
use super::plan::{Action, StageRef, Summary};

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A stage's part of the live world is being read back.
    Refreshing {
        stage: StageRef,
    },
    /// The plan is made.
    PlanReady {
        summary: Summary,
    },
    ChangeStarted {
        stage: StageRef,
        address: String,
        action: Action,
    },
    ChangeFinished {
        stage: StageRef,
        address: String,
        action: Action,
        id: Option<String>,
        seconds: f64,
    },
    ChangeFailed {
        stage: StageRef,
        address: String,
        action: Action,
        error: String,
        seconds: f64,
        /// Whether the failure stops the run (else it is left for the next run).
        stops_run: bool,
    },
    /// A change began a wait that may be long (SSH to answer, cloud-init
    /// to finish); it lasts until the change ends or its next wait begins.
    WaitStarted {
        stage: StageRef,
        address: String,
        /// What it waits for: `SSH on control-0`.
        what: String,
        /// How long it waits at most.
        #[serde(rename = "limit_seconds", serialize_with = "seconds")]
        limit: Duration,
    },
    /// A stage's health gate read its objects: `ready` of `total` are
    /// ready (told at the first read and whenever the count changes).
    GateWaiting {
        stage: StageRef,
        ready: usize,
        total: usize,
        /// What is not ready yet, and why, one line each.
        waiting: Vec<String>,
        /// How long the gate waits at most.
        #[serde(rename = "limit_seconds", serialize_with = "seconds")]
        limit: Duration,
    },
    GatePassed {
        stage: StageRef,
        seconds: f64,
    },
    StageSkipped {
        stage: StageRef,
        reason: String,
    },
    Warning {
        stage: Option<StageRef>,
        message: String,
    },
    /// `stack upgrade` replaces a member of a database cluster with one on
    /// `image`; it lasts until the member is ready and the cluster healthy.
    MemberRolling {
        database: String,
        pod: String,
        image: String,
        #[serde(rename = "limit_seconds", serialize_with = "seconds")]
        limit: Duration,
    },
    MemberHealthy {
        database: String,
        pod: String,
        seconds: f64,
    },
    /// A member failed its health gate: the rollout stops and puts `image`
    /// back.
    RollingBack {
        database: String,
        pod: String,
        image: String,
        reason: String,
    },
    /// A stop was asked for and the engine acts on it.
    Stopping {
        reason: StopReason,
        level: Level,
        /// Changes still under way.
        running: usize,
    },
}

/// A duration in JSON: seconds, as the events' other times are.
fn seconds<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(duration.as_secs_f64())
}

/// Where events go.
pub trait EventSink: Send + Sync {
    fn emit(&self, event: Event);
}

/// A cheap handle to the run's event sink.
#[derive(Clone)]
pub struct Events {
    sink: Arc<dyn EventSink>,
}

struct Discard;

impl EventSink for Discard {
    fn emit(&self, _event: Event) {}
}

impl Events {
    pub fn new(sink: Arc<dyn EventSink>) -> Events {
        Events { sink }
    }

    /// Events nobody listens to.
    pub fn discard() -> Events {
        Events::new(Arc::new(Discard))
    }

    pub fn emit(&self, event: Event) {
        self.sink.emit(event);
    }

    pub fn warn(&self, stage: Option<&StageRef>, message: impl Into<String>) {
        self.emit(Event::Warning {
            stage: stage.cloned(),
            message: message.into(),
        });
    }
}

/// Keeps every event, for tests of the engine and the phases.
#[cfg(test)]
#[derive(Default)]
pub struct Recorder {
    pub events: std::sync::Mutex<Vec<Event>>,
}

#[cfg(test)]
impl EventSink for Recorder {
    fn emit(&self, event: Event) {
        self.events.lock().expect("recorder lock").push(event);
    }
}
