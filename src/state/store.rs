//! The state's types (a stack's records and their serial) and the two
//! traits every backend implements: one to read and lock, one to load and
//! save while the lock is held.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::files::FileError;
use crate::future::BoxFuture;

/// The state file format this build reads and writes.
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state is locked by pid {} on {} since {} ({}); wait for that run to finish", holder.pid, holder.host, holder.started, location)]
    Locked {
        location: String,
        holder: LockHolder,
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
}

/// Who holds the lock, written where the next run can read it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LockHolder {
    pub pid: u32,
    pub host: String,
    pub started: String,
}

impl LockHolder {
    /// This process, now.
    pub fn this_process() -> LockHolder {
        LockHolder {
            pid: std::process::id(),
            host: gethostname::gethostname().to_string_lossy().into_owned(),
            started: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        }
    }
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
    /// the first write.
    fn read(&self) -> BoxFuture<'_, Result<Option<State>, StateError>>;

    /// Takes the lock for a run, failing at once, naming the holder, when
    /// another run has it. The lock lasts as long as the returned value.
    fn lock(&self, holder: LockHolder) -> BoxFuture<'_, Result<Box<dyn StateLock>, StateError>>;
}

/// The state of a stack while its lock is held.
pub trait StateLock: Send + Sync {
    fn location(&self) -> String;

    /// The stored state, or a new empty one before the first write.
    fn load(&self) -> BoxFuture<'_, Result<State, StateError>>;

    /// Writes `state` as the next serial, if the stored serial is still the
    /// one `state` carries; on success `state.serial` is the new serial.
    fn save<'a>(&'a mut self, state: &'a mut State) -> BoxFuture<'a, Result<(), StateError>>;

    /// After a destroy that left nothing: removes the stored state (its
    /// copies too) and the lock, so nothing of the stack is left; the next
    /// run starts a new state, with a new lineage.
    fn remove(self: Box<Self>) -> BoxFuture<'static, Result<(), StateError>>;
}
