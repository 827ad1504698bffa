//! How a run ends, for people and for scripts alike: the exit codes, a
//! usage error, and a failure told as `error:` with its causes as short
//! lines on stderr and, with `--output json`, also as one JSON document on
//! stdout (stdout then carries nothing that is not JSON).

use std::ffi::OsString;
use std::process::ExitCode;

use clap::{ColorChoice, CommandFactory, FromArgMatches};
use serde_json::{json, Value};

use super::args::{Cli, Command, OutputFormat};
use crate::error_chain::distinct;
use crate::model::LoadError;

/// `plan --detailed-exitcode` when there is something to do.
pub const EXIT_CHANGES: u8 = 2;
/// A command line `stack` does not understand (EX_USAGE of sysexits.h).
pub const EXIT_USAGE: u8 = 64;

/// Whether colour is allowed at all: not when `NO_COLOR` is set to
/// anything but the empty string (no-color.org).
fn colour_allowed() -> bool {
    std::env::var_os("NO_COLOR").is_none_or(|value| value.is_empty())
}

/// Whether what goes to stderr may carry colour: on a terminal, and only
/// when `NO_COLOR` allows it.
pub fn colour_on_stderr() -> bool {
    use std::io::IsTerminal;
    colour_allowed() && std::io::stderr().is_terminal()
}

/// The command line, or the exit code of a run that ends here: 0 after
/// `--help` or `--version`, 64 after a usage error (told on stderr, and as
/// a JSON error on stdout when the command line asks for `--output json`).
pub fn parse() -> Result<Cli, ExitCode> {
    let mut command = Cli::command();
    if !colour_allowed() {
        command = command.color(ColorChoice::Never);
    }
    let args: Vec<OsString> = std::env::args_os().collect();
    let err = match command
        .clone()
        .try_get_matches_from(&args)
        .and_then(|matches| Cli::from_arg_matches(&matches))
    {
        Ok(cli) => return Ok(cli),
        Err(err) => err,
    };
    let _ = err.print();
    if !err.use_stderr() {
        return Err(ExitCode::SUCCESS);
    }
    if asks_for_json(command, &args) {
        // clap's first paragraph: `error: ...` and the lines that complete it.
        let rendered = err.render().to_string();
        let paragraph: Vec<&str> = rendered
            .lines()
            .take_while(|line| !line.trim().is_empty())
            .map(str::trim)
            .collect();
        let joined = paragraph.join(" ");
        let message = joined.strip_prefix("error: ").unwrap_or(&joined);
        print_document(
            &json!({"error": {"message": message, "causes": [], "diagnostics": []}}),
            false,
        );
    }
    Err(ExitCode::from(EXIT_USAGE))
}

/// Whether a command line that clap refused still says `--output json`
/// (read as far as it can be read).
fn asks_for_json(command: clap::Command, args: &[OsString]) -> bool {
    command
        .ignore_errors(true)
        .try_get_matches_from(args)
        .ok()
        .and_then(|matches| matches.get_one::<OutputFormat>("output").copied())
        == Some(OutputFormat::Json)
}

/// How a failure of this run is told.
pub struct Failure {
    output: OutputFormat,
    /// The command's stdout is a stream of JSON lines (`up`, `down`): the
    /// error is its last line.
    one_line: bool,
}

impl Failure {
    pub fn of(cli: &Cli) -> Failure {
        Failure {
            output: cli.output,
            one_line: matches!(
                cli.command,
                Command::Up(_) | Command::Down(_) | Command::Run(_) | Command::Gc(_)
            ),
        }
    }

    /// For a command that goes on after a failure (`run`): a stream of
    /// JSON lines with `--output json`.
    pub fn stream(output: OutputFormat) -> Failure {
        Failure {
            output,
            one_line: true,
        }
    }

    /// `error:` and the causes on stderr; with `--output json` the JSON
    /// error document on stdout as well.
    pub fn tell(&self, err: &anyhow::Error) {
        let lines = distinct(err.chain().map(ToString::to_string));
        if let Some((message, causes)) = lines.split_first() {
            eprintln!("error: {message}");
            for cause in causes {
                eprintln!("  caused by: {}", cause.replace('\n', "\n    "));
            }
        }
        if self.output == OutputFormat::Json {
            print_document(&document(err), self.one_line);
        }
    }
}

/// `{"error": {"message", "causes", "diagnostics"}}`: the message and
/// its causes as short lines; the diagnostics of an invalid stack file
/// (as `validate --output json` gives them), which its message then only
/// counts.
pub fn document(err: &anyhow::Error) -> Value {
    let mut diagnostics = Vec::new();
    let lines = distinct(err.chain().map(|e| match e.downcast_ref::<LoadError>() {
        Some(LoadError::Invalid {
            diagnostics: found, ..
        }) => {
            diagnostics.extend(found.iter().cloned());
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default();
            first.trim_end_matches(':').to_string()
        }
        _ => e.to_string(),
    }));
    let (message, causes) = lines.split_first().map_or(("", &[][..]), |(m, c)| (m, c));
    json!({"error": {"message": message, "causes": causes, "diagnostics": diagnostics}})
}

/// One JSON document on stdout: pretty, or on one line in a stream.
pub fn print_document(value: &Value, one_line: bool) {
    use std::io::Write;
    let text = if one_line {
        value.to_string()
    } else {
        serde_json::to_string_pretty(value).expect("JSON serialises")
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
}
