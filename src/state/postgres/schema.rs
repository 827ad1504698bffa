//! The state database's tables, made and moved forward by `stack` itself:
//! numbered migrations, each applied in a transaction of its own that
//! first takes a transaction-level advisory lock, so two first runs at the
//! same time apply each migration once; `stack.migrations` records which
//! are applied. A database at a newer version than this build knows is
//! refused before anything is read or written.
//!
//! Everything lives in the schema `stack`:
//! - `stacks`: one row per stack name, never removed: its id (the key of
//!   its advisory lock), the salt and round count its secrets are sealed
//!   with, and a value sealed with its key (tells a wrong key at once;
//!   empty until the first write, and set anew by a run that finds no
//!   state stored, so a stack that is down may come back with another key);
//! - `states`: the state of a stack as JSONB (records' attributes sealed),
//!   its serial and lineage, when and by whom it was written; removed by a
//!   `down` that leaves nothing;
//! - `history`: every serial ever written, with its state, who wrote it
//!   (user@host and pid), when and with which command; kept;
//! - `artifacts`: the stack's files, sealed, by name; removed with the state;
//! - `locks`: who holds a stack's lock, by the server session that holds it
//!   (a row whose session is gone says nothing).

use tokio_postgres::Client;

/// The first key of every advisory lock of `stack` ("stk1"); the second is
/// a stack's id, or 0 for migrations (ids start at 1).
pub const LOCK_SPACE: i32 = 0x7374_6b31;
/// The schema version this build reads and writes.
pub const LATEST: i32 = 1;

const MIGRATIONS: &[(i32, &str, &str)] = &[(
    1,
    "stacks, states, history, artifacts and locks",
    "CREATE TABLE stack.stacks (
        id serial PRIMARY KEY,
        name text NOT NULL UNIQUE,
        key_salt bytea NOT NULL,
        key_iterations integer NOT NULL,
        key_check text NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE stack.states (
        stack_id integer PRIMARY KEY REFERENCES stack.stacks (id),
        serial bigint NOT NULL CHECK (serial > 0),
        lineage text NOT NULL,
        state jsonb NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT now(),
        updated_by text NOT NULL
    );
    CREATE TABLE stack.history (
        id bigserial PRIMARY KEY,
        stack_id integer NOT NULL REFERENCES stack.stacks (id),
        lineage text NOT NULL,
        serial bigint NOT NULL,
        state jsonb NOT NULL,
        who text NOT NULL,
        pid integer NOT NULL,
        command text NOT NULL,
        at timestamptz NOT NULL DEFAULT now(),
        UNIQUE (stack_id, lineage, serial)
    );
    CREATE TABLE stack.artifacts (
        stack_id integer NOT NULL REFERENCES stack.stacks (id),
        name text NOT NULL,
        sealed text NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (stack_id, name)
    );
    CREATE TABLE stack.locks (
        stack_id integer PRIMARY KEY REFERENCES stack.stacks (id),
        backend_pid integer NOT NULL,
        holder jsonb NOT NULL,
        since timestamptz NOT NULL DEFAULT now()
    );",
)];

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("the state database {location} has schema version {found}; this build of stack knows versions up to {LATEST}: use a newer stack")]
    Newer { location: String, found: i32 },
    #[error("cannot {doing} of the state database {location}")]
    Query {
        location: String,
        doing: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

/// The version the database is at: 0 before the first migration.
async fn version(
    client: &impl tokio_postgres::GenericClient,
) -> Result<i32, tokio_postgres::Error> {
    let exists: bool = client
        .query_one("SELECT to_regclass('stack.migrations') IS NOT NULL", &[])
        .await?
        .get(0);
    if !exists {
        return Ok(0);
    }
    client
        .query_one(
            "SELECT coalesce(max(version), 0) FROM stack.migrations",
            &[],
        )
        .await
        .map(|row| row.get(0))
}

/// Brings the database to [`LATEST`]; `applied_by` is recorded with each
/// migration. A database at a newer version is refused.
pub async fn migrate(
    client: &mut Client,
    location: &str,
    applied_by: &str,
) -> Result<(), SchemaError> {
    let failed = |doing: String| {
        move |source| SchemaError::Query {
            location: location.to_string(),
            doing,
            source,
        }
    };
    let newer = |found| SchemaError::Newer {
        location: location.to_string(),
        found,
    };
    let current = version(&*client)
        .await
        .map_err(failed("read the schema version".into()))?;
    if current > LATEST {
        return Err(newer(current));
    }
    for (number, name, sql) in MIGRATIONS.iter().filter(|(n, _, _)| *n > current) {
        let doing = format!("apply migration {number} ({name})");
        let tx = client.transaction().await.map_err(failed(doing.clone()))?;
        tx.execute("SELECT pg_advisory_xact_lock($1, 0)", &[&LOCK_SPACE])
            .await
            .map_err(failed(doing.clone()))?;
        tx.batch_execute(
            "CREATE SCHEMA IF NOT EXISTS stack;
             CREATE TABLE IF NOT EXISTS stack.migrations (
                 version integer PRIMARY KEY,
                 name text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now(),
                 applied_by text NOT NULL
             );",
        )
        .await
        .map_err(failed(doing.clone()))?;
        // Another run may have applied it while this one waited.
        let now = version(&tx).await.map_err(failed(doing.clone()))?;
        if now > LATEST {
            return Err(newer(now));
        }
        if now < *number {
            tx.batch_execute(sql).await.map_err(failed(doing.clone()))?;
            tx.execute(
                "INSERT INTO stack.migrations (version, name, applied_by) VALUES ($1, $2, $3)",
                &[number, name, &applied_by],
            )
            .await
            .map_err(failed(doing.clone()))?;
        }
        tx.commit().await.map_err(failed(doing))?;
    }
    Ok(())
}
