//! Templates compiled into the binary (`cloud-init/`), rendered in strict
//! mode from one typed argument struct per template. A stack may name its own
//! file in place of a built-in template; it gets the same arguments, also in
//! strict mode.

use std::path::{Path, PathBuf};

use handlebars::Handlebars;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("cannot render template {name}")]
    Render {
        name: String,
        #[source]
        source: Box<handlebars::RenderError>,
    },
    #[error("template {} does not compile", path.display())]
    Compile {
        path: PathBuf,
        #[source]
        source: Box<handlebars::TemplateError>,
    },
    #[error("cannot read template {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One `/etc/hosts` line.
#[derive(Debug, Clone, Serialize)]
pub struct HostEntry {
    pub address: String,
    pub hostname: String,
}

/// How cloud-init installs microk8s.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Microk8sInstall {
    /// The snap channel, `1.32/stable`.
    pub channel: String,
    /// Install `open-iscsi` and enable `iscsid` (openebs needs it).
    pub iscsi: bool,
}

/// Arguments of `cloud-init/user-data.yaml.hbs` (and of a stack's own user-data template).
#[derive(Debug, Clone, Serialize)]
pub struct UserData {
    pub stack: String,
    pub hostname: String,
    pub user: String,
    pub authorized_key: String,
    /// The node's ed25519 host key in OpenSSH form, indented for a YAML block.
    pub host_private_indented: String,
    pub host_public: String,
    /// Every node of the stack, when the addresses are known before boot.
    pub hosts: Vec<HostEntry>,
    /// Whether cloud-init installs microk8s, and how.
    pub install_microk8s: bool,
    pub microk8s: Microk8sInstall,
    /// Each command as a YAML (JSON) string literal.
    pub runcmd: Vec<String>,
    /// The file written when the node's part is done.
    pub done_marker: &'static str,
}

const USER_DATA: &str = "cloud-init/user-data.yaml.hbs";

fn registry() -> Handlebars<'static> {
    let mut registry = Handlebars::new();
    registry.set_strict_mode(true);
    registry.register_escape_fn(handlebars::no_escape);
    registry
}

/// Renders the built-in user-data, or the stack's own template at `custom`.
pub fn user_data(args: &UserData, custom: Option<&Path>) -> Result<String, TemplateError> {
    let mut registry = registry();
    let name = match custom {
        None => {
            registry
                .register_template_string(
                    USER_DATA,
                    include_str!("../cloud-init/user-data.yaml.hbs"),
                )
                .expect("built-in template compiles");
            USER_DATA.to_string()
        }
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| TemplateError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            let name = path.display().to_string();
            registry
                .register_template_string(&name, text)
                .map_err(|source| TemplateError::Compile {
                    path: path.to_path_buf(),
                    source: Box::new(source),
                })?;
            name
        }
    };
    registry
        .render(&name, args)
        .map_err(|source| TemplateError::Render {
            name,
            source: Box::new(source),
        })
}
