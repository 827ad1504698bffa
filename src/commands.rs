//! One thin function per subcommand over the library.

use std::collections::BTreeSet;
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use serde_json::json;

use crate::apply::{self, Outcome};
use crate::bootstrap::steps::{self, is_bootstrap};
use crate::bootstrap::{kubeconfig, Bootstrap};
use crate::cli::{
    ApplyArgs, Cli, Command, FileArgs, KubeconfigArgs, OutputFormat, PlanArgs, SshArgs,
};
use crate::keys;
use crate::kube::{is_kube, Kube, Target};
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
    #[error("stack {stack} has no kubeconfig yet ({}): run `stack up`", path.display())]
    NoKubeconfig { stack: String, path: PathBuf },
    #[error("{}: the existing cluster's kubeconfig {} {problem}", file.display(), kubeconfig.display())]
    ExistingCluster {
        file: PathBuf,
        kubeconfig: PathBuf,
        problem: String,
    },
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let output = cli.output;
    match cli.command {
        Command::Validate(args) => validate(&args, output),
        Command::Plan(args) => plan(&args, output).await,
        Command::Up(args) => up(&args, output).await,
        Command::Down(args) => down(&args, output).await,
        Command::Status(args) => status(&args, output).await,
        Command::Kubeconfig(args) => merge_kubeconfig(&args),
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
            ProviderSettings::Kvm(settings) => Backend::Kvm(Arc::new(
                KvmProvider::new(stack, settings, &key.private_path, &key.public_openssh)
                    .with_context(|| format!("cannot plan the VMs of stack {}", stack.name))?,
            )),
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
    /// `None` for an existing cluster: no infrastructure and no bootstrap.
    backend: Option<Backend>,
    key_path: PathBuf,
}

/// Where the kubeconfig of a stack's cluster is written: next to the state.
pub fn kubeconfig_path(stack: &Stack) -> PathBuf {
    stack.state_dir().join(format!("{}.kubeconfig", stack.name))
}

/// The kubeconfig and context of an existing cluster, checked to be usable.
fn existing_cluster(stack: &Stack) -> anyhow::Result<Option<(PathBuf, String)>> {
    let Some(path) = stack.kubernetes.as_ref().and_then(|k| k.kubeconfig.clone()) else {
        return Ok(None);
    };
    let path = match (path.strip_prefix("~"), std::env::var_os("HOME")) {
        (Ok(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ if path.is_relative() => stack.file.parent().unwrap_or(Path::new("")).join(&path),
        _ => path,
    };
    let problem = |problem: String| CommandError::ExistingCluster {
        file: stack.file.clone(),
        kubeconfig: path.clone(),
        problem,
    };
    let text =
        std::fs::read_to_string(&path).map_err(|e| problem(format!("cannot be read: {e}")))?;
    let config = kubeconfig::parse(&text, &path.display().to_string())?;
    let context = match stack.kubernetes.as_ref().and_then(|k| k.context.clone()) {
        Some(context) => context,
        None => config["current-context"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| {
                problem("has no current-context: name one with kubernetes.context".to_string())
            })?,
    };
    let known: Vec<&str> = config["contexts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str())
        .collect();
    if !known.contains(&context.as_str()) {
        return Err(problem(format!(
            "has no context `{context}` (it has: {})",
            known.join(", ")
        ))
        .into());
    }
    Ok(Some((path, context)))
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
    let backend = match existing_cluster(&stack)? {
        Some(_) => None,
        None => Some(Backend::connect(&stack, &key).await?),
    };
    Ok(Session {
        stack,
        store,
        state,
        backend,
        key_path: key.private_path,
    })
}

/// The bootstrap of a stack's cluster on its provider's nodes.
fn bootstrap_of<P: Provider>(provider: &Arc<P>, stack: &Stack, key_path: &Path) -> Bootstrap<P> {
    Bootstrap::new(provider.clone(), stack, key_path, &kubeconfig_path(stack))
}

/// A plan, and the Kubernetes phase that applies its part (built once, so
/// `up` applies the very objects, and certificates, the plan showed).
struct Planned {
    plan: Plan,
    kube: Option<Arc<Kube>>,
}

/// Where the stack's cluster is: the existing one, or the one it makes.
fn cluster_target(stack: &Stack) -> anyhow::Result<Target> {
    Ok(match existing_cluster(stack)? {
        Some((kubeconfig, context)) => Target {
            kubeconfig,
            context,
        },
        None => Target {
            kubeconfig: kubeconfig_path(stack),
            context: stack.name.clone(),
        },
    })
}

async fn make_plan(session: &Session, destroy: bool) -> anyhow::Result<Planned> {
    let mut plan = infra_and_bootstrap_plan(session, destroy).await?;
    let stack = &session.stack;
    if stack.kubernetes.is_none() {
        return Ok(Planned { plan, kube: None });
    }
    // A cluster stack made is read only when it stands as it is: nodes or
    // bootstrap steps about to change (a node made, a VM stopped, a node not
    // Ready) mean its API may not answer now, so plan against the state.
    let rebuilding = plan.changes.iter().any(|c| !is_kube(&c.kind));
    let made = session.backend.is_some();
    let reachable = !made || (kubeconfig_path(stack).exists() && !rebuilding);
    let target = cluster_target(stack)?;
    let cannot_build = || {
        format!(
            "cannot build the Kubernetes objects of stack {}",
            stack.name
        )
    };
    let recorded_ca = Kube::recorded_ca(&session.state).with_context(cannot_build)?;
    let uses_stack_ca = stack
        .ingress
        .as_ref()
        .is_some_and(|i| matches!(i.tls, crate::model::TlsSource::StackCa));
    let (known_ca, cluster) = match recorded_ca {
        // Without the state that made it, the CA comes from the cluster.
        None if uses_stack_ca && reachable && !destroy => {
            let (found, cluster) =
                Kube::ca_in_cluster(stack, &target).await.with_context(|| {
                    format!(
                        "cannot read the CA of stack {} from its cluster",
                        stack.name
                    )
                })?;
            (found, Some(cluster))
        }
        recorded => (recorded, None),
    };
    let kube = Kube::new(stack, known_ca, target, cluster).with_context(cannot_build)?;
    let recorded = session.state.only(is_kube);
    if kube.objects().is_empty() && recorded.resources.is_empty() {
        return Ok(Planned { plan, kube: None });
    }
    let provider = stack.provider_name();
    let kube_plan = if destroy && made {
        // Removing the nodes removes the cluster and everything in it: the
        // records are only forgotten.
        plan::destroy(&stack.name, provider, &recorded, &[])
    } else {
        let refreshed = if reachable {
            Some(kube.refresh(&recorded).await.with_context(|| {
                format!("cannot read the Kubernetes objects of stack {}", stack.name)
            })?)
        } else {
            None
        };
        if let Some(refreshed) = &refreshed {
            tracing::info!(requests = refreshed.requests, "read the cluster");
        }
        // Not read: what was last applied stands for what is there.
        let assumed: Vec<plan::Observed> = recorded
            .resources
            .iter()
            .filter_map(|r| {
                Some(plan::Observed {
                    address: r.address.clone(),
                    kind: r.kind.clone(),
                    id: r.id.clone()?,
                    attrs: r.attrs.clone(),
                })
            })
            .collect();
        let observed = refreshed.as_ref().map_or(&assumed[..], |r| &r.observed[..]);
        let mut kube_plan = if destroy {
            plan::destroy(&stack.name, provider, &recorded, observed)
        } else {
            let monitoring = refreshed.as_ref().is_none_or(|r| r.monitoring);
            plan::plan(
                &stack.name,
                provider,
                &kube.desired(monitoring),
                &recorded,
                observed,
            )
        };
        kube.annotate(&mut kube_plan, refreshed.as_ref());
        if !reachable {
            kube_plan.notes.push(format!(
                "the cluster of stack {} is not read while its nodes or bootstrap change: its objects are planned against the state and applied once the bootstrap is done",
                stack.name
            ));
        }
        kube_plan
    };
    plan = plan.combine(kube_plan);
    Ok(Planned {
        plan,
        kube: Some(Arc::new(kube)),
    })
}

async fn infra_and_bootstrap_plan(session: &Session, destroy: bool) -> anyhow::Result<Plan> {
    let name = &session.stack.name;
    let provider = session.stack.provider_name();
    let Some(backend) = &session.backend else {
        let recorded = session.state.only(|k| !is_kube(k));
        return Ok(if destroy {
            plan::destroy(name, provider, &recorded, &[])
        } else {
            plan::plan(name, provider, &[], &recorded, &[])
        });
    };
    let infra_state = session
        .state
        .only(|kind| !is_bootstrap(kind) && !is_kube(kind));
    let observed = backend
        .refresh(&infra_state)
        .await
        .with_context(|| format!("cannot refresh stack {}", session.stack.name))?;
    if destroy {
        // Removing the nodes removes the cluster: its steps are only forgotten.
        return Ok(plan::destroy(
            name,
            provider,
            &session.state.only(|k| !is_kube(k)),
            &observed,
        ));
    }
    let infra = plan::plan(name, provider, &backend.desired(), &infra_state, &observed);
    let bootstrap = with_provider!(backend, p => {
        let bootstrap = bootstrap_of(p, &session.stack, &session.key_path);
        // Nodes this plan makes or replaces run all their steps again.
        let fresh: BTreeSet<String> = steps::nodes(&session.stack)
            .into_iter()
            .filter(|node| {
                let address = p.node_address(&node.key);
                infra.changes.iter().any(|c| {
                    c.address == address && matches!(c.action, plan::Action::Create | plan::Action::Replace)
                })
            })
            .map(|node| node.key)
            .collect();
        let observed = bootstrap
            .refresh(&session.state, &fresh)
            .await
            .with_context(|| format!("cannot read the cluster of stack {name}"))?;
        let recorded = session.state.only(is_bootstrap);
        let mut plan = plan::plan(name, provider, &bootstrap.desired(), &recorded, &observed);
        bootstrap.annotate(&mut plan, &fresh);
        plan
    });
    Ok(infra.combine(bootstrap))
}

fn show_plan(plan: &Plan, output: OutputFormat) {
    if output == OutputFormat::Text {
        print!("{}", plan::render(plan));
        let _ = std::io::stdout().flush();
    }
}

pub async fn plan(args: &PlanArgs, output: OutputFormat) -> anyhow::Result<ExitCode> {
    let session = open(&args.file.file, !args.destroy).await?;
    let Planned { plan, .. } = make_plan(&session, args.destroy).await?;
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

/// Applies the plan phase by phase: the infrastructure (in parallel where
/// independent), then the bootstrap's steps one at a time in order.
/// Applies the plan phase by phase: the infrastructure (in parallel where
/// independent), the bootstrap's steps one at a time in order, then the
/// Kubernetes objects stage by stage. Destroying goes the other way round.
async fn apply_plan(
    session: &mut Session,
    planned: &Planned,
    args: &ApplyArgs,
) -> anyhow::Result<Vec<Outcome>> {
    let reporter = Reporter::new();
    let plan = &planned.plan;
    apply::bookkeeping(plan, &mut session.store, &mut session.state)?;
    let phase = |keep: fn(&str) -> bool| -> Vec<plan::Change> {
        plan.changes
            .iter()
            .filter(|c| keep(&c.kind))
            .cloned()
            .collect()
    };
    let infra = phase(|k| !is_bootstrap(k) && !is_kube(k));
    let bootstrap = phase(is_bootstrap);
    let objects = phase(is_kube);
    let parallelism = usize::from(args.parallelism);
    let destroy = plan.mode == plan::Mode::Destroy;
    let (store, state) = (&mut session.store, &mut session.state);
    let mut outcomes = Vec::new();
    if destroy {
        if let Some(kube) = planned.kube.as_ref().filter(|_| !objects.is_empty()) {
            outcomes.extend(
                kube.apply(&objects, true, store, state, parallelism, &reporter)
                    .await?,
            );
        }
    }
    if let Some(backend) = &session.backend {
        outcomes.extend(with_provider!(backend, p => apply::apply(p.clone(), &infra, store, state, parallelism, &reporter).await?));
        if !bootstrap.is_empty() {
            let steps = with_provider!(backend, p => {
                let applier = Arc::new(bootstrap_of(p, &session.stack, &session.key_path));
                apply::apply(applier, &bootstrap, store, state, 1, &reporter).await?
            });
            outcomes.extend(steps);
        }
    }
    if !destroy {
        if let Some(kube) = planned.kube.as_ref().filter(|_| !objects.is_empty()) {
            outcomes.extend(
                kube.apply(&objects, false, store, state, parallelism, &reporter)
                    .await?,
            );
        }
    }
    Ok(outcomes)
}

pub async fn up(args: &ApplyArgs, output: OutputFormat) -> anyhow::Result<ExitCode> {
    let mut session = open(&args.file.file, true).await?;
    let planned = make_plan(&session, false).await?;
    show_plan(&planned.plan, output);
    if planned.plan.is_empty() {
        apply::bookkeeping(&planned.plan, &mut session.store, &mut session.state)?;
        report(&planned.plan, &[], &session, output);
        return Ok(ExitCode::SUCCESS);
    }
    confirm(args.yes, "Apply this plan?")?;
    let outcomes = apply_plan(&mut session, &planned, args).await?;
    report(&planned.plan, &outcomes, &session, output);
    Ok(ExitCode::SUCCESS)
}

pub async fn down(args: &ApplyArgs, output: OutputFormat) -> anyhow::Result<ExitCode> {
    let mut session = open(&args.file.file, false).await?;
    let planned = make_plan(&session, true).await?;
    let plan = &planned.plan;
    show_plan(plan, output);
    if !plan.is_empty() {
        confirm(args.yes, "Destroy everything of this stack?")?;
    }
    let outcomes = apply_plan(&mut session, &planned, args).await?;
    let left = match (&session.backend, &planned.kube) {
        (Some(backend), _) => backend
            .leftovers()
            .await
            .context("cannot check what is left")?,
        (None, Some(kube)) => kube
            .refresh(&State::new(
                &session.stack.name,
                session.stack.provider_name(),
            ))
            .await
            .context("cannot check what is left in the cluster")?
            .observed
            .into_iter()
            .map(|o| o.address)
            .collect(),
        (None, None) => Vec::new(),
    };
    if !left.is_empty() {
        return Err(CommandError::Leftovers {
            stack: session.stack.name.clone(),
            left,
        }
        .into());
    }
    keys::remove(&session.stack.state_dir(), &session.stack.name)?;
    remove_local_files(&session.stack)?;
    report(plan, &outcomes, &session, output);
    if output == OutputFormat::Text {
        match session.backend {
            Some(Backend::Ec2(_)) => {
                println!("Nothing tagged stack={} is left.", session.stack.name)
            }
            Some(Backend::Kvm(_)) => println!(
                "Nothing of stack {} is left: no VM, switch, socket, disk or seed.",
                session.stack.name
            ),
            None => println!(
                "Nothing with the labels of stack {} is left in the existing cluster; the cluster itself is left as it is.",
                session.stack.name
            ),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What `down` removes next to the state besides the key: the cluster's
/// kubeconfig and the nodes' host keys.
fn remove_local_files(stack: &Stack) -> anyhow::Result<()> {
    for file in [kubeconfig_path(stack), crate::kube::ca_export_path(stack)] {
        match std::fs::remove_file(&file) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                return Err(err).with_context(|| format!("cannot remove {}", file.display()))
            }
            _ => {}
        }
    }
    let hosts = crate::provider::ec2::host_keys_dir(stack);
    match std::fs::remove_dir_all(&hosts) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            Err(err).with_context(|| format!("cannot remove {}", hosts.display()))
        }
        _ => {
            let _ = std::fs::remove_dir(stack.state_dir().join(&stack.name));
            Ok(())
        }
    }
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
    let existing = existing_cluster(&stack)?;
    let nodes = match &existing {
        Some(_) => Vec::new(),
        None => Backend::connect(&stack, &key)
            .await?
            .nodes()
            .await
            .context("cannot read the nodes")?,
    };
    let (kubeconfig, context) = match existing {
        Some((path, context)) => (Some(path), Some(context)),
        None => {
            let path = kubeconfig_path(&stack);
            let exists = path.exists();
            (exists.then_some(path), exists.then(|| stack.name.clone()))
        }
    };
    let ssh_user = match &stack.provider {
        ProviderSettings::Ec2(settings) => settings.ssh_user.clone(),
        ProviderSettings::Kvm(settings) => settings.ssh_user.clone(),
    };
    let key_exists = key_path.exists();
    let empty = State::new(&stack.name, stack.provider_name());
    let kube = match &stack.kubernetes {
        Some(_) => Some(Kube::new(
            &stack,
            Kube::recorded_ca(recorded.as_ref().unwrap_or(&empty))?,
            cluster_target(&stack)?,
            None,
        )?),
        None => None,
    };
    let endpoints = match &kube {
        Some(kube) => kube.endpoints().await,
        None => Vec::new(),
    };
    let ca = crate::kube::ca_export_path(&stack);
    let ca = ca.exists().then_some(ca);
    let grafana = stack.monitoring.as_ref().map(|_| {
        format!(
            "http://localhost:3000 after `kubectl --kubeconfig {} port-forward -n observability svc/kube-prom-stack-grafana 3000:80`",
            kubeconfig.as_ref().map_or_else(|| kubeconfig_path(&stack), |p| p.clone()).display()
        )
    });
    match output {
        OutputFormat::Json => print_json(&json!({
            "stack": stack.name,
            "provider": stack.provider_name(),
            "stateFile": state_path,
            "stateSerial": recorded.as_ref().map(|s| s.serial),
            "recordedResources": recorded.as_ref().map_or(0, |s| s.resources.len()),
            "sshKey": key_exists.then_some(&key_path),
            "sshUser": ssh_user,
            "kubeconfig": kubeconfig,
            "context": context,
            "nodes": nodes,
            "endpoints": endpoints,
            "caCertificate": ca,
            "grafana": grafana,
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
            match (&kubeconfig, &context) {
                (Some(path), Some(context)) => println!(
                    "kubeconfig: {} (context {context}; `stack kubeconfig --merge` adds it to yours)",
                    path.display()
                ),
                _ if stack.kubernetes.is_some() => println!("kubeconfig: none yet (run `stack up`)"),
                _ => {}
            }
            if let Some(ca) = &ca {
                println!(
                    "CA certificate: {} (trust it to reach the endpoints)",
                    ca.display()
                );
            }
            if !endpoints.is_empty() {
                println!("endpoints:");
                for endpoint in &endpoints {
                    println!("  {}: {}", endpoint.name, endpoint.url);
                }
            }
            if let Some(grafana) = &grafana {
                println!("grafana: {grafana}");
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

/// Prints the stack's kubeconfig path, or merges it into the user's.
pub fn merge_kubeconfig(args: &KubeconfigArgs) -> anyhow::Result<ExitCode> {
    let stack = model::load(&args.file.file)?;
    let path = match existing_cluster(&stack)? {
        Some((path, _)) => path,
        None => kubeconfig_path(&stack),
    };
    if !path.exists() {
        return Err(CommandError::NoKubeconfig {
            stack: stack.name.clone(),
            path,
        }
        .into());
    }
    if !args.merge {
        println!("{}", path.display());
        return Ok(ExitCode::SUCCESS);
    }
    let target = std::env::var_os("KUBECONFIG")
        .and_then(|v| std::env::split_paths(&v).next())
        .filter(|p| !p.as_os_str().is_empty())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".kube/config")))
        .context("neither KUBECONFIG nor HOME is set: no kubeconfig to merge into")?;
    let ours = kubeconfig::parse(
        &std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?,
        &path.display().to_string(),
    )?;
    let theirs = match std::fs::read_to_string(&target) {
        Ok(text) => kubeconfig::parse(&text, &target.display().to_string())?,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => serde_json::Value::Null,
        Err(err) => return Err(err).with_context(|| format!("cannot read {}", target.display())),
    };
    let merged = kubeconfig::merge(&theirs, &ours);
    if let Some(dir) = target.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let tmp = target.with_extension("stack-tmp");
    crate::files::write_private(&tmp, kubeconfig::render(&merged).as_bytes())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &target).with_context(|| format!("cannot write {}", target.display()))?;
    println!(
        "merged context `{}` into {} and made it current",
        ours["current-context"].as_str().unwrap_or(&stack.name),
        target.display()
    );
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
    let provider = KvmProvider::new(&stack, settings, &key_path, "")?;
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
