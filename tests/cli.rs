//! Drives the real `stack` binary against a real `moto_server` (PyPI
//! `moto[server]`) that each test starts on a free loopback port. A small
//! loopback proxy between them counts requests, slows them down, or SIGKILLs
//! `stack` at an exact request, so interruptions are repeatable.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use aws_sdk_ec2::types::{AttributeValue, Filter, IpPermission, IpRange};

const STACK: &str = env!("CARGO_BIN_EXE_stack");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A real moto server on loopback, stopped on drop.
struct Moto {
    child: Child,
    port: u16,
}

impl Moto {
    fn start() -> Moto {
        let port = free_port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "moto_server is not installed: run `pip install 'moto[server]'` (.ci/run does)",
            );
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "moto_server did not start on port {port}"
            );
            thread::sleep(Duration::from_millis(100));
        }
        Moto { child, port }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the proxy does to the requests it passes on.
#[derive(Default)]
struct ProxyRules {
    /// SIGKILL this process when the n-th request's answer arrives, before
    /// passing it on (the world changed; `stack` never learns it).
    kill_at: Option<usize>,
    victim: Option<Arc<Mutex<Child>>>,
    delay: Duration,
}

/// A loopback HTTP proxy in front of moto.
struct Proxy {
    port: u16,
    requests: Arc<AtomicUsize>,
    rules: Arc<Mutex<ProxyRules>>,
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

/// Forces `Connection: close` so each request has its own connection.
fn with_close(request: &[u8]) -> Vec<u8> {
    let end = request.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&request[..end]);
    let mut out: Vec<u8> = head
        .lines()
        .filter(|l| !l.to_lowercase().starts_with("connection:"))
        .collect::<Vec<_>>()
        .join("\r\n")
        .into_bytes();
    out.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
    out.extend_from_slice(&request[end + 4..]);
    out
}

impl Proxy {
    fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(AtomicUsize::new(0));
        let rules = Arc::new(Mutex::new(ProxyRules::default()));
        let (count, shared) = (requests.clone(), rules.clone());
        thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(mut client) = client else { continue };
                let (count, rules) = (count.clone(), shared.clone());
                thread::spawn(move || {
                    let Some(request) = read_request(&mut client) else {
                        return;
                    };
                    let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                    let delay = rules.lock().unwrap().delay;
                    thread::sleep(delay);
                    let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                        return;
                    };
                    if server.write_all(&with_close(&request)).is_err() {
                        return;
                    }
                    let mut answer = Vec::new();
                    let _ = server.read_to_end(&mut answer);
                    {
                        let rules = rules.lock().unwrap();
                        if rules.kill_at == Some(n) {
                            if let Some(victim) = &rules.victim {
                                let _ = victim.lock().unwrap().kill();
                            }
                            let _ = client.shutdown(Shutdown::Both);
                            return;
                        }
                    }
                    let _ = client.write_all(&answer);
                });
            }
        });
        Proxy {
            port,
            requests,
            rules,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn count(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

/// A folder with a stack file, run against one endpoint.
struct Env {
    dir: tempfile::TempDir,
    endpoint: String,
}

fn stack_yaml(name: &str, workers: u32) -> String {
    format!(
        "version: 1\nname: {name}\nprovider:\n  ec2:\n    ami: ami-12c6146b\nnetwork:\n  allowedCidrs: [203.0.113.0/24]\n  ingressCidrs: [198.51.100.0/24]\nnodes:\n  - name: control\n    disk: 30GiB\n  - name: worker\n    count: {workers}\n    instanceType: t3.large\ntags:\n  team: platform\n"
    )
}

impl Env {
    fn new(name: &str, workers: u32, endpoint: String) -> Env {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("stack.yaml"), stack_yaml(name, workers)).unwrap();
        Env { dir, endpoint }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn command(&self, args: &[&str]) -> Command {
        self.command_at(&self.endpoint, args)
    }

    /// Isolated from the host's AWS configuration; IMDS off so nothing
    /// leaves loopback.
    fn command_at(&self, endpoint: &str, args: &[&str]) -> Command {
        let mut command = Command::new(STACK);
        command.args(args);
        self.isolate(&mut command, endpoint);
        command
    }

    fn isolate(&self, command: &mut Command, endpoint: &str) {
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
    fn spawn(&self, args: &[&str]) -> Child {
        self.command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    fn state(&self, name: &str) -> serde_json::Value {
        let path = self
            .path()
            .join(".stack")
            .join(format!("{name}.state.json"));
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn id_of(&self, name: &str, address: &str) -> String {
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

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[track_caller]
fn expect_code(output: &Output, code: i32) {
    assert_eq!(
        output.status.code(),
        Some(code),
        "stdout:\n{}\nstderr:\n{}",
        text(&output.stdout),
        text(&output.stderr)
    );
}

fn ec2(endpoint: &str) -> aws_sdk_ec2::Client {
    let config = aws_sdk_ec2::Config::builder()
        .behavior_version(aws_sdk_ec2::config::BehaviorVersion::latest())
        .region(aws_sdk_ec2::config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(aws_sdk_ec2::config::Credentials::new(
            "testing", "testing", None, None, "tests",
        ))
        .build();
    aws_sdk_ec2::Client::from_conf(config)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Everything moto still holds that is tagged with the stack.
#[derive(Debug, PartialEq, Eq)]
struct Tagged {
    instances: Vec<String>,
    groups: usize,
    key_pairs: usize,
}

fn tagged(endpoint: &str, stack: &str) -> Tagged {
    let client = ec2(endpoint);
    let by_tag = || Filter::builder().name("tag:stack").values(stack).build();
    runtime().block_on(async {
        let reservations = client
            .describe_instances()
            .filters(by_tag())
            .filters(
                Filter::builder()
                    .name("instance-state-name")
                    .set_values(Some(
                        ["pending", "running", "stopping", "stopped"]
                            .map(String::from)
                            .to_vec(),
                    ))
                    .build(),
            )
            .send()
            .await
            .unwrap();
        let mut instances: Vec<String> = reservations
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .flat_map(|i| {
                i.tags()
                    .iter()
                    .filter(|t| t.key() == Some("stack:address"))
                    .map(|t| t.value().unwrap().to_string())
            })
            .collect();
        instances.sort();
        let groups = client
            .describe_security_groups()
            .filters(by_tag())
            .send()
            .await
            .unwrap()
            .security_groups()
            .len();
        let key_pairs = client
            .describe_key_pairs()
            .filters(by_tag())
            .send()
            .await
            .unwrap()
            .key_pairs()
            .len();
        Tagged {
            instances,
            groups,
            key_pairs,
        }
    })
}

impl Tagged {
    /// What a `down` must leave.
    fn nothing() -> Tagged {
        Tagged {
            instances: vec![],
            groups: 0,
            key_pairs: 0,
        }
    }

    /// The key pair, the group and the three nodes of `stack_yaml(_, 2)`.
    fn three_nodes() -> Tagged {
        Tagged {
            instances: [
                "ec2.instance.control[0]",
                "ec2.instance.worker[0]",
                "ec2.instance.worker[1]",
            ]
            .map(String::from)
            .to_vec(),
            groups: 1,
            key_pairs: 1,
        }
    }
}

#[test]
fn up_plan_drift_repair_down() {
    let moto = Moto::start();
    let env = Env::new("drift", 2, moto.url());
    let up = env.run(&["up", "--yes"]);
    expect_code(&up, 0);
    assert!(
        text(&up.stdout).contains("Plan: 5 to create"),
        "{}",
        text(&up.stdout)
    );
    expect_code(&env.run(&["plan", "--detailed-exitcode"]), 0);
    assert_eq!(tagged(&moto.url(), "drift"), Tagged::three_nodes());

    // Out of band: stop one instance and change its type, terminate another,
    // add one security-group rule and remove one, change a tag, delete the key pair.
    let client = ec2(&moto.url());
    let stopped = env.id_of("drift", "ec2.instance.worker[0]");
    let terminated = env.id_of("drift", "ec2.instance.worker[1]");
    let control = env.id_of("drift", "ec2.instance.control[0]");
    let group = env.id_of("drift", "ec2.security_group.main");
    runtime().block_on(async {
        client
            .stop_instances()
            .instance_ids(&stopped)
            .send()
            .await
            .unwrap();
        client
            .modify_instance_attribute()
            .instance_id(&stopped)
            .instance_type(AttributeValue::builder().value("t3.small").build())
            .send()
            .await
            .unwrap();
        client
            .terminate_instances()
            .instance_ids(&terminated)
            .send()
            .await
            .unwrap();
        let rule = |port: i32, cidr: &str| {
            IpPermission::builder()
                .ip_protocol("tcp")
                .from_port(port)
                .to_port(port)
                .ip_ranges(IpRange::builder().cidr_ip(cidr).build())
                .build()
        };
        client
            .authorize_security_group_ingress()
            .group_id(&group)
            .ip_permissions(rule(3306, "0.0.0.0/0"))
            .send()
            .await
            .unwrap();
        client
            .revoke_security_group_ingress()
            .group_id(&group)
            .ip_permissions(rule(22, "203.0.113.0/24"))
            .send()
            .await
            .unwrap();
        client
            .create_tags()
            .resources(&control)
            .tags(
                aws_sdk_ec2::types::Tag::builder()
                    .key("team")
                    .value("someone-else")
                    .build(),
            )
            .send()
            .await
            .unwrap();
        client
            .delete_key_pair()
            .key_name("stack-drift")
            .send()
            .await
            .unwrap();
    });

    let plan = env.run(&["plan", "--detailed-exitcode"]);
    expect_code(&plan, 2);
    let shown = text(&plan.stdout);
    for expected in [
        "Drift: the live world differs from what stack last applied",
        "~   ec2.instance.worker[0]",
        "state: \"stopped\" → \"running\"",
        "instanceType: \"t3.small\" → \"t3.large\"",
        "+   ec2.instance.worker[1]",
        "gone from the live world (deleted or terminated out of band)",
        "~   ec2.security_group.main",
        "ingress: - \"tcp 3306 from 0.0.0.0/0\"",
        "ingress: + \"tcp 22 from 203.0.113.0/24\"",
        "~   ec2.instance.control[0]",
        "tags.team: \"someone-else\" → \"platform\"",
        "+   ec2.key_pair.main",
        "Plan: 2 to create, 3 to update, 0 to replace, 0 to delete (5 repairing drift).",
    ] {
        assert!(
            shown.contains(expected),
            "plan lacks {expected:?}:\n{shown}"
        );
    }
    let json = env.run(&["plan", "--output", "json"]);
    expect_code(&json, 0);
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(json["formatVersion"], 1);
    assert_eq!(json["summary"]["drift"], 5);
    assert!(json["changes"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["drift"] == true));

    expect_code(&env.run(&["up", "--yes"]), 0);
    expect_code(&env.run(&["plan", "--detailed-exitcode"]), 0);
    assert_eq!(tagged(&moto.url(), "drift"), Tagged::three_nodes());

    let status = env.run(&["status"]);
    expect_code(&status, 0);
    let status = text(&status.stdout);
    assert!(
        status.contains("ssh key: .stack/drift.id_ed25519"),
        "{status}"
    );
    assert!(
        status.contains("ec2.instance.worker[1]") && status.contains("running"),
        "{status}"
    );

    let down = env.run(&["down", "--yes"]);
    expect_code(&down, 0);
    assert!(text(&down.stdout).contains("Nothing tagged stack=drift is left."));
    assert_eq!(tagged(&moto.url(), "drift"), Tagged::nothing());
    expect_code(&env.run(&["down", "--yes"]), 0);
}

#[test]
fn sigkill_at_many_points_then_rerun_converges_without_duplicates() {
    let moto = Moto::start();
    let proxy = Proxy::start(moto.port);
    let probe = Env::new("probe", 2, proxy.url());
    expect_code(&probe.run(&["up", "--yes"]), 0);
    let requests_per_up = proxy.count();
    assert!(
        requests_per_up > 10,
        "a clean up made only {requests_per_up} requests"
    );

    let points: BTreeSet<usize> = (1..=requests_per_up)
        .step_by(3)
        .chain([requests_per_up - 1])
        .collect();
    for point in points {
        let name = format!("kill{point}");
        let env = Env::new(&name, 2, proxy.url());
        let before = proxy.count();
        let child = env
            .command(&["up", "--yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let child = Arc::new(Mutex::new(child));
        {
            let mut rules = proxy.rules.lock().unwrap();
            rules.kill_at = Some(before + point);
            rules.victim = Some(child.clone());
        }
        let status = loop {
            if let Some(status) = child.lock().unwrap().try_wait().unwrap() {
                break status;
            }
            thread::sleep(Duration::from_millis(20));
        };
        *proxy.rules.lock().unwrap() = ProxyRules::default();
        assert!(
            status.code().is_none(),
            "up was not killed at request {point}: {status:?}"
        );

        let rerun = env
            .command_at(&moto.url(), &["up", "--yes"])
            .output()
            .unwrap();
        expect_code(&rerun, 0);
        expect_code(
            &env.command_at(&moto.url(), &["plan", "--detailed-exitcode"])
                .output()
                .unwrap(),
            0,
        );
        assert_eq!(
            tagged(&moto.url(), &name),
            Tagged::three_nodes(),
            "after a kill at request {point}"
        );
        expect_code(
            &env.command_at(&moto.url(), &["down", "--yes"])
                .output()
                .unwrap(),
            0,
        );
        assert_eq!(tagged(&moto.url(), &name), Tagged::nothing());
    }
}

#[test]
fn a_second_run_fails_fast_naming_the_lock_holder() {
    let moto = Moto::start();
    let proxy = Proxy::start(moto.port);
    proxy.rules.lock().unwrap().delay = Duration::from_millis(150);
    let env = Env::new("locked", 1, proxy.url());
    let first = env.spawn(&["up", "--yes"]);
    let lock = env.path().join(".stack/locked.lock");
    let pid = first.id();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&lock)
        .unwrap_or_default()
        .contains(&format!("\"pid\":{pid}"))
    {
        assert!(
            Instant::now() < deadline,
            "the first run never took the lock"
        );
        thread::sleep(Duration::from_millis(10));
    }
    let second = env
        .command_at(&moto.url(), &["up", "--yes"])
        .output()
        .unwrap();
    expect_code(&second, 1);
    let message = text(&second.stderr);
    assert!(
        message.contains(&format!("state is locked by pid {pid} on ")),
        "{message}"
    );
    assert!(message.contains(" since "), "{message}");
    let first = first.wait_with_output().unwrap();
    expect_code(&first, 0);
    let state = env.state("locked");
    assert_eq!(state["schemaVersion"], 1);
    assert_eq!(state["resources"].as_array().unwrap().len(), 4);
    expect_code(
        &env.command_at(&moto.url(), &["plan", "--detailed-exitcode"])
            .output()
            .unwrap(),
        0,
    );
    expect_code(
        &env.command_at(&moto.url(), &["down", "--yes"])
            .output()
            .unwrap(),
        0,
    );
}

#[test]
fn corrupt_state_is_refused_and_left_untouched() {
    let moto = Moto::start();
    let env = Env::new("corrupt", 1, moto.url());
    std::fs::create_dir_all(env.path().join(".stack")).unwrap();
    let path = env.path().join(".stack/corrupt.state.json");
    std::fs::write(&path, "{\"schemaVersion\": 1, \"resources\": [").unwrap();
    for verb in [["plan", "--detailed-exitcode"], ["up", "--yes"]] {
        let output = env.run(&verb);
        expect_code(&output, 1);
        assert!(
            text(&output.stderr).contains("state file .stack/corrupt.state.json is corrupt"),
            "{}",
            text(&output.stderr)
        );
    }
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        "{\"schemaVersion\": 1, \"resources\": ["
    );
    assert_eq!(tagged(&moto.url(), "corrupt"), Tagged::nothing());
}

#[test]
fn a_broken_stack_makes_no_network_call() {
    let moto = Moto::start();
    let proxy = Proxy::start(moto.port);
    let env = Env::new("quiet", 1, proxy.url());
    std::fs::write(env.path().join("stack.yaml"), "version: 1\nname: quiet\nprovider: {ec2: {ami: ami-12c6146b}}\nnodes:\n  - name: a\n    disk: 20\n").unwrap();
    for verb in [
        &["validate"][..],
        &["plan"],
        &["up", "--yes"],
        &["down", "--yes"],
        &["status"],
    ] {
        let output = env.run(verb);
        expect_code(&output, 1);
        assert!(text(&output.stderr).contains("stack.yaml:6:11: nodes[0].disk: expected a size with a unit such as 20GiB, found `20`"), "{}", text(&output.stderr));
    }
    assert_eq!(proxy.count(), 0);
    assert!(
        !env.path().join(".stack").exists(),
        "a broken stack must not create state"
    );
}

#[test]
fn sections_not_built_yet_stop_plan_and_up_by_name() {
    let moto = Moto::start();
    let env = Env::new("later", 1, moto.url());
    let mut yaml = stack_yaml("later", 1);
    yaml.push_str(
        "kubernetes:\n  channel: 1.32/stable\ndatabases:\n  - kind: couchdb\n    name: docs\n",
    );
    std::fs::write(env.path().join("stack.yaml"), yaml).unwrap();
    expect_code(&env.run(&["validate"]), 0);
    for verb in [&["plan"][..], &["up", "--yes"]] {
        let output = env.run(verb);
        expect_code(&output, 1);
        let message = text(&output.stderr);
        assert!(!message.contains("`kubernetes`"), "{message}");
        assert!(
            message.contains("stack.yaml:19:1: `databases` (database clusters)"),
            "{message}"
        );
    }
    assert_eq!(tagged(&moto.url(), "later"), Tagged::nothing());
}

#[test]
fn missing_credentials_and_unreachable_endpoints_are_clear_errors() {
    let moto = Moto::start();
    let env = Env::new("creds", 1, moto.url());
    let output = env
        .command(&["plan"])
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .output()
        .unwrap();
    expect_code(&output, 1);
    assert!(
        text(&output.stderr).contains("no usable AWS credentials"),
        "{}",
        text(&output.stderr)
    );

    let closed = format!("http://127.0.0.1:{}", free_port());
    let output = env.command_at(&closed, &["up", "--yes"]).output().unwrap();
    expect_code(&output, 1);
    let message = text(&output.stderr);
    assert!(message.contains("cannot refresh stack creds"), "{message}");
    assert!(message.contains("ec2 Describe"), "{message}");
    // Nothing was made, so the state records nothing, and a later run works.
    expect_code(&env.run(&["up", "--yes"]), 0);
    expect_code(&env.run(&["down", "--yes"]), 0);
}

/// Every broken stack under tests/broken gives exactly the errors in its
/// `.expected` file.
#[test]
fn broken_stack_files_give_the_expected_errors() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/broken");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 25, "only {} broken stacks", files.len());
    let mut mismatches = Vec::new();
    for file in &files {
        let name = file.file_name().unwrap().to_str().unwrap();
        let output = Command::new(STACK)
            .args(["validate", name])
            .current_dir(&dir)
            .output()
            .unwrap();
        let expected = std::fs::read_to_string(file.with_extension("expected")).unwrap_or_default();
        if output.status.code() != Some(1) || text(&output.stderr) != expected {
            mismatches.push(format!(
                "== {name} (exit {:?})\n{}",
                output.status.code(),
                text(&output.stderr)
            ));
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

#[test]
fn example_stacks_validate_and_diagnostics_come_as_json() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    for name in ["aws.yaml", "local.yaml", "reference.yaml"] {
        let output = Command::new(STACK)
            .args(["validate", &format!("stacks/{name}")])
            .current_dir(&root)
            .output()
            .unwrap();
        expect_code(&output, 0);
    }
    let json = Command::new(STACK)
        .args([
            "validate",
            "--output",
            "json",
            "tests/broken/07-size-without-unit.yaml",
        ])
        .current_dir(&root)
        .output()
        .unwrap();
    expect_code(&json, 1);
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(json["valid"], false);
    assert_eq!(json["diagnostics"][0]["line"], 8);
    assert_eq!(json["diagnostics"][0]["path"], "nodes[0].disk");
}

#[test]
fn up_on_a_terminal_asks_and_only_yes_applies() {
    let moto = Moto::start();
    let env = Env::new("ask", 1, moto.url());
    // `script` gives `stack` a terminal, as a person at a shell has.
    let on_terminal = |answer: &str| {
        let mut script = Command::new("script");
        script.args(["-q", "-e", "-c", &format!("{STACK} up"), "/dev/null"]);
        env.isolate(&mut script, &env.endpoint);
        let mut child = script
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(answer.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let declined = on_terminal("no\n");
    let shown = text(&declined.stdout);
    assert!(
        shown.contains("Apply this plan? Only `yes` is accepted"),
        "{shown}"
    );
    assert!(
        shown.contains("not applied: the answer was not `yes`"),
        "{shown}"
    );
    assert_eq!(tagged(&moto.url(), "ask"), Tagged::nothing());
    let accepted = on_terminal("yes\n");
    assert!(
        text(&accepted.stdout).contains("Applied: 4 created"),
        "{}",
        text(&accepted.stdout)
    );
    assert_eq!(tagged(&moto.url(), "ask").instances.len(), 2);
    expect_code(&env.run(&["down", "--yes"]), 0);
}

#[test]
fn sigint_lets_changes_under_way_finish_and_a_rerun_continues() {
    let moto = Moto::start();
    let proxy = Proxy::start(moto.port);
    proxy.rules.lock().unwrap().delay = Duration::from_millis(300);
    let env = Env::new("sigint", 2, proxy.url());
    let child = env.spawn(&["up", "--yes"]);
    let state = env.path().join(".stack/sigint.state.json");
    let deadline = Instant::now() + Duration::from_secs(30);
    // Wait until the first resource is recorded, then interrupt.
    while !std::fs::read_to_string(&state)
        .unwrap_or_default()
        .contains("\"id\": \"")
    {
        assert!(Instant::now() < deadline, "nothing was recorded");
        thread::sleep(Duration::from_millis(10));
    }
    // The shell's own `kill`: no procps needed.
    let kill = Command::new("sh")
        .args(["-c", &format!("kill -INT {}", child.id())])
        .status()
        .unwrap();
    assert!(kill.success());
    let output = child.wait_with_output().unwrap();
    expect_code(&output, 1);
    let message = text(&output.stderr);
    assert!(
        message.contains("interrupted: finishing the changes under way"),
        "{message}"
    );
    assert!(
        message.contains("finished ones are recorded in state; run again to continue"),
        "{message}"
    );
    let rerun = env
        .command_at(&moto.url(), &["up", "--yes"])
        .output()
        .unwrap();
    expect_code(&rerun, 0);
    assert_eq!(tagged(&moto.url(), "sigint"), Tagged::three_nodes());
    expect_code(
        &env.command_at(&moto.url(), &["down", "--yes"])
            .output()
            .unwrap(),
        0,
    );
}

/// The Debian test image (kernel, initrd, root file system), built once by
/// `tests/image/build` and cached outside the checkout.
fn test_image() -> PathBuf {
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
enum RootFs {
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

fn kvm_env(name: &str, count: u32, runcmd: &str, rootfs: &RootFs) -> Env {
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
struct FileServer {
    port: u16,
    /// The `Range` start of each request (`None` for a whole-file request).
    ranges: Arc<Mutex<Vec<Option<usize>>>>,
}

impl FileServer {
    fn start(path: &Path) -> FileServer {
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

fn sha256_file(path: &Path) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(std::fs::read(path).unwrap());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// QEMU and switch processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
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

fn vm_dir(env: &Env, stack: &str, node: u32) -> PathBuf {
    env.path()
        .join(format!(".stack/{stack}/vms/{stack}-node-{node}"))
}

fn kill_vm(env: &Env, stack: &str, node: u32) {
    let pid = std::fs::read_to_string(vm_dir(env, stack, node).join("qemu.pid")).unwrap();
    let status = Command::new("sh")
        .args(["-c", &format!("kill -9 {}", pid.trim())])
        .status()
        .unwrap();
    assert!(status.success());
    thread::sleep(Duration::from_millis(300));
}

fn reaches(env: &Env, from: u32, to_address: &str) -> bool {
    let probe = format!("timeout 5 bash -c '</dev/tcp/{to_address}/22'");
    env.run(&["ssh", &format!("node-{from}"), "--", &probe])
        .status
        .success()
}

#[test]
fn kvm_two_nodes_boot_reach_each_other_recover_and_leave_nothing() {
    let rootfs = test_image().join("rootfs.qcow2");
    let server = FileServer::start(&rootfs);
    let url = format!("http://127.0.0.1:{}/rootfs.qcow2", server.port);
    let env = kvm_env("kvm2", 2, "", &RootFs::Url(url, sha256_file(&rootfs)));
    let up = env.run(&["up", "--yes"]);
    expect_code(&up, 0);
    // The first download broke off halfway and was resumed, once for both VMs.
    let size = std::fs::metadata(&rootfs).unwrap().len() as usize;
    assert_eq!(*server.ranges.lock().unwrap(), vec![None, Some(size / 2)]);
    let cached: Vec<_> = std::fs::read_dir(env.path().join(".cache/stack/images"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".img"))
        .collect();
    assert_eq!(cached.len(), 1, "one cached copy for both VMs: {cached:?}");
    assert!(
        text(&up.stdout).contains("Plan: 3 to create"),
        "{}",
        text(&up.stdout)
    );
    for node in 0..2 {
        assert!(vm_dir(&env, "kvm2", node).join("disk.qcow2").exists());
    }
    assert!(
        reaches(&env, 0, "10.42.0.11"),
        "node-0 cannot reach node-1 over the private network"
    );
    assert!(
        reaches(&env, 1, "10.42.0.10"),
        "node-1 cannot reach node-0 over the private network"
    );
    expect_code(&env.run(&["plan", "--detailed-exitcode"]), 0);

    kill_vm(&env, "kvm2", 1);
    let plan = env.run(&["plan", "--detailed-exitcode"]);
    expect_code(&plan, 2);
    let shown = text(&plan.stdout);
    assert!(
        shown.contains("~   kvm.vm.node[1]") && shown.contains("state: \"stopped\" → \"running\""),
        "{shown}"
    );
    expect_code(&env.run(&["up", "--yes"]), 0);
    expect_code(&env.run(&["plan", "--detailed-exitcode"]), 0);
    assert!(
        reaches(&env, 0, "10.42.0.11"),
        "node-1 did not come back on the private network"
    );

    // Pin another host key than the one node-0 was given: stack must refuse it.
    let meta_path = vm_dir(&env, "kvm2", 0).join("vm.json");
    let mut meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&meta_path).unwrap()).unwrap();
    let other_key =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDlcRDUzHuYNBQ2XzLkqM1twyC5Bj1MZ4bc0PiTjxFau other";
    meta["hostKey"] = serde_json::json!(other_key);
    std::fs::write(&meta_path, meta.to_string()).unwrap();
    kill_vm(&env, "kvm2", 0);
    let refused = env.run(&["up", "--yes"]);
    expect_code(&refused, 1);
    let message = text(&refused.stderr);
    assert!(
        message.contains("kvm2-node-0 presented host key ssh-ed25519"),
        "{message}"
    );
    assert!(message.contains("refusing to connect"), "{message}");

    let down = env.run(&["down", "--yes"]);
    expect_code(&down, 0);
    assert!(
        text(&down.stdout).contains("Nothing of stack kvm2 is left"),
        "{}",
        text(&down.stdout)
    );
    let run_dir = env.path().join(".stack/kvm2");
    assert!(!run_dir.exists(), "{} is still there", run_dir.display());
    assert_eq!(
        processes_mentioning(&run_dir.display().to_string()),
        Vec::<String>::new()
    );
}

#[test]
fn kvm_cloud_init_failure_names_the_module_and_shows_the_console() {
    let env = kvm_env(
        "kvmfail",
        1,
        "    runcmd:\n      - exit 3\n",
        &RootFs::Local,
    );
    let up = env.run(&["up", "--yes"]);
    expect_code(&up, 1);
    let message = text(&up.stderr);
    assert!(
        message.contains("kvmfail-node-0: cloud-init failed in"),
        "{message}"
    );
    assert!(message.contains("scripts_user"), "{message}");
    assert!(message.contains("last console lines:\n  | "), "{message}");
    expect_code(&env.run(&["down", "--yes"]), 0);
    assert!(!env.path().join(".stack/kvmfail").exists());
}

/// A control node and a worker with microk8s; `control_runcmd` goes into the
/// control group's user-data.
fn bootstrap_yaml(name: &str, control_runcmd: &str) -> String {
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
fn stand_in_log(env: &Env, node: &str) -> Vec<String> {
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

#[test]
fn bootstrap_runs_its_steps_in_order_over_pinned_ssh_and_resumes_after_a_failure() {
    // The ingress addon fails three times: every attempt of its step.
    let fail = "    runcmd:\n      - mkdir -p /etc/stand-in && printf 'enable ingress\\n%.0s' 1 2 3 > /etc/stand-in/fail-once\n";
    let env = Env::new("boot", 1, "http://127.0.0.1:9".to_string());
    std::fs::write(env.path().join("stack.yaml"), bootstrap_yaml("boot", fail)).unwrap();

    let plan = env.run(&["plan"]);
    expect_code(&plan, 0);
    let shown = text(&plan.stdout);
    assert!(
        shown.contains("step 10 of 11: enable addon ingress on boot-control-0"),
        "{shown}"
    );

    let failed = env.run(&["up", "--yes"]);
    expect_code(&failed, 1);
    let message = text(&failed.stderr);
    assert!(
        message.contains("step 10 of 11 failed on boot-control-0: enable addon ingress"),
        "{message}"
    );
    assert!(
        message.contains("stand-in: forced failure of `microk8s enable ingress`"),
        "{message}"
    );
    assert!(
        message.contains("hint: microk8s enables one addon at a time"),
        "{message}"
    );

    // The re-run does only what is left.
    let plan = env.run(&["plan"]);
    let shown = text(&plan.stdout);
    assert!(shown.contains("Plan: 2 to create"), "{shown}");
    expect_code(&env.run(&["up", "--yes"]), 0);
    expect_code(&env.run(&["plan", "--detailed-exitcode"]), 0);

    let control = stand_in_log(&env, "control-0");
    let worker = stand_in_log(&env, "worker-0");
    let add_node = control
        .iter()
        .find(|l| l.contains("add-node"))
        .expect("add-node ran")
        .clone();
    let token = add_node.split_whitespace().nth(3).unwrap().to_string();
    let mut expected_control = vec![
        "snap install microk8s --classic --channel=1.32/stable".to_string(),
        "snap refresh --hold microk8s".to_string(),
        "microk8s status --wait-ready --timeout 480".to_string(),
        format!("microk8s add-node --token {token} --token-ttl 600"),
        "microk8s enable dns".to_string(),
        "microk8s enable hostpath-storage".to_string(),
    ];
    expected_control.extend(std::iter::repeat_n(
        "microk8s enable ingress".to_string(),
        4,
    ));
    expected_control.push("microk8s config".to_string());
    assert_eq!(
        control, expected_control,
        "the first node, in order, nothing repeated"
    );
    assert_eq!(
        worker,
        [
            "snap install microk8s --classic --channel=1.32/stable".to_string(),
            "snap refresh --hold microk8s".to_string(),
            "microk8s status --wait-ready --timeout 480".to_string(),
            format!("microk8s join 10.42.0.10:25000/{token} --worker"),
        ],
        "the worker joined with the token the first node made"
    );

    // The kubeconfig: named after the stack, at the forwarded API port, 0600, mergeable.
    let kubeconfig = env.path().join(".stack/boot.kubeconfig");
    let config = std::fs::read_to_string(&kubeconfig).unwrap();
    assert!(config.contains("current-context: boot"), "{config}");
    assert!(
        config.contains("server: \"https://127.0.0.1:")
            || config.contains("server: https://127.0.0.1:"),
        "{config}"
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&kubeconfig).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let status = env.run(&["status"]);
    assert!(
        text(&status.stdout).contains("kubeconfig: "),
        "{}",
        text(&status.stdout)
    );
    expect_code(&env.run(&["kubeconfig", "--merge"]), 0);
    let merged = std::fs::read_to_string(env.path().join(".kube/config")).unwrap();
    assert!(
        merged.contains("name: boot-admin") && merged.contains("current-context: boot"),
        "{merged}"
    );

    // Drift: an addon disabled out of band is seen and enabled again.
    expect_code(
        &env.run(&[
            "ssh",
            "control-0",
            "--",
            "sudo /snap/bin/microk8s disable dns",
        ]),
        0,
    );
    let plan = env.run(&["plan", "--detailed-exitcode"]);
    expect_code(&plan, 2);
    let shown = text(&plan.stdout);
    assert!(
        shown.contains("microk8s.addon.dns") && shown.contains("enabled: false → true"),
        "{shown}"
    );
    expect_code(&env.run(&["up", "--yes"]), 0);
    expect_code(&env.run(&["plan", "--detailed-exitcode"]), 0);

    // A node that presents another host key than the pinned one is refused.
    let meta_path = env.path().join(".stack/boot/vms/boot-control-0/vm.json");
    let mut meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&meta_path).unwrap()).unwrap();
    let pinned = meta["hostKey"].clone();
    meta["hostKey"] = serde_json::json!(
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDlcRDUzHuYNBQ2XzLkqM1twyC5Bj1MZ4bc0PiTjxFau other"
    );
    std::fs::write(&meta_path, meta.to_string()).unwrap();
    let refused = env.run(&["plan"]);
    expect_code(&refused, 1);
    let message = text(&refused.stderr);
    assert!(
        message.contains("boot-control-0 presented host key ssh-ed25519"),
        "{message}"
    );
    assert!(message.contains("not the pinned ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDlcRDUzHuYNBQ2XzLkqM1twyC5Bj1MZ4bc0PiTjxFau: refusing to connect"), "{message}");
    meta["hostKey"] = pinned;
    std::fs::write(&meta_path, meta.to_string()).unwrap();

    expect_code(&env.run(&["down", "--yes"]), 0);
    assert!(!kubeconfig.exists(), "down removes the kubeconfig");
    assert!(!env.path().join(".stack/boot").exists());
}

#[test]
fn the_vagrantfile_validates() {
    let output = Command::new("vagrant")
        .arg("validate")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("VAGRANT_CHECKPOINT_DISABLE", "1")
        .output()
        .expect("vagrant runs (.ci/run installs it)");
    expect_code(&output, 0);
    assert!(text(&output.stdout).contains("Vagrantfile validated successfully"));
}

/// The Kubernetes API TEST DOUBLE (`tests/kube-api-double`): no real API
/// server can run here. Started on a free loopback port, stopped on drop;
/// every request it serves is logged.
struct KubeDouble {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl KubeDouble {
    fn start(dir: &Path) -> KubeDouble {
        let port = free_port();
        let log = dir.join("api-requests.log");
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kube-api-double/kube_api_double.py");
        let child = Command::new("python3")
            .arg(script)
            .args(["--port", &port.to_string(), "--log"])
            .arg(&log)
            .stdout(Stdio::null())
            .spawn()
            .expect("python3 runs the Kubernetes API double");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the API double did not start on port {port}"
            );
            thread::sleep(Duration::from_millis(50));
        }
        std::fs::write(
            dir.join("kubeconfig"),
            format!("apiVersion: v1\nkind: Config\nclusters:\n- name: double\n  cluster:\n    server: http://127.0.0.1:{port}\nusers:\n- name: tester\n  user:\n    token: test\ncontexts:\n- name: double\n  context: {{cluster: double, user: tester}}\ncurrent-context: double\n"),
        )
        .unwrap();
        KubeDouble { child, port, log }
    }

    /// One HTTP request as another client (kubectl, a controller) would send it.
    fn request(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: &str,
    ) -> (u16, serde_json::Value) {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        let code = head.split(' ').nth(1).unwrap().parse().unwrap();
        (code, serde_json::from_str(body).unwrap())
    }

    fn get(&self, path: &str) -> serde_json::Value {
        let (code, body) = self.request("GET", path, "application/json", "");
        assert_eq!(code, 200, "GET {path}: {body}");
        body
    }

    /// Every object of the stack's labels, as `plural/namespace/name`.
    fn labelled(&self, stack: &str) -> Vec<String> {
        let mut found = Vec::new();
        for path in [
            "/api/v1/namespaces",
            "/api/v1/configmaps",
            "/api/v1/secrets",
            "/api/v1/services",
            "/apis/apps/v1/statefulsets",
            "/apis/apps/v1/deployments",
            "/apis/networking.k8s.io/v1/ingresses",
        ] {
            let list = self.get(&format!(
                "{path}?labelSelector=app.kubernetes.io/part-of%3D{stack}"
            ));
            for item in list["items"].as_array().unwrap() {
                found.push(format!(
                    "{path}/{}/{}",
                    item["metadata"]["namespace"].as_str().unwrap_or("-"),
                    item["metadata"]["name"].as_str().unwrap()
                ));
            }
        }
        found
    }

    fn requests(&self) -> usize {
        std::fs::read_to_string(&self.log).map_or(0, |log| log.lines().count())
    }
}

impl Drop for KubeDouble {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The first line of each change in a rendered plan: action and address.
fn change_lines(plan: &str) -> Vec<&str> {
    plan.lines()
        .filter(|l| l.starts_with("  ") && !l.starts_with("      "))
        .collect()
}

const APP_MANIFESTS: &str = "apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: web
spec:
  replicas: 3
  serviceName: web
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
        - name: web
          image: nginx:1.27
          ports:
            - {name: http, containerPort: 80}
          resources:
            requests: {memory: 1024Mi, cpu: 500m}
---
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  selector: {app: web}
  ports:
    - {name: http, port: 80, targetPort: http}
---
apiVersion: v1
kind: Service
metadata:
  name: grpc
spec:
  selector: {app: web}
  ports:
    - {name: grpc, port: 9000}
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: web-config
data:
  greeting: hello
";

/// An existing cluster (the API double) with the user's manifests, a TLS
/// ingress from the stack's CA and a TCP endpoint on a NodePort.
fn kube_env(name: &str, manifests: &str, healthy: &str) -> (Env, KubeDouble) {
    let env = Env::new(name, 1, String::new());
    let double = KubeDouble::start(env.path());
    std::fs::create_dir_all(env.path().join("app")).unwrap();
    std::fs::write(env.path().join("app/web.yaml"), manifests).unwrap();
    std::fs::write(
        env.path().join("stack.yaml"),
        format!("version: 1\nname: {name}\nprovider:\n  kvm: {{}}\nkubernetes:\n  kubeconfig: kubeconfig\n  manifests: [app]\ningress:\n  domain: {name}.test\n  className: public\n  endpoints:\n    - {{name: web, service: web, port: 80}}\n    - {{name: grpc, service: grpc, port: 9000, protocol: tcp}}\ntimeouts:\n  healthy: {healthy}\n"),
    )
    .unwrap();
    (env, double)
}

#[test]
fn kubernetes_objects_apply_in_stages_drift_is_exact_and_down_leaves_nothing() {
    let (env, double) = kube_env("apps", APP_MANIFESTS, "30s");
    let output = env.run(&["up", "--yes"]);
    expect_code(&output, 0);
    let log = text(&output.stdout) + &text(&output.stderr);
    let position = |needle: &str| {
        log.find(needle)
            .unwrap_or_else(|| panic!("{needle} missing from:\n{log}"))
    };
    // Stages in order: the namespace and the TLS secret before the workloads, the ingress last.
    assert!(
        position("k8s.Namespace/apps: created") < position("k8s.apps/StatefulSet/web: creating")
    );
    assert!(
        position("stage 2 of 4 (databases): waiting") < position("k8s.apps/Ingress/web: creating")
    );

    // The API server filled in defaults the stack never set...
    let sts = double.get("/apis/apps/v1/namespaces/apps/statefulsets/web");
    assert_eq!(sts["spec"]["podManagementPolicy"], "OrderedReady");
    assert_eq!(
        sts["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"],
        "IfNotPresent"
    );
    let service = double.get("/api/v1/namespaces/apps/services/web");
    assert!(service["spec"]["clusterIP"]
        .as_str()
        .unwrap()
        .starts_with("10.152.183."));
    assert_eq!(sts["metadata"]["managedFields"][0]["manager"], "stack");
    // ...and none of it is drift.
    let plan = env.run(&["plan", "--detailed-exitcode"]);
    expect_code(&plan, 0);
    assert!(
        text(&plan.stdout).contains("No changes"),
        "{}",
        text(&plan.stdout)
    );

    // The certificate in the Secret is signed by the CA exported for the user.
    let secret = double.get("/api/v1/namespaces/apps/secrets/apps-tls");
    use base64::Engine as _;
    let cert = base64::engine::general_purpose::STANDARD
        .decode(secret["data"]["tls.crt"].as_str().unwrap())
        .unwrap();
    std::fs::write(env.path().join("web.crt"), cert).unwrap();
    let verify = Command::new("openssl")
        .args(["verify", "-CAfile", ".stack/apps-ca.crt", "web.crt"])
        .current_dir(env.path())
        .output()
        .unwrap();
    expect_code(&verify, 0);
    let ingress = double.get("/apis/networking.k8s.io/v1/namespaces/apps/ingresses/web");
    assert_eq!(ingress["spec"]["rules"][0]["host"], "web.apps.test");
    assert_eq!(ingress["spec"]["ingressClassName"], "public");
    let node_port = double.get("/api/v1/namespaces/apps/services/grpc-tcp");
    assert_eq!(node_port["spec"]["type"], "NodePort");
    assert_eq!(node_port["spec"]["selector"]["app"], "web");
    let status = env.run(&["status"]);
    expect_code(&status, 0);
    let shown = text(&status.stdout);
    assert!(shown.contains("https://web.apps.test"), "{shown}");
    assert!(
        shown.contains(&format!(
            "grpc: tcp NodePort {}",
            node_port["spec"]["ports"][0]["nodePort"]
        )),
        "{shown}"
    );
    assert!(shown.contains(".stack/apps-ca.crt"), "{shown}");
    let inventory = double.get("/api/v1/namespaces/apps/configmaps/stack-apps-inventory");
    assert!(inventory["data"]["kinds"]
        .as_str()
        .unwrap()
        .contains("apps/v1 StatefulSet"));

    // Another field manager scales the StatefulSet, a Service is deleted, a
    // stray ConfigMap with the stack's labels appears.
    let (code, _) = double.request(
        "PATCH",
        "/apis/apps/v1/namespaces/apps/statefulsets/web?fieldManager=kubectl-scale",
        "application/merge-patch+json",
        r#"{"spec":{"replicas":1}}"#,
    );
    assert_eq!(code, 200);
    assert_eq!(
        double
            .request(
                "DELETE",
                "/api/v1/namespaces/apps/services/grpc",
                "application/json",
                ""
            )
            .0,
        200
    );
    let stray = r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"stray","labels":{"app.kubernetes.io/managed-by":"stack","app.kubernetes.io/part-of":"apps"}},"data":{"x":"y"}}"#;
    assert_eq!(
        double
            .request(
                "POST",
                "/api/v1/namespaces/apps/configmaps?fieldManager=kubectl-create",
                "application/json",
                stray
            )
            .0,
        201
    );

    let before = double.requests();
    let plan = env.run(&["plan", "--detailed-exitcode"]);
    expect_code(&plan, 2);
    let shown = text(&plan.stdout);
    let changes = change_lines(&shown);
    assert_eq!(
        changes,
        [
            "  +   k8s.apps/Service/grpc",
            "  ~   k8s.apps/StatefulSet/web (apps/web)",
            "  -   k8s.apps/ConfigMap/stray (apps/stray)",
        ],
        "{shown}"
    );
    assert!(
        shown.contains("spec.replicas: 1 → 3   (last applied: 3)"),
        "{shown}"
    );
    assert!(
        shown.contains("spec.replicas is now managed by kubectl-scale"),
        "{shown}"
    );
    assert!(shown.contains("gone from the live world"), "{shown}");
    assert!(
        shown.contains("has the stack's labels but the stack does not declare it: pruned"),
        "{shown}"
    );
    assert!(
        shown.contains(
            "Plan: 1 to create, 1 to update, 0 to replace, 1 to delete (3 repairing drift)."
        ),
        "{shown}"
    );
    // One LIST per kind (6 kinds), the CRD check and the inventory: never one GET per object.
    let lists = std::fs::read_to_string(&double.log)
        .unwrap()
        .lines()
        .skip(before)
        .map(str::to_string)
        .collect::<Vec<_>>();
    assert_eq!(lists.len(), 8, "{lists:#?}");
    assert_eq!(
        lists
            .iter()
            .filter(|l| l.contains("labelSelector="))
            .count(),
        6,
        "{lists:#?}"
    );

    expect_code(&env.run(&["up", "--yes"]), 0);
    let sts = double.get("/apis/apps/v1/namespaces/apps/statefulsets/web");
    assert_eq!(sts["spec"]["replicas"], 3);
    let plan = env.run(&["plan", "--detailed-exitcode"]);
    expect_code(&plan, 0);

    let down = env.run(&["down", "--yes"]);
    expect_code(&down, 0);
    assert!(
        text(&down.stdout).contains("Nothing with the labels of stack apps is left"),
        "{}",
        text(&down.stdout)
    );
    assert_eq!(double.labelled("apps"), Vec::<String>::new());
    assert!(!env.path().join(".stack/apps-ca.crt").exists());
}

#[test]
fn a_stage_that_never_gets_ready_names_the_object_its_conditions_and_events() {
    let stuck = APP_MANIFESTS.replace(
        "metadata:\n  name: web\nspec:\n  replicas: 3",
        "metadata:\n  name: web\n  annotations:\n    kube-api-double/never-ready: \"true\"\nspec:\n  replicas: 3",
    );
    let (env, double) = kube_env("gate", &stuck, "3s");
    let output = env.run(&["up", "--yes"]);
    expect_code(&output, 1);
    let message = text(&output.stderr);
    for needle in [
        "stage 2 of 4 (databases) is not ready after 3s",
        "StatefulSet gate/web: 0 of 3 ready",
        "conditions: Available=False MinimumReplicasUnavailable pods are crash looping",
        "Warning BackOff: Back-off restarting failed container",
    ] {
        assert!(
            message.contains(needle),
            "{needle} missing from:\n{message}"
        );
    }
    // The later stage was not started; fixed, the next run finishes it.
    assert!(double
        .labelled("gate")
        .iter()
        .all(|o| !o.contains("ingresses")));
    std::fs::write(env.path().join("app/web.yaml"), APP_MANIFESTS).unwrap();
    expect_code(&env.run(&["up", "--yes"]), 0);
    expect_code(&env.run(&["plan", "--detailed-exitcode"]), 0);
    expect_code(&env.run(&["down", "--yes"]), 0);
}

#[test]
fn a_lost_state_file_is_rebuilt_from_the_cluster_and_the_inventory_still_prunes() {
    let (env, double) = kube_env("lost", APP_MANIFESTS, "30s");
    expect_code(&env.run(&["up", "--yes"]), 0);
    let ca = std::fs::read_to_string(env.path().join(".stack/lost-ca.crt")).unwrap();
    std::fs::remove_file(env.path().join(".stack/lost.state.json")).unwrap();
    let _ = std::fs::remove_file(env.path().join(".stack/lost.state.json.backup"));
    // This machine's stack no longer declares StatefulSets, Services or
    // Ingresses: only the inventory in the cluster says to look for them.
    std::fs::write(
        env.path().join("app/web.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: web-config\ndata:\n  greeting: hello\n",
    )
    .unwrap();
    std::fs::write(
        env.path().join("stack.yaml"),
        "version: 1\nname: lost\nprovider:\n  kvm: {}\nkubernetes:\n  kubeconfig: kubeconfig\n  manifests: [app]\ningress:\n  domain: lost.test\n  className: public\n",
    )
    .unwrap();
    let plan = env.run(&["plan", "--detailed-exitcode"]);
    expect_code(&plan, 2);
    let shown = text(&plan.stdout);
    let changes = change_lines(&shown);
    assert_eq!(
        changes,
        [
            "  -   k8s.lost/Ingress/web (lost/web)",
            "  -   k8s.lost/Service/grpc (lost/grpc)",
            "  -   k8s.lost/Service/grpc-tcp (lost/grpc-tcp)",
            "  -   k8s.lost/Service/web (lost/web)",
            "  -   k8s.lost/StatefulSet/web (lost/web)",
            "  +   k8s.stack/CertificateAuthority/ca",
        ],
        "{shown}"
    );
    assert!(
        shown.contains("the one in the cluster (lost/Secret/lost-ca) is recorded"),
        "{shown}"
    );
    assert!(
        shown.contains("Found by tag, to be recorded in state: k8s.Namespace/lost"),
        "{shown}"
    );
    expect_code(&env.run(&["up", "--yes"]), 0);
    expect_code(&env.run(&["plan", "--detailed-exitcode"]), 0);
    assert_eq!(
        std::fs::read_to_string(env.path().join(".stack/lost-ca.crt")).unwrap(),
        ca
    );
    assert!(double
        .labelled("lost")
        .iter()
        .all(|o| !o.contains("statefulsets") && !o.contains("/services/")));
    expect_code(&env.run(&["down", "--yes"]), 0);
    assert_eq!(double.labelled("lost"), Vec::<String>::new());
}

#[test]
fn a_change_to_an_immutable_field_replaces_the_object() {
    let (env, double) = kube_env("fixed", APP_MANIFESTS, "30s");
    expect_code(&env.run(&["up", "--yes"]), 0);
    let before = double.get("/apis/apps/v1/namespaces/fixed/statefulsets/web");
    // The API server refuses the change in place, even with force...
    let patch = r#"{"apiVersion":"apps/v1","kind":"StatefulSet","metadata":{"name":"web"},"spec":{"serviceName":"web-headless"}}"#;
    let (code, status) = double.request(
        "PATCH",
        "/apis/apps/v1/namespaces/fixed/statefulsets/web?fieldManager=stack&force=true",
        "application/apply-patch+yaml",
        patch,
    );
    assert_eq!(
        (code, status["reason"].as_str()),
        (422, Some("Invalid")),
        "{status}"
    );
    // ...so the plan says replace, and up does it.
    std::fs::write(
        env.path().join("app/web.yaml"),
        APP_MANIFESTS.replace("serviceName: web", "serviceName: web-headless"),
    )
    .unwrap();
    let plan = env.run(&["plan", "--detailed-exitcode"]);
    expect_code(&plan, 2);
    let shown = text(&plan.stdout);
    assert!(
        shown.contains("-/+ k8s.fixed/StatefulSet/web (fixed/web)"),
        "{shown}"
    );
    assert!(
        shown.contains("does not change spec.serviceName in place: deleted and made again"),
        "{shown}"
    );
    expect_code(&env.run(&["up", "--yes"]), 0);
    let after = double.get("/apis/apps/v1/namespaces/fixed/statefulsets/web");
    assert_eq!(after["spec"]["serviceName"], "web-headless");
    assert_ne!(after["metadata"]["uid"], before["metadata"]["uid"]);
    expect_code(&env.run(&["plan", "--detailed-exitcode"]), 0);
    expect_code(&env.run(&["down", "--yes"]), 0);
    assert_eq!(double.labelled("fixed"), Vec::<String>::new());
}

#[test]
fn an_object_the_api_refuses_stops_its_stage_before_anything_in_it_changes() {
    let refused = format!(
        "{APP_MANIFESTS}---\napiVersion: v1\nkind: Service\nmetadata: {{name: elsewhere, namespace: nowhere}}\nspec:\n  ports: [{{port: 1}}]\n"
    );
    let (env, double) = kube_env("refuse", &refused, "30s");
    let output = env.run(&["up", "--yes"]);
    expect_code(&output, 1);
    let message = text(&output.stderr);
    assert!(
        message.contains("stage 2 of 4 (databases) failed"),
        "{message}"
    );
    assert!(
        message.contains("dry-run applying Service nowhere/elsewhere on cluster double failed: 404 NotFound: namespaces \"nowhere\" not found"),
        "{message}"
    );
    // Stage 1 is done and recorded; nothing of stage 2 was applied.
    let made = double.labelled("refuse");
    assert!(
        made.iter()
            .any(|o| o.contains("/api/v1/namespaces/-/refuse")),
        "{made:?}"
    );
    assert!(
        made.iter()
            .all(|o| !o.contains("statefulsets") && !o.contains("services")),
        "{made:?}"
    );
    std::fs::write(env.path().join("app/web.yaml"), APP_MANIFESTS).unwrap();
    expect_code(&env.run(&["up", "--yes"]), 0);
    expect_code(&env.run(&["down", "--yes"]), 0);
}
