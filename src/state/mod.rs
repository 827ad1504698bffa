//! What `stack` last applied, kept so that plans can tell drift from intent
//! and an interrupted run can resume.
//!
//! State sits behind [`StateBackend`]: an explicit lock held for a whole run
//! and a compare-and-swap on the serial, so a writer that lost track of the
//! stored state (a second handle, a restored copy) fails instead of
//! overwriting it. The default backend is a local file next to the stack
//! (`local`); the one for teams is a PostgreSQL database (`postgres`), which
//! keeps the stack's artifacts with the state, sealed (`seal`). Which one a
//! stack uses is decided here, once ([`Place`]); `migrate` moves a state
//! and its artifacts from one to the other.

mod local;
mod postgres;
mod seal;
mod store;

use std::time::Duration;

pub use local::LocalBackend;
use postgres::PostgresBackend;
pub use store::*;

use crate::artifacts::Artifacts;
use crate::model::{Stack, StateSettings};

/// The environment variable that puts a stack's state in PostgreSQL, over
/// what the stack file says.
pub const URL_ENV: &str = "STACK_STATE_URL";

/// Where a stack's state is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// `.stack/NAME.state.json` next to the stack file.
    Local,
    /// A PostgreSQL database; `from_env`: the URL is `STACK_STATE_URL`'s,
    /// which may carry the password (a stack file's never does).
    Postgres { url: String, from_env: bool },
}

#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    #[error("`{0}` is neither `local` nor a postgres:// URL")]
    Unknown(String),
    #[error("the state of stack {0} is already kept there")]
    Same(String),
    #[error("moved the state of stack {stack}, but the copy at {location} differs from the original ({what}); the original was left in place")]
    Differs {
        stack: String,
        location: String,
        what: String,
    },
    #[error("stack {stack} has no state at {location}: nothing to move")]
    Nothing { stack: String, location: String },
    #[error("cannot read the state file {}", path.display())]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a state file: {reason}", path.display())]
    NotState {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("{} is the state of stack `{found}`, not of `{expected}`", path.display())]
    OtherStack {
        path: std::path::PathBuf,
        found: String,
        expected: String,
    },
    #[error("{} is of lineage {pushed}, the stored state of lineage {stored}: it is another state of the stack (--force writes it anyway)", path.display())]
    Lineage {
        path: std::path::PathBuf,
        pushed: String,
        stored: String,
    },
    #[error("{} is at serial {pushed}, the stored state at serial {stored}: pull the state again and make the change on that (--force writes it anyway)", path.display())]
    Serial {
        path: std::path::PathBuf,
        pushed: u64,
        stored: u64,
    },
    #[error(transparent)]
    State(#[from] StateError),
}

impl Place {
    /// Where `stack`'s state is: `STACK_STATE_URL` when set, else its file's `state:`.
    pub fn of(stack: &Stack) -> Place {
        if let Some(url) = std::env::var(URL_ENV).ok().filter(|u| !u.is_empty()) {
            return Place::Postgres {
                url,
                from_env: true,
            };
        }
        match &stack.state {
            StateSettings::Local => Place::Local,
            StateSettings::Postgres { url } => Place::Postgres {
                url: url.clone(),
                from_env: false,
            },
        }
    }

    /// `local`, or a URL given on the command line (no password in it).
    pub fn parse(text: &str) -> Result<Place, MoveError> {
        if text == "local" {
            return Ok(Place::Local);
        }
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            return Ok(Place::Postgres {
                url: text.to_string(),
                from_env: false,
            });
        }
        Err(MoveError::Unknown(text.to_string()))
    }

    /// The backend there for `stack`, whose artifacts are `artifacts`.
    pub async fn backend(
        &self,
        stack: &Stack,
        artifacts: &Artifacts,
    ) -> Result<Box<dyn StateBackend>, StateError> {
        let provider = stack.provider_name();
        Ok(match self {
            Place::Local => Box::new(LocalBackend::new(&stack.state_dir(), &stack.name, provider)),
            Place::Postgres { url, from_env } => Box::new(
                PostgresBackend::new(url, *from_env, &stack.name, provider, artifacts).await?,
            ),
        })
    }
}

/// A state file, as `stack state pull` prints it.
pub fn read_state_file(path: &std::path::Path) -> Result<State, MoveError> {
    let text = std::fs::read_to_string(path).map_err(|source| MoveError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let state = serde_json::from_str::<State>(&text)
        .map_err(|e| MoveError::NotState {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?
        .with_lineage();
    if state.schema_version > SCHEMA_VERSION {
        return Err(MoveError::NotState {
            path: path.to_path_buf(),
            reason: format!(
                "its format is version {}; this build of stack reads version {SCHEMA_VERSION}",
                state.schema_version
            ),
        });
    }
    Ok(state)
}

/// Writes `pushed` (read from `path`) as the next serial of `stack`'s
/// state: refused, unless `force`, when it is not of the stored lineage
/// or not at the stored serial. The new serial.
pub async fn push(
    stack: &Stack,
    backend: &dyn StateBackend,
    path: &std::path::Path,
    pushed: State,
    force: bool,
    holder: &LockHolder,
    wait: Duration,
) -> Result<u64, MoveError> {
    if pushed.stack != stack.name {
        return Err(MoveError::OtherStack {
            path: path.to_path_buf(),
            found: pushed.stack,
            expected: stack.name.clone(),
        });
    }
    let mut lock = backend.lock(holder.clone(), wait).await?;
    let stored = lock.load().await?;
    if !force && stored.serial > 0 && pushed.lineage != stored.lineage {
        return Err(MoveError::Lineage {
            path: path.to_path_buf(),
            pushed: pushed.lineage,
            stored: stored.lineage,
        });
    }
    if !force && pushed.serial != stored.serial {
        return Err(MoveError::Serial {
            path: path.to_path_buf(),
            pushed: pushed.serial,
            stored: stored.serial,
        });
    }
    let mut next = State {
        serial: stored.serial,
        ..pushed
    };
    lock.save(&mut next).await?;
    Ok(next.serial)
}

/// What a migration moved.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Moved {
    pub from: String,
    pub to: String,
    pub serial: u64,
    pub lineage: String,
    pub resources: usize,
    pub artifacts: Vec<String>,
}

/// Moves the state of `stack` and its artifacts from `from` to `to`: both
/// locked (waiting up to `wait`), the state written to `to` with its
/// lineage, read back and compared, and only then removed from `from`.
pub async fn migrate(
    stack: &Stack,
    from: &dyn StateBackend,
    to: &dyn StateBackend,
    holder: &LockHolder,
    wait: Duration,
) -> Result<Moved, MoveError> {
    let source = from.lock(holder.clone(), wait).await?;
    let state = source.load().await?;
    if state.serial == 0 {
        return Err(MoveError::Nothing {
            stack: stack.name.clone(),
            location: from.location(),
        });
    }
    let artifacts = from.artifact_digests().await?;
    let mut target = to.lock(holder.clone(), wait).await?;
    let mut moved = state.clone();
    target.import(&mut moved).await?;
    let differs = |what: String| MoveError::Differs {
        stack: stack.name.clone(),
        location: to.location(),
        what,
    };
    let copy = to
        .read()
        .await?
        .ok_or_else(|| differs("no state was read back".to_string()))?;
    if copy != moved {
        return Err(differs(
            "the state read back is not the one written".to_string(),
        ));
    }
    let copied = to.artifact_digests().await?;
    if copied != artifacts {
        return Err(differs(format!(
            "artifacts {:?} were written, {:?} read back",
            artifacts.keys().collect::<Vec<_>>(),
            copied.keys().collect::<Vec<_>>()
        )));
    }
    source.remove().await?;
    drop(target);
    Ok(Moved {
        from: from.location(),
        to: to.location(),
        serial: moved.serial,
        lineage: moved.lineage,
        resources: moved.resources.len(),
        artifacts: artifacts.into_keys().collect(),
    })
}
