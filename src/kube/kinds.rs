//! The Kubernetes kinds stack applies: where each lives in the API, which
//! stage it belongs to, and what "ready" means for it. A kind not in this
//! table is refused with the list of those that are, rather than guessed at.

use kube::core::ApiResource;
use serde::Serialize;

/// The stages objects are applied in, each waiting for the one before to be ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Foundation,
    Databases,
    Ingress,
    Monitoring,
}

impl Stage {
    pub const ALL: [Stage; 4] = [
        Stage::Foundation,
        Stage::Databases,
        Stage::Ingress,
        Stage::Monitoring,
    ];

    /// 1 to 4, as plans show it.
    pub fn number(self) -> usize {
        self as usize + 1
    }

    pub fn name(self) -> &'static str {
        match self {
            Stage::Foundation => "namespaces and secrets",
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
const STATEFUL_SET: &[&str] = &[
    "spec.selector",
    "spec.serviceName",
    "spec.volumeClaimTemplates",
    "spec.podManagementPolicy",
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
    kind("v1", "Service", "services", true, Databases, Exists, SERVICE),
    kind("apps/v1", "StatefulSet", "statefulsets", true, Databases, Rollout, STATEFUL_SET),
    kind("apps/v1", "Deployment", "deployments", true, Databases, Rollout, SELECTOR),
    kind("apps/v1", "DaemonSet", "daemonsets", true, Databases, Rollout, SELECTOR),
    kind("batch/v1", "Job", "jobs", true, Databases, Job, JOB),
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
    /// Whether a change to the field at `path` (as plans print paths) needs a new object.
    pub fn is_immutable(&self, path: &str) -> bool {
        self.immutable.iter().any(|fixed| {
            path == *fixed
                || path
                    .strip_prefix(fixed)
                    .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
        })
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

/// Every change of the Kubernetes phase has a kind starting with this.
pub const CHANGE_KIND_PREFIX: &str = "k8s:";

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(sts.is_immutable("spec.serviceName"));
        assert!(sts.is_immutable("spec.selector.matchLabels.app"));
        assert!(sts.is_immutable("spec.volumeClaimTemplates[data].spec"));
        assert!(!sts.is_immutable("spec.serviceNameX"));
        assert!(!sts.is_immutable("spec.replicas"));
    }
}
