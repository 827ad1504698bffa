//! The helpers every subsystem's tests share: the `stack` binary, a folder
//! with a stack file to run it in (isolated from the host's configuration),
//! and reading its output. One submodule per peer the tests drive.

pub(crate) mod couch;
pub(crate) mod image;
pub(crate) mod kube;
pub(crate) mod moto;
pub(crate) mod postgres;
pub(crate) mod registry;

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

pub(crate) const STACK: &str = env!("CARGO_BIN_EXE_stack");

pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn read_request(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut data = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = stream.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        data.extend_from_slice(&buf[..n]);
        if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&data[..end]).to_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while data.len() < end + 4 + length {
                let n = stream.read(&mut buf).ok()?;
                if n == 0 {
                    return None;
                }
                data.extend_from_slice(&buf[..n]);
            }
            return Some(data);
        }
    }
}

/// A folder with a stack file, run against one endpoint.
pub(crate) struct Env {
    dir: tempfile::TempDir,
    pub(crate) endpoint: String,
}

pub(crate) fn stack_yaml(name: &str, workers: u32) -> String {
    format!(
        "version: 1\nname: {name}\nprovider:\n  ec2:\n    ami: ami-12c6146b\nnetwork:\n  allowedCidrs: [203.0.113.0/24]\n  ingressCidrs: [198.51.100.0/24]\nnodes:\n  - name: control\n    disk: 30GiB\n  - name: worker\n    count: {workers}\n    instanceType: t3.large\ntags:\n  team: platform\n"
    )
}

impl Env {
    pub(crate) fn new(name: &str, workers: u32, endpoint: String) -> Env {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("stack.yaml"), stack_yaml(name, workers)).unwrap();
        Env { dir, endpoint }
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }

    pub(crate) fn command(&self, args: &[&str]) -> Command {
        self.command_at(&self.endpoint, args)
    }

    /// Isolated from the host's AWS configuration; IMDS off so nothing
    /// leaves loopback.
    pub(crate) fn command_at(&self, endpoint: &str, args: &[&str]) -> Command {
        let mut command = Command::new(STACK);
        command.args(args);
        self.isolate(&mut command, endpoint);
        command
    }

    pub(crate) fn isolate(&self, command: &mut Command, endpoint: &str) {
        command
            .current_dir(self.path())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", self.path())
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_CONFIG_FILE", self.path().join("no-aws-config"))
            .env(
                "AWS_SHARED_CREDENTIALS_FILE",
                self.path().join("no-aws-credentials"),
            )
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_ENDPOINT_URL_EC2", endpoint)
            .stdin(Stdio::null());
    }

    /// Starts `stack` in the background with its output captured.
    pub(crate) fn spawn(&self, args: &[&str]) -> Child {
        self.command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    pub(crate) fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// Runs with another EC2 endpoint (empty: none).
    pub(crate) fn run_at(&self, endpoint: &str, args: &[&str]) -> Output {
        self.command_at(endpoint, args).output().unwrap()
    }

    pub(crate) fn state(&self, name: &str) -> serde_json::Value {
        let path = self
            .path()
            .join(".stack")
            .join(format!("{name}.state.json"));
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    pub(crate) fn id_of(&self, name: &str, address: &str) -> String {
        let state = self.state(name);
        state["resources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["address"] == address)
            .and_then(|r| r["id"].as_str())
            .unwrap_or_else(|| panic!("{address} is not in the state"))
            .to_string()
    }
}

pub(crate) fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[track_caller]
pub(crate) fn expect_code(output: &Output, code: i32) {
    assert_eq!(
        output.status.code(),
        Some(code),
        "stdout:\n{}\nstderr:\n{}",
        text(&output.stdout),
        text(&output.stderr)
    );
}

pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}
