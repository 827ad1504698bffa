//! `stack upgrade --check` against a real registry (Debian's
//! docker-registry on loopback, see `support::registry`): the candidates
//! each rule chooses with their digests, tags read over several pages,
//! logins from the user's Docker config (basic auth and token auth),
//! failures that name the database, the image and the registry, and no
//! registry asked twice for the same thing in one run.

use std::path::Path;
use std::process::Output;

use base64::Engine as _;
use serde_json::Value;

use crate::support::registry::{
    access_log, htpasswd, seed, start_paging_proxy, start_registry, start_token_issuer, Auth,
};
use crate::support::{expect_code, text, Env};

/// A stack deploying to an existing cluster with these `databases:`
/// entries (`--check` needs no cluster).
fn write_stack(env: &Env, databases: &str, upgrades: &str) {
    std::fs::write(
        env.path().join("stack.yaml"),
        format!("version: 1\nname: upgrades\nkubernetes:\n  kubeconfig: kubeconfig\ndatabases:\n{databases}{upgrades}"),
    )
    .unwrap();
}

fn check(env: &Env, json: bool, docker_config: Option<&Path>) -> Output {
    let mut args = vec!["upgrade", "--check"];
    if json {
        args.extend(["--output", "json"]);
    }
    let mut command = env.command(&args);
    if let Some(folder) = docker_config {
        command.env("DOCKER_CONFIG", folder);
    }
    command.output().unwrap()
}

fn by_database(report: &Value) -> std::collections::BTreeMap<String, Value> {
    report["databases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["database"].as_str().unwrap().to_string(), d.clone()))
        .collect()
}

/// From 3.5.0 among the tags: patch 3.5.2, minor 3.6.1, major
/// 4.0.0, never the pre-release nor `latest`, narrowed by a range and a
/// pattern, the pre-release when asked; each with the digest the registry
/// gave at push; the tags read over pages of 4.
#[test]
fn check_chooses_by_policy_range_and_pattern_over_pages_with_registry_digests() {
    let env = Env::new("upgrades", 1, String::new());
    let (storage, digests) = seed(env.path(), &["couchdb"]);
    let registry = start_registry(env.path(), "plain", &storage, Auth::Anonymous);
    let proxy = start_paging_proxy(env.path(), &registry, 4);
    let image = format!("{}/couchdb", proxy.host());
    write_stack(
        &env,
        &format!(
            "  - {{kind: couchdb, name: patch, image: \"{image}:3.5.0\"}}\n\
             \x20 - {{kind: couchdb, name: minor, image: \"{image}:3.5.0\", upgrade: minor}}\n\
             \x20 - {{kind: couchdb, name: major, image: \"{image}:3.5.0\", upgrade: major}}\n\
             \x20 - {{kind: couchdb, name: ranged, image: \"{image}:3.5.0\", upgrade: {{policy: major, range: \">=3.5, <4\"}}}}\n\
             \x20 - {{kind: couchdb, name: pattern, image: \"{image}:3.5.0\", upgrade: {{policy: major, tags: '3\\.5\\.\\d+'}}}}\n\
             \x20 - {{kind: couchdb, name: pre, image: \"{image}:3.5.0\", upgrade: {{prerelease: true}}}}\n\
             \x20 - {{kind: couchdb, name: newest, image: \"{image}:4.0.0\", upgrade: major}}\n\
             \x20 - {{kind: couchdb, name: floating, image: \"{image}:latest\"}}\n\
             \x20 - {{kind: couchdb, name: held, image: \"{image}:3.5.0\", upgrade: none}}\n"
        ),
        "",
    );
    let json = check(&env, true, None);
    expect_code(&json, 0);
    let report: Value = serde_json::from_slice(&json.stdout).unwrap();
    let found = by_database(&report);
    for (database, tag) in [
        ("patch", "3.5.2"),
        ("minor", "3.6.1"),
        ("major", "4.0.0"),
        ("ranged", "3.6.1"),
        ("pattern", "3.5.2"),
        ("pre", "3.5.3-rc.1"),
    ] {
        let candidate = &found[database]["outcome"]["candidate"];
        let digest = &digests[&format!("couchdb:{tag}")];
        assert_eq!(candidate["tag"], tag, "{database}: {report:#}");
        assert_eq!(candidate["digest"], digest.as_str(), "{database}");
        assert_eq!(
            candidate["reference"],
            format!("{image}:{tag}@{digest}"),
            "{database}"
        );
        assert_eq!(found[database]["registry"], proxy.host());
        assert_eq!(
            found[database]["currentTag"],
            if database == "newest" {
                "4.0.0"
            } else {
                "3.5.0"
            }
        );
    }
    assert_eq!(
        found["newest"]["outcome"]["noCandidate"]["kind"],
        "nothingNewer"
    );
    assert_eq!(found["newest"]["outcome"]["noCandidate"]["newest"], "4.0.0");
    assert_eq!(
        found["floating"]["outcome"]["noCandidate"]["kind"],
        "notAVersion"
    );
    assert_eq!(
        found["held"]["outcome"]["noCandidate"]["kind"],
        "policyNone"
    );
    // 19 tags in pages of at most 4: five pages, each asked once.
    let pages: Vec<String> = proxy
        .log_lines()
        .into_iter()
        .filter(|l| l.starts_with("GET /v2/couchdb/tags/list"))
        .collect();
    assert_eq!(pages.len(), 5, "{pages:?}");
    assert!(pages[1..].iter().all(|p| p.contains("last=")), "{pages:?}");

    let plain = check(&env, false, None);
    expect_code(&plain, 0);
    let table = text(&plain.stdout);
    let short = |tag: &str| digests[&format!("couchdb:{tag}")][..19].to_string();
    let rows: Vec<&str> = table.lines().collect();
    assert!(
        rows[0].starts_with("DATABASE") && rows[0].contains("CANDIDATE"),
        "{table}"
    );
    let patch_row = rows.iter().find(|r| r.starts_with("patch ")).unwrap();
    assert!(
        patch_row.contains(&format!("{image}:3.5.0"))
            && patch_row.contains(" 3.5.2 ")
            && patch_row.ends_with(&short("3.5.2")),
        "{table}"
    );
    assert!(
        table.contains("none: current tag latest is not a version"),
        "{table}"
    );
    assert!(table.contains("none: upgrade policy is none"), "{table}");
}

/// Logins as the user's Docker config gives them: `auth` for a registry
/// with htpasswd basic auth, `username`/`password` under a key with
/// scheme and path for one with token auth, a credential helper; one
/// token per repository in a run. A wrong password is a refused login
/// naming the database, the image and the registry.
#[test]
fn logins_come_from_the_docker_config_for_basic_and_token_auth() {
    let env = Env::new("upgrades", 1, String::new());
    let (storage, digests) = seed(env.path(), &["couchdb", "immudb"]);
    let passwords = htpasswd(env.path(), "alice", "s3cret");
    let basic = start_registry(env.path(), "basic", &storage, Auth::Htpasswd(&passwords));
    let (issuer, bundle) = start_token_issuer(
        env.path(),
        "stack-test-registry",
        "stack-test-issuer",
        &["bob:hunter2"],
    );
    let token = start_registry(
        env.path(),
        "token",
        &storage,
        Auth::Token {
            realm: format!("http://{}/token", issuer.host()),
            service: "stack-test-registry",
            issuer: "stack-test-issuer",
            bundle: &bundle,
        },
    );
    write_stack(
        &env,
        &format!(
            "  - {{kind: couchdb, name: docs, image: \"{b}/couchdb:3.5.0\"}}\n\
             \x20 - {{kind: couchdb, name: tokened, image: \"{t}/couchdb:3.5.0\", upgrade: minor}}\n\
             \x20 - {{kind: couchdb, name: again, image: \"{t}/couchdb:3.5.0\", upgrade: major}}\n\
             \x20 - {{kind: immudb, name: ledger, image: \"{t}/immudb:3.5.0\"}}\n",
            b = basic.host(),
            t = token.host()
        ),
        "",
    );
    let encoded = |pair: &str| base64::engine::general_purpose::STANDARD.encode(pair);
    let config = |basic_password: &str| {
        serde_json::json!({"auths": {
            basic.host(): {"auth": encoded(&format!("alice:{basic_password}"))},
            format!("http://{}/v2/", token.host()): {"username": "bob", "password": "hunter2"},
        }})
        .to_string()
    };
    // Without credentials: refused, by both.
    let anonymous = check(&env, false, None);
    expect_code(&anonymous, 1);
    let message = text(&anonymous.stderr);
    assert!(
        message.contains(&format!("database docs: cannot check image {b}/couchdb:3.5.0 at registry {b}: registry {b} refused the login for couchdb (401): no credentials for it in the docker config", b = basic.host())),
        "{message}"
    );
    assert!(message.contains(&format!("database tokened: cannot check image {t}/couchdb:3.5.0 at registry {t}: registry {t} refused the login", t = token.host())), "{message}");

    // From ~/.docker/config.json (HOME is the test's folder).
    std::fs::create_dir_all(env.path().join(".docker")).unwrap();
    std::fs::write(env.path().join(".docker/config.json"), config("s3cret")).unwrap();
    let before = issuer.log_lines().len();
    let logged_in = check(&env, true, None);
    expect_code(&logged_in, 0);
    let report: Value = serde_json::from_slice(&logged_in.stdout).unwrap();
    let found = by_database(&report);
    for (database, wanted) in [
        ("docs", "couchdb:3.5.2"),
        ("tokened", "couchdb:3.6.1"),
        ("again", "couchdb:4.0.0"),
        ("ledger", "immudb:3.5.2"),
    ] {
        let candidate = &found[database]["outcome"]["candidate"];
        assert_eq!(
            candidate["digest"],
            digests[wanted].as_str(),
            "{database}: {report:#}"
        );
    }
    let tokens: Vec<Value> = issuer.log_lines()[before..]
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let scopes: Vec<&str> = tokens
        .iter()
        .map(|t| t["scope"].as_str().unwrap())
        .collect();
    assert_eq!(
        scopes,
        ["repository:couchdb:pull", "repository:immudb:pull"],
        "one token per scope: {tokens:?}"
    );
    assert!(tokens
        .iter()
        .all(|t| t["user"] == "bob" && t["service"] == "stack-test-registry"));

    // A credential helper named in credHelpers, from $DOCKER_CONFIG.
    let folder = env.path().join("docker-config");
    std::fs::create_dir_all(&folder).unwrap();
    let helpers = env.path().join("bin");
    std::fs::create_dir_all(&helpers).unwrap();
    let helper = helpers.join("docker-credential-stacktest");
    std::fs::write(
        &helper,
        format!("#!/bin/sh\nread server\n[ \"$1\" = get ] && [ \"$server\" = {} ] || exit 1\necho '{{\"ServerURL\":\"'$server'\",\"Username\":\"alice\",\"Secret\":\"s3cret\"}}'\n", basic.host()),
    )
    .unwrap();
    std::fs::set_permissions(&helper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::write(
        folder.join("config.json"),
        serde_json::json!({"credHelpers": {basic.host(): "stacktest"}}).to_string(),
    )
    .unwrap();
    write_stack(
        &env,
        &format!(
            "  - {{kind: couchdb, name: docs, image: \"{}/couchdb:3.5.0\"}}\n",
            basic.host()
        ),
        "",
    );
    let path = format!(
        "{}:{}",
        helpers.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let helped = env
        .command(&["upgrade", "--check", "--output", "json"])
        .env("DOCKER_CONFIG", &folder)
        .env("PATH", path)
        .output()
        .unwrap();
    expect_code(&helped, 0);
    let report: Value = serde_json::from_slice(&helped.stdout).unwrap();
    assert_eq!(
        report["databases"][0]["outcome"]["candidate"]["digest"],
        digests["couchdb:3.5.2"].as_str()
    );

    // A wrong password: refused with the credentials.
    std::fs::write(folder.join("config.json"), config("wrong")).unwrap();
    let refused = check(&env, false, Some(&folder));
    expect_code(&refused, 1);
    let message = text(&refused.stderr);
    assert!(
        message.contains(&format!("database docs: cannot check image {b}/couchdb:3.5.0 at registry {b}: registry {b} refused the login for couchdb (401)", b = basic.host()))
            && !message.contains("no credentials"),
        "{message}"
    );
}

/// An unreachable registry (a closed port) and an unknown repository each
/// fail their database with a message naming the database, the image and
/// the registry; the others are still checked and shown; exit 1.
#[test]
fn unreachable_registries_and_unknown_repositories_fail_their_database_only() {
    let env = Env::new("upgrades", 1, String::new());
    let (storage, _) = seed(env.path(), &["couchdb"]);
    let registry = start_registry(env.path(), "plain", &storage, Auth::Anonymous);
    let closed = format!("127.0.0.1:{}", crate::support::free_port());
    let r = registry.host();
    write_stack(
        &env,
        &format!(
            "  - {{kind: couchdb, name: docs, image: \"{r}/couchdb:3.5.0\"}}\n\
             \x20 - {{kind: couchdb, name: closed, image: \"{closed}/couchdb:3.5.0\"}}\n\
             \x20 - {{kind: couchdb, name: missing, image: \"{r}/couchdb-nope:3.5.0\"}}\n"
        ),
        "",
    );
    let plain = check(&env, false, None);
    expect_code(&plain, 1);
    let message = text(&plain.stderr);
    for expected in [
        "error: the check of 2 of 3 databases failed:".to_string(),
        format!("database closed: cannot check image {closed}/couchdb:3.5.0 at registry {closed}: cannot reach registry {closed} over https and http"),
        format!("database missing: cannot check image {r}/couchdb-nope:3.5.0 at registry {r}: registry {r} has no repository couchdb-nope"),
    ] {
        assert!(message.contains(&expected), "no {expected:?} in\n{message}");
    }
    assert!(text(&plain.stdout)
        .lines()
        .any(|l| l.starts_with("docs ") && l.contains(" 3.5.2 ")));
    let json = check(&env, true, None);
    expect_code(&json, 1);
    let report: Value = serde_json::from_slice(&json.stdout).unwrap();
    let found = by_database(&report);
    assert_eq!(found["docs"]["outcome"]["candidate"]["tag"], "3.5.2");
    let failed = found["missing"]["outcome"]["failed"].as_str().unwrap();
    assert!(
        failed.contains(&format!("registry {r} has no repository couchdb-nope")),
        "{failed}"
    );
    assert!(found["closed"]["outcome"]["failed"]
        .as_str()
        .unwrap()
        .contains("cannot reach registry"));
}

/// Three databases on one image (two with the same rule) and one on
/// another tag of it: the registry's access log shows one tags walk for
/// the repository and one manifest HEAD per candidate tag.
#[test]
fn no_registry_is_asked_twice_for_the_same_thing_in_a_run() {
    let env = Env::new("upgrades", 1, String::new());
    let (storage, _) = seed(env.path(), &["couchdb"]);
    let registry = start_registry(env.path(), "plain", &storage, Auth::Anonymous);
    let image = format!("{}/couchdb", registry.host());
    write_stack(
        &env,
        &format!(
            "  - {{kind: couchdb, name: one, image: \"{image}:3.5.0\"}}\n\
             \x20 - {{kind: couchdb, name: two, image: \"{image}:3.5.0\"}}\n\
             \x20 - {{kind: couchdb, name: three, image: \"{image}:3.5.1\"}}\n\
             \x20 - {{kind: couchdb, name: four, image: \"{image}:3.5.0\", upgrade: minor}}\n"
        ),
        "upgrades:\n  insecureRegistries: [registry.internal:5000]\n",
    );
    let before = access_log(&registry).len();
    expect_code(&check(&env, false, None), 0);
    let requests: Vec<String> = access_log(&registry)[before..].to_vec();
    let count = |prefix: &str| requests.iter().filter(|l| l.starts_with(prefix)).count();
    assert_eq!(count("GET /v2/couchdb/tags/list"), 1, "{requests:#?}");
    assert_eq!(
        count("HEAD /v2/couchdb/manifests/3.5.2 "),
        1,
        "{requests:#?}"
    );
    assert_eq!(
        count("HEAD /v2/couchdb/manifests/3.6.1 "),
        1,
        "{requests:#?}"
    );
    assert_eq!(requests.len(), 3, "{requests:#?}");
}
