//! The CouchDB peer: the CouchDB TEST DOUBLE (`tests/kube-api-double/couchdb_double.py`,
//! no real CouchDB can run here) behind the Kubernetes API double, whose
//! kubelet stand-in runs a double node for every CouchDB pod. Tests reach
//! the nodes as any client of the cluster would: through the API server's
//! pod proxy, logged in with a session cookie.

use std::time::{Duration, Instant};

use serde_json::Value;

use super::kube::KubeDouble;
use super::Env;

/// The namespace the CouchDB tests' stacks deploy to.
pub(crate) const NAMESPACE: &str = "couch";

/// An existing cluster (the API double with the CouchDB double) and a stack
/// with the given `databases:` entries (YAML, indented as list items).
pub(crate) fn couch_env(name: &str, databases: &str) -> (Env, KubeDouble) {
    let env = Env::new(name, 1, String::new());
    let double = KubeDouble::start_with(
        env.path(),
        &[
            "--couchdb",
            "--couchdb-settle-seconds",
            "2",
            // Long enough (a quarter of it after `_sync_shards`) that copies
            // dropped without waiting for internal replication lose documents.
            "--couchdb-fill-seconds",
            "4",
            "--couchdb-log",
            &env.path().join("couchdb.log").display().to_string(),
        ],
    );
    write_stack(&env, name, databases);
    (env, double)
}

pub(crate) fn write_stack(env: &Env, name: &str, databases: &str) {
    std::fs::write(
        env.path().join("stack.yaml"),
        format!("version: 1\nname: {name}\nkubernetes:\n  kubeconfig: kubeconfig\n  namespace: {NAMESPACE}\ndatabases:\n{databases}timeouts:\n  healthy: 60s\n"),
    )
    .unwrap();
}

/// The requests the CouchDB nodes served, as the double logged them.
pub(crate) fn couch_log(env: &Env) -> Vec<Value> {
    std::fs::read_to_string(env.path().join("couchdb.log"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A client of one CouchDB cluster through the API double's pod proxy,
/// logged in on each pod it talks to (a node salts the admin's password
/// anew at every start, so another node's session cookie may be refused).
pub(crate) struct Client<'a> {
    double: &'a KubeDouble,
    login: String,
    cookies: std::cell::RefCell<std::collections::BTreeMap<String, String>>,
}

impl<'a> Client<'a> {
    /// The cluster's admin, whose password is in its Secret.
    pub(crate) fn admin(double: &'a KubeDouble, cluster: &str) -> Client<'a> {
        use base64::Engine as _;
        let secret = double.get(&format!(
            "/api/v1/namespaces/{NAMESPACE}/secrets/{cluster}-admin"
        ));
        let field = |k: &str| {
            String::from_utf8(
                base64::engine::general_purpose::STANDARD
                    .decode(secret["data"][k].as_str().unwrap())
                    .unwrap(),
            )
            .unwrap()
        };
        let login = serde_json::json!({"name": field("username"), "password": field("password")});
        Client {
            double,
            login: login.to_string(),
            cookies: Default::default(),
        }
    }

    fn cookie(&self, pod: &str) -> String {
        if let Some(cookie) = self.cookies.borrow().get(pod) {
            return cookie.clone();
        }
        let (code, head, answer) =
            self.double
                .raw("POST", &proxy(pod, "/_session"), &[], &self.login);
        assert_eq!(code, 200, "login on {pod}: {answer}");
        let cookie = head
            .lines()
            .find_map(|l| {
                l.strip_prefix("Set-Cookie: ")
                    .or_else(|| l.strip_prefix("set-cookie: "))
            })
            .and_then(|c| c.split(';').next())
            .unwrap_or_else(|| panic!("no session cookie in:\n{head}"))
            .to_string();
        self.cookies
            .borrow_mut()
            .insert(pod.to_string(), cookie.clone());
        cookie
    }

    pub(crate) fn call(&self, pod: &str, method: &str, path: &str, body: &str) -> (u16, Value) {
        let cookie = self.cookie(pod);
        let (code, _, answer) =
            self.double
                .raw(method, &proxy(pod, path), &[("Cookie", &cookie)], body);
        if code == 401 {
            // The node restarted since: its session is gone.
            self.cookies.borrow_mut().remove(pod);
        }
        (
            code,
            serde_json::from_str(&answer).unwrap_or(Value::String(answer)),
        )
    }

    pub(crate) fn get(&self, pod: &str, path: &str) -> Value {
        let (code, body) = self.call(pod, "GET", path, "");
        assert_eq!(code, 200, "GET {path} on {pod}: {body}");
        body
    }

    /// Waits until `done` holds for what GET `path` on `pod` answers.
    pub(crate) fn wait_for(
        &self,
        pod: &str,
        path: &str,
        what: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (code, body) = self.call(pod, "GET", path, "");
            if code == 200 && done(&body) {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: GET {path} answered {code} {body}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// The proxy path of `path` on a CouchDB pod.
pub(crate) fn proxy(pod: &str, path: &str) -> String {
    format!("/api/v1/namespaces/{NAMESPACE}/pods/{pod}:5984/proxy{path}")
}

/// A node's name.
pub(crate) fn node(cluster: &str, ordinal: u32) -> String {
    format!("couchdb@{cluster}-{ordinal}.{cluster}-headless.{NAMESPACE}.svc.cluster.local")
}
