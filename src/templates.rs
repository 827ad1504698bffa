//! Templates compiled into the binary (`cloud-init/`), rendered in strict
//! mode from one typed argument struct per template.

use handlebars::Handlebars;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("cannot render template {name}")]
    Render {
        name: &'static str,
        #[source]
        source: Box<handlebars::RenderError>,
    },
}

/// Arguments of `cloud-init/ec2-user-data.yaml.hbs`.
#[derive(Debug, Serialize)]
pub struct Ec2UserData<'a> {
    pub stack: &'a str,
    pub hostname: &'a str,
    pub public_key: &'a str,
    /// Each command as a YAML (JSON) string literal.
    pub runcmd: Vec<String>,
}

const EC2_USER_DATA: &str = "ec2-user-data";
const KVM_USER_DATA: &str = "kvm-user-data";

fn registry() -> Handlebars<'static> {
    let mut registry = Handlebars::new();
    registry.set_strict_mode(true);
    registry.register_escape_fn(handlebars::no_escape);
    registry
        .register_template_string(
            EC2_USER_DATA,
            include_str!("../cloud-init/ec2-user-data.yaml.hbs"),
        )
        .expect("built-in template compiles");
    registry
        .register_template_string(
            KVM_USER_DATA,
            include_str!("../cloud-init/kvm-user-data.yaml.hbs"),
        )
        .expect("built-in template compiles");
    registry
}

pub fn kvm_user_data(
    args: &crate::provider::kvm::seed::KvmUserData,
) -> Result<String, TemplateError> {
    registry()
        .render(KVM_USER_DATA, args)
        .map_err(|source| TemplateError::Render {
            name: KVM_USER_DATA,
            source: Box::new(source),
        })
}

pub fn ec2_user_data(args: &Ec2UserData) -> Result<String, TemplateError> {
    registry()
        .render(EC2_USER_DATA, args)
        .map_err(|source| TemplateError::Render {
            name: EC2_USER_DATA,
            source: Box::new(source),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ec2_user_data_snapshot() {
        let rendered = ec2_user_data(&Ec2UserData {
            stack: "demo",
            hostname: "demo-control-0",
            public_key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDlcRDUzHuYNBQ2XzLkqM1twyC5Bj1MZ4bc0PiTjxFau stack-demo",
            runcmd: Vec::new(),
        })
        .unwrap();
        insta::assert_snapshot!(rendered);
    }
}
