//! The Kubernetes peer: the API test double (no real API server can run
//! here), the application manifests the tests apply to it, and a stack that
//! points at it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::{free_port, Env};

/// The Kubernetes API TEST DOUBLE (`tests/kube-api-double`): no real API
/// server can run here. Started on a free loopback port, stopped on drop;
/// every request it serves is logged.
pub(crate) struct KubeDouble {
    child: Child,
    port: u16,
    pub(crate) log: PathBuf,
}

impl KubeDouble {
    /// What the monitoring addon leaves in a cluster: the Prometheus
    /// Operator's ServiceMonitor CRD and the observability namespace.
    pub(crate) fn install_prometheus_operator(&self) {
        let crd = r#"{"apiVersion":"apiextensions.k8s.io/v1","kind":"CustomResourceDefinition","metadata":{"name":"servicemonitors.monitoring.coreos.com"},"spec":{"group":"monitoring.coreos.com","names":{"kind":"ServiceMonitor","plural":"servicemonitors"},"scope":"Namespaced","versions":[{"name":"v1","served":true,"storage":true}]}}"#;
        let (code, body) = self.request(
            "POST",
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
            "application/json",
            crd,
        );
        assert_eq!(code, 201, "{body}");
        self.request(
            "POST",
            "/api/v1/namespaces",
            "application/json",
            r#"{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"observability"}}"#,
        );
    }

    /// `faults` is `SEED:PERCENT` of stack's requests to fail transiently.
    fn start(dir: &Path, faults: Option<&str>) -> KubeDouble {
        let faults: Vec<&str> = faults.into_iter().flat_map(|f| ["--faults", f]).collect();
        KubeDouble::start_with(dir, &faults)
    }

    /// With the double's own flags (`--couchdb`, …).
    pub(crate) fn start_with(dir: &Path, flags: &[&str]) -> KubeDouble {
        let port = free_port();
        let log = dir.join("api-requests.log");
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kube-api-double/kube_api_double.py");
        let mut command = Command::new("python3");
        command
            .arg(script)
            .args(["--port", &port.to_string(), "--log"])
            .arg(&log);
        command.args(flags);
        let child = command
            .stdout(Stdio::null())
            .spawn()
            .expect("python3 runs the Kubernetes API double");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the API double did not start on port {port}"
            );
            thread::sleep(Duration::from_millis(50));
        }
        std::fs::write(
            dir.join("kubeconfig"),
            format!("apiVersion: v1\nkind: Config\nclusters:\n- name: double\n  cluster:\n    server: http://127.0.0.1:{port}\nusers:\n- name: tester\n  user:\n    token: test\ncontexts:\n- name: double\n  context: {{cluster: double, user: tester}}\ncurrent-context: double\n"),
        )
        .unwrap();
        KubeDouble { child, port, log }
    }

    /// One HTTP request as another client (kubectl, a controller) would send it.
    pub(crate) fn request(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: &str,
    ) -> (u16, serde_json::Value) {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        let code = head.split(' ').nth(1).unwrap().parse().unwrap();
        (code, serde_json::from_str(body).unwrap())
    }

    /// One request with the given headers; the answer's status, headers and body.
    pub(crate) fn raw(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (u16, String, String) {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        let extra: String = headers
            .iter()
            .map(|(k, v)| format!("{k}: {v}\r\n"))
            .collect();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        let code = head.split(' ').nth(1).unwrap().parse().unwrap();
        (code, head.to_string(), body.to_string())
    }

    pub(crate) fn get(&self, path: &str) -> serde_json::Value {
        let (code, body) = self.request("GET", path, "application/json", "");
        assert_eq!(code, 200, "GET {path}: {body}");
        body
    }

    /// Every object of the stack's labels, as `plural/namespace/name`.
    pub(crate) fn labelled(&self, stack: &str) -> Vec<String> {
        let mut found = Vec::new();
        for path in [
            "/api/v1/namespaces",
            "/api/v1/configmaps",
            "/api/v1/secrets",
            "/api/v1/services",
            "/apis/apps/v1/statefulsets",
            "/apis/apps/v1/deployments",
            "/apis/apps/v1/daemonsets",
            "/apis/batch/v1/jobs",
            "/apis/networking.k8s.io/v1/ingresses",
        ] {
            let list = self.get(&format!(
                "{path}?labelSelector=app.kubernetes.io/part-of%3D{stack}"
            ));
            for item in list["items"].as_array().unwrap() {
                found.push(format!(
                    "{path}/{}/{}",
                    item["metadata"]["namespace"].as_str().unwrap_or("-"),
                    item["metadata"]["name"].as_str().unwrap()
                ));
            }
        }
        found
    }

    pub(crate) fn requests(&self) -> usize {
        std::fs::read_to_string(&self.log).map_or(0, |log| log.lines().count())
    }

    /// How many requests were failed on purpose (see `--faults`).
    pub(crate) fn faults(&self) -> usize {
        std::fs::read_to_string(&self.log).map_or(0, |log| {
            log.lines().filter(|l| l.starts_with("FAULT ")).count()
        })
    }
}

impl Drop for KubeDouble {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The first line of each change in a rendered plan: action and address.
pub(crate) fn change_lines(plan: &str) -> Vec<&str> {
    plan.lines()
        .filter(|l| l.starts_with("  ") && !l.starts_with("      "))
        .collect()
}

pub(crate) const APP_MANIFESTS: &str = "apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: web
spec:
  replicas: 3
  serviceName: web
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
        - name: web
          image: nginx:1.27
          ports:
            - {name: http, containerPort: 80}
          resources:
            requests: {memory: 1024Mi, cpu: 500m}
---
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  selector: {app: web}
  ports:
    - {name: http, port: 80, targetPort: http}
---
apiVersion: v1
kind: Service
metadata:
  name: grpc
spec:
  selector: {app: web}
  ports:
    - {name: grpc, port: 9000}
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: web-config
data:
  greeting: hello
";

/// An existing cluster (the API double) with the user's manifests, a TLS
/// ingress from the stack's CA and a TCP endpoint on a NodePort.
pub(crate) fn kube_env(name: &str, manifests: &str, healthy: &str) -> (Env, KubeDouble) {
    faulty_kube_env(name, manifests, healthy, None)
}

/// A `kube_env` whose API fails some of stack's requests (`SEED:PERCENT`).
pub(crate) fn faulty_kube_env(
    name: &str,
    manifests: &str,
    healthy: &str,
    faults: Option<&str>,
) -> (Env, KubeDouble) {
    let env = Env::new(name, 1, String::new());
    let double = KubeDouble::start(env.path(), faults);
    std::fs::create_dir_all(env.path().join("app")).unwrap();
    std::fs::write(env.path().join("app/web.yaml"), manifests).unwrap();
    std::fs::write(
        env.path().join("stack.yaml"),
        format!("version: 1\nname: {name}\nkubernetes:\n  kubeconfig: kubeconfig\n  manifests: [app]\ningress:\n  domain: {name}.test\n  className: public\n  endpoints:\n    - {{name: web, service: web, port: 80}}\n    - {{name: grpc, service: grpc, port: 9000, protocol: tcp}}\ntimeouts:\n  healthy: {healthy}\n"),
    )
    .unwrap();
    (env, double)
}

/// An existing cluster (the API double) with only the user's manifests:
/// no ingress, so any objects will do.
pub(crate) fn plain_kube_env(name: &str, manifests: &str, healthy: &str) -> (Env, KubeDouble) {
    let env = Env::new(name, 1, String::new());
    let double = KubeDouble::start(env.path(), None);
    std::fs::create_dir_all(env.path().join("app")).unwrap();
    std::fs::write(env.path().join("app/objects.yaml"), manifests).unwrap();
    std::fs::write(
        env.path().join("stack.yaml"),
        format!("version: 1\nname: {name}\nkubernetes:\n  kubeconfig: kubeconfig\n  manifests: [app]\ntimeouts:\n  healthy: {healthy}\n"),
    )
    .unwrap();
    (env, double)
}

/// Rewrites the manifests of a `plain_kube_env`.
pub(crate) fn rewrite_manifests(env: &Env, manifests: &str) {
    std::fs::write(env.path().join("app/objects.yaml"), manifests).unwrap();
}
