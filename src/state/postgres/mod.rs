//! The state for teams: a stack's state in a PostgreSQL database that
//! everyone who runs the stack reaches (`state: {backend: postgres, url}`
//! or `STACK_STATE_URL`), like Terraform's `pg` backend.
//!
//! - The lock is a session-level advisory lock, keyed by the stack's row
//!   id, taken on a connection of its own held for the whole run: the
//!   server drops it with the session, so a run killed with SIGKILL never
//!   leaves it behind. Who holds it is a row keyed by the holder's server
//!   session, so a second run names the holder (pid, user@host, command,
//!   since), and `unlock` can end a stuck holder's session.
//! - A save is one transaction on the lock's connection: compare-and-swap
//!   on the serial, the state as JSONB, a history row for the serial, and
//!   the stack's artifacts that changed. A lost connection fails the save
//!   whole, and the lock is gone with it, so the run stops there.
//! - Records' attributes and artifacts are sealed (`seal`); addresses,
//!   kinds and ids stay readable JSONB.
//! - The artifacts are put in place (`.stack/`) whenever the state is read
//!   or locked, so a teammate's machine has the SSH key, the host keys and
//!   the kubeconfig the state goes with.
//!
//! The tables and their migrations are in `schema`.

mod connect;
mod pgpass;
mod schema;
mod tls;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio_postgres::error::SqlState;

use super::seal::{self, KeySource, SealError, Sealer};
use super::store::{
    HistoryEntry, LockHolder, State, StateBackend, StateError, StateLock, SCHEMA_VERSION,
};
use crate::artifacts::{Artifact, Artifacts};
use crate::files::{sha256_hex, FileError};
use crate::future::BoxFuture;
use connect::{ConnectError, Db, Target, QUERY_TIMEOUT};
use schema::{SchemaError, LOCK_SPACE};

#[derive(Debug, thiserror::Error)]
pub enum PostgresError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error(transparent)]
    Seal(#[from] SealError),
    #[error("cannot {doing} in the state database {location} (stack {stack})")]
    Query {
        location: String,
        stack: String,
        doing: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("the state database {location} did not answer within {} s while stack tried to {doing} (stack {stack}); nothing more is written by this run", QUERY_TIMEOUT.as_secs())]
    Timeout {
        location: String,
        stack: String,
        doing: &'static str,
    },
    #[error("lost the connection to the state database {location} ({why}) while trying to {doing} (stack {stack}): nothing more is written by this run, and the stored state is whole; the next run finds what this one made after its last write by the stack's tags")]
    Lost {
        location: String,
        stack: String,
        doing: &'static str,
        why: String,
    },
    #[error("an earlier write of the state of stack {stack} to {location} did not finish: this run writes nothing more (the next run reads what is stored)")]
    Interrupted { location: String, stack: String },
    #[error("the state of stack {stack} in {location} cannot be read: {reason}")]
    Corrupt {
        location: String,
        stack: String,
        reason: String,
    },
    #[error("the state database {location} holds {what}, which this build of stack does not know (stack {stack}): use a newer stack")]
    UnknownArtifact {
        location: String,
        stack: String,
        what: String,
    },
    #[error(transparent)]
    Artifacts(#[from] FileError),
}

impl From<PostgresError> for StateError {
    fn from(err: PostgresError) -> StateError {
        StateError::Backend(Box::new(err))
    }
}

/// The error of a statement on `db` that failed (`Some`) or did not answer.
fn failure(
    location: &str,
    stack: &str,
    db: &Db,
    doing: &'static str,
    err: Option<tokio_postgres::Error>,
) -> PostgresError {
    let (location, stack) = (location.to_string(), stack.to_string());
    match err {
        None => PostgresError::Timeout {
            location,
            stack,
            doing,
        },
        Some(source) if source.is_closed() || db.ended().is_some() => PostgresError::Lost {
            location,
            stack,
            doing,
            why: db.ended().unwrap_or_else(|| source.to_string()),
        },
        Some(source) => PostgresError::Query {
            location,
            stack,
            doing,
            source,
        },
    }
}

/// A stack's row: its id, and the salt, rounds and check of its key
/// (empty before its first write).
struct StackRow {
    id: i32,
    salt: Vec<u8>,
    iterations: i32,
    check: String,
}

/// Who holds a stack's advisory lock, as the server tells.
enum Held {
    Free,
    /// The run that wrote its row, and its server session.
    By(LockHolder, i32),
    /// A session that wrote no row (it just took the lock, or it is not
    /// `stack`): its pid and application name.
    Unknown(i32, String),
}

/// A stack's state in a PostgreSQL database.
pub struct PostgresBackend {
    target: Target,
    stack: String,
    provider: String,
    artifacts: Artifacts,
    secret: Vec<u8>,
    /// The key derived for the stack's salt, once derived.
    sealer: Mutex<Option<(Vec<u8>, Arc<Sealer>)>>,
}

impl PostgresBackend {
    /// The state of `stack` at `url`; `from_env`: the URL came from
    /// `STACK_STATE_URL` (and may carry the password). The key comes
    /// from `STACK_STATE_KEY` or `STACK_STATE_KEY_COMMAND`, asked now.
    pub async fn new(
        url: &str,
        from_env: bool,
        stack: &str,
        provider: &str,
        artifacts: &Artifacts,
    ) -> Result<PostgresBackend, StateError> {
        let target = Target::parse(url, from_env).map_err(PostgresError::from)?;
        let source = KeySource::from_env().map_err(PostgresError::from)?;
        let secret = source.secret().await.map_err(PostgresError::from)?;
        Ok(PostgresBackend {
            target,
            stack: stack.to_string(),
            provider: provider.to_string(),
            artifacts: artifacts.clone(),
            secret,
            sealer: Mutex::new(None),
        })
    }

    fn location_text(&self) -> String {
        format!("{} (stack {})", self.target.location(), self.stack)
    }

    fn failure(
        &self,
        db: &Db,
        doing: &'static str,
        err: Option<tokio_postgres::Error>,
    ) -> PostgresError {
        failure(self.target.location(), &self.stack, db, doing, err)
    }

    /// `work` on `db`, bounded by `limit`.
    async fn bounded<T>(
        &self,
        db: &Db,
        doing: &'static str,
        limit: Duration,
        work: impl Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, PostgresError> {
        match tokio::time::timeout(limit, work).await {
            Err(_) => Err(self.failure(db, doing, None)),
            Ok(Err(err)) => Err(self.failure(db, doing, Some(err))),
            Ok(Ok(value)) => Ok(value),
        }
    }

    /// A session with the schema at this build's version.
    async fn open_db(&self, holder: &LockHolder) -> Result<Db, PostgresError> {
        let name = format!(
            "stack: {} (pid {} on {})",
            holder.command, holder.pid, holder.host
        );
        let mut db = self.target.connect(&name).await?;
        let location = self.target.location().to_string();
        let who = holder.who();
        tokio::time::timeout(
            QUERY_TIMEOUT,
            schema::migrate(&mut db.client, &location, &who),
        )
        .await
        .map_err(|_| self.failure(&db, "bring its tables up to date", None))??;
        Ok(db)
    }

    /// The key for `salt`, derived once (PBKDF2 is slow by design).
    async fn sealer(&self, salt: &[u8], iterations: i32) -> Result<Arc<Sealer>, PostgresError> {
        if let Some((known, sealer)) = &*self.sealer.lock().unwrap_or_else(|p| p.into_inner()) {
            if known == salt {
                return Ok(sealer.clone());
            }
        }
        let (secret, salt_owned, stack) = (self.secret.clone(), salt.to_vec(), self.stack.clone());
        let rounds = u32::try_from(iterations).unwrap_or(seal::ITERATIONS);
        let sealer = tokio::task::spawn_blocking(move || {
            Arc::new(Sealer::derive(&secret, &salt_owned, rounds, &stack))
        })
        .await
        .map_err(|err| PostgresError::Corrupt {
            location: self.target.location().to_string(),
            stack: self.stack.clone(),
            reason: format!("the key could not be derived: {err}"),
        })?;
        *self.sealer.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((salt.to_vec(), sealer.clone()));
        Ok(sealer)
    }

    /// The stack's row; added (with no key yet) when `create` and the
    /// stack has none.
    async fn stack_row(&self, db: &Db, create: bool) -> Result<Option<StackRow>, PostgresError> {
        let select =
            "SELECT id, key_salt, key_iterations, key_check FROM stack.stacks WHERE name = $1";
        let doing = "read the stack's row";
        let name: &(dyn tokio_postgres::types::ToSql + Sync) = &self.stack;
        let read = || db.client.query_opt(select, std::slice::from_ref(&name));
        let mut row = self.bounded(db, doing, QUERY_TIMEOUT, read()).await?;
        if row.is_none() && create {
            let insert = "INSERT INTO stack.stacks (name, key_salt, key_iterations, key_check) VALUES ($1, '', 0, '') ON CONFLICT (name) DO NOTHING";
            self.bounded(
                db,
                "add the stack",
                QUERY_TIMEOUT,
                db.client.execute(insert, &[&self.stack]),
            )
            .await?;
            row = self.bounded(db, doing, QUERY_TIMEOUT, read()).await?;
        }
        Ok(row.map(|row| StackRow {
            id: row.get(0),
            salt: row.get(1),
            iterations: row.get(2),
            check: row.get(3),
        }))
    }

    /// The key of a stack whose state is sealed with the key `row` names;
    /// a wrong key fails here. `None` when no key was set yet (nothing of
    /// the stack was ever written).
    async fn key_of(&self, row: &StackRow) -> Result<Option<Arc<Sealer>>, PostgresError> {
        if row.check.is_empty() {
            return Ok(None);
        }
        let sealer = self.sealer(&row.salt, row.iterations).await?;
        sealer.verify(&row.check)?;
        Ok(Some(sealer))
    }

    /// Under the stack's lock: its key, or, while it holds no state (never
    /// written, or taken down), a new one from this run's secret, so a
    /// stack that is down can come back with another key.
    async fn key_for_writing(&self, db: &Db, id: i32) -> Result<Arc<Sealer>, PostgresError> {
        // Read again now the lock is held: a run that held it before may
        // have set the key since.
        let row = self
            .stack_row(db, false)
            .await?
            .ok_or_else(|| self.corrupt("the stack's row vanished".to_string()))?;
        let found = self.key_of(&row).await;
        if let Ok(Some(sealer)) = found {
            return Ok(sealer);
        }
        let stored: bool = self
            .bounded(
                db,
                "read the state",
                QUERY_TIMEOUT,
                db.client.query_one(
                    "SELECT EXISTS (SELECT 1 FROM stack.states WHERE stack_id = $1)",
                    &[&id],
                ),
            )
            .await?
            .get(0);
        match (found, stored) {
            (Err(err), true) => return Err(err),
            (Ok(_), true) => {
                return Err(self.corrupt("a state is stored, but no key for it".to_string()))
            }
            (_, false) => {}
        }
        let salt = seal::new_salt();
        let iterations = seal::ITERATIONS as i32;
        let sealer = self.sealer(&salt, iterations).await?;
        self.bounded(
            db,
            "set the stack's key",
            QUERY_TIMEOUT,
            db.client.execute(
                "UPDATE stack.stacks SET key_salt = $2, key_iterations = $3, key_check = $4 WHERE id = $1",
                &[&id, &salt.as_slice(), &iterations, &sealer.check()],
            ),
        )
        .await?;
        Ok(sealer)
    }

    /// Who holds the advisory lock of stack `id`.
    async fn held(&self, db: &Db, id: i32) -> Result<Held, PostgresError> {
        let sql = "SELECT l.pid, coalesce(a.application_name, ''), h.holder
            FROM pg_locks l
            LEFT JOIN pg_stat_activity a ON a.pid = l.pid
            LEFT JOIN stack.locks h ON h.stack_id = $3 AND h.backend_pid = l.pid
            WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
              AND l.classid = $1 AND l.objid = $2
              AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())";
        let (space, key) = (LOCK_SPACE as u32, id as u32);
        let rows = self
            .bounded(
                db,
                "find who holds the lock",
                QUERY_TIMEOUT,
                db.client.query(sql, &[&space, &key, &id]),
            )
            .await?;
        let Some(row) = rows.first() else {
            return Ok(Held::Free);
        };
        let session: i32 = row.get(0);
        let holder: Option<Value> = row.get(2);
        Ok(match holder.and_then(|h| serde_json::from_value(h).ok()) {
            Some(holder) => Held::By(holder, session),
            None => Held::Unknown(session, row.get(1)),
        })
    }

    /// The error that names who holds the lock.
    async fn locked(&self, db: &Db, id: i32) -> StateError {
        match self.held(db, id).await {
            Ok(Held::By(holder, _)) => StateError::Locked {
                location: self.location_text(),
                holder: Box::new(holder),
            },
            Ok(Held::Unknown(session, name)) => StateError::LockedUnknown {
                location: format!(
                    "{}, PostgreSQL session {session} `{name}`",
                    self.location_text()
                ),
            },
            Ok(Held::Free) => StateError::LockedUnknown {
                location: format!(
                    "{}, by a session that has just let go",
                    self.location_text()
                ),
            },
            Err(err) => err.into(),
        }
    }

    /// Takes the advisory lock of stack `id` on `db`, waiting up to `wait`.
    async fn acquire(&self, db: &Db, id: i32, wait: Duration) -> Result<(), StateError> {
        let doing = "take the stack's lock";
        let taken = if wait.is_zero() {
            self.bounded(
                db,
                doing,
                QUERY_TIMEOUT,
                db.client
                    .query_one("SELECT pg_try_advisory_lock($1, $2)", &[&LOCK_SPACE, &id]),
            )
            .await?
            .get::<_, bool>(0)
        } else {
            let millis = wait.as_millis().min(i32::MAX as u128);
            let limits = format!(
                "SET lock_timeout = {millis}; SET statement_timeout = {}",
                millis + QUERY_TIMEOUT.as_millis()
            );
            self.bounded(db, doing, QUERY_TIMEOUT, db.client.batch_execute(&limits))
                .await?;
            let waited = tokio::time::timeout(
                wait + QUERY_TIMEOUT,
                db.client
                    .execute("SELECT pg_advisory_lock($1, $2)", &[&LOCK_SPACE, &id]),
            )
            .await;
            let taken = match waited {
                Err(_) => return Err(self.failure(db, doing, None).into()),
                Ok(Ok(_)) => true,
                Ok(Err(err))
                    if matches!(
                        err.code(),
                        Some(&SqlState::LOCK_NOT_AVAILABLE | &SqlState::QUERY_CANCELED)
                    ) =>
                {
                    false
                }
                Ok(Err(err)) => return Err(self.failure(db, doing, Some(err)).into()),
            };
            let reset = format!(
                "RESET lock_timeout; SET statement_timeout = {}",
                QUERY_TIMEOUT.as_millis()
            );
            self.bounded(db, doing, QUERY_TIMEOUT, db.client.batch_execute(&reset))
                .await?;
            taken
        };
        if !taken {
            return Err(self.locked(db, id).await);
        }
        Ok(())
    }

    /// The stored state and artifacts of stack `id`, read in one snapshot.
    async fn stored(
        &self,
        db: &mut Db,
        id: i32,
        sealer: &Sealer,
    ) -> Result<(Option<State>, Vec<(Artifact, Vec<u8>)>), PostgresError> {
        let doing = "read the state";
        let location = self.target.location().to_string();
        let work = async {
            let tx = db
                .client
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await?;
            let state = tx
                .query_opt("SELECT state FROM stack.states WHERE stack_id = $1", &[&id])
                .await?;
            let artifacts = tx
                .query(
                    "SELECT name, sealed FROM stack.artifacts WHERE stack_id = $1 ORDER BY name",
                    &[&id],
                )
                .await?;
            tx.commit().await?;
            Ok((state, artifacts))
        };
        let (state, rows) = match tokio::time::timeout(QUERY_TIMEOUT, work).await {
            Err(_) => return Err(self.failure(db, doing, None)),
            Ok(Err(err)) => return Err(self.failure(db, doing, Some(err))),
            Ok(Ok(found)) => found,
        };
        let state = match state {
            Some(row) => Some(self.unseal_state(row.get(0), sealer)?),
            None => None,
        };
        let mut artifacts = Vec::new();
        for row in rows {
            let name: String = row.get(0);
            let artifact =
                Artifact::from_name(&name).ok_or_else(|| PostgresError::UnknownArtifact {
                    location: location.clone(),
                    stack: self.stack.clone(),
                    what: format!("an artifact `{name}`"),
                })?;
            let data = sealer.open(&format!("artifact {name}"), row.get(1))?;
            artifacts.push((artifact, data));
        }
        Ok((state, artifacts))
    }

    fn corrupt(&self, reason: String) -> PostgresError {
        PostgresError::Corrupt {
            location: self.target.location().to_string(),
            stack: self.stack.clone(),
            reason,
        }
    }

    /// A stored state with its records' attributes opened.
    fn unseal_state(&self, value: Value, sealer: &Sealer) -> Result<State, PostgresError> {
        let version = value
            .get("schemaVersion")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        if version > u64::from(SCHEMA_VERSION) {
            return Err(self.corrupt(format!(
                "its format is version {version}; this build of stack reads version {SCHEMA_VERSION}: use a newer stack"
            )));
        }
        let mut state = serde_json::from_value::<State>(value)
            .map_err(|e| self.corrupt(e.to_string()))?
            .with_lineage();
        if state.stack != self.stack {
            return Err(self.corrupt(format!("it is the state of stack `{}`", state.stack)));
        }
        for record in &mut state.resources {
            let what = format!("record {}", record.address);
            let Some(sealed) = record.attrs.as_str() else {
                return Err(SealError::NotSealed {
                    stack: self.stack.clone(),
                    what,
                }
                .into());
            };
            let plain = sealer.open(&what, sealed)?;
            record.attrs =
                serde_json::from_slice(&plain).map_err(|e| self.corrupt(format!("{what}: {e}")))?;
        }
        Ok(state)
    }

    /// The state as stored: every record's attributes sealed.
    fn sealed_state(state: &State, sealer: &Sealer) -> Value {
        let mut sealed = state.clone();
        for record in &mut sealed.resources {
            let plain = serde_json::to_vec(&record.attrs).expect("attributes serialise");
            record.attrs =
                Value::String(sealer.seal(&format!("record {}", record.address), &plain));
        }
        serde_json::to_value(&sealed).expect("a state serialises")
    }

    async fn lock_now(
        &self,
        holder: LockHolder,
        wait: Duration,
    ) -> Result<PostgresLock, StateError> {
        let mut db = self.open_db(&holder).await?;
        let id = self
            .stack_row(&db, true)
            .await?
            .ok_or_else(|| self.corrupt("the stack's row vanished".to_string()))?
            .id;
        self.acquire(&db, id, wait).await?;
        let sealer = self.key_for_writing(&db, id).await?;
        let holder = holder.from_now();
        let record = "INSERT INTO stack.locks (stack_id, backend_pid, holder) VALUES ($1, pg_backend_pid(), $2)
            ON CONFLICT (stack_id) DO UPDATE SET backend_pid = EXCLUDED.backend_pid, holder = EXCLUDED.holder, since = now()";
        let named = serde_json::to_value(&holder).expect("a holder serialises");
        self.bounded(
            &db,
            "say who holds the lock",
            QUERY_TIMEOUT,
            db.client.execute(record, &[&id, &named]),
        )
        .await?;
        let (state, artifacts) = self.stored(&mut db, id, &sealer).await?;
        if state.is_some() {
            self.artifacts.replace_all(&artifacts)?;
        }
        let kept = artifacts
            .iter()
            .map(|(artifact, data)| (artifact.name(), sha256_hex(data)))
            .collect();
        Ok(PostgresLock {
            current: state.unwrap_or_else(|| State::new(&self.stack, &self.provider)),
            location: self.location_text(),
            database: self.target.location().to_string(),
            stack: self.stack.clone(),
            artifacts: self.artifacts.clone(),
            db,
            id,
            sealer,
            holder,
            kept,
            writing: false,
        })
    }

    /// A session for a command that does not lock: `None` when nothing of
    /// the stack was ever written.
    async fn reader(&self) -> Result<Option<(Db, i32, Arc<Sealer>)>, PostgresError> {
        let holder = LockHolder::this_process("stack (reading the state)");
        let db = self.open_db(&holder).await?;
        let Some(row) = self.stack_row(&db, false).await? else {
            return Ok(None);
        };
        Ok(self.key_of(&row).await?.map(|sealer| (db, row.id, sealer)))
    }
}

impl StateBackend for PostgresBackend {
    fn location(&self) -> String {
        self.location_text()
    }

    fn read(&self) -> BoxFuture<'_, Result<Option<State>, StateError>> {
        Box::pin(async move {
            let Some((mut db, id, sealer)) = self.reader().await? else {
                return Ok(None);
            };
            let (state, artifacts) = self.stored(&mut db, id, &sealer).await?;
            if state.is_some() {
                // Without the lock: a run that holds it may have made
                // files it has not saved yet, so nothing here is removed
                // or replaced.
                self.artifacts.fill_missing(&artifacts)?;
            }
            Ok(state)
        })
    }

    fn lock(
        &self,
        holder: LockHolder,
        wait: Duration,
    ) -> BoxFuture<'_, Result<Box<dyn StateLock>, StateError>> {
        Box::pin(
            async move { Ok(Box::new(self.lock_now(holder, wait).await?) as Box<dyn StateLock>) },
        )
    }

    fn history(&self) -> BoxFuture<'_, Result<Vec<HistoryEntry>, StateError>> {
        Box::pin(async move {
            let Some((db, id, _)) = self.reader().await? else {
                return Ok(Vec::new());
            };
            let sql = "SELECT serial, lineage, who, pid, command,
                    to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')
                FROM stack.history WHERE stack_id = $1 ORDER BY id";
            let rows = self
                .bounded(
                    &db,
                    "read the history",
                    QUERY_TIMEOUT,
                    db.client.query(sql, &[&id]),
                )
                .await?;
            Ok(rows
                .iter()
                .map(|row| HistoryEntry {
                    serial: row.get::<_, i64>(0) as u64,
                    lineage: row.get(1),
                    who: row.get(2),
                    pid: row.get::<_, i32>(3) as u32,
                    command: row.get(4),
                    at: row.get(5),
                })
                .collect())
        })
    }

    fn holder(&self) -> BoxFuture<'_, Result<Option<LockHolder>, StateError>> {
        Box::pin(async move {
            let Some((db, id, _)) = self.reader().await? else {
                return Ok(None);
            };
            match self.held(&db, id).await? {
                Held::Free => Ok(None),
                Held::By(holder, _) => Ok(Some(holder)),
                Held::Unknown(session, name) => Err(StateError::LockedUnknown {
                    location: format!(
                        "{}, PostgreSQL session {session} `{name}`",
                        self.location_text()
                    ),
                }),
            }
        })
    }

    fn unlock<'a>(&'a self, holder: &'a LockHolder) -> BoxFuture<'a, Result<(), StateError>> {
        Box::pin(async move {
            let Some((db, id, _)) = self.reader().await? else {
                return Ok(());
            };
            let session = match self.held(&db, id).await? {
                Held::Free => return Ok(()),
                Held::By(current, session) if current == *holder => session,
                _ => {
                    return Err(StateError::HolderChanged {
                        location: self.location_text(),
                        holder: Box::new(holder.clone()),
                    })
                }
            };
            let doing = "end the session that holds the lock";
            self.bounded(
                &db,
                doing,
                QUERY_TIMEOUT,
                db.client
                    .execute("SELECT pg_terminate_backend($1)", &[&session]),
            )
            .await?;
            // The server lets the lock go as the session ends.
            let deadline = tokio::time::Instant::now() + QUERY_TIMEOUT;
            while !matches!(self.held(&db, id).await?, Held::Free) {
                if tokio::time::Instant::now() >= deadline {
                    return Err(PostgresError::Timeout {
                        location: self.target.location().to_string(),
                        stack: self.stack.clone(),
                        doing,
                    }
                    .into());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(())
        })
    }

    fn artifact_digests(&self) -> BoxFuture<'_, Result<BTreeMap<String, String>, StateError>> {
        Box::pin(async move {
            let Some((mut db, id, sealer)) = self.reader().await? else {
                return Ok(BTreeMap::new());
            };
            let (_, artifacts) = self.stored(&mut db, id, &sealer).await?;
            Ok(artifacts
                .iter()
                .map(|(artifact, data)| (artifact.name(), sha256_hex(data)))
                .collect())
        })
    }
}

/// The state of a stack while its advisory lock is held: holding a value
/// of this type means holding the lock's session.
struct PostgresLock {
    /// The state's location, for messages.
    location: String,
    /// The database's, for messages.
    database: String,
    stack: String,
    artifacts: Artifacts,
    db: Db,
    id: i32,
    sealer: Arc<Sealer>,
    holder: LockHolder,
    /// The state as last read or written.
    current: State,
    /// The artifacts as stored: their sha256 by name.
    kept: BTreeMap<String, String>,
    /// A write is under way: still set after one that was dropped midway,
    /// whose outcome is not known.
    writing: bool,
}

/// What a write found stored.
enum Written {
    Done,
    /// The serial stored, when it is not the one expected.
    Moved(Option<i64>),
}

impl PostgresLock {
    fn failure(&self, doing: &'static str, err: Option<tokio_postgres::Error>) -> PostgresError {
        failure(&self.database, &self.stack, &self.db, doing, err)
    }

    /// Writes `state` as its next serial in one transaction with its
    /// history row and the artifacts that changed; `import`: only where
    /// no state is stored, else only over the serial `state` carries.
    async fn write(&mut self, state: &mut State, import: bool) -> Result<(), StateError> {
        let (location, stack) = (self.database.clone(), self.stack.clone());
        if self.writing {
            return Err(PostgresError::Interrupted { location, stack }.into());
        }
        if let Some(why) = self.db.ended() {
            return Err(PostgresError::Lost {
                location,
                stack,
                doing: "write the state",
                why,
            }
            .into());
        }
        let artifacts: Vec<(String, Vec<u8>)> = self
            .artifacts
            .read_all()?
            .into_iter()
            .map(|(artifact, data)| (artifact.name(), data))
            .collect();
        let now: BTreeMap<String, String> = artifacts
            .iter()
            .map(|(name, data)| (name.clone(), sha256_hex(data)))
            .collect();
        let changed: Vec<(String, String)> = artifacts
            .iter()
            .filter(|(name, _)| self.kept.get(name) != now.get(name))
            .map(|(name, data)| {
                (
                    name.clone(),
                    self.sealer.seal(&format!("artifact {name}"), data),
                )
            })
            .collect();
        let gone: Vec<String> = self
            .kept
            .keys()
            .filter(|name| !now.contains_key(*name))
            .cloned()
            .collect();
        let mut next = state.clone();
        next.serial += 1;
        let sealed = PostgresBackend::sealed_state(&next, &self.sealer);
        let (id, expected) = (self.id, state.serial as i64);
        let serial = next.serial as i64;
        let holder = &self.holder;
        let updated_by = format!("{} pid {}", holder.who(), holder.pid);
        let (who, pid) = (holder.who(), holder.pid as i32);
        let client = &mut self.db.client;
        let work = async {
            let tx = client.transaction().await?;
            let stored: Option<i64> = tx
                .query_opt(
                    "SELECT serial FROM stack.states WHERE stack_id = $1 FOR UPDATE",
                    &[&id],
                )
                .await?
                .map(|row| row.get(0));
            let follows = match import {
                true => stored.is_none(),
                false => stored.unwrap_or(0) == expected,
            };
            if !follows {
                return Ok(Written::Moved(stored));
            }
            tx.execute(
                "INSERT INTO stack.states (stack_id, serial, lineage, state, updated_by) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (stack_id) DO UPDATE SET serial = EXCLUDED.serial, lineage = EXCLUDED.lineage,
                     state = EXCLUDED.state, updated_at = now(), updated_by = EXCLUDED.updated_by",
                &[&id, &serial, &next.lineage, &sealed, &updated_by],
            )
            .await?;
            tx.execute(
                "INSERT INTO stack.history (stack_id, lineage, serial, state, who, pid, command) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[&id, &next.lineage, &serial, &sealed, &who, &pid, &holder.command],
            )
            .await?;
            for (name, sealed) in &changed {
                tx.execute(
                    "INSERT INTO stack.artifacts (stack_id, name, sealed) VALUES ($1, $2, $3)
                     ON CONFLICT (stack_id, name) DO UPDATE SET sealed = EXCLUDED.sealed, updated_at = now()",
                    &[&id, name, sealed],
                )
                .await?;
            }
            for name in &gone {
                tx.execute(
                    "DELETE FROM stack.artifacts WHERE stack_id = $1 AND name = $2",
                    &[&id, name],
                )
                .await?;
            }
            tx.commit().await?;
            Ok(Written::Done)
        };
        self.writing = true;
        let outcome = tokio::time::timeout(QUERY_TIMEOUT, work).await;
        let written = match outcome {
            // Dropped midway: whether the commit reached the server is not known.
            Err(_) => return Err(self.failure("write the state", None).into()),
            Ok(Err(err)) => {
                // The transaction is rolled back: nothing of it was written.
                self.writing = false;
                return Err(self.failure("write the state", Some(err)).into());
            }
            Ok(Ok(written)) => written,
        };
        self.writing = false;
        match written {
            Written::Moved(Some(stored)) if import => Err(StateError::NotEmpty {
                location: self.location.clone(),
                stack: self.stack.clone(),
                serial: stored as u64,
            }),
            Written::Moved(stored) => Err(StateError::SerialMoved {
                location: self.location.clone(),
                expected: state.serial,
                stored: stored.unwrap_or(0) as u64,
            }),
            Written::Done => {
                self.kept = now;
                state.serial = next.serial;
                self.current = next;
                Ok(())
            }
        }
    }
}

impl StateLock for PostgresLock {
    fn location(&self) -> String {
        self.location.clone()
    }

    fn load(&self) -> BoxFuture<'_, Result<State, StateError>> {
        Box::pin(async move { Ok(self.current.clone()) })
    }

    fn save<'a>(&'a mut self, state: &'a mut State) -> BoxFuture<'a, Result<(), StateError>> {
        Box::pin(async move { self.write(state, false).await })
    }

    fn import<'a>(&'a mut self, state: &'a mut State) -> BoxFuture<'a, Result<(), StateError>> {
        Box::pin(async move { self.write(state, true).await })
    }

    fn remove(mut self: Box<Self>) -> BoxFuture<'static, Result<(), StateError>> {
        Box::pin(async move {
            let id = self.id;
            let client = &mut self.db.client;
            let work = async {
                let tx = client.transaction().await?;
                for table in ["artifacts", "states", "locks"] {
                    tx.execute(
                        &format!("DELETE FROM stack.{table} WHERE stack_id = $1"),
                        &[&id],
                    )
                    .await?;
                }
                tx.commit().await
            };
            match tokio::time::timeout(QUERY_TIMEOUT, work).await {
                Err(_) => Err(self.failure("remove the state", None).into()),
                Ok(Err(err)) => Err(self.failure("remove the state", Some(err)).into()),
                Ok(Ok(())) => Ok(()),
            }
        })
    }
}
