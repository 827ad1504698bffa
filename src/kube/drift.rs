//! Drift without false positives: a live object is compared with the desired
//! one only on the fields the stack sets. The live object is projected onto
//! the desired object's shape, so what the API server fills in (defaults,
//! `clusterIP`, `status`, `managedFields`) never shows as a change, and
//! quantities are compared by value (`1024Mi` is `1Gi`). Who changed a field
//! is read from `managedFields`.

use serde_json::{Map, Value};

/// The field manager stack applies with.
pub const FIELD_MANAGER: &str = "stack";

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

/// `live` cut down to the paths `desired` has. A field the live object
/// lacks is left out, so the difference shows as the field going missing.
pub fn project(live: &Value, desired: &Value) -> Value {
    match (live, desired) {
        (Value::Object(live), Value::Object(desired)) => Value::Object(
            desired
                .iter()
                .filter_map(|(key, want)| Some((key.clone(), project(live.get(key)?, want))))
                .collect::<Map<_, _>>(),
        ),
        (Value::Array(live), Value::Array(desired)) if desired.iter().all(Value::is_object) => {
            Value::Array(
                desired
                    .iter()
                    .enumerate()
                    .filter_map(|(i, want)| Some(project(counterpart(live, want, i)?, want)))
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
    let wanted = project(live, desired);
    match recorded {
        Some(recorded) => overlay(project(live, recorded), wanted),
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

/// One step of a field path as `plan` prints it: `spec`, `containers[web]`.
fn segments(path: &str) -> Vec<(String, Option<String>)> {
    path.split('.')
        .map(|part| match part.split_once('[') {
            Some((key, rest)) => (
                key.to_string(),
                Some(rest.trim_end_matches(']').to_string()),
            ),
            None => (part.to_string(), None),
        })
        .collect()
}

/// Whether a manager's `fieldsV1` set holds the field at `path`.
fn owns(fields: &Value, path: &[(String, Option<String>)]) -> bool {
    let Some(((key, element), rest)) = path.split_first() else {
        return true;
    };
    let Some(mut node) = fields.get(format!("f:{key}")) else {
        return false;
    };
    if let Some(element) = element {
        let by_name = node.as_object().and_then(|map| {
            map.iter().find_map(|(k, v)| {
                let keyed: Value = serde_json::from_str(k.strip_prefix("k:")?).ok()?;
                (keyed.get("name").and_then(Value::as_str) == Some(element.as_str())).then_some(v)
            })
        });
        match by_name {
            Some(found) => node = found,
            None => return false,
        }
    }
    owns(node, rest)
}

/// The managers other than stack that own the field at `path` (as `plan`
/// prints paths) in a live object's `metadata.managedFields`.
pub fn other_owners(live: &Value, path: &str) -> Vec<String> {
    let path = segments(path);
    let mut owners: Vec<String> = live["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|entry| entry["manager"].as_str() != Some(FIELD_MANAGER))
        .filter(|entry| owns(&entry["fieldsV1"], &path))
        .filter_map(|entry| entry["manager"].as_str().map(str::to_string))
        .collect();
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
        assert_eq!(project(&live, &desired), desired);
        let mut changed = live.clone();
        changed["spec"]["replicas"] = json!(1);
        assert_eq!(project(&changed, &desired)["spec"]["replicas"], json!(1));
        let mut gone = live;
        gone["spec"]["template"]["spec"]["containers"][1]
            .as_object_mut()
            .unwrap()
            .remove("resources");
        let projected = project(&gone, &desired);
        assert!(projected["spec"]["template"]["spec"]["containers"][0]
            .get("resources")
            .is_none());
    }

    #[test]
    fn owners_come_from_managed_fields() {
        let live = json!({"metadata": {"managedFields": [
            {"manager": "stack", "operation": "Apply",
             "fieldsV1": {"f:spec": {"f:serviceName": {}}}},
            {"manager": "kubectl-scale", "operation": "Update",
             "fieldsV1": {"f:spec": {"f:replicas": {}}}},
            {"manager": "kubectl-edit", "operation": "Update",
             "fieldsV1": {"f:spec": {"f:template": {"f:spec": {"f:containers": {
                 "k:{\"name\":\"db\"}": {".": {}, "f:image": {}}}}}}}}
        ]}});
        assert_eq!(other_owners(&live, "spec.replicas"), ["kubectl-scale"]);
        assert_eq!(
            other_owners(&live, "spec.template.spec.containers[db].image"),
            ["kubectl-edit"]
        );
        assert!(other_owners(&live, "spec.serviceName").is_empty());
    }
}
