//! The user's registry credentials, read as container tools read them:
//! `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`; `auths`
//! keyed by registry (Docker Hub's key is `https://index.docker.io/v1/`),
//! each with `auth` (base64 of `user:password`), `username` and
//! `password`, or an `identitytoken`; `credHelpers` per registry and
//! `credsStore` for the rest, run as `docker-credential-NAME get` with
//! the server on stdin.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::reference::{is_docker_hub, DOCKER_HUB};
use crate::engine::{Cancel, Level, Stopped};

/// The key of Docker Hub in a Docker config and what its helpers are asked.
const DOCKER_HUB_SERVER: &str = "https://index.docker.io/v1/";
/// The largest Docker config read, and the most a helper may print.
const MAX_CONFIG_BYTES: u64 = 1 << 20;
const MAX_HELPER_OUTPUT: u64 = 64 << 10;
/// How long a credential helper may take (it may ask a keychain).
const HELPER_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum DockerConfigError {
    #[error("cannot read docker config {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("docker config {} is not valid: {problem}", path.display())]
    Invalid { path: PathBuf, problem: String },
    #[error("cannot run credential helper docker-credential-{helper} for registry {registry}")]
    HelperStart {
        helper: String,
        registry: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "credential helper docker-credential-{helper} failed for registry {registry}: {problem}"
    )]
    Helper {
        helper: String,
        registry: String,
        problem: String,
    },
    #[error(transparent)]
    Stopped(#[from] Stopped),
}

/// Credentials for one registry. Debug shows no secret.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    Basic {
        username: String,
        password: String,
    },
    /// A refresh token for the registry's token service (what `docker
    /// login` keeps for registries that give one).
    IdentityToken(String),
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::Basic { username, .. } => write!(f, "Basic({username}, <redacted>)"),
            Credentials::IdentityToken(_) => f.write_str("IdentityToken(<redacted>)"),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConfigFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default)]
    cred_helpers: BTreeMap<String, String>,
    #[serde(default)]
    creds_store: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

/// The credentials configuration of the user, by registry host.
#[derive(Debug, Default)]
pub struct DockerConfig {
    path: Option<PathBuf>,
    auths: BTreeMap<String, Option<Credentials>>,
    helpers: BTreeMap<String, String>,
    store: Option<String>,
}

/// A config key's registry host: without scheme and path (`https://ghcr.io/v2/`
/// is `ghcr.io`), Docker Hub's names as its API host.
fn registry_of_key(key: &str) -> String {
    let rest = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = rest.split('/').next().unwrap_or(rest);
    if is_docker_hub(host) {
        DOCKER_HUB.to_string()
    } else {
        host.to_string()
    }
}

impl DockerConfig {
    /// The config container tools would read: `$DOCKER_CONFIG/config.json`,
    /// else `$HOME/.docker/config.json`; none when the file is not there.
    pub fn load() -> Result<DockerConfig, DockerConfigError> {
        let folder = match std::env::var_os("DOCKER_CONFIG").filter(|v| !v.is_empty()) {
            Some(folder) => PathBuf::from(folder),
            None => match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
                Some(home) => PathBuf::from(home).join(".docker"),
                None => return Ok(DockerConfig::default()),
            },
        };
        DockerConfig::from_file(&folder.join("config.json"))
    }

    /// The config in `path`; none when the file is not there.
    pub fn from_file(path: &Path) -> Result<DockerConfig, DockerConfigError> {
        use std::io::Read as _;
        let mut text = String::new();
        match std::fs::File::open(path) {
            Ok(file) => file
                .take(MAX_CONFIG_BYTES + 1)
                .read_to_string(&mut text)
                .map_err(|source| DockerConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Ok(DockerConfig::default())
            }
            Err(source) => {
                return Err(DockerConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let invalid = |problem: String| DockerConfigError::Invalid {
            path: path.to_path_buf(),
            problem,
        };
        if text.len() as u64 > MAX_CONFIG_BYTES {
            return Err(invalid("larger than 1 MiB".to_string()));
        }
        let file: ConfigFile = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        let mut auths = BTreeMap::new();
        for (key, entry) in file.auths {
            let credentials = entry_credentials(&entry)
                .map_err(|problem| invalid(format!("auths.{key}: {problem}")))?;
            auths.insert(registry_of_key(&key), credentials);
        }
        Ok(DockerConfig {
            path: Some(path.to_path_buf()),
            auths,
            helpers: file
                .cred_helpers
                .into_iter()
                .map(|(key, helper)| (registry_of_key(&key), helper))
                .collect(),
            store: file.creds_store.filter(|s| !s.is_empty()),
        })
    }

    /// The file this came from, when there was one.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The credentials for `registry` (`host[:port]`, Docker Hub as
    /// `registry-1.docker.io`), as Docker finds them: the registry's
    /// helper, else the credentials store, else `auths`.
    pub async fn credentials(
        &self,
        registry: &str,
        cancel: &Cancel,
    ) -> Result<Option<Credentials>, DockerConfigError> {
        let helper = self.helpers.get(registry).or(self.store.as_ref());
        if let Some(helper) = helper {
            if let Some(found) = run_helper(helper, registry, cancel).await? {
                return Ok(Some(found));
            }
        }
        Ok(self.auths.get(registry).cloned().flatten())
    }
}

fn entry_credentials(entry: &AuthEntry) -> Result<Option<Credentials>, String> {
    if let Some(token) = entry.identitytoken.as_ref().filter(|t| !t.is_empty()) {
        return Ok(Some(Credentials::IdentityToken(token.clone())));
    }
    if let Some(auth) = entry.auth.as_ref().filter(|a| !a.is_empty()) {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|_| "`auth` is not base64".to_string())?;
        let decoded = String::from_utf8(decoded).map_err(|_| "`auth` is not UTF-8".to_string())?;
        let (username, password) = decoded
            .split_once(':')
            .ok_or_else(|| "`auth` is not base64 of user:password".to_string())?;
        return Ok(Some(Credentials::Basic {
            username: username.to_string(),
            password: password.to_string(),
        }));
    }
    match (&entry.username, &entry.password) {
        (Some(username), Some(password)) if !username.is_empty() => Ok(Some(Credentials::Basic {
            username: username.clone(),
            password: password.clone(),
        })),
        _ => Ok(None),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HelperAnswer {
    username: String,
    secret: String,
}

/// `docker-credential-HELPER get` with the server on stdin; `None` when
/// the helper has nothing for it.
async fn run_helper(
    helper: &str,
    registry: &str,
    cancel: &Cancel,
) -> Result<Option<Credentials>, DockerConfigError> {
    let server = if registry == DOCKER_HUB {
        DOCKER_HUB_SERVER
    } else {
        registry
    };
    let failed = |problem: String| DockerConfigError::Helper {
        helper: helper.to_string(),
        registry: registry.to_string(),
        problem,
    };
    let mut child = tokio::process::Command::new(format!("docker-credential-{helper}"))
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| DockerConfigError::HelperStart {
            helper: helper.to_string(),
            registry: registry.to_string(),
            source,
        })?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let work = async {
        stdin.write_all(server.as_bytes()).await?;
        drop(stdin);
        let mut out = Vec::new();
        (&mut stdout)
            .take(MAX_HELPER_OUTPUT)
            .read_to_end(&mut out)
            .await?;
        let status = child.wait().await?;
        Ok::<_, std::io::Error>((status, out))
    };
    let (status, out) = match cancel
        .until(Level::Soon, tokio::time::timeout(HELPER_TIMEOUT, work))
        .await?
    {
        Ok(Ok(done)) => done,
        Ok(Err(err)) => return Err(failed(err.to_string())),
        Err(_) => {
            return Err(failed(format!(
                "no answer in {}s",
                HELPER_TIMEOUT.as_secs()
            )))
        }
    };
    let text = String::from_utf8_lossy(&out);
    if !status.success() {
        // What helpers print when they hold nothing for the server.
        if text.contains("credentials not found") {
            return Ok(None);
        }
        return Err(failed(format!("{status}: {}", text.trim())));
    }
    let answer: HelperAnswer =
        serde_json::from_str(&text).map_err(|e| failed(format!("unreadable answer: {e}")))?;
    Ok(Some(if answer.username == "<token>" {
        Credentials::IdentityToken(answer.secret)
    } else {
        Credentials::Basic {
            username: answer.username,
            password: answer.secret,
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> DockerConfig {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, json).unwrap();
        DockerConfig::from_file(&path).unwrap()
    }

    #[tokio::test]
    async fn auths_by_host_with_any_spelling_of_the_key() {
        let basic = |u: &str, p: &str| {
            Some(Credentials::Basic {
                username: u.to_string(),
                password: p.to_string(),
            })
        };
        let config = config(
            r#"{"auths": {
                "https://index.docker.io/v1/": {"auth": "aHViOnNlY3JldA=="},
                "https://ghcr.io/v2/": {"username": "me", "password": "pw"},
                "127.0.0.1:5000": {"identitytoken": "refresh"},
                "empty.example": {}
            }}"#,
        );
        let cancel = Cancel::new();
        let found = |registry: &'static str| {
            let config = &config;
            let cancel = &cancel;
            async move { config.credentials(registry, cancel).await.unwrap() }
        };
        assert_eq!(found(DOCKER_HUB).await, basic("hub", "secret"));
        assert_eq!(found("ghcr.io").await, basic("me", "pw"));
        assert_eq!(
            found("127.0.0.1:5000").await,
            Some(Credentials::IdentityToken("refresh".to_string()))
        );
        assert_eq!(found("empty.example").await, None);
        assert_eq!(found("quay.io").await, None);
        assert!(!format!("{:?}", found(DOCKER_HUB).await).contains("secret"));
    }

    #[test]
    fn a_missing_file_is_no_credentials_and_a_broken_one_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = DockerConfig::from_file(&dir.path().join("config.json")).unwrap();
        assert!(missing.path().is_none());
        let path = dir.path().join("broken.json");
        std::fs::write(&path, r#"{"auths": {"x": {"auth": "not base64!"}}}"#).unwrap();
        let err = DockerConfig::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("auths.x: `auth` is not base64"), "{err}");
    }
}
