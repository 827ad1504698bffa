//! How the engine's events reach the user: progress bars on a terminal,
//! plain lines elsewhere (both on stderr, stdout carries plans and
//! results) with a heartbeat for long waits, or JSON lines on stdout with
//! `--output json`.

use std::collections::{BTreeSet, HashMap};
use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::heartbeat::{self, Heartbeat};
use crate::engine::{Event, EventSink, Level};

enum Draw {
    Bars {
        multi: MultiProgress,
        bars: Mutex<HashMap<String, ProgressBar>>,
    },
    Plain(Heartbeat),
    Json,
}

/// Renders events as the output format and stderr call for.
pub struct Progress {
    draw: Draw,
    /// Stages whose gate said it waits, so that passing it is told too.
    waited: Mutex<BTreeSet<usize>>,
}

impl Progress {
    /// JSON lines, or bars when stderr is a terminal, plain lines otherwise.
    pub fn new(json: bool) -> Progress {
        let draw = if json {
            Draw::Json
        } else if std::io::stderr().is_terminal() {
            Draw::Bars {
                multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
                bars: Mutex::new(HashMap::new()),
            }
        } else {
            let (every, warning) = heartbeat::interval();
            if let Some(warning) = warning {
                eprintln!("{warning}");
            }
            Draw::Plain(Heartbeat::start(every))
        };
        Progress {
            draw,
            waited: Mutex::new(BTreeSet::new()),
        }
    }

    /// A line for the user, under the bars if there are any.
    pub fn line(&self, message: &str) {
        match &self.draw {
            Draw::Bars { multi, .. } => {
                let _ = multi.println(message);
            }
            Draw::Plain(_) | Draw::Json => eprintln!("{message}"),
        }
    }

    fn start(&self, key: &str, message: String) {
        match &self.draw {
            Draw::Bars { multi, bars } => {
                let bar = multi.add(ProgressBar::new_spinner());
                bar.set_style(
                    ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
                        .expect("progress template parses"),
                );
                bar.set_message(message);
                bar.enable_steady_tick(Duration::from_millis(120));
                bars.lock()
                    .expect("progress lock")
                    .insert(key.to_string(), bar);
            }
            _ => eprintln!("{message}"),
        }
    }

    fn finish(&self, key: &str, line: String) {
        match &self.draw {
            Draw::Bars { bars, .. } => match bars.lock().expect("progress lock").remove(key) {
                Some(bar) => bar.finish_with_message(line),
                None => self.line(&line),
            },
            _ => eprintln!("{line}"),
        }
    }

    fn text(&self, event: Event) {
        match event {
            Event::Refreshing { .. } | Event::PlanReady { .. } => {}
            Event::ChangeStarted {
                address, action, ..
            } => self.start(&address, format!("{address}: {}", action.verbs().0)),
            Event::ChangeFinished {
                address,
                action,
                id,
                seconds,
                ..
            } => {
                let done = action.verbs().1;
                let what = id.map_or_else(|| done.to_string(), |id| format!("{done} {id}"));
                self.finish(&address, format!("{address}: {what} after {seconds:.1}s"));
            }
            Event::ChangeFailed {
                address,
                action,
                error,
                seconds,
                stops_run,
                ..
            } => {
                self.finish(&address, format!("{address}: failed after {seconds:.1}s"));
                if !stops_run {
                    self.line(&format!(
                        "warning: a change that does not stop the run failed (the next run tries again):\n  {} {address}: {error}",
                        action.symbol()
                    ));
                }
            }
            Event::WaitStarted {
                address,
                what,
                limit,
                ..
            } => {
                let line = format!(
                    "{address}: waiting for {what} (at most {})",
                    heartbeat::short(limit)
                );
                match &self.draw {
                    Draw::Bars { bars, .. } => {
                        match bars.lock().expect("progress lock").get(&address) {
                            Some(bar) => bar.set_message(line),
                            None => self.line(&line),
                        }
                    }
                    _ => self.line(&line),
                }
            }
            Event::GateWaiting {
                stage,
                ready,
                total,
                waiting,
                ..
            } => {
                let plural = if total == 1 { "" } else { "s" };
                if waiting.is_empty() {
                    self.line(&format!("{stage}: {total} object{plural} ready"));
                    return;
                }
                self.waited
                    .lock()
                    .expect("progress lock")
                    .insert(stage.number);
                let mut line = format!(
                    "{stage}: waiting for {} of {total} object{plural} to be ready",
                    total - ready
                );
                for what in waiting.iter().take(3) {
                    line.push_str(&format!("\n  {what}"));
                }
                self.line(&line);
            }
            Event::GatePassed { stage, seconds } => {
                if self
                    .waited
                    .lock()
                    .expect("progress lock")
                    .remove(&stage.number)
                {
                    self.line(&format!("{stage}: ready after {seconds:.1}s"));
                }
            }
            Event::MemberRolling {
                database,
                pod,
                image,
                limit,
            } => self.start(
                &pod,
                format!(
                    "database {database}: {pod} onto {image} (healthy within {})",
                    heartbeat::short(limit)
                ),
            ),
            Event::MemberHealthy {
                database,
                pod,
                seconds,
            } => self.finish(
                &pod,
                format!("database {database}: {pod} healthy after {seconds:.1}s"),
            ),
            Event::RollingBack {
                database,
                pod,
                image,
                reason,
            } => {
                self.finish(&pod, format!("database {database}: {pod} failed: {reason}"));
                self.line(&format!("database {database}: rolling back to {image}"));
            }
            Event::StageSkipped { stage, reason } => {
                self.line(&format!("{stage} skipped: {reason}"))
            }
            Event::Warning { stage, message } => match stage {
                Some(stage) => self.line(&format!("warning: {stage}: {message}")),
                None => self.line(&format!("warning: {message}")),
            },
            Event::Stopping {
                reason,
                level,
                running,
            } => {
                let signal = reason.signal_name();
                self.line(&match level {
                    Level::Now => format!(
                        "{signal} again: stopping now, abandoning {running} change{} under way (a create's token is recorded, the next run finds what it made)",
                        if running == 1 { "" } else { "s" }
                    ),
                    _ => format!(
                        "interrupted ({signal}): finishing the changes under way ({running}), starting no more (again to stop now)"
                    ),
                });
            }
        }
    }
}

impl EventSink for Progress {
    fn emit(&self, event: Event) {
        match &self.draw {
            Draw::Json => {
                let line = serde_json::to_string(&event).expect("an event serialises");
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{line}");
                let _ = out.flush();
            }
            Draw::Plain(heartbeat) => {
                heartbeat.observe(&event);
                self.text(event);
            }
            Draw::Bars { .. } => self.text(event),
        }
    }
}
