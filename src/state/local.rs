//! The default state backend: a local file next to the stack file
//! (`.stack/NAME.state.json`), locked with `flock` on `NAME.lock` for the
//! whole run (the lock goes with its process, so a killed run never leaves
//! a stale one), replaced atomically (write a temporary file, fsync,
//! rename), mode 0600, a schema version, and the previous copy kept as
//! `NAME.state.json.backup`. A run that is to wait for the lock tries
//! again every tenth of a second until its wait is over.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::store::{
    HistoryEntry, LockHolder, State, StateBackend, StateError, StateLock, SCHEMA_VERSION,
};
use crate::artifacts::Artifacts;
use crate::files::{failed, sha256_hex};
use crate::future::BoxFuture;

/// How often a waiting run tries the lock again.
const RETRY: Duration = Duration::from_millis(100);

pub struct LocalBackend {
    dir: PathBuf,
    stack: String,
    provider: String,
}

impl LocalBackend {
    /// The state of `stack` in `dir` (`.stack` next to the stack file).
    pub fn new(dir: &Path, stack: &str, provider: &str) -> LocalBackend {
        LocalBackend {
            dir: dir.to_path_buf(),
            stack: stack.to_string(),
            provider: provider.to_string(),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(format!("{}.state.json", self.stack))
    }

    fn lock_path(&self) -> PathBuf {
        self.dir.join(format!("{}.lock", self.stack))
    }

    /// The lock, or who holds it.
    fn try_lock(&self, holder: &LockHolder) -> Result<Result<LocalLock, StateError>, StateError> {
        let dir = &self.dir;
        fs::create_dir_all(dir).map_err(failed("create the state folder", dir))?;
        let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
        let lock_path = self.lock_path();
        // A `down` that left nothing removes the lock file while holding
        // it: a lock taken on a file that is no longer at the path is no
        // lock, so it is taken again on the file now there.
        let mut lock = loop {
            let lock = match open_and_lock(&lock_path)? {
                Ok(lock) => lock,
                Err(held) => return Ok(Err(held)),
            };
            let held = lock.metadata().map_err(failed("lock", &lock_path))?;
            if fs::metadata(&lock_path).is_ok_and(|at_path| at_path.ino() == held.ino()) {
                break lock;
            }
        };
        let write_holder = |lock: &mut File| -> std::io::Result<()> {
            lock.set_len(0)?;
            lock.rewind()?;
            let holding = serde_json::to_string(&holder.from_now()).unwrap_or_default();
            lock.write_all(holding.as_bytes())?;
            lock.sync_data()
        };
        write_holder(&mut lock).map_err(failed("write the lock file", &lock_path))?;
        Ok(Ok(LocalLock {
            path: self.path(),
            lock_path,
            stack: self.stack.clone(),
            provider: self.provider.clone(),
            _lock: lock,
        }))
    }

    /// Takes the lock, trying again until `wait` is over.
    async fn lock_within(
        &self,
        holder: &LockHolder,
        wait: Duration,
    ) -> Result<LocalLock, StateError> {
        let deadline = Instant::now() + wait;
        loop {
            match self.try_lock(holder)? {
                Ok(lock) => return Ok(lock),
                Err(held) if Instant::now() >= deadline => return Err(held),
                Err(_) => tokio::time::sleep(RETRY).await,
            }
        }
    }
}

/// The lock file, opened and locked; `Err` (inside) naming the holder when
/// another process has it.
fn open_and_lock(lock_path: &Path) -> Result<Result<File, StateError>, StateError> {
    let location = lock_path.display().to_string();
    let mut lock = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(lock_path)
        .map_err(failed("open the lock file", lock_path))?;
    match lock.try_lock() {
        Ok(()) => Ok(Ok(lock)),
        Err(fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = lock.read_to_string(&mut text);
            Ok(Err(match serde_json::from_str::<LockHolder>(&text) {
                Ok(holder) => StateError::Locked {
                    location,
                    holder: Box::new(holder),
                },
                Err(_) => StateError::LockedUnknown { location },
            }))
        }
        Err(fs::TryLockError::Error(source)) => Err(failed("lock", lock_path)(source).into()),
    }
}

fn backup_path(path: &Path) -> PathBuf {
    let mut name = path.to_path_buf().into_os_string();
    name.push(".backup");
    PathBuf::from(name)
}

/// Reads a state file; `None` when there is none yet. A corrupt or
/// newer-schema file is an error and is never touched.
fn read(path: &Path, stack: &str) -> Result<Option<State>, StateError> {
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
    let state: State = serde_json::from_value::<State>(raw)
        .map_err(|e| corrupt(e.to_string()))?
        .with_lineage();
    if state.stack != stack {
        return Err(StateError::OtherStack {
            path: path.to_path_buf(),
            found: state.stack,
            expected: stack.to_string(),
        });
    }
    Ok(Some(state))
}

impl StateBackend for LocalBackend {
    fn location(&self) -> String {
        self.path().display().to_string()
    }

    fn read(&self) -> BoxFuture<'_, Result<Option<State>, StateError>> {
        Box::pin(async move { read(&self.path(), &self.stack) })
    }

    fn lock(
        &self,
        holder: LockHolder,
        wait: Duration,
    ) -> BoxFuture<'_, Result<Box<dyn StateLock>, StateError>> {
        Box::pin(async move {
            Ok(Box::new(self.lock_within(&holder, wait).await?) as Box<dyn StateLock>)
        })
    }

    fn history(&self) -> BoxFuture<'_, Result<Vec<HistoryEntry>, StateError>> {
        Box::pin(async move {
            Err(StateError::NoHistory {
                path: self.path(),
                backup: backup_path(&self.path()),
            })
        })
    }

    fn holder(&self) -> BoxFuture<'_, Result<Option<LockHolder>, StateError>> {
        Box::pin(async move {
            let lock_path = self.lock_path();
            if !lock_path.exists() {
                return Ok(None);
            }
            match open_and_lock(&lock_path)? {
                Ok(_free) => Ok(None),
                Err(StateError::Locked { holder, .. }) => Ok(Some(*holder)),
                Err(other) => Err(other),
            }
        })
    }

    fn unlock<'a>(&'a self, holder: &'a LockHolder) -> BoxFuture<'a, Result<(), StateError>> {
        Box::pin(async move {
            Err(StateError::HeldByProcess {
                location: self.lock_path().display().to_string(),
                holder: Box::new(holder.clone()),
            })
        })
    }

    fn artifact_digests(&self) -> BoxFuture<'_, Result<BTreeMap<String, String>, StateError>> {
        Box::pin(async move {
            let artifacts = Artifacts::new(&self.dir, &self.stack);
            Ok(artifacts
                .read_all()?
                .into_iter()
                .map(|(artifact, data)| (artifact.name(), sha256_hex(&data)))
                .collect())
        })
    }
}

/// The local state file; holding a value of this type means holding the lock.
struct LocalLock {
    path: PathBuf,
    lock_path: PathBuf,
    stack: String,
    provider: String,
    _lock: File,
}

impl LocalLock {
    fn save_now(&mut self, state: &mut State) -> Result<(), StateError> {
        let stored = read(&self.path, &self.stack)?.map_or(0, |s| s.serial);
        if stored != state.serial {
            return Err(StateError::SerialMoved {
                location: self.path.display().to_string(),
                expected: state.serial,
                stored,
            });
        }
        let mut next = state.clone();
        next.serial += 1;
        self.write(&next)?;
        state.serial = next.serial;
        Ok(())
    }

    /// Replaces the state file with `next`, keeping the previous copy.
    fn write(&mut self, next: &State) -> Result<(), StateError> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let mut tmp_name = self.path.clone().into_os_string();
        tmp_name.push(".tmp");
        let tmp = PathBuf::from(tmp_name);
        let mut text = serde_json::to_string_pretty(next).expect("state serialises");
        text.push('\n');
        crate::files::write_private(&tmp, text.as_bytes()).map_err(failed("write", &tmp))?;
        if self.path.exists() {
            // Keep the previous copy: link it under a temporary name, then
            // rename over the backup, so every step leaves whole files.
            let backup = backup_path(&self.path);
            let mut link_name = backup.clone().into_os_string();
            link_name.push(".tmp");
            let link = PathBuf::from(link_name);
            let _ = fs::remove_file(&link);
            fs::hard_link(&self.path, &link)
                .map_err(failed("keep the previous copy of", &self.path))?;
            fs::rename(&link, &backup).map_err(failed("keep the previous copy of", &self.path))?;
        }
        fs::rename(&tmp, &self.path).map_err(failed("replace", &self.path))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(failed("sync", dir))
            .map_err(Into::into)
    }
}

impl StateLock for LocalLock {
    fn location(&self) -> String {
        self.path.display().to_string()
    }

    fn load(&self) -> BoxFuture<'_, Result<State, StateError>> {
        Box::pin(async move {
            Ok(read(&self.path, &self.stack)?
                .unwrap_or_else(|| State::new(&self.stack, &self.provider)))
        })
    }

    fn save<'a>(&'a mut self, state: &'a mut State) -> BoxFuture<'a, Result<(), StateError>> {
        Box::pin(async move { self.save_now(state) })
    }

    fn import<'a>(&'a mut self, state: &'a mut State) -> BoxFuture<'a, Result<(), StateError>> {
        Box::pin(async move {
            if let Some(stored) = read(&self.path, &self.stack)? {
                return Err(StateError::NotEmpty {
                    location: self.path.display().to_string(),
                    stack: self.stack.clone(),
                    serial: stored.serial,
                });
            }
            let mut next = state.clone();
            next.serial += 1;
            self.write(&next)?;
            state.serial = next.serial;
            Ok(())
        })
    }

    fn remove(self: Box<Self>) -> BoxFuture<'static, Result<(), StateError>> {
        Box::pin(async move {
            let backup = backup_path(&self.path);
            for path in [&self.path, &backup, &self.lock_path] {
                match fs::remove_file(path) {
                    Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                        return Err(failed("remove", path)(err).into())
                    }
                    _ => {}
                }
            }
            if let Some(dir) = self.path.parent() {
                let _ = fs::remove_dir(dir);
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::store::Record;
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

    fn holder() -> LockHolder {
        LockHolder::this_process("stack up")
    }

    #[tokio::test]
    async fn saves_atomically_with_mode_0600_a_backup_and_the_next_serial() {
        let dir = tempfile::tempdir().unwrap();
        let backend = LocalBackend::new(dir.path(), "demo", "ec2");
        let mut lock = backend.lock(holder(), Duration::ZERO).await.unwrap();
        let mut state = lock.load().await.unwrap();
        assert!(state.resources.is_empty());
        state.put(record("ec2.instance.a[0]"));
        lock.save(&mut state).await.unwrap();
        state.put(record("ec2.instance.a[1]"));
        lock.save(&mut state).await.unwrap();
        let loaded = lock.load().await.unwrap();
        assert_eq!(loaded, state);
        assert_eq!(loaded.serial, 2);
        let path = backend.path();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let backup: State =
            serde_json::from_str(&fs::read_to_string(backup_path(&path)).unwrap()).unwrap();
        assert_eq!(backup.resources.len(), 1);
        assert!(!dir.path().join("demo.state.json.tmp").exists());
        assert_eq!(backend.read().await.unwrap(), Some(state));
    }

    #[tokio::test]
    async fn a_save_from_a_stale_serial_is_refused_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let backend = LocalBackend::new(dir.path(), "demo", "ec2");
        let mut lock = backend.lock(holder(), Duration::ZERO).await.unwrap();
        let mut current = lock.load().await.unwrap();
        let mut stale = current.clone();
        current.put(record("a"));
        lock.save(&mut current).await.unwrap();
        stale.put(record("b"));
        let err = lock.save(&mut stale).await.unwrap_err();
        assert!(
            matches!(
                err,
                StateError::SerialMoved {
                    expected: 0,
                    stored: 1,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(lock.load().await.unwrap(), current);
    }

    #[tokio::test]
    async fn a_second_lock_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let backend = LocalBackend::new(dir.path(), "demo", "ec2");
        let _first = backend.lock(holder(), Duration::ZERO).await.unwrap();
        let err = backend.lock(holder(), Duration::ZERO).await.err().unwrap();
        let message = err.to_string();
        assert!(
            message.contains(&format!("pid {}", std::process::id())),
            "{message}"
        );
    }

    #[tokio::test]
    async fn corrupt_state_is_an_error_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("demo.state.json");
        fs::write(&path, "{\"schemaVersion\": 1, \"stack\": ").unwrap();
        let backend = LocalBackend::new(dir.path(), "demo", "ec2");
        let lock = backend.lock(holder(), Duration::ZERO).await.unwrap();
        let err = lock.load().await.unwrap_err();
        assert!(matches!(err, StateError::Corrupt { .. }), "{err}");
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            "{\"schemaVersion\": 1, \"stack\": "
        );
    }

    #[tokio::test]
    async fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("demo.state.json"),
            r#"{"schemaVersion": 9, "stack": "demo"}"#,
        )
        .unwrap();
        let backend = LocalBackend::new(dir.path(), "demo", "ec2");
        assert!(matches!(
            backend.read().await.unwrap_err(),
            StateError::NewerSchema { found: 9, .. }
        ));
    }

    #[tokio::test]
    async fn a_run_that_waits_gets_the_lock_when_the_holder_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let backend = LocalBackend::new(dir.path(), "demo", "ec2");
        let first = backend.lock(holder(), Duration::ZERO).await.unwrap();
        assert_eq!(
            backend.holder().await.unwrap(),
            Some(holder_of_file(&backend))
        );
        let begun = Instant::now();
        let err = backend
            .lock(holder(), Duration::from_millis(300))
            .await
            .err()
            .unwrap();
        assert!(matches!(err, StateError::Locked { .. }), "{err}");
        assert!(begun.elapsed() >= Duration::from_millis(300));
        let release = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            drop(first);
        });
        let second = backend.lock(holder(), Duration::from_secs(10)).await;
        assert!(second.is_ok());
        release.await.unwrap();
        let err = backend.unlock(&holder()).await.unwrap_err();
        assert!(
            err.to_string()
                .contains("a local lock goes with its process"),
            "{err}"
        );
        drop(second);
        assert_eq!(backend.holder().await.unwrap(), None);
    }

    fn holder_of_file(backend: &LocalBackend) -> LockHolder {
        serde_json::from_str(&fs::read_to_string(backend.lock_path()).unwrap()).unwrap()
    }

    #[tokio::test]
    async fn an_import_keeps_the_lineage_and_is_refused_over_a_stored_state() {
        let dir = tempfile::tempdir().unwrap();
        let backend = LocalBackend::new(dir.path(), "demo", "ec2");
        let mut lock = backend.lock(holder(), Duration::ZERO).await.unwrap();
        let mut moved = State::new("demo", "ec2");
        moved.serial = 7;
        moved.put(record("a"));
        lock.import(&mut moved).await.unwrap();
        assert_eq!(moved.serial, 8);
        assert_eq!(backend.read().await.unwrap(), Some(moved.clone()));
        let err = lock.import(&mut moved.clone()).await.unwrap_err();
        assert!(
            matches!(err, StateError::NotEmpty { serial: 8, .. }),
            "{err}"
        );
        assert!(matches!(
            backend.history().await.unwrap_err(),
            StateError::NoHistory { .. }
        ));
    }
}
