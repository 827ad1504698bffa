//! The desired Kubernetes objects of a stack, built without touching a
//! cluster: the built-in templates under `manifests/` (compiled into the
//! binary, rendered in strict mode from typed arguments) and the user's own
//! manifest files, all labelled as the stack's, placed in stages and checked
//! against their Kubernetes types.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use handlebars::Handlebars;
use serde::Serialize;
use serde_json::{json, Map, Value};

use super::kinds::{self, Kind, Stage};
use super::schema;
use super::tls::Material;
use crate::model::{Database, DatabaseKind, Endpoint, Protocol, Stack, TlsSource};
use crate::yamljson::{self, to_json};

/// The label every object of every stack carries.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// The label naming the stack an object belongs to.
pub const PART_OF: &str = "app.kubernetes.io/part-of";
/// When the environment expires (seconds since the epoch), for `stack gc`.
pub const EXPIRES_LABEL: &str = "stack/expires";
/// The run an object is of, and the stack that run is of.
pub const RUN_LABEL: &str = "stack/run";
pub const RUN_OF_LABEL: &str = "stack/run-of";
/// Where the observability addon's Grafana looks for dashboards.
pub const GRAFANA_NAMESPACE: &str = "observability";

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read manifests {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{origin}: {problem}")]
    Invalid { origin: String, problem: String },
    #[error("cannot render manifest template {name}")]
    Render {
        name: String,
        #[source]
        source: Box<handlebars::RenderError>,
    },
}

/// One object the stack wants in the cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    pub kind: &'static Kind,
    pub stage: Stage,
    pub namespace: Option<String>,
    pub name: String,
    /// The whole object as it is applied.
    pub body: Value,
    /// Where it came from: a built-in template or `file (document n)`.
    pub origin: String,
}

impl Object {
    /// `k8s.NAMESPACE/KIND/NAME`, or `k8s.KIND/NAME` for cluster-wide kinds.
    pub fn address(&self) -> String {
        address(self.kind.kind, self.namespace.as_deref(), &self.name)
    }

    /// `NAMESPACE/NAME`, or `NAME`: what the API calls it within its kind.
    pub fn id(&self) -> String {
        id(self.namespace.as_deref(), &self.name)
    }
}

pub fn address(kind: &str, namespace: Option<&str>, name: &str) -> String {
    match namespace {
        Some(ns) => format!("k8s.{ns}/{kind}/{name}"),
        None => format!("k8s.{kind}/{name}"),
    }
}

/// The address of a live object of `kind` as the API returned it.
pub fn address_of(kind: &Kind, live: &Value) -> String {
    address(
        kind.kind,
        live["metadata"]["namespace"].as_str(),
        live["metadata"]["name"].as_str().unwrap_or_default(),
    )
}

pub fn id(namespace: Option<&str>, name: &str) -> String {
    match namespace {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_string(),
    }
}

/// A size as a Kubernetes quantity (`10Gi`, `512Mi`, or bytes).
pub fn quantity(size: crate::model::ByteSize) -> String {
    const MI: u64 = 1 << 20;
    const GI: u64 = 1 << 30;
    match size.0 {
        b if b % GI == 0 => format!("{}Gi", b / GI),
        b if b % MI == 0 => format!("{}Mi", b / MI),
        b => b.to_string(),
    }
}

/// The label selector that finds every object of a stack.
pub fn selector(stack: &str) -> String {
    format!("{MANAGED_BY}=stack,{PART_OF}={stack}")
}

/// The IngressClass: the stack's setting, else the one the microk8s
/// channel's ingress addon installs (NGINX `public` up to 1.34, Traefik from 1.35).
pub fn ingress_class(stack: &Stack) -> String {
    let explicit = stack.ingress.as_ref().and_then(|i| i.class_name.clone());
    let channel = stack.kubernetes.as_ref().map(|k| k.channel.as_str());
    explicit.unwrap_or_else(|| match channel.map(crate::microk8s::ingress_controller) {
        Some("traefik") => "traefik".to_string(),
        _ => "public".to_string(),
    })
}

/// The change kind of the stack's certificate authority (kept in state, not in the cluster).
pub const CA_KIND: &str = "k8s:stack:CertificateAuthority";
pub const CA_ADDRESS: &str = "k8s.stack/CertificateAuthority/ca";

/// The ConfigMap in the stack's namespace naming the kinds and objects it made.
pub fn inventory_name(stack: &str) -> String {
    format!("stack-{stack}-inventory")
}

/// The Secret holding the stack CA's wildcard certificate.
pub fn tls_secret_name(stack: &Stack) -> String {
    format!("{}-tls", stack.name)
}

/// The Secret holding the stack's CA itself.
pub fn ca_secret_name(stack: &str) -> String {
    format!("{stack}-ca")
}

fn b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// The stack's CA and wildcard certificate as the cluster keeps them (the
/// Secrets `ca_secret_name` and `tls_secret_name`), for a machine without
/// the state that made them.
pub fn material_from_secrets(ca: &Value, tls: &Value) -> Option<Material> {
    let field = |secret: &Value, key: &str| -> Option<String> {
        let encoded = secret["data"][key].as_str()?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .ok()?;
        String::from_utf8(bytes).ok()
    };
    Some(Material {
        domain: field(ca, "domain")?,
        ca_cert: field(ca, "tls.crt")?,
        ca_private_key: field(ca, "tls.key")?,
        cert: field(tls, "tls.crt")?,
        private_key: field(tls, "tls.key")?,
        cert_expires: field(ca, "expires")?.parse().ok()?,
    })
}

/// How a database's Service is reached: the names the database stage gives
/// its Service, its pods' labels and its ports.
struct DatabaseService {
    selector: BTreeMap<String, String>,
    /// The labels of the one Service to scrape, when they are not `selector`.
    monitor_selector: Option<BTreeMap<String, String>>,
    /// The name of that Service (the `service` label of its metrics).
    scraped_service: String,
    /// The pods behind each Service a TCP endpoint names, when that is not
    /// all of the database's (`selector`).
    tcp_selectors: BTreeMap<String, BTreeMap<String, String>>,
    endpoints: Vec<Endpoint>,
    metrics_port: &'static str,
    metrics_path: &'static str,
    /// The Secret whose `username`/`password` Prometheus must send.
    metrics_auth: Option<String>,
    panels: Vec<(&'static str, String, &'static str)>,
}

fn database_service(db: &Database) -> DatabaseService {
    let kind = format!("{:?}", db.kind).to_lowercase();
    let selector = BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), kind),
        ("app.kubernetes.io/instance".to_string(), db.name.clone()),
    ]);
    let http = |port| Endpoint {
        name: db.name.clone(),
        service: db.name.clone(),
        port,
        protocol: Protocol::Http,
    };
    let n = &db.name;
    match db.kind {
        DatabaseKind::Couchdb => {
            // The names the database phase gives its client Service and admin Secret.
            let mut client = selector.clone();
            client.insert("app.kubernetes.io/component".into(), "client".into());
            DatabaseService {
                selector,
                monitor_selector: Some(client),
                scraped_service: n.clone(),
                tcp_selectors: BTreeMap::new(),
                endpoints: vec![http(5984)],
                metrics_port: "http",
                metrics_path: "/_node/_local/_prometheus",
                metrics_auth: Some(format!("{n}-admin")),
                panels: vec![
                    ("HTTP requests", format!("sum(rate(couchdb_httpd_requests_total{{namespace=\"$ns\",service=\"{n}\"}}[5m]))"), "reqps"),
                    ("Document writes", format!("sum(rate(couchdb_database_writes_total{{namespace=\"$ns\",service=\"{n}\"}}[5m]))"), "ops"),
                    ("Replication jobs running", format!("sum(couchdb_couch_replicator_jobs_running{{namespace=\"$ns\",service=\"{n}\"}})"), "none"),
                    ("Replication jobs crashing", format!("sum(couchdb_couch_replicator_jobs_crashing{{namespace=\"$ns\",service=\"{n}\"}})"), "none"),
                ],
            }
        }
        DatabaseKind::Immudb => {
            // The names the database phase gives its Services: writes go to
            // the primary, reads to the replicas only; every pod is scraped
            // through the headless Service.
            let mut peers = selector.clone();
            peers.insert("app.kubernetes.io/component".into(), "peers".into());
            let grpc = |role: &str| Endpoint {
                name: format!("{n}-{role}"),
                service: format!("{n}-{role}"),
                port: 3322,
                protocol: Protocol::Tcp,
            };
            let scraped = format!("service=\"{n}-headless\"");
            DatabaseService {
                selector: selector.clone(),
                monitor_selector: Some(peers),
                scraped_service: format!("{n}-headless"),
                tcp_selectors: ["primary", "replica"]
                    .iter()
                    .zip(["write", "read"])
                    .map(|(role, service)| {
                        let mut pods = selector.clone();
                        pods.insert("app.kubernetes.io/component".into(), role.to_string());
                        (format!("{n}-{service}"), pods)
                    })
                    .collect(),
                endpoints: vec![
                    Endpoint {
                        service: format!("{n}-write"),
                        ..http(8080)
                    },
                    grpc("write"),
                    grpc("read"),
                ],
                metrics_port: "metrics",
                metrics_path: "/metrics",
                metrics_auth: None,
                panels: vec![
                    ("Last committed transaction", format!("max by (pod, db) (immudb_last_committed_trx_id{{namespace=\"$ns\",{scraped}}})"), "none"),
                    ("Replica lag (transactions)", format!("scalar(max(immudb_last_committed_trx_id{{namespace=\"$ns\",{scraped},db=\"defaultdb\",pod=\"{n}-primary-0\"}})) - max by (pod) (immudb_last_committed_trx_id{{namespace=\"$ns\",{scraped},db=\"defaultdb\",pod=~\"{n}-replica-[0-9]+\"}})"), "none"),
                ],
            }
        }
        DatabaseKind::Allegrograph => DatabaseService {
            // The client Service the database phase makes, over every instance.
            monitor_selector: Some({
                let mut client = selector.clone();
                client.insert("app.kubernetes.io/component".into(), "client".into());
                client
            }),
            selector,
            scraped_service: n.clone(),
            tcp_selectors: BTreeMap::new(),
            endpoints: vec![http(10035)],
            metrics_port: "http",
            metrics_path: "/metrics",
            metrics_auth: Some(format!("{n}-admin")),
            panels: Vec::new(),
        },
    }
}

#[derive(Serialize)]
struct NamespaceArgs<'a> {
    namespace: &'a str,
}

#[derive(Serialize)]
struct TlsSecretArgs<'a> {
    name: &'a str,
    namespace: &'a str,
    cert: String,
    private_key: String,
    ca_cert: String,
}

#[derive(Serialize)]
struct CaSecretArgs<'a> {
    name: &'a str,
    namespace: &'a str,
    ca_cert: String,
    ca_private_key: String,
    /// The domain the wildcard certificate was made for, base64.
    domain: String,
    /// When the wildcard certificate expires (Unix seconds), base64.
    expires: String,
}

#[derive(Serialize)]
struct IngressArgs<'a> {
    name: &'a str,
    namespace: &'a str,
    host: String,
    service: &'a str,
    port: u16,
    class_name: &'a str,
    tls_secret: &'a str,
    issuer: Option<&'a str>,
}

#[derive(Serialize)]
struct NodePortArgs<'a> {
    name: String,
    namespace: &'a str,
    /// A JSON object (valid YAML flow).
    selector: String,
    port: u16,
    /// A JSON number or string.
    target_port: String,
}

#[derive(Serialize)]
struct ServiceMonitorArgs<'a> {
    name: &'a str,
    namespace: &'a str,
    selector: String,
    port: &'a str,
    path: &'a str,
    basic_auth_secret: Option<&'a str>,
}

#[derive(Serialize)]
struct Panel {
    title: String,
    expr: String,
    unit: String,
    x: u32,
    y: u32,
}

#[derive(Serialize)]
struct DashboardArgs {
    title: String,
    uid: String,
    kind: String,
    panels: Vec<Panel>,
}

#[derive(Serialize)]
struct DashboardConfigMapArgs<'a> {
    name: String,
    namespace: &'a str,
    file: String,
    /// The dashboard JSON as a JSON string literal (valid YAML).
    dashboard: String,
}

const TEMPLATES: &[(&str, &str)] = &[
    (
        "namespace",
        include_str!("../../../manifests/namespace.yaml.hbs"),
    ),
    (
        "tls-secret",
        include_str!("../../../manifests/tls-secret.yaml.hbs"),
    ),
    (
        "ca-secret",
        include_str!("../../../manifests/ca-secret.yaml.hbs"),
    ),
    (
        "ingress",
        include_str!("../../../manifests/ingress.yaml.hbs"),
    ),
    (
        "node-port",
        include_str!("../../../manifests/node-port.yaml.hbs"),
    ),
    (
        "service-monitor",
        include_str!("../../../manifests/service-monitor.yaml.hbs"),
    ),
    (
        "dashboard",
        include_str!("../../../manifests/dashboard.yaml.hbs"),
    ),
    (
        "couchdb",
        include_str!("../../../manifests/couchdb.yaml.hbs"),
    ),
    ("immudb", include_str!("../../../manifests/immudb.yaml.hbs")),
    (
        "allegrograph",
        include_str!("../../../manifests/allegrograph.yaml.hbs"),
    ),
    (
        "dashboard-json",
        include_str!("../../../manifests/dashboard.json.hbs"),
    ),
];

/// The built-in templates, compiled once per render.
pub struct Renderer {
    registry: Handlebars<'static>,
}

impl Renderer {
    pub fn new() -> Self {
        let mut registry = Handlebars::new();
        registry.set_strict_mode(true);
        registry.register_escape_fn(handlebars::no_escape);
        for (name, text) in TEMPLATES {
            registry
                .register_template_string(name, *text)
                .expect("built-in manifest template compiles");
        }
        Renderer { registry }
    }

    fn text(&self, name: &str, args: &impl Serialize) -> Result<String, ManifestError> {
        self.registry
            .render(name, args)
            .map_err(|source| ManifestError::Render {
                name: format!("manifests/{name}"),
                source: Box::new(source),
            })
    }

    fn object(
        &self,
        name: &str,
        args: &impl Serialize,
        stage: Stage,
    ) -> Result<Object, ManifestError> {
        let origin = format!("built-in manifests/{name}.yaml.hbs");
        let text = self.text(name, args)?;
        let mut docs = parse_documents(&text, &origin)?;
        let body = docs.pop().expect("a built-in template renders one object");
        object_of(body, &origin, None, Some(stage))
    }

    /// The objects of a template that renders several documents.
    pub fn objects(
        &self,
        name: &str,
        args: &impl Serialize,
        stage: Stage,
    ) -> Result<Vec<Object>, ManifestError> {
        let origin = format!("built-in manifests/{name}.yaml.hbs");
        let text = self.text(name, args)?;
        parse_documents(&text, &origin)?
            .into_iter()
            .map(|body| object_of(body, &origin, None, Some(stage)))
            .collect()
    }
}

impl Default for Renderer {
    fn default() -> Self {
        Renderer::new()
    }
}

fn parse_documents(text: &str, origin: &str) -> Result<Vec<Value>, ManifestError> {
    let docs = yamljson::load(text).map_err(|e| ManifestError::Invalid {
        origin: origin.to_string(),
        problem: format!("not YAML: {e}"),
    })?;
    Ok(docs.iter().map(to_json).filter(|d| !d.is_null()).collect())
}

fn invalid(origin: &str, problem: impl Into<String>) -> ManifestError {
    ManifestError::Invalid {
        origin: origin.to_string(),
        problem: problem.into(),
    }
}

/// Reads an object's identity; `namespace` fills in a namespaced object's
/// missing namespace; `stage` overrides the kind's.
fn object_of(
    mut body: Value,
    origin: &str,
    namespace: Option<&str>,
    stage: Option<Stage>,
) -> Result<Object, ManifestError> {
    if !body.is_object() {
        return Err(invalid(
            origin,
            "not a Kubernetes object (a mapping with apiVersion, kind, metadata)",
        ));
    }
    let field = |body: &Value, name: &str| body[name].as_str().map(str::to_string);
    let api_version =
        field(&body, "apiVersion").ok_or_else(|| invalid(origin, "no `apiVersion`"))?;
    let kind_name = field(&body, "kind").ok_or_else(|| invalid(origin, "no `kind`"))?;
    let kind = kinds::find(&api_version, &kind_name).ok_or_else(|| {
        invalid(
            origin,
            format!(
                "stack does not apply {api_version} {kind_name}; it applies: {}",
                kinds::known()
            ),
        )
    })?;
    let name = body["metadata"]["name"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| invalid(origin, format!("{kind_name} without `metadata.name`")))?;
    let namespace = if kind.namespaced {
        let ns = body["metadata"]["namespace"].as_str().map(str::to_string);
        let ns = ns
            .or_else(|| namespace.map(str::to_string))
            .ok_or_else(|| invalid(origin, format!("{kind_name} {name} has no namespace")))?;
        body["metadata"]["namespace"] = json!(ns);
        Some(ns)
    } else {
        if body["metadata"].get("namespace").is_some() {
            return Err(invalid(
                origin,
                format!("{kind_name} {name} is cluster-wide: it takes no namespace"),
            ));
        }
        None
    };
    // The API server keeps only `data`: write it that way so what was
    // applied compares with what is read back.
    if kind.kind == "Secret" {
        if let Some(Value::Object(plain)) =
            body.as_object_mut().and_then(|b| b.remove("stringData"))
        {
            let data = body["data"].as_object().cloned().unwrap_or_default();
            let mut data: Map<String, Value> = data;
            for (key, value) in plain {
                let text = value
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| value.to_string());
                data.insert(key, json!(b64(&text)));
            }
            body["data"] = Value::Object(data);
        }
    }
    Ok(Object {
        kind,
        stage: stage.unwrap_or(kind.stage),
        namespace,
        name,
        body,
        origin: origin.to_string(),
    })
}

/// The files a manifests entry names: the file, or a folder's `.yaml`,
/// `.yml` and `.json` files (recursively, in name order).
fn manifest_files(path: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    let read = |source| ManifestError::Read {
        path: path.to_path_buf(),
        source,
    };
    if !path.is_dir() {
        std::fs::metadata(path).map_err(read)?;
        return Ok(vec![path.to_path_buf()]);
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(read)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(read)?;
    entries.sort();
    let mut files = Vec::new();
    for entry in entries {
        if entry.is_dir() {
            files.extend(manifest_files(&entry)?);
        } else if entry
            .extension()
            .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
        {
            files.push(entry);
        }
    }
    Ok(files)
}

fn user_objects(stack: &Stack, namespace: &str) -> Result<Vec<Object>, ManifestError> {
    let mut objects = Vec::new();
    let manifests = stack
        .kubernetes
        .as_ref()
        .map(|k| &k.manifests[..])
        .unwrap_or(&[]);
    for entry in manifests {
        for file in manifest_files(entry)? {
            let text = std::fs::read_to_string(&file).map_err(|source| ManifestError::Read {
                path: file.clone(),
                source,
            })?;
            let docs = parse_documents(&text, &file.display().to_string())?;
            for (i, doc) in docs.into_iter().enumerate() {
                let origin = format!("{} (document {})", file.display(), i + 1);
                objects.push(object_of(doc, &origin, Some(namespace), None)?);
            }
        }
    }
    Ok(objects)
}

/// Labels an object as the stack's.
fn label(object: &mut Object, stack: &Stack) {
    let metadata = &mut object.body["metadata"];
    if !metadata["labels"].is_object() {
        metadata["labels"] = json!({});
    }
    let labels = &mut metadata["labels"];
    labels[MANAGED_BY] = json!("stack");
    labels[PART_OF] = json!(stack.name);
    if let Some(expires) = stack.expires {
        labels[EXPIRES_LABEL] = json!(expires.to_string());
    }
    if let Some(run) = &stack.run {
        labels[RUN_LABEL] = json!(run.id);
        labels[RUN_OF_LABEL] = json!(run.of);
    }
}

/// The Service a TCP endpoint exposes: its pods' selector and target port.
fn service_target(
    endpoint: &Endpoint,
    namespace: &str,
    objects: &[Object],
    databases: &[(String, DatabaseService)],
) -> Option<(Value, Value)> {
    if let Some((_, db)) = databases.iter().find(|(name, _)| *name == endpoint.service) {
        return Some((json!(db.selector), json!(endpoint.port)));
    }
    if let Some(pods) = databases
        .iter()
        .find_map(|(_, db)| db.tcp_selectors.get(&endpoint.service))
    {
        return Some((json!(pods), json!(endpoint.port)));
    }
    let service = objects.iter().find(|o| {
        o.kind.kind == "Service"
            && o.name == endpoint.service
            && o.namespace.as_deref() == Some(namespace)
    })?;
    let port = service.body["spec"]["ports"]
        .as_array()?
        .iter()
        .find(|p| p["port"].as_u64() == Some(u64::from(endpoint.port)))?;
    Some((
        service.body["spec"]["selector"].clone(),
        port.get("targetPort")
            .cloned()
            .unwrap_or(json!(endpoint.port)),
    ))
}

/// Every object the stack wants, in stage order, labelled and type-checked.
/// `tls` is the stack CA's material when the stack's ingress uses it.
/// `contributed` renders the objects other phases bring (the database
/// clusters'), placed in their own stages.
pub fn render(
    stack: &Stack,
    tls: Option<&Material>,
    contributed: &dyn Fn(&Renderer) -> Result<Vec<Object>, ManifestError>,
) -> Result<Vec<Object>, ManifestError> {
    let Some(kubernetes) = &stack.kubernetes else {
        return Ok(Vec::new());
    };
    let renderer = Renderer::new();
    let ns = kubernetes.namespace.as_str();
    let mut objects = vec![renderer.object(
        "namespace",
        &NamespaceArgs { namespace: ns },
        Stage::Foundation,
    )?];
    objects.extend(user_objects(stack, ns)?);
    objects.extend(contributed(&renderer)?);

    let databases: Vec<(String, DatabaseService)> = stack
        .databases
        .iter()
        .map(|db| (db.name.clone(), database_service(db)))
        .collect();
    if let Some(ingress) = &stack.ingress {
        let secret = tls_secret_name(stack);
        let (tls_secret, issuer) = match &ingress.tls {
            TlsSource::StackCa => {
                if let Some(material) = tls {
                    objects.push(renderer.object(
                        "ca-secret",
                        &CaSecretArgs {
                            name: &ca_secret_name(&stack.name),
                            namespace: ns,
                            ca_cert: b64(&material.ca_cert),
                            ca_private_key: b64(&material.ca_private_key),
                            domain: b64(&material.domain),
                            expires: b64(&material.cert_expires.to_string()),
                        },
                        Stage::Foundation,
                    )?);
                    objects.push(renderer.object(
                        "tls-secret",
                        &TlsSecretArgs {
                            name: &secret,
                            namespace: ns,
                            cert: b64(&material.cert),
                            private_key: b64(&material.private_key),
                            ca_cert: b64(&material.ca_cert),
                        },
                        Stage::Foundation,
                    )?);
                }
                (secret.clone(), None)
            }
            TlsSource::Secret(name) => (name.clone(), None),
            TlsSource::Issuer(name) => (secret.clone(), Some(name.as_str())),
        };
        let class_name = ingress_class(stack);
        let endpoints = databases
            .iter()
            .flat_map(|(_, db)| db.endpoints.iter().cloned())
            .chain(ingress.endpoints.iter().cloned());
        for endpoint in endpoints {
            match endpoint.protocol {
                Protocol::Http => objects.push(renderer.object(
                    "ingress",
                    &IngressArgs {
                        name: &endpoint.name,
                        namespace: ns,
                        host: format!("{}.{}", endpoint.name, ingress.domain),
                        service: &endpoint.service,
                        port: endpoint.port,
                        class_name: &class_name,
                        tls_secret: &tls_secret,
                        issuer,
                    },
                    Stage::Ingress,
                )?),
                Protocol::Tcp => {
                    let (selector, target_port) = service_target(&endpoint, ns, &objects, &databases)
                        .ok_or_else(|| {
                            invalid(
                                &format!("{}: ingress.endpoints `{}`", stack.file.display(), endpoint.name),
                                format!(
                                    "no Service {} with port {} in namespace {ns} among the stack's manifests",
                                    endpoint.service, endpoint.port
                                ),
                            )
                        })?;
                    objects.push(renderer.object(
                        "node-port",
                        &NodePortArgs {
                            name: format!("{}-tcp", endpoint.name),
                            namespace: ns,
                            selector: selector.to_string(),
                            port: endpoint.port,
                            target_port: target_port.to_string(),
                        },
                        Stage::Ingress,
                    )?);
                }
            }
        }
    }
    if let Some(monitoring) = &stack.monitoring {
        for (db, (name, service)) in stack.databases.iter().zip(&databases) {
            if monitoring.service_monitors {
                objects.push(
                    renderer.object(
                        "service-monitor",
                        &ServiceMonitorArgs {
                            name,
                            namespace: ns,
                            selector: json!(service
                                .monitor_selector
                                .as_ref()
                                .unwrap_or(&service.selector))
                            .to_string(),
                            port: service.metrics_port,
                            path: service.metrics_path,
                            basic_auth_secret: service.metrics_auth.as_deref(),
                        },
                        Stage::Monitoring,
                    )?,
                );
            }
            if monitoring.dashboards {
                objects.push(dashboard(&renderer, stack, db, service)?);
            }
        }
    }

    for object in &mut objects {
        label(object, stack);
    }
    let mut seen = BTreeMap::new();
    for object in &objects {
        if let Some(first) = seen.insert(object.address(), object.origin.clone()) {
            return Err(invalid(
                &object.origin,
                format!("{} is declared twice (also in {first})", object.address()),
            ));
        }
        schema::check(object.kind, &object.body).map_err(|problem| {
            invalid(
                &object.origin,
                format!("{} {}: {problem}", object.kind.kind, object.id()),
            )
        })?;
    }
    objects.sort_by_key(|o| o.stage);
    // The namespace alone is nothing to deploy: a stack without objects of
    // its own leaves the cluster as the bootstrap made it.
    if objects.len() == 1 {
        objects.clear();
    }
    Ok(objects)
}

/// A dashboard written for this project: the database's pods (readiness,
/// CPU, memory, scrape health) and the kind's own metrics.
fn dashboard(
    renderer: &Renderer,
    stack: &Stack,
    db: &Database,
    service: &DatabaseService,
) -> Result<Object, ManifestError> {
    let ns = stack
        .kubernetes
        .as_ref()
        .map_or("", |k| k.namespace.as_str());
    let n = &db.name;
    let kind = format!("{:?}", db.kind).to_lowercase();
    let mut panels: Vec<(&str, String, &str)> = vec![
        ("Ready members", format!("kube_statefulset_status_replicas_ready{{namespace=\"{ns}\",statefulset=~\"{n}(-[a-z]+)?\"}}"), "none"),
        ("Scrape up", format!("up{{namespace=\"{ns}\",service=\"{}\"}}", service.scraped_service), "none"),
        ("CPU (cores)", format!("sum by (pod) (rate(container_cpu_usage_seconds_total{{namespace=\"{ns}\",pod=~\"{n}-([a-z]+-)?[0-9]+\",container!=\"\"}}[5m]))"), "none"),
        ("Memory", format!("sum by (pod) (container_memory_working_set_bytes{{namespace=\"{ns}\",pod=~\"{n}-([a-z]+-)?[0-9]+\",container!=\"\"}})"), "bytes"),
    ];
    panels.extend(
        service
            .panels
            .iter()
            .map(|(t, e, u)| (*t, e.replace("$ns", ns), *u)),
    );
    let encode = |s: &str| serde_json::to_string(s).expect("a string serialises");
    let args = DashboardArgs {
        title: encode(&format!("{} {kind} {n}", stack.name)),
        uid: encode(&format!("stack-{}-{n}", stack.name)),
        kind: encode(&kind),
        panels: panels
            .into_iter()
            .enumerate()
            .map(|(i, (title, expr, unit))| Panel {
                title: encode(title),
                expr: encode(&expr),
                unit: encode(unit),
                x: (i as u32 % 2) * 12,
                y: (i as u32 / 2) * 8,
            })
            .collect(),
    };
    let text = renderer.text("dashboard-json", &args)?;
    let parsed: Value = serde_json::from_str(&text).map_err(|e| {
        invalid(
            "built-in manifests/dashboard.json.hbs",
            format!("not JSON: {e}"),
        )
    })?;
    let dashboard = serde_json::to_string_pretty(&parsed).expect("JSON serialises");
    renderer.object(
        "dashboard",
        &DashboardConfigMapArgs {
            name: format!("{}-{n}-dashboard", stack.name),
            namespace: GRAFANA_NAMESPACE,
            file: format!("{}-{n}.json", stack.name),
            dashboard: encode(&dashboard),
        },
        Stage::Monitoring,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model;

    /// No objects of other phases.
    fn nothing(_: &Renderer) -> Result<Vec<Object>, ManifestError> {
        Ok(Vec::new())
    }

    /// Stand-in PEM text, so snapshots do not change with every run.
    fn material(domain: &str) -> Material {
        Material {
            domain: domain.to_string(),
            ca_cert: "CA CERTIFICATE".to_string(),
            ca_private_key: "CA KEY".to_string(),
            cert: "WILDCARD CERTIFICATE".to_string(),
            private_key: "WILDCARD KEY".to_string(),
            cert_expires: 1_900_000_000,
        }
    }

    fn example(name: &str) -> Stack {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("stacks")
            .join(name);
        model::load(&path).unwrap()
    }

    #[test]
    fn every_example_stack_renders_objects_of_their_kubernetes_types() {
        for file in ["local.yaml", "aws.yaml", "reference.yaml"] {
            let stack = example(file);
            let domain = stack.ingress.as_ref().map(|i| i.domain.clone()).unwrap();
            let objects = render(&stack, Some(&material(&domain)), &nothing).unwrap();
            assert!(objects.len() > 1, "{file} renders objects");
            for object in &objects {
                assert_eq!(
                    schema::check(object.kind, &object.body),
                    Ok(()),
                    "{}",
                    object.origin
                );
                assert_eq!(object.body["metadata"]["labels"][MANAGED_BY], "stack");
                assert_eq!(
                    object.body["metadata"]["labels"][PART_OF],
                    stack.name.as_str()
                );
            }
            let stages: Vec<Stage> = objects.iter().map(|o| o.stage).collect();
            assert!(
                stages.windows(2).all(|w| w[0] <= w[1]),
                "{file}: stage order"
            );
            let shown: Vec<(String, &Value)> =
                objects.iter().map(|o| (o.address(), &o.body)).collect();
            insta::assert_json_snapshot!(format!("objects-{file}"), shown);
        }
    }

    #[test]
    fn the_reference_stack_exposes_and_monitors_every_database() {
        let stack = example("reference.yaml");
        let objects = render(&stack, Some(&material("db.example.test")), &nothing).unwrap();
        let addresses: Vec<String> = objects.iter().map(Object::address).collect();
        for wanted in [
            "k8s.demo/Ingress/docs",
            "k8s.demo/Ingress/graph",
            "k8s.demo/Ingress/ledger",
            "k8s.demo/Service/ledger-write-tcp",
            "k8s.demo/Service/ledger-read-tcp",
            "k8s.demo/ServiceMonitor/ledger",
            "k8s.observability/ConfigMap/reference-docs-dashboard",
        ] {
            assert!(
                addresses.iter().any(|a| a == wanted),
                "{wanted} in {addresses:#?}"
            );
        }
        let dashboard = objects
            .iter()
            .find(|o| o.name == "reference-ledger-dashboard")
            .unwrap();
        let json: Value = serde_json::from_str(
            dashboard.body["data"]["reference-ledger.json"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        let exprs: Vec<&str> = json["panels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["targets"][0]["expr"].as_str().unwrap())
            .collect();
        assert!(
            exprs
                .iter()
                .any(|e| e.contains("immudb_last_committed_trx_id")),
            "{exprs:?}"
        );
        assert_eq!(
            dashboard.body["metadata"]["labels"]["grafana_dashboard"],
            "1"
        );
    }

    #[test]
    fn ingress_class_follows_the_channel_unless_set() {
        let mut stack = example("local.yaml");
        assert_eq!(ingress_class(&stack), "public");
        stack.kubernetes.as_mut().unwrap().channel = "1.35/stable".to_string();
        assert_eq!(ingress_class(&stack), "traefik");
        stack.ingress.as_mut().unwrap().class_name = Some("nginx".to_string());
        assert_eq!(ingress_class(&stack), "nginx");
    }

    #[test]
    fn a_broken_user_manifest_is_refused_naming_the_file_document_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let mut stack = example("local.yaml");
        let file = dir.path().join("app.yaml");
        let kubernetes = stack.kubernetes.as_mut().unwrap();
        kubernetes.manifests = vec![file.clone()];
        let cases = [
            ("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: b}\nspec:\n  prots: []\n",
             "(document 2): Service local/b: unknown field `spec.prots`"),
            ("apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w}\n",
             "(document 1): stack does not apply example.com/v1 Widget; it applies: v1 Namespace"),
            ("apiVersion: v1\nkind: Namespace\nmetadata: {name: x, namespace: y}\n",
             "Namespace x is cluster-wide: it takes no namespace"),
            ("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n",
             "k8s.local/ConfigMap/a is declared twice"),
        ];
        for (text, expected) in cases {
            std::fs::write(&file, text).unwrap();
            let err = render(&stack, None, &nothing).unwrap_err().to_string();
            assert!(err.contains(&file.display().to_string()), "{err}");
            assert!(err.contains(expected), "{expected} not in {err}");
        }
    }

    #[test]
    fn string_data_is_applied_as_data_the_way_the_server_keeps_it() {
        let body = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"},
                          "stringData": {"password": "hunter2"}});
        let object = object_of(body, "test", Some("ns"), None).unwrap();
        assert_eq!(object.body["data"]["password"], "aHVudGVyMg==");
        assert!(object.body.get("stringData").is_none());
        assert_eq!(object.namespace.as_deref(), Some("ns"));
    }
}
