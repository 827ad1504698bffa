//! microk8s bootstrap on KVM nodes, driven over pinned SSH against the
//! stand-in for snap and microk8s in the test image.

use crate::support::image::{bootstrap_yaml, stand_in_log};
use crate::support::{expect_code, text, Env};

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
    // Each long wait is told with its limit (the heartbeat repeats it off a terminal).
    for wait in [
        "microk8s.ssh.control[0]: waiting for SSH on boot-control-0 (at most 8m)",
        "microk8s.cloud-init.control[0]: waiting for cloud-init on boot-control-0 (at most 8m30s)",
        "microk8s.addon.ingress: waiting for step 10 of 11 to enable addon ingress on boot-control-0 (at most 8m30s)",
    ] {
        assert!(message.contains(wait), "{wait} missing from:\n{message}");
    }

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
