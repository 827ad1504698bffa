//! The state for teams on a real PostgreSQL (Debian's, a cluster per test)
//! through the real CLI, with moto for EC2: the advisory lock (a second
//! run fails fast naming the holder, a SIGKILLed holder frees it, twenty
//! runs waiting for it write one consecutive run of serials each), the
//! database stopped in the middle of an `up`, a teammate's machine with
//! only the stack file, the URL and the key, nothing secret in clear in
//! the tables, TLS with `verify-full`, and the `state` commands: pull,
//! push, history, unlock and migrate from local to PostgreSQL and back.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::couch::{couch_env, NAMESPACE};
use crate::support::moto::{tagged, Moto, Proxy, Tagged};
use crate::support::postgres::{self, Postgres};
use crate::support::{expect_code, stack_yaml, text, Env};

const KEY: &str = "correct horse battery staple";

/// `stack ARGS` in `env` with the state in `pg` (URL and key from the
/// environment, the password from `~/.pgpass`), EC2 at `endpoint`.
fn on_pg(env: &Env, pg: &Postgres, endpoint: &str, args: &[&str]) -> Command {
    pg.write_pgpass(env.path());
    let mut command = env.command_at(endpoint, args);
    command
        .env("STACK_STATE_URL", pg.url())
        .env("STACK_STATE_KEY", KEY);
    command
}

fn run(command: &mut Command) -> Output {
    command.output().unwrap()
}

fn spawn(command: &mut Command) -> Child {
    command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until `sql` answers `done` (the tables may not be there yet).
fn wait_for(pg: &Postgres, sql: &str, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(answer) = pg.psql_try(sql) {
            if done(&answer) {
                return answer;
            }
        }
        assert!(Instant::now() < deadline, "{what}: never happened");
        thread::sleep(Duration::from_millis(20));
    }
}

/// The advisory locks of stack granted now.
const LOCKS_HELD: &str =
    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND classid = 1937009457";

/// The rows of the history: (serial, pid, command), in the order written.
fn history(pg: &Postgres) -> Vec<(u64, u32, String)> {
    pg.psql("SELECT serial, pid, command FROM stack.history ORDER BY id")
        .lines()
        .map(|line| {
            let mut fields = line.splitn(3, '|');
            (
                fields.next().unwrap().parse().unwrap(),
                fields.next().unwrap().parse().unwrap(),
                fields.next().unwrap().to_string(),
            )
        })
        .collect()
}

/// Waits until the run `pid` holds the lock of the stack.
fn wait_for_holder(pg: &Postgres, pid: u32) {
    wait_for(
        pg,
        "SELECT holder->>'pid' FROM stack.locks WHERE backend_pid IN (SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted)",
        "the run takes the lock",
        |holder| holder == pid.to_string(),
    );
}

#[test]
fn a_second_up_fails_fast_naming_the_holder_unlock_ends_a_holder_and_sigkill_leaves_no_lock() {
    let moto = Moto::start();
    let proxy = Proxy::start(moto.port);
    proxy.rules.lock().unwrap().delay = Duration::from_millis(400);
    let pg = Postgres::start();
    let env = Env::new("pglock", 1, proxy.url());
    let first = spawn(&mut on_pg(&env, &pg, &proxy.url(), &["up", "--yes"]));
    let pid = first.id();
    wait_for_holder(&pg, pid);

    let begun = Instant::now();
    let second = run(&mut on_pg(&env, &pg, &moto.url(), &["up", "--yes"]));
    expect_code(&second, 1);
    assert!(
        begun.elapsed() < Duration::from_secs(20),
        "the second run waited"
    );
    let message = text(&second.stderr);
    for expected in [
        format!("state is locked by pid {pid} on "),
        " since ".to_string(),
        "(`stack up --yes`, postgres://stack@127.0.0.1:".to_string(),
        "wait for it with --lock-timeout".to_string(),
    ] {
        assert!(message.contains(&expected), "{expected:?} in:\n{message}");
    }
    let named = run(&mut on_pg(&env, &pg, &moto.url(), &["state", "unlock"]));
    expect_code(&named, 0);
    assert!(
        text(&named.stdout).contains(&format!("is held by pid {pid} on ")),
        "{}",
        text(&named.stdout)
    );

    // `unlock --force` ends the holder's session: that run stops at its
    // next write, and says why.
    let forced = run(&mut on_pg(
        &env,
        &pg,
        &moto.url(),
        &["state", "unlock", "--force", "--yes"],
    ));
    expect_code(&forced, 0);
    assert!(
        text(&forced.stdout).contains(&format!("ended the hold of pid {pid} on ")),
        "{}",
        text(&forced.stdout)
    );
    let first = first.wait_with_output().unwrap();
    expect_code(&first, 1);
    assert!(
        text(&first.stderr).contains("lost the connection to the state database"),
        "{}",
        text(&first.stderr)
    );

    // SIGKILL: the server ends the session, and the lock with it.
    let mut third = spawn(&mut on_pg(&env, &pg, &proxy.url(), &["up", "--yes"]));
    wait_for_holder(&pg, third.id());
    third.kill().unwrap();
    third.wait().unwrap();
    proxy.wait_idle();
    wait_for(&pg, LOCKS_HELD, "the lock is let go", |n| n == "0");
    let free = run(&mut on_pg(&env, &pg, &moto.url(), &["state", "unlock"]));
    assert!(
        text(&free.stdout).contains("is free"),
        "{}",
        text(&free.stdout)
    );
    let next = run(&mut on_pg(&env, &pg, &moto.url(), &["up", "--yes"]));
    expect_code(&next, 0);
    expect_code(
        &run(&mut on_pg(
            &env,
            &pg,
            &moto.url(),
            &["plan", "--detailed-exitcode"],
        )),
        0,
    );
    // What the stopped and the killed runs made but never recorded was
    // found, not made again.
    assert_eq!(tagged(&moto.url(), "pglock"), Tagged::nodes(1));
    assert!(!env.path().join(".stack/pglock.state.json").exists());
}

/// Twenty runs of one stack at once, each from a folder of its own with
/// another value of a tag (so each has something to write), all waiting
/// for the lock. Each run writes a number of serials (the first makes the
/// stack, the others change its tags, one serial per resource): together
/// they are 1..N with no gap and no repeat, every run wrote, and each
/// run's serials are one unbroken run (nobody wrote in between), so no
/// update was lost; the last run's tags are the state's and the world's.
#[test]
fn twenty_runs_waiting_for_the_lock_write_unbroken_consecutive_serials() {
    let moto = Moto::start();
    let pg = Postgres::start();
    let envs: Vec<Env> = (0..20)
        .map(|i| {
            let env = Env::new("pgmany", 1, moto.url());
            let one_node = stack_yaml("pgmany", 1)
                .replace(
                    "  - name: worker\n    count: 1\n    instanceType: t3.large\n",
                    "",
                )
                .replace("team: platform", &format!("team: round-{i}"));
            assert!(!one_node.contains("worker"), "{one_node}");
            std::fs::write(env.path().join("stack.yaml"), one_node).unwrap();
            env
        })
        .collect();
    let runs: Vec<Child> = envs
        .iter()
        .map(|env| {
            spawn(&mut on_pg(
                env,
                &pg,
                &moto.url(),
                &["up", "--yes", "--lock-timeout", "5m"],
            ))
        })
        .collect();
    let pids: Vec<u32> = runs.iter().map(Child::id).collect();
    for run in runs {
        expect_code(&run.wait_with_output().unwrap(), 0);
    }

    let rows = history(&pg);
    let serials: Vec<u64> = rows.iter().map(|r| r.0).collect();
    assert_eq!(serials, (1..=rows.len() as u64).collect::<Vec<_>>());
    let mut blocks: Vec<u32> = Vec::new();
    for (_, pid, command) in &rows {
        assert_eq!(command, "stack up --yes --lock-timeout 5m");
        if blocks.last() != Some(pid) {
            assert!(
                !blocks.contains(pid),
                "run {pid} wrote twice apart: {rows:?}"
            );
            blocks.push(*pid);
        }
    }
    let mut wrote = blocks.clone();
    wrote.sort();
    let mut all = pids.clone();
    all.sort();
    assert_eq!(wrote, all, "every run wrote");
    assert_eq!(
        pg.psql("SELECT serial FROM stack.states"),
        rows.len().to_string()
    );

    let last = pids.iter().position(|p| Some(p) == blocks.last()).unwrap();
    let pulled = run(&mut on_pg(&envs[0], &pg, &moto.url(), &["state", "pull"]));
    expect_code(&pulled, 0);
    let state: serde_json::Value = serde_json::from_slice(&pulled.stdout).unwrap();
    assert_eq!(state["serial"], rows.len() as u64);
    let instance = state["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["address"] == "ec2.instance.control[0]")
        .unwrap();
    assert_eq!(
        instance["attrs"]["tags"]["team"],
        format!("round-{last}"),
        "{instance}"
    );
    expect_code(
        &run(&mut on_pg(
            &envs[last],
            &pg,
            &moto.url(),
            &["plan", "--detailed-exitcode"],
        )),
        0,
    );
    assert_eq!(tagged(&moto.url(), "pgmany"), Tagged::nodes(0));
}

#[test]
fn postgres_stopped_in_the_middle_of_an_up_is_a_clear_error_and_the_rerun_converges() {
    let moto = Moto::start();
    let proxy = Proxy::start(moto.port);
    proxy.rules.lock().unwrap().delay = Duration::from_millis(300);
    let pg = Postgres::start();
    let env = Env::new("pgstop", 3, proxy.url());
    let up = spawn(&mut on_pg(&env, &pg, &proxy.url(), &["up", "--yes"]));
    wait_for(
        &pg,
        "SELECT serial FROM stack.states",
        "a few serials written",
        |serial| serial.parse::<u64>().is_ok_and(|s| s >= 3),
    );
    pg.stop();
    let up = up.wait_with_output().unwrap();
    expect_code(&up, 1);
    let message = text(&up.stderr);
    assert!(
        message.contains(&format!(
            "lost the connection to the state database {}",
            pg.url()
        )),
        "{message}"
    );
    assert!(message.contains("the stored state is whole"), "{message}");
    proxy.wait_idle();

    pg.restart();
    // Intact: the state's serial is the last one written, whole and readable.
    let stored = pg.psql("SELECT serial FROM stack.states");
    assert_eq!(pg.psql("SELECT max(serial) FROM stack.history"), stored);
    let pulled = run(&mut on_pg(&env, &pg, &moto.url(), &["state", "pull"]));
    expect_code(&pulled, 0);
    let state: serde_json::Value = serde_json::from_slice(&pulled.stdout).unwrap();
    assert_eq!(state["serial"].to_string(), stored);

    expect_code(
        &run(&mut on_pg(&env, &pg, &moto.url(), &["up", "--yes"])),
        0,
    );
    expect_code(
        &run(&mut on_pg(
            &env,
            &pg,
            &moto.url(),
            &["plan", "--detailed-exitcode"],
        )),
        0,
    );
    assert_eq!(tagged(&moto.url(), "pgstop"), Tagged::nodes(3));
}

/// The private keys' bodies (the lines between the PEM armour).
fn key_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() > 20)
        .map(String::from)
        .collect()
}

#[test]
fn a_teammate_with_only_the_stack_file_url_and_key_plans_and_downs_and_nothing_secret_is_in_clear()
{
    let moto = Moto::start();
    let pg = Postgres::start();
    let mine = Env::new("pgteam", 1, moto.url());
    expect_code(
        &run(&mut on_pg(&mine, &pg, &moto.url(), &["up", "--yes"])),
        0,
    );
    assert!(!mine.path().join(".stack/pgteam.state.json").exists());

    // Nothing secret in the tables: neither key is there, in any form
    // pg_dump shows; what is not secret is readable.
    let dump = pg.dump();
    let mut secrets = key_lines(&mine.path().join(".stack/pgteam.id_ed25519"));
    let hosts = mine.path().join(".stack/pgteam/hosts");
    for entry in std::fs::read_dir(&hosts).unwrap().flatten() {
        if entry.file_name().to_string_lossy().ends_with("_ed25519") {
            secrets.extend(key_lines(&entry.path()));
        }
    }
    assert!(secrets.len() >= 2, "{secrets:?}");
    for secret in &secrets {
        assert!(!dump.contains(secret.as_str()), "{secret} is in clear");
    }
    for readable in ["ec2.instance.control[0]", "ec2.key_pair.main", "sealed:v1:"] {
        assert!(dump.contains(readable), "{readable} is not in the dump");
    }
    assert_eq!(
        pg.psql("SELECT name FROM stack.artifacts ORDER BY name"),
        "host-key/pgteam-control-0\nhost-key/pgteam-worker-0\nssh-key\nssh-public-key"
    );

    // A teammate: another folder, only the stack file; the key from a
    // command, TLS checked against the database's CA.
    let theirs = Env::new("pgteam", 1, moto.url());
    std::fs::write(theirs.path().join("key"), format!("{KEY}\n")).unwrap();
    let verified = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        pg.url(),
        pg.ca_path().display()
    );
    let teammate = |args: &[&str]| {
        let mut command = on_pg(&theirs, &pg, &moto.url(), args);
        command
            .env("STACK_STATE_URL", &verified)
            .env_remove("STACK_STATE_KEY")
            .env("STACK_STATE_KEY_COMMAND", "cat key");
        command
    };
    expect_code(&run(&mut teammate(&["plan", "--detailed-exitcode"])), 0);
    let key = theirs.path().join(".stack/pgteam.id_ed25519");
    assert_eq!(
        std::fs::read(&key).unwrap(),
        std::fs::read(mine.path().join(".stack/pgteam.id_ed25519")).unwrap()
    );
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let status = run(&mut teammate(&["status"]));
    expect_code(&status, 0);
    assert!(
        text(&status.stdout).contains("ec2.instance.control[0]"),
        "{}",
        text(&status.stdout)
    );
    assert!(!theirs.path().join(".stack/pgteam.state.json").exists());

    // A wrong key, no key, and a CA that did not sign the server's
    // certificate are each a clear error.
    let wrong = run(on_pg(&theirs, &pg, &moto.url(), &["plan"]).env("STACK_STATE_KEY", "wrong"));
    expect_code(&wrong, 1);
    assert!(
        text(&wrong.stderr).contains("wrong STACK_STATE_KEY?"),
        "{}",
        text(&wrong.stderr)
    );
    let none = run(on_pg(&theirs, &pg, &moto.url(), &["plan"]).env_remove("STACK_STATE_KEY"));
    expect_code(&none, 1);
    assert!(
        text(&none.stderr).contains("set STACK_STATE_KEY to a passphrase"),
        "{}",
        text(&none.stderr)
    );
    let other_ca = theirs.path().join("other-ca.crt");
    std::fs::write(&other_ca, postgres::new_ca()).unwrap();
    let untrusted = run(teammate(&["plan"]).env(
        "STACK_STATE_URL",
        format!(
            "{}?sslmode=verify-full&sslrootcert={}",
            pg.url(),
            other_ca.display()
        ),
    ));
    expect_code(&untrusted, 1);
    assert!(
        text(&untrusted.stderr).contains("cannot connect to the state database")
            && text(&untrusted.stderr).contains("certificate"),
        "{}",
        text(&untrusted.stderr)
    );

    // The teammate takes it down: the state and the artifacts go, the
    // history stays.
    let down = run(&mut teammate(&["down", "--yes"]));
    expect_code(&down, 0);
    assert_eq!(tagged(&moto.url(), "pgteam"), Tagged::nothing());
    assert_eq!(pg.psql("SELECT count(*) FROM stack.states"), "0");
    assert_eq!(pg.psql("SELECT count(*) FROM stack.artifacts"), "0");
    let rows = history(&pg);
    assert!(rows.iter().any(|r| r.2 == "stack up --yes"), "{rows:?}");
    assert!(rows.iter().any(|r| r.2 == "stack down --yes"), "{rows:?}");
    assert!(!key.exists());
    let listed = run(&mut teammate(&["state", "history", "--output", "json"]));
    expect_code(&listed, 0);
    let listed: Vec<serde_json::Value> = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed.len(), rows.len());
    assert!(listed
        .iter()
        .all(|e| e["who"].as_str().unwrap().contains('@')
            && e["at"].as_str().unwrap().ends_with('Z')));

    // A stack that is down holds no state: the next `up` may bring it
    // back with another key, which is then the one it needs.
    let rekeyed = |args: &[&str]| {
        let mut command = on_pg(&mine, &pg, &moto.url(), args);
        command.env("STACK_STATE_KEY", "another key");
        command
    };
    expect_code(&run(&mut rekeyed(&["up", "--yes"])), 0);
    let old_key = run(&mut on_pg(&mine, &pg, &moto.url(), &["plan"]));
    expect_code(&old_key, 1);
    assert!(
        text(&old_key.stderr).contains("wrong STACK_STATE_KEY?"),
        "{}",
        text(&old_key.stderr)
    );
    expect_code(&run(&mut rekeyed(&["down", "--yes"])), 0);
    assert_eq!(tagged(&moto.url(), "pgteam"), Tagged::nothing());

    // A database a newer stack migrated further is refused, untouched.
    pg.psql("INSERT INTO stack.migrations (version, name, applied_by) VALUES (99, 'from the future', 'a test')");
    let newer = run(&mut teammate(&["plan"]));
    expect_code(&newer, 1);
    assert!(
        text(&newer.stderr)
            .contains("has schema version 99; this build of stack knows versions up to 1"),
        "{}",
        text(&newer.stderr)
    );
}

#[test]
fn the_state_moves_from_local_to_postgres_and_back_and_is_pulled_and_pushed() {
    let moto = Moto::start();
    let pg = Postgres::start();
    let env = Env::new("pgmove", 1, moto.url());
    pg.write_pgpass(env.path());
    let local = |args: &[&str]| {
        let mut command = env.command_at(&moto.url(), args);
        command.env("STACK_STATE_KEY", KEY);
        command
    };
    expect_code(&run(&mut local(&["up", "--yes"])), 0);
    let state_file = env.path().join(".stack/pgmove.state.json");
    let serial = env.state("pgmove")["serial"].as_u64().unwrap();
    let free = run(&mut local(&["state", "unlock"]));
    expect_code(&free, 0);
    assert!(
        text(&free.stdout).contains("the lock of .stack/pgmove.state.json is free"),
        "{}",
        text(&free.stdout)
    );
    let refused = run(&mut local(&["state", "history"]));
    expect_code(&refused, 1);
    assert!(
        text(&refused.stderr).contains("keeps no history"),
        "{}",
        text(&refused.stderr)
    );

    let moved = run(&mut local(&[
        "state",
        "migrate",
        "--to",
        &pg.url(),
        "--yes",
    ]));
    expect_code(&moved, 0);
    let said = text(&moved.stdout);
    assert!(
        said.contains(&format!(
            "moved the state of stack pgmove (serial {}",
            serial + 1
        )) && said.contains(
            "artifacts: host-key/pgmove-control-0, host-key/pgmove-worker-0, ssh-key, ssh-public-key)"
        )
            && said.contains("STACK_STATE_URL="),
        "{said}"
    );
    assert!(!state_file.exists());
    assert_eq!(
        pg.psql("SELECT serial FROM stack.states"),
        (serial + 1).to_string()
    );
    expect_code(
        &run(&mut on_pg(
            &env,
            &pg,
            &moto.url(),
            &["plan", "--detailed-exitcode"],
        )),
        0,
    );

    // Pull, push what was pulled (it follows), push it again (it does
    // not), and again with --force.
    let pulled = run(&mut on_pg(&env, &pg, &moto.url(), &["state", "pull"]));
    expect_code(&pulled, 0);
    std::fs::write(env.path().join("pulled.json"), &pulled.stdout).unwrap();
    let push = |extra: &[&str]| {
        let mut args = vec!["state", "push", "pulled.json", "--yes"];
        args.extend(extra);
        run(&mut on_pg(&env, &pg, &moto.url(), &args))
    };
    let pushed = push(&[]);
    expect_code(&pushed, 0);
    assert!(
        text(&pushed.stdout).contains(&format!("as serial {}", serial + 2)),
        "{}",
        text(&pushed.stdout)
    );
    let stale = push(&[]);
    expect_code(&stale, 1);
    assert!(
        text(&stale.stderr).contains(&format!(
            "is at serial {}, the stored state at serial {}",
            serial + 1,
            serial + 2
        )),
        "{}",
        text(&stale.stderr)
    );
    expect_code(&push(&["--force"]), 0);
    let commands: Vec<String> = history(&pg).into_iter().map(|r| r.2).collect();
    assert_eq!(
        commands,
        [
            format!("stack state migrate --to {} --yes", pg.url()),
            "stack state push pulled.json --yes".to_string(),
            "stack state push pulled.json --yes --force".to_string(),
        ]
    );
    let text_history = run(&mut on_pg(&env, &pg, &moto.url(), &["state", "history"]));
    expect_code(&text_history, 0);
    assert!(
        text(&text_history.stdout).starts_with("SERIAL  WHEN"),
        "{}",
        text(&text_history.stdout)
    );

    // And back: the local file again, nothing of it left in the database
    // but its history.
    let back = run(&mut on_pg(
        &env,
        &pg,
        &moto.url(),
        &["state", "migrate", "--to", "local", "--yes"],
    ));
    expect_code(&back, 0);
    assert!(state_file.exists());
    assert_eq!(env.state("pgmove")["serial"], serial + 4);
    assert_eq!(pg.psql("SELECT count(*) FROM stack.states"), "0");
    assert_eq!(pg.psql("SELECT count(*) FROM stack.artifacts"), "0");
    expect_code(&run(&mut local(&["plan", "--detailed-exitcode"])), 0);
    expect_code(&run(&mut local(&["down", "--yes"])), 0);
    assert_eq!(tagged(&moto.url(), "pgmove"), Tagged::nothing());
}

/// A stack on an existing cluster (the API double) with a CouchDB
/// database and a TLS ingress from the stack's CA: the generated
/// passwords and cookie (the Secrets' values) and the CA's private key are
/// in the state's records, and none of them is in the database in clear.
#[test]
fn generated_passwords_and_the_stack_cas_key_are_never_in_the_database_in_clear() {
    use base64::Engine as _;
    let pg = Postgres::start();
    let (env, double) = couch_env(
        "pgsecret",
        "  - kind: couchdb\n    name: docs\n    replicas: 1\n    storage: 1GiB\n",
    );
    let file = env.path().join("stack.yaml");
    let with_ingress = std::fs::read_to_string(&file).unwrap()
        + "ingress:\n  domain: pgsecret.test\n  className: public\n";
    std::fs::write(&file, with_ingress).unwrap();
    expect_code(&run(&mut on_pg(&env, &pg, "", &["up", "--yes"])), 0);

    let mut secrets: Vec<String> = Vec::new();
    let listed = double.get(&format!("/api/v1/namespaces/{NAMESPACE}/secrets"));
    for secret in listed["items"].as_array().unwrap() {
        for value in secret["data"]
            .as_object()
            .into_iter()
            .flat_map(|d| d.values())
        {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(value.as_str().unwrap())
                .unwrap();
            let decoded = String::from_utf8_lossy(&decoded).into_owned();
            if decoded.len() >= 16 {
                secrets.push(decoded);
            }
        }
    }
    let pulled = run(&mut on_pg(&env, &pg, "", &["state", "pull"]));
    expect_code(&pulled, 0);
    let state: serde_json::Value = serde_json::from_slice(&pulled.stdout).unwrap();
    let ca_key = state["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|r| r["attrs"]["caPrivateKey"].as_str())
        .expect("the state records the stack CA's key");
    secrets.extend(
        ca_key
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .map(String::from),
    );
    secrets.extend(key_lines(&env.path().join(".stack/pgsecret.id_ed25519")));
    assert!(secrets.len() >= 4, "{secrets:?}");

    let dump = pg.dump();
    for secret in &secrets {
        assert!(
            !dump.contains(secret.as_str()),
            "{secret:?} is in the database in clear"
        );
        assert!(
            !dump.contains(&base64::engine::general_purpose::STANDARD.encode(secret)),
            "{secret:?} is in the database in base64"
        );
    }
    let addresses: Vec<&str> = state["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["address"].as_str().unwrap())
        .collect();
    assert!(addresses.len() > 3, "{addresses:?}");
    for address in addresses {
        assert!(dump.contains(address), "{address} is not readable");
    }
    assert_eq!(
        pg.psql("SELECT name FROM stack.artifacts ORDER BY name"),
        "ca-certificate\nssh-key\nssh-public-key"
    );
}
