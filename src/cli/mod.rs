//! The command-line layer: the clap definitions (`args`), one thin function
//! per subcommand over the library (`commands`, and `state` for the
//! `state` group), the command line as the state records it
//! (`invocation`), what they print (`view`),
//! the progress renderer (`progress`) and its heartbeat off a terminal
//! (`heartbeat`), the confirmation prompt (`prompt`), the signals that feed
//! the cancellation token (`signals`), the environments of `run` and
//! `gc` (`run`), and how a run ends: exit codes and errors for people and
//! for JSON readers (`outcome`). Nothing below this
//! layer reads stdin, draws progress or handles signals.

pub mod args;
mod commands;
mod heartbeat;
mod invocation;
mod outcome;
mod progress;
mod prompt;
mod run;
mod signals;
mod state;
mod view;

use std::process::ExitCode;

use anyhow::Context;

use crate::engine::Cancel;
pub use args::{Cli, Command, OutputFormat};
pub use outcome::{colour_on_stderr, parse, Failure};
pub use signals::failure_code;

/// Runs the command; `cancel` is the run's token, which SIGINT and SIGTERM feed.
pub async fn run(cli: Cli, cancel: &Cancel) -> anyhow::Result<ExitCode> {
    let output = cli.output;
    if !matches!(
        cli.command,
        Command::Switch { .. } | Command::Completions { .. }
    ) {
        signals::watch(cancel).context("cannot listen for SIGINT and SIGTERM")?;
    }
    match cli.command {
        Command::Validate(args) => commands::validate(&args, output),
        Command::Plan(args) => commands::plan(&args, output, cancel).await,
        Command::Up(args) => commands::up(&args, output, cancel).await,
        Command::Down(args) => commands::down(&args, output, cancel).await,
        Command::Status(args) => commands::status(&args, output, cancel).await,
        Command::Upgrade(args) => commands::upgrade(&args, output, cancel).await,
        Command::Daemon(args) => commands::daemon(&args, cancel).await,
        Command::Kubeconfig(args) => commands::kubeconfig(&args, output),
        Command::Completions { shell } => Ok(commands::completions(shell)),
        Command::Ssh(args) => commands::ssh(&args, cancel).await,
        Command::State(command) => state::run(&command, output, cancel).await,
        Command::Run(args) => run::run(&args, output, cancel).await,
        Command::Gc(args) => run::gc(&args, output, cancel).await,
        Command::Switch { socket } => {
            crate::phases::infra::kvm::switch::serve(&socket)
                .await
                .with_context(|| format!("the switch on {} stopped", socket.display()))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
