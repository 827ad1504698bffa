//! `stack run` and `stack gc`: an environment made for one command and
//! always removed after it, and the sweep that removes those whose run
//! could not (a runner killed with SIGKILL) once their expiry has passed.
//!
//! `run`'s own lines go to stderr in text mode, so the command's stdout
//! is the command's alone.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::args::{GcArgs, GcProvider, OutputFormat, RunArgs};
use super::commands::{destroy, print_line, run_environment, show_plan, Adopt, Removal};
use super::outcome::Failure;
use super::progress::Progress;
use super::{invocation, prompt, signals, view};
use crate::engine::{ApplyOptions, Cancel, Events, Expiring, Level, Mode, Session};
use crate::model::{self, Stack};
use crate::phases;

/// How long CMD has to end after `stack run` passed it a signal, before
/// it is killed.
const COMMAND_GRACE: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot start `{command}` for environment {environment}")]
    Start {
        command: String,
        environment: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot wait for `{command}`")]
    Wait {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("stack {stack} is on {found}: --provider {asked} has nothing of it to sweep")]
    OtherProvider {
        stack: String,
        found: String,
        asked: String,
    },
    #[error("{} of {total} expired environment{} could not be removed:\n{}", failed.len(), if *total == 1 { "" } else { "s" }, failed.join("\n"))]
    GcFailed { total: usize, failed: Vec<String> },
}

/// `stack run`: a new environment `NAME-ID`, `up`, CMD with the
/// environment in its variables, then `down` whatever happened, and CMD's
/// exit code (or `up`'s failure code).
pub async fn run(
    args: &RunArgs,
    output: OutputFormat,
    cancel: &Cancel,
) -> anyhow::Result<ExitCode> {
    let base = model::load(&args.file)?;
    let id = crate::run::new_run_id()?;
    let stack = run_environment(&base, &id, args.ttl);
    // The environment's names are longer than the stack's: they are checked.
    phases::check(&stack)?;
    let json = output == OutputFormat::Json;
    let failure = Failure::stream(output);
    let say = |line: String| match json {
        true => print_line(&json!({"type": "run", "environment": stack.name, "message": line})),
        false => eprintln!("{line}"),
    };
    say(format!(
        "environment {} (run {id} of stack {}): up",
        stack.name, base.name
    ));
    let code = match up(&stack, args, output, cancel).await {
        Ok(None) => return Ok(ExitCode::from(signals::failure_code(cancel))),
        // The session holds the environment's lock while CMD runs, so no
        // `gc`, `down` or `up` of another process touches it meanwhile.
        Ok(Some(session)) => match command(&session, &stack, &args.command, cancel).await {
            Ok(code) => {
                say(format!("{} exited with {code}", args.command[0]));
                code
            }
            Err(err) => {
                failure.tell(&err);
                signals::failure_code(cancel)
            }
        },
        Err(err) => {
            failure.tell(&err);
            signals::failure_code(cancel)
        }
    };
    // A run stopped by a signal is not a failure to keep: it goes.
    if code != 0 && args.keep_on_failure && cancel.reason().is_none() {
        say(kept(&stack, &args.file, &id));
        return Ok(ExitCode::from(code));
    }
    // `down` runs on a token of its own: a signal that stopped `up` or CMD
    // must not stop the teardown too; one during the teardown does.
    let teardown = Cancel::new();
    signals::watch(&teardown)?;
    say(format!("environment {}: down", stack.name));
    let removal = Removal {
        yes: true,
        adopt: Adopt::No,
        parallelism: args.parallelism,
        on_stderr: true,
        lock_timeout: Duration::ZERO,
    };
    if let Err(err) = destroy(&stack, &removal, output, &teardown).await {
        failure.tell(&err);
        say(format!(
            "environment {} was not removed whole: run `stack down --yes --run {id} {}`, or `stack gc` after it expires",
            stack.name,
            args.file.display()
        ));
        return Ok(ExitCode::from(if code == 0 { 1 } else { code }));
    }
    Ok(ExitCode::from(code))
}

/// The environment's `up`: plan, one approval for making it and removing
/// it, apply. The session, still holding the lock; `None` when the run
/// was not approved (nothing was made).
async fn up(
    stack: &Stack,
    args: &RunArgs,
    output: OutputFormat,
    cancel: &Cancel,
) -> anyhow::Result<Option<Session>> {
    let json = output == OutputFormat::Json;
    let events = Events::new(Arc::new(Progress::new(json)));
    let mut session = phases::open(stack, &invocation::writing(Duration::ZERO, cancel)).await?;
    let plan = session.plan(Mode::Normal, cancel, &events).await?;
    match json {
        true => show_plan(&plan, true),
        false => eprint!("{}", view::plan(&plan)),
    }
    let asked = prompt::confirm(
        args.yes,
        json,
        "Make this environment, run the command in it, then destroy it?",
        "run it",
        cancel,
    )
    .await;
    if let Err(err) = asked {
        session.forget().await?;
        Failure::stream(output).tell(&err.into());
        return Ok(None);
    }
    let options = ApplyOptions {
        parallelism: usize::from(args.parallelism),
    };
    let applied = session.apply(&plan, &options, cancel, &events).await?;
    match json {
        true => {
            print_line(&json!({"type": "applied", "summary": plan.summary, "applied": applied}))
        }
        false => eprintln!("{}", view::applied(&plan, &applied)),
    }
    Ok(Some(session))
}

/// Removes the files `run` handed its command, however it ends.
struct RunFiles(std::path::PathBuf);

impl Drop for RunFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs CMD with the environment's variables, its stdio the run's; a
/// signal to `stack run` is passed on, and CMD killed if it has not ended
/// `COMMAND_GRACE` later. Its exit code, or 128 + the signal that ended it.
async fn command(
    session: &Session,
    stack: &Stack,
    argv: &[String],
    cancel: &Cancel,
) -> anyhow::Result<u8> {
    let status = session.status(cancel).await?;
    let stack = &Stack {
        expires: phases::expiry(stack, session.state()),
        ..stack.clone()
    };
    let folder = session.artifacts().run_dir();
    let _files = RunFiles(folder.clone());
    crate::run::write_logins(&status, &folder)?;
    let status_file = folder.join("status.json");
    crate::files::write_private(
        &status_file,
        &serde_json::to_vec_pretty(&status).expect("status serialises"),
    )
    .map_err(crate::files::failed("write", &status_file))?;
    let vars = crate::run::variables(stack, &status, &folder, &status_file);
    let shown = argv.join(" ");
    let mut child = tokio::process::Command::new(&argv[0])
        .args(&argv[1..])
        .envs(vars)
        .spawn()
        .map_err(|source| RunError::Start {
            command: shown.clone(),
            environment: stack.name.clone(),
            source,
        })?;
    let waited = tokio::select! {
        status = child.wait() => status,
        _ = cancel.reached(Level::Soon) => {
            if let (Some(pid), Some(reason)) = (child.id(), cancel.reason()) {
                let signal = match reason {
                    crate::engine::StopReason::Interrupt => libc::SIGINT,
                    crate::engine::StopReason::Terminate => libc::SIGTERM,
                };
                // SAFETY: kill(2) on the child's own pid, which `child` still holds.
                unsafe { libc::kill(pid as libc::pid_t, signal) };
            }
            match tokio::time::timeout(COMMAND_GRACE, child.wait()).await {
                Ok(status) => status,
                Err(_) => {
                    let _ = child.start_kill();
                    child.wait().await
                }
            }
        }
    };
    let status = waited.map_err(|source| RunError::Wait {
        command: shown,
        source,
    })?;
    use std::os::unix::process::ExitStatusExt;
    Ok(match (status.code(), status.signal()) {
        (Some(code), _) => code.clamp(0, 255) as u8,
        (None, Some(signal)) => (128 + signal).clamp(0, 255) as u8,
        (None, None) => 1,
    })
}

/// What `--keep-on-failure` prints: how to reach the kept environment and
/// how to remove it.
fn kept(stack: &Stack, file: &Path, id: &str) -> String {
    let file = file.display();
    let expires = stack
        .expires
        .map(|e| {
            format!(
                " (`stack gc {file}` removes it after {})",
                crate::expiry::rfc3339(e)
            )
        })
        .unwrap_or_default();
    format!(
        "kept environment {} after the failure: `stack status --run {id} {file}` shows it, `stack ssh --run {id} {file} NODE` reaches a node, `stack kubeconfig --run {id} {file}` prints its kubeconfig; `stack down --run {id} {file}` removes it{expires}",
        stack.name
    )
}

/// `stack gc`: the stack's environments (its own and its runs') found by
/// their marks; those expired are listed, approved once, and each removed
/// by a destroy plan of its own (taking over what no state records).
pub async fn gc(args: &GcArgs, output: OutputFormat, cancel: &Cancel) -> anyhow::Result<ExitCode> {
    let base = model::load(&args.file)?;
    if let Some(asked) = args.provider {
        let asked = match asked {
            GcProvider::Ec2 => "ec2",
            GcProvider::Kvm => "kvm",
            GcProvider::Kubernetes => "kubernetes",
        };
        if base.provider_name() != asked {
            return Err(RunError::OtherProvider {
                stack: base.name.clone(),
                found: base.provider_name().to_string(),
                asked: asked.to_string(),
            }
            .into());
        }
    }
    let json = output == OutputFormat::Json;
    let found = phases::open(&base, &invocation::reading(cancel))
        .await?
        .environments(cancel)
        .await?;
    let now = args.as_of.unwrap_or_else(crate::expiry::now);
    let (expired, alive): (Vec<Expiring>, Vec<Expiring>) =
        found.into_iter().partition(|env| env.expires <= now);
    if json {
        print_line(&json!({"type": "environments", "expired": expired, "notExpired": alive}));
    } else {
        print!("{}", view::environments(&base.name, &expired, &alive));
    }
    if expired.is_empty() || args.dry_run {
        return Ok(ExitCode::SUCCESS);
    }
    prompt::confirm(
        args.yes,
        json,
        "Destroy these expired environments?",
        "destroy them",
        cancel,
    )
    .await?;
    let mut failed = Vec::new();
    for env in &expired {
        let stack = match &env.run {
            Some(id) => run_environment(&base, id, None),
            None => base.clone(),
        };
        if stack.name != env.name {
            failed.push(format!(
                "  {}: its marks name run {} of stack {}, which is not how that run's environment is named",
                env.name,
                env.run.as_deref().unwrap_or("-"),
                base.name
            ));
            continue;
        }
        if let Err(err) = sweep(&stack, args, output, cancel).await {
            failed.push(format!(
                "  {}: {}",
                env.name,
                crate::error_chain::error_chain(&*err)
            ));
        }
    }
    if !failed.is_empty() {
        return Err(RunError::GcFailed {
            total: expired.len(),
            failed,
        }
        .into());
    }
    Ok(ExitCode::SUCCESS)
}

/// Removes one expired environment: with its state when this machine has
/// it, else taking over what its marks show into a new state.
async fn sweep(
    stack: &Stack,
    args: &GcArgs,
    output: OutputFormat,
    cancel: &Cancel,
) -> anyhow::Result<()> {
    let removal = Removal {
        yes: true,
        adopt: Adopt::WhenNothingIsRecorded,
        parallelism: args.parallelism,
        on_stderr: false,
        lock_timeout: Duration::ZERO,
    };
    destroy(stack, &removal, output, cancel).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_environment_says_how_to_reach_and_remove_it() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("stacks/reference.yaml");
        let base = model::load(&path).unwrap();
        let mut stack = run_environment(&base, "3f9a1c", None);
        stack.expires = Some(1_796_300_000);
        let text = kept(&stack, Path::new("ci.yaml"), "3f9a1c");
        assert!(text.contains("`stack down --run 3f9a1c ci.yaml`"), "{text}");
        assert!(text.contains("after 2026-12-03T12:13:20Z"), "{text}");
    }
}
