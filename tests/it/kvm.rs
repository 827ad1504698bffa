//! The KVM provider on QEMU with the test image: two nodes on a private
//! network, recovery of a killed VM, host-key pinning, a cloud-init failure.

use crate::support::expect_code;
use crate::support::image::{
    kill_vm, kvm_env, processes_mentioning, reaches, sha256_file, test_image, vm_dir, FileServer,
    RootFs,
};
use crate::support::text;

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
