//! Reading the stack's objects back: one LIST per kind, by the stack's
//! labels, for the kinds the stack declares, the kinds its inventory in the
//! cluster names and the kinds its state records (every known kind when
//! destroying), plus a GET for each recorded object the LISTs did not find
//! (its labels may have been changed by hand). Each live object is projected
//! onto what the stack wants of it (`drift`), so only the fields the stack
//! sets can differ.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Value};

use super::cluster::{Cluster, ClusterError};
use super::drift;
use super::kinds::{self, Kind};
use super::manifest::{self, Object};
use crate::engine::{Handling, Observed};
use crate::state::State;

/// What a refresh read.
#[derive(Debug, Default)]
pub struct Refreshed {
    pub observed: Vec<Observed>,
    /// Every live object of the stack's, whole, by address.
    pub live: BTreeMap<String, Value>,
    /// Objects being deleted (a `deletionTimestamp`, as in a Terminating
    /// namespace): not observed, since they are going, but named here.
    pub terminating: BTreeMap<String, String>,
    /// Whether the Prometheus Operator's CRDs are installed.
    pub monitoring: bool,
    /// The kinds the inventory in the cluster names.
    pub inventory_kinds: BTreeSet<String>,
    /// Whether the inventory itself is there.
    pub inventory: bool,
    /// The kinds that were listed (those the cluster serves).
    pub kinds_listed: BTreeSet<&'static str>,
    /// Requests the refresh sent.
    pub requests: usize,
}

/// How a live or desired object of `kind` is planned: after its namespace
/// is made (and removed before it), its Secret data never shown.
pub fn handling(kind: &Kind, namespace: Option<&str>) -> Handling {
    let mut handling = Handling {
        read_whole: true,
        ..Handling::default()
    };
    if let Some(ns) = namespace {
        handling = handling.waits_for([manifest::address("Namespace", None, ns)]);
    }
    if kind.kind == "Secret" {
        handling = handling.sensitive(&["data", "stringData"]);
    }
    handling
}

pub struct Read<'a> {
    pub cluster: &'a Cluster,
    pub stack: &'a str,
    pub namespace: &'a str,
    pub objects: &'a [Object],
    /// The state's records of the Kubernetes stages.
    pub records: &'a State,
    /// List every kind stack knows, not only those in use (for a destroy
    /// and for the last check of `down`).
    pub every_kind: bool,
}

impl Read<'_> {
    pub async fn run(&self) -> Result<Refreshed, ClusterError> {
        let cluster = self.cluster;
        let before = cluster.requests();
        let monitoring = cluster.has_crd(kinds::SERVICE_MONITOR_CRD).await?;
        let mut wanted: Vec<&'static Kind> = self.objects.iter().map(|o| o.kind).collect();
        let inventory = cluster
            .get(
                kinds::find("v1", "ConfigMap").expect("ConfigMap is a known kind"),
                Some(self.namespace),
                &manifest::inventory_name(self.stack),
            )
            .await?;
        let mut inventory_kinds = BTreeSet::new();
        if let Some(inventory) = &inventory {
            let listed = inventory["data"]["kinds"].as_str().unwrap_or_default();
            for line in listed.lines() {
                let Some((api_version, kind)) = line.rsplit_once(' ') else {
                    continue;
                };
                if let Some(kind) = kinds::find(api_version, kind) {
                    inventory_kinds.insert(line.to_string());
                    wanted.push(kind);
                }
            }
        }
        wanted.extend(
            self.records
                .resources
                .iter()
                .filter_map(|r| Kind::of_change(&r.kind)),
        );
        if self.every_kind {
            wanted.extend(kinds::KINDS.iter());
        }
        let desired: BTreeMap<String, &Object> =
            self.objects.iter().map(|o| (o.address(), o)).collect();
        let mut refreshed = Refreshed {
            monitoring,
            inventory_kinds,
            inventory: inventory.is_some(),
            ..Refreshed::default()
        };
        let selector = manifest::selector(self.stack);
        let mut listed: BTreeSet<&'static str> = BTreeSet::new();
        for kind in wanted {
            if !listed.insert(kind.plural) || (kind.kind == "ServiceMonitor" && !monitoring) {
                continue;
            }
            let Some(items) = cluster.list(kind, &selector).await? else {
                continue;
            };
            refreshed.kinds_listed.insert(kind.kind);
            for item in items {
                self.take(kind, item, &desired, &mut refreshed);
            }
        }
        // A recorded object the LISTs did not find may only have lost the
        // stack's labels: read it by name, so a relabelling is drift, not a loss.
        for record in &self.records.resources {
            let (Some(kind), Some(id)) = (Kind::of_change(&record.kind), record.id.as_deref())
            else {
                continue;
            };
            if refreshed.live.contains_key(&record.address)
                || refreshed.terminating.contains_key(&record.address)
                || (kind.kind == "ServiceMonitor" && !monitoring)
            {
                continue;
            }
            let (namespace, name) = match id.split_once('/') {
                Some((ns, name)) => (Some(ns), name),
                None => (None, id),
            };
            if let Some(item) = cluster.get(kind, namespace, name).await? {
                self.take(kind, item, &desired, &mut refreshed);
            }
        }
        // What is in a namespace that is being deleted goes with it.
        let going: BTreeSet<String> = refreshed
            .terminating
            .keys()
            .filter_map(|a| a.strip_prefix("k8s.Namespace/").map(str::to_string))
            .collect();
        if !going.is_empty() {
            let since: BTreeMap<String, String> = going
                .iter()
                .map(|ns| {
                    let at = &refreshed.terminating[&manifest::address("Namespace", None, ns)];
                    (ns.clone(), at.clone())
                })
                .collect();
            let (inside, kept): (Vec<Observed>, Vec<Observed>) =
                std::mem::take(&mut refreshed.observed)
                    .into_iter()
                    .partition(|o| {
                        o.id.split_once('/')
                            .is_some_and(|(ns, _)| going.contains(ns))
                    });
            refreshed.observed = kept;
            for object in inside {
                let ns = object
                    .id
                    .split_once('/')
                    .map_or("", |(ns, _)| ns)
                    .to_string();
                refreshed.live.remove(&object.address);
                refreshed
                    .terminating
                    .insert(object.address, since.get(&ns).cloned().unwrap_or_default());
            }
        }
        refreshed.requests = cluster.requests() - before;
        Ok(refreshed)
    }

    /// Adds one live object to what was read.
    fn take(
        &self,
        kind: &'static Kind,
        item: Value,
        desired: &BTreeMap<String, &Object>,
        refreshed: &mut Refreshed,
    ) {
        let name = item["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let namespace = item["metadata"]["namespace"].as_str().map(str::to_string);
        if kind.kind == "ConfigMap" && name == manifest::inventory_name(self.stack) {
            return;
        }
        let address = manifest::address_of(kind, &item);
        if let Some(since) = item["metadata"]["deletionTimestamp"].as_str() {
            refreshed.terminating.insert(address, since.to_string());
            return;
        }
        let recorded = self.records.get(&address).map(|r| &r.attrs);
        let attrs = match desired.get(&address) {
            Some(object) => drift::project_both(&item, &object.body, recorded),
            None => json!({
                "apiVersion": kind.api_version,
                "kind": kind.kind,
                "metadata": {
                    "name": name,
                    "namespace": namespace,
                    "labels": item["metadata"]["labels"],
                },
            }),
        };
        refreshed.observed.push(Observed {
            address: address.clone(),
            kind: kind.change_kind(),
            id: manifest::id(namespace.as_deref(), &name),
            attrs,
            handling: handling(kind, namespace.as_deref()),
        });
        refreshed.live.insert(address, item);
    }
}
