//! One thin function per subcommand over the library.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use serde_json::json;

use crate::apply::{self, Outcome};
use crate::cli::{ApplyArgs, Cli, Command, FileArgs, OutputFormat, PlanArgs, SshArgs};
use crate::keys;
use crate::model::{self, LoadError, Provider as ProviderSettings, Stack};
use crate::output::Reporter;
use crate::plan::{self, Plan};
use crate::provider::ec2::Ec2Provider;
use crate::provider::kvm::KvmProvider;
use crate::provider::{NodeStatus, Provider};
use crate::state::{self, LocalStateStore, State, StateStore};

/// Exit code of `plan --detailed-exitcode` when there is something to do.
const EXIT_CHANGES: u8 = 2;

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("{} uses what this version of stack does not build yet:\n{}\nremove {} to plan and apply the rest", file.display(), sections.join("\n"), if sections.len() == 1 { "it" } else { "them" })]
    NotBuilt {
        file: PathBuf,
        sections: Vec<String>,
    },
    #[error("`stack ssh` is for kvm stacks; for ec2 nodes use ssh -i {key} with the address `stack status` shows")]
    SshNotKvm { key: String },
    #[error("no node `{node}` with a recorded SSH port in stack {stack} (run `stack up`; `stack status` lists the nodes)")]
    NoSuchNode { node: String, stack: String },
    #[error("not applied: the answer was not `yes`")]
    Declined,
    #[error("down finished but these of stack {stack} are still there:\n{}", left.join("\n"))]
    Leftovers { stack: String, left: Vec<String> },
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let output = cli.output;
    match cli.command {
        Command::Validate(args) => validate(&args, output),
        Command::Plan(args) => plan(&args, output).await,
        Command::Up(args) => up(&args, output).await,
        Command::Down(args) => down(&args, output).await,
        Command::Status(args) => status(&args, output).await,
        Command::Ssh(args) => ssh(&args).await,
        Command::Switch { socket } => {
            crate::provider::kvm::switch::serve(&socket)
                .await
                .with_context(|| format!("the switch on {} stopped", socket.display()))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_json(value: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("JSON serialises")
    );
}

pub fn validate(args: &FileArgs, output: OutputFormat) -> anyhow::Result<ExitCode> {
    match model::load(&args.file) {
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

/// The provider of a stack, whichever backend it is.
enum Backend {
    Ec2(Arc<Ec2Provider>),
    Kvm(Arc<KvmProvider>),
}

/// Runs `$body` with `$provider` bound to the backend's provider.
macro_rules! with_provider {
    ($backend:expr, $provider:ident => $body:expr) => {
        match $backend {
            Backend::Ec2($provider) => $body,
            Backend::Kvm($provider) => $body,
        }
    };
}

impl Backend {
    /// Builds the provider; for EC2 this finds credentials and region.
    async fn connect(stack: &Stack, key: &keys::StackKey) -> anyhow::Result<Backend> {
        Ok(match &stack.provider {
            ProviderSettings::Ec2(settings) => Backend::Ec2(Arc::new(
                Ec2Provider::connect(stack, settings, &key.public_openssh)
                    .await
                    .with_context(|| format!("cannot reach EC2 for stack {}", stack.name))?,
            )),
            ProviderSettings::Kvm(settings) => Backend::Kvm(Arc::new(KvmProvider::new(
                stack,
                settings,
                &key.private_path,
                &key.public_openssh,
            ))),
        })
    }

    async fn refresh(&self, state: &State) -> anyhow::Result<Vec<plan::Observed>> {
        with_provider!(self, p => Ok(p.refresh(state).await?))
    }

    fn desired(&self) -> Vec<plan::Resource> {
        with_provider!(self, p => p.desired())
    }

    async fn leftovers(&self) -> anyhow::Result<Vec<String>> {
        with_provider!(self, p => Ok(p.leftovers().await?))
    }

    async fn nodes(&self) -> anyhow::Result<Vec<NodeStatus>> {
        with_provider!(self, p => Ok(p.nodes().await?))
    }
}

/// Everything a command that touches the world holds: the stack, the
/// locked state store, the state and the provider.
struct Session {
    stack: Stack,
    store: LocalStateStore,
    state: State,
    backend: Backend,
}

/// Stops when the stack uses a section whose behaviour is not built yet.
fn check_built(stack: &Stack) -> anyhow::Result<()> {
    if stack.unbuilt.is_empty() {
        return Ok(());
    }
    Err(CommandError::NotBuilt {
        file: stack.file.clone(),
        sections: stack
            .unbuilt
            .iter()
            .map(|u| format!("  {}: `{}` ({})", u.location, u.path, u.what))
            .collect(),
    }
    .into())
}

async fn open(file: &Path, require_built: bool) -> anyhow::Result<Session> {
    let stack = model::load(file)?;
    if require_built {
        check_built(&stack)?;
    }
    let dir = stack.state_dir();
    let store = LocalStateStore::open(&dir, &stack.name, stack.provider_name())?;
    let state = store.load()?;
    let key = keys::ensure(&dir, &stack.name)?;
    let backend = Backend::connect(&stack, &key).await?;
    Ok(Session {
        stack,
        store,
        state,
        backend,
    })
}

async fn make_plan(session: &Session, destroy: bool) -> anyhow::Result<Plan> {
    let observed = session
        .backend
        .refresh(&session.state)
        .await
        .with_context(|| format!("cannot refresh stack {}", session.stack.name))?;
    let name = &session.stack.name;
    let provider = session.stack.provider_name();
    Ok(if destroy {
        plan::destroy(name, provider, &session.state, &observed)
    } else {
        plan::plan(
            name,
            provider,
            &session.backend.desired(),
            &session.state,
            &observed,
        )
    })
}

fn show_plan(plan: &Plan, output: OutputFormat) {
    if output == OutputFormat::Text {
        print!("{}", plan::render(plan));
        let _ = std::io::stdout().flush();
    }
}

pub async fn plan(args: &PlanArgs, output: OutputFormat) -> anyhow::Result<ExitCode> {
    let session = open(&args.file.file, !args.destroy).await?;
    let plan = make_plan(&session, args.destroy).await?;
    match output {
        OutputFormat::Json => print_json(&plan::to_json(&plan)),
        OutputFormat::Text => show_plan(&plan, output),
    }
    if args.detailed_exitcode && !plan.is_empty() {
        return Ok(ExitCode::from(EXIT_CHANGES));
    }
    Ok(ExitCode::SUCCESS)
}

/// Asks on a terminal; elsewhere (CI, scripts) applies as asked.
fn confirm(yes: bool, question: &str) -> anyhow::Result<()> {
    if yes || !std::io::stdin().is_terminal() {
        return Ok(());
    }
    print!("{question} Only `yes` is accepted: ");
    std::io::stdout().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    if answer.trim() == "yes" {
        Ok(())
    } else {
        Err(CommandError::Declined.into())
    }
}

fn report(plan: &Plan, outcomes: &[Outcome], session: &Session, output: OutputFormat) {
    match output {
        OutputFormat::Json => print_json(&json!({
            "plan": plan::to_json(plan),
            "applied": outcomes,
            "stateFile": session.store.location(),
        })),
        OutputFormat::Text => {
            let s = plan.summary;
            println!(
                "Applied: {} created, {} updated, {} replaced, {} deleted. State: {}",
                s.create,
                s.update,
                s.replace,
                s.delete,
                session.store.location()
            );
        }
    }
}

async fn apply_plan(
    session: &mut Session,
    plan: &Plan,
    args: &ApplyArgs,
) -> anyhow::Result<Vec<Outcome>> {
    let reporter = Reporter::new();
    let parallelism = usize::from(args.parallelism);
    let (store, state) = (&mut session.store, &mut session.state);
    with_provider!(&session.backend, p => Ok(apply::apply(p.clone(), plan, store, state, parallelism, &reporter).await?))
}

pub async fn up(args: &ApplyArgs, output: OutputFormat) -> anyhow::Result<ExitCode> {
    let mut session = open(&args.file.file, true).await?;
    let plan = make_plan(&session, false).await?;
    show_plan(&plan, output);
    if plan.is_empty() {
        apply::bookkeeping(&plan, &mut session.store, &mut session.state)?;
        report(&plan, &[], &session, output);
        return Ok(ExitCode::SUCCESS);
    }
    confirm(args.yes, "Apply this plan?")?;
    let outcomes = apply_plan(&mut session, &plan, args).await?;
    report(&plan, &outcomes, &session, output);
    Ok(ExitCode::SUCCESS)
}

pub async fn down(args: &ApplyArgs, output: OutputFormat) -> anyhow::Result<ExitCode> {
    let mut session = open(&args.file.file, false).await?;
    let plan = make_plan(&session, true).await?;
    show_plan(&plan, output);
    if !plan.is_empty() {
        confirm(args.yes, "Destroy everything of this stack?")?;
    }
    let outcomes = apply_plan(&mut session, &plan, args).await?;
    let left = session
        .backend
        .leftovers()
        .await
        .context("cannot check what is left")?;
    if !left.is_empty() {
        return Err(CommandError::Leftovers {
            stack: session.stack.name.clone(),
            left,
        }
        .into());
    }
    keys::remove(&session.stack.state_dir(), &session.stack.name)?;
    report(&plan, &outcomes, &session, output);
    if output == OutputFormat::Text {
        match session.backend {
            Backend::Ec2(_) => println!("Nothing tagged stack={} is left.", session.stack.name),
            Backend::Kvm(_) => println!(
                "Nothing of stack {} is left: no VM, switch, socket, disk or seed.",
                session.stack.name
            ),
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn status(args: &FileArgs, output: OutputFormat) -> anyhow::Result<ExitCode> {
    let stack = model::load(&args.file)?;
    let dir = stack.state_dir();
    let state_path = state::state_path(&dir, &stack.name);
    let recorded = state::read(&state_path, &stack.name)?;
    let key_path = keys::private_key_path(&dir, &stack.name);
    let public_key =
        std::fs::read_to_string(format!("{}.pub", key_path.display())).unwrap_or_default();
    let key = keys::StackKey {
        private_path: key_path.clone(),
        public_openssh: public_key.trim().to_string(),
    };
    let backend = Backend::connect(&stack, &key).await?;
    let nodes = backend.nodes().await.context("cannot read the nodes")?;
    let ssh_user = match &stack.provider {
        ProviderSettings::Ec2(settings) => settings.ssh_user.clone(),
        ProviderSettings::Kvm(settings) => settings.ssh_user.clone(),
    };
    let key_exists = key_path.exists();
    match output {
        OutputFormat::Json => print_json(&json!({
            "stack": stack.name,
            "provider": stack.provider_name(),
            "stateFile": state_path,
            "stateSerial": recorded.as_ref().map(|s| s.serial),
            "recordedResources": recorded.as_ref().map_or(0, |s| s.resources.len()),
            "sshKey": key_exists.then_some(&key_path),
            "sshUser": ssh_user,
            "nodes": nodes,
        })),
        OutputFormat::Text => {
            println!("stack {} ({})", stack.name, stack.provider_name());
            match &recorded {
                Some(s) => println!(
                    "state:   {} (serial {}, {} resources)",
                    state_path.display(),
                    s.serial,
                    s.resources.len()
                ),
                None => println!(
                    "state:   {} (none yet: run `stack up`)",
                    state_path.display()
                ),
            }
            if key_exists {
                println!("ssh key: {} (user {})", key_path.display(), ssh_user);
            } else {
                println!("ssh key: none yet");
            }
            if nodes.is_empty() {
                println!("no nodes");
            } else {
                println!();
                println!(
                    "{:<28} {:<21} {:<9} {:<16} {:<16}",
                    "NODE", "ID", "STATE", "PUBLIC", "PRIVATE"
                );
                for node in &nodes {
                    println!(
                        "{:<28} {:<21} {:<9} {:<16} {:<16}",
                        node.address,
                        node.id,
                        node.state,
                        node.public_address.as_deref().unwrap_or("-"),
                        node.private_address.as_deref().unwrap_or("-")
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Opens a shell (or runs a command) on a KVM node with OpenSSH, trusting
/// only the node's pinned host key.
pub async fn ssh(args: &SshArgs) -> anyhow::Result<ExitCode> {
    let stack = model::load(&args.file)?;
    let dir = stack.state_dir();
    let key_path = keys::private_key_path(&dir, &stack.name);
    let ProviderSettings::Kvm(settings) = &stack.provider else {
        return Err(CommandError::SshNotKvm {
            key: key_path.display().to_string(),
        }
        .into());
    };
    let provider = KvmProvider::new(&stack, settings, &key_path, "");
    let (port, user, host_key, vm_dir) =
        provider
            .ssh_target(&args.node)
            .ok_or_else(|| CommandError::NoSuchNode {
                node: args.node.clone(),
                stack: stack.name.clone(),
            })?;
    let known_hosts = vm_dir.join("known_hosts");
    std::fs::write(&known_hosts, format!("[127.0.0.1]:{port} {host_key}\n"))
        .with_context(|| format!("cannot write {}", known_hosts.display()))?;
    let status = std::process::Command::new("ssh")
        .args([
            "-i",
            &key_path.display().to_string(),
            "-p",
            &port.to_string(),
        ])
        .args([
            "-o",
            &format!("UserKnownHostsFile={}", known_hosts.display()),
        ])
        .args([
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "LogLevel=ERROR",
        ])
        .arg(format!("{user}@127.0.0.1"))
        .args(&args.command)
        .status()
        .context("cannot run ssh (install OpenSSH's client)")?;
    Ok(ExitCode::from(status.code().unwrap_or(255) as u8))
}
