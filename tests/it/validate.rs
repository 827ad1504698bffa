//! What is refused before any provider is called: broken stack files with
//! their exact errors, the example stacks, and sections not built yet.

use std::path::PathBuf;
use std::process::Command;

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
    // The reference shows every field, the sections not built yet too.
    let reference = validate("reference.yaml");
    expect_code(&reference, 1);
    let message = text(&reference.stderr);
    assert!(
        message.starts_with("error: stacks/reference.yaml has 2 errors:")
            && message.contains(
                "reference.yaml:66:1: databases: expected only what this version of stack builds"
            )
            && message.contains(
                "reference.yaml:102:1: upgrades: expected only what this version of stack builds"
            ),
        "{message}"
    );
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
        "kubernetes:\n  channel: 1.32/stable\ndatabases:\n  - kind: couchdb\n    name: docs\n",
    );
    std::fs::write(env.path().join("stack.yaml"), yaml).unwrap();
    for verb in [&["validate"][..], &["plan"], &["up", "--yes"]] {
        let output = env.run(verb);
        expect_code(&output, 1);
        let message = text(&output.stderr);
        assert!(
            message.contains("stack.yaml:19:1: databases: expected only what this version of stack builds (remove the section to plan and apply the rest), found database clusters, not built yet"),
            "{message}"
        );
    }
    assert_eq!(tagged(&moto.url(), "later"), Tagged::nothing());
}
