//! The local KVM backend: QEMU driven directly (no libvirt), one process per
//! VM started detached with a pidfile, a serial log and a QMP socket; a
//! cloud-init seed built in-process; a private L2 network through a frame
//! switch that `stack` runs for the stack; readiness over SSH against the
//! host key `stack` generated and pinned.
//!
//! Everything of a stack lives under `.stack/NAME/` next to the state:
//! `switch.sock`/`switch.pid`/`switch.log` and one folder per VM with its
//! overlay, seed, serial log, QMP socket, pidfile and `vm.json`. The VMs'
//! host keys are artifacts of the stack (`.stack/NAME/hosts/`), kept when a
//! VM is made again so its pinned key stays the same.

pub mod image;
pub mod qemu;
pub mod qmp;
pub mod seed;

pub mod switch;

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::ssh;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use self::qemu::{Accelerator, VmSpec};
use self::seed::SeedSpec;
use super::provider::{Provider, ProviderError};
use crate::artifacts::Artifacts;
use crate::cloudinit::{self, NodeSeed};
use crate::engine::{
    Change, Expiring, Handling, Leftovers, NodeStatus, Observed, ReplaceRule, Resource, SshAccess,
    StatusPart,
};
use crate::files::{failed, sha256_hex, FileError};
use crate::future::BoxFuture;
use crate::model::{Accel, BaseImage, KvmSettings, NodeGroup, RunMarks, Stack};
use crate::nodes::{Nodes, NodesError, SshNode};
use crate::state::{Record, State};
use crate::templates::{HostEntry, TemplateError};

pub const NETWORK: &str = "network";
pub const VM: &str = "vm";
pub const NETWORK_ADDRESS: &str = "kvm.network.main";

/// How long a powered-down guest may take to stop before it is killed.
const POWERDOWN_WAIT: Duration = Duration::from_secs(30);
/// How many lines of the serial console an error shows.
const CONSOLE_LINES: usize = 25;
/// A guest under KVM that has printed nothing on its console by then is
/// taken as one this host's KVM cannot run (nested KVM that hangs).
const KVM_SILENCE: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error("{node}: {message}")]
    Node { node: String, message: String },
    #[error("{node}: cloud-init failed in {modules}\nlast console lines:\n{console}")]
    CloudInit {
        node: String,
        modules: String,
        console: String,
    },
    #[error("{node}: not ready after {}s (timeouts.ready in the stack): {last}\nlast console lines:\n{console}", waited.as_secs())]
    NotReady {
        node: String,
        waited: Duration,
        last: String,
        console: String,
    },
    #[error(transparent)]
    Ssh(#[from] ssh::SshError),
    #[error(transparent)]
    Key(#[from] crate::keys::KeyError),
    #[error(transparent)]
    Image(#[from] image::ImageError),
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error(transparent)]
    Io(#[from] FileError),
}

/// What a VM folder remembers about its VM (`vm.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct VmMeta {
    address: String,
    hostname: String,
    ssh_port: u16,
    /// Forwarded to the guest's Kubernetes API when the stack runs microk8s.
    #[serde(default)]
    api_port: Option<u16>,
    host_key: String,
    private_address: String,
    /// When the VM's environment expires (seconds since the epoch), and
    /// the run it is of: the marks `stack gc` finds it by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    run: Option<RunMarks>,
}

/// One VM the stack wants.
#[derive(Debug, Clone)]
struct VmPlan {
    address: String,
    hostname: String,
    group: NodeGroup,
    private_address: IpAddr,
    prefix: u8,
    user_mac: String,
    private_mac: String,
    /// Everything the seed says except the host key, which is made once per VM.
    seed_sha256: String,
}

pub struct KvmProvider {
    stack: Stack,
    settings: KvmSettings,
    run_dir: PathBuf,
    key_path: PathBuf,
    public_key: String,
    vms: Vec<VmPlan>,
    /// The accelerator that worked in this run, once known.
    accel: Mutex<Option<Accelerator>>,
    /// Where the VMs' host keys are kept.
    artifacts: Artifacts,
}

fn mac(kind: u8, index: usize) -> String {
    format!(
        "52:54:00:{kind:02x}:{:02x}:{:02x}",
        (index >> 8) & 0xff,
        index & 0xff
    )
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            // A zombie is dead for our purposes.
            stat.rsplit(')')
                .next()
                .and_then(|rest| rest.split_whitespace().next())
                != Some("Z")
        })
        .unwrap_or(false)
}

/// A file, or a folder with the files in it (the first few), for messages.
fn list_files(path: &Path) -> String {
    const SHOWN: usize = 8;
    let mut files: Vec<String> = Vec::new();
    let mut pending = vec![path.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let p = entry.path();
            if p.is_dir() {
                pending.push(p);
            } else if let Ok(rel) = p.strip_prefix(path) {
                files.push(rel.display().to_string());
            }
        }
    }
    if !path.is_dir() {
        return format!("file {}", path.display());
    }
    files.sort();
    let more = files.len().saturating_sub(SHOWN);
    files.truncate(SHOWN);
    let mut text = format!("files in {}: {}", path.display(), files.join(", "));
    if more > 0 {
        text.push_str(&format!(" and {more} more"));
    }
    text
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn kill(pid: u32) {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..]
        .iter()
        .map(|l| format!("  | {}", l.trim_end()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `-smp N` and `-m NM` of a running QEMU, read from its command line.
fn running_size(pid: u32) -> (Option<u64>, Option<u64>) {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let after = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
    };
    let cpus = after("-smp").and_then(|v| v.parse().ok());
    let memory = after("-m").and_then(|v| v.trim_end_matches('M').parse().ok());
    (cpus, memory)
}

impl KvmProvider {
    /// Plans the stack's VMs; fails when a user-data template does not render.
    pub fn new(
        stack: &Stack,
        settings: &KvmSettings,
        key_path: &Path,
        public_key: &str,
        artifacts: &Artifacts,
    ) -> Result<Self, KvmError> {
        let (network, prefix) = match stack.network.cidr {
            Some(ipnet::IpNet::V4(net)) => (net, net.prefix_len()),
            _ => ("10.42.0.0/24".parse().expect("CIDR parses"), 24),
        };
        let mut vms = Vec::new();
        let mut hosts = network.hosts().skip(9);
        for group in &stack.nodes {
            for i in 0..group.count {
                let index = vms.len();
                vms.push(VmPlan {
                    address: format!("kvm.{VM}.{}[{i}]", group.name),
                    hostname: format!("{}-{}-{i}", stack.name, group.name),
                    group: group.clone(),
                    private_address: IpAddr::V4(
                        hosts.next().expect("validation checked the CIDR's size"),
                    ),
                    prefix,
                    user_mac: mac(0, index + 1),
                    private_mac: mac(1, index + 1),
                    seed_sha256: String::new(),
                });
            }
        }
        let mut provider = KvmProvider {
            stack: stack.clone(),
            settings: settings.clone(),
            // Absolute: QEMU changes to / when it daemonizes.
            run_dir: std::path::absolute(stack.state_dir().join(&stack.name))
                .unwrap_or_else(|_| stack.state_dir().join(&stack.name)),
            key_path: key_path.to_path_buf(),
            public_key: public_key.to_string(),
            vms,
            accel: Mutex::new(None),
            artifacts: artifacts.clone(),
        };
        for i in 0..provider.vms.len() {
            let seed = provider.seed_spec(&provider.vms[i], "", "")?;
            provider.vms[i].seed_sha256 = sha256_hex(format!("{seed:?}").as_bytes());
        }
        Ok(provider)
    }

    fn socket(&self) -> PathBuf {
        self.run_dir.join("switch.sock")
    }

    fn vm_dir(&self, hostname: &str) -> PathBuf {
        self.run_dir.join("vms").join(hostname)
    }

    fn base_dir(&self) -> PathBuf {
        let dir = self
            .stack
            .file
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        std::path::absolute(&dir).unwrap_or(dir)
    }

    fn local(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.base_dir().join(path)
        }
    }

    /// The VM's seed with its user-data rendered around the given host key.
    fn seed_spec(
        &self,
        vm: &VmPlan,
        host_private: &str,
        host_public: &str,
    ) -> Result<SeedSpec, TemplateError> {
        let hosts: Vec<HostEntry> = self
            .vms
            .iter()
            .map(|v| HostEntry {
                address: v.private_address.to_string(),
                hostname: v.hostname.clone(),
            })
            .collect();
        let user_data = cloudinit::user_data(&NodeSeed {
            stack: &self.stack,
            group: &vm.group,
            hostname: &vm.hostname,
            user: &self.settings.ssh_user,
            authorized_key: &self.public_key,
            host_private,
            host_public,
            hosts: &hosts,
        })?;
        Ok(SeedSpec {
            instance_id: vm.hostname.clone(),
            hostname: vm.hostname.clone(),
            user_data,
            user_mac: vm.user_mac.clone(),
            private_mac: vm.private_mac.clone(),
            private_address: format!("{}/{}", vm.private_address, vm.prefix),
        })
    }

    fn image_id(&self, group: &NodeGroup) -> String {
        match &group.image {
            Some(BaseImage::Url { checksum, .. }) => checksum.to_string(),
            Some(BaseImage::Path { path, .. }) => format!("path:{}", self.local(path).display()),
            None => String::new(),
        }
    }

    fn vm_attrs(&self, vm: &VmPlan) -> Value {
        json!({
            "cpus": vm.group.cpus.unwrap_or(2),
            "memoryMiB": vm.group.memory.map_or(4096, |m| m.0 >> 20),
            "diskGiB": vm.group.disk.as_gib_ceil(),
            "image": self.image_id(&vm.group),
            "privateAddress": format!("{}/{}", vm.private_address, vm.prefix),
            "seedSha256": vm.seed_sha256,
            "state": "running",
        })
    }

    fn accelerator(&self) -> Accelerator {
        if let Some(accel) = *self.accel.lock().expect("lock") {
            return accel;
        }
        match self.settings.accel {
            Accel::Tcg => Accelerator::Tcg,
            Accel::Kvm => Accelerator::Kvm,
            Accel::Auto => {
                let usable = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/kvm")
                    .is_ok();
                if usable {
                    Accelerator::Kvm
                } else {
                    Accelerator::Tcg
                }
            }
        }
    }

    fn meta(&self, dir: &Path) -> Option<VmMeta> {
        serde_json::from_str(&std::fs::read_to_string(dir.join("vm.json")).ok()?).ok()
    }

    fn vm_spec(&self, vm: &VmPlan, dir: &Path, meta: &VmMeta, accel: Accelerator) -> VmSpec {
        let kernel = match &vm.group.image {
            Some(
                BaseImage::Path {
                    kernel: Some(kernel),
                    initrd: Some(initrd),
                    ..
                }
                | BaseImage::Url {
                    kernel: Some(kernel),
                    initrd: Some(initrd),
                    ..
                },
            ) => Some((self.local(kernel), self.local(initrd))),
            _ => None,
        };
        VmSpec {
            name: vm.hostname.clone(),
            cpus: vm.group.cpus.unwrap_or(2),
            memory_mib: vm.group.memory.map_or(4096, |m| m.0 >> 20),
            accel,
            overlay: dir.join("disk.qcow2"),
            seed: dir.join("seed.img"),
            kernel,
            ssh_port: meta.ssh_port,
            api_port: meta.api_port,
            user_mac: vm.user_mac.clone(),
            private_mac: vm.private_mac.clone(),
            switch_socket: self.socket(),
            serial_log: dir.join("serial.log"),
            qmp_socket: dir.join("qmp.sock"),
            pidfile: dir.join("qemu.pid"),
        }
    }

    fn start_qemu(&self, vm: &VmPlan, spec: &VmSpec) -> Result<(), KvmError> {
        let _ = std::fs::remove_file(&spec.qmp_socket);
        let _ = std::fs::remove_file(&spec.serial_log);
        let output = Command::new("qemu-system-x86_64")
            .args(qemu::args(spec))
            .stdin(Stdio::null())
            .output()
            .map_err(|e| KvmError::Node {
                node: vm.hostname.clone(),
                message: format!("cannot run qemu-system-x86_64: {e}"),
            })?;
        if !output.status.success() {
            return Err(KvmError::Node {
                node: vm.hostname.clone(),
                message: format!(
                    "QEMU did not start: {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                ),
            });
        }
        Ok(())
    }

    async fn qmp_status(dir: &Path) -> Option<String> {
        let mut qmp = qmp::Qmp::connect(&dir.join("qmp.sock")).await.ok()?;
        qmp.status().await.ok()
    }

    /// Kills the VM's QEMU and waits until it is gone (its disk lock with it).
    async fn stop_now(dir: &Path) {
        if let Some(pid) = read_pid(&dir.join("qemu.pid")).filter(|pid| alive(*pid)) {
            kill(pid);
            let start = Instant::now();
            while alive(pid) && start.elapsed() < Duration::from_secs(10) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// Starts the VM and waits until SSH answers with the pinned key and
    /// cloud-init has finished. With `accel: auto` it falls back from KVM to
    /// TCG when the guest hits a KVM internal error or stays silent on its
    /// console for `KVM_SILENCE`.
    async fn boot(&self, vm: &VmPlan, dir: &Path, meta: &VmMeta) -> Result<(), KvmError> {
        let mut accel = self.accelerator();
        self.start_qemu(vm, &self.vm_spec(vm, dir, meta, accel))?;
        let timeout = self.stack.timeouts.ready;
        let start = Instant::now();
        let address = SocketAddr::from(([127, 0, 0, 1], meta.ssh_port));
        let target = ssh::Target {
            node: &vm.hostname,
            address,
            user: &self.settings.ssh_user,
            key_path: &self.key_path,
            pinned_host_key: &meta.host_key,
        };
        let serial = dir.join("serial.log");
        let mut last = String::from("no answer yet");
        let mut kvm_started = Instant::now();
        while start.elapsed() < timeout {
            let status = Self::qmp_status(dir).await;
            let silent = std::fs::metadata(&serial).map_or(true, |m| m.len() == 0);
            let kvm_failed = accel == Accelerator::Kvm
                && self.settings.accel == Accel::Auto
                && (status.as_deref() == Some("internal-error")
                    || (silent && kvm_started.elapsed() > KVM_SILENCE));
            match status.as_deref() {
                _ if kvm_failed => {
                    tracing::warn!(node = %vm.hostname, status = ?status, "KVM cannot run this guest here; using TCG software emulation");
                    Self::stop_now(dir).await;
                    kvm_started = Instant::now();
                    accel = Accelerator::Tcg;
                    *self.accel.lock().expect("lock") = Some(accel);
                    self.start_qemu(vm, &self.vm_spec(vm, dir, meta, accel))?;
                    continue;
                }
                None if read_pid(&dir.join("qemu.pid")).is_none_or(|pid| !alive(pid)) => {
                    return Err(KvmError::Node {
                        node: vm.hostname.clone(),
                        message: format!(
                            "QEMU exited while booting\nlast console lines:\n{}",
                            tail(&serial, CONSOLE_LINES)
                        ),
                    });
                }
                _ => {}
            }
            let probe = "if test -f /var/lib/cloud/instance/boot-finished; then cat /run/cloud-init/result.json; else echo waiting; exit 3; fi";
            match ssh::run(&target, probe, Duration::from_secs(5)).await {
                Ok((0, result)) => {
                    *self.accel.lock().expect("lock") = Some(accel);
                    let result: Value = serde_json::from_str(&result).unwrap_or_default();
                    let errors: Vec<String> = result["v1"]["errors"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|e| e.as_str().map_or_else(|| e.to_string(), str::to_string))
                        .collect();
                    if errors.is_empty() {
                        return Ok(());
                    }
                    return Err(KvmError::CloudInit {
                        node: vm.hostname.clone(),
                        modules: errors.join("; "),
                        console: tail(&serial, CONSOLE_LINES),
                    });
                }
                Ok((_, output)) => last = format!("cloud-init not done yet ({})", output.trim()),
                Err(err @ ssh::SshError::HostKeyMismatch { .. }) => return Err(err.into()),
                Err(err) => last = err.to_string(),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        Err(KvmError::NotReady {
            node: vm.hostname.clone(),
            waited: start.elapsed(),
            last,
            console: tail(&serial, CONSOLE_LINES),
        })
    }

    fn plan_of(&self, address: &str) -> Result<&VmPlan, KvmError> {
        self.vms
            .iter()
            .find(|v| v.address == address)
            .ok_or_else(|| KvmError::Node {
                node: address.to_string(),
                message: "not a VM of this stack".to_string(),
            })
    }

    async fn create_vm(&self, resource: &Resource) -> Result<Record, KvmError> {
        let vm = self.plan_of(&resource.address)?.clone();
        let dir = self.vm_dir(&vm.hostname);
        let existing = self.meta(&dir);
        let running = read_pid(&dir.join("qemu.pid")).is_some_and(alive);
        if let (Some(meta), true, true) = (&existing, running, dir.join("disk.qcow2").exists()) {
            tracing::info!(node = %vm.hostname, "already running: not starting another");
            return Ok(self.record(resource, meta));
        }
        Self::stop_now(&dir).await;
        // The base image first: nothing of the VM is made while it is missing.
        let base = match vm.group.image.as_ref() {
            Some(BaseImage::Url { url, checksum, .. }) => image::fetch(url, checksum).await?,
            Some(BaseImage::Path { path, .. }) => {
                let path = self.local(path);
                if !path.is_file() {
                    return Err(KvmError::Node {
                        node: vm.hostname.clone(),
                        message: format!("there is no base image {}", path.display()),
                    });
                }
                path
            }
            None => {
                return Err(KvmError::Node {
                    node: vm.hostname.clone(),
                    message: "no base image".to_string(),
                })
            }
        };
        std::fs::create_dir_all(&dir).map_err(failed("create", &dir))?;
        let (host_private, host_public) = crate::keys::host_key(&self.artifacts, &vm.hostname)?;
        let overlay = dir.join("disk.qcow2");
        let _ = std::fs::remove_file(&overlay);
        image::create_overlay(&base, &overlay, vm.group.disk.0)?;
        let seed_path = dir.join("seed.img");
        let spec = self.seed_spec(&vm, &host_private, &host_public)?;
        seed::write_image(&seed_path, &seed::files(&spec)).map_err(failed("write", &seed_path))?;
        let meta = VmMeta {
            address: vm.address.clone(),
            hostname: vm.hostname.clone(),
            ssh_port: free_port().map_err(failed("find a free port for", &dir))?,
            api_port: match crate::cloudinit::microk8s_install(&self.stack) {
                Some(_) => Some(free_port().map_err(failed("find a free port for", &dir))?),
                None => None,
            },
            host_key: host_public,
            private_address: format!("{}/{}", vm.private_address, vm.prefix),
            expires: self.stack.expires,
            run: self.stack.run.clone(),
        };
        let meta_path = dir.join("vm.json");
        std::fs::write(
            &meta_path,
            serde_json::to_string_pretty(&meta).expect("meta serialises"),
        )
        .map_err(failed("write", &meta_path))?;
        self.boot(&vm, &dir, &meta).await?;
        Ok(self.record(resource, &meta))
    }

    fn record(&self, resource: &Resource, meta: &VmMeta) -> Record {
        let mut attrs = resource.attrs.clone();
        attrs["sshPort"] = json!(meta.ssh_port);
        attrs["hostKey"] = json!(meta.host_key);
        Record {
            address: resource.address.clone(),
            kind: VM.to_string(),
            id: Some(meta.hostname.clone()),
            attrs,
            pending_token: None,
        }
    }

    async fn create_network(&self, resource: &Resource) -> Result<Record, KvmError> {
        std::fs::create_dir_all(&self.run_dir).map_err(failed("create", &self.run_dir))?;
        let pidfile = self.run_dir.join("switch.pid");
        let socket = self.socket();
        if !(read_pid(&pidfile).is_some_and(alive) && socket.exists()) {
            let log_path = self.run_dir.join("switch.log");
            let log = std::fs::File::create(&log_path).map_err(failed("create", &log_path))?;
            let exe =
                std::env::current_exe().map_err(failed("find", Path::new("the stack binary")))?;
            use std::os::unix::process::CommandExt;
            let child = Command::new(exe)
                .args(["__switch", &socket.display().to_string()])
                .stdin(Stdio::null())
                .stdout(log.try_clone().map_err(failed("open", &log_path))?)
                .stderr(log)
                .process_group(0)
                .spawn()
                .map_err(failed("start the switch for", &socket))?;
            std::fs::write(&pidfile, child.id().to_string()).map_err(failed("write", &pidfile))?;
            let start = Instant::now();
            while !socket.exists() {
                if start.elapsed() > Duration::from_secs(10) {
                    return Err(KvmError::Node {
                        node: NETWORK_ADDRESS.to_string(),
                        message: format!(
                            "the switch did not open {}: {}",
                            socket.display(),
                            tail(&log_path, 5)
                        ),
                    });
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(Record {
            address: resource.address.clone(),
            kind: NETWORK.to_string(),
            id: Some(socket.display().to_string()),
            attrs: resource.attrs.clone(),
            pending_token: None,
        })
    }

    /// Powers a VM off (ACPI, then a kill after a bounded wait) and removes its folder.
    async fn delete_vm(&self, hostname: &str) -> Result<(), KvmError> {
        let dir = self.vm_dir(hostname);
        if let Some(pid) = read_pid(&dir.join("qemu.pid")).filter(|pid| alive(*pid)) {
            if let Ok(mut qmp) = qmp::Qmp::connect(&dir.join("qmp.sock")).await {
                let _ = qmp.execute("system_powerdown").await;
            }
            let wait = POWERDOWN_WAIT.min(self.stack.timeouts.delete);
            let start = Instant::now();
            while alive(pid) && start.elapsed() < wait {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            if alive(pid) {
                kill(pid);
            }
        }
        match std::fs::remove_dir_all(&dir) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                Err(failed("remove", &dir)(err).into())
            }
            _ => Ok(()),
        }
    }

    fn delete_network(&self) -> Result<(), KvmError> {
        let pidfile = self.run_dir.join("switch.pid");
        if let Some(pid) = read_pid(&pidfile).filter(|pid| alive(*pid)) {
            kill(pid);
        }
        for name in ["switch.sock", "switch.pid", "switch.log"] {
            let _ = std::fs::remove_file(self.run_dir.join(name));
        }
        Ok(())
    }

    /// Every VM folder with its state, for refresh, status and leftovers.
    async fn observe_vms(&self) -> Vec<(VmMeta, PathBuf, String)> {
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir(self.run_dir.join("vms")) else {
            return out;
        };
        for entry in entries.flatten() {
            let dir = entry.path();
            let Some(meta) = self.meta(&dir) else {
                continue;
            };
            let pid = read_pid(&dir.join("qemu.pid")).filter(|pid| alive(*pid));
            let state = match pid {
                None => "stopped".to_string(),
                Some(_) => match Self::qmp_status(&dir).await.as_deref() {
                    Some("running") => "running".to_string(),
                    Some(other) => other.to_string(),
                    None => "unresponsive".to_string(),
                },
            };
            out.push((meta, dir, state));
        }
        out.sort_by(|a, b| a.0.address.cmp(&b.0.address));
        out
    }
}

/// The provider's operations; `Provider` below is their object-safe face.
impl KvmProvider {
    async fn create(&self, resource: &Resource) -> Result<Record, KvmError> {
        match resource.kind.as_str() {
            NETWORK => self.create_network(resource).await,
            _ => self.create_vm(resource).await,
        }
    }

    async fn update(&self, change: &Change) -> Result<Record, KvmError> {
        let resource = Resource {
            address: change.address.clone(),
            kind: change.kind.clone(),
            attrs: change.after.clone().unwrap_or_default(),
            handling: Handling::default(),
        };
        if change.kind == NETWORK {
            self.delete_network()?;
            return self.create_network(&resource).await;
        }
        // A VM that stopped, paused or changed its CPUs or memory is restarted
        // on the same disk and seed.
        let vm = self.plan_of(&change.address)?.clone();
        let dir = self.vm_dir(&vm.hostname);
        let meta = self.meta(&dir).ok_or_else(|| KvmError::Node {
            node: vm.hostname.clone(),
            message: format!("{} is missing", dir.join("vm.json").display()),
        })?;
        Self::stop_now(&dir).await;
        self.boot(&vm, &dir, &meta).await?;
        Ok(self.record(&resource, &meta))
    }

    async fn delete(&self, kind: &str, id: &str) -> Result<(), KvmError> {
        match kind {
            NETWORK => self.delete_network(),
            _ => self.delete_vm(id).await,
        }
    }
}

impl KvmProvider {
    fn desired(&self) -> Vec<Resource> {
        let mut resources = vec![Resource {
            address: NETWORK_ADDRESS.to_string(),
            kind: NETWORK.to_string(),
            attrs: json!({
                "cidr": self.stack.network.cidr.map(|c| c.to_string()),
                "state": "running",
            }),
            handling: Handling::default().replace(vec![ReplaceRule::at("cidr")]),
        }];
        for vm in &self.vms {
            resources.push(Resource {
                address: vm.address.clone(),
                kind: VM.to_string(),
                attrs: self.vm_attrs(vm),
                handling: vm_handling(),
            });
        }
        resources
    }

    async fn refresh(&self) -> Result<Vec<Observed>, KvmError> {
        let mut observed = Vec::new();
        let switch_pid = read_pid(&self.run_dir.join("switch.pid"));
        if switch_pid.is_some() {
            let running = switch_pid.is_some_and(alive) && self.socket().exists();
            observed.push(Observed {
                address: NETWORK_ADDRESS.to_string(),
                kind: NETWORK.to_string(),
                id: self.socket().display().to_string(),
                attrs: json!({ "state": if running { "running" } else { "stopped" } }),
                handling: Handling::default(),
            });
        }
        for (meta, dir, state) in self.observe_vms().await {
            let overlay = dir.join("disk.qcow2");
            if !overlay.exists() {
                // The disk is gone: nothing of this VM is left to repair.
                continue;
            }
            let mut attrs = json!({
                "state": state,
                "privateAddress": meta.private_address,
            });
            if let Ok((_, size)) = image::info(&overlay) {
                attrs["diskGiB"] = json!(size.div_ceil(1 << 30));
            }
            if let Some(pid) = read_pid(&dir.join("qemu.pid")).filter(|p| alive(*p)) {
                let (cpus, memory) = running_size(pid);
                if let Some(cpus) = cpus {
                    attrs["cpus"] = json!(cpus);
                }
                if let Some(memory) = memory {
                    attrs["memoryMiB"] = json!(memory);
                }
            }
            observed.push(Observed {
                address: meta.address.clone(),
                kind: VM.to_string(),
                id: meta.hostname.clone(),
                attrs,
                handling: vm_handling(),
            });
        }
        Ok(observed)
    }

    /// The expiring environments of this stack and of its runs: the VM
    /// folders under the stack file's `.stack/` whose `vm.json` carries an
    /// expiry.
    fn environments(&self) -> Vec<Expiring> {
        let base = self.stack.run.as_ref().map_or(&self.stack.name, |r| &r.of);
        let mut found = Vec::new();
        let envs = std::fs::read_dir(self.stack.state_dir())
            .into_iter()
            .flatten();
        for env in envs.flatten() {
            let name = env.file_name().to_string_lossy().into_owned();
            let vms = std::fs::read_dir(env.path().join("vms"))
                .into_iter()
                .flatten();
            for vm in vms.flatten() {
                let Some(meta) = self.meta(&vm.path()) else {
                    continue;
                };
                let Some(expires) = meta.expires else {
                    continue;
                };
                let of = meta.run.as_ref().map_or(&name, |r| &r.of);
                if of == base {
                    let run = meta.run.as_ref().map(|r| r.id.as_str());
                    let thing = format!("vm {} in {}", meta.hostname, vm.path().display());
                    Expiring::merge(&mut found, &name, run, expires, thing);
                }
            }
        }
        found
    }

    async fn leftovers(&self) -> Result<Leftovers, KvmError> {
        let mut left: Vec<String> = self
            .observe_vms()
            .await
            .into_iter()
            .map(|(meta, dir, state)| {
                format!("vm {} ({state}) in {}", meta.hostname, dir.display())
            })
            .collect();
        if let Some(pid) = read_pid(&self.run_dir.join("switch.pid")).filter(|p| alive(*p)) {
            left.push(format!("switch process {pid}"));
        }
        // A VM folder with no QEMU running in it is what a create that
        // failed half-way left (its host key, an overlay, a seed): the
        // stack's own generated files, removed here. What cannot be removed
        // is named, file by file.
        let vms = self.run_dir.join("vms");
        for entry in std::fs::read_dir(&vms).into_iter().flatten().flatten() {
            let dir = entry.path();
            if read_pid(&dir.join("qemu.pid")).is_some_and(alive) {
                continue;
            }
            if let Err(err) = std::fs::remove_dir_all(&dir) {
                left.push(format!("{} (cannot remove it: {err})", list_files(&dir)));
            }
        }
        let _ = std::fs::remove_dir(&vms);
        let _ = std::fs::remove_dir(&self.run_dir);
        for path in [vms]
            .into_iter()
            .chain(
                ["switch.sock", "switch.pid", "switch.log"]
                    .iter()
                    .map(|f| self.run_dir.join(f)),
            )
            .filter(|path| path.exists())
        {
            if !left.iter().any(|l| l.contains(&path.display().to_string())) {
                left.push(list_files(&path));
            }
        }
        Ok(Leftovers {
            left,
            checked: Some(format!(
                "Nothing of stack {} is left: no VM, switch, socket, disk or seed.",
                self.stack.name
            )),
        })
    }

    fn ssh_nodes(&self) -> Vec<SshNode> {
        self.vms
            .iter()
            .filter_map(|vm| {
                let meta = self.meta(&self.vm_dir(&vm.hostname))?;
                Some(SshNode {
                    key: vm
                        .address
                        .trim_start_matches(&format!("kvm.{VM}."))
                        .to_string(),
                    hostname: vm.hostname.clone(),
                    id: vm.hostname.clone(),
                    ssh: SocketAddr::from(([127, 0, 0, 1], meta.ssh_port)),
                    user: self.settings.ssh_user.clone(),
                    host_key: meta.host_key,
                    private_ip: vm.private_address.to_string(),
                    api: ("127.0.0.1".to_string(), meta.api_port.unwrap_or(16443)),
                })
            })
            .collect()
    }

    async fn status(&self) -> StatusPart {
        let prefix = format!("kvm.{VM}.");
        let nodes = self
            .observe_vms()
            .await
            .into_iter()
            .map(|(meta, _, state)| {
                let short = meta
                    .address
                    .trim_start_matches(&prefix)
                    .replace('[', "-")
                    .replace(']', "");
                NodeStatus {
                    ssh: Some(SshAccess {
                        host: "127.0.0.1".to_string(),
                        port: meta.ssh_port,
                        user: self.settings.ssh_user.clone(),
                        host_key: meta.host_key.clone(),
                        names: vec![meta.address.clone(), short, meta.hostname.clone()],
                    }),
                    address: meta.address,
                    id: meta.hostname,
                    state,
                    public_address: Some(format!("127.0.0.1:{} (ssh)", meta.ssh_port)),
                    private_address: Some(meta.private_address),
                }
            })
            .collect();
        StatusPart {
            nodes,
            ssh_user: Some(self.settings.ssh_user.clone()),
            ..StatusPart::default()
        }
    }
}

/// A VM is made after the network and goes before it; a new disk, image,
/// address or seed makes it again.
fn vm_handling() -> Handling {
    Handling::default()
        .replace(
            ["diskGiB", "image", "privateAddress", "seedSha256"]
                .iter()
                .map(|p| ReplaceRule::at(p))
                .collect(),
        )
        .waits_for([NETWORK_ADDRESS])
}

impl Provider for KvmProvider {
    fn kinds(&self) -> &'static [&'static str] {
        &[NETWORK, VM]
    }

    fn desired(&self) -> Vec<Resource> {
        self.desired()
    }

    fn refresh<'a>(
        &'a self,
        _records: &'a State,
    ) -> BoxFuture<'a, Result<Vec<Observed>, ProviderError>> {
        Box::pin(async move { Ok(self.refresh().await?) })
    }

    fn create<'a>(
        &'a self,
        resource: &'a Resource,
        _token: &'a str,
        _state: &'a State,
    ) -> BoxFuture<'a, Result<Record, ProviderError>> {
        Box::pin(async move { Ok(self.create(resource).await?) })
    }

    fn update<'a>(
        &'a self,
        change: &'a Change,
        _state: &'a State,
    ) -> BoxFuture<'a, Result<Record, ProviderError>> {
        Box::pin(async move { Ok(self.update(change).await?) })
    }

    fn delete<'a>(
        &'a self,
        kind: &'a str,
        id: &'a str,
    ) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async move { Ok(self.delete(kind, id).await?) })
    }

    fn leftovers(&self) -> BoxFuture<'_, Result<Leftovers, ProviderError>> {
        Box::pin(async move { Ok(self.leftovers().await?) })
    }

    fn environments(&self) -> BoxFuture<'_, Result<Vec<Expiring>, ProviderError>> {
        Box::pin(async move { Ok(self.environments()) })
    }

    fn status(&self) -> BoxFuture<'_, Result<StatusPart, ProviderError>> {
        Box::pin(async move { Ok(self.status().await) })
    }
}

impl Nodes for KvmProvider {
    /// Every VM's private address comes from `network.cidr`.
    fn addresses_in_advance(&self) -> bool {
        true
    }

    /// Each VM's API port is forwarded to a loopback port.
    fn api_on_loopback(&self) -> bool {
        true
    }

    fn node_address(&self, key: &str) -> String {
        format!("kvm.{VM}.{key}")
    }

    fn ssh_nodes<'a>(
        &'a self,
        _state: &'a State,
    ) -> BoxFuture<'a, Result<Vec<SshNode>, NodesError>> {
        Box::pin(async move { Ok(self.ssh_nodes()) })
    }
}
