//! The registry peer of the upgrade tests: Debian's real `docker-registry`
//! (distribution 2.8), started on loopback with its storage in a temp
//! folder, anonymous, with htpasswd basic auth, or with token auth from the
//! token service TEST DOUBLE (`tests/registry/token_issuer.py`); content is
//! pushed through the registry's own API. In front of it, when a test needs
//! pages, the paging proxy TEST DOUBLE (`tests/registry/paging_proxy.py`):
//! registry 2.8 does not page tags lists.

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, runtime};

/// The tags every test repository has: the issue's, and older ones so
/// that a small page size gives several pages.
pub(crate) const TAGS: [&str; 19] = [
    "3.3.0",
    "3.3.1",
    "3.3.2",
    "3.3.3",
    "3.3.4",
    "3.3.5",
    "3.3.6",
    "3.3.7",
    "3.3.8",
    "3.3.9",
    "3.4.9",
    "3.5.0",
    "3.5.1",
    "3.5.2",
    "3.5.3-rc.1",
    "3.6.0",
    "3.6.1",
    "4.0.0",
    "latest",
];

/// How a registry asks for logins.
pub(crate) enum Auth<'a> {
    Anonymous,
    /// A `htpasswd -B` file.
    Htpasswd(&'a Path),
    /// The token service's URL, the service and issuer names, the bundle.
    Token {
        realm: String,
        service: &'a str,
        issuer: &'a str,
        bundle: &'a Path,
    },
}

fn tests_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/registry")
}

fn wait_for_port(port: u16, what: &str, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited: {status}");
        }
        assert!(Instant::now() < deadline, "{what} did not listen on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running process the test owns; killed when dropped.
pub(crate) struct Process {
    child: Child,
    pub(crate) port: u16,
    pub(crate) log: PathBuf,
}

impl Process {
    pub(crate) fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub(crate) fn log_lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real registry on loopback serving `storage`, its log (access log
/// included) in `dir`.
pub(crate) fn start_registry(dir: &Path, name: &str, storage: &Path, auth: Auth) -> Process {
    let port = free_port();
    let auth = match auth {
        Auth::Anonymous => String::new(),
        Auth::Htpasswd(file) => format!(
            "auth:\n  htpasswd:\n    realm: stack-test\n    path: {}\n",
            file.display()
        ),
        Auth::Token {
            realm,
            service,
            issuer,
            bundle,
        } => format!(
            "auth:\n  token:\n    realm: {realm}\n    service: {service}\n    issuer: {issuer}\n    rootcertbundle: {}\n",
            bundle.display()
        ),
    };
    let config = dir.join(format!("{name}.yml"));
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n{auth}",
            storage.display()
        ),
    )
    .unwrap();
    let log = dir.join(format!("{name}.log"));
    let out = std::fs::File::create(&log).unwrap();
    let mut child = Command::new("docker-registry")
        .arg("serve")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("docker-registry (Debian's package docker-registry; .ci/run installs it)");
    wait_for_port(port, "docker-registry", &mut child);
    Process { child, port, log }
}

/// The registry's access-log lines (`"GET /v2/... HTTP/1.1" 200 ...`).
pub(crate) fn access_log(registry: &Process) -> Vec<String> {
    registry
        .log_lines()
        .into_iter()
        .filter_map(|l| l.split_once(" \"").map(|(_, rest)| rest.to_string()))
        .filter(|l| {
            l.starts_with("GET ")
                || l.starts_with("HEAD ")
                || l.starts_with("PUT ")
                || l.starts_with("POST ")
        })
        .collect()
}

/// Storage with the repositories `repositories`, each with [`TAGS`], pushed
/// through a registry's API; the digest of each tag's manifest, as the
/// registry gave it.
pub(crate) fn seed(dir: &Path, repositories: &[&str]) -> (PathBuf, BTreeMap<String, String>) {
    let storage = dir.join("storage");
    let registry = start_registry(dir, "seed", &storage, Auth::Anonymous);
    let mut digests = BTreeMap::new();
    for repository in repositories {
        digests.extend(push(&registry, repository, &TAGS));
    }
    (storage, digests)
}

/// Pushes `tags` of `repository` through an anonymous registry's API, a
/// manifest of its own per tag; `REPOSITORY:TAG` → its digest as the
/// registry gave it.
pub(crate) fn push(
    registry: &Process,
    repository: &str,
    tags: &[&str],
) -> BTreeMap<String, String> {
    let base = format!("http://{}", registry.host());
    runtime().block_on(async {
        let http = reqwest::Client::new();
        let mut digests = BTreeMap::new();
        let config = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
        let config_digest = format!("sha256:{}", sha256_hex(config));
        let started = http
            .post(format!("{base}/v2/{repository}/blobs/uploads/"))
            .send()
            .await
            .unwrap();
        assert_eq!(started.status(), 202);
        let location = started.headers()["location"].to_str().unwrap().to_string();
        let location = match location.starts_with('/') {
            true => format!("{base}{location}"),
            false => location,
        };
        let separator = if location.contains('?') { '&' } else { '?' };
        let put = http
            .put(format!("{location}{separator}digest={config_digest}"))
            .header("content-type", "application/octet-stream")
            .body(config.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(put.status(), 201);
        for tag in tags {
            let manifest = format!(
                r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[],"annotations":{{"org.opencontainers.image.version":"{tag}"}}}}"#,
                config.len()
            );
            let put = http
                .put(format!("{base}/v2/{repository}/manifests/{tag}"))
                .header("content-type", "application/vnd.oci.image.manifest.v1+json")
                .body(manifest.clone())
                .send()
                .await
                .unwrap();
            assert_eq!(put.status(), 201, "{repository}:{tag}");
            let digest = put.headers()["docker-content-digest"].to_str().unwrap().to_string();
            assert_eq!(digest, format!("sha256:{}", sha256_hex(manifest.as_bytes())));
            digests.insert(format!("{repository}:{tag}"), digest);
        }
        digests
    })
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest as _;
    format!("{:x}", sha2::Sha256::digest(data))
}

/// The paging proxy TEST DOUBLE in front of `upstream`, pages of at most
/// `page_size` tags.
pub(crate) fn start_paging_proxy(dir: &Path, upstream: &Process, page_size: u32) -> Process {
    let port = free_port();
    let log = dir.join("paging-proxy.log");
    let mut child = Command::new("python3")
        .arg(tests_dir().join("paging_proxy.py"))
        .args(["--port", &port.to_string(), "--upstream", &upstream.host()])
        .args(["--page-size", &page_size.to_string()])
        .arg("--log")
        .arg(&log)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_port(port, "paging_proxy.py", &mut child);
    Process { child, port, log }
}

/// The token service TEST DOUBLE, knowing `users` (`name:password`); its
/// certificate bundle is written to `dir/token-bundle.pem`.
pub(crate) fn start_token_issuer(
    dir: &Path,
    service: &str,
    issuer: &str,
    users: &[&str],
) -> (Process, PathBuf) {
    let port = free_port();
    let log = dir.join("token-issuer.log");
    let bundle = dir.join("token-bundle.pem");
    let mut command = Command::new("python3");
    command
        .arg(tests_dir().join("token_issuer.py"))
        .args([
            "--port",
            &port.to_string(),
            "--service",
            service,
            "--issuer",
            issuer,
        ])
        .arg("--bundle")
        .arg(&bundle)
        .arg("--log")
        .arg(&log)
        .stdin(Stdio::null());
    for user in users {
        command.args(["--user", user]);
    }
    let mut child = command.spawn().unwrap();
    wait_for_port(port, "token_issuer.py", &mut child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !bundle.exists() {
        assert!(Instant::now() < deadline, "token_issuer.py wrote no bundle");
        std::thread::sleep(Duration::from_millis(20));
    }
    (Process { child, port, log }, bundle)
}

/// A `htpasswd -B` file with one user.
pub(crate) fn htpasswd(dir: &Path, user: &str, password: &str) -> PathBuf {
    let output = Command::new("htpasswd")
        .args(["-Bbn", user, password])
        .output()
        .expect("htpasswd (Debian's package apache2-utils; .ci/run installs it)");
    assert!(output.status.success());
    let path = dir.join("htpasswd");
    std::fs::write(&path, output.stdout).unwrap();
    path
}
