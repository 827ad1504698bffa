//! `stack run` and `stack gc` through the real CLI: on moto, CMD sees the
//! environment's variables, its exit code is `run`'s and `down` always
//! ran (CMD failing, SIGTERM during CMD, two runs at once); a run killed
//! with SIGKILL leaves an environment that `gc` removes once its ttl has
//! passed, state file or not, and nothing else. On KVM, one run whose
//! command reaches its node over SSH and exits 3, and one killed whose VM
//! gc stops and removes.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Output};
use std::thread;
use std::time::{Duration, Instant};

use aws_sdk_ec2::types::Filter;

use crate::support::image::{kvm_env, processes_mentioning, RootFs};
use crate::support::kube::plain_kube_env;
use crate::support::moto::{ec2, Moto};
use crate::support::{expect_code, runtime, text, Env};

/// Every live thing in moto that carries `stack:run-of=OF`, by environment.
fn runs_of(endpoint: &str, of: &str) -> BTreeMap<String, usize> {
    let client = ec2(endpoint);
    let marked = || {
        Filter::builder()
            .name("tag-key")
            .values("stack:run-of")
            .build()
    };
    let mut envs = BTreeMap::new();
    let mut count = |tags: &[aws_sdk_ec2::types::Tag]| {
        let tag = |key: &str| {
            tags.iter()
                .find(|t| t.key() == Some(key))
                .and_then(|t| t.value())
        };
        if tag("stack:run-of") == Some(of) {
            *envs
                .entry(tag("stack").unwrap_or_default().to_string())
                .or_insert(0) += 1;
        }
    };
    runtime().block_on(async {
        let live = Filter::builder()
            .name("instance-state-name")
            .values("pending")
            .values("running")
            .values("stopping")
            .values("stopped")
            .build();
        let reservations = client
            .describe_instances()
            .filters(marked())
            .filters(live)
            .send()
            .await
            .unwrap();
        for instance in reservations
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
        {
            count(instance.tags());
        }
        let groups = client
            .describe_security_groups()
            .filters(marked())
            .send()
            .await
            .unwrap();
        for group in groups.security_groups() {
            count(group.tags());
        }
        let pairs = client
            .describe_key_pairs()
            .filters(marked())
            .send()
            .await
            .unwrap();
        for pair in pairs.key_pairs() {
            count(pair.tags());
        }
    });
    envs
}

/// Waits until `path` exists (a command of a run got there).
fn wait_for(path: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !path.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            let output =
                std::mem::replace(child, std::process::Command::new("true").spawn().unwrap())
                    .wait_with_output()
                    .unwrap();
            panic!(
                "stack run ended ({status}) before its command wrote {}:\n{}\n{}",
                path.display(),
                text(&output.stdout),
                text(&output.stderr)
            );
        }
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

fn variables(path: &Path) -> BTreeMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn signal(child: &Child, signal: libc::c_int) {
    // SAFETY: kill(2) on a child this test started and has not reaped.
    unsafe { libc::kill(child.id() as libc::pid_t, signal) };
}

/// Starts `stack run --ttl TTL` whose command writes the environment's
/// name to `marker` and sleeps, then SIGKILLs the run and its command
/// (as a CI runner dies): what the run made stays. The environment's name.
fn killed_run(env: &Env, ttl: &str, marker: &str) -> String {
    let marker = env.path().join(marker);
    let mut child = env.spawn(&[
        "run",
        "--yes",
        "--ttl",
        ttl,
        "stack.yaml",
        "--",
        "sh",
        "-c",
        &format!(
            "echo $$ > {0}.pid; echo $STACK_NAME > {0}; exec sleep 600",
            marker.display()
        ),
    ]);
    wait_for(&marker, &mut child);
    signal(&child, libc::SIGKILL);
    child.wait().unwrap();
    let pid: libc::pid_t = std::fs::read_to_string(format!("{}.pid", marker.display()))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: kill(2) on the orphaned command of the killed run.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    std::fs::read_to_string(&marker).unwrap().trim().to_string()
}

/// An RFC 3339 time `secs` from now, for `gc --as-of`.
fn from_now(secs: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now() + Duration::from_secs(secs))
        .to_string()
}

fn no_state_left(env: &Env) {
    let left: Vec<String> = std::fs::read_dir(env.path().join(".stack"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("runs-"))
        .collect();
    assert!(left.is_empty(), "left in .stack: {left:?}");
}

#[test]
fn run_on_ec2_hands_over_the_environment_and_always_removes_it() {
    let moto = Moto::start();
    let env = Env::new("runs", 1, moto.url());
    let dir = env.path().display().to_string();

    // CMD sees the variables and exits 3: down ran, run exits 3.
    let script = format!(
        "env | grep -E '^(STACK_|KUBECONFIG)' > {dir}/vars; test -s \"$STACK_SSH_KEY\" && test -f \"$STACK_STATUS_FILE\" && echo files-there > {dir}/files; exit 3"
    );
    let run = env.run(&["run", "--yes", "stack.yaml", "--", "sh", "-c", &script]);
    expect_code(&run, 3);
    let vars = variables(&env.path().join("vars"));
    let name = &vars["STACK_NAME"];
    let id = &vars["STACK_RUN_ID"];
    assert_eq!(name, &format!("runs-{id}"), "{vars:?}");
    assert_eq!(vars["STACK_RUN_OF"], "runs");
    assert_eq!(vars["STACK_NODES"], "control-0 worker-0", "{vars:?}");
    for node in ["CONTROL_0", "WORKER_0"] {
        let address = &vars[&format!("STACK_NODE_{node}_ADDRESS")];
        assert!(address.parse::<std::net::IpAddr>().is_ok(), "{vars:?}");
        assert!(vars.contains_key(&format!("STACK_NODE_{node}_PRIVATE_ADDRESS")));
    }
    assert_eq!(vars["STACK_SSH_USER"], "ubuntu");
    assert!(vars.contains_key("STACK_EXPIRES"), "{vars:?}");
    assert!(
        env.path().join("files").exists(),
        "the key and status files were not there for CMD"
    );
    let stderr = text(&run.stderr);
    assert!(
        stderr.contains(&format!("environment {name}: down")),
        "{stderr}"
    );
    assert!(
        runs_of(&moto.url(), "runs").is_empty(),
        "{:?}",
        runs_of(&moto.url(), "runs")
    );
    no_state_left(&env);

    // SIGTERM during CMD: CMD gets it, down runs, run exits with CMD's 143.
    let started = env.path().join("started");
    let mut child = env.spawn(&[
        "run",
        "--yes",
        "stack.yaml",
        "--",
        "sh",
        "-c",
        &format!("echo $STACK_NAME > {}; exec sleep 600", started.display()),
    ]);
    wait_for(&started, &mut child);
    assert_eq!(runs_of(&moto.url(), "runs").len(), 1);
    // Expired or not, a live run's environment is its own: gc leaves it.
    let held = env.run(&[
        "gc",
        "--yes",
        "--as-of",
        &from_now(3 * 24 * 3600),
        "stack.yaml",
    ]);
    expect_code(&held, 1);
    assert!(
        text(&held.stderr).contains("state is locked by pid"),
        "{}",
        text(&held.stderr)
    );
    assert_eq!(runs_of(&moto.url(), "runs").len(), 1);
    signal(&child, libc::SIGTERM);
    let output = child.wait_with_output().unwrap();
    expect_code(&output, 143);
    assert!(
        text(&output.stderr).contains(": down"),
        "{}",
        text(&output.stderr)
    );
    assert!(runs_of(&moto.url(), "runs").is_empty());
    no_state_left(&env);

    // --keep-on-failure: CMD fails, the environment stays, and the run
    // says how to reach and remove it; `down --run ID` removes it.
    let kept = env.run(&[
        "run",
        "--yes",
        "--keep-on-failure",
        "stack.yaml",
        "--",
        "sh",
        "-c",
        "exit 4",
    ]);
    expect_code(&kept, 4);
    let envs = runs_of(&moto.url(), "runs");
    let name = envs
        .keys()
        .next()
        .expect("the failed run's environment is kept");
    let id = name.trim_start_matches("runs-");
    let told = text(&kept.stderr);
    assert!(
        told.contains(&format!("kept environment {name}"))
            && told.contains(&format!("`stack down --run {id} stack.yaml`")),
        "{told}"
    );
    let status = env.run(&["status", "--run", id, "stack.yaml"]);
    expect_code(&status, 0);
    assert!(
        text(&status.stdout).contains(&format!("stack {name} (ec2)")),
        "{}",
        text(&status.stdout)
    );
    expect_code(&env.run(&["down", "--yes", "--run", id, "stack.yaml"]), 0);
    assert!(runs_of(&moto.url(), "runs").is_empty());
    no_state_left(&env);

    // A failed `up` (an image EC2 does not have): down still removes what
    // it made, and run exits with up's 1 without running CMD.
    let broken = Env::new("runs", 1, moto.url());
    let yaml = std::fs::read_to_string(broken.path().join("stack.yaml")).unwrap();
    std::fs::write(
        broken.path().join("stack.yaml"),
        yaml.replace("ami-12c6146b", "ami-00000000"),
    )
    .unwrap();
    let ran = broken.path().join("ran");
    let failed = broken.run(&[
        "run",
        "--yes",
        "stack.yaml",
        "--",
        "touch",
        &ran.display().to_string(),
    ]);
    expect_code(&failed, 1);
    assert!(!ran.exists(), "CMD ran after a failed up");
    let told = text(&failed.stderr);
    assert!(
        told.contains("InvalidAMIID.NotFound") && told.contains(": down"),
        "{told}"
    );
    assert!(failed.stdout.is_empty(), "{}", text(&failed.stdout));
    assert!(runs_of(&moto.url(), "runs").is_empty());

    // Two runs of the stack at once: two environments, both removed.
    let names = env.path().join("names");
    let both = format!(
        "echo $STACK_NAME >> {0}; n=0; while [ $(wc -l < {0}) -lt 2 ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n+1)); done; exit $(( $(wc -l < {0}) == 2 ? 0 : 9 ))",
        names.display()
    );
    let runs: Vec<Child> = (0..2)
        .map(|_| env.spawn(&["run", "--yes", "stack.yaml", "--", "sh", "-c", &both]))
        .collect();
    for run in runs {
        expect_code(&run.wait_with_output().unwrap(), 0);
    }
    let seen: std::collections::BTreeSet<String> = std::fs::read_to_string(&names)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(runs_of(&moto.url(), "runs").is_empty());
    no_state_left(&env);
}

#[test]
fn gc_removes_only_the_expired_environment_of_a_killed_run() {
    let moto = Moto::start();
    let env = Env::new("swept", 1, moto.url());
    // Two runs killed with SIGKILL while their commands run: one with a
    // one-minute ttl, one with two hours.
    let short = &killed_run(&env, "1m", "short");
    let long = &killed_run(&env, "2h", "long");
    let before = runs_of(&moto.url(), "swept");
    assert_eq!(before.keys().collect::<Vec<_>>().len(), 2, "{before:?}");

    // Not expired yet: gc lists both as not expired and removes nothing.
    let early = env.run(&["gc", "--yes", "stack.yaml"]);
    expect_code(&early, 0);
    assert!(
        text(&early.stdout).contains(&format!("not expired: {short}")),
        "{}",
        text(&early.stdout)
    );
    assert_eq!(runs_of(&moto.url(), "swept"), before);

    // Thirty minutes on, with no state on this machine at all: only the
    // one-minute environment goes.
    std::fs::remove_dir_all(env.path().join(".stack")).unwrap();
    let at = from_now(1800);
    let dry = env.run(&["gc", "--dry-run", "--as-of", &at, "stack.yaml"]);
    expect_code(&dry, 0);
    assert!(
        text(&dry.stdout).contains(&format!("expired: {short}")),
        "{}",
        text(&dry.stdout)
    );
    assert_eq!(runs_of(&moto.url(), "swept"), before);
    let swept = env.run(&["gc", "--yes", "--as-of", &at, "stack.yaml"]);
    expect_code(&swept, 0);
    let after = runs_of(&moto.url(), "swept");
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        vec![long],
        "{}",
        text(&swept.stdout)
    );
    assert_eq!(after[long], before[long]);

    // The stack's own environment (no run, no ttl) is never a candidate,
    // and three hours on the second run's goes too.
    let later = from_now(3 * 3600);
    expect_code(
        &env.run(&["gc", "--yes", "--as-of", &later, "stack.yaml"]),
        0,
    );
    assert!(runs_of(&moto.url(), "swept").is_empty());
    let wrong = env.run(&["gc", "--provider", "kvm", "stack.yaml"]);
    expect_code(&wrong, 1);
    assert!(
        text(&wrong.stderr).contains("stack swept is on ec2"),
        "{}",
        text(&wrong.stderr)
    );
}

#[test]
fn runs_on_an_existing_cluster_get_namespaces_of_their_own_and_gc_finds_them() {
    let config =
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\ndata:\n  mode: test\n";
    let (env, double) = plain_kube_env("shared", config, "30s");
    let dir = env.path().display().to_string();
    let script = format!(
        "env | grep -E '^(STACK_|KUBECONFIG)' > {dir}/vars; test -f \"$KUBECONFIG\" || exit 9; exit 3"
    );
    expect_code(
        &env.run(&["run", "--yes", "stack.yaml", "--", "sh", "-c", &script]),
        3,
    );
    let vars = variables(&env.path().join("vars"));
    let name = &vars["STACK_NAME"];
    assert_eq!(&vars["STACK_NAMESPACE"], name, "{vars:?}");
    assert!(vars["KUBECONFIG"].starts_with('/'), "{vars:?}");
    assert_eq!(double.labelled(name), Vec::<String>::new());

    // A run killed with SIGKILL leaves its namespace, labelled with its
    // expiry; gc removes it once that has passed.
    let killed = killed_run(&env, "10m", "killed");
    assert!(!double.labelled(&killed).is_empty());
    let at = from_now(3600);
    let swept = env.run(&[
        "gc",
        "--yes",
        "--provider",
        "kubernetes",
        "--as-of",
        &at,
        "stack.yaml",
    ]);
    expect_code(&swept, 0);
    assert!(
        text(&swept.stdout).contains(&format!("expired: {killed}")),
        "{}",
        text(&swept.stdout)
    );
    assert_eq!(double.labelled(&killed), Vec::<String>::new());
}

#[test]
fn run_on_kvm_reaches_its_node_and_leaves_nothing() {
    let env = kvm_env("kvmrun", 1, "", &RootFs::Local);
    let dir = env.path().display().to_string();
    let script = format!(
        "env | grep ^STACK_ > {dir}/vars; {} ssh --run \"$STACK_RUN_ID\" \"$STACK_FILE\" node-0 -- hostname > {dir}/hostname; exit 3",
        crate::support::STACK
    );
    let output: Output = env.run(&["run", "--yes", "stack.yaml", "--", "sh", "-c", &script]);
    expect_code(&output, 3);
    let vars = variables(&env.path().join("vars"));
    let name = &vars["STACK_NAME"];
    assert_eq!(
        std::fs::read_to_string(env.path().join("hostname"))
            .unwrap()
            .trim(),
        format!("{name}-node-0"),
        "{vars:?}"
    );
    assert!(
        vars["STACK_NODE_NODE_0_SSH"].starts_with("127.0.0.1:"),
        "{vars:?}"
    );
    assert!(
        processes_mentioning(name).is_empty(),
        "QEMU of {name} still runs"
    );
    assert!(!env.path().join(".stack").join(name).exists());

    // A run killed with SIGKILL leaves its VM running; gc stops and
    // removes it once its ttl has passed.
    let killed = killed_run(&env, "1m", "killed");
    assert!(
        !processes_mentioning(&killed).is_empty(),
        "no QEMU of {killed}"
    );
    let swept = env.run(&[
        "gc",
        "--yes",
        "--provider",
        "kvm",
        "--as-of",
        &from_now(600),
        "stack.yaml",
    ]);
    expect_code(&swept, 0);
    assert!(
        text(&swept.stdout).contains(&format!("expired: {killed} ")),
        "{}",
        text(&swept.stdout)
    );
    assert!(
        processes_mentioning(&killed).is_empty(),
        "QEMU of {killed} still runs"
    );
    assert!(!env.path().join(".stack").join(&killed).exists());
}
