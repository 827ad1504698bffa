//! The kubeconfig `microk8s config` prints, made the user's: names after the
//! stack, the server address the user reaches, written with mode 0600, and
//! merged into another kubeconfig under a context named after the stack
//! (like k3sup's `--merge`).

use serde_json::{json, Map, Value};
use yaml_rust2::YamlEmitter;

use std::path::{Path, PathBuf};

use crate::files::{failed, write_private, FileError};
use crate::yamljson::{self, to_json, to_yaml};

#[derive(Debug, thiserror::Error)]
pub enum KubeconfigError {
    #[error("{what} is not a kubeconfig: {reason}")]
    Invalid { what: String, reason: String },
    #[error("neither KUBECONFIG nor HOME is set: no kubeconfig to merge into")]
    NoUserKubeconfig,
    #[error(transparent)]
    File(#[from] FileError),
}

/// Where a kubeconfig was merged, and the context it made current.
#[derive(Debug, Clone)]
pub struct Merged {
    pub file: PathBuf,
    pub context: String,
}

/// Merges the kubeconfig at `ours` into the user's (`$KUBECONFIG`'s first
/// file, else `~/.kube/config`), replacing it whole: a temporary file,
/// mode 0600, renamed into place.
pub fn merge_into_users(ours: &Path) -> Result<Merged, KubeconfigError> {
    let target = std::env::var_os("KUBECONFIG")
        .and_then(|v| std::env::split_paths(&v).next())
        .filter(|p| !p.as_os_str().is_empty())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".kube/config")))
        .ok_or(KubeconfigError::NoUserKubeconfig)?;
    let text = std::fs::read_to_string(ours).map_err(failed("read", ours))?;
    let ours = parse(&text, &ours.display().to_string())?;
    let theirs = match std::fs::read_to_string(&target) {
        Ok(text) => parse(&text, &target.display().to_string())?,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Value::Null,
        Err(err) => return Err(failed("read", &target)(err).into()),
    };
    let merged = merge(&theirs, &ours);
    if let Some(dir) = target.parent() {
        std::fs::create_dir_all(dir).map_err(failed("create", dir))?;
    }
    let tmp = target.with_extension("stack-tmp");
    write_private(&tmp, render(&merged).as_bytes()).map_err(failed("write", &tmp))?;
    std::fs::rename(&tmp, &target).map_err(failed("write", &target))?;
    Ok(Merged {
        context: ours["current-context"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        file: target,
    })
}

/// Reads a kubeconfig; `what` names it in errors.
pub fn parse(text: &str, what: &str) -> Result<Value, KubeconfigError> {
    let invalid = |reason: String| KubeconfigError::Invalid {
        what: what.to_string(),
        reason,
    };
    let docs = yamljson::load(text).map_err(|e| invalid(e.to_string()))?;
    let config = docs.first().map(to_json).unwrap_or(Value::Null);
    if config.is_null() {
        return Ok(json!({"apiVersion": "v1", "kind": "Config"}));
    }
    if !config.is_object() {
        return Err(invalid("not a mapping".to_string()));
    }
    Ok(config)
}

pub fn render(config: &Value) -> String {
    let mut out = String::new();
    YamlEmitter::new(&mut out)
        .dump(&to_yaml(config))
        .expect("a YAML tree is emitted");
    let body = out.strip_prefix("---\n").unwrap_or(&out);
    format!("{body}\n")
}

/// The cluster's kubeconfig as the user gets it: cluster, user and context
/// named after the stack, the server at `server` (`https://HOST:PORT`).
pub fn for_user(
    microk8s_config: &str,
    stack: &str,
    server: &str,
) -> Result<Value, KubeconfigError> {
    let config = parse(microk8s_config, "the output of `microk8s config`")?;
    let invalid = |reason: &str| KubeconfigError::Invalid {
        what: "the output of `microk8s config`".to_string(),
        reason: reason.to_string(),
    };
    let first = |key: &str, field: &str| -> Result<Value, KubeconfigError> {
        config[key][0][field]
            .as_object()
            .map(|o| Value::Object(o.clone()))
            .ok_or_else(|| invalid(&format!("no {key}[0].{field}")))
    };
    let mut cluster = first("clusters", "cluster")?;
    cluster["server"] = json!(server);
    let user = first("users", "user")?;
    let admin = format!("{stack}-admin");
    Ok(json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": stack, "cluster": cluster}],
        "users": [{"name": admin, "user": user}],
        "contexts": [{"name": stack, "context": {"cluster": stack, "user": admin}}],
        "current-context": stack,
        "preferences": {},
    }))
}

/// Puts `ours` (one cluster, user and context) into `theirs`, replacing
/// entries of the same names and making its context the current one.
pub fn merge(theirs: &Value, ours: &Value) -> Value {
    let mut merged = theirs.as_object().cloned().unwrap_or_else(Map::new);
    for key in ["clusters", "users", "contexts"] {
        let mut list: Vec<Value> = merged
            .get(key)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        for entry in ours[key].as_array().into_iter().flatten() {
            list.retain(|e| e["name"] != entry["name"]);
            list.push(entry.clone());
        }
        merged.insert(key.to_string(), Value::Array(list));
    }
    merged.entry("apiVersion").or_insert_with(|| json!("v1"));
    merged.entry("kind").or_insert_with(|| json!("Config"));
    merged.insert(
        "current-context".to_string(),
        ours["current-context"].clone(),
    );
    Value::Object(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MICROK8S_CONFIG: &str = "apiVersion: v1\nclusters:\n- cluster:\n    certificate-authority-data: Q0E=\n    server: https://10.42.0.10:16443\n  name: microk8s-cluster\ncontexts:\n- context:\n    cluster: microk8s-cluster\n    user: admin\n  name: microk8s\ncurrent-context: microk8s\nkind: Config\npreferences: {}\nusers:\n- name: admin\n  user:\n    client-certificate-data: Q0VSVA==\n    client-key-data: S0VZ\n";

    #[test]
    fn renamed_after_the_stack_with_the_users_server() {
        let config = for_user(MICROK8S_CONFIG, "demo", "https://127.0.0.1:40443").unwrap();
        insta::assert_snapshot!(render(&config));
    }

    #[test]
    fn merge_replaces_the_stacks_entries_and_keeps_the_others() {
        let theirs = parse(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: prod\n  cluster: {server: https://prod:6443}\n- name: demo\n  cluster: {server: https://old:16443}\ncontexts:\n- name: prod\n  context: {cluster: prod, user: prod}\nusers:\n- name: prod\n  user: {token: abc}\ncurrent-context: prod\n",
            "test",
        )
        .unwrap();
        let ours = for_user(MICROK8S_CONFIG, "demo", "https://127.0.0.1:40443").unwrap();
        let merged = merge(&theirs, &ours);
        let names = |key: &str| -> Vec<String> {
            merged[key]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["name"].as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(names("clusters"), ["prod", "demo"]);
        assert_eq!(names("users"), ["prod", "demo-admin"]);
        assert_eq!(names("contexts"), ["prod", "demo"]);
        assert_eq!(
            merged["clusters"][1]["cluster"]["server"],
            "https://127.0.0.1:40443"
        );
        assert_eq!(merged["current-context"], "demo");
        // What is written reads back the same.
        assert_eq!(parse(&render(&merged), "merged").unwrap(), merged);
    }
}
