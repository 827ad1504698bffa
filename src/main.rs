//! The `stack` binary: parse the command line, set up logs and the run's
//! cancellation token, run the command, tell its error (cause chain on
//! stderr, a JSON document on stdout with `--output json`) and turn the
//! outcome into an exit code.

use std::process::ExitCode;

use stack::engine::Cancel;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = match stack::cli::parse() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let level = match cli.verbose {
        0 => "warn,aws_config=error,aws_smithy_runtime=error",
        1 => "stack=info,warn",
        2 => "stack=debug,info",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(stack::cli::colour_on_stderr())
        .with_writer(std::io::stderr)
        .init();
    let failure = stack::cli::Failure::of(&cli);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            failure.tell(&anyhow::Error::new(err).context("cannot start the async runtime"));
            return ExitCode::FAILURE;
        }
    };
    let cancel = Cancel::new();
    match runtime.block_on(stack::cli::run(cli, &cancel)) {
        Ok(code) => code,
        Err(err) => {
            failure.tell(&err);
            ExitCode::from(stack::cli::failure_code(&cancel))
        }
    }
}
