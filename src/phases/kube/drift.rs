//! Drift without false positives: a live object is compared with the desired
//! one only on the fields the stack sets. The live object is projected onto
//! the desired object's shape, so what the API server fills in (defaults,
//! `clusterIP`, `status`, `managedFields`) never shows as a change, and
//! quantities are compared by value (`1024Mi` is `1Gi`). A field the stack
//! owns (its entry in `managedFields`) that the server left out is its zero
//! value: the server omits `false`, `0`, `""` and `[]` (Go's `omitempty`).
//! Who changed a field is read from `managedFields`.

use serde_json::{Map, Value};

use crate::engine::{FieldPath, Segment};

/// The field manager stack applies with.
pub const FIELD_MANAGER: &str = "stack";

/// The fields stack's own apply owns in a live object (`fieldsV1`).
pub fn owned_by_stack(live: &Value) -> Option<&Value> {
    live["metadata"]["managedFields"]
        .as_array()?
        .iter()
        .find(|e| e["manager"] == FIELD_MANAGER && e["operation"] == "Apply")
        .map(|e| &e["fieldsV1"])
}

/// The list element of `live` that `wanted` stands for: the one with the same
/// `name` when elements have names, else the one at the same index.
fn counterpart<'a>(live: &'a [Value], wanted: &Value, index: usize) -> Option<&'a Value> {
    match wanted.get("name").and_then(Value::as_str) {
        Some(name) => live
            .iter()
            .find(|l| l.get("name").and_then(Value::as_str) == Some(name)),
        None => live.get(index),
    }
}

/// The `k:{…}` member of a field set that stands for list element `item`:
/// every key it names has that value in the item (the API server keys list
/// elements by their merge keys: a name, a mountPath, a port and protocol).
fn keyed<'a>(fields: &'a Value, item: &Value) -> Option<&'a Value> {
    fields.as_object()?.iter().find_map(|(key, node)| {
        let keys: Map<String, Value> = serde_json::from_str(key.strip_prefix("k:")?).ok()?;
        keys.iter()
            .all(|(k, v)| item.get(k).is_some_and(|have| same(have, v)))
            .then_some(node)
    })
}

/// Equal, or the same number however it is written.
fn same(have: &Value, want: &Value) -> bool {
    have == want || same_number(have, want)
}

/// What the server leaves out of an object when it is the value.
fn is_zero(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
    }
}

/// `live` cut down to the paths `desired` has; `owned` is the part of
/// stack's field set at this place. A field the live object lacks is left
/// out, so the difference shows as the field going missing, unless stack
/// owns it and wants its zero value, which the server does not store.
pub fn project(live: &Value, desired: &Value, owned: Option<&Value>) -> Value {
    match (live, desired) {
        (Value::Object(live), Value::Object(desired)) => Value::Object(
            desired
                .iter()
                .filter_map(|(key, want)| {
                    let owned = owned.and_then(|o| o.get(format!("f:{key}")));
                    match live.get(key) {
                        Some(have) => Some((key.clone(), project(have, want, owned))),
                        None if owned.is_some() && is_zero(want) => {
                            Some((key.clone(), want.clone()))
                        }
                        None => None,
                    }
                })
                .collect::<Map<_, _>>(),
        ),
        (Value::Array(live), Value::Array(desired))
            if !desired.is_empty() && desired.iter().all(Value::is_object) =>
        {
            Value::Array(
                desired
                    .iter()
                    .enumerate()
                    .filter_map(|(i, want)| {
                        let have = counterpart(live, want, i)?;
                        Some(project(have, want, owned.and_then(|o| keyed(o, have))))
                    })
                    .collect(),
            )
        }
        (Value::String(have), Value::String(want)) if same_quantity(have, want) => {
            Value::String(want.clone())
        }
        (have, want) if same_number(have, want) => want.clone(),
        (have, _) => have.clone(),
    }
}

/// `live` cut down to the paths `desired` has or `recorded` (what was last
/// applied) had: a field the stack stopped setting is still compared.
pub fn project_both(live: &Value, desired: &Value, recorded: Option<&Value>) -> Value {
    let owned = owned_by_stack(live);
    let wanted = project(live, desired, owned);
    match recorded {
        Some(recorded) => overlay(project(live, recorded, owned), wanted),
        None => wanted,
    }
}

/// `over` laid over `under`: maps merged key by key, list elements by
/// name (or place), anything else from `over`.
fn overlay(under: Value, over: Value) -> Value {
    match (under, over) {
        (Value::Object(mut under), Value::Object(over)) => {
            for (key, value) in over {
                let merged = match under.remove(&key) {
                    Some(old) => overlay(old, value),
                    None => value,
                };
                under.insert(key, merged);
            }
            Value::Object(under)
        }
        (Value::Array(under), Value::Array(over)) if over.iter().all(Value::is_object) => {
            Value::Array(
                over.into_iter()
                    .enumerate()
                    .map(|(i, item)| match counterpart(&under, &item, i) {
                        Some(old) => overlay(old.clone(), item),
                        None => item,
                    })
                    .collect(),
            )
        }
        (_, over) => over,
    }
}

/// `2` and `2.0`, or `"80"` where 80 was meant: the API server's spelling of the same value.
fn same_number(have: &Value, want: &Value) -> bool {
    match (have.as_f64(), want.as_f64()) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

/// The value of a Kubernetes quantity (`500m`, `1Gi`, `2e3`).
fn quantity(text: &str) -> Option<f64> {
    const SUFFIXES: &[(&str, f64)] = &[
        ("Ki", 1024.0),
        ("Mi", 1048576.0),
        ("Gi", 1073741824.0),
        ("Ti", 1099511627776.0),
        ("Pi", 1125899906842624.0),
        ("Ei", 1152921504606846976.0),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
    ];
    for (suffix, factor) in SUFFIXES {
        if let Some(number) = text.strip_suffix(suffix) {
            return number.parse::<f64>().ok().map(|n| n * factor);
        }
    }
    text.parse::<f64>().ok()
}

fn same_quantity(have: &str, want: &str) -> bool {
    have != want
        && want.starts_with(|c: char| c.is_ascii_digit())
        && matches!((quantity(have), quantity(want)), (Some(a), Some(b)) if a == b)
}

/// Whether a manager's field set holds the field at `path` of `live`
/// (list elements found in the live object by name or index, then in the
/// field set by their merge keys).
fn owns(fields: &Value, live: &Value, path: &[Segment]) -> bool {
    let Some((first, rest)) = path.split_first() else {
        return true;
    };
    match first {
        Segment::Key(key) => match (fields.get(format!("f:{key}")), live.get(key)) {
            (Some(fields), Some(live)) => owns(fields, live, rest),
            (Some(_), None) => rest.is_empty(),
            _ => false,
        },
        Segment::Item(item) => {
            let Some(items) = live.as_array() else {
                return false;
            };
            let element = items
                .iter()
                .find(|i| i.get("name").and_then(Value::as_str) == Some(item.as_str()))
                .or_else(|| item.parse::<usize>().ok().and_then(|i| items.get(i)));
            match element.and_then(|e| Some((keyed(fields, e)?, e))) {
                Some((fields, element)) => owns(fields, element, rest),
                None => false,
            }
        }
    }
}

/// The managers other than stack that own the field at `path` in a live
/// object's `metadata.managedFields`.
pub fn other_owners(live: &Value, path: &FieldPath) -> Vec<String> {
    let mut owners: Vec<String> = live["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|entry| entry["manager"].as_str() != Some(FIELD_MANAGER))
        .filter(|entry| owns(&entry["fieldsV1"], live, path.segments()))
        .filter_map(|entry| entry["manager"].as_str().map(str::to_string))
        .collect();
    owners.sort();
    owners.dedup();
    owners
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn server_filled_fields_and_respelt_quantities_are_not_drift() {
        let desired = json!({
            "spec": {"replicas": 3, "template": {"spec": {"containers": [
                {"name": "db", "image": "couchdb:3.5.1", "resources": {"requests": {"memory": "1024Mi"}}}
            ]}}}
        });
        let live = json!({
            "spec": {"replicas": 3, "revisionHistoryLimit": 10, "template": {"spec": {
                "dnsPolicy": "ClusterFirst",
                "containers": [
                    {"name": "sidecar", "image": "x"},
                    {"name": "db", "image": "couchdb:3.5.1", "imagePullPolicy": "IfNotPresent",
                     "resources": {"requests": {"memory": "1Gi"}}}
                ]}}},
            "status": {"readyReplicas": 3}
        });
        assert_eq!(project(&live, &desired, None), desired);
        let mut changed = live.clone();
        changed["spec"]["replicas"] = json!(1);
        assert_eq!(
            project(&changed, &desired, None)["spec"]["replicas"],
            json!(1)
        );
        let mut gone = live;
        gone["spec"]["template"]["spec"]["containers"][1]
            .as_object_mut()
            .unwrap()
            .remove("resources");
        let projected = project(&gone, &desired, None);
        assert!(projected["spec"]["template"]["spec"]["containers"][0]
            .get("resources")
            .is_none());
    }

    #[test]
    fn zero_values_the_server_left_out_are_not_drift_when_stack_owns_them() {
        let desired = json!({"spec": {"paused": false, "minReadySeconds": 0,
            "template": {"spec": {"containers": [
                {"name": "web", "args": [], "env": [{"name": "EMPTY", "value": ""}]}]}}}});
        let live = json!({
            "metadata": {"managedFields": [{"manager": "stack", "operation": "Apply",
                "fieldsV1": {"f:spec": {"f:paused": {}, "f:minReadySeconds": {},
                    "f:template": {"f:spec": {"f:containers": {"k:{\"name\":\"web\"}": {
                        ".": {}, "f:args": {}, "f:env": {"k:{\"name\":\"EMPTY\"}": {".": {}, "f:value": {}}}}}}}}}}]},
            "spec": {"template": {"spec": {"containers": [{"name": "web", "env": [{"name": "EMPTY"}]}]}}}
        });
        assert_eq!(project_both(&live, &desired, None), desired);
        // Not owned: a field someone removed is a difference.
        let unowned = json!({"spec": {"template": {"spec": {"containers": [{"name": "web", "env": [{"name": "EMPTY"}]}]}}}});
        assert_ne!(project_both(&unowned, &desired, None), desired);
    }

    #[test]
    fn owners_come_from_managed_fields_by_merge_key_and_dotted_key() {
        let live = json!({"metadata": {
            "labels": {"app.kubernetes.io/name": "web"},
            "managedFields": [
            {"manager": "stack", "operation": "Apply",
             "fieldsV1": {"f:spec": {"f:serviceName": {}}}},
            {"manager": "kubectl-scale", "operation": "Update",
             "fieldsV1": {"f:spec": {"f:replicas": {}}}},
            {"manager": "kubectl-label", "operation": "Update",
             "fieldsV1": {"f:metadata": {"f:labels": {"f:app.kubernetes.io/name": {}}}}},
            {"manager": "kubectl-edit", "operation": "Update",
             "fieldsV1": {"f:spec": {"f:template": {"f:spec": {"f:containers": {
                 "k:{\"name\":\"db\"}": {".": {}, "f:image": {},
                     "f:ports": {"k:{\"containerPort\":80,\"protocol\":\"TCP\"}": {".": {}, "f:hostPort": {}}}}}}}}}}
        ]},
        "spec": {"template": {"spec": {"containers": [
            {"name": "db", "image": "x", "ports": [{"containerPort": 80, "protocol": "TCP", "hostPort": 8080}]}]}}}});
        let path = |p: &str| FieldPath::parse(p);
        assert_eq!(
            other_owners(&live, &path("spec.replicas")),
            ["kubectl-scale"]
        );
        assert_eq!(
            other_owners(&live, &path("spec.template.spec.containers[db].image")),
            ["kubectl-edit"]
        );
        assert_eq!(
            other_owners(
                &live,
                &path("spec.template.spec.containers[db].ports[0].hostPort")
            ),
            ["kubectl-edit"],
            "a list addressed by index, keyed by containerPort and protocol"
        );
        let label = FieldPath::default()
            .key("metadata")
            .key("labels")
            .key("app.kubernetes.io/name");
        assert_eq!(other_owners(&live, &label), ["kubectl-label"]);
        assert!(other_owners(&live, &path("spec.serviceName")).is_empty());
    }
}
