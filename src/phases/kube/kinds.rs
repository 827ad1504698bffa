//! The Kubernetes kinds stack applies: where each lives in the API, which
//! stage it belongs to, what "ready" means for it, and which changes the
//! API server refuses in place. A kind not in this table is refused with
//! the list of those that are, rather than guessed at.

use kube::core::ApiResource;
use serde::Serialize;
use serde_json::Value;

use crate::engine::ReplaceRule;

/// The stages objects are applied in, each waiting for the one before to be ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Foundation,
    Workloads,
    /// The database clusters' own objects, applied by the database phase.
    Databases,
    Ingress,
    Monitoring,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Foundation => "namespaces and secrets",
            Stage::Workloads => "workloads",
            Stage::Databases => "databases",
            Stage::Ingress => "ingress",
            Stage::Monitoring => "monitoring",
        }
    }
}

/// What a kind's object must show to count as ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// Ready once the API server has it.
    Exists,
    /// StatefulSet, Deployment, DaemonSet: the rollout of the current generation is complete.
    Rollout,
    /// Job: succeeded (a failed Job fails the stage at once).
    Job,
    /// Ingress: the controller has given it an address.
    Address,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Kind {
    pub api_version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    pub namespaced: bool,
    pub stage: Stage,
    pub readiness: Readiness,
    /// Fields the API server refuses to change: a change to one replaces the object.
    pub immutable: &'static [&'static str],
}

const fn kind(
    api_version: &'static str,
    kind: &'static str,
    plural: &'static str,
    namespaced: bool,
    stage: Stage,
    readiness: Readiness,
    immutable: &'static [&'static str],
) -> Kind {
    Kind {
        api_version,
        kind,
        plural,
        namespaced,
        stage,
        readiness,
        immutable,
    }
}

use Readiness::*;
use Stage::*;

/// Fields fixed once set, by kind (what the API server answers 422 to).
const SELECTOR: &[&str] = &["spec.selector"];
/// What a StatefulSet's spec may change in place; everything else of it is
/// refused ("updates to statefulset spec for fields other than …").
const STATEFUL_SET_CHANGEABLE: &[&str] = &[
    "spec.replicas",
    "spec.ordinals",
    "spec.template",
    "spec.updateStrategy",
    "spec.persistentVolumeClaimRetentionPolicy",
    "spec.minReadySeconds",
];
const JOB: &[&str] = &["spec.selector", "spec.template", "spec.completionMode"];
const SERVICE: &[&str] = &["spec.clusterIP", "spec.clusterIPs"];
const CLAIM: &[&str] = &[
    "spec.accessModes",
    "spec.storageClassName",
    "spec.volumeName",
    "spec.selector",
];
const NONE: &[&str] = &[];

/// Every kind stack applies, in the order objects of one stage are shown.
#[rustfmt::skip]
pub const KINDS: &[Kind] = &[
    kind("v1", "Namespace", "namespaces", false, Foundation, Exists, NONE),
    kind("v1", "ServiceAccount", "serviceaccounts", true, Foundation, Exists, NONE),
    kind("v1", "Secret", "secrets", true, Foundation, Exists, NONE),
    kind("v1", "ConfigMap", "configmaps", true, Foundation, Exists, NONE),
    kind("v1", "PersistentVolumeClaim", "persistentvolumeclaims", true, Foundation, Exists, CLAIM),
    kind("rbac.authorization.k8s.io/v1", "Role", "roles", true, Foundation, Exists, NONE),
    kind("rbac.authorization.k8s.io/v1", "RoleBinding", "rolebindings", true, Foundation, Exists, &["roleRef"]),
    kind("v1", "Service", "services", true, Workloads, Exists, SERVICE),
    kind("apps/v1", "StatefulSet", "statefulsets", true, Workloads, Rollout, NONE),
    kind("apps/v1", "Deployment", "deployments", true, Workloads, Rollout, SELECTOR),
    kind("apps/v1", "DaemonSet", "daemonsets", true, Workloads, Rollout, SELECTOR),
    kind("batch/v1", "Job", "jobs", true, Workloads, Job, JOB),
    kind("policy/v1", "PodDisruptionBudget", "poddisruptionbudgets", true, Workloads, Exists, NONE),
    kind("networking.k8s.io/v1", "Ingress", "ingresses", true, Ingress, Address, NONE),
    kind("monitoring.coreos.com/v1", "ServiceMonitor", "servicemonitors", true, Monitoring, Exists, NONE),
];

/// The CRD whose presence says the Prometheus Operator is installed.
pub const SERVICE_MONITOR_CRD: &str = "servicemonitors.monitoring.coreos.com";

/// The kind of `apiVersion` and `kind`, when stack applies it.
pub fn find(api_version: &str, kind: &str) -> Option<&'static Kind> {
    KINDS
        .iter()
        .find(|k| k.api_version == api_version && k.kind == kind)
}

/// The names of every kind, for messages.
pub fn known() -> String {
    KINDS
        .iter()
        .map(|k| format!("{} {}", k.api_version, k.kind))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Kind {
    /// The changes to an object of this kind that the API server refuses in
    /// place, so that the object is deleted and made again: its fixed
    /// fields, all of a StatefulSet's spec but what may change, a Secret's
    /// type, and the contents of a Secret or ConfigMap that is (or was
    /// applied as) `immutable: true`.
    pub fn replace_rules(&self, body: &Value, recorded: Option<&Value>) -> Vec<ReplaceRule> {
        let mut rules: Vec<ReplaceRule> =
            self.immutable.iter().map(|p| ReplaceRule::at(p)).collect();
        let immutable = [Some(body), recorded]
            .into_iter()
            .flatten()
            .any(|b| b["immutable"] == Value::Bool(true));
        match self.kind {
            "StatefulSet" => rules.push(ReplaceRule::under_except("spec", STATEFUL_SET_CHANGEABLE)),
            "Secret" => {
                rules.push(ReplaceRule::at("type"));
                if immutable {
                    rules.extend(["data", "stringData", "immutable"].map(ReplaceRule::at));
                }
            }
            "ConfigMap" if immutable => {
                rules.extend(["data", "binaryData", "immutable"].map(ReplaceRule::at));
            }
            _ => {}
        }
        rules
    }

    /// The API group, empty for the core group.
    pub fn group(&self) -> &'static str {
        self.api_version
            .rsplit_once('/')
            .map_or("", |(group, _)| group)
    }

    pub fn resource(&self) -> ApiResource {
        ApiResource {
            group: self.group().to_string(),
            version: self
                .api_version
                .rsplit('/')
                .next()
                .unwrap_or(self.api_version)
                .to_string(),
            api_version: self.api_version.to_string(),
            kind: self.kind.to_string(),
            plural: self.plural.to_string(),
        }
    }

    /// The kind of a plan's change: `k8s:apps/v1:StatefulSet`.
    pub fn change_kind(&self) -> String {
        format!("{CHANGE_KIND_PREFIX}{}:{}", self.api_version, self.kind)
    }

    /// A kind from a change's kind.
    pub fn of_change(change_kind: &str) -> Option<&'static Kind> {
        let rest = change_kind.strip_prefix(CHANGE_KIND_PREFIX)?;
        let (api_version, kind) = rest.rsplit_once(':')?;
        find(api_version, kind)
    }
}

/// Every change of the Kubernetes stages has a kind starting with this.
pub const CHANGE_KIND_PREFIX: &str = "k8s:";

/// The change kind of a Namespace.
pub const NAMESPACE_KIND: &str = "k8s:v1:Namespace";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::FieldPath;

    #[test]
    fn change_kinds_round_trip_and_groups_split() {
        for kind in KINDS {
            assert_eq!(Kind::of_change(&kind.change_kind()), Some(kind));
        }
        let sts = find("apps/v1", "StatefulSet").unwrap();
        assert_eq!(
            (sts.group(), sts.resource().version.as_str()),
            ("apps", "v1")
        );
        assert_eq!(find("v1", "Secret").unwrap().group(), "");
        let body = serde_json::json!({"spec": {}});
        let fixed = |kind: &Kind, body: &Value, path: &str| {
            kind.replace_rules(body, None)
                .iter()
                .any(|r| r.matches(&FieldPath::parse(path)))
        };
        assert!(fixed(sts, &body, "spec.serviceName"));
        assert!(fixed(sts, &body, "spec.selector.matchLabels.app"));
        assert!(fixed(sts, &body, "spec.volumeClaimTemplates[data].spec"));
        assert!(fixed(sts, &body, "spec.revisionHistoryLimit"));
        assert!(!fixed(sts, &body, "spec.replicas"));
        assert!(!fixed(
            sts,
            &body,
            "spec.template.spec.containers[web].image"
        ));
        let secret = find("v1", "Secret").unwrap();
        assert!(fixed(secret, &body, "type"));
        assert!(!fixed(secret, &body, "data.key"));
        let sealed = serde_json::json!({"immutable": true});
        assert!(fixed(secret, &sealed, "data.key"));
        let config_map = find("v1", "ConfigMap").unwrap();
        assert!(fixed(config_map, &sealed, "data.key"));
        assert!(!fixed(config_map, &body, "data.key"));
    }
}
