//! The stack's SSH keys: the stack's own ed25519 key pair, generated once per
//! stack and kept next to the state (private key mode 0600), never defaulted;
//! and each node's host key, generated before the node exists so that it is
//! pinned before the first connection.

use std::fs;
use std::path::{Path, PathBuf};

use ssh_key::{rand_core::OsRng, Algorithm, LineEnding, PrivateKey};

use crate::files::write_private;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot {action} SSH key {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("SSH key {} is not an OpenSSH private key: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("cannot generate an ed25519 key: {0}")]
    Generate(String),
}

/// The stack's key files.
#[derive(Debug, Clone)]
pub struct StackKey {
    pub private_path: PathBuf,
    /// `ssh-ed25519 AAAA… stack-NAME`
    pub public_openssh: String,
}

/// `type base64` of an OpenSSH public key, without its comment: what a
/// server or an API hands back, whatever comment the key was made with.
pub fn key_material(public_key: &str) -> String {
    public_key
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn private_key_path(dir: &Path, stack: &str) -> PathBuf {
    dir.join(format!("{stack}.id_ed25519"))
}

/// Loads the stack's key, generating it when there is none yet.
pub fn ensure(dir: &Path, stack: &str) -> Result<StackKey, KeyError> {
    let private_path = private_key_path(dir, stack);
    let io = |action, path: &Path| {
        let path = path.to_path_buf();
        move |source| KeyError::Io {
            action,
            path,
            source,
        }
    };
    let key = if private_path.exists() {
        let text = fs::read_to_string(&private_path).map_err(io("read", &private_path))?;
        PrivateKey::from_openssh(text).map_err(|e| KeyError::Invalid {
            path: private_path.clone(),
            reason: e.to_string(),
        })?
    } else {
        fs::create_dir_all(dir).map_err(io("create the folder for", &private_path))?;
        let mut key = PrivateKey::random(&mut OsRng, Algorithm::Ed25519)
            .map_err(|e| KeyError::Generate(e.to_string()))?;
        key.set_comment(format!("stack-{stack}"));
        let pem = key
            .to_openssh(LineEnding::LF)
            .map_err(|e| KeyError::Generate(e.to_string()))?;
        let tmp = private_path.with_extension("tmp");
        write_private(&tmp, pem.as_bytes()).map_err(io("write", &tmp))?;
        fs::rename(&tmp, &private_path).map_err(io("write", &private_path))?;
        key
    };
    let public_openssh = key
        .public_key()
        .to_openssh()
        .map_err(|e| KeyError::Generate(e.to_string()))?;
    let mut pub_path = private_path.clone().into_os_string();
    pub_path.push(".pub");
    fs::write(&pub_path, format!("{public_openssh}\n"))
        .map_err(io("write", Path::new(&pub_path)))?;
    Ok(StackKey {
        private_path,
        public_openssh,
    })
}

/// A node's ed25519 host key at `path`, generated on first use: the private
/// key in OpenSSH form (for cloud-init's `ssh_keys`) and the public key.
pub fn host_key(path: &Path, hostname: &str) -> Result<(String, String), KeyError> {
    let pem = match fs::read_to_string(path) {
        Ok(pem) => pem,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            let mut key = PrivateKey::random(&mut OsRng, Algorithm::Ed25519)
                .map_err(|e| KeyError::Generate(e.to_string()))?;
            key.set_comment(hostname);
            let pem = key
                .to_openssh(LineEnding::LF)
                .map_err(|e| KeyError::Generate(e.to_string()))?;
            if let Some(dir) = path.parent() {
                fs::create_dir_all(dir).map_err(|source| KeyError::Io {
                    action: "create the folder for",
                    path: path.to_path_buf(),
                    source,
                })?;
            }
            write_private(path, pem.as_bytes()).map_err(|source| KeyError::Io {
                action: "write",
                path: path.to_path_buf(),
                source,
            })?;
            pem.to_string()
        }
        Err(source) => {
            return Err(KeyError::Io {
                action: "read",
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let key = PrivateKey::from_openssh(&pem).map_err(|e| KeyError::Invalid {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let public = key
        .public_key()
        .to_openssh()
        .map_err(|e| KeyError::Generate(e.to_string()))?;
    Ok((pem, public))
}

/// Removes the key files (after `down`).
pub fn remove(dir: &Path, stack: &str) -> Result<(), KeyError> {
    let private_path = private_key_path(dir, stack);
    let mut pub_path = private_path.clone().into_os_string();
    pub_path.push(".pub");
    for path in [private_path, PathBuf::from(pub_path)] {
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(KeyError::Io {
                    action: "remove",
                    path,
                    source,
                })
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn generated_once_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let first = ensure(dir.path(), "demo").unwrap();
        let second = ensure(dir.path(), "demo").unwrap();
        assert_eq!(first.public_openssh, second.public_openssh);
        assert!(first.public_openssh.starts_with("ssh-ed25519 "));
        let mode = fs::metadata(&first.private_path)
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        remove(dir.path(), "demo").unwrap();
        assert!(!first.private_path.exists());
    }
}
