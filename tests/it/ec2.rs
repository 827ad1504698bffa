//! The EC2 provider on moto: up, plan, drift and repair, down; interruptions
//! (SIGKILL at many points, SIGINT) and adopting what a killed run made;
//! transient EC2 errors retried; the state lock, corrupt state, bad
//! credentials and endpoints, and the prompt on a terminal.

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use aws_sdk_ec2::types::{AttributeValue, IpPermission, IpRange};

use crate::support::moto::{ec2, instance_ids, tagged, Faults, Moto, Proxy, ProxyRules, Tagged};
use crate::support::{expect_code, free_port, runtime, text, Env, STACK};

#[test]
fn up_plan_drift_repair_down() {
    let moto = Moto::start();
    let env = Env::new("drift", 2, moto.url());
    let up = env.run(&["up", "--yes"]);
    expect_code(&up, 0);
    assert!(
        text(&up.stdout).contains("Plan: 5 to create"),
        "{}",
        text(&up.stdout)
    );
    expect_code(&env.run(&["plan", "--detailed-exitcode"]), 0);
    assert_eq!(tagged(&moto.url(), "drift"), Tagged::three_nodes());

    // Out of band: stop one instance and change its type, terminate another,
    // add one security-group rule and remove one, change a tag, delete the key pair.
    let client = ec2(&moto.url());
    let stopped = env.id_of("drift", "ec2.instance.worker[0]");
    let terminated = env.id_of("drift", "ec2.instance.worker[1]");
    let control = env.id_of("drift", "ec2.instance.control[0]");
    let group = env.id_of("drift", "ec2.security_group.main");
    runtime().block_on(async {
        client
            .stop_instances()
            .instance_ids(&stopped)
            .send()
            .await
            .unwrap();
        client
            .modify_instance_attribute()
            .instance_id(&stopped)
            .instance_type(AttributeValue::builder().value("t3.small").build())
            .send()
            .await
            .unwrap();
        client
            .terminate_instances()
            .instance_ids(&terminated)
            .send()
            .await
            .unwrap();
        let rule = |port: i32, cidr: &str| {
            IpPermission::builder()
                .ip_protocol("tcp")
                .from_port(port)
                .to_port(port)
                .ip_ranges(IpRange::builder().cidr_ip(cidr).build())
                .build()
        };
        client
            .authorize_security_group_ingress()
            .group_id(&group)
            .ip_permissions(rule(3306, "0.0.0.0/0"))
            .send()
            .await
            .unwrap();
        client
            .revoke_security_group_ingress()
            .group_id(&group)
            .ip_permissions(rule(22, "203.0.113.0/24"))
            .send()
            .await
            .unwrap();
        client
            .create_tags()
            .resources(&control)
            .tags(
                aws_sdk_ec2::types::Tag::builder()
                    .key("team")
                    .value("someone-else")
                    .build(),
            )
            .send()
            .await
            .unwrap();
        client
            .delete_key_pair()
            .key_name("stack-drift")
            .send()
            .await
            .unwrap();
    });

    let plan = env.run(&["plan", "--detailed-exitcode"]);
    expect_code(&plan, 2);
    let shown = text(&plan.stdout);
    for expected in [
        "Drift: the live world differs from what stack last applied",
        "~   ec2.instance.worker[0]",
        "state: \"stopped\" → \"running\"",
        "instanceType: \"t3.small\" → \"t3.large\"",
        "+   ec2.instance.worker[1]",
        "gone from the live world (deleted or terminated out of band)",
        "~   ec2.security_group.main",
        "ingress: - \"tcp 3306 from 0.0.0.0/0\"",
        "ingress: + \"tcp 22 from 203.0.113.0/24\"",
        "~   ec2.instance.control[0]",
        "tags.team: \"someone-else\" → \"platform\"",
        "+   ec2.key_pair.main",
        "Plan: 2 to create, 3 to update, 0 to replace, 0 to delete (5 repairing drift).",
    ] {
        assert!(
            shown.contains(expected),
            "plan lacks {expected:?}:\n{shown}"
        );
    }
    let json = env.run(&["plan", "--output", "json"]);
    expect_code(&json, 0);
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(json["formatVersion"], 1);
    assert_eq!(json["summary"]["drift"], 5);
    assert!(json["changes"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["drift"] == true));

    expect_code(&env.run(&["up", "--yes"]), 0);
    expect_code(&env.run(&["plan", "--detailed-exitcode"]), 0);
    assert_eq!(tagged(&moto.url(), "drift"), Tagged::three_nodes());

    let status = env.run(&["status"]);
    expect_code(&status, 0);
    let status = text(&status.stdout);
    assert!(
        status.contains("ssh key: .stack/drift.id_ed25519"),
        "{status}"
    );
    assert!(
        status.contains("ec2.instance.worker[1]") && status.contains("running"),
        "{status}"
    );

    let down = env.run(&["down", "--yes"]);
    expect_code(&down, 0);
    assert!(text(&down.stdout).contains("Nothing tagged stack=drift is left."));
    assert_eq!(tagged(&moto.url(), "drift"), Tagged::nothing());
    expect_code(&env.run(&["down", "--yes"]), 0);
}

#[test]
fn sigkill_at_many_points_then_rerun_converges_without_duplicates() {
    let moto = Moto::start();
    let proxy = Proxy::start(moto.port);
    let probe = Env::new("probe", 2, proxy.url());
    expect_code(&probe.run(&["up", "--yes"]), 0);
    let requests_per_up = proxy.count();
    assert!(
        requests_per_up > 10,
        "a clean up made only {requests_per_up} requests"
    );

    let points: BTreeSet<usize> = (1..=requests_per_up)
        .step_by(3)
        .chain([requests_per_up - 1])
        .collect();
    for point in points {
        let name = format!("kill{point}");
        let env = Env::new(&name, 2, proxy.url());
        let before = proxy.count();
        let child = env
            .command(&["up", "--yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let child = Arc::new(Mutex::new(child));
        {
            let mut rules = proxy.rules.lock().unwrap();
            rules.kill_at = Some(before + point);
            rules.victim = Some(child.clone());
        }
        let status = loop {
            if let Some(status) = child.lock().unwrap().try_wait().unwrap() {
                break status;
            }
            thread::sleep(Duration::from_millis(20));
        };
        *proxy.rules.lock().unwrap() = ProxyRules::default();
        assert!(
            status.code().is_none(),
            "up was not killed at request {point}: {status:?}"
        );

        let rerun = env
            .command_at(&moto.url(), &["up", "--yes"])
            .output()
            .unwrap();
        expect_code(&rerun, 0);
        expect_code(
            &env.command_at(&moto.url(), &["plan", "--detailed-exitcode"])
                .output()
                .unwrap(),
            0,
        );
        assert_eq!(
            tagged(&moto.url(), &name),
            Tagged::three_nodes(),
            "after a kill at request {point}"
        );
        expect_code(
            &env.command_at(&moto.url(), &["down", "--yes"])
                .output()
                .unwrap(),
            0,
        );
        assert_eq!(tagged(&moto.url(), &name), Tagged::nothing());
    }
}

#[test]
fn a_second_run_fails_fast_naming_the_lock_holder() {
    let moto = Moto::start();
    let proxy = Proxy::start(moto.port);
    proxy.rules.lock().unwrap().delay = Duration::from_millis(150);
    let env = Env::new("locked", 1, proxy.url());
    let first = env.spawn(&["up", "--yes"]);
    let lock = env.path().join(".stack/locked.lock");
    let pid = first.id();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&lock)
        .unwrap_or_default()
        .contains(&format!("\"pid\":{pid}"))
    {
        assert!(
            Instant::now() < deadline,
            "the first run never took the lock"
        );
        thread::sleep(Duration::from_millis(10));
    }
    let second = env
        .command_at(&moto.url(), &["up", "--yes"])
        .output()
        .unwrap();
    expect_code(&second, 1);
    let message = text(&second.stderr);
    assert!(
        message.contains(&format!("state is locked by pid {pid} on ")),
        "{message}"
    );
    assert!(message.contains(" since "), "{message}");
    let first = first.wait_with_output().unwrap();
    expect_code(&first, 0);
    let state = env.state("locked");
    assert_eq!(state["schemaVersion"], 1);
    assert_eq!(state["resources"].as_array().unwrap().len(), 4);
    expect_code(
        &env.command_at(&moto.url(), &["plan", "--detailed-exitcode"])
            .output()
            .unwrap(),
        0,
    );
    expect_code(
        &env.command_at(&moto.url(), &["down", "--yes"])
            .output()
            .unwrap(),
        0,
    );
}

#[test]
fn corrupt_state_is_refused_and_left_untouched() {
    let moto = Moto::start();
    let env = Env::new("corrupt", 1, moto.url());
    std::fs::create_dir_all(env.path().join(".stack")).unwrap();
    let path = env.path().join(".stack/corrupt.state.json");
    std::fs::write(&path, "{\"schemaVersion\": 1, \"resources\": [").unwrap();
    for verb in [["plan", "--detailed-exitcode"], ["up", "--yes"]] {
        let output = env.run(&verb);
        expect_code(&output, 1);
        assert!(
            text(&output.stderr).contains("state file .stack/corrupt.state.json is corrupt"),
            "{}",
            text(&output.stderr)
        );
    }
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        "{\"schemaVersion\": 1, \"resources\": ["
    );
    assert_eq!(tagged(&moto.url(), "corrupt"), Tagged::nothing());
}

#[test]
fn missing_credentials_and_unreachable_endpoints_are_clear_errors() {
    let moto = Moto::start();
    let env = Env::new("creds", 1, moto.url());
    let output = env
        .command(&["plan"])
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .output()
        .unwrap();
    expect_code(&output, 1);
    assert!(
        text(&output.stderr).contains("no usable AWS credentials"),
        "{}",
        text(&output.stderr)
    );

    let closed = format!("http://127.0.0.1:{}", free_port());
    let output = env.command_at(&closed, &["up", "--yes"]).output().unwrap();
    expect_code(&output, 1);
    let message = text(&output.stderr);
    assert!(
        message.contains("cannot refresh the infrastructure of stack creds"),
        "{message}"
    );
    assert!(message.contains("ec2 Describe"), "{message}");
    // Nothing was made, so the state records nothing, and a later run works.
    expect_code(&env.run(&["up", "--yes"]), 0);
    expect_code(&env.run(&["down", "--yes"]), 0);
}

#[test]
fn up_on_a_terminal_asks_and_only_yes_applies() {
    let moto = Moto::start();
    let env = Env::new("ask", 1, moto.url());
    // `script` gives `stack` a terminal, as a person at a shell has.
    let on_terminal = |answer: &str| on_terminal(&env, "up", answer);
    let declined = on_terminal("no\n");

    let shown = text(&declined.stdout);
    assert!(
        shown.contains("Apply this plan? Only `yes` is accepted"),
        "{shown}"
    );
    assert!(
        shown.contains("not applied: the answer was not `yes`"),
        "{shown}"
    );
    assert_eq!(tagged(&moto.url(), "ask"), Tagged::nothing());
    let accepted = on_terminal("yes\n");
    assert!(
        text(&accepted.stdout).contains("Applied: 4 created"),
        "{}",
        text(&accepted.stdout)
    );
    assert_eq!(tagged(&moto.url(), "ask").instances.len(), 2);
    expect_code(&env.run(&["down", "--yes"]), 0);
}

/// `stack ARGS` on a terminal (`script` gives it one) that answers `answer`;
/// what the terminal showed is the output's stdout.
fn on_terminal(env: &Env, args: &str, answer: &str) -> std::process::Output {
    let mut script = Command::new("script");
    script.args(["-q", "-e", "-c", &format!("{STACK} {args}"), "/dev/null"]);
    env.isolate(&mut script, &env.endpoint);
    let mut child = script
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(answer.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn where_stack_cannot_ask_it_needs_yes_and_json_output_is_a_stream_of_lines() {
    let moto = Moto::start();
    let env = Env::new("unasked", 1, moto.url());
    // A terminal, but stdout is a JSON stream: no prompt on it, ever.
    let json = on_terminal(&env, "up --output json", "yes\n");
    expect_code(&json, 1);
    let shown = text(&json.stdout);
    assert!(!shown.contains("Apply this plan?"), "{shown}");
    assert!(
        shown.contains("--output json makes stdout a JSON stream, so stack cannot ask; add --yes"),
        "{shown}"
    );
    // No terminal at all.
    let piped = env.run(&["up"]);
    expect_code(&piped, 1);
    assert!(
        text(&piped.stderr).contains("stdin is not a terminal, so stack cannot ask; add --yes"),
        "{}",
        text(&piped.stderr)
    );
    assert_eq!(tagged(&moto.url(), "unasked"), Tagged::nothing());

    let up = env.run(&["up", "--yes", "--output", "json"]);
    expect_code(&up, 0);
    let lines: Vec<serde_json::Value> = text(&up.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let kinds: Vec<&str> = lines.iter().map(|l| l["type"].as_str().unwrap()).collect();
    let plan = kinds
        .iter()
        .position(|k| *k == "plan")
        .expect("the plan is a line");
    assert_eq!(kinds[..plan], ["refreshing", "plan_ready"], "{kinds:?}");
    assert_eq!(lines[plan]["plan"]["summary"]["create"], 4);
    assert_eq!(kinds.last(), Some(&"applied"), "{kinds:?}");
    let finished = lines
        .iter()
        .filter(|l| l["type"] == "change_finished")
        .count();
    assert_eq!(finished, 4);
    expect_code(&env.run(&["down", "--yes"]), 0);
}

#[test]
fn sigint_lets_changes_under_way_finish_and_a_rerun_continues() {
    let moto = Moto::start();
    let proxy = Proxy::start(moto.port);
    proxy.rules.lock().unwrap().delay = Duration::from_millis(300);
    let env = Env::new("sigint", 2, proxy.url());
    let child = env.spawn(&["up", "--yes"]);
    let state = env.path().join(".stack/sigint.state.json");
    let deadline = Instant::now() + Duration::from_secs(30);
    // Wait until the first resource is recorded, then interrupt.
    while !std::fs::read_to_string(&state)
        .unwrap_or_default()
        .contains("\"id\": \"")
    {
        assert!(Instant::now() < deadline, "nothing was recorded");
        thread::sleep(Duration::from_millis(10));
    }
    // The shell's own `kill`: no procps needed.
    let kill = Command::new("sh")
        .args(["-c", &format!("kill -INT {}", child.id())])
        .status()
        .unwrap();
    assert!(kill.success());
    let output = child.wait_with_output().unwrap();
    expect_code(&output, 130);
    let message = text(&output.stderr);
    assert!(
        message.contains("interrupted (SIGINT): finishing the changes under way"),
        "{message}"
    );
    assert!(
        message.contains("error: interrupted by SIGINT in stage 1 of 1 (infrastructure) after "),
        "{message}"
    );
    assert!(
        message.contains("the next `stack up` continues from there"),
        "{message}"
    );
    let rerun = env
        .command_at(&moto.url(), &["up", "--yes"])
        .output()
        .unwrap();
    expect_code(&rerun, 0);
    assert_eq!(tagged(&moto.url(), "sigint"), Tagged::three_nodes());
    expect_code(
        &env.command_at(&moto.url(), &["down", "--yes"])
            .output()
            .unwrap(),
        0,
    );
}

#[test]
fn a_second_checkout_of_a_stack_leaves_the_first_ones_resources_alone_unless_told_to_adopt() {
    let moto = Moto::start();
    let first = Env::new("twice", 2, moto.url());
    expect_code(&first.run(&["up", "--yes"]), 0);
    let second = Env::new("twice", 2, moto.url());
    let plan = second.run(&["plan", "--detailed-exitcode"]);
    expect_code(&plan, 2);
    let shown = text(&plan.stdout);
    assert!(
        shown.contains("Made by another state of this stack (another checkout, or a lost state file), left alone:"),
        "{shown}"
    );
    assert!(shown.contains("ec2.instance.worker[1] (i-"), "{shown}");
    assert!(
        !shown.contains("-/+"),
        "nothing of the first is replaced: {shown}"
    );
    let up = second.run(&["up", "--yes"]);
    expect_code(&up, 1);
    assert!(
        text(&up.stderr).contains("were made by another state of it"),
        "{}",
        text(&up.stderr)
    );
    let down = second.run(&["down", "--yes"]);
    expect_code(&down, 1);
    assert_eq!(
        tagged(&moto.url(), "twice"),
        Tagged::three_nodes(),
        "the first's are untouched"
    );
    // Taking them over is asked for, and only into a new state.
    let adopted = second.run(&["plan", "--adopt"]);
    expect_code(&adopted, 0);
    assert!(
        text(&adopted.stdout).contains("Found by tag, to be recorded in state:"),
        "{}",
        text(&adopted.stdout)
    );
    expect_code(&first.run(&["down", "--yes"]), 0);
    assert_eq!(tagged(&moto.url(), "twice"), Tagged::nothing());
}

/// Through a proxy that answers a fifth of the EC2 calls with 500
/// InternalError, 503 Unavailable, or 400 RequestLimitExceeded or
/// Throttling, ten runs of `up` of ten instances from nothing each succeed
/// in one run without a duplicate, and so do `plan` and `down`; the summary
/// counts exactly the retries the proxy caused.
#[test]
fn transient_ec2_errors_are_retried_so_up_plan_and_down_succeed_in_one_run() {
    let moto = Moto::start();
    let proxy = Proxy::start(moto.port);
    for run in 0..10u64 {
        proxy.rules.lock().unwrap().faults = Some(Faults {
            seed: run,
            percent: 20,
        });
        let name = format!("faulty{run}");
        let env = Env::new(&name, 9, proxy.url());
        let before = proxy.faults();
        let json = run % 2 == 0;
        let up = if json {
            env.run(&["up", "--yes", "--output", "json"])
        } else {
            env.run(&["up", "--yes"])
        };
        expect_code(&up, 0);
        let injected = proxy.faults() - before;
        assert!(injected > 0, "run {run}: the proxy failed no call");
        let shown = text(&up.stdout);
        if json {
            let applied: serde_json::Value =
                serde_json::from_str(shown.lines().last().unwrap()).unwrap();
            assert_eq!(
                applied["applied"]["retries"],
                serde_json::json!([{"service": "EC2", "count": injected}]),
                "run {run}: {shown}"
            );
        } else {
            let times = if injected == 1 { "time" } else { "times" };
            let counted = format!("(calls retried after transient errors: EC2 {injected} {times})");
            assert!(
                shown.contains(&counted),
                "run {run} lacks {counted}:\n{shown}"
            );
        }
        assert_eq!(tagged(&moto.url(), &name), Tagged::nodes(9), "run {run}");
        expect_code(&env.run(&["plan", "--detailed-exitcode"]), 0);
        expect_code(&env.run(&["down", "--yes"]), 0);
        assert_eq!(tagged(&moto.url(), &name), Tagged::nothing(), "run {run}");
    }
}

#[test]
fn max_retries_is_checked_and_a_call_that_outlasts_them_says_the_next_run_continues() {
    let moto = Moto::start();
    let proxy = Proxy::start(moto.port);
    let env = Env::new("retries", 1, proxy.url());
    let file = env.path().join("stack.yaml");
    let yaml = std::fs::read_to_string(&file).unwrap();
    let with = |retries: &str| {
        let changed = yaml.replace(
            "    ami: ami-12c6146b\n",
            &format!("    ami: ami-12c6146b\n    maxRetries: {retries}\n"),
        );
        std::fs::write(&file, changed).unwrap();
    };
    with("101");
    let validate = env.run(&["validate"]);
    expect_code(&validate, 1);
    assert!(
        text(&validate.stderr).contains(
            "stack.yaml:6:17: provider.ec2.maxRetries: expected a whole number from 0 to 100, found `101`"
        ),
        "{}",
        text(&validate.stderr)
    );

    with("0");
    proxy.rules.lock().unwrap().faults = Some(Faults {
        seed: 0,
        percent: 100,
    });
    let up = env.run(&["up", "--yes"]);
    expect_code(&up, 1);
    let message = text(&up.stderr);
    for expected in [
        "cannot refresh the infrastructure of stack retries",
        "ec2 Describe",
        "a transient error that outlasted every retry, provider.ec2.maxRetries: what finished is recorded in state, and the next run continues from there",
    ] {
        assert!(message.contains(expected), "{expected:?} missing:\n{message}");
    }
    // DescribeInstances, DescribeSecurityGroups, DescribeKeyPairs: once each.
    assert_eq!(proxy.count(), 3, "maxRetries: 0 retries nothing");
    proxy.rules.lock().unwrap().faults = None;
    expect_code(&env.run(&["up", "--yes"]), 0);
    expect_code(&env.run(&["down", "--yes"]), 0);
}

/// Instances that an `up` killed with SIGKILL made but never recorded are
/// adopted by the next `up` (found by their tags, and what they were
/// launched with is what the stack wants), not terminated and made again;
/// one the stack no longer wants as it is would be replaced, and the plan
/// says why.
#[test]
fn instances_a_killed_up_made_are_adopted_not_made_again() {
    let moto = Moto::start();
    let proxy = Proxy::start(moto.port);
    for (round, kill_at) in [1usize, 4, 7, 10].into_iter().enumerate() {
        let name = format!("adopt{round}");
        let env = Env::new(&name, 9, proxy.url());
        let child = {
            // Held while the child starts, so no answer passes unwatched.
            let mut rules = proxy.rules.lock().unwrap();
            let child = env
                .command(&["up", "--yes"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let child = Arc::new(Mutex::new(child));
            rules.kill_at_action = Some(("RunInstances", proxy.answered("RunInstances") + kill_at));
            rules.victim = Some(child.clone());
            child
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = child.lock().unwrap().try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "round {round}: up never ended");
            thread::sleep(Duration::from_millis(20));
        };
        *proxy.rules.lock().unwrap() = ProxyRules::default();
        assert!(
            status.code().is_none(),
            "round {round}: up was not killed at RunInstances answer {kill_at}: {status:?}"
        );
        proxy.wait_idle();
        let made = instance_ids(&moto.url(), &name);
        assert!(
            made.len() >= kill_at,
            "round {round}: only {} instances made",
            made.len()
        );
        let state = env.state(&name);
        let unrecorded = made
            .iter()
            .filter(|(address, id)| {
                !state["resources"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|r| r["address"] == address.as_str() && r["id"] == id.as_str())
            })
            .count();
        assert!(
            unrecorded > 0,
            "round {round}: the kill left nothing unrecorded"
        );

        if round == 3 {
            // Not what the stack wants any more: replaced, and said why.
            let file = env.path().join("stack.yaml");
            let yaml = std::fs::read_to_string(&file).unwrap();
            let changed = yaml
                .replace("    count: 9\n", "    count: 9\n    runcmd: [\"true\"]\n")
                .replace(
                    "    disk: 30GiB\n",
                    "    disk: 30GiB\n    runcmd: [\"true\"]\n",
                );
            std::fs::write(&file, changed).unwrap();
            let plan = env.run(&["plan"]);
            expect_code(&plan, 0);
            let shown = text(&plan.stdout);
            assert!(
                shown.contains("found by its tags but not recorded, and unlike what the stack wants: userDataSha256"),
                "{shown}"
            );
            std::fs::write(&file, yaml).unwrap();
        }

        let before = proxy.actions().len();
        let rerun = env.run(&["up", "--yes"]);
        expect_code(&rerun, 0);
        let actions = proxy.actions()[before..].to_vec();
        assert!(
            !actions.iter().any(|a| a == "TerminateInstances"),
            "round {round}: the rerun terminated instances: {actions:?}\n{}",
            text(&rerun.stdout)
        );
        let launched = actions.iter().filter(|a| *a == "RunInstances").count();
        assert_eq!(launched, 10 - made.len(), "round {round}: {actions:?}");
        let now = instance_ids(&moto.url(), &name);
        for pair in &made {
            assert!(
                now.contains(pair),
                "round {round}: {pair:?} is gone: {now:?}"
            );
        }
        assert_eq!(
            tagged(&moto.url(), &name),
            Tagged::nodes(9),
            "round {round}"
        );
        for (address, id) in &now {
            assert_eq!(&env.id_of(&name, address), id, "round {round}");
        }
        expect_code(&env.run(&["plan", "--detailed-exitcode"]), 0);
        expect_code(&env.run(&["down", "--yes"]), 0);
        assert_eq!(
            tagged(&moto.url(), &name),
            Tagged::nothing(),
            "round {round}"
        );
    }
}

/// A create whose answer was lost (made, then a 500) is retried by the SDK
/// and answered "duplicate"; what the first attempt made is the stack's.
#[test]
fn a_create_whose_answer_was_lost_finds_what_it_made() {
    let moto = Moto::start();
    let proxy = Proxy::start(moto.port);
    proxy.rules.lock().unwrap().lose_answer = vec!["ImportKeyPair", "CreateSecurityGroup"];
    let env = Env::new("lost", 1, proxy.url());
    let up = env.run(&["up", "--yes"]);
    expect_code(&up, 0);
    assert!(proxy.rules.lock().unwrap().lose_answer.is_empty());
    assert!(
        text(&up.stdout).contains("(calls retried after transient errors: EC2 2 times)"),
        "{}",
        text(&up.stdout)
    );
    assert_eq!(tagged(&moto.url(), "lost"), Tagged::nodes(1));
    expect_code(&env.run(&["plan", "--detailed-exitcode"]), 0);
    expect_code(&env.run(&["down", "--yes"]), 0);
    assert_eq!(tagged(&moto.url(), "lost"), Tagged::nothing());
}
