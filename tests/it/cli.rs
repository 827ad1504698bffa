//! The output contract of the `stack` binary: with `--output json` every
//! outcome, errors included, is JSON on stdout and nothing else; errors
//! are short cause lines, never Debug dumps; colour only on a terminal and
//! never with `NO_COLOR`; the exit codes; shell completions; and the
//! heartbeat that tells a long wait off a terminal.

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

use crate::support::kube::plain_kube_env;
use crate::support::{expect_code, stack_yaml, text, STACK};

/// The whole of stdout as one JSON document (nothing before or after it).
#[track_caller]
fn one_document(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|err| {
        panic!(
            "stdout is not one JSON document ({err}):\n{}\nstderr:\n{}",
            text(&output.stdout),
            text(&output.stderr)
        )
    })
}

/// `{"error": {"message", "causes", "diagnostics"}}`, and nothing else.
#[track_caller]
fn assert_error_document(doc: &Value) {
    let error = &doc["error"];
    assert_eq!(doc.as_object().map(|o| o.len()), Some(1), "{doc}");
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{doc}"
    );
    assert!(error["causes"].is_array(), "{doc}");
    assert!(error["diagnostics"].is_array(), "{doc}");
}

fn broken_fixtures() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/broken");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    files
}

/// `stack` with nothing of the host's environment but PATH, in `dir` (also
/// its HOME, so no AWS profile), with no stdin; AWS without credentials,
/// IMDS off, EC2 on a closed loopback port.
fn bare(dir: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(STACK);
    command
        .args(args)
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", dir)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_ENDPOINT_URL_EC2", "http://127.0.0.1:1")
        .stdin(Stdio::null());
    command
}

#[test]
fn every_broken_stack_file_is_one_json_error_document_for_every_verb() {
    let dir = tempfile::tempdir().unwrap();
    for file in broken_fixtures() {
        let path = file.display().to_string();
        let validate = bare(dir.path(), &["validate", "--output", "json", &path])
            .output()
            .unwrap();
        expect_code(&validate, 1);
        let verdict = one_document(&validate);
        assert_eq!(verdict["valid"], false, "{path}: {verdict}");
        let diagnostics = &verdict["diagnostics"];
        assert!(
            diagnostics.as_array().is_some_and(|d| !d.is_empty()),
            "{path}: {verdict}"
        );
        for args in [
            &["plan", "-o", "json", &path][..],
            &["plan", "--destroy", "-o", "json", &path],
            &["status", "-o", "json", &path],
            &["up", "--output", "json", "--yes", &path],
            &["down", "--output=json", &path],
        ] {
            let output = bare(dir.path(), args).output().unwrap();
            expect_code(&output, 1);
            let doc = one_document(&output);
            assert_error_document(&doc);
            assert_eq!(&doc["error"]["diagnostics"], diagnostics, "{args:?}");
            assert!(
                doc["error"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains(&path) && !m.contains('\n')),
                "{args:?}: {doc}"
            );
            // People still read why on stderr.
            assert!(
                text(&output.stderr).starts_with("error: "),
                "{args:?}: {}",
                text(&output.stderr)
            );
        }
    }
}

/// What marks a Rust Debug dump in a message.
const DEBUG_MARKERS: [&str; 7] = [
    "Some(",
    "None,",
    " { source",
    "{ kind:",
    "CredentialsNotLoaded(",
    "DispatchFailure(",
    "ConnectorError {",
];

#[track_caller]
fn assert_short_lines_without_debug(what: &str, message: &str) {
    for line in message.lines() {
        assert!(
            line.chars().count() <= 300,
            "{what}: a line of {} characters:\n{message}",
            line.chars().count()
        );
    }
    for marker in DEBUG_MARKERS {
        assert!(
            !message.contains(marker),
            "{what}: a Debug dump (`{marker}`):\n{message}"
        );
    }
}

#[test]
fn cloud_errors_are_short_cause_lines_without_debug_dumps() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("stack.yaml"), stack_yaml("plain", 1)).unwrap();

    // A region but no credentials anywhere.
    let output = bare(dir.path(), &["plan"]).output().unwrap();
    expect_code(&output, 1);
    let stderr = text(&output.stderr);
    assert!(
        stderr.starts_with(
            "error: cannot reach EC2 for stack plain\n  caused by: no usable AWS credentials"
        ),
        "{stderr}"
    );
    assert_short_lines_without_debug("no credentials", &stderr);
    let json = bare(dir.path(), &["plan", "-o", "json"]).output().unwrap();
    expect_code(&json, 1);
    let doc = one_document(&json);
    assert_error_document(&doc);
    let causes = doc["error"]["causes"].as_array().unwrap();
    assert!(!causes.is_empty(), "{doc}");
    for line in causes.iter().chain([&doc["error"]["message"]]) {
        assert_short_lines_without_debug("no credentials, JSON", line.as_str().unwrap());
    }

    // Credentials, but nothing answers on the EC2 endpoint.
    let output = bare(dir.path(), &["plan"])
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .output()
        .unwrap();
    expect_code(&output, 1);
    let stderr = text(&output.stderr);
    assert!(stderr.contains("Connection refused"), "{stderr}");
    assert_short_lines_without_debug("no endpoint", &stderr);
}

/// Runs `command` with stderr on a new pseudo-terminal; what came out on it.
fn stderr_on_a_terminal(mut command: Command) -> (Output, String) {
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two new descriptors, owned below.
    let opened = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(opened, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors are ours alone from here on.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::from(slave))
        .spawn()
        .unwrap();
    drop(command);
    let reader = std::thread::spawn(move || {
        let mut terminal = std::fs::File::from(master);
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        // EIO once the child, the last holder of the other end, is gone.
        while let Ok(n) = terminal.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
        }
        seen
    });
    let output = child.wait_with_output().unwrap();
    let seen = reader.join().unwrap();
    (output, text(&seen))
}

/// Whether `text` holds an SGR escape (`ESC [ … m`): colour or bold.
fn has_colour(text: &str) -> bool {
    text.split('\u{1b}').skip(1).any(|rest| {
        rest.strip_prefix('[').is_some_and(|params| {
            let end = params.find(|c: char| !(c.is_ascii_digit() || c == ';'));
            end.is_some_and(|i| params[i..].starts_with('m'))
        })
    })
}

#[test]
fn colour_only_on_a_terminal_and_never_with_no_color() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("stack.yaml"), stack_yaml("colour", 1)).unwrap();
    // -vvv: the debug lines of the failed credentials lookup, which tracing colours.
    let logged = || {
        let mut command = bare(dir.path(), &["-vvv", "plan"]);
        command.env("TERM", "xterm");
        command
    };

    // Off a terminal: no escape byte at all.
    let output = logged().output().unwrap();
    expect_code(&output, 1);
    let stderr = text(&output.stderr);
    assert!(stderr.contains(" DEBUG "), "{stderr}");
    assert!(!stderr.contains('\u{1b}'), "{stderr:?}");

    // On a terminal the same lines are coloured...
    let (output, seen) = stderr_on_a_terminal(logged());
    expect_code(&output, 1);
    assert!(has_colour(&seen), "no colour on a terminal: {seen:?}");
    // ...unless NO_COLOR is set; set but empty does not count.
    let mut no_color = logged();
    no_color.env("NO_COLOR", "1");
    let (output, seen) = stderr_on_a_terminal(no_color);
    expect_code(&output, 1);
    assert!(seen.contains("error: cannot reach EC2"), "{seen:?}");
    assert!(!has_colour(&seen), "colour despite NO_COLOR: {seen:?}");
    let mut empty = logged();
    empty.env("NO_COLOR", "");
    let (_, seen) = stderr_on_a_terminal(empty);
    assert!(
        has_colour(&seen),
        "an empty NO_COLOR disabled colour: {seen:?}"
    );
}

#[test]
fn a_usage_error_exits_64_and_help_and_version_exit_0() {
    let dir = tempfile::tempdir().unwrap();
    let output = bare(dir.path(), &["plna"]).output().unwrap();
    expect_code(&output, 64);
    assert!(output.stdout.is_empty(), "{}", text(&output.stdout));
    assert!(
        text(&output.stderr).contains("a similar subcommand exists: 'plan'"),
        "{}",
        text(&output.stderr)
    );
    // Where the command line asks for JSON, the usage error is JSON too.
    let output = bare(dir.path(), &["-o", "json", "plan", "--bogus"])
        .output()
        .unwrap();
    expect_code(&output, 64);
    let doc = one_document(&output);
    assert_error_document(&doc);
    assert_eq!(
        doc["error"]["message"], "unexpected argument '--bogus' found",
        "{doc}"
    );
    let output = bare(dir.path(), &["up", "--parallelism", "0"])
        .output()
        .unwrap();
    expect_code(&output, 64);
    for args in [&["--help"][..], &["--version"], &["plan", "--help"]] {
        let output = bare(dir.path(), args).output().unwrap();
        expect_code(&output, 0);
        assert!(!output.stdout.is_empty(), "{args:?}");
    }
}

#[test]
fn completion_scripts_offer_the_subcommands() {
    let dir = tempfile::tempdir().unwrap();
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let output = bare(dir.path(), &["completions", shell]).output().unwrap();
        expect_code(&output, 0);
        let script = text(&output.stdout);
        for word in ["validate", "plan", "kubeconfig", "completions", "--output"] {
            assert!(script.contains(word), "{shell}: no {word}");
        }
        assert!(
            !script.contains("__switch"),
            "{shell} offers the hidden switch"
        );
    }
    // bash, loaded as the README says, completes a subcommand and a flag.
    let script = dir.path().join("stack.bash");
    let output = bare(dir.path(), &["completions", "bash"]).output().unwrap();
    std::fs::write(&script, &output.stdout).unwrap();
    let completed = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source {}; COMP_WORDS=(stack pl); COMP_CWORD=1; _stack stack pl stack; echo \"${{COMPREPLY[*]}}\"; \
             COMP_WORDS=(stack up --ye); COMP_CWORD=2; _stack stack --ye up; echo \"${{COMPREPLY[*]}}\"",
            script.display()
        ))
        .output()
        .unwrap();
    expect_code(&completed, 0);
    assert_eq!(text(&completed.stdout), "plan\n--yes\n");
}

const NEVER_READY: &str = "apiVersion: apps/v1
kind: Deployment
metadata:
  name: stuck
  annotations:
    kube-api-double/never-ready: \"true\"
spec:
  replicas: 1
  selector:
    matchLabels: {app: stuck}
  template:
    metadata:
      labels: {app: stuck}
    spec:
      containers:
        - name: stuck
          image: nginx:1.27
";

#[test]
fn an_apply_stack_cannot_ask_for_ends_its_json_stream_with_the_error() {
    let (env, double) = plain_kube_env("refused", NEVER_READY, "4s");
    let refused = env.run(&["up", "-o", "json"]);
    expect_code(&refused, 1);
    let stdout = text(&refused.stdout);
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(lines.iter().any(|l| l["type"] == "plan"), "{stdout}");
    let last = lines.last().unwrap();
    assert_error_document(last);
    assert!(
        last["error"]["message"]
            .as_str()
            .unwrap()
            .contains("add --yes"),
        "{last}"
    );
    assert_eq!(double.labelled("refused"), Vec::<String>::new());
}

#[test]
fn a_long_wait_off_a_terminal_is_told_with_its_elapsed_time_and_limit() {
    let (env, _double) = plain_kube_env("beat", NEVER_READY, "4s");
    let mut command = env.command(&["up", "--yes"]);
    command.env("STACK_HEARTBEAT", "1");
    let output = command.output().unwrap();
    expect_code(&output, 1);
    let stderr = text(&output.stderr);
    let beats: Vec<&str> = stderr.lines().filter(|l| l.starts_with("… ")).collect();
    assert!(
        beats.iter().any(|l| l
            .contains("stage 2 of 4 (workloads): still waiting for 1 of 1 object to be ready (")
            && l.ends_with(" of 4s)")),
        "no heartbeat of the gate:\n{stderr}"
    );
    // The wait is over once the run failed: no heartbeat after the error.
    let error_at = stderr.find("error: ").unwrap();
    assert!(!stderr[error_at..].contains("\n… "), "{stderr}");
}
