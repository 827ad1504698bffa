//! The state's types (a stack's records and their serial) and the two
//! traits every backend implements: one to read and lock, one to load and
//! save while the lock is held.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::files::FileError;
use crate::future::BoxFuture;

/// The state file format this build reads and writes.
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state is locked by pid {} on {} since {} (`{}`, {}); wait for that run to finish, or let this one wait for it with --lock-timeout", holder.pid, holder.who(), holder.started, holder.command, location)]
    Locked {
        location: String,
        holder: Box<LockHolder>,
    },
    #[error("state is locked ({location}) by a process that did not say who it is")]
    LockedUnknown { location: String },
    #[error(transparent)]
    Io(#[from] FileError),
    #[error("state file {} is corrupt ({reason}); it was left untouched: fix it or restore {}", path.display(), backup.display())]
    Corrupt {
        path: PathBuf,
        backup: PathBuf,
        reason: String,
    },
    #[error("state file {} has schema version {found}; this build of stack reads version {SCHEMA_VERSION}: use a newer stack", path.display())]
    NewerSchema { path: PathBuf, found: u32 },
    #[error("state file {} belongs to stack `{found}`, not `{expected}`", path.display())]
    OtherStack {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("state {location} is at serial {stored}, not {expected} as this run last saw it: another writer changed it; nothing was written, plan again")]
    SerialMoved {
        location: String,
        expected: u64,
        stored: u64,
    },
    #[error("{location} already holds a state of stack {stack} (serial {serial}): nothing was written there")]
    NotEmpty {
        location: String,
        stack: String,
        serial: u64,
    },
    #[error("the local state {} keeps no history, only the copy before the last write ({}); the postgres backend keeps every serial", path.display(), backup.display())]
    NoHistory { path: PathBuf, backup: PathBuf },
    #[error("the lock {location} is held by pid {} on {} (`{}`): a local lock goes with its process, so it is never left behind; end that process to free it", holder.pid, holder.who(), holder.command)]
    HeldByProcess {
        location: String,
        holder: Box<LockHolder>,
    },
    #[error("the lock of {location} is not held by pid {} on {} any more: look again", holder.pid, holder.who())]
    HolderChanged {
        location: String,
        holder: Box<LockHolder>,
    },
    /// What a backend of its own failed at (the database's errors).
    #[error(transparent)]
    Backend(Box<dyn std::error::Error + Send + Sync>),
}

/// Who holds the lock, written where the next run can read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockHolder {
    pub pid: u32,
    pub host: String,
    /// The user the process runs as (empty when unknown).
    #[serde(default)]
    pub user: String,
    pub started: String,
    /// The command line it runs (`stack up`).
    #[serde(default)]
    pub command: String,
}

impl LockHolder {
    /// This process, now, running `command`.
    pub fn this_process(command: &str) -> LockHolder {
        let user = ["USER", "LOGNAME"]
            .iter()
            .find_map(|v| std::env::var(v).ok().filter(|u| !u.is_empty()))
            .or_else(user_of_process)
            .unwrap_or_default();
        LockHolder {
            pid: std::process::id(),
            host: gethostname::gethostname().to_string_lossy().into_owned(),
            user,
            started: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            command: command.to_string(),
        }
    }

    /// The same holder, holding from now (once the lock is taken).
    pub fn from_now(&self) -> LockHolder {
        LockHolder {
            started: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            ..self.clone()
        }
    }

    /// `user@host` (the host alone when the user is unknown).
    pub fn who(&self) -> String {
        match self.user.as_str() {
            "" => self.host.clone(),
            user => format!("{user}@{}", self.host),
        }
    }
}

/// The name of the user this process runs as, from `/etc/passwd` (its
/// uid when it has no entry there).
fn user_of_process() -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata("/proc/self").ok()?.uid().to_string();
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let name = passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        (fields.nth(1)? == uid).then(|| name.to_string())
    });
    Some(name.unwrap_or_else(|| format!("uid {uid}")))
}

/// One write of a state, as a backend with a history keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HistoryEntry {
    pub serial: u64,
    pub lineage: String,
    /// `user@host`.
    pub who: String,
    pub pid: u32,
    pub command: String,
    /// RFC 3339, UTC.
    pub at: String,
}

/// One managed thing as last applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub address: String,
    pub kind: String,
    /// The provider's id; `None` while a create is in flight.
    pub id: Option<String>,
    /// The attributes as applied.
    pub attrs: serde_json::Value,
    /// The idempotency token of a create that was started and may not have
    /// finished; a re-run reuses it so the provider returns the same thing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_token: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct State {
    pub schema_version: u32,
    pub stack: String,
    pub provider: String,
    /// Bumped on every write; a write must name the serial it replaces.
    pub serial: u64,
    /// This state's own id, made with it: what it makes is marked with it,
    /// so a second state of the same stack (another checkout) can tell
    /// what is not its own.
    #[serde(default)]
    pub lineage: String,
    /// When the state was made (seconds since the epoch): where a stack's
    /// `ttl` counts from, so its expiry stays put from one run to the next.
    #[serde(default)]
    pub created: u64,
    pub resources: Vec<Record>,
}

/// A new lineage id: random, and unlike any other state's.
fn new_lineage() -> String {
    use std::hash::BuildHasher;
    let random = std::collections::hash_map::RandomState::new().hash_one(std::process::id());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    format!("{random:016x}{nanos:016x}")
}

impl State {
    pub fn new(stack: &str, provider: &str) -> Self {
        State {
            schema_version: SCHEMA_VERSION,
            stack: stack.to_string(),
            provider: provider.to_string(),
            serial: 0,
            lineage: new_lineage(),
            created: crate::expiry::now(),
            resources: Vec::new(),
        }
    }

    /// A state read from before lineages gets one, and one from before
    /// creation times gets now (both kept at its next save).
    pub fn with_lineage(mut self) -> Self {
        if self.lineage.is_empty() {
            self.lineage = new_lineage();
        }
        if self.created == 0 {
            self.created = crate::expiry::now();
        }
        self
    }

    pub fn get(&self, address: &str) -> Option<&Record> {
        self.resources.iter().find(|r| r.address == address)
    }

    /// Inserts or replaces the record for its address.
    pub fn put(&mut self, record: Record) {
        match self
            .resources
            .iter_mut()
            .find(|r| r.address == record.address)
        {
            Some(slot) => *slot = record,
            None => self.resources.push(record),
        }
        self.resources.sort_by(|a, b| a.address.cmp(&b.address));
    }

    pub fn remove(&mut self, address: &str) {
        self.resources.retain(|r| r.address != address);
    }

    /// The same state with only the records `keep` accepts (one phase's view).
    pub fn only(&self, keep: impl Fn(&Record) -> bool) -> State {
        State {
            resources: self.resources.iter().filter(|r| keep(r)).cloned().collect(),
            ..self.clone()
        }
    }
}

/// Where a stack's state lives.
pub trait StateBackend: Send + Sync {
    /// Where it is, for messages and `stack status`.
    fn location(&self) -> String;

    /// The stored state without taking the lock (for `status`: writers
    /// replace it whole, so a reader sees one whole version); `None` before
    /// the first write. A backend that keeps the stack's artifacts puts
    /// them in place first.
    fn read(&self) -> BoxFuture<'_, Result<Option<State>, StateError>>;

    /// Takes the lock for a run, failing, naming the holder, when another
    /// run still has it after `wait` (zero: at once). The lock lasts as long
    /// as the returned value. A backend that keeps the stack's artifacts
    /// puts them in place before it returns.
    fn lock(
        &self,
        holder: LockHolder,
        wait: Duration,
    ) -> BoxFuture<'_, Result<Box<dyn StateLock>, StateError>>;

    /// Every write of the state there was, oldest first.
    fn history(&self) -> BoxFuture<'_, Result<Vec<HistoryEntry>, StateError>>;

    /// Who holds the lock now; `None` when nobody does.
    fn holder(&self) -> BoxFuture<'_, Result<Option<LockHolder>, StateError>>;

    /// Ends `holder`'s hold on the lock (a run that is stuck, or gone
    /// where the backend cannot tell); refused when someone else holds it
    /// now, or when the backend's locks cannot be left behind.
    fn unlock<'a>(&'a self, holder: &'a LockHolder) -> BoxFuture<'a, Result<(), StateError>>;

    /// The artifacts the backend keeps with the state, by name, with the
    /// sha256 of each (what a migration checks it moved).
    fn artifact_digests(&self) -> BoxFuture<'_, Result<BTreeMap<String, String>, StateError>>;
}

/// The state of a stack while its lock is held.
pub trait StateLock: Send + Sync {
    fn location(&self) -> String;

    /// The stored state, or a new empty one before the first write.
    fn load(&self) -> BoxFuture<'_, Result<State, StateError>>;

    /// Writes `state` as the next serial, if the stored serial is still the
    /// one `state` carries; on success `state.serial` is the new serial. A
    /// backend that keeps the stack's artifacts writes them with it.
    fn save<'a>(&'a mut self, state: &'a mut State) -> BoxFuture<'a, Result<(), StateError>>;

    /// Writes `state` (moved from another backend, its lineage kept) as the
    /// serial after the one it carries, where no state is stored yet.
    fn import<'a>(&'a mut self, state: &'a mut State) -> BoxFuture<'a, Result<(), StateError>>;

    /// After a destroy that left nothing: removes the stored state (its
    /// copies too) and the lock, so nothing of the stack is left; the next
    /// run starts a new state, with a new lineage. A backend with a history
    /// keeps it.
    fn remove(self: Box<Self>) -> BoxFuture<'static, Result<(), StateError>>;
}
