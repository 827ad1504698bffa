//! Every object is checked against its Kubernetes type before it is sent:
//! it must deserialise into the k8s-openapi type of its kind, and every
//! field it has must survive the round trip, so a misspelt field
//! (`replica:`) is an error here rather than silently dropped by the API server.

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{
    ConfigMap, Namespace, PersistentVolumeClaim, Secret, Service, ServiceAccount,
};
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::kinds::Kind;

/// The part of the Prometheus Operator's ServiceMonitor that stack writes
/// (the CRD has no k8s-openapi type); anything else is refused.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceMonitor {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: ServiceMonitorSpec,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceMonitorSpec {
    pub selector: LabelSelector,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<NamespaceSelector>,
    pub endpoints: Vec<MonitorEndpoint>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NamespaceSelector {
    pub match_names: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MonitorEndpoint {
    pub port: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basic_auth: Option<BasicAuth>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BasicAuth {
    pub username: SecretKey,
    pub password: SecretKey,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretKey {
    pub name: String,
    pub key: String,
}

fn round_trip<T: DeserializeOwned + Serialize>(body: &Value) -> Result<Value, String> {
    let typed: T = serde_json::from_value(body.clone()).map_err(|e| e.to_string())?;
    Ok(serde_json::to_value(&typed).expect("a typed object serialises"))
}

/// Paths in `input` that `output` lost.
fn lost(path: &str, input: &Value, output: &Value, out: &mut Vec<String>) {
    match (input, output) {
        (Value::Object(inp), Value::Object(outp)) => {
            for (key, value) in inp {
                let child = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match outp.get(key) {
                    None if !value.is_null() => out.push(child),
                    None => {}
                    Some(kept) => lost(&child, value, kept, out),
                }
            }
        }
        (Value::Array(inp), Value::Array(outp)) => {
            for (i, (value, kept)) in inp.iter().zip(outp).enumerate() {
                lost(&format!("{path}[{i}]"), value, kept, out);
            }
        }
        _ => {}
    }
}

/// Checks `body` against the type of `kind`: the fields it does not know,
/// or why it does not deserialise.
pub fn check(kind: &Kind, body: &Value) -> Result<(), String> {
    let typed = match kind.kind {
        "Namespace" => round_trip::<Namespace>(body),
        "ServiceAccount" => round_trip::<ServiceAccount>(body),
        "Secret" => round_trip::<Secret>(body),
        "ConfigMap" => round_trip::<ConfigMap>(body),
        "PersistentVolumeClaim" => round_trip::<PersistentVolumeClaim>(body),
        "Role" => round_trip::<Role>(body),
        "RoleBinding" => round_trip::<RoleBinding>(body),
        "Service" => round_trip::<Service>(body),
        "StatefulSet" => round_trip::<StatefulSet>(body),
        "Deployment" => round_trip::<Deployment>(body),
        "DaemonSet" => round_trip::<DaemonSet>(body),
        "Job" => round_trip::<Job>(body),
        "PodDisruptionBudget" => round_trip::<PodDisruptionBudget>(body),
        "Ingress" => round_trip::<Ingress>(body),
        "ServiceMonitor" => round_trip::<ServiceMonitor>(body),
        other => Err(format!("no type known for kind {other}")),
    }?;
    let mut unknown = Vec::new();
    lost("", body, &typed, &mut unknown);
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "unknown field{} {}",
            if unknown.len() == 1 { "" } else { "s" },
            unknown
                .iter()
                .map(|p| format!("`{p}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::phases::kube::kinds::find;
    use serde_json::json;

    #[test]
    fn unknown_fields_and_wrong_types_are_refused() {
        let sts = find("apps/v1", "StatefulSet").unwrap();
        let good = json!({
            "apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": "web"},
            "spec": {"replicas": 2, "serviceName": "web",
                     "selector": {"matchLabels": {"app": "web"}},
                     "template": {"metadata": {"labels": {"app": "web"}},
                                  "spec": {"containers": [{"name": "web", "image": "nginx"}]}}}
        });
        assert_eq!(check(sts, &good), Ok(()));
        let mut typo = good.clone();
        typo["spec"]["replica"] = json!(3);
        typo["spec"]["template"]["spec"]["containers"][0]["imag"] = json!("x");
        assert_eq!(
            check(sts, &typo),
            Err(
                "unknown fields `spec.template.spec.containers[0].imag`, `spec.replica`"
                    .to_string()
            )
        );
        let mut wrong = good;
        wrong["spec"]["replicas"] = json!("three");
        assert!(check(sts, &wrong).unwrap_err().contains("invalid type"));
    }
}
