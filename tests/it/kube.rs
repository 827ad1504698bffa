//! Kubernetes objects on an existing cluster (the API test double): staged
//! apply, exact drift, readiness gates, a lost state file, immutable fields,
//! objects the API refuses, transient API errors retried.

use std::process::Command;

use crate::support::kube::{change_lines, faulty_kube_env, kube_env, APP_MANIFESTS};
use crate::support::{expect_code, text};

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
        position("stage 2 of 4 (workloads): 1 object ready")
            < position("k8s.apps/Ingress/web: creating")
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
    // One LIST per kind (6 kinds), the CRD check, the inventory and a GET of
    // the one recorded object the LISTs did not find (the deleted Service):
    // never one GET per object.
    let lists = std::fs::read_to_string(&double.log)
        .unwrap()
        .lines()
        .skip(before)
        .map(str::to_string)
        .collect::<Vec<_>>();
    assert_eq!(lists.len(), 9, "{lists:#?}");
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
        "error: stage 2 of 4 (workloads) is not healthy",
        "caused by: not ready after 3s",
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
        "version: 1\nname: lost\nkubernetes:\n  kubeconfig: kubeconfig\n  manifests: [app]\ningress:\n  domain: lost.test\n  className: public\n",
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
        shown.contains("(spec.serviceName cannot change in place: deleted and made again)"),
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
        message.contains("stage 2 of 4 (workloads) refused its changes"),
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

/// With a fifth of stack's API calls answered 429 (Retry-After: 1), 500,
/// 502, 503, 504 or with a reset connection, `up`, `plan` and `down` each
/// succeed in one run, and the summary counts exactly those retries.
#[test]
fn transient_api_errors_are_retried_so_up_plan_and_down_succeed_in_one_run() {
    for seed in 0..3 {
        let name = format!("flaky{seed}");
        let faults = format!("{seed}:20");
        let (env, double) = faulty_kube_env(&name, APP_MANIFESTS, "30s", Some(&faults));
        let up = env.run(&["up", "--yes"]);
        expect_code(&up, 0);
        let injected = double.faults();
        assert!(injected > 0, "seed {seed}: the double failed no call");
        let times = if injected == 1 { "time" } else { "times" };
        let counted =
            format!("(calls retried after transient errors: Kubernetes {injected} {times})");
        assert!(
            text(&up.stdout).contains(&counted),
            "seed {seed}: {counted} missing:\n{}",
            text(&up.stdout)
        );
        expect_code(&env.run(&["plan", "--detailed-exitcode"]), 0);
        expect_code(&env.run(&["down", "--yes"]), 0);
        assert_eq!(double.labelled(&name), Vec::<String>::new(), "seed {seed}");
    }
}
