//! The command line: every flag and subcommand of `stack`, in one place;
//! the help text is their doc comments.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Declarative environments: VMs, microk8s, database clusters, ingress and
/// monitoring from one YAML stack file.
#[derive(Debug, Parser)]
#[command(name = "stack", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    /// How results are printed on stdout; with `json` every outcome, errors
    /// included, is JSON on stdout.
    #[arg(short, long, global = true, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,

    /// More logs on stderr: -v info, -vv debug, -vvv trace (RUST_LOG also works).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Parse and check a stack file; report every error with file:line:column.
    Validate(FileArgs),
    /// Refresh what exists and show what `up` would change, drift included.
    Plan(PlanArgs),
    /// Plan, then apply that plan; idempotent, resumes after an interruption.
    Up(ApplyArgs),
    /// Remove everything the stack made, then check that nothing is left.
    Down(ApplyArgs),
    /// Show the nodes, their addresses, the kubeconfig and where the key and state files are.
    Status(FileArgs),
    /// Find newer database images that each database's `upgrade` rule
    /// allows, in their registries; `--check` reports them.
    Upgrade(UpgradeArgs),
    /// Run scheduled drift checks and upgrades of stacks, log JSON lines, serve metrics.
    Daemon(DaemonArgs),
    /// Print the path of the stack's kubeconfig, or merge it into your kubeconfig.
    Kubeconfig(KubeconfigArgs),
    /// Open a shell on a node (or run a command) with OpenSSH, trusting only its pinned host key.
    Ssh(SshArgs),
    /// Read and change the stack's state where it is kept: pull, push,
    /// history, unlock, and migrate between backends.
    #[command(subcommand)]
    State(StateCommand),
    /// Make a new environment of the stack for one command: up, run CMD
    /// with the environment in its variables, always down; exit with CMD's code.
    Run(RunArgs),
    /// Remove the environments of the stack (its runs' included) whose
    /// expiry has passed, found by their tags and labels, state or not.
    Gc(GcArgs),
    /// Print a completion script for SHELL on stdout (see the README for where it goes).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Run the frame switch of a stack's private network (started by `up`).
    #[command(name = "__switch", hide = true)]
    Switch { socket: PathBuf },
}

#[derive(Debug, Args)]
pub struct SshArgs {
    /// `[FILE] NODE`: the stack file (default `stack.yaml`), then the node:
    /// `control-0`, its hostname, or its address `kvm.vm.control[0]`.
    #[arg(value_name = "[FILE] NODE", num_args = 1..=2, required = true)]
    pub target: Vec<String>,

    /// The environment of this `stack run` (its id), not the stack's own.
    #[arg(long, value_name = "ID", value_parser = run_id)]
    pub run: Option<String>,

    /// A command to run instead of a shell.
    #[arg(last = true)]
    pub command: Vec<String>,
}

impl SshArgs {
    /// The stack file and the node.
    pub fn file_and_node(&self) -> (PathBuf, &str) {
        let node = self.target.last().map_or("", String::as_str);
        let file = match self.target.as_slice() {
            [file, _] => PathBuf::from(file),
            _ => PathBuf::from("stack.yaml"),
        };
        (file, node)
    }
}

/// `stack state …`.
#[derive(Debug, Subcommand)]
pub enum StateCommand {
    /// Print the stack's state as JSON on stdout, its secrets decrypted
    /// (keep what you save of it private).
    Pull(FileArgs),
    /// Write a state file, as `pull` printed it and edited, as the stack's
    /// next serial; refused unless it is of the stored lineage and serial.
    Push(PushArgs),
    /// List every serial of the state that was written: when, by whom
    /// (user@host and pid) and with which command (postgres backend).
    History(FileArgs),
    /// Name the run that holds the stack's lock; with --force, end its
    /// session so the lock is free (postgres backend: a local lock goes
    /// with its process and is never left behind).
    Unlock(UnlockArgs),
    /// Move the stack's state and its artifacts to another backend: the
    /// copy is read back and compared before the original is removed.
    Migrate(MigrateArgs),
}

/// Waiting for a lock another run holds.
#[derive(Debug, Args)]
pub struct LockArgs {
    /// Wait up to DURATION (30s, 5m) for the stack's lock when another
    /// run holds it, instead of failing at once.
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = humantime::parse_duration)]
    pub lock_timeout: std::time::Duration,
}

#[derive(Debug, Args)]
pub struct PushArgs {
    /// `[FILE] STATE`: the stack file (default `stack.yaml`), then the
    /// state file to write.
    #[arg(value_name = "[FILE] STATE", num_args = 1..=2, required = true)]
    pub files: Vec<PathBuf>,

    /// Write it even when its lineage or serial does not follow the stored one.
    #[arg(long)]
    pub force: bool,

    /// Write without asking; needed where `stack` cannot ask.
    #[arg(long, short = 'y')]
    pub yes: bool,

    #[command(flatten)]
    pub lock: LockArgs,
}

impl PushArgs {
    /// The stack file and the state file.
    pub fn stack_and_state(&self) -> (PathBuf, PathBuf) {
        match self.files.as_slice() {
            [file, state] => (file.clone(), state.clone()),
            [state] => (PathBuf::from("stack.yaml"), state.clone()),
            _ => (PathBuf::from("stack.yaml"), PathBuf::new()),
        }
    }
}

#[derive(Debug, Args)]
pub struct UnlockArgs {
    #[command(flatten)]
    pub file: FileArgs,

    /// End the session of the run that holds the lock.
    #[arg(long)]
    pub force: bool,

    /// With --force: end it without asking.
    #[arg(long, short = 'y', requires = "force")]
    pub yes: bool,
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub file: FileArgs,

    /// Where to move it: `local` (next to the stack file), or a URL
    /// postgres://USER@HOST:PORT/DATABASE (the password comes from
    /// PGPASSWORD or ~/.pgpass).
    #[arg(long, value_name = "local|URL")]
    pub to: String,

    /// Move without asking; needed where `stack` cannot ask.
    #[arg(long, short = 'y')]
    pub yes: bool,

    #[command(flatten)]
    pub lock: LockArgs,
}

#[derive(Debug, Args)]
pub struct FileArgs {
    /// The stack file.
    #[arg(default_value = "stack.yaml")]
    pub file: PathBuf,

    /// The environment of this `stack run` (its id, as `run` printed it),
    /// not the stack's own: for a kept environment.
    #[arg(long, value_name = "ID", value_parser = run_id)]
    pub run: Option<String>,
}

/// A run id as `stack run` makes them: lowercase letters and digits.
fn run_id(text: &str) -> Result<String, String> {
    let ok = (1..=12).contains(&text.len())
        && text
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    match ok {
        true => Ok(text.to_string()),
        false => Err("a run id: 1 to 12 lowercase letters and digits, such as 3f9a1c".to_string()),
    }
}

/// An RFC 3339 time, in seconds since the epoch.
fn time(text: &str) -> Result<u64, String> {
    crate::expiry::parse_rfc3339(text)
        .ok_or_else(|| "a time such as 2026-12-24T18:00:00Z".to_string())
}

/// A `ttl` as the stack file takes it.
fn ttl(text: &str) -> Result<std::time::Duration, String> {
    crate::model::values::parse_ttl(text)
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The stack file.
    pub file: PathBuf,

    /// The command to run and its arguments, after `--` (so that what
    /// the state's history records of the run stops before them).
    #[arg(required = true, last = true, value_name = "CMD")]
    pub command: Vec<String>,

    /// Make and remove without asking; needed where `stack` cannot ask.
    #[arg(long, short = 'y')]
    pub yes: bool,

    /// How long the environment may live before `stack gc` removes it
    /// (default: the stack's `ttl`, else 24h).
    #[arg(long, value_name = "DURATION", value_parser = ttl)]
    pub ttl: Option<std::time::Duration>,

    /// When `up` or CMD fails, keep the environment and print how to reach
    /// and remove it.
    #[arg(long)]
    pub keep_on_failure: bool,

    /// How many independent changes may run at once.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub parallelism: u16,
}

/// Where `stack gc` looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GcProvider {
    Ec2,
    Kvm,
    Kubernetes,
}

#[derive(Debug, Args)]
pub struct GcArgs {
    /// The stack file: where its environments are (EC2 region, KVM folder
    /// or cluster); only its own and its runs' are removed.
    #[arg(default_value = "stack.yaml")]
    pub file: PathBuf,

    /// Only where this provider keeps them (the stack's must be it).
    #[arg(long, value_enum)]
    pub provider: Option<GcProvider>,

    /// Remove without asking; needed where `stack` cannot ask.
    #[arg(long, short = 'y')]
    pub yes: bool,

    /// Only list what has expired and what has not.
    #[arg(long, conflicts_with = "yes")]
    pub dry_run: bool,

    /// Sweep as if it were TIME (RFC 3339, such as 2026-12-24T18:00:00Z):
    /// with `--dry-run`, what will have expired by then.
    #[arg(long, value_name = "TIME", value_parser = time)]
    pub as_of: Option<u64>,

    /// How many independent changes may run at once.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub parallelism: u16,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub file: FileArgs,

    /// Exit 0 when there is nothing to do, 2 when there are changes or drift, 1 on error.
    #[arg(long)]
    pub detailed_exitcode: bool,

    /// Plan the removal of everything (what `down` would do).
    #[arg(long, conflicts_with = "refresh_only")]
    pub destroy: bool,

    /// Only report drift of the live world from what was last applied, no
    /// changes made in the stack file (for scheduled checks).
    #[arg(long)]
    pub refresh_only: bool,
    /// Take over into this (new) state what another state of the stack made
    /// (another checkout, or a lost state file).
    #[arg(long)]
    pub adopt: bool,

    #[command(flatten)]
    pub lock: LockArgs,
}

#[derive(Debug, Args)]
pub struct UpgradeArgs {
    #[command(flatten)]
    pub file: FileArgs,

    /// Only report: every database's current image and the candidate
    /// (pinned by digest) or why there is none. Exit 1 when a registry
    /// could not be asked.
    #[arg(long)]
    pub check: bool,

    /// Roll out without asking; needed where `stack` cannot ask (no
    /// terminal, `--output json`, `--due`).
    #[arg(long, short = 'y', conflicts_with = "check")]
    pub yes: bool,

    /// Then write every image upgrades pinned into the stack file, in
    /// place (only the `image:` text changes; comments stay).
    #[arg(long, conflicts_with = "check")]
    pub write: bool,

    /// Only when a time of `upgrades.schedule` is due (it passed less than
    /// `upgrades.window` ago and was not served yet): for a cron job or a
    /// CI schedule. Needs `--yes`.
    #[arg(long, conflicts_with = "check", requires = "yes")]
    pub due: bool,

    #[command(flatten)]
    pub lock: LockArgs,
}

#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// The stack files to keep checked and current.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,

    /// Where to serve Prometheus metrics (`/metrics`).
    #[arg(long, value_name = "ADDRESS", default_value = "127.0.0.1:9477")]
    pub metrics: std::net::SocketAddr,

    /// How often each stack gets a refresh-only plan (drift is reported,
    /// never repaired).
    #[arg(long, value_name = "DURATION", default_value = "15m", value_parser = humantime::parse_duration)]
    pub drift_every: std::time::Duration,

    /// At start, check every stack for drift and upgrade it, due or not.
    #[arg(long)]
    pub now: bool,

    /// Approve the upgrades the schedules make; without it they are
    /// checked and logged, never rolled out.
    #[arg(long, short = 'y')]
    pub yes: bool,
}

#[derive(Debug, Args)]
pub struct KubeconfigArgs {
    #[command(flatten)]
    pub file: FileArgs,

    /// Merge the cluster, user and a context named after the stack into
    /// $KUBECONFIG (its first file) or ~/.kube/config, and make it current.
    #[arg(long)]
    pub merge: bool,
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    #[command(flatten)]
    pub file: FileArgs,

    /// Apply without asking; needed where `stack` cannot ask (no terminal,
    /// or `--output json`).
    #[arg(long, short = 'y')]
    pub yes: bool,

    /// Take over into this (new) state what another state of the stack made
    /// (another checkout, or a lost state file).
    #[arg(long)]
    pub adopt: bool,

    /// How many independent changes may run at once.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub parallelism: u16,

    #[command(flatten)]
    pub lock: LockArgs,
}
