//! The password file libpq reads (`~/.pgpass`, or `PGPASSFILE`), read the
//! way libpq reads it, so the state database's password sits where
//! PostgreSQL users keep it and never in the stack file: lines
//! `host:port:database:username:password`, `*` matching anything, `\:` and
//! `\\` escaping, `#` starting a comment, the first matching line winning,
//! and the file ignored unless only its owner may read it (mode 0600).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("cannot read the password file {}", path.display())]
pub struct PgpassError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// What the server is asked for: the fields a line is matched against.
pub struct Wanted<'a> {
    pub host: &'a str,
    pub port: u16,
    pub database: &'a str,
    pub user: &'a str,
}

/// What a look-up found.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    Password(String),
    /// No file, or no line for this server.
    Nothing,
    /// The file is there but readable by others, so it was ignored.
    Ignored {
        path: PathBuf,
        mode: u32,
    },
}

/// The password file in force: `PGPASSFILE`, else `~/.pgpass`.
pub fn path() -> Option<PathBuf> {
    match std::env::var_os("PGPASSFILE") {
        Some(file) if !file.is_empty() => Some(PathBuf::from(file)),
        _ => std::env::var_os("HOME").map(|home| Path::new(&home).join(".pgpass")),
    }
}

/// The password the file at `path` gives for `wanted`.
pub fn lookup(path: &Path, wanted: &Wanted) -> Result<Found, PgpassError> {
    let failed = |source| PgpassError {
        path: path.to_path_buf(),
        source,
    };
    let metadata = match std::fs::metadata(path) {
        Ok(metadata) => metadata,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Found::Nothing),
        Err(err) => return Err(failed(err)),
    };
    if !metadata.is_file() {
        return Ok(Found::Nothing);
    }
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Ok(Found::Ignored {
            path: path.to_path_buf(),
            mode,
        });
    }
    let text = std::fs::read_to_string(path).map_err(failed)?;
    let port = wanted.port.to_string();
    let asked = [wanted.host, port.as_str(), wanted.database, wanted.user];
    for line in text.lines() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let Some(fields) = fields(line) else { continue };
        let matches = fields[..4]
            .iter()
            .zip(asked)
            .all(|(field, asked)| field == "*" || field == asked);
        if matches {
            return Ok(Found::Password(fields[4].clone()));
        }
    }
    Ok(Found::Nothing)
}

/// A line's five fields, unescaped; `None` for a line with fewer (libpq
/// skips those). The password is the rest of the line.
fn fields(line: &str) -> Option<[String; 5]> {
    let mut fields: Vec<String> = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(next) = chars.next() {
                    fields.last_mut()?.push(next);
                }
            }
            ':' if fields.len() < 5 => fields.push(String::new()),
            c => fields.last_mut()?.push(c),
        }
    }
    fields.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str, mode: u32) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), text).unwrap();
        std::fs::set_permissions(file.path(), std::fs::Permissions::from_mode(mode)).unwrap();
        file
    }

    fn wanted<'a>(host: &'a str, port: u16, database: &'a str, user: &'a str) -> Wanted<'a> {
        Wanted {
            host,
            port,
            database,
            user,
        }
    }

    #[test]
    fn the_first_matching_line_wins_with_wildcards_and_escapes() {
        let pgpass = file(
            "# a comment\n\
             db.example.com:5432:other:stack:not-this\n\
             db.example.com:5432:state:stack:pa\\:ss\\\\word:with:colons\n\
             *:*:*:stack:fallback\n\
             h\\:6:*:*:*:escaped-host\n",
            0o600,
        );
        let path = pgpass.path();
        let found = |w| lookup(path, &w).unwrap();
        assert_eq!(
            found(wanted("db.example.com", 5432, "state", "stack")),
            Found::Password("pa:ss\\word:with:colons".into())
        );
        assert_eq!(
            found(wanted("db.example.com", 5433, "state", "stack")),
            Found::Password("fallback".into())
        );
        assert_eq!(
            found(wanted("h:6", 5432, "x", "alice")),
            Found::Password("escaped-host".into())
        );
        assert_eq!(
            found(wanted("elsewhere", 5432, "x", "alice")),
            Found::Nothing
        );
    }

    #[test]
    fn a_file_others_may_read_is_ignored_and_a_missing_one_is_nothing() {
        let pgpass = file("*:*:*:*:secret\n", 0o644);
        assert_eq!(
            lookup(pgpass.path(), &wanted("h", 5432, "d", "u")).unwrap(),
            Found::Ignored {
                path: pgpass.path().to_path_buf(),
                mode: 0o644
            }
        );
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            lookup(&dir.path().join("none"), &wanted("h", 5432, "d", "u")).unwrap(),
            Found::Nothing
        );
    }
}
