//! What `stack run` hands the command it runs: the environment's name,
//! its cluster, nodes, endpoints and databases as `STACK_…` variables (and
//! `KUBECONFIG`), built from the environment's status without I/O, and
//! the login files the variables point to.

use std::path::{Path, PathBuf};

use crate::engine::Status;
use crate::files::{failed, write_private, FileError};
use crate::model::Stack;

/// How long a run's environment lives when neither the stack's `ttl` nor
/// `--ttl` says: every run's environment carries an expiry, so `stack gc`
/// can find one whose run was killed.
pub const DEFAULT_RUN_TTL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error)]
#[error("cannot make a run id: the system's random source failed")]
pub struct RunIdError(#[source] getrandom::Error);

/// A new run id: six random lowercase hex digits.
pub fn new_run_id() -> Result<String, RunIdError> {
    let mut bytes = [0u8; 3];
    getrandom::getrandom(&mut bytes).map_err(RunIdError)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// `docs`, `control-0` → `DOCS`, `CONTROL_0`: a name as part of a variable.
pub fn variable_part(name: &str) -> String {
    name.chars()
        .map(|c| match c.is_ascii_alphanumeric() {
            true => c.to_ascii_uppercase(),
            false => '_',
        })
        .collect()
}

/// Where a database's login file goes in `dir`.
pub fn login_path(dir: &Path, database: &str) -> PathBuf {
    dir.join(format!("{database}.login.json"))
}

/// Writes each database's login (`{"username", "password"}`, mode 0600)
/// into `dir`.
pub fn write_logins(status: &Status, dir: &Path) -> Result<(), FileError> {
    std::fs::create_dir_all(dir).map_err(failed("create", dir))?;
    for db in &status.databases {
        if let Some(login) = &db.login {
            let path = login_path(dir, &db.name);
            let text = serde_json::to_vec_pretty(login).expect("a login serialises");
            write_private(&path, &text).map_err(failed("write", &path))?;
        }
    }
    Ok(())
}

/// The variables the command sees, in a stable order: `stack` is the
/// environment (`NAME-RUN`), `logins` the folder `write_logins` wrote to,
/// `status_file` the environment's status as JSON.
pub fn variables(
    stack: &Stack,
    status: &Status,
    logins: &Path,
    status_file: &Path,
) -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> = Vec::new();
    let mut set = |key: &str, value: String| vars.push((key.to_string(), value));
    // CMD may change folders: every path it gets is absolute.
    let path = |path: &Path| {
        std::path::absolute(path)
            .unwrap_or_else(|_| path.to_path_buf())
            .display()
            .to_string()
    };
    set("STACK_NAME", stack.name.clone());
    if let Some(run) = &stack.run {
        set("STACK_RUN_ID", run.id.clone());
        set("STACK_RUN_OF", run.of.clone());
    }
    set("STACK_FILE", path(&stack.file));
    set("STACK_STATUS_FILE", path(status_file));
    if let Some(expires) = stack.expires {
        set("STACK_EXPIRES", crate::expiry::rfc3339(expires));
    }
    if let Some(kubeconfig) = &status.kubeconfig {
        set("KUBECONFIG", path(kubeconfig));
    }
    if let Some(context) = &status.context {
        set("STACK_KUBE_CONTEXT", context.clone());
    }
    if let Some(kubernetes) = &stack.kubernetes {
        set("STACK_NAMESPACE", kubernetes.namespace.clone());
    }
    if let Some(key) = &status.ssh_key {
        set("STACK_SSH_KEY", path(key));
    }
    if let Some(user) = &status.ssh_user {
        set("STACK_SSH_USER", user.clone());
    }
    let mut names = Vec::new();
    for node in &status.nodes {
        let name = node
            .ssh
            .as_ref()
            .and_then(|s| s.names.get(1).cloned())
            .unwrap_or_else(|| node.address.clone());
        let part = variable_part(&name);
        if let Some(address) = &node.public_address {
            set(&format!("STACK_NODE_{part}_ADDRESS"), address.clone());
        }
        if let Some(address) = &node.private_address {
            set(
                &format!("STACK_NODE_{part}_PRIVATE_ADDRESS"),
                address.clone(),
            );
        }
        if let Some(ssh) = &node.ssh {
            set(
                &format!("STACK_NODE_{part}_SSH"),
                format!("{}:{}", ssh.host, ssh.port),
            );
        }
        names.push(name);
    }
    if !status.nodes.is_empty() {
        set("STACK_NODES", names.join(" "));
    }
    for endpoint in &status.endpoints {
        let part = variable_part(&endpoint.name);
        set(&format!("STACK_ENDPOINT_{part}_URL"), endpoint.url.clone());
    }
    let mut databases = Vec::new();
    for db in &status.databases {
        let part = variable_part(&db.name);
        set(&format!("STACK_DB_{part}_KIND"), db.kind.clone());
        if let Some(first) = db.endpoints.first() {
            // Endpoints read `URL` or `URL (what it is for)`.
            let url = first.split(" (").next().unwrap_or(first);
            set(&format!("STACK_DB_{part}_URL"), url.to_string());
        }
        set(
            &format!("STACK_DB_{part}_ENDPOINTS"),
            db.endpoints.join("\n"),
        );
        set(
            &format!("STACK_DB_{part}_SECRET"),
            db.credentials_secret.clone(),
        );
        if db.login.is_some() {
            set(
                &format!("STACK_DB_{part}_CREDENTIALS"),
                path(&login_path(logins, &db.name)),
            );
        }
        databases.push(db.name.clone());
    }
    if !databases.is_empty() {
        set("STACK_DATABASES", databases.join(" "));
    }
    vars
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{DatabaseStatus, EndpointStatus, Login, NodeStatus, SshAccess};

    fn node(name: &str, public: &str, private: &str) -> NodeStatus {
        NodeStatus {
            address: format!("ec2.instance.{name}"),
            id: "i-1".to_string(),
            state: "running".to_string(),
            public_address: Some(public.to_string()),
            private_address: Some(private.to_string()),
            ssh: Some(SshAccess {
                host: public.to_string(),
                port: 22,
                user: "ubuntu".to_string(),
                host_key: "ssh-ed25519 AAAA".to_string(),
                names: vec![
                    format!("ec2.instance.{name}"),
                    name.replace('[', "-").replace(']', ""),
                ],
            }),
        }
    }

    fn database(name: &str, kind: &str, endpoints: &[&str], login: bool) -> DatabaseStatus {
        DatabaseStatus {
            name: name.to_string(),
            kind: kind.to_string(),
            endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
            credentials_secret: format!("ci-3f9a1c/{name}-admin"),
            credentials_command: String::new(),
            membership: String::new(),
            problems: Vec::new(),
            replications: Vec::new(),
            replicas: Vec::new(),
            image: String::new(),
            upgrades: Vec::new(),
            login: login.then(|| Login {
                username: "admin".to_string(),
                password: "not-in-the-variables".to_string(),
            }),
        }
    }

    #[test]
    fn the_variables_name_everything_and_hold_no_secret() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("stacks/reference.yaml");
        let mut stack = crate::model::load(&path).unwrap().for_run("3f9a1c");
        stack.file = PathBuf::from("/work/ci.yaml");
        stack.expires = Some(1_796_300_000);
        let status = Status {
            stack: stack.name.clone(),
            provider: "ec2".to_string(),
            state_file: String::new(),
            state_serial: Some(9),
            recorded_resources: 9,
            ssh_key: Some(PathBuf::from("/work/.stack/ci.id_ed25519")),
            ssh_user: Some("ubuntu".to_string()),
            cluster: true,
            kubeconfig: Some(PathBuf::from("/work/.stack/ci.kubeconfig")),
            context: Some("ci".to_string()),
            nodes: vec![
                node("control[0]", "203.0.113.10", "10.0.0.10"),
                node("worker[0]", "203.0.113.11", "10.0.0.11"),
            ],
            endpoints: vec![EndpointStatus {
                name: "web".to_string(),
                url: "https://web.ci.test".to_string(),
            }],
            ca_certificate: None,
            grafana: None,
            databases: vec![
                database("docs", "couchdb", &["https://docs.ci.test"], true),
                database(
                    "ledger",
                    "immudb",
                    &[
                        "immudb-ledger.ci:3322 (gRPC, writes)",
                        "immudb-ledger-read.ci:3322 (gRPC, reads, replicas only)",
                    ],
                    false,
                ),
            ],
            stages: Vec::new(),
        };
        let vars = variables(
            &stack,
            &status,
            Path::new("/work/.stack/run"),
            Path::new("/work/.stack/run/status.json"),
        );
        assert!(vars
            .iter()
            .all(|(_, v)| !v.contains("not-in-the-variables")));
        let shown: Vec<String> = vars.iter().map(|(k, v)| format!("{k}={v}")).collect();
        insta::assert_snapshot!(shown.join("\n"));
    }

    #[test]
    fn run_ids_are_six_hex_digits_and_differ() {
        let a = new_run_id().unwrap();
        let b = new_run_id().unwrap();
        assert_eq!(a.len(), 6);
        assert!(a
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_ne!(a, b);
    }

    #[test]
    fn names_become_variable_parts() {
        assert_eq!(variable_part("control-0"), "CONTROL_0");
        assert_eq!(variable_part("docs"), "DOCS");
        assert_eq!(variable_part("kvm.vm.a[1]"), "KVM_VM_A_1_");
    }
}
