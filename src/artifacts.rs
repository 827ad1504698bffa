//! The files a stack makes besides its state, behind one store: its SSH key,
//! the nodes' pinned host keys, the cluster's kubeconfig, the stack CA's
//! certificate, the known_hosts file `stack ssh` hands to OpenSSH, and the
//! files `stack run` hands its command.
//!
//! They live next to the state (`.stack/`), where users point kubectl and
//! ssh at them. Every read, write and removal goes through here, so `down`
//! can remove all of them at once, and a shared state backend can list
//! them, carry them with the state by name, and put them back in place on
//! another machine.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::files::{failed, write_private, FileError};

/// One file of a stack's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Artifact {
    /// The stack's ed25519 key (OpenSSH form, mode 0600).
    SshKey,
    SshPublicKey,
    /// The host key `stack` generated for a node, by hostname.
    HostKey(String),
    /// The pinned host keys as OpenSSH reads them.
    KnownHosts,
    /// The kubeconfig of the cluster the stack made.
    Kubeconfig,
    /// The stack CA's certificate, for users to trust.
    CaCertificate,
}

impl Artifact {
    /// Its name where a state backend keeps it (`ssh-key`, `host-key/NODE`).
    pub fn name(&self) -> String {
        match self {
            Artifact::SshKey => "ssh-key".to_string(),
            Artifact::SshPublicKey => "ssh-public-key".to_string(),
            Artifact::HostKey(host) => format!("host-key/{host}"),
            Artifact::KnownHosts => "known-hosts".to_string(),
            Artifact::Kubeconfig => "kubeconfig".to_string(),
            Artifact::CaCertificate => "ca-certificate".to_string(),
        }
    }

    /// The artifact a name is of; `None` for a name this build does not
    /// know, or a host that is no hostname (it would be a path elsewhere).
    pub fn from_name(name: &str) -> Option<Artifact> {
        Some(match name {
            "ssh-key" => Artifact::SshKey,
            "ssh-public-key" => Artifact::SshPublicKey,
            "known-hosts" => Artifact::KnownHosts,
            "kubeconfig" => Artifact::Kubeconfig,
            "ca-certificate" => Artifact::CaCertificate,
            other => {
                let host = other.strip_prefix("host-key/")?;
                let hostname = !host.is_empty()
                    && !host.starts_with('.')
                    && host
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
                if !hostname {
                    return None;
                }
                Artifact::HostKey(host.to_string())
            }
        })
    }
}

/// A stack's artifacts on this machine.
#[derive(Debug, Clone)]
pub struct Artifacts {
    dir: PathBuf,
    stack: String,
}

impl Artifacts {
    /// The artifacts of `stack` in `dir` (the state folder).
    pub fn new(dir: &Path, stack: &str) -> Artifacts {
        Artifacts {
            dir: dir.to_path_buf(),
            stack: stack.to_string(),
        }
    }

    /// The stack these are the artifacts of.
    pub fn stack(&self) -> &str {
        &self.stack
    }

    /// `.stack/NAME/hosts`: the nodes' host keys.
    fn hosts_dir(&self) -> PathBuf {
        self.dir.join(&self.stack).join("hosts")
    }

    /// `.stack/NAME/run`: what `stack run` hands its command (the status,
    /// the database logins) while it runs.
    pub fn run_dir(&self) -> PathBuf {
        self.dir.join(&self.stack).join("run")
    }

    /// Where the artifact is on this machine.
    pub fn path(&self, artifact: &Artifact) -> PathBuf {
        let stack = &self.stack;
        match artifact {
            Artifact::SshKey => self.dir.join(format!("{stack}.id_ed25519")),
            Artifact::SshPublicKey => self.dir.join(format!("{stack}.id_ed25519.pub")),
            Artifact::HostKey(host) => self.hosts_dir().join(format!("{host}_ed25519")),
            Artifact::KnownHosts => self.hosts_dir().join("known_hosts"),
            Artifact::Kubeconfig => self.dir.join(format!("{stack}.kubeconfig")),
            Artifact::CaCertificate => self.dir.join(format!("{stack}-ca.crt")),
        }
    }

    /// The artifact's bytes; `None` when there is none.
    pub fn read(&self, artifact: &Artifact) -> Result<Option<Vec<u8>>, FileError> {
        let path = self.path(artifact);
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(failed("read", &path)(err)),
        }
    }

    /// Writes the artifact whole (a temporary file, fsynced, renamed into
    /// place), mode 0600.
    pub fn write(&self, artifact: &Artifact, data: &[u8]) -> Result<(), FileError> {
        let path = self.path(artifact);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(failed("create the folder of", &path))?;
        }
        // The folder holds keys: only its owner may list it (as the local
        // state backend makes it).
        let _ = fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700));
        let mut tmp = path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        write_private(&tmp, data).map_err(failed("write", &tmp))?;
        fs::rename(&tmp, &path).map_err(failed("write", &path))
    }

    pub fn remove(&self, artifact: &Artifact) -> Result<(), FileError> {
        let path = self.path(artifact);
        match fs::remove_file(&path) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                Err(failed("remove", &path)(err))
            }
            _ => Ok(()),
        }
    }

    /// The artifacts there are, host keys included, in a stable order.
    pub fn list(&self) -> Result<Vec<Artifact>, FileError> {
        let mut found: Vec<Artifact> = [
            Artifact::SshKey,
            Artifact::SshPublicKey,
            Artifact::KnownHosts,
            Artifact::Kubeconfig,
            Artifact::CaCertificate,
        ]
        .into_iter()
        .filter(|a| self.path(a).is_file())
        .collect();
        let hosts = self.hosts_dir();
        let entries = match fs::read_dir(&hosts) {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(found),
            Err(err) => return Err(failed("list", &hosts)(err)),
        };
        let mut keys: Vec<Artifact> = entries
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                let host = name.strip_suffix("_ed25519")?;
                Artifact::from_name(&format!("host-key/{host}"))
            })
            .collect();
        keys.sort_by_key(Artifact::name);
        found.extend(keys);
        Ok(found)
    }

    /// Every artifact there is with its contents.
    pub fn read_all(&self) -> Result<Vec<(Artifact, Vec<u8>)>, FileError> {
        let mut all = Vec::new();
        for artifact in self.list()? {
            if let Some(data) = self.read(&artifact)? {
                all.push((artifact, data));
            }
        }
        Ok(all)
    }

    /// Makes the artifacts here exactly `stored` (what a state backend
    /// keeps): each written where it differs, the others removed.
    pub fn replace_all(&self, stored: &[(Artifact, Vec<u8>)]) -> Result<(), FileError> {
        for artifact in self.list()? {
            if !stored.iter().any(|(a, _)| *a == artifact) {
                self.remove(&artifact)?;
            }
        }
        for (artifact, data) in stored {
            if self.read(artifact)?.as_deref() != Some(data.as_slice()) {
                self.write(artifact, data)?;
            }
        }
        Ok(())
    }

    /// Puts in place the artifacts of `stored` that are not here, and
    /// touches nothing that is: for reading without the lock, while a run
    /// that holds it may have made files it has not saved yet.
    pub fn fill_missing(&self, stored: &[(Artifact, Vec<u8>)]) -> Result<(), FileError> {
        for (artifact, data) in stored {
            if self.read(artifact)?.is_none() {
                self.write(artifact, data)?;
            }
        }
        Ok(())
    }

    /// Removes every artifact of the stack (after `down`), and the stack's
    /// folder if nothing else is left in it.
    pub fn remove_all(&self) -> Result<(), FileError> {
        for artifact in [
            Artifact::SshKey,
            Artifact::SshPublicKey,
            Artifact::Kubeconfig,
            Artifact::CaCertificate,
        ] {
            self.remove(&artifact)?;
        }
        for dir in [self.hosts_dir(), self.run_dir()] {
            match fs::remove_dir_all(&dir) {
                Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                    return Err(failed("remove", &dir)(err))
                }
                _ => {}
            }
        }
        let _ = fs::remove_dir(self.dir.join(&self.stack));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_private_and_all_removed_with_the_stack_folder() {
        let dir = tempfile::tempdir().unwrap();
        let artifacts = Artifacts::new(dir.path(), "demo");
        artifacts.write(&Artifact::Kubeconfig, b"k").unwrap();
        artifacts
            .write(&Artifact::HostKey("demo-a-0".into()), b"h")
            .unwrap();
        let path = artifacts.path(&Artifact::HostKey("demo-a-0".into()));
        assert_eq!(path, dir.path().join("demo/hosts/demo-a-0_ed25519"));
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            artifacts.read(&Artifact::Kubeconfig).unwrap(),
            Some(b"k".to_vec())
        );
        artifacts.remove_all().unwrap();
        assert_eq!(artifacts.read(&Artifact::Kubeconfig).unwrap(), None);
        assert!(!dir.path().join("demo").exists());
    }

    #[test]
    fn listed_by_name_and_replaced_by_what_a_backend_keeps() {
        let dir = tempfile::tempdir().unwrap();
        let artifacts = Artifacts::new(dir.path(), "demo");
        artifacts.write(&Artifact::SshKey, b"key").unwrap();
        artifacts.write(&Artifact::Kubeconfig, b"old").unwrap();
        artifacts
            .write(&Artifact::HostKey("demo-b-0".into()), b"b")
            .unwrap();
        artifacts
            .write(&Artifact::HostKey("demo-a-0".into()), b"a")
            .unwrap();
        let names: Vec<String> = artifacts
            .list()
            .unwrap()
            .iter()
            .map(Artifact::name)
            .collect();
        assert_eq!(
            names,
            [
                "ssh-key",
                "kubeconfig",
                "host-key/demo-a-0",
                "host-key/demo-b-0"
            ]
        );
        for name in &names {
            assert_eq!(
                Artifact::from_name(name).map(|a| a.name()).as_ref(),
                Some(name)
            );
        }
        artifacts
            .replace_all(&[
                (Artifact::SshKey, b"key".to_vec()),
                (Artifact::Kubeconfig, b"new".to_vec()),
                (Artifact::CaCertificate, b"ca".to_vec()),
            ])
            .unwrap();
        let all = artifacts.read_all().unwrap();
        assert_eq!(
            all,
            [
                (Artifact::SshKey, b"key".to_vec()),
                (Artifact::Kubeconfig, b"new".to_vec()),
                (Artifact::CaCertificate, b"ca".to_vec()),
            ]
        );
    }

    #[test]
    fn a_name_that_would_be_a_path_elsewhere_is_no_artifact() {
        for name in [
            "host-key/../../etc/x",
            "host-key/",
            "host-key/.hidden",
            "other",
        ] {
            assert_eq!(Artifact::from_name(name), None, "{name}");
        }
    }
}
