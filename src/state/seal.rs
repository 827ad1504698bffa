//! Sealing the secrets a shared state holds: the records' attributes (they
//! carry generated database passwords) and the stack's artifacts (its SSH
//! key, the kubeconfig's client key) never reach a shared database in
//! clear. They are sealed with AES-256-GCM under a key derived with
//! PBKDF2-HMAC-SHA256 from a secret the user keeps (`STACK_STATE_KEY`, or
//! what `STACK_STATE_KEY_COMMAND` prints) and a random salt kept with the
//! stack; each sealed value is bound to its stack and to what it is (a
//! record's address, an artifact's name), so none can be swapped for
//! another. A wrong key fails the tag check: it is an error, never garbage.

use std::time::Duration;

use aws_lc_rs::aead::{Aad, Nonce, RandomizedNonceKey, AES_256_GCM, NONCE_LEN};
use base64::Engine as _;

/// The passphrase that seals a shared state.
const KEY_ENV: &str = "STACK_STATE_KEY";
/// A command that prints the passphrase (a password manager, a cloud
/// secret manager's CLI), run with `sh -c`.
const KEY_COMMAND_ENV: &str = "STACK_STATE_KEY_COMMAND";
/// How long the key command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// PBKDF2 rounds for new stacks (OWASP's figure for PBKDF2-HMAC-SHA256);
/// the count is stored with each stack's salt, so it can rise later.
pub const ITERATIONS: u32 = 600_000;
/// The length of a stack's random salt.
const SALT_LEN: usize = 16;
/// How a sealed value starts: the format's version.
const PREFIX: &str = "sealed:v1:";
/// What a stack's key check seals.
const CHECK: &[u8] = b"the state key of this stack";

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("the postgres state backend encrypts the secrets it stores: set {KEY_ENV} to a passphrase, or {KEY_COMMAND_ENV} to a command that prints one (such as `pass show stack/state-key`); every user of the state needs the same one")]
    NoKey,
    #[error("both {KEY_ENV} and {KEY_COMMAND_ENV} are set: set only one")]
    TwoKeys,
    #[error("{KEY_ENV} is empty")]
    EmptyKey,
    #[error("cannot run {KEY_COMMAND_ENV} `{command}`")]
    Command {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{KEY_COMMAND_ENV} `{command}` did not finish within {} s", COMMAND_TIMEOUT.as_secs())]
    CommandTimeout { command: String },
    #[error("{KEY_COMMAND_ENV} `{command}` failed ({status}){}", if stderr.is_empty() { String::new() } else { format!(": {stderr}") })]
    CommandFailed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("{KEY_COMMAND_ENV} `{command}` printed no key")]
    CommandPrintedNothing { command: String },
    #[error("cannot decrypt {what} of stack {stack}: wrong {KEY_ENV}? (it must be the key the state was written with)")]
    WrongKey { stack: String, what: String },
    #[error("{what} of stack {stack} is not sealed as this build of stack seals values")]
    NotSealed { stack: String, what: String },
}

/// Where the secret comes from.
#[derive(Debug, Clone)]
pub enum KeySource {
    Passphrase(String),
    Command(String),
}

impl KeySource {
    /// `STACK_STATE_KEY` or `STACK_STATE_KEY_COMMAND`, exactly one of them.
    pub fn from_env() -> Result<KeySource, SealError> {
        let passphrase = std::env::var(KEY_ENV).ok();
        let command = std::env::var(KEY_COMMAND_ENV)
            .ok()
            .filter(|c| !c.trim().is_empty());
        match (passphrase, command) {
            (Some(_), Some(_)) => Err(SealError::TwoKeys),
            (Some(passphrase), None) if passphrase.is_empty() => Err(SealError::EmptyKey),
            (Some(passphrase), None) => Ok(KeySource::Passphrase(passphrase)),
            (None, Some(command)) => Ok(KeySource::Command(command)),
            (None, None) => Err(SealError::NoKey),
        }
    }

    /// The secret: the passphrase, or the command's stdout without its
    /// final line break.
    pub async fn secret(&self) -> Result<Vec<u8>, SealError> {
        let command = match self {
            KeySource::Passphrase(passphrase) => return Ok(passphrase.as_bytes().to_vec()),
            KeySource::Command(command) => command,
        };
        let failed = |source| SealError::Command {
            command: command.clone(),
            source,
        };
        let child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(command)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(failed)?;
        let output = tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output())
            .await
            .map_err(|_| SealError::CommandTimeout {
                command: command.clone(),
            })?
            .map_err(failed)?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            return Err(SealError::CommandFailed {
                command: command.clone(),
                status: output.status,
                stderr: stderr.trim().chars().take(300).collect(),
            });
        }
        let mut secret = output.stdout;
        if secret.ends_with(b"\n") {
            secret.pop();
            if secret.ends_with(b"\r") {
                secret.pop();
            }
        }
        if secret.is_empty() {
            return Err(SealError::CommandPrintedNothing {
                command: command.clone(),
            });
        }
        Ok(secret)
    }
}

/// A new random salt for a stack.
pub fn new_salt() -> [u8; SALT_LEN] {
    let mut salt = [0u8; SALT_LEN];
    aws_lc_rs::rand::fill(&mut salt).expect("the system's random source works");
    salt
}

/// The key of one stack's state.
pub struct Sealer {
    key: RandomizedNonceKey,
    stack: String,
}

impl Sealer {
    /// The key derived from `secret` with the stack's salt and round count.
    pub fn derive(secret: &[u8], salt: &[u8], iterations: u32, stack: &str) -> Sealer {
        let mut bytes = [0u8; 32];
        let rounds = std::num::NonZeroU32::new(iterations.max(1)).expect("at least one round");
        aws_lc_rs::pbkdf2::derive(
            aws_lc_rs::pbkdf2::PBKDF2_HMAC_SHA256,
            rounds,
            salt,
            secret,
            &mut bytes,
        );
        let key = RandomizedNonceKey::new(&AES_256_GCM, &bytes).expect("a 256-bit key");
        bytes.fill(0);
        Sealer {
            key,
            stack: stack.to_string(),
        }
    }

    fn aad(&self, what: &str) -> Vec<u8> {
        format!("stack {}\n{what}", self.stack).into_bytes()
    }

    /// `data` sealed as `what` (`record ADDRESS`, `artifact NAME`): text
    /// that says its format, then the nonce and the ciphertext in base64.
    pub fn seal(&self, what: &str, data: &[u8]) -> String {
        let mut sealed = data.to_vec();
        let nonce = self
            .key
            .seal_in_place_append_tag(Aad::from(self.aad(what)), &mut sealed)
            .expect("AES-GCM seals any length a state has");
        let mut out = nonce.as_ref().to_vec();
        out.extend_from_slice(&sealed);
        format!(
            "{PREFIX}{}",
            base64::engine::general_purpose::STANDARD.encode(out)
        )
    }

    /// What `seal` sealed as `what`; a wrong key or a changed value is an error.
    pub fn open(&self, what: &str, sealed: &str) -> Result<Vec<u8>, SealError> {
        let not_sealed = || SealError::NotSealed {
            stack: self.stack.clone(),
            what: what.to_string(),
        };
        let bytes = sealed
            .strip_prefix(PREFIX)
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .filter(|b| b.len() >= NONCE_LEN)
            .ok_or_else(not_sealed)?;
        let (nonce, data) = bytes.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| not_sealed())?;
        let mut data = data.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(self.aad(what)), &mut data)
            .map_err(|_| SealError::WrongKey {
                stack: self.stack.clone(),
                what: what.to_string(),
            })?;
        Ok(plain.to_vec())
    }

    /// The value kept with a stack's salt that tells a wrong key at once.
    pub fn check(&self) -> String {
        self.seal("key check", CHECK)
    }

    /// Whether this is the key `check` was made with.
    pub fn verify(&self, check: &str) -> Result<(), SealError> {
        match self.open("key check", check)? {
            plain if plain == CHECK => Ok(()),
            _ => Err(SealError::WrongKey {
                stack: self.stack.clone(),
                what: "the key check".to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealer(secret: &str, stack: &str) -> Sealer {
        Sealer::derive(secret.as_bytes(), b"0123456789abcdef", 1000, stack)
    }

    #[test]
    fn opens_what_it_sealed_and_nothing_else() {
        let key = sealer("right", "demo");
        let sealed = key.seal("record a", b"{\"password\":\"hunter2\"}");
        assert!(sealed.starts_with("sealed:v1:"));
        assert!(!sealed.contains("hunter2"));
        assert_ne!(sealed, key.seal("record a", b"{\"password\":\"hunter2\"}"));
        assert_eq!(
            key.open("record a", &sealed).unwrap(),
            b"{\"password\":\"hunter2\"}"
        );
        let wrong = sealer("wrong", "demo")
            .open("record a", &sealed)
            .unwrap_err();
        assert!(
            wrong
                .to_string()
                .starts_with("cannot decrypt record a of stack demo: wrong STACK_STATE_KEY?"),
            "{wrong}"
        );
        assert!(matches!(
            key.open("record b", &sealed),
            Err(SealError::WrongKey { .. })
        ));
        assert!(matches!(
            sealer("right", "other").open("record a", &sealed),
            Err(SealError::WrongKey { .. })
        ));
        assert!(matches!(
            key.open("record a", "{\"password\":\"hunter2\"}"),
            Err(SealError::NotSealed { .. })
        ));
    }

    #[test]
    fn the_key_check_tells_a_wrong_key() {
        let check = sealer("right", "demo").check();
        sealer("right", "demo").verify(&check).unwrap();
        assert!(matches!(
            sealer("wrong", "demo").verify(&check),
            Err(SealError::WrongKey { .. })
        ));
    }

    #[tokio::test]
    async fn the_key_command_is_run_and_its_failures_are_named() {
        let printed = KeySource::Command("printf 'from a command\\n'".into());
        assert_eq!(printed.secret().await.unwrap(), b"from a command");
        let failed = KeySource::Command("echo no such entry >&2; exit 3".into())
            .secret()
            .await
            .unwrap_err();
        assert!(
            failed
                .to_string()
                .contains("failed (exit status: 3): no such entry"),
            "{failed}"
        );
        assert!(matches!(
            KeySource::Command("true".into()).secret().await,
            Err(SealError::CommandPrintedNothing { .. })
        ));
    }
}
