//! immudb primaries with read replicas through the real CLI, on the
//! Kubernetes API double with its kubelet stand-in and the immudb TEST
//! DOUBLE (`tests/kube-api-double/immudb_double.py`; no real immudb runs
//! here) behind it: the replication user made on the primary with the
//! permission replication needs, replicas added, a lagging replica holding
//! the gate, drift repaired, and no vendor default or generated secret
//! anywhere it should not be.

use base64::Engine as _;
use serde_json::{json, Value};

use crate::support::kube::KubeDouble;
use crate::support::{expect_code, text, Env};

const NAMESPACE: &str = "vault";

fn b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// `up --yes`, which must succeed; what it printed is kept in `printed`.
fn up(env: &Env, printed: &mut String) {
    let out = env.run(&["up", "--yes"]);
    expect_code(&out, 0);
    printed.push_str(&text(&out.stdout));
    printed.push_str(&text(&out.stderr));
}

fn write_stack(env: &Env, replicas: u32) {
    std::fs::write(
        env.path().join("stack.yaml"),
        format!(
            "version: 1\nname: immu\nkubernetes:\n  kubeconfig: kubeconfig\n  namespace: {NAMESPACE}\ndatabases:\n  - kind: immudb\n    name: ledger\n    replicas: {replicas}\n    storage: 1GiB\ningress:\n  domain: immu.test\n  className: public\n  tcp: nodePort\nmonitoring: {{}}\ntimeouts:\n  healthy: 60s\n"
        ),
    )
    .unwrap();
}

/// The requests the immudb nodes served, as the double logged them.
fn immu_log(env: &Env) -> Vec<Value> {
    std::fs::read_to_string(env.path().join("immudb.log"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|r: &Value| r.get("method").is_some())
        .collect()
}

fn proxy(pod: &str, port: u16, path: &str) -> String {
    format!("/api/v1/namespaces/{NAMESPACE}/pods/{pod}:{port}/proxy{path}")
}

/// A client of the primary as the superuser, through the pod proxy.
fn admin_token(double: &KubeDouble) -> String {
    let secret = double.get(&format!(
        "/api/v1/namespaces/{NAMESPACE}/secrets/ledger-admin"
    ));
    let field = |k: &str| {
        String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(secret["data"][k].as_str().unwrap())
                .unwrap(),
        )
        .unwrap()
    };
    let login = json!({"user": b64(&field("username")), "password": b64(&field("password"))});
    let (code, _, answer) = double.raw(
        "POST",
        &proxy("ledger-primary-0", 8080, "/api/login"),
        &[],
        &login.to_string(),
    );
    assert_eq!(code, 200, "{answer}");
    serde_json::from_str::<Value>(&answer).unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string()
}

fn call(double: &KubeDouble, token: &str, path: &str, body: &Value) -> (u16, String) {
    let bearer = format!("Bearer {token}");
    let (code, _, answer) = double.raw(
        "POST",
        &proxy("ledger-primary-0", 8080, path),
        &[("Grpc-Metadata-Authorization", &bearer)],
        &body.to_string(),
    );
    (code, answer)
}

/// The last committed transaction of `db` on `pod`, from its metrics.
fn committed(double: &KubeDouble, pod: &str, db: &str) -> u64 {
    let (code, _, metrics) = double.raw("GET", &proxy(pod, 9497, "/metrics"), &[], "");
    assert_eq!(code, 200, "{metrics}");
    metrics
        .lines()
        .find(|l| {
            l.starts_with("immudb_last_committed_trx_id{") && l.contains(&format!("db=\"{db}\""))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or_else(|| panic!("no {db} in the metrics of {pod}:\n{metrics}"))
}

#[test]
fn an_immudb_primary_gets_replicas_that_catch_up_under_a_dedicated_user() {
    let mut printed = String::new();
    let env = Env::new("immu", 1, String::new());
    let log = env.path().join("immudb.log").display().to_string();
    let double = KubeDouble::start_with(
        env.path(),
        &[
            "--immudb",
            "--immudb-log",
            &log,
            "--immudb-replication-seconds",
            "0.05",
            // Replica 1 copies nothing for its first 6 s.
            "--immudb-lag",
            "ledger-replica-1=6",
        ],
    );
    write_stack(&env, 0);
    // Monitored: the cluster has the Prometheus Operator's CRD and the
    // observability namespace.
    double.install_prometheus_operator();

    // Up with no replica: the objects, then the replication user.
    up(&env, &mut printed);
    let requests = immu_log(&env);
    let posted = |path: &str| -> Vec<&Value> {
        requests
            .iter()
            .filter(|r| r["method"] == "POST" && r["path"] == path)
            .collect()
    };
    let login = posted("/api/login");
    assert!(!login.is_empty());
    assert_eq!(
        login[0]["body"]["user"],
        b64("immudb"),
        "stack logs in as the superuser"
    );
    let created = posted("/api/user");
    assert_eq!(created.len(), 1, "{created:?}");
    assert_eq!(created[0]["status"], 200);
    assert_eq!(
        created[0]["body"],
        json!({"user": b64("stack_replicator"), "password": "***", "permission": 254, "database": "defaultdb"})
    );
    let granted = posted("/api/user/changepermission");
    assert_eq!(granted.len(), 1, "{granted:?}");
    assert_eq!(
        granted[0]["body"],
        json!({"action": "GRANT", "username": "stack_replicator", "database": "systemdb", "permission": 254})
    );
    let listed = requests
        .iter()
        .position(|r| r["path"] == "/api/user/list")
        .unwrap();
    let made = requests
        .iter()
        .position(|r| r["path"] == "/api/user")
        .unwrap();
    assert!(listed < made, "the users are listed before one is made");
    let api = std::fs::read_to_string(&double.log).unwrap();
    for object in [
        "secrets/ledger-admin",
        "secrets/ledger-replication",
        "services/ledger-headless",
        "services/ledger-write",
        "services/ledger-read",
        "poddisruptionbudgets/ledger",
        "statefulsets/ledger-primary",
        "statefulsets/ledger-replica",
        "services/ledger-write-tcp",
        "services/ledger-read-tcp",
        "ingresses/ledger",
        "servicemonitors/ledger",
    ] {
        assert!(
            api.lines().any(|l| l.starts_with("PATCH")
                && l.contains(&format!("/{object}?"))
                && l.contains("dryRun=All")),
            "no dry run of {object}"
        );
    }
    expect_code(&env.run(&["plan", "--detailed-exitcode"]), 0);

    // Transactions a client commits on the primary.
    let token = admin_token(&double);
    for i in 0..5 {
        let kv = json!({"KVs": [{"key": b64(&format!("k{i}")), "value": b64("v")}]});
        let (code, answer) = call(&double, &token, "/api/db/set", &kv);
        assert_eq!(code, 200, "{answer}");
    }
    let head = committed(&double, "ledger-primary-0", "defaultdb");
    assert!(head >= 6, "{head}");

    // Two replicas: the gate waits until both have caught up, the lagging one too.
    write_stack(&env, 2);
    let plan = env.run(&["plan"]);
    expect_code(&plan, 0);
    let shown = text(&plan.stdout);
    assert!(shown.contains("ledger-replica"), "{shown}");
    up(&env, &mut printed);
    for pod in ["ledger-replica-0", "ledger-replica-1"] {
        for db in ["defaultdb", "systemdb"] {
            assert_eq!(
                committed(&double, pod, db),
                committed(&double, "ledger-primary-0", db),
                "{pod} has all of {db} once up returns"
            );
        }
    }
    let polled = immu_log(&env)
        .iter()
        .filter(|r| r["pod"] == format!("{NAMESPACE}/ledger-replica-1") && r["path"] == "/metrics")
        .count();
    assert!(
        polled >= 3,
        "the gate kept reading the lagging replica's metrics ({polled} times)"
    );
    expect_code(&env.run(&["plan", "--detailed-exitcode"]), 0);

    // Status: endpoints, credentials, lag per replica.
    let status = env.run(&["status"]);
    expect_code(&status, 0);
    let shown = text(&status.stdout);
    assert!(
        shown.contains("database ledger (immudb): membership 2 of 2 replicas in sync"),
        "{shown}"
    );
    assert!(
        shown.contains("replica ledger-replica-1: 0 transactions behind the primary"),
        "{shown}"
    );
    assert!(
        shown.contains("ledger-read.vault.svc.cluster.local:3322"),
        "{shown}"
    );
    assert!(
        shown.contains(&format!("Secret {NAMESPACE}/ledger-admin")),
        "{shown}"
    );

    // Drift: the user loses its permission on systemdb and is deactivated
    // (immudb refuses to grant to an inactive user); up repairs both.
    let revoke = json!({"action": "REVOKE", "username": "stack_replicator", "database": "systemdb", "permission": 254});
    let (code, answer) = call(&double, &token, "/api/user/changepermission", &revoke);
    assert_eq!(code, 200, "{answer}");
    let deactivate = json!({"active": false, "username": "stack_replicator"});
    let (code, answer) = call(&double, &token, "/api/user/setactiveUser", &deactivate);
    assert_eq!(code, 200, "{answer}");
    let drift = env.run(&["plan", "--detailed-exitcode"]);
    expect_code(&drift, 2);
    let shown = text(&drift.stdout);
    assert!(
        shown.contains("drift: user stack_replicator lacks"),
        "{shown}"
    );
    up(&env, &mut printed);
    expect_code(&env.run(&["plan", "--detailed-exitcode"]), 0);

    // No vendor default and no generated secret where they do not belong.
    let state = env.state("immu");
    let credentials = state["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["address"] == "immudb.ledger.credentials")
        .unwrap()["attrs"]
        .clone();
    let secrets: Vec<String> = ["password", "replicatorPassword"]
        .iter()
        .map(|k| credentials[k].as_str().unwrap().to_string())
        .collect();
    // What every `up` printed (the first one made the secrets), then plans and statuses.
    let mut shown = printed.clone();
    for args in [
        &["plan"][..],
        &["status"],
        &["status", "--output", "json"],
        &["plan", "--output", "json"],
    ] {
        let out = env.run(args);
        shown.push_str(&text(&out.stdout));
        shown.push_str(&text(&out.stderr));
    }
    shown.push_str(&std::fs::read_to_string(&log).unwrap());
    for secret in &secrets {
        assert!(secret.len() >= 16);
        assert!(!shown.contains(secret.as_str()), "a secret was shown");
        assert!(
            !shown.contains(&b64(secret)),
            "a secret was shown in base64"
        );
    }
    let objects = double.get(&format!("/api/v1/namespaces/{NAMESPACE}/secrets"));
    for secret in objects["items"].as_array().unwrap() {
        for value in secret["data"].as_object().into_iter().flatten() {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(value.1.as_str().unwrap())
                .unwrap();
            let decoded = String::from_utf8_lossy(&decoded);
            if value.0 == "password" {
                assert!(
                    !["immudb", "xyzzy", ""].contains(&decoded.as_ref()),
                    "a default password in {}",
                    secret["metadata"]["name"]
                );
            }
        }
    }
    let sets = double.get(&format!(
        "/apis/apps/v1/namespaces/{NAMESPACE}/statefulsets"
    ));
    let sets = sets.to_string();
    assert!(
        !sets.contains("\"value\":\"immudb\""),
        "a literal default in {sets}"
    );
    assert!(!sets.contains("xyzzy"));

    // Down leaves nothing.
    expect_code(&env.run(&["down", "--yes"]), 0);
    assert!(
        double.labelled("immu").is_empty(),
        "{:?}",
        double.labelled("immu")
    );
    let pods = double.get(&format!("/api/v1/namespaces/{NAMESPACE}/pods"));
    assert!(pods["items"].as_array().unwrap().is_empty(), "{pods}");
    let claims = double.get(&format!(
        "/api/v1/namespaces/{NAMESPACE}/persistentvolumeclaims"
    ));
    assert!(claims["items"].as_array().unwrap().is_empty(), "{claims}");
}
