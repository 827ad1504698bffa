//! What is refused before any provider is called: broken stack files with
//! their exact errors, hostile ones at little cost, the example stacks, and
//! sections not built yet.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::moto::{tagged, Moto, Proxy, Tagged};
use crate::support::{expect_code, stack_yaml, text, Env, STACK};

/// Every broken stack under tests/broken gives exactly the errors in its
/// `.expected` file.
#[test]
fn broken_stack_files_give_the_expected_errors() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/broken");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 25, "only {} broken stacks", files.len());
    let mut mismatches = Vec::new();
    for file in &files {
        let name = file.file_name().unwrap().to_str().unwrap();
        let output = Command::new(STACK)
            .args(["validate", name])
            .current_dir(&dir)
            .output()
            .unwrap();
        let expected = std::fs::read_to_string(file.with_extension("expected")).unwrap_or_default();
        if output.status.code() != Some(1) || text(&output.stderr) != expected {
            mismatches.push(format!(
                "== {name} (exit {:?})\n{}",
                output.status.code(),
                text(&output.stderr)
            ));
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

/// How a `stack validate` child ended and the most memory it held.
struct Measured {
    code: Option<i32>,
    stderr: String,
    peak_rss_mb: u64,
}

/// Runs `stack validate FILE` in `dir` and reads its peak resident memory
/// from `wait4`; killed after 20 s so that a hang fails instead of blocking,
/// and given at most 4 GiB of address space so that a loader without bounds
/// fails there instead of taking the machine's memory.
fn validate_measured(dir: &Path, file: &str) -> Measured {
    let mut command = Command::new(STACK);
    command
        .args(["validate", file])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between
    // fork and exec.
    unsafe {
        command.pre_exec(|| {
            let cap = libc::rlimit {
                rlim_cur: 4 << 30,
                rlim_max: 4 << 30,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &cap) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    #[expect(
        clippy::zombie_processes,
        reason = "reaped by wait4 below, which also gives its rusage"
    )]
    let mut child = command.spawn().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        stderr.read_to_string(&mut text).unwrap();
        text
    });
    let pid = child.id() as libc::pid_t;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        let reaped = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        assert!(reaped >= 0, "wait4: {}", std::io::Error::last_os_error());
        if reaped == pid {
            break;
        }
        if Instant::now() > deadline {
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::wait4(pid, &mut status, 0, &mut usage);
            }
            panic!("stack validate {file} still ran after 20 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Measured {
        code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
        stderr: reader.join().unwrap(),
        // Linux counts ru_maxrss in KiB.
        peak_rss_mb: usage.ru_maxrss as u64 / 1024,
    }
}

/// Set in the fresh run of the hostile-files test that does the measuring.
const FRESH_RUN: &str = "STACK_TEST_FRESH_RUN";

/// A file of nested aliases ("billion laughs"), a 10 MB scalar and 100,000
/// levels of nesting are each refused with a located error, in little
/// memory: before the loader had bounds, the first grew without end, the
/// second was read whole and passed, the third overflowed the stack.
#[test]
fn hostile_stack_files_are_refused_in_little_memory() {
    // Linux counts the peak memory of the process that spawns a child as a
    // floor of the child's own, and this test binary may have held much for
    // other tests: the children are spawned by a fresh run of this one test.
    if std::env::var_os(FRESH_RUN).is_none() {
        let name = "validate::hostile_stack_files_are_refused_in_little_memory";
        let output = Command::new(std::env::current_exe().unwrap())
            .args([name, "--exact", "--nocapture", "--test-threads=1"])
            .env(FRESH_RUN, "1")
            .output()
            .unwrap();
        let out = format!("{}{}", text(&output.stdout), text(&output.stderr));
        assert!(output.status.success() && out.contains("1 passed"), "{out}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let broken = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/broken");
    std::fs::copy(
        broken.join("41-alias-bomb.yaml"),
        dir.path().join("bomb.yaml"),
    )
    .unwrap();
    let head = "version: 1\nname: demo\nprovider: {ec2: {ami: ami-12c6146b}}\nnodes: [{name: a}]\ntags:\n  big: ";
    let mut big = std::fs::File::create(dir.path().join("big.yaml")).unwrap();
    big.write_all(head.as_bytes()).unwrap();
    let mebibyte = vec![b'x'; 1 << 20];
    for _ in 0..10 {
        big.write_all(&mebibyte).unwrap();
    }
    drop(big);
    std::fs::write(dir.path().join("deep.yaml"), "- ".repeat(100_000) + "x\n").unwrap();
    let limit_column = (1 << 20) - head.rfind('\n').unwrap();
    for (file, error) in [
        (
            "bomb.yaml",
            "bomb.yaml:11:10: (document): expected aliases that repeat at most 100000 nodes in all, found `*e`".to_string(),
        ),
        (
            "big.yaml",
            format!("big.yaml:6:{limit_column}: (document): expected a stack file of at most 1 MiB"),
        ),
        (
            "deep.yaml",
            "deep.yaml:1:257: (document): expected at most 128 levels of nested mappings and lists".to_string(),
        ),
    ] {
        let run = validate_measured(dir.path(), file);
        assert_eq!(run.code, Some(1), "{file}: {}", run.stderr);
        assert!(run.stderr.contains(&error), "{file}: {}", run.stderr);
        assert!(
            run.peak_rss_mb < 100,
            "{file}: {} MB at peak",
            run.peak_rss_mb
        );
    }
}

#[test]
fn example_stacks_validate_and_diagnostics_come_as_json() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let validate = |name: &str| {
        Command::new(STACK)
            .args(["validate", &format!("stacks/{name}")])
            .current_dir(&root)
            .env_remove("AWS_ENDPOINT_URL_EC2")
            .env_remove("AWS_ENDPOINT_URL")
            .output()
            .unwrap()
    };
    for name in ["aws.yaml", "aws-moto.yaml", "local.yaml"] {
        expect_code(&validate(name), 0);
    }
    // The reference shows every field.
    expect_code(&validate("reference.yaml"), 0);
    // A UTF-8 byte-order mark (as some Windows editors write) is not part of
    // the first key.
    let dir = tempfile::tempdir().unwrap();
    let with_mark = format!("\u{feff}{}", stack_yaml("marked", 1));
    std::fs::write(dir.path().join("stack.yaml"), with_mark).unwrap();
    let output = Command::new(STACK)
        .args(["validate", "stack.yaml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    expect_code(&output, 0);
    let json = Command::new(STACK)
        .args([
            "validate",
            "--output",
            "json",
            "tests/broken/07-size-without-unit.yaml",
        ])
        .current_dir(&root)
        .output()
        .unwrap();
    expect_code(&json, 1);
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(json["valid"], false);
    assert_eq!(json["diagnostics"][0]["line"], 8);
    assert_eq!(json["diagnostics"][0]["path"], "nodes[0].disk");
}

#[test]
fn a_broken_stack_makes_no_network_call() {
    let moto = Moto::start();
    let proxy = Proxy::start(moto.port);
    let env = Env::new("quiet", 1, proxy.url());
    std::fs::write(env.path().join("stack.yaml"), "version: 1\nname: quiet\nprovider: {ec2: {ami: ami-12c6146b}}\nnodes:\n  - name: a\n    disk: 20\n").unwrap();
    for verb in [
        &["validate"][..],
        &["plan"],
        &["up", "--yes"],
        &["down", "--yes"],
        &["status"],
    ] {
        let output = env.run(verb);
        expect_code(&output, 1);
        assert!(text(&output.stderr).contains("stack.yaml:6:11: nodes[0].disk: expected a size with a unit such as 20GiB, found `20`"), "{}", text(&output.stderr));
    }
    assert_eq!(proxy.count(), 0);
    assert!(
        !env.path().join(".stack").exists(),
        "a broken stack must not create state"
    );
}

#[test]
fn sections_not_built_yet_stop_plan_and_up_by_name() {
    let moto = Moto::start();
    let env = Env::new("later", 1, moto.url());
    let mut yaml = stack_yaml("later", 1);
    yaml.push_str(
        "kubernetes:\n  channel: 1.32/stable\ningress:\n  domain: later.test\n  tcp: entryPoint\n",
    );
    std::fs::write(env.path().join("stack.yaml"), yaml).unwrap();
    for verb in [&["validate"][..], &["plan"], &["up", "--yes"]] {
        let output = env.run(verb);
        expect_code(&output, 1);
        let message = text(&output.stderr);
        assert!(
            message.contains("stack.yaml:21:8: ingress.tcp: expected only what this version of stack builds (remove the section to plan and apply the rest), found TCP entry points of the ingress controller, not built yet"),
            "{message}"
        );
    }
    assert_eq!(tagged(&moto.url(), "later"), Tagged::nothing());
}
