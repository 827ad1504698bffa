//! What `stack` last applied, kept so that plans can tell drift from intent
//! and an interrupted run can resume.
//!
//! The default store is a local file next to the stack file
//! (`.stack/NAME.state.json`): one lock for the whole run, atomic replace
//! (write a temporary file, fsync, rename), mode 0600, a schema version, and
//! the previous copy kept as `NAME.state.json.backup`.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::files::{failed, FileError};

/// The state file format this build reads and writes.
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state is locked by pid {} on {} since {} ({}); wait for that run to finish", holder.pid, holder.host, holder.started, path.display())]
    Locked { path: PathBuf, holder: LockHolder },
    #[error("state is locked ({}) by a process that did not say who it is", path.display())]
    LockedUnknown { path: PathBuf },
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
}

/// Who holds the lock, written into the lock file for the next run to read.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LockHolder {
    pub pid: u32,
    pub host: String,
    pub started: String,
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
    /// Bumped on every write.
    pub serial: u64,
    pub resources: Vec<Record>,
}

impl State {
    pub fn new(stack: &str, provider: &str) -> Self {
        State {
            schema_version: SCHEMA_VERSION,
            stack: stack.to_string(),
            provider: provider.to_string(),
            serial: 0,
            resources: Vec::new(),
        }
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

    /// The same state with only the records whose kind `keep` accepts (one phase's view).
    pub fn only(&self, keep: impl Fn(&str) -> bool) -> State {
        State {
            resources: self
                .resources
                .iter()
                .filter(|r| keep(&r.kind))
                .cloned()
                .collect(),
            ..self.clone()
        }
    }
}

/// Where state lives. One run holds the store (and its lock) from start to end.
pub trait StateStore: Send {
    fn load(&self) -> Result<State, StateError>;
    fn save(&mut self, state: &mut State) -> Result<(), StateError>;
    /// Where the state is, for `stack status`.
    fn location(&self) -> String;
}

/// The local file store; holding a value of this type means holding the lock.
pub struct LocalStateStore {
    path: PathBuf,
    stack: String,
    provider: String,
    _lock: File,
}

impl LocalStateStore {
    /// Takes the lock for the stack's state in `dir`, failing at once, with
    /// the holder's pid, host and start time, when another run has it.
    pub fn open(dir: &Path, stack: &str, provider: &str) -> Result<Self, StateError> {
        fs::create_dir_all(dir).map_err(failed("create the state folder", dir))?;
        let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
        let lock_path = dir.join(format!("{stack}.lock"));
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(failed("open the lock file", &lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = lock.read_to_string(&mut text);
                return Err(match serde_json::from_str::<LockHolder>(&text) {
                    Ok(holder) => StateError::Locked {
                        path: lock_path,
                        holder,
                    },
                    Err(_) => StateError::LockedUnknown { path: lock_path },
                });
            }
            Err(fs::TryLockError::Error(source)) => {
                return Err(failed("lock", &lock_path)(source).into())
            }
        }
        let holder = LockHolder {
            pid: std::process::id(),
            host: gethostname::gethostname().to_string_lossy().into_owned(),
            started: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        };
        let write_holder = |lock: &mut File| -> std::io::Result<()> {
            lock.set_len(0)?;
            lock.rewind()?;
            lock.write_all(
                serde_json::to_string(&holder)
                    .unwrap_or_default()
                    .as_bytes(),
            )?;
            lock.sync_data()
        };
        write_holder(&mut lock).map_err(failed("write the lock file", &lock_path))?;
        Ok(LocalStateStore {
            path: state_path(dir, stack),
            stack: stack.to_string(),
            provider: provider.to_string(),
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn backup_path(&self) -> PathBuf {
        backup_path(&self.path)
    }
}

fn backup_path(path: &Path) -> PathBuf {
    let mut name = path.to_path_buf().into_os_string();
    name.push(".backup");
    PathBuf::from(name)
}

/// The state file of `stack` in `dir`.
pub fn state_path(dir: &Path, stack: &str) -> PathBuf {
    dir.join(format!("{stack}.state.json"))
}

/// Reads a state file without taking the lock (for `stack status`): writers
/// replace it atomically, so a reader sees one whole version. `None` when
/// there is no state yet.
pub fn read(path: &Path, stack: &str) -> Result<Option<State>, StateError> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(failed("read", path)(err).into()),
    };
    let corrupt = |reason: String| StateError::Corrupt {
        path: path.to_path_buf(),
        backup: backup_path(path),
        reason,
    };
    let raw: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| corrupt(format!("not JSON: {e}")))?;
    let version = raw
        .get("schemaVersion")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| corrupt("no schemaVersion".to_string()))?;
    if version > u64::from(SCHEMA_VERSION) {
        return Err(StateError::NewerSchema {
            path: path.to_path_buf(),
            found: version as u32,
        });
    }
    let state: State = serde_json::from_value(raw).map_err(|e| corrupt(e.to_string()))?;
    if state.stack != stack {
        return Err(StateError::OtherStack {
            path: path.to_path_buf(),
            found: state.stack,
            expected: stack.to_string(),
        });
    }
    Ok(Some(state))
}

impl StateStore for LocalStateStore {
    fn load(&self) -> Result<State, StateError> {
        Ok(read(&self.path, &self.stack)?
            .unwrap_or_else(|| State::new(&self.stack, &self.provider)))
    }

    fn save(&mut self, state: &mut State) -> Result<(), StateError> {
        state.serial += 1;
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let mut tmp_name = self.path.clone().into_os_string();
        tmp_name.push(".tmp");
        let tmp = PathBuf::from(tmp_name);
        let mut text = serde_json::to_string_pretty(state).expect("state serialises");
        text.push('\n');
        crate::files::write_private(&tmp, text.as_bytes()).map_err(failed("write", &tmp))?;
        if self.path.exists() {
            // Keep the previous copy: link it under a temporary name, then
            // rename over the backup, so every step leaves whole files.
            let mut link_name = self.backup_path().into_os_string();
            link_name.push(".tmp");
            let link = PathBuf::from(link_name);
            let _ = fs::remove_file(&link);
            fs::hard_link(&self.path, &link)
                .map_err(failed("keep the previous copy of", &self.path))?;
            fs::rename(&link, self.backup_path())
                .map_err(failed("keep the previous copy of", &self.path))?;
        }
        fs::rename(&tmp, &self.path).map_err(failed("replace", &self.path))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(failed("sync", dir))?;
        Ok(())
    }

    fn location(&self) -> String {
        self.path.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(address: &str) -> Record {
        Record {
            address: address.to_string(),
            kind: "instance".to_string(),
            id: Some("i-1".to_string()),
            attrs: serde_json::json!({"instanceType": "t3.small"}),
            pending_token: None,
        }
    }

    #[test]
    fn saves_atomically_with_mode_0600_and_a_backup() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = LocalStateStore::open(dir.path(), "demo", "ec2").unwrap();
        let mut state = store.load().unwrap();
        assert!(state.resources.is_empty());
        state.put(record("ec2.instance.a[0]"));
        store.save(&mut state).unwrap();
        state.put(record("ec2.instance.a[1]"));
        store.save(&mut state).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded, state);
        assert_eq!(loaded.serial, 2);
        let mode = fs::metadata(store.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let backup: State =
            serde_json::from_str(&fs::read_to_string(store.backup_path()).unwrap()).unwrap();
        assert_eq!(backup.resources.len(), 1);
        assert!(!dir.path().join("demo.state.json.tmp").exists());
    }

    #[test]
    fn a_second_open_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let _first = LocalStateStore::open(dir.path(), "demo", "ec2").unwrap();
        let err = LocalStateStore::open(dir.path(), "demo", "ec2")
            .err()
            .unwrap();
        let message = err.to_string();
        assert!(
            message.contains(&format!("pid {}", std::process::id())),
            "{message}"
        );
    }

    #[test]
    fn corrupt_state_is_an_error_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("demo.state.json");
        fs::write(&path, "{\"schemaVersion\": 1, \"stack\": ").unwrap();
        let store = LocalStateStore::open(dir.path(), "demo", "ec2").unwrap();
        let err = store.load().unwrap_err();
        assert!(matches!(err, StateError::Corrupt { .. }), "{err}");
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            "{\"schemaVersion\": 1, \"stack\": "
        );
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("demo.state.json"),
            r#"{"schemaVersion": 9, "stack": "demo"}"#,
        )
        .unwrap();
        let store = LocalStateStore::open(dir.path(), "demo", "ec2").unwrap();
        assert!(matches!(
            store.load().unwrap_err(),
            StateError::NewerSchema { found: 9, .. }
        ));
    }
}
