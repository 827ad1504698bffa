//! A CouchDB cluster's generated secrets: the admin's password, the Erlang
//! cookie, `COUCHDB_SECRET` (which signs session cookies, so every node must
//! share it) and the server uuid. Made once per stack, never defaulted,
//! kept in the state and in the cluster's Secrets, and read back from those
//! Secrets by a machine without the state, so they stay the same across
//! re-runs and upgrades.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::phases::databases::random::{random_text, RandomError, ALNUM, HEX};

/// The admin CouchDB is set up with.
pub const ADMIN: &str = "admin";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Credentials {
    pub username: String,
    pub password: String,
    pub erlang_cookie: String,
    pub couchdb_secret: String,
    pub uuid: String,
}

fn what(cluster: &str) -> String {
    format!("CouchDB cluster {cluster}")
}

impl Credentials {
    /// New secrets for `cluster`.
    pub fn generate(cluster: &str) -> Result<Credentials, RandomError> {
        Ok(Credentials {
            username: ADMIN.to_string(),
            password: random_text(ALNUM, 32, &what(cluster))?,
            erlang_cookie: random_text(ALNUM, 40, &what(cluster))?,
            couchdb_secret: random_text(HEX, 64, &what(cluster))?,
            uuid: random_text(HEX, 32, &what(cluster))?,
        })
    }

    /// The secrets as the cluster's Secrets hold them (`NAME-admin`,
    /// `NAME-internal`), with the server uuid; `None` when any is missing.
    pub fn from_cluster(admin: &Value, internal: &Value, uuid: String) -> Option<Credentials> {
        let field = |secret: &Value, key: &str| -> Option<String> {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(secret["data"][key].as_str()?)
                .ok()?;
            String::from_utf8(bytes).ok().filter(|s| !s.is_empty())
        };
        Some(Credentials {
            username: field(admin, "username")?,
            password: field(admin, "password")?,
            erlang_cookie: field(internal, "erlangCookie")?,
            couchdb_secret: field(internal, "couchdbSecret")?,
            uuid,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_secrets_differ_and_have_their_alphabets() {
        let a = Credentials::generate("docs").unwrap();
        let b = Credentials::generate("docs").unwrap();
        assert_ne!(a.password, b.password);
        assert_ne!(a.erlang_cookie, b.erlang_cookie);
        assert_eq!(a.password.len(), 32);
        assert!(a.password.bytes().all(|c| c.is_ascii_alphanumeric()));
        assert_eq!(a.couchdb_secret.len(), 64);
        assert!(a.couchdb_secret.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(a.username, ADMIN);
    }
}
