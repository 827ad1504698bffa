//! Reaching the state database: the URL read as libpq reads it (with
//! `sslmode` and `sslrootcert` handled here), the password from the URL
//! only when the URL came from the environment, else `PGPASSWORD` or the
//! password file, TLS, keepalives, and bounds on the connect and on every
//! statement, so no wait of `stack` on the database is unbounded. A
//! connection is one task; dropping it ends the task and so the server's
//! session, with any lock it holds.

use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_postgres::config::Host;
use tokio_postgres::Client;

use super::pgpass::{self, Found, PgpassError, Wanted};
use super::tls::{Mode, Roots, Tls, TlsError};

/// How long a connection (TCP, TLS, authentication) may take, unless the
/// URL's `connect_timeout` says otherwise.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long one statement, or one transaction of a few, may take.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("the state database URL is not one PostgreSQL reads ({reason}); it looks like postgres://USER@HOST:PORT/DATABASE")]
    Url { reason: String },
    #[error("the state database URL of the stack file has a password: keep it in PGPASSWORD or ~/.pgpass")]
    PasswordInFile,
    #[error("the state database URL names no user, and neither PGUSER nor USER is set")]
    NoUser,
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Pgpass(#[from] PgpassError),
    #[error("cannot connect to the state database {location}{}", note.as_deref().map(|n| format!(" ({n})")).unwrap_or_default())]
    Connect {
        location: String,
        note: Option<String>,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("cannot connect to the state database {location}: no answer within {seconds} s")]
    Timeout { location: String, seconds: u64 },
}

/// A state database as a URL names it.
#[derive(Debug, Clone)]
pub struct Target {
    config: tokio_postgres::Config,
    tls: Tls,
    location: String,
    /// Why no password was found, for the error when one is asked for.
    note: Option<String>,
}

/// `%XX` decoded.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Target {
    /// The database `url` names. `from_env`: the URL came from
    /// `STACK_STATE_URL`, which may carry the password.
    pub fn parse(url: &str, from_env: bool) -> Result<Target, ConnectError> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(ConnectError::Url {
                reason: "it does not start with postgres://".to_string(),
            });
        }
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut tls = Tls {
            mode: Mode::Prefer,
            roots: None,
        };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "sslmode" => tls.mode = Mode::parse(&percent_decode(value))?,
                "sslrootcert" => tls.roots = Some(Roots::parse(&percent_decode(value))),
                _ => kept.push(pair),
            }
        }
        let rest = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        let mut config =
            tokio_postgres::Config::from_str(&rest).map_err(|err| ConnectError::Url {
                reason: crate::error_chain::error_chain(&err),
            })?;
        if config.get_password().is_some() && !from_env {
            return Err(ConnectError::PasswordInFile);
        }
        if config.get_user().is_none() {
            let user = ["PGUSER", "USER", "LOGNAME"]
                .iter()
                .find_map(|v| std::env::var(v).ok().filter(|u| !u.is_empty()))
                .ok_or(ConnectError::NoUser)?;
            config.user(user);
        }
        let user = config.get_user().unwrap_or_default().to_string();
        let database = config.get_dbname().unwrap_or(&user).to_string();
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let host = match config.get_hosts().first() {
            Some(Host::Tcp(host)) => host.clone(),
            Some(Host::Unix(path)) => path.display().to_string(),
            None => "localhost".to_string(),
        };
        let location = format!("postgres://{user}@{host}:{port}/{database}");
        let mut note = None;
        if config.get_password().is_none() {
            if let Some(password) = std::env::var_os("PGPASSWORD").filter(|p| !p.is_empty()) {
                config.password(password.as_encoded_bytes());
            } else if let Some(file) = pgpass::path() {
                let matched_host = match config.get_hosts().first() {
                    Some(Host::Tcp(host)) => host.as_str(),
                    _ => "localhost",
                };
                let wanted = Wanted {
                    host: matched_host,
                    port,
                    database: &database,
                    user: &user,
                };
                match pgpass::lookup(&file, &wanted)? {
                    Found::Password(password) => {
                        config.password(password);
                    }
                    Found::Nothing => {
                        note = Some(format!(
                            "no password: not in PGPASSWORD nor in {}",
                            file.display()
                        ))
                    }
                    Found::Ignored { path, mode } => {
                        note = Some(format!(
                            "{} was ignored: its mode is {mode:04o}, and libpq and stack read it only at 0600",
                            path.display()
                        ))
                    }
                }
            }
        }
        config
            .ssl_mode(tls.mode.negotiation())
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(30))
            .tcp_user_timeout(Duration::from_secs(60));
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        Ok(Target {
            config,
            tls,
            location,
            note,
        })
    }

    /// The database for messages: no password, ever.
    pub fn location(&self) -> &str {
        &self.location
    }

    /// A new session, named `application_name` in `pg_stat_activity`, with
    /// the server's own bounds on statements set.
    pub async fn connect(&self, application_name: &str) -> Result<Db, ConnectError> {
        let mut config = self.config.clone();
        let name: String = application_name.chars().take(63).collect();
        config.application_name(name);
        let connector = self.tls.connector()?;
        let failed = |source| ConnectError::Connect {
            location: self.location.clone(),
            note: self.note.clone(),
            source,
        };
        let limit = config
            .get_connect_timeout()
            .copied()
            .unwrap_or(CONNECT_TIMEOUT);
        let (client, connection) = tokio::time::timeout(limit, config.connect(connector))
            .await
            .map_err(|_| ConnectError::Timeout {
                location: self.location.clone(),
                seconds: limit.as_secs(),
            })?
            .map_err(failed)?;
        let ended = Arc::new(Mutex::new(None));
        let slot = ended.clone();
        let task = tokio::spawn(async move {
            let why = match connection.await {
                Ok(()) => "the server closed the connection".to_string(),
                Err(err) => crate::error_chain::error_chain(&err),
            };
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
        });
        let db = Db {
            client,
            task,
            ended,
        };
        let settings = async {
            let version: i32 = db
                .client
                .query_one("SELECT current_setting('server_version_num')::int", &[])
                .await?
                .get(0);
            // The server's own keepalives on this session: a client
            // machine that vanished lets its lock go within about a minute.
            let mut sql = format!(
                "SET statement_timeout = {}; SET idle_in_transaction_session_timeout = {};
                 SET tcp_keepalives_idle = 30; SET tcp_keepalives_interval = 10; SET tcp_keepalives_count = 3;",
                QUERY_TIMEOUT.as_millis(),
                2 * QUERY_TIMEOUT.as_millis()
            );
            if version >= 120000 {
                sql.push_str("SET tcp_user_timeout = 60000;");
            }
            if version >= 140000 {
                // A held lock's session is idle for as long as a run
                // waits on its machines; a waiter whose client is gone
                // leaves the queue within a second.
                sql.push_str(
                    "SET idle_session_timeout = 0; SET client_connection_check_interval = 1000;",
                );
            }
            db.client.batch_execute(&sql).await
        };
        tokio::time::timeout(QUERY_TIMEOUT, settings)
            .await
            .map_err(|_| ConnectError::Timeout {
                location: self.location.clone(),
                seconds: QUERY_TIMEOUT.as_secs(),
            })?
            .map_err(failed)?;
        Ok(db)
    }
}

/// One session with the state database.
pub struct Db {
    pub client: Client,
    task: tokio::task::JoinHandle<()>,
    ended: Arc<Mutex<Option<String>>>,
}

impl Db {
    /// Why the connection ended, once it has.
    pub fn ended(&self) -> Option<String> {
        self.ended.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_location_never_shows_a_password_and_tls_parameters_are_read_here() {
        let target = Target::parse(
            "postgres://stack:s3cret@db.example.com:6543/state?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&connect_timeout=5",
            true,
        )
        .unwrap();
        assert_eq!(
            target.location(),
            "postgres://stack@db.example.com:6543/state"
        );
        assert_eq!(target.tls.mode, Mode::VerifyFull);
        assert_eq!(
            target.tls.roots,
            Some(Roots::File(std::path::PathBuf::from("/etc/ca.pem")))
        );
        assert_eq!(
            target.config.get_connect_timeout(),
            Some(&Duration::from_secs(5))
        );
        assert!(!format!("{target:?}").contains("s3cret"));
    }

    #[test]
    fn a_password_is_taken_only_from_the_environment_and_bad_urls_are_named() {
        let err = Target::parse("postgres://stack:s3cret@db/state", false).unwrap_err();
        assert!(matches!(err, ConnectError::PasswordInFile), "{err}");
        let err = Target::parse("postgres://stack@db/state?sslmode=allow", true).unwrap_err();
        assert!(err.to_string().contains("sslmode=allow"), "{err}");
        let err = Target::parse("mysql://stack@db/state", true).unwrap_err();
        assert!(matches!(err, ConnectError::Url { .. }), "{err}");
        let err = Target::parse("postgres://stack@db/state?nonsense=1", true).unwrap_err();
        assert!(err.to_string().contains("nonsense"), "{err}");
    }
}
