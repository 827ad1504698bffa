//! AllegroGraph MMR clusters through the real CLI, on the Kubernetes API
//! double with its kubelet stand-in and the AllegroGraph TEST DOUBLE
//! (`tests/kube-api-double/agraph_double.py`; no real AllegroGraph runs
//! here) behind it, reached over the API server's port-forward; the copies'
//! member script runs for real (sh and curl) in their sidecars: the
//! cluster made once, copies 2 → 3 → 1 with no dead member, a copy
//! restarted empty joining again, and `down` leaving nothing.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::kube::KubeDouble;
use crate::support::{expect_code, text, Env};

const NAMESPACE: &str = "graphs";

/// `up --yes`, which must succeed; what it printed is kept in `printed`.
fn up(env: &Env, printed: &mut String) {
    let out = env.run(&["up", "--yes"]);
    expect_code(&out, 0);
    printed.push_str(&text(&out.stdout));
    printed.push_str(&text(&out.stderr));
}

fn write_stack(env: &Env, copies: u32) {
    std::fs::write(
        env.path().join("stack.yaml"),
        format!(
            "version: 1\nname: ag\nkubernetes:\n  kubeconfig: kubeconfig\n  namespace: {NAMESPACE}\ndatabases:\n  - kind: allegrograph\n    name: graph\n    replicas: {copies}\n    repository: kg\n    storage: 1GiB\n    shmSize: 1GiB\ntimeouts:\n  healthy: 60s\n"
        ),
    )
    .unwrap();
}

/// The requests the AllegroGraph nodes served, as the double logged them.
fn ag_log(env: &Env) -> Vec<Value> {
    std::fs::read_to_string(env.path().join("agraph.log"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `METHOD PATH` of the log's requests whose path contains `part`.
fn calls(env: &Env, part: &str) -> Vec<String> {
    ag_log(env)
        .iter()
        .filter(|r| r["path"].as_str().unwrap_or_default().contains(part))
        .map(|r| {
            format!(
                "{} {} {}",
                r["method"].as_str().unwrap_or_default(),
                r["path"].as_str().unwrap_or_default(),
                r["status"]
            )
        })
        .collect()
}

fn membership(env: &Env) -> String {
    let status = env.run(&["status", "--output", "json"]);
    expect_code(&status, 0);
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    status["databases"][0]["membership"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn an_allegrograph_cluster_follows_its_copies_both_ways_and_takes_back_a_copy_restarted_empty() {
    let mut printed = String::new();
    let env = Env::new("ag", 1, String::new());
    let log = env.path().join("agraph.log").display().to_string();
    let double = KubeDouble::start_with(
        env.path(),
        &[
            "--agraph",
            "--agraph-log",
            &log,
            "--agraph-boot-seconds",
            "0.3",
            "--container-env",
            "STACK_CHECK_SECONDS=1",
            "--container-log",
            &env.path().join("containers.log").display().to_string(),
            "--hook-log",
            &env.path().join("pod-network.log").display().to_string(),
        ],
    );
    write_stack(&env, 2);

    // Up: the objects, the cluster made on the controlling instance, the
    // copies joined by their sidecars under their pod names.
    up(&env, &mut printed);
    let created = calls(&env, "/repl/createCluster");
    assert_eq!(created.len(), 1, "{created:?}");
    let made = &created[0];
    assert!(
        made.starts_with("PUT /repositories/kg/repl/createCluster?"),
        "{made}"
    );
    for part in [
        "host=graph-controlling-0.graph-controlling.graphs.svc.cluster.local",
        "port=10035",
        "user=admin",
        "password=***",
        "instanceName=graph-controlling-0",
    ] {
        assert!(made.contains(part), "{part} in {made}");
    }
    assert!(made.ends_with(" 200") || made.ends_with(" 204"), "{made}");
    let grown = calls(&env, "/repl/growCluster");
    for copy in ["graph-copy-0", "graph-copy-1"] {
        let mine: Vec<&String> = grown
            .iter()
            .filter(|g| g.contains(&format!("instanceName={copy}")))
            .collect();
        assert!(!mine.is_empty(), "{copy} grew: {grown:?}");
        assert!(
            mine[0].contains(&format!("host={copy}.graph-copy.graphs.svc.cluster.local")),
            "a copy is named by its pod, reached by its DNS name: {mine:?}"
        );
    }
    assert!(
        !calls(&env, "/repl/status").is_empty(),
        "the gate read the replication status"
    );
    let api = std::fs::read_to_string(&double.log).unwrap();
    assert!(
        api.lines()
            .any(|l| l.contains("/pods/graph-controlling-0/portforward?")),
        "stack reached the controlling instance over a port-forward"
    );
    for object in [
        "secrets/graph-admin",
        "configmaps/graph-member",
        "services/graph-controlling",
        "services/graph-copy",
        "services/graph",
        "poddisruptionbudgets/graph",
        "statefulsets/graph-controlling",
        "statefulsets/graph-copy",
    ] {
        assert!(
            api.lines().any(|l| l.starts_with("PATCH")
                && l.contains(&format!("/{object}?"))
                && l.contains("dryRun=All")),
            "no dry run of {object}"
        );
    }
    assert_eq!(membership(&env), "2 of 2 copies running");
    expect_code(&env.run(&["plan", "--detailed-exitcode"]), 0);

    // 2 → 3: the new copy joins.
    write_stack(&env, 3);
    up(&env, &mut printed);
    assert_eq!(membership(&env), "3 of 3 copies running");
    assert_eq!(calls(&env, "/repl/createCluster").len(), 1, "made once");
    expect_code(&env.run(&["plan", "--detailed-exitcode"]), 0);

    // 3 → 1: the copies scaled away leave; no dead member stays.
    write_stack(&env, 1);
    let plan = env.run(&["plan"]);
    expect_code(&plan, 0);
    let shown = text(&plan.stdout);
    assert!(
        shown.contains("graph-copy-1, graph-copy-2 leave"),
        "{shown}"
    );
    up(&env, &mut printed);
    let removed = calls(&env, "/repl/remove?instanceName=graph-copy-");
    for copy in ["graph-copy-1", "graph-copy-2"] {
        assert!(
            removed
                .iter()
                .any(|r| r.contains(&format!("instanceName={copy} "))),
            "{copy} removed: {removed:?}"
        );
    }
    let status = env.run(&["status"]);
    let shown = text(&status.stdout);
    assert!(
        shown.contains("database graph (allegrograph): membership 1 of 1 copies running"),
        "{shown}"
    );
    assert!(!shown.contains("problem:"), "{shown}");
    expect_code(&env.run(&["plan", "--detailed-exitcode"]), 0);

    // A copy restarted empty: removed under its old name and grown again.
    let before = ag_log(&env).len();
    let (code, body) = double.request(
        "DELETE",
        &format!("/api/v1/namespaces/{NAMESPACE}/pods/graph-copy-0"),
        "application/json",
        "",
    );
    assert!(code == 200 || code == 202, "{code} {body}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let since: Vec<String> = ag_log(&env)[before..]
            .iter()
            .filter(|r| r["status"].as_u64().is_some_and(|s| s < 300))
            .map(|r| r["path"].as_str().unwrap_or_default().to_string())
            .collect();
        let grew = since
            .iter()
            .any(|p| p.contains("/repl/growCluster") && p.contains("instanceName=graph-copy-0"));
        if grew && membership(&env) == "1 of 1 copies running" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "graph-copy-0 did not join again: {since:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    expect_code(&env.run(&["plan", "--detailed-exitcode"]), 0);

    // No password in the logs of the double or of the sidecars.
    let state = env.state("ag");
    let password = state["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["address"] == "allegrograph.graph.credentials")
        .unwrap()["attrs"]["password"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(password.len() >= 16);
    // What every `up` printed (the first one made the secrets), then plans and statuses.
    let mut shown = printed.clone();
    for args in [
        &["plan"][..],
        &["plan", "--output", "json"],
        &["status"],
        &["status", "--output", "json"],
    ] {
        let out = env.run(args);
        shown.push_str(&text(&out.stdout));
        shown.push_str(&text(&out.stderr));
    }
    for file in ["agraph.log", "containers.log", "pod-network.log"] {
        shown.push_str(&std::fs::read_to_string(env.path().join(file)).unwrap_or_default());
    }
    assert!(
        shown.contains("joined the cluster"),
        "the sidecars' output is among what is searched"
    );
    use base64::Engine as _;
    for secret in [
        password.clone(),
        base64::engine::general_purpose::STANDARD.encode(&password),
    ] {
        assert!(
            !shown.contains(&secret),
            "the super user's password was shown"
        );
    }
    assert!(!shown.contains("xyzzy"));
    let sets = double
        .get(&format!(
            "/apis/apps/v1/namespaces/{NAMESPACE}/statefulsets"
        ))
        .to_string();
    assert!(!sets.contains("xyzzy") && !sets.contains(&password));

    // Down leaves nothing.
    expect_code(&env.run(&["down", "--yes"]), 0);
    assert!(
        double.labelled("ag").is_empty(),
        "{:?}",
        double.labelled("ag")
    );
    let pods = double.get(&format!("/api/v1/namespaces/{NAMESPACE}/pods"));
    assert!(pods["items"].as_array().unwrap().is_empty(), "{pods}");
    let claims = double.get(&format!(
        "/api/v1/namespaces/{NAMESPACE}/persistentvolumeclaims"
    ));
    assert!(claims["items"].as_array().unwrap().is_empty(), "{claims}");
}
