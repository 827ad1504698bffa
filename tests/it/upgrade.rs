//! `stack daemon`, `stack upgrade` and `stack upgrade --due` rolling a
//! CouchDB cluster's image through the real CLI: the images come from a
//! real registry (Debian's docker-registry on loopback), the cluster is the
//! Kubernetes API double whose StatefulSet controller and kubelet stand-ins
//! run CouchDB double nodes. Members move one at a time from the highest
//! ordinal (the double's controller log records the order); a member that
//! is ready but never joins the cluster (`--couchdb-fault ...=partitioned`)
//! fails the database's own health gate and the cluster goes back whole;
//! the state keeps the history and the pins; `--write` puts the pin into
//! the file with its comments; the daemon's metrics show its runs.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::couch::NAMESPACE;
use crate::support::kube::KubeDouble;
use crate::support::registry::{push, start_registry, Auth};
use crate::support::{expect_code, free_port, text, Env};

/// The pods the StatefulSet controller created after line `from` of its
/// log: (pod, couchdb image).
fn created(log: &std::path::Path, from: usize) -> Vec<(String, String)> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .skip(from)
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|e| e["action"] == "create")
        .map(|e| {
            (
                e["pod"].as_str().unwrap().to_string(),
                e["images"]["couchdb"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn lines(log: &std::path::Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .count()
}

fn scrape(port: u16) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
}

fn status(env: &Env) -> Value {
    let out = env
        .command(&["status", "--output", "json"])
        .output()
        .unwrap();
    expect_code(&out, 0);
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The couchdb image every pod of the cluster runs.
fn pod_images(double: &KubeDouble) -> Vec<String> {
    let pods = double.get(&format!("/api/v1/namespaces/{NAMESPACE}/pods"));
    let mut images: Vec<(String, String)> = pods["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["metadata"]["name"].as_str().unwrap().to_string(),
                p["spec"]["containers"][0]["image"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            )
        })
        .collect();
    images.sort();
    images.into_iter().map(|(_, image)| image).collect()
}

#[test]
fn couchdb_upgrades_member_by_member_and_rolls_back_whole_when_a_member_fails_its_gate() {
    let env = Env::new("upgrade", 1, String::new());
    let registry = start_registry(
        env.path(),
        "registry",
        &env.path().join("storage"),
        Auth::Anonymous,
    );
    let mut digests = push(&registry, "couchdb", &["3.5.0", "3.5.1"]);
    let image = |tag: &str| format!("{}/couchdb:{tag}", registry.host());
    let pinned = |digests: &std::collections::BTreeMap<String, String>, tag: &str| {
        format!("{}@{}", image(tag), digests[&format!("couchdb:{tag}")])
    };
    let controller = env.path().join("controller.log");
    let double = KubeDouble::start_with(
        env.path(),
        &[
            "--couchdb",
            "--couchdb-settle-seconds",
            "1",
            "--controller-log",
            &controller.display().to_string(),
            // docs-1 on 3.5.2 answers its probes but never joins its peers.
            "--couchdb-fault",
            "docs-1@couchdb:3.5.2=partitioned",
        ],
    );
    let file = env.path().join("stack.yaml");
    std::fs::write(
        &file,
        format!("version: 1\nname: upgrade\nkubernetes:\n  kubeconfig: kubeconfig\n  namespace: {NAMESPACE}\ndatabases:\n  # the documents\n  - kind: couchdb\n    name: docs\n    image: {}   # patch releases only\n    replicas: 3\nupgrades:\n  schedule: \"0 0 1 1 *\"\n  healthTimeout: 15s\ntimeouts:\n  healthy: 60s\n", image("3.5.0")),
    )
    .unwrap();
    expect_code(&env.command(&["up", "--yes"]).output().unwrap(), 0);

    // The daemon, at once: a drift check (none), then 3.5.0 -> 3.5.1.
    let before = lines(&controller);
    let port = free_port();
    let mut daemon = env
        .command(&[
            "daemon",
            "stack.yaml",
            "--now",
            "--yes",
            "--metrics",
            &format!("127.0.0.1:{port}"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut logged = Vec::new();
    let mut out = BufReader::new(daemon.stdout.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(180);
    while !logged
        .iter()
        .any(|e: &Value| e["event"] == "upgraded" || e["event"] == "failed")
    {
        assert!(Instant::now() < deadline, "the daemon logged {logged:?}");
        let mut line = String::new();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "the daemon ended: {logged:?}"
        );
        logged.push(serde_json::from_str(&line).unwrap());
    }
    let events: Vec<&str> = logged.iter().filter_map(|e| e["event"].as_str()).collect();
    assert_eq!(
        events,
        ["started", "drift-checked", "upgraded"],
        "{logged:?}"
    );
    assert_eq!(logged[1]["drift"], 0, "{logged:?}");
    assert_eq!(logged[2]["result"], "succeeded", "{logged:?}");
    assert_eq!(logged[2]["to"], pinned(&digests, "3.5.1"), "{logged:?}");
    let metrics = scrape(port);
    for line in [
        "stack_daemon_drift_changes{stack=\"upgrade\"} 0",
        "stack_daemon_last_run_success{stack=\"upgrade\",job=\"drift\"} 1",
        "stack_daemon_upgrades_total{stack=\"upgrade\",database=\"docs\",result=\"succeeded\"} 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} not in\n{metrics}"
        );
    }
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let ended = daemon.wait().unwrap();
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    assert!(ended.success(), "{ended:?}: {rest}");
    assert!(rest.contains("\"event\":\"stopped\""), "{rest}");
    let order = created(&controller, before);
    assert_eq!(
        order,
        ["docs-2", "docs-1", "docs-0"]
            .map(|p| (p.to_string(), pinned(&digests, "3.5.1")))
            .to_vec(),
        "one member at a time from the highest ordinal"
    );

    // The state has the history and the pin; the plan is clean and says
    // how to write the pin into the file.
    let shown = status(&env);
    assert_eq!(shown["databases"][0]["image"], pinned(&digests, "3.5.1"));
    assert_eq!(shown["databases"][0]["upgrades"][0]["result"], "succeeded");
    let plan = env
        .command(&["plan", "--detailed-exitcode"])
        .output()
        .unwrap();
    expect_code(&plan, 0);
    assert!(
        text(&plan.stdout).contains("stack upgrade --write"),
        "{}",
        text(&plan.stdout)
    );

    // Nothing newer: --write puts the pin into the file, comments kept.
    let write = env
        .command(&["upgrade", "--write", "--yes"])
        .output()
        .unwrap();
    expect_code(&write, 0);
    let written = std::fs::read_to_string(&file).unwrap();
    assert!(
        written.contains(&format!(
            "  # the documents\n  - kind: couchdb\n    name: docs\n    image: {}   # patch releases only\n",
            pinned(&digests, "3.5.1")
        )),
        "{written}"
    );
    let plan = env
        .command(&["plan", "--detailed-exitcode"])
        .output()
        .unwrap();
    expect_code(&plan, 0);
    assert!(!text(&plan.stdout).contains("stack upgrade --write"));

    // 3.5.2 is out; docs-2 takes it, docs-1 fails the membership gate: the
    // rollout stops, docs-1 and docs-2 go back, and the plan is clean.
    digests.extend(push(&registry, "couchdb", &["3.5.2"]));
    // Hourly at this minute: due now, and not again within this test (the
    // daemon ran outside the schedule, on January 1st, so nothing was served).
    let minute = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 60
        % 60;
    let edited = std::fs::read_to_string(&file)
        .unwrap()
        .replace("\"0 0 1 1 *\"", &format!("\"{minute} * * * *\""));
    std::fs::write(&file, edited).unwrap();
    let before = lines(&controller);
    let failed = env
        .command(&["upgrade", "--due", "--yes"])
        .output()
        .unwrap();
    expect_code(&failed, 1);
    let stderr = text(&failed.stderr);
    assert!(
        stderr.contains("did not succeed") && stderr.contains("docs-1"),
        "{stderr}"
    );
    let order = created(&controller, before);
    assert_eq!(
        order[..2],
        [
            ("docs-2".to_string(), pinned(&digests, "3.5.2")),
            ("docs-1".to_string(), pinned(&digests, "3.5.2")),
        ],
        "{order:?}"
    );
    assert!(
        order[2..]
            .iter()
            .all(|(_, image)| *image == pinned(&digests, "3.5.1")),
        "{order:?}"
    );
    assert_eq!(pod_images(&double), vec![pinned(&digests, "3.5.1"); 3]);
    let shown = status(&env);
    let upgrades = shown["databases"][0]["upgrades"].as_array().unwrap();
    assert_eq!(
        upgrades.last().unwrap()["result"],
        "rolled-back",
        "{upgrades:?}"
    );
    assert!(upgrades.last().unwrap()["detail"]
        .as_str()
        .unwrap()
        .starts_with("docs-1: "));
    expect_code(
        &env.command(&["plan", "--detailed-exitcode"])
            .output()
            .unwrap(),
        0,
    );
    // That scheduled time was served: the next `--due` waits for the next one.
    let again = env
        .command(&["upgrade", "--due", "--yes"])
        .output()
        .unwrap();
    expect_code(&again, 0);
    assert!(
        text(&again.stdout).contains("is due"),
        "{}",
        text(&again.stdout)
    );
}
