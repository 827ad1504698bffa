//! The KVM peers: the Debian test image that QEMU boots, KVM and bootstrap
//! stack files that use it, a file server to download it from, and looking
//! at the VMs (their folders, their processes, their OpenSSH, the microk8s
//! stand-in's log).

use std::io::Write;
use std::net::{Shutdown, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use super::{expect_code, read_request, text, Env};

/// The Debian test image (kernel, initrd, root file system), built once by
/// `tests/image/build` and cached outside the checkout.
pub(crate) fn test_image() -> PathBuf {
    static IMAGE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/image/build");
            let output = Command::new(&script).output().unwrap();
            assert!(
                output.status.success(),
                "building the test image failed:\n{}",
                text(&output.stderr)
            );
            PathBuf::from(text(&output.stdout).trim())
        })
        .clone()
}

/// The root file system line of a KVM stack: a local path, or a URL with its sha256.
pub(crate) enum RootFs {
    Local,
    Url(String, String),
}

fn kvm_yaml(name: &str, count: u32, runcmd: &str, rootfs: &RootFs) -> String {
    let image = test_image();
    let rootfs = match rootfs {
        RootFs::Local => format!("path: {}", image.join("rootfs.qcow2").display()),
        RootFs::Url(url, sha256) => format!("url: {url}\n      sha256: {sha256}"),
    };
    format!(
        "version: 1\nname: {name}\nprovider:\n  kvm:\n    accel: tcg\nnetwork:\n  cidr: 10.42.0.0/24\nnodes:\n  - name: node\n    count: {count}\n    cpus: 1\n    memory: 768MiB\n    disk: 8GiB\n    image:\n      {rootfs}\n      kernel: {}\n      initrd: {}\n{runcmd}timeouts:\n  ready: 8m\n",
        image.join("vmlinuz").display(),
        image.join("initrd.img").display(),
    )
}

pub(crate) fn kvm_env(name: &str, count: u32, runcmd: &str, rootfs: &RootFs) -> Env {
    let env = Env::new(name, 1, "http://127.0.0.1:9".to_string());
    std::fs::write(
        env.path().join("stack.yaml"),
        kvm_yaml(name, count, runcmd, rootfs),
    )
    .unwrap();
    env
}

/// Serves one file over HTTP on loopback. The first answer breaks off
/// halfway; `Range: bytes=N-` requests get the rest (206), as a resume.
pub(crate) struct FileServer {
    pub(crate) port: u16,
    /// The `Range` start of each request (`None` for a whole-file request).
    pub(crate) ranges: Arc<Mutex<Vec<Option<usize>>>>,
}

impl FileServer {
    pub(crate) fn start(path: &Path) -> FileServer {
        let data = Arc::new(std::fs::read(path).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let ranges = Arc::new(Mutex::new(Vec::new()));
        let seen = ranges.clone();
        thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(mut client) = client else { continue };
                let Some(request) = read_request(&mut client) else {
                    continue;
                };
                let head = String::from_utf8_lossy(&request).to_lowercase();
                let start = head
                    .lines()
                    .find_map(|l| l.strip_prefix("range: bytes="))
                    .and_then(|r| r.trim().trim_end_matches('-').parse::<usize>().ok());
                let first = {
                    let mut seen = seen.lock().unwrap();
                    seen.push(start);
                    seen.len() == 1
                };
                let len = data.len();
                let (head, body) = match start {
                    Some(from) => (
                        format!("HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {from}-{}/{len}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", len - 1, len - from),
                        &data[from..],
                    ),
                    None if first => (format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"), &data[..len / 2]),
                    None => (format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"), &data[..]),
                };
                let _ = client.write_all(head.as_bytes());
                let _ = client.write_all(body);
                let _ = client.shutdown(Shutdown::Both);
            }
        });
        FileServer { port, ranges }
    }
}

pub(crate) fn sha256_file(path: &Path) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(std::fs::read(path).unwrap());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// QEMU and switch processes whose command line mentions `needle`.
pub(crate) fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) && !cmdline.contains("cargo") {
            found.push(cmdline);
        }
    }
    found
}

pub(crate) fn vm_dir(env: &Env, stack: &str, node: u32) -> PathBuf {
    env.path()
        .join(format!(".stack/{stack}/vms/{stack}-node-{node}"))
}

pub(crate) fn kill_vm(env: &Env, stack: &str, node: u32) {
    let pid = std::fs::read_to_string(vm_dir(env, stack, node).join("qemu.pid")).unwrap();
    let status = Command::new("sh")
        .args(["-c", &format!("kill -9 {}", pid.trim())])
        .status()
        .unwrap();
    assert!(status.success());
    thread::sleep(Duration::from_millis(300));
}

pub(crate) fn reaches(env: &Env, from: u32, to_address: &str) -> bool {
    let probe = format!("timeout 5 bash -c '</dev/tcp/{to_address}/22'");
    env.run(&["ssh", &format!("node-{from}"), "--", &probe])
        .status
        .success()
}

/// A control node and a worker with microk8s; `control_runcmd` goes into the
/// control group's user-data.
pub(crate) fn bootstrap_yaml(name: &str, control_runcmd: &str) -> String {
    let image = test_image();
    let group = |name: &str, role: &str, runcmd: &str| {
        format!(
            "  - name: {name}\n    role: {role}\n    cpus: 1\n    memory: 768MiB\n    disk: 8GiB\n    image:\n      path: {}\n      kernel: {}\n      initrd: {}\n{runcmd}",
            image.join("rootfs.qcow2").display(),
            image.join("vmlinuz").display(),
            image.join("initrd.img").display(),
        )
    };
    format!(
        "version: 1\nname: {name}\nprovider:\n  kvm:\n    accel: tcg\nnetwork:\n  cidr: 10.42.0.0/24\nnodes:\n{}{}kubernetes:\n  channel: 1.32/stable\ntimeouts:\n  ready: 8m\n",
        group("control", "control", control_runcmd),
        group("worker", "worker", ""),
    )
}

/// What the stand-in for snap and microk8s on a node was asked to do, in order
/// (the reads `plan` makes for drift left out).
pub(crate) fn stand_in_log(env: &Env, node: &str) -> Vec<String> {
    let output = env.run(&["ssh", node, "--", "cat /var/log/stand-in.log"]);
    expect_code(&output, 0);
    text(&output.stdout)
        .lines()
        .map(|l| {
            l.split_once(' ')
                .map_or(l, |(_, command)| command)
                .to_string()
        })
        .filter(|l| {
            !l.starts_with("snap list")
                && !l.contains("status --format short")
                && !l.starts_with("microk8s kubectl")
        })
        .collect()
}
