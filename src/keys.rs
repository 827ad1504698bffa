//! The stack's SSH keys: the stack's own ed25519 key pair, generated once per
//! stack and kept next to the state (private key mode 0600), never defaulted;
//! and each node's host key, generated before the node exists so that it is
//! pinned before the first connection.

use std::path::PathBuf;

use ssh_key::{rand_core::OsRng, Algorithm, LineEnding, PrivateKey};

use crate::artifacts::{Artifact, Artifacts};
use crate::files::FileError;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(transparent)]
    Io(#[from] FileError),
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

/// Loads the stack's key, generating it when there is none yet.
pub fn ensure(artifacts: &Artifacts) -> Result<StackKey, KeyError> {
    let private_path = artifacts.path(&Artifact::SshKey);
    let key = match read(artifacts, &Artifact::SshKey)? {
        Some(text) => PrivateKey::from_openssh(text).map_err(|e| KeyError::Invalid {
            path: private_path.clone(),
            reason: e.to_string(),
        })?,
        None => {
            let mut key = PrivateKey::random(&mut OsRng, Algorithm::Ed25519)
                .map_err(|e| KeyError::Generate(e.to_string()))?;
            key.set_comment(format!("stack-{}", artifacts.stack()));
            let pem = key
                .to_openssh(LineEnding::LF)
                .map_err(|e| KeyError::Generate(e.to_string()))?;
            artifacts.write(&Artifact::SshKey, pem.as_bytes())?;
            key
        }
    };
    let public_openssh = key
        .public_key()
        .to_openssh()
        .map_err(|e| KeyError::Generate(e.to_string()))?;
    artifacts.write(
        &Artifact::SshPublicKey,
        format!("{public_openssh}\n").as_bytes(),
    )?;
    Ok(StackKey {
        private_path,
        public_openssh,
    })
}

/// The stack's key as it is, without making one (for reading commands):
/// an empty public key before the first `up`.
pub fn existing(artifacts: &Artifacts) -> Result<StackKey, KeyError> {
    let public = read(artifacts, &Artifact::SshPublicKey)?.unwrap_or_default();
    Ok(StackKey {
        private_path: artifacts.path(&Artifact::SshKey),
        public_openssh: public.trim().to_string(),
    })
}

fn read(artifacts: &Artifacts, artifact: &Artifact) -> Result<Option<String>, KeyError> {
    let path = artifacts.path(artifact);
    match artifacts.read(artifact)? {
        Some(bytes) => String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| KeyError::Invalid {
                path,
                reason: "not text".to_string(),
            }),
        None => Ok(None),
    }
}

/// A node's ed25519 host key, generated on first use: the private key in
/// OpenSSH form (for cloud-init's `ssh_keys`) and the public key.
pub fn host_key(artifacts: &Artifacts, hostname: &str) -> Result<(String, String), KeyError> {
    let artifact = Artifact::HostKey(hostname.to_string());
    let pem = match read(artifacts, &artifact)? {
        Some(pem) => pem,
        None => {
            let (pem, _) = new_host_key(hostname)?;
            artifacts.write(&artifact, pem.as_bytes())?;
            pem
        }
    };
    let key = PrivateKey::from_openssh(&pem).map_err(|e| KeyError::Invalid {
        path: artifacts.path(&artifact),
        reason: e.to_string(),
    })?;
    let public = key
        .public_key()
        .to_openssh()
        .map_err(|e| KeyError::Generate(e.to_string()))?;
    Ok((pem, public))
}

/// A new ed25519 host key, kept nowhere: the private key in OpenSSH form and
/// the public key. Every such key has the same size, so checks of what a
/// node's user-data will be can render it before the real one exists.
pub fn new_host_key(hostname: &str) -> Result<(String, String), KeyError> {
    let mut key = PrivateKey::random(&mut OsRng, Algorithm::Ed25519)
        .map_err(|e| KeyError::Generate(e.to_string()))?;
    key.set_comment(hostname);
    let pem = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| KeyError::Generate(e.to_string()))?;
    let public = key
        .public_key()
        .to_openssh()
        .map_err(|e| KeyError::Generate(e.to_string()))?;
    Ok((pem.to_string(), public))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn generated_once_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let artifacts = Artifacts::new(dir.path(), "demo");
        assert!(existing(&artifacts).unwrap().public_openssh.is_empty());
        let first = ensure(&artifacts).unwrap();
        let second = ensure(&artifacts).unwrap();
        assert_eq!(first.public_openssh, second.public_openssh);
        assert_eq!(
            existing(&artifacts).unwrap().public_openssh,
            first.public_openssh
        );
        assert!(first.public_openssh.starts_with("ssh-ed25519 "));
        let mode = std::fs::metadata(&first.private_path)
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let (_, host) = host_key(&artifacts, "demo-a-0").unwrap();
        assert_eq!(host_key(&artifacts, "demo-a-0").unwrap().1, host);
    }
}
