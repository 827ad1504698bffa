//! The README's quick start, run as the README writes it: the moto recipe
//! for the EC2 provider goes up, plans clean and goes down; nothing is
//! changed without `--yes` where stack cannot ask; and the full EC2 example
//! is refused before any call when EC2 is an emulator on loopback.

use std::path::{Path, PathBuf};

use crate::support::moto::{tagged, Moto, Proxy, Tagged};
use crate::support::{expect_code, text, Env};

fn repository() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The `stack …` lines of the README's block that follows `marker`.
fn readme_commands(marker: &str) -> Vec<Vec<String>> {
    let readme = std::fs::read_to_string(repository().join("README.md")).unwrap();
    let start = readme
        .find(marker)
        .unwrap_or_else(|| panic!("the README has no {marker}"));
    let block = &readme[start..];
    let block = &block[block.find("```sh\n").expect("a sh block follows") + 6..];
    let block = &block[..block.find("```").expect("the block ends")];
    block
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("stack "))
        .map(|l| l.split_whitespace().skip(1).map(String::from).collect())
        .collect()
}

fn copy_folder(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_folder(&path, &target);
        } else {
            std::fs::copy(&path, target).unwrap();
        }
    }
}

/// A folder holding a copy of the repository's `stacks/` (without state).
fn with_stacks(env: &Env) {
    copy_folder(&repository().join("stacks"), &env.path().join("stacks"));
    let _ = std::fs::remove_dir_all(env.path().join("stacks/.stack"));
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[test]
fn the_readmes_moto_recipe_goes_up_plans_clean_and_goes_down() {
    let moto = Moto::start();
    let env = Env::new("unused", 1, moto.url());
    with_stacks(&env);
    let commands = readme_commands("<!-- quick start: moto -->");
    let verbs: Vec<&str> = commands.iter().map(|c| c[0].as_str()).collect();
    assert_eq!(verbs, ["up", "plan", "down"], "{commands:?}");
    let run = |args: &[String]| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        env.run(&args)
    };

    let up = run(&commands[0]);
    expect_code(&up, 0);
    assert!(
        text(&up.stdout).contains("Plan: 4 to create"),
        "{}",
        text(&up.stdout)
    );
    let made = tagged(&moto.url(), "moto-demo");
    assert_eq!(made.instances.len(), 2, "{made:?}");
    expect_code(&run(&commands[1]), 0);

    // Without a terminal and without --yes, down changes nothing.
    let file = commands[2].last().unwrap().clone();
    let unasked = env.run(&["down", &file]);
    expect_code(&unasked, 1);
    assert!(
        text(&unasked.stderr).contains("stdin is not a terminal, so stack cannot ask; add --yes"),
        "{}",
        text(&unasked.stderr)
    );
    assert_eq!(tagged(&moto.url(), "moto-demo"), made);

    expect_code(&run(&commands[2]), 0);
    assert_eq!(tagged(&moto.url(), "moto-demo"), Tagged::nothing());
    let left = files_under(&env.path().join("stacks/.stack"));
    assert!(left.is_empty(), "down left {left:?}");
}

#[test]
fn a_cluster_on_an_ec2_emulator_is_refused_before_any_call() {
    let moto = Moto::start();
    let proxy = Proxy::start(moto.port);
    let env = Env::new("unused", 1, proxy.url());
    with_stacks(&env);
    for verb in [&["validate"][..], &["plan"], &["up", "--yes"]] {
        let mut args = verb.to_vec();
        args.push("stacks/aws.yaml");
        let output = env.run(&args);
        expect_code(&output, 1);
        let message = text(&output.stderr);
        assert!(
            message.contains("kubernetes: expected no cluster to bootstrap over SSH when EC2 is an emulator on this machine")
                && message.contains(&format!("found a cluster to make, with EC2 at {}", proxy.url())),
            "{message}"
        );
    }
    assert_eq!(proxy.count(), 0);
    assert!(!env.path().join("stacks/.stack").exists());
    // Without the override the same file is a valid stack for real EC2.
    let output = env.run_at("", &["validate", "stacks/aws.yaml"]);
    expect_code(&output, 0);
}
