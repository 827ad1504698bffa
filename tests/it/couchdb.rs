//! CouchDB clusters through the real CLI, on the Kubernetes API double with
//! its kubelet stand-in and the CouchDB double behind it: formation once,
//! the health gate, scaling up with shard copies for the new members and
//! down with copies moved off first, drift repaired, replications kept as
//! `_replicator` documents, and no generated secret ever shown.

use serde_json::Value;

use crate::support::couch::{couch_env, couch_log, node, write_stack, Client, NAMESPACE};
use crate::support::kube::change_lines;
use crate::support::{expect_code, text, Env};

fn docs_cluster(replicas: u32) -> String {
    format!(
        "  - kind: couchdb\n    name: docs\n    replicas: {replicas}\n    storage: 1GiB\n    databases:\n      - {{name: orders, q: 2}}\n    replications:\n      - name: archive\n        source: orders\n        target: {{cluster: docs, database: orders-archive}}\n"
    )
}

/// The requests of the CouchDB log as `METHOD PATH STATUS` lines.
fn requests(env: &Env) -> Vec<String> {
    couch_log(env)
        .iter()
        .map(|r| {
            format!(
                "{} {} {}",
                r["method"].as_str().unwrap(),
                r["path"].as_str().unwrap(),
                r["status"]
            )
        })
        .collect()
}

fn holders(client: &Client, db: &str) -> Vec<String> {
    let map = client.get("docs-0", &format!("/_node/_local/_dbs/{db}"));
    let mut nodes: Vec<String> = map["by_node"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    nodes.sort();
    nodes
}

fn membership(client: &Client) -> (Vec<String>, Vec<String>) {
    let m = client.get("docs-0", "/_membership");
    let list = |k: &str| -> Vec<String> {
        m[k].as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_str().unwrap().to_string())
            .collect()
    };
    (list("cluster_nodes"), list("all_nodes"))
}

#[test]
fn a_couchdb_cluster_forms_once_scales_both_ways_without_losing_documents_and_is_repaired() {
    let (env, double) = couch_env("couch", &docs_cluster(3));

    // Up: the objects, then formation once every member is ready.
    let up = env.run(&["up", "--yes"]);
    expect_code(&up, 0);
    let log = requests(&env);
    let finished: Vec<&String> = log
        .iter()
        .filter(|l| l.starts_with("POST /_cluster_setup"))
        .collect();
    assert_eq!(
        finished.iter().filter(|l| l.ends_with(" 201")).count(),
        1,
        "finish_cluster succeeds once: {finished:?}"
    );
    assert!(
        finished
            .iter()
            .all(|l| l.ends_with(" 201") || l.ends_with(" 500")),
        "only retried while a seed is missing: {finished:?}"
    );
    let setup = couch_log(&env)
        .into_iter()
        .find(|r| r["path"] == "/_cluster_setup" && r["status"] == 201)
        .unwrap();
    assert_eq!(
        setup["body"],
        serde_json::json!({"action": "finish_cluster"})
    );
    // Every object of the cluster went through a server-side dry run first.
    let api = std::fs::read_to_string(&double.log).unwrap();
    for object in [
        "secrets/docs-admin",
        "secrets/docs-internal",
        "configmaps/docs-config",
        "services/docs-headless",
        "services/docs",
        "poddisruptionbudgets/docs",
        "statefulsets/docs",
    ] {
        assert!(
            api.lines().any(|l| l.starts_with("PATCH")
                && l.contains(&format!("/{object}?"))
                && l.contains("dryRun=All")),
            "no dry run of {object}"
        );
    }
    let client = Client::admin(&double, "docs");
    let (cluster_nodes, all_nodes) = membership(&client);
    let three: Vec<String> = (0..3).map(|i| node("docs", i)).collect();
    assert_eq!(cluster_nodes, three);
    assert_eq!(all_nodes, three);
    let dbs = client.get("docs-1", "/_all_dbs");
    for db in ["_replicator", "_users", "orders"] {
        assert!(
            dbs.as_array().unwrap().iter().any(|d| d == db),
            "{db} in {dbs}"
        );
    }
    let replication = client.get("docs-0", "/_replicator/stack-couch-docs-archive");
    assert_eq!(replication["continuous"], true);
    assert_eq!(replication["create_target"], true);
    let plan = env.run(&["plan", "--detailed-exitcode"]);
    expect_code(&plan, 0);

    // Documents a client writes, all to be readable after every scaling.
    for i in 0..40 {
        let (code, body) = client.call(
            "docs-0",
            "PUT",
            &format!("/orders/order-{i}"),
            &format!("{{\"n\": {i}}}"),
        );
        assert_eq!(code, 201, "{body}");
    }
    let readable = |client: &Client, pod: &str| {
        for i in 0..40 {
            let (code, body) = client.call(pod, "GET", &format!("/orders/order-{i}"), "");
            assert_eq!(code, 200, "order-{i} on {pod} after scaling: {body}");
        }
    };

    // 3 → 5: the new members join and get shard copies of every database.
    write_stack(&env, "couch", &docs_cluster(5));
    let plan = env.run(&["plan"]);
    expect_code(&plan, 0);
    let shown = text(&plan.stdout);
    assert!(shown.contains("couchdb.docs.placement"), "{shown}");
    assert!(
        shown.contains("new members get shard copies once they joined"),
        "{shown}"
    );
    let up = env.run(&["up", "--yes"]);
    expect_code(&up, 0);
    let (cluster_nodes, _) = membership(&client);
    assert_eq!(cluster_nodes.len(), 5, "{cluster_nodes:?}");
    for db in ["orders", "_users", "_replicator"] {
        let on = holders(&client, db);
        assert!(
            on.contains(&node("docs", 3)) || on.contains(&node("docs", 4)),
            "{db} has copies on the new members: {on:?}"
        );
    }
    readable(&client, "docs-4");
    let plan = env.run(&["plan", "--detailed-exitcode"]);
    expect_code(&plan, 0);
    // A database a client makes with one copy per range: some ranges live
    // only on members that are about to leave.
    let (code, body) = client.call("docs-0", "PUT", "/ledger?q=8&n=1", "");
    assert_eq!(code, 201, "{body}");
    let ledger = holders(&client, "ledger");
    assert!(
        ledger.contains(&node("docs", 3)) && ledger.contains(&node("docs", 4)),
        "{ledger:?}"
    );
    for i in 0..40 {
        let (code, body) = client.call("docs-1", "PUT", &format!("/ledger/entry-{i}"), "{}");
        assert_eq!(code, 201, "{body}");
    }

    // 5 → 3: copies move off the departing members before the StatefulSet shrinks.
    write_stack(&env, "couch", &docs_cluster(3));
    let plan = env.run(&["plan"]);
    let shown = text(&plan.stdout);
    let lines = change_lines(&shown);
    let at = |needle: &str| {
        lines
            .iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("{needle} not in:\n{shown}"))
    };
    assert!(
        at("couchdb.docs.placement") < at("StatefulSet/docs"),
        "{shown}"
    );
    assert!(
        at("StatefulSet/docs") < at("couchdb.docs.membership"),
        "{shown}"
    );
    let before = requests(&env).len();
    let up = env.run(&["up", "--yes"]);
    expect_code(&up, 0);
    readable(&client, "docs-0");
    readable(&client, "docs-2");
    for i in 0..40 {
        let (code, body) = client.call("docs-2", "GET", &format!("/ledger/entry-{i}"), "");
        assert_eq!(code, 200, "entry-{i} of ledger after scaling down: {body}");
    }
    let moved: Vec<String> = requests(&env)[before..]
        .iter()
        .filter(|l| l.contains("_dbs/") || l.contains("_sync_shards") || l.contains("_system"))
        .cloned()
        .collect();
    let first = |needle: &str| {
        moved
            .iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("{needle}: {moved:?}"))
    };
    let last = |needle: &str| moved.iter().rposition(|l| l.contains(needle)).unwrap();
    // The documented procedure: add the new copies, sync, wait for internal
    // replication, then drop the old copies.
    assert!(
        first("PUT /_node/_local/_dbs/") < first("_sync_shards"),
        "{moved:?}"
    );
    assert!(
        first("_sync_shards") < first("GET /_node/_local/_system"),
        "{moved:?}"
    );
    assert!(
        last("GET /_node/_local/_system") < last("PUT /_node/_local/_dbs/"),
        "{moved:?}"
    );
    let (cluster_nodes, all_nodes) = membership(&client);
    assert_eq!(
        cluster_nodes, three,
        "departed members are gone from cluster_nodes"
    );
    assert_eq!(all_nodes, three);
    for db in [
        "orders",
        "_users",
        "_replicator",
        "orders-archive",
        "ledger",
    ] {
        let map = client.get("docs-0", &format!("/_node/_local/_dbs/{db}"));
        let text = map["by_range"].to_string() + &map["by_node"].to_string();
        assert!(
            !text.contains("docs-3") && !text.contains("docs-4"),
            "{db}: {map}"
        );
    }
    let plan = env.run(&["plan", "--detailed-exitcode"]);
    expect_code(&plan, 0);

    // A node removed out of band is drift, and `up` puts it back.
    let gone = node("docs", 2);
    let doc = client.get("docs-0", &format!("/_node/_local/_nodes/{gone}"));
    let (code, body) = client.call(
        "docs-0",
        "DELETE",
        &format!(
            "/_node/_local/_nodes/{gone}?rev={}",
            doc["_rev"].as_str().unwrap()
        ),
        "",
    );
    assert_eq!(code, 200, "{body}");
    let plan = env.run(&["plan", "--detailed-exitcode"]);
    expect_code(&plan, 2);
    let shown = text(&plan.stdout);
    assert!(
        shown.contains("docs-2 run but are not in cluster_nodes"),
        "{shown}"
    );
    expect_code(&env.run(&["up", "--yes"]), 0);
    let (cluster_nodes, _) = membership(&client);
    assert_eq!(cluster_nodes, three);
    expect_code(&env.run(&["plan", "--detailed-exitcode"]), 0);

    // Status: the endpoint, where the credentials are, membership, replications.
    let status = env.run(&["status"]);
    expect_code(&status, 0);
    let shown = text(&status.stdout);
    assert!(
        shown.contains("database docs (couchdb): membership 3 of 3"),
        "{shown}"
    );
    assert!(
        shown.contains(&format!("Secret {NAMESPACE}/docs-admin")),
        "{shown}"
    );
    assert!(shown.contains("replication archive: running"), "{shown}");
    let json = env.run(&["status", "--output", "json"]);
    let status: Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(status["databases"][0]["membership"], "3 of 3");

    // Down leaves nothing.
    expect_code(&env.run(&["down", "--yes"]), 0);
    assert!(
        double.labelled("couch").is_empty(),
        "{:?}",
        double.labelled("couch")
    );
    let pods = double.get(&format!("/api/v1/namespaces/{NAMESPACE}/pods"));
    assert!(pods["items"].as_array().unwrap().is_empty(), "{pods}");
}

#[test]
fn a_crashing_replication_is_drift_and_no_generated_secret_is_ever_shown() {
    let databases = "  - kind: couchdb\n    name: solo\n    replicas: 1\n    storage: 1GiB\n    databases:\n      - {name: events}\n    replications:\n      - name: offsite\n        source: events\n        target: {url: 'http://backup.nowhere.invalid/events', credentials: offsite}\n";
    let (env, double) = couch_env("crash", databases);
    // Behind the TLS ingress, and monitored: the cluster has the Prometheus
    // Operator's CRD and the observability namespace.
    let stack = std::fs::read_to_string(env.path().join("stack.yaml")).unwrap();
    std::fs::write(
        env.path().join("stack.yaml"),
        stack + "ingress:\n  domain: crash.test\n  className: public\nmonitoring: {}\n",
    )
    .unwrap();
    double.install_prometheus_operator();
    // The user's Secret for the target, made as kubectl would.
    let offsite = r#"{"apiVersion":"v1","kind":"Secret","metadata":{"name":"offsite","namespace":"couch"},"stringData":{"username":"remote","password":"user-given-pass-4711"}}"#;
    double.request(
        "POST",
        "/api/v1/namespaces",
        "application/json",
        r#"{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"couch"}}"#,
    );
    let (code, body) = double.request(
        "POST",
        "/api/v1/namespaces/couch/secrets",
        "application/json",
        offsite,
    );
    assert_eq!(code, 201, "{body}");

    let mut shown = String::new();
    let plan = env.run(&["plan", "-v"]);
    expect_code(&plan, 0);
    shown += &(text(&plan.stdout) + &text(&plan.stderr));
    let up = env.run(&["up", "--yes", "-v"]);
    expect_code(&up, 0);
    shown += &(text(&up.stdout) + &text(&up.stderr));

    // The job cannot reach its target: crashing, which the plan shows as drift.
    let client = Client::admin(&double, "solo");
    client.wait_for(
        "solo-0",
        "/_scheduler/docs/_replicator",
        "the job crashes",
        |jobs| {
            jobs["docs"]
                .as_array()
                .is_some_and(|d| d.iter().any(|j| j["state"] == "crashing"))
        },
    );
    let plan = env.run(&["plan", "--detailed-exitcode", "-v"]);
    expect_code(&plan, 2);
    let out = text(&plan.stdout);
    assert!(out.contains("couchdb.solo.replication[offsite]"), "{out}");
    assert!(out.contains("the job is crashing"), "{out}");
    shown += &(out + &text(&plan.stderr));
    let json = env.run(&["plan", "--output", "json"]);
    shown += &(text(&json.stdout) + &text(&json.stderr));
    let status = env.run(&["status", "--output", "json"]);
    shown += &text(&status.stdout);
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(
        status["databases"][0]["replications"][0]["state"],
        "crashing"
    );

    // The client Service behind the ingress; Prometheus scrapes it with the
    // admin's credentials, which the endpoint needs.
    let ingress = double.get(&format!(
        "/apis/networking.k8s.io/v1/namespaces/{NAMESPACE}/ingresses/solo"
    ));
    assert_eq!(ingress["spec"]["rules"][0]["host"], "solo.crash.test");
    let backend = &ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"];
    assert_eq!(
        (backend["name"].as_str(), backend["port"]["number"].as_u64()),
        (Some("solo"), Some(5984))
    );
    let monitor = double.get(&format!(
        "/apis/monitoring.coreos.com/v1/namespaces/{NAMESPACE}/servicemonitors/solo"
    ));
    let endpoint = &monitor["spec"]["endpoints"][0];
    assert_eq!(endpoint["path"], "/_node/_local/_prometheus");
    assert_eq!(endpoint["basicAuth"]["password"]["name"], "solo-admin");
    assert_eq!(
        monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"],
        "client"
    );
    let client_service = double.get(&format!("/api/v1/namespaces/{NAMESPACE}/services/solo"));
    assert_eq!(
        client_service["metadata"]["labels"]["app.kubernetes.io/component"],
        "client"
    );
    let (code, _, _) = double.raw(
        "GET",
        &crate::support::couch::proxy("solo-0", "/_node/_local/_prometheus"),
        &[],
        "",
    );
    assert_eq!(code, 401, "the metrics need the admin's credentials");
    let (code, metrics) = client.call("solo-0", "GET", "/_node/_local/_prometheus", "");
    assert_eq!(code, 200);
    assert!(
        metrics
            .as_str()
            .unwrap_or_default()
            .contains("couchdb_couch_replicator_jobs_crashing"),
        "{metrics}"
    );
    let dashboard = double.get("/api/v1/namespaces/observability/configmaps/crash-solo-dashboard");
    let panels = dashboard["data"]["crash-solo.json"].as_str().unwrap();
    for title in [
        "HTTP requests",
        "Document writes",
        "Replication jobs running",
        "Replication jobs crashing",
    ] {
        assert!(panels.contains(title), "{title} in {panels}");
    }

    // Every generated secret, and the user's password, as the state keeps them.
    let state = env.state("crash");
    let credentials = state["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["address"] == "couchdb.solo.credentials")
        .unwrap()["attrs"]
        .clone();
    let mut secrets: Vec<String> = ["password", "erlangCookie", "couchdbSecret"]
        .iter()
        .map(|k| credentials[k].as_str().unwrap().to_string())
        .collect();
    secrets.push("user-given-pass-4711".into());
    use base64::Engine as _;
    for secret in &secrets {
        assert!(secret.len() >= 16);
        assert!(
            !shown.contains(secret.as_str()),
            "a secret was shown:\n{shown}"
        );
        let encoded = base64::engine::general_purpose::STANDARD.encode(secret);
        assert!(
            !shown.contains(&encoded),
            "a secret was shown in base64:\n{shown}"
        );
    }
    // The cluster's Secret holds the same password the state does.
    let admin = double.get(&format!(
        "/api/v1/namespaces/{NAMESPACE}/secrets/solo-admin"
    ));
    assert_eq!(
        admin["data"]["password"],
        base64::engine::general_purpose::STANDARD.encode(&secrets[0])
    );
    expect_code(&env.run(&["down", "--yes"]), 0);
}
