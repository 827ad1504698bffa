//! How progress reaches the user: bars on a terminal, plain lines
//! elsewhere, nothing on stdout (which carries plans and `--output json`).

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// An error with its causes, `error: cause: cause`.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    message
}

pub enum Reporter {
    Bars {
        multi: MultiProgress,
        bars: Mutex<HashMap<String, ProgressBar>>,
    },
    Plain,
}

impl Reporter {
    /// Bars when stderr is a terminal, plain lines otherwise.
    pub fn new() -> Self {
        if std::io::stderr().is_terminal() {
            Reporter::Bars {
                multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
                bars: Mutex::new(HashMap::new()),
            }
        } else {
            Reporter::Plain
        }
    }

    pub fn start(&self, address: &str, doing: &str) {
        match self {
            Reporter::Bars { multi, bars } => {
                let bar = multi.add(ProgressBar::new_spinner());
                bar.set_style(
                    ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
                        .expect("progress template parses"),
                );
                bar.set_message(format!("{address}: {doing}"));
                bar.enable_steady_tick(Duration::from_millis(120));
                bars.lock()
                    .expect("progress lock")
                    .insert(address.to_string(), bar);
            }
            Reporter::Plain => eprintln!("{address}: {doing}"),
        }
    }

    pub fn finish(&self, address: &str, message: &str, elapsed: Duration) {
        let line = format!("{address}: {message} after {:.1}s", elapsed.as_secs_f64());
        match self {
            Reporter::Bars { bars, .. } => {
                match bars.lock().expect("progress lock").remove(address) {
                    Some(bar) => bar.finish_with_message(line),
                    None => eprintln!("{line}"),
                }
            }
            Reporter::Plain => eprintln!("{line}"),
        }
    }

    pub fn line(&self, message: &str) {
        match self {
            Reporter::Bars { multi, .. } => {
                let _ = multi.println(message);
            }
            Reporter::Plain => eprintln!("{message}"),
        }
    }
}

impl Default for Reporter {
    fn default() -> Self {
        Self::new()
    }
}
