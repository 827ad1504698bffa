//! What `validate` and `plan` check without the network, before anything is
//! made (files the stack names, EC2's user-data limit, sections not built),
//! and that `down` after an `up` that failed half-way removes every file it
//! generated.

use std::path::{Path, PathBuf};

use crate::support::moto::{tagged, Moto, Proxy, Tagged};
use crate::support::{expect_code, stack_yaml, text, Env};

/// Every file under `dir` but the ones named, relative to it.
fn files_besides(dir: &Path, keep: &[&str]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(folder) = pending.pop() {
        for entry in std::fs::read_dir(&folder).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let relative = path.strip_prefix(dir).unwrap().to_path_buf();
                if !keep.iter().any(|k| relative == Path::new(k)) {
                    out.push(relative);
                }
            }
        }
    }
    out
}

#[test]
fn validate_and_plan_check_files_user_data_and_unbuilt_sections_before_any_call() {
    let moto = Moto::start();
    let proxy = Proxy::start(moto.port);
    let env = Env::new("checked", 1, proxy.url());
    let long = "x".repeat(17 * 1024);
    let yaml = format!(
        "{}kubernetes:\n  manifests: [not-there/]\ningress:\n  domain: checked.test\n  tcp: entryPoint\n",
        stack_yaml("checked", 1).replace(
            "    instanceType: t3.large\n",
            &format!("    instanceType: t3.large\n    runcmd:\n      - echo {long}\n"),
        )
    );
    std::fs::write(env.path().join("stack.yaml"), yaml).unwrap();
    for verb in [&["validate"][..], &["plan"], &["up", "--yes"]] {
        let output = env.run(verb);
        expect_code(&output, 1);
        let message = text(&output.stderr);
        for expected in [
            "stack.yaml has 4 errors:",
            "stack.yaml:16:7: nodes[1].runcmd: expected user-data of at most 16384 bytes (EC2's limit), found ",
            " bytes rendered for checked-worker-0",
            "stack.yaml:20:15: kubernetes.manifests[0]: expected manifests that can be read and applied, found cannot read manifests not-there/: No such file or directory",
            &format!("stack.yaml:19:1: kubernetes: expected no cluster to bootstrap over SSH when EC2 is an emulator on this machine (its instances' addresses are invented and may be others' hosts); remove `kubernetes` to try the EC2 provider offline, as stacks/aws-moto.yaml does, found a cluster to make, with EC2 at {}", proxy.url()),
            "stack.yaml:23:8: ingress.tcp: expected only what this version of stack builds (remove the section to plan and apply the rest), found TCP entry points of the ingress controller, not built yet",
        ] {
            assert!(message.contains(expected), "{verb:?}: no {expected:?} in\n{message}");
        }
    }
    assert_eq!(proxy.count(), 0, "a check made a call");
    assert!(!env.path().join(".stack").exists());
}

/// A KVM `up` whose VM fails after its folder, host key and the network
/// were made (a base image `qemu-img` cannot read): `down` exits 0 and
/// leaves no file. A base image that is not there is refused before
/// anything is made.
#[test]
fn down_after_a_failed_kvm_up_exits_0_and_leaves_no_file() {
    let env = Env::new("broken", 1, "http://127.0.0.1:9".to_string());
    let yaml = |image: &str| {
        format!("version: 1\nname: broken\nprovider:\n  kvm:\n    accel: tcg\nnodes:\n  - name: node\n    cpus: 1\n    memory: 768MiB\n    disk: 8GiB\n    image:\n      path: {image}\n")
    };
    std::fs::write(env.path().join("stack.yaml"), yaml("images/missing.qcow2")).unwrap();
    let missing = env.run(&["up", "--yes"]);
    expect_code(&missing, 1);
    let message = text(&missing.stderr);
    assert!(
        message.contains("stack.yaml:12:7: nodes[0].image.path: expected a base image (a local file, or `url` with its checksum to download it) that exists, found no file images/missing.qcow2"),
        "{message}"
    );
    assert_eq!(
        files_besides(env.path(), &["stack.yaml"]),
        Vec::<PathBuf>::new()
    );
    expect_code(&env.run(&["down", "--yes"]), 0);
    assert_eq!(
        files_besides(env.path(), &["stack.yaml"]),
        Vec::<PathBuf>::new()
    );

    // qcow2's magic with a version no QEMU reads: `qemu-img` refuses it.
    let mut bad = b"QFI\xfb\x00\x00\x00\x63".to_vec();
    bad.resize(512, 0);
    std::fs::write(env.path().join("not-a-disk.qcow2"), bad).unwrap();
    std::fs::write(env.path().join("stack.yaml"), yaml("not-a-disk.qcow2")).unwrap();
    let failed = env.run(&["up", "--yes"]);
    expect_code(&failed, 1);
    assert!(
        env.path().join(".stack/broken/vms").exists(),
        "the failed create left nothing to clean up: {}",
        text(&failed.stderr)
    );
    let down = env.run(&["down", "--yes"]);
    expect_code(&down, 0);
    assert_eq!(
        files_besides(env.path(), &["stack.yaml", "not-a-disk.qcow2"]),
        Vec::<PathBuf>::new(),
        "{}",
        text(&down.stderr)
    );
}

/// `down` of a stack whose manifests folder is gone (or whose image is)
/// still removes what the stack made: a destroy plan renders nothing.
#[test]
fn a_destroy_needs_no_manifests() {
    let moto = Moto::start();
    let env = Env::new("gone", 1, moto.url());
    expect_code(&env.run(&["up", "--yes"]), 0);
    let mut yaml = stack_yaml("gone", 1);
    yaml.push_str("kubernetes:\n  manifests: [deleted/]\n");
    std::fs::write(env.path().join("stack.yaml"), yaml).unwrap();
    let plan = env.run(&["plan"]);
    expect_code(&plan, 1);
    assert!(
        text(&plan.stderr)
            .contains("kubernetes.manifests[0]: expected manifests that can be read and applied"),
        "{}",
        text(&plan.stderr)
    );
    let down = env.run(&["down", "--yes"]);
    expect_code(&down, 0);
    assert_eq!(tagged(&moto.url(), "gone"), Tagged::nothing());
}
