//! What a real kube-apiserver does that once escaped stack, now done by the
//! API double too: zero values left out of stored objects, Deployments that
//! roll out a pod at a time, 422 for changes refused in place, Namespaces
//! that stay Terminating; and what `plan`, `up` and `down` make of it. Also
//! the first SIGINT during a health gate, which stops the run at once.

use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use crate::support::kube::{
    change_lines, kube_env, plain_kube_env, rewrite_manifests, APP_MANIFESTS,
};
use crate::support::{expect_code, text};

const DEPLOYMENT: &str = "apiVersion: apps/v1
kind: Deployment
metadata:
  name: api
  annotations:
    kube-api-double/rollout-seconds: \"3\"
spec:
  replicas: 2
  paused: false
  minReadySeconds: 0
  selector:
    matchLabels: {app: api}
  template:
    metadata:
      labels: {app: api}
    spec:
      hostNetwork: false
      containers:
        - name: api
          image: nginx:1.27
          args: []
          env:
            - {name: EMPTY, value: \"\"}
          volumeMounts:
            - {name: scratch, mountPath: /scratch, readOnly: false}
      volumes:
        - name: scratch
          emptyDir: {}
";

#[test]
fn zero_values_the_server_leaves_out_are_not_drift_and_a_rollout_is_awaited_to_its_end() {
    let (env, double) = plain_kube_env("zero", DEPLOYMENT, "2m");
    expect_code(&env.run(&["up", "--yes"]), 0);
    let live = double.get("/apis/apps/v1/namespaces/zero/deployments/api");
    assert!(
        live["spec"].get("paused").is_none(),
        "the double stores no zero values: {live}"
    );
    let plan = env.run(&["plan", "--detailed-exitcode"]);
    expect_code(&plan, 0);

    // A new image rolls out one pod at a time; `up` returns only when the
    // last old pod is gone, as `kubectl rollout status` would.
    rewrite_manifests(&env, &DEPLOYMENT.replace("nginx:1.27", "nginx:1.28"));
    let up = env.run(&["up", "--yes"]);
    expect_code(&up, 0);
    let status = &double.get("/apis/apps/v1/namespaces/zero/deployments/api")["status"];
    assert_eq!(
        (
            &status["replicas"],
            &status["updatedReplicas"],
            &status["availableReplicas"]
        ),
        (&2.into(), &2.into(), &2.into()),
        "up returned mid-rollout: {status}\n{}",
        text(&up.stderr)
    );
    expect_code(&env.run(&["plan", "--detailed-exitcode"]), 0);
}

const REFUSED: &str = "apiVersion: v1
kind: Secret
metadata:
  name: token
type: Opaque
stringData:
  token: abc
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: settings
immutable: true
data:
  mode: fast
---
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: db
spec:
  replicas: 1
  serviceName: db
  revisionHistoryLimit: 5
  selector:
    matchLabels: {app: db}
  template:
    metadata:
      labels: {app: db}
    spec:
      containers:
        - {name: db, image: postgres:17}
";

#[test]
fn changes_the_server_refuses_in_place_are_planned_and_made_as_replacements() {
    let (env, double) = plain_kube_env("sealed", REFUSED, "30s");
    expect_code(&env.run(&["up", "--yes"]), 0);
    let before = double.get("/apis/apps/v1/namespaces/sealed/statefulsets/db");
    rewrite_manifests(
        &env,
        &REFUSED
            .replace("type: Opaque", "type: example.com/token")
            .replace("mode: fast", "mode: safe")
            .replace("revisionHistoryLimit: 5", "revisionHistoryLimit: 3"),
    );
    let plan = env.run(&["plan", "--detailed-exitcode"]);
    expect_code(&plan, 2);
    let shown = text(&plan.stdout);
    assert_eq!(
        change_lines(&shown),
        [
            "  -/+ k8s.sealed/ConfigMap/settings (sealed/settings)",
            "  -/+ k8s.sealed/Secret/token (sealed/token)",
            "  -/+ k8s.sealed/StatefulSet/db (sealed/db)",
        ],
        "{shown}"
    );
    assert!(
        shown
            .contains("(spec.revisionHistoryLimit cannot change in place: deleted and made again)"),
        "{shown}"
    );
    assert!(
        !shown.contains("YWJj"),
        "a Secret's data is never shown: {shown}"
    );
    let up = env.run(&["up", "--yes"]);
    expect_code(&up, 0);
    let after = double.get("/apis/apps/v1/namespaces/sealed/statefulsets/db");
    assert_eq!(after["spec"]["revisionHistoryLimit"], 3);
    assert_ne!(after["metadata"]["uid"], before["metadata"]["uid"]);
    assert_eq!(
        double.get("/api/v1/namespaces/sealed/secrets/token")["type"],
        "example.com/token"
    );
    expect_code(&env.run(&["plan", "--detailed-exitcode"]), 0);
}

#[test]
fn down_removes_objects_with_the_stacks_labels_of_every_kind_it_applies() {
    let (env, double) = kube_env("strays", APP_MANIFESTS, "30s");
    expect_code(&env.run(&["up", "--yes"]), 0);
    // Kinds the stack never declared, carrying its labels.
    let labels = r#"{"app.kubernetes.io/managed-by":"stack","app.kubernetes.io/part-of":"strays"}"#;
    let daemon_set = format!(
        r#"{{"apiVersion":"apps/v1","kind":"DaemonSet","metadata":{{"name":"agent","labels":{labels}}},"spec":{{"selector":{{"matchLabels":{{"app":"agent"}}}},"template":{{"metadata":{{"labels":{{"app":"agent"}}}},"spec":{{"containers":[{{"name":"agent","image":"busybox:1.37"}}]}}}}}}}}"#
    );
    let job = format!(
        r#"{{"apiVersion":"batch/v1","kind":"Job","metadata":{{"name":"once","labels":{labels}}},"spec":{{"template":{{"spec":{{"restartPolicy":"Never","containers":[{{"name":"once","image":"busybox:1.37"}}]}}}}}}}}"#
    );
    for (path, body) in [
        ("/apis/apps/v1/namespaces/strays/daemonsets", daemon_set),
        ("/apis/batch/v1/namespaces/strays/jobs", job),
    ] {
        let (code, answer) = double.request("POST", path, "application/json", &body);
        assert_eq!(code, 201, "{answer}");
    }
    let down = env.run(&["down", "--yes"]);
    expect_code(&down, 0);
    let shown = text(&down.stdout);
    assert!(shown.contains("-   k8s.strays/DaemonSet/agent"), "{shown}");
    assert!(
        shown.contains("Nothing with the labels of stack strays is left in the existing cluster (14 kinds stack applies were listed; the cluster does not serve ServiceMonitor)"),
        "{shown}"
    );
    assert_eq!(double.labelled("strays"), Vec::<String>::new());
}

const SERVICES: &str = "apiVersion: v1
kind: Service
metadata:
  name: plain
  labels: {example.com/tier: web}
spec:
  selector: {app: plain}
  ports:
    - {port: 9000, targetPort: 9000}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: plain
spec:
  replicas: 1
  selector:
    matchLabels: {app: plain}
  template:
    metadata:
      labels: {app: plain}
    spec:
      containers:
        - {name: plain, image: nginx:1.27}
";

#[test]
fn drift_says_what_changed_how_and_who_changed_it() {
    let (env, double) = plain_kube_env("who", SERVICES, "30s");
    expect_code(&env.run(&["up", "--yes"]), 0);
    let log = std::fs::read_to_string(&double.log).unwrap();
    let lists: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("labelSelector="))
        .collect();
    assert!(!lists.is_empty());
    for line in lists {
        assert!(
            line.ends_with(concat!("user-agent=stack/", env!("CARGO_PKG_VERSION"))),
            "{line}"
        );
    }

    // Another manager takes a field of an unnamed list element, another a
    // label whose key has dots, and one strips the stack's own label.
    let (code, answer) = double.request(
        "PATCH",
        "/api/v1/namespaces/who/services/plain?fieldManager=kubectl&force=true",
        "application/apply-patch+yaml",
        r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"plain"},"spec":{"ports":[{"port":9000,"protocol":"TCP","targetPort":9001}]}}"#,
    );
    assert_eq!(code, 200, "{answer}");
    let (code, answer) = double.request(
        "PATCH",
        "/api/v1/namespaces/who/services/plain?fieldManager=kubectl-label",
        "application/merge-patch+json",
        r#"{"metadata":{"labels":{"example.com/tier":"db","app.kubernetes.io/part-of":null}}}"#,
    );
    assert_eq!(code, 200, "{answer}");
    // And the stack file sets a field the server had defaulted.
    rewrite_manifests(
        &env,
        &SERVICES.replace(
            "spec:\n  replicas: 1\n",
            "spec:\n  replicas: 1\n  revisionHistoryLimit: 4\n",
        ),
    );

    let plan = env.run(&["plan", "--detailed-exitcode"]);
    expect_code(&plan, 2);
    let shown = text(&plan.stdout);
    let (drift, intended) = shown.split_once("Changes:").expect("both kinds of change");
    assert!(
        drift.contains("~   k8s.who/Service/plain (who/plain)"),
        "relabelled, not gone:\n{shown}"
    );
    for owner in [
        "spec.ports[0].targetPort is now managed by kubectl",
        r#"metadata.labels["example.com/tier"] is now managed by kubectl-label"#,
    ] {
        assert!(drift.contains(owner), "{owner} missing:\n{shown}");
    }
    assert!(
        drift.contains(r#"metadata.labels["app.kubernetes.io/part-of"]: (none) → "who""#),
        "{shown}"
    );
    assert!(
        intended.contains("~   k8s.who/Deployment/plain (who/plain)")
            && intended.contains("changed in the stack: spec.revisionHistoryLimit"),
        "a value newly set over a server default is the stack's change:\n{shown}"
    );
    expect_code(&env.run(&["up", "--yes"]), 0);
    expect_code(&env.run(&["plan", "--detailed-exitcode"]), 0);
    let service = double.get("/api/v1/namespaces/who/services/plain");
    assert_eq!(service["metadata"]["labels"]["example.com/tier"], "web");
    assert_eq!(service["spec"]["ports"][0]["targetPort"], 9000);
}

#[test]
fn a_namespace_being_deleted_is_seen_by_plan_and_made_again_once_it_is_gone() {
    let (env, double) = plain_kube_env("going", SERVICES, "1m");
    expect_code(&env.run(&["up", "--yes"]), 0);
    let (code, _) = double.request(
        "PATCH",
        "/api/v1/namespaces/going?fieldManager=kubectl-annotate",
        "application/merge-patch+json",
        r#"{"metadata":{"annotations":{"kube-api-double/terminating-seconds":"6"}}}"#,
    );
    assert_eq!(code, 200);
    let (code, _) = double.request("DELETE", "/api/v1/namespaces/going", "application/json", "");
    assert_eq!(code, 200);
    let plan = env.run(&["plan", "--detailed-exitcode"]);
    expect_code(&plan, 2);
    let shown = text(&plan.stdout);
    assert!(shown.contains("+   k8s.Namespace/going"), "{shown}");
    assert!(
        shown.contains("(Terminating): made again once it is gone"),
        "{shown}"
    );
    assert!(
        shown.contains("+   k8s.going/Deployment/plain"),
        "what is in it goes too:\n{shown}"
    );
    expect_code(&env.run(&["up", "--yes"]), 0);
    let namespace = double.get("/api/v1/namespaces/going");
    assert!(
        namespace["metadata"].get("deletionTimestamp").is_none(),
        "{namespace}"
    );
    expect_code(&env.run(&["plan", "--detailed-exitcode"]), 0);
}

fn never_ready() -> String {
    APP_MANIFESTS.replace(
        "metadata:\n  name: web\nspec:\n  replicas: 3",
        "metadata:\n  name: web\n  annotations:\n    kube-api-double/never-ready: \"true\"\nspec:\n  replicas: 3",
    )
}

#[test]
fn a_first_up_that_fails_still_leaves_the_inventory_in_the_cluster() {
    let (env, double) = kube_env("first", &never_ready(), "2s");
    expect_code(&env.run(&["up", "--yes"]), 1);
    let inventory = double.get("/api/v1/namespaces/first/configmaps/stack-first-inventory");
    let kinds = inventory["data"]["kinds"].as_str().unwrap();
    for kind in [
        "apps/v1 StatefulSet",
        "networking.k8s.io/v1 Ingress",
        "v1 Service",
    ] {
        assert!(kinds.contains(kind), "{kind} not in {kinds}");
    }
}

#[test]
fn sigint_during_a_health_gate_stops_at_once_and_the_next_up_continues() {
    let (env, _double) = kube_env("gated", &never_ready(), "10m");
    let mut child = env.spawn(&["up", "--yes"]);
    let state = env.path().join(".stack/gated.state.json");
    let deadline = Instant::now() + Duration::from_secs(60);
    // The StatefulSet is recorded before its stage's gate starts waiting.
    while !std::fs::read_to_string(&state)
        .unwrap_or_default()
        .contains("\"id\": \"gated/web\"")
    {
        assert!(
            Instant::now() < deadline,
            "the workloads were never applied"
        );
        thread::sleep(Duration::from_millis(20));
    }
    thread::sleep(Duration::from_millis(500));
    let kill = Command::new("sh")
        .args(["-c", &format!("kill -INT {}", child.id())])
        .status()
        .unwrap();
    assert!(kill.success());
    let stopped = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > stopped {
            let _ = child.kill();
            panic!("up still runs 30 s after SIGINT in a health gate");
        }
        thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().unwrap();
    expect_code(&output, 130);
    let message = text(&output.stderr);
    assert!(
        message.contains("error: interrupted by SIGINT while waiting for stage 2 of 4 (workloads); what finished is recorded in state (serial "),
        "{message}"
    );
    assert!(
        message.contains("the next `stack up` continues from there"),
        "{message}"
    );
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).expect("a readable state");
    assert!(saved["serial"].as_u64().unwrap() > 0);

    std::fs::write(env.path().join("app/web.yaml"), APP_MANIFESTS).unwrap();
    let rerun = env.run(&["up", "--yes"]);
    expect_code(&rerun, 0);
    assert!(
        !text(&rerun.stderr).contains("k8s.gated/Secret/gated-tls: creating"),
        "the first stage is not made again:\n{}",
        text(&rerun.stderr)
    );
    expect_code(&env.run(&["plan", "--detailed-exitcode"]), 0);
}
