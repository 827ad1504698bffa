//! Commands on a VM over SSH (russh), trusting only the host key that
//! `stack` generated for the VM and handed it in the seed.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::client::{self, AuthResult};
use russh::keys::{Algorithm, PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use russh::{ChannelMsg, Preferred};

use crate::keys::key_material;

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("{node} presented host key {presented}, not the pinned {pinned}: refusing to connect (is something else listening on {address}?)")]
    HostKeyMismatch {
        node: String,
        address: SocketAddr,
        pinned: String,
        presented: String,
    },
    #[error("{node}: cannot connect over SSH to {address}: {message}")]
    Connect {
        node: String,
        address: SocketAddr,
        message: String,
    },
    #[error("{node}: the stack's key was not accepted for user {user}")]
    Auth { node: String, user: String },
    #[error("cannot read the SSH key {path}: {message}")]
    Key { path: String, message: String },
}

struct PinnedHost {
    pinned: String,
    presented: Arc<Mutex<Option<String>>>,
}

impl client::Handler for PinnedHost {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let PublicKeyOrCertificate::PublicKey { key, .. } = key else {
            return Ok(false);
        };
        let presented = key
            .to_openssh()
            .map(|k| key_material(&k))
            .unwrap_or_default();
        let matches = presented == self.pinned;
        *self.presented.lock().expect("lock") = Some(presented);
        Ok(matches)
    }
}

/// One SSH target: a node's forwarded address, its user and pinned host key.
pub struct Target<'a> {
    pub node: &'a str,
    pub address: SocketAddr,
    pub user: &'a str,
    pub key_path: &'a Path,
    pub pinned_host_key: &'a str,
}

/// Runs `command`, returning its exit code and its output (stdout and stderr).
pub async fn run(
    target: &Target<'_>,
    command: &str,
    timeout: Duration,
) -> Result<(u32, String), SshError> {
    let connect_error = |message: String| SshError::Connect {
        node: target.node.to_string(),
        address: target.address,
        message,
    };
    let presented = Arc::new(Mutex::new(None));
    let handler = PinnedHost {
        pinned: key_material(target.pinned_host_key),
        presented: presented.clone(),
    };
    let config = Arc::new(client::Config {
        inactivity_timeout: Some(timeout),
        preferred: Preferred {
            key: std::borrow::Cow::Owned(vec![Algorithm::Ed25519]),
            ..Preferred::default()
        },
        ..client::Config::default()
    });
    let connected =
        tokio::time::timeout(timeout, client::connect(config, target.address, handler)).await;
    let session = match connected {
        Err(_) => return Err(connect_error(format!("no answer within {timeout:?}"))),
        Ok(Ok(session)) => session,
        Ok(Err(err)) => {
            if let Some(presented) = presented.lock().expect("lock").clone() {
                if presented != key_material(target.pinned_host_key) {
                    return Err(SshError::HostKeyMismatch {
                        node: target.node.to_string(),
                        address: target.address,
                        pinned: key_material(target.pinned_host_key),
                        presented,
                    });
                }
            }
            return Err(connect_error(err.to_string()));
        }
    };
    let key = russh::keys::load_secret_key(target.key_path, None).map_err(|e| SshError::Key {
        path: target.key_path.display().to_string(),
        message: e.to_string(),
    })?;
    let mut session = session;
    let auth = session
        .authenticate_publickey(target.user, PrivateKeyWithHashAlg::new(Arc::new(key), None))
        .await
        .map_err(|e| connect_error(e.to_string()))?;
    if !matches!(auth, AuthResult::Success) {
        return Err(SshError::Auth {
            node: target.node.to_string(),
            user: target.user.to_string(),
        });
    }
    let mut channel = session
        .channel_open_session()
        .await
        .map_err(|e| connect_error(e.to_string()))?;
    channel
        .exec(true, command)
        .await
        .map_err(|e| connect_error(e.to_string()))?;
    let mut output = Vec::new();
    let mut code = None;
    let finished = tokio::time::timeout(timeout, async {
        while let Some(message) = channel.wait().await {
            match message {
                ChannelMsg::Data { data } => output.extend_from_slice(&data),
                ChannelMsg::ExtendedData { data, .. } => output.extend_from_slice(&data),
                ChannelMsg::ExitStatus { exit_status } => code = Some(exit_status),
                _ => {}
            }
        }
    })
    .await;
    if finished.is_err() {
        return Err(connect_error(format!(
            "`{command}` did not finish within {timeout:?}"
        )));
    }
    let _ = session
        .disconnect(russh::Disconnect::ByApplication, "", "en")
        .await;
    Ok((
        code.unwrap_or(255),
        String::from_utf8_lossy(&output).into_owned(),
    ))
}
