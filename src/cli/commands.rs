//! One thin function per subcommand: open the stack's session, plan, show,
//! confirm, apply, show. What they print is in `view`, how progress looks
//! in `progress`.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context;
use serde_json::json;

use super::args::{
    ApplyArgs, Cli, DaemonArgs, FileArgs, KubeconfigArgs, OutputFormat, PlanArgs, SshArgs,
    UpgradeArgs,
};
use super::outcome::{print_document, EXIT_CHANGES};
use super::progress::Progress;
use super::{invocation, prompt, view};
use crate::artifacts::Artifact;
use crate::engine::{plan, Applied, ApplyOptions, Cancel, Events, Mode, Plan, PlanRequest};
use crate::model::{self, LoadError};
use crate::phases;
use crate::upgrade::{self, apply::Scheduled};
use crate::{daemon, engine::UpgradeResult};

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("no node `{node}` in stack {stack}{}: `stack status` lists the nodes", if known.is_empty() { " (none is running: run `stack up`)".to_string() } else { format!(" (it has {})", known.join(", ")) })]
    NoSuchNode {
        node: String,
        stack: String,
        known: Vec<String>,
    },
    #[error("down finished but these of stack {stack} are still there:\n{}", left.join("\n"))]
    Leftovers { stack: String, left: Vec<String> },
    #[error("stack {stack} has no kubeconfig yet ({}): run `stack up`", path.display())]
    NoKubeconfig {
        stack: String,
        path: std::path::PathBuf,
    },
    #[error("stack {0} has no Kubernetes cluster (no `kubernetes` section)")]
    NoCluster(String),
    #[error("{0}")]
    OutOfStep(String),
    #[error("{} of {total} upgrade{} did not succeed (`stack status` shows the history):\n{}", failed.len(), if *total == 1 { "" } else { "s" }, failed.join("\n"))]
    UpgradeFailed { total: usize, failed: Vec<String> },
    #[error("stack {0} has no `upgrades.schedule`: `--due` has nothing to be due")]
    NoSchedule(String),
    #[error("cannot serve metrics on {0}")]
    Metrics(std::net::SocketAddr, #[source] std::io::Error),
    #[error("the check of {} of {total} database{} failed:\n{}", failures.len(), if *total == 1 { "" } else { "s" }, failures.join("\n"))]
    UpgradeCheckFailed { total: usize, failures: Vec<String> },
}

/// The stack file, or the environment of one of its runs (`--run ID`).
pub(super) fn load(args: &FileArgs) -> Result<model::Stack, LoadError> {
    let stack = model::load(&args.file)?;
    Ok(match &args.run {
        Some(id) => run_environment(&stack, id, None),
        None => stack,
    })
}

/// The environment of run `id` of `stack`, with its `ttl`: `--ttl`, the
/// stack's, or a day.
pub(super) fn run_environment(
    stack: &model::Stack,
    id: &str,
    ttl: Option<std::time::Duration>,
) -> model::Stack {
    let mut run = stack.for_run(id);
    run.ttl = Some(ttl.or(stack.ttl).unwrap_or(crate::run::DEFAULT_RUN_TTL));
    run
}

fn print_json(value: &serde_json::Value) {
    print_document(value, false);
}

/// One JSON line on stdout (the stream of `up` and `down`).
pub(super) fn print_line(value: &serde_json::Value) {
    print_document(value, true);
}

pub(super) fn show_plan(plan: &Plan, json: bool) {
    if json {
        print_line(&json!({"type": "plan", "plan": plan::to_json(plan)}));
    } else {
        print!("{}", view::plan(plan));
        let _ = std::io::stdout().flush();
    }
}

pub fn validate(args: &FileArgs, output: OutputFormat) -> anyhow::Result<ExitCode> {
    match load(args).and_then(|stack| phases::check(&stack).map(|()| stack)) {
        Ok(stack) => {
            match output {
                OutputFormat::Json => {
                    print_json(&json!({"valid": true, "stack": stack.name, "diagnostics": []}))
                }
                OutputFormat::Text => {
                    println!("{}: valid stack `{}`", args.file.display(), stack.name)
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(LoadError::Invalid { diagnostics, .. }) if output == OutputFormat::Json => {
            print_json(&json!({"valid": false, "diagnostics": diagnostics}));
            Ok(ExitCode::FAILURE)
        }
        Err(err) => Err(err.into()),
    }
}

pub async fn plan(
    args: &PlanArgs,
    output: OutputFormat,
    cancel: &Cancel,
) -> anyhow::Result<ExitCode> {
    let stack = load(&args.file)?;
    let mode = match (args.destroy, args.refresh_only) {
        (true, _) => Mode::Destroy,
        (_, true) => Mode::RefreshOnly,
        _ => Mode::Normal,
    };
    if mode != Mode::Destroy {
        phases::check(&stack)?;
    }
    let json = output == OutputFormat::Json;
    let events = if json {
        Events::discard()
    } else {
        Events::new(Arc::new(Progress::new(false)))
    };
    let session =
        phases::open(&stack, &invocation::writing(args.lock.lock_timeout, cancel)).await?;
    let request = PlanRequest {
        mode,
        adopt: args.adopt,
    };
    let plan = session.plan(request, cancel, &events).await?;
    if json {
        print_json(&plan::to_json(&plan));
    } else {
        show_plan(&plan, false);
    }
    if args.detailed_exitcode && !plan.is_empty() {
        return Ok(ExitCode::from(EXIT_CHANGES));
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn up(
    args: &ApplyArgs,
    output: OutputFormat,
    cancel: &Cancel,
) -> anyhow::Result<ExitCode> {
    let stack = load(&args.file)?;
    phases::check(&stack)?;
    let json = output == OutputFormat::Json;
    let events = Events::new(Arc::new(Progress::new(json)));
    let mut session =
        phases::open(&stack, &invocation::writing(args.lock.lock_timeout, cancel)).await?;
    let request = PlanRequest {
        mode: Mode::Normal,
        adopt: args.adopt,
    };
    let plan = session.plan(request, cancel, &events).await?;
    show_plan(&plan, json);
    if !plan.is_empty() {
        prompt::confirm(args.yes, json, "Apply this plan?", "apply it", cancel).await?;
    }
    let options = ApplyOptions {
        parallelism: usize::from(args.parallelism),
    };
    let applied = session.apply(&plan, &options, cancel, &events).await?;
    if json {
        print_line(&json!({"type": "applied", "summary": plan.summary, "applied": applied}));
    } else {
        println!("{}", view::applied(&plan, &applied));
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn down(
    args: &ApplyArgs,
    output: OutputFormat,
    cancel: &Cancel,
) -> anyhow::Result<ExitCode> {
    let stack = load(&args.file)?;
    let removal = Removal {
        yes: args.yes,
        adopt: if args.adopt { Adopt::Yes } else { Adopt::No },
        parallelism: args.parallelism,
        on_stderr: false,
        lock_timeout: args.lock.lock_timeout,
    };
    destroy(&stack, &removal, output, cancel).await?;
    Ok(ExitCode::SUCCESS)
}

/// How a destroy goes: approved already or not, taking over what another
/// state made, how many changes at once.
pub(super) struct Removal {
    pub yes: bool,
    pub adopt: Adopt,
    pub parallelism: u16,
    /// Text on stderr (for `run`, whose stdout is the command's).
    pub on_stderr: bool,
    /// How long to wait for the stack's lock.
    pub lock_timeout: std::time::Duration,
}

/// Whether a destroy takes over what another state of the stack made.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Adopt {
    No,
    /// `--adopt`.
    Yes,
    /// When the state, read under the lock, records nothing (`gc` of an
    /// environment this machine has no state of).
    WhenNothingIsRecorded,
}

/// `down`'s work, for `down`, `run` and `gc`: the destroy plan shown,
/// approved and applied, the check that nothing is left, the state and
/// artifacts forgotten.
pub(super) async fn destroy(
    stack: &model::Stack,
    removal: &Removal,
    output: OutputFormat,
    cancel: &Cancel,
) -> anyhow::Result<()> {
    let json = output == OutputFormat::Json;
    let events = Events::new(Arc::new(Progress::new(json)));
    let mut session =
        phases::open(stack, &invocation::writing(removal.lock_timeout, cancel)).await?;
    let request = PlanRequest {
        mode: Mode::Destroy,
        adopt: match removal.adopt {
            Adopt::No => false,
            Adopt::Yes => true,
            Adopt::WhenNothingIsRecorded => session.state().resources.is_empty(),
        },
    };
    let plan = session.plan(request, cancel, &events).await?;
    let say = |text: String| match removal.on_stderr {
        true => eprintln!("{text}"),
        false => println!("{text}"),
    };
    match (json, removal.on_stderr) {
        (false, true) => eprint!("{}", view::plan(&plan)),
        _ => show_plan(&plan, json),
    }
    if !plan.is_empty() {
        prompt::confirm(
            removal.yes,
            json,
            "Destroy everything of this stack?",
            "destroy it",
            cancel,
        )
        .await?;
    }
    let options = ApplyOptions {
        parallelism: usize::from(removal.parallelism),
    };
    let applied = session.apply(&plan, &options, cancel, &events).await?;
    let remains = session.leftovers(cancel).await?;
    if !remains.left.is_empty() {
        return Err(CommandError::Leftovers {
            stack: stack.name.clone(),
            left: remains.left,
        }
        .into());
    }
    let state = applied.state_location.clone();
    let state = match session.forget().await? {
        true => format!("removed, with the stack's key and host keys ({state})"),
        false => state,
    };
    if json {
        print_line(&json!({
            "type": "applied",
            "summary": plan.summary,
            "applied": applied,
            "left": remains.left,
            "checked": remains.checked,
        }));
    } else {
        let shown = Applied {
            state_location: state,
            ..applied
        };
        say(view::applied(&plan, &shown));
        for sentence in remains.checked {
            say(sentence);
        }
    }
    Ok(())
}

pub async fn status(
    args: &FileArgs,
    output: OutputFormat,
    cancel: &Cancel,
) -> anyhow::Result<ExitCode> {
    let stack = load(args)?;
    let session = phases::open(&stack, &invocation::reading(cancel)).await?;
    let status = session.status(cancel).await?;
    match output {
        OutputFormat::Json => {
            print_json(&serde_json::to_value(&status).expect("status serialises"))
        }
        OutputFormat::Text => print!("{}", view::status(&status)),
    }
    Ok(ExitCode::SUCCESS)
}

/// `upgrade --check`: every database's candidate image or why there is
/// none; exit 1 when a registry could not be asked.
pub async fn upgrade(
    args: &UpgradeArgs,
    output: OutputFormat,
    cancel: &Cancel,
) -> anyhow::Result<ExitCode> {
    let stack = load(&args.file)?;
    if !args.check {
        return roll_out(args, &stack, output, cancel).await;
    }
    let config = upgrade::DockerConfig::load()?;
    let insecure = stack
        .upgrades
        .as_ref()
        .map(|u| u.insecure_registries.clone())
        .unwrap_or_default();
    let registries = upgrade::Registries::new(config, &insecure)?;
    let report = upgrade::check(&stack, |db| db.image.clone(), &registries, cancel).await;
    let failures: Vec<String> = report
        .failures()
        .map(|err| crate::error_chain::error_chain(err))
        .collect();
    match output {
        OutputFormat::Json => {
            print_json(&serde_json::to_value(&report).expect("the report serialises"));
            if !failures.is_empty() {
                return Ok(ExitCode::FAILURE);
            }
        }
        OutputFormat::Text => {
            print!("{}", view::upgrade_check(&report));
            if !failures.is_empty() {
                return Err(CommandError::UpgradeCheckFailed {
                    total: report.databases.len(),
                    failures,
                }
                .into());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `upgrade` (not `--check`): the candidates, rolled out after a prompt
/// (or with `--yes`) on a stack in step with its file; `--due` only when
/// a scheduled time is due; `--write` then writes pinned images into the file.
async fn roll_out(
    args: &UpgradeArgs,
    stack: &model::Stack,
    output: OutputFormat,
    cancel: &Cancel,
) -> anyhow::Result<ExitCode> {
    phases::check(stack)?;
    let json = output == OutputFormat::Json;
    let events = Events::new(Arc::new(Progress::new(json)));
    let mut session =
        phases::open(stack, &invocation::writing(args.lock.lock_timeout, cancel)).await?;
    let rolled = if args.due {
        if stack
            .upgrades
            .as_ref()
            .and_then(|u| u.schedule.as_ref())
            .is_none()
        {
            return Err(CommandError::NoSchedule(stack.name.clone()).into());
        }
        let Some(due) = upgrade::apply::due(stack, &session, SystemTime::now())? else {
            match json {
                true => print_line(&json!({"type": "not-due", "stack": stack.name})),
                false => println!("no scheduled upgrade of stack {} is due", stack.name),
            }
            return Ok(ExitCode::SUCCESS);
        };
        match upgrade::apply::scheduled(stack, &mut session, true, Some(due), cancel, &events)
            .await?
        {
            Scheduled::UpToDate => Vec::new(),
            Scheduled::Held { reason, .. } => return Err(CommandError::OutOfStep(reason).into()),
            Scheduled::Rolled(rolled) => rolled,
        }
    } else {
        let registries = upgrade::apply::registries(stack)?;
        let proposal = upgrade::apply::propose(stack, &session, &registries, cancel).await?;
        match json {
            true => print_line(&json!({"type": "check", "check": proposal.report})),
            false => print!("{}", view::upgrade_check(&proposal.report)),
        }
        if proposal.targets.is_empty() {
            Vec::new()
        } else {
            if let Some(reason) = upgrade::apply::out_of_step(&session, cancel, &events).await? {
                return Err(CommandError::OutOfStep(reason).into());
            }
            if !json {
                print!("{}", view::rollout_plan(&proposal.targets));
            }
            prompt::confirm(
                args.yes,
                json,
                "Roll these upgrades out?",
                "roll them out",
                cancel,
            )
            .await?;
            upgrade::apply::roll_out(stack, &mut session, &proposal.targets, cancel, &events)
                .await?
        }
    };
    match json {
        true => print_line(&json!({"type": "upgraded", "upgrades": rolled})),
        false => print!("{}", view::rolled(&rolled)),
    }
    if args.write {
        let pinned = upgrade::apply::pins_in_force(stack, &session);
        upgrade::write::write_images(&args.file.file, &pinned)?;
        if !json {
            for (database, image) in &pinned {
                println!(
                    "{}: database {database} image: {image}",
                    args.file.file.display()
                );
            }
        }
    }
    let failed: Vec<String> = rolled
        .iter()
        .filter(|r| r.result != UpgradeResult::Succeeded)
        .map(|r| {
            format!(
                "  {}: {} -> {}: {}",
                r.database,
                r.from,
                r.to,
                r.detail.as_deref().unwrap_or_default()
            )
        })
        .collect();
    if !failed.is_empty() {
        return Err(CommandError::UpgradeFailed {
            total: rolled.len(),
            failed,
        }
        .into());
    }
    Ok(ExitCode::SUCCESS)
}

/// `daemon`: every stack file checked before it starts, then the jobs and
/// the metrics server until SIGINT or SIGTERM.
pub async fn daemon(args: &DaemonArgs, cancel: &Cancel) -> anyhow::Result<ExitCode> {
    let mut names = Vec::new();
    for file in &args.files {
        let stack = model::load(file)?;
        phases::check(&stack)?;
        names.push(stack.name);
    }
    let listener = tokio::net::TcpListener::bind(args.metrics)
        .await
        .map_err(|e| CommandError::Metrics(args.metrics, e))?;
    let address = listener.local_addr().unwrap_or(args.metrics);
    let log = JsonLines;
    log.line(json!({
        "event": "started",
        "stacks": names,
        "metrics": format!("http://{address}/metrics"),
        "approved": args.yes,
    }));
    let options = daemon::Options {
        files: args.files.clone(),
        drift_every: args.drift_every,
        now: args.now,
        approved: args.yes,
    };
    let metrics = Arc::new(daemon::metrics::Metrics::default());
    tokio::join!(
        metrics.serve(listener, cancel),
        daemon::run(&options, metrics.clone(), &log, cancel)
    );
    log.line(json!({"event": "stopped", "reason": cancel.reason()}));
    Ok(ExitCode::SUCCESS)
}

/// The daemon's log: one JSON object per line on stdout, with its time.
struct JsonLines;

impl JsonLines {
    fn line(&self, mut value: serde_json::Value) {
        let time = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        if let Some(object) = value.as_object_mut() {
            object.insert("time".into(), json!(time));
        }
        print_line(&value);
    }
}

impl daemon::DaemonLog for JsonLines {
    fn log(&self, event: daemon::DaemonEvent) {
        self.line(serde_json::to_value(&event).expect("an event serialises"));
    }
}

/// Prints the stack's kubeconfig path, or merges it into the user's.
pub fn kubeconfig(args: &KubeconfigArgs, output: OutputFormat) -> anyhow::Result<ExitCode> {
    let stack = load(&args.file)?;
    let (path, _) =
        phases::kubeconfig(&stack)?.ok_or_else(|| CommandError::NoCluster(stack.name.clone()))?;
    if !path.exists() {
        return Err(CommandError::NoKubeconfig {
            stack: stack.name.clone(),
            path,
        }
        .into());
    }
    let json = output == OutputFormat::Json;
    if !args.merge {
        match json {
            true => print_json(&json!({"kubeconfig": path})),
            false => println!("{}", path.display()),
        }
        return Ok(ExitCode::SUCCESS);
    }
    let target = crate::kubeconfig::merge_into_users(&path)?;
    match json {
        true => print_json(&json!({
            "kubeconfig": path,
            "merged": {"file": target.file, "context": target.context},
        })),
        false => println!(
            "merged context `{}` into {} and made it current",
            target.context,
            target.file.display()
        ),
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes the completion script of `stack` for `shell` on stdout; hidden
/// subcommands (the switch `up` starts) are not offered.
pub fn completions(shell: clap_complete::Shell) -> ExitCode {
    use clap::CommandFactory as _;
    let full = Cli::command();
    let mut shown = clap::Command::new("stack")
        .version(env!("CARGO_PKG_VERSION"))
        .propagate_version(true)
        .args(full.get_arguments().cloned())
        .subcommands(full.get_subcommands().filter(|c| !c.is_hide_set()).cloned());
    clap_complete::generate(shell, &mut shown, "stack", &mut std::io::stdout());
    ExitCode::SUCCESS
}

/// Opens a shell (or runs a command) on a node with OpenSSH, trusting only
/// the node's pinned host key.
pub async fn ssh(args: &SshArgs, cancel: &Cancel) -> anyhow::Result<ExitCode> {
    let (file, node) = args.file_and_node();
    let stack = model::load(Path::new(&file))?;
    let stack = match &args.run {
        Some(id) => run_environment(&stack, id, None),
        None => stack,
    };
    let session = phases::open(&stack, &invocation::reading(cancel)).await?;
    let status = session.status(cancel).await?;
    let access = status
        .nodes
        .iter()
        .filter_map(|n| n.ssh.as_ref())
        .find(|a| a.names.iter().any(|name| name == node))
        .ok_or_else(|| CommandError::NoSuchNode {
            node: node.to_string(),
            stack: stack.name.clone(),
            known: status
                .nodes
                .iter()
                .filter_map(|n| n.ssh.as_ref()?.names.get(1).cloned())
                .collect(),
        })?;
    let host = if access.port == 22 {
        access.host.clone()
    } else {
        format!("[{}]:{}", access.host, access.port)
    };
    let artifacts = session.artifacts();
    artifacts.write(
        &Artifact::KnownHosts,
        format!("{host} {}\n", access.host_key).as_bytes(),
    )?;
    let status = std::process::Command::new("ssh")
        .arg("-i")
        .arg(artifacts.path(&Artifact::SshKey))
        .args(["-p", &access.port.to_string()])
        .arg("-o")
        .arg(format!(
            "UserKnownHostsFile={}",
            artifacts.path(&Artifact::KnownHosts).display()
        ))
        .args([
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "LogLevel=ERROR",
        ])
        .arg(format!("{}@{}", access.user, access.host))
        .args(&args.command)
        .status()
        .context("cannot run ssh (install OpenSSH's client)")?;
    Ok(ExitCode::from(status.code().unwrap_or(255) as u8))
}
