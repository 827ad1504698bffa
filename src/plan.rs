//! Plans: the one list of [`Change`]s that `plan` prints and `up`/`down` apply.
//!
//! A change compares three views of a resource: `before` (what the state
//! recorded as last applied), `observed` (what refresh read from the live
//! world) and `after` (what the stack wants). Where the live world differs
//! from the record, the change is drift and says so.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde::Serialize;
use serde_json::Value;

use crate::state::{Record, State};

/// The JSON output shape's version (`stack plan --output json`).
pub const FORMAT_VERSION: u32 = 1;

/// Something the stack wants to exist.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Resource {
    pub address: String,
    pub kind: String,
    /// A JSON object of the attributes the stack manages.
    pub attrs: Value,
    /// Attributes that cannot change in place: a difference replaces the resource.
    #[serde(skip)]
    pub replace_on: &'static [&'static str],
}

/// Something refresh found in the live world.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Observed {
    pub address: String,
    pub kind: String,
    pub id: String,
    /// The attributes that could be read back; those that cannot (user data,
    /// say) are taken from the record.
    pub attrs: Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Create,
    Update,
    Replace,
    Delete,
}

impl Action {
    pub fn symbol(self) -> &'static str {
        match self {
            Action::Create => "+",
            Action::Update => "~",
            Action::Replace => "-/+",
            Action::Delete => "-",
        }
    }
}

/// One attribute that differs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FieldChange {
    pub path: String,
    pub before: Option<Value>,
    pub observed: Option<Value>,
    pub after: Option<Value>,
    /// The live value is not what was last applied.
    pub drift: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Change {
    pub address: String,
    pub kind: String,
    pub action: Action,
    /// The live object's id, when there is one.
    pub id: Option<String>,
    pub drift: bool,
    pub reason: String,
    pub before: Option<Value>,
    pub observed: Option<Value>,
    pub after: Option<Value>,
    pub fields: Vec<FieldChange>,
    /// The token a create must use (kept in state before the call).
    #[serde(skip)]
    pub token: Option<String>,
    /// Where a bootstrap step stands in the whole bootstrap.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<StepRef>,
    /// Which stage of the Kubernetes phase an object belongs to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage: Option<StageRef>,
}

/// A Kubernetes object's stage: stage `number` of `of`, named.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StageRef {
    pub number: usize,
    pub of: usize,
    pub name: String,
}

/// A bootstrap step's place: step `number` of `of`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepRef {
    pub number: usize,
    pub of: usize,
    pub description: String,
}

/// Infrastructure first, then the bootstrap's steps in their order, then
/// the Kubernetes objects stage by stage, removals last in reverse stage order.
fn order(change: &Change) -> (u8, usize) {
    if crate::bootstrap::steps::is_bootstrap(&change.kind) {
        (1, change.step.as_ref().map_or(usize::MAX, |s| s.number))
    } else if crate::kube::is_kube(&change.kind) {
        let stage = change.stage.as_ref().map_or(0, |s| s.number);
        match change.action {
            Action::Delete => (2, 100 - stage),
            _ => (2, stage),
        }
    } else {
        (0, usize::MAX)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Normal,
    Destroy,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    pub format_version: u32,
    pub stack: String,
    pub provider: String,
    pub mode: Mode,
    pub changes: Vec<Change>,
    pub summary: Summary,
    /// Live resources tagged with the stack that the state did not record
    /// (a run stopped between creating and recording them): recorded on apply.
    pub adopt: Vec<Observed>,
    /// Recorded resources that no longer exist and are not wanted: dropped on apply.
    pub forget: Vec<String>,
    /// What the plan leaves out on purpose, and why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub create: usize,
    pub update: usize,
    pub replace: usize,
    pub delete: usize,
    /// How many of the changes repair drift.
    pub drift: usize,
}

impl Plan {
    fn new(
        stack: &str,
        provider: &str,
        mode: Mode,
        changes: Vec<Change>,
        adopt: Vec<Observed>,
        forget: Vec<String>,
    ) -> Self {
        let mut plan = Plan {
            format_version: FORMAT_VERSION,
            stack: stack.to_string(),
            provider: provider.to_string(),
            mode,
            changes,
            summary: Summary::default(),
            adopt,
            forget,
            notes: Vec::new(),
        };
        plan.recount();
        plan
    }

    /// Puts the changes in order and counts them again (after they were edited).
    pub fn recount(&mut self) {
        self.changes.sort_by(|a, b| {
            order(a)
                .cmp(&order(b))
                .then(a.address.cmp(&b.address))
                .then(a.id.cmp(&b.id))
        });
        let mut summary = Summary::default();
        for change in &self.changes {
            match change.action {
                Action::Create => summary.create += 1,
                Action::Update => summary.update += 1,
                Action::Replace => summary.replace += 1,
                Action::Delete => summary.delete += 1,
            }
            summary.drift += usize::from(change.drift);
        }
        self.summary = summary;
    }

    /// One plan of two phases' plans (infrastructure, then the bootstrap).
    pub fn combine(mut self, other: Plan) -> Plan {
        self.changes.extend(other.changes);
        self.adopt.extend(other.adopt);
        self.forget.extend(other.forget);
        self.notes.extend(other.notes);
        self.recount();
        self
    }

    /// Nothing to change in the world (adopting or forgetting records is bookkeeping).
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    pub fn has_bookkeeping(&self) -> bool {
        !self.adopt.is_empty() || !self.forget.is_empty()
    }
}

/// Merges the record's attributes with what could be observed.
fn live_view(record: Option<&Record>, observed: &Observed) -> Value {
    let mut live = record
        .map(|r| r.attrs.clone())
        .filter(Value::is_object)
        .unwrap_or_else(|| Value::Object(Default::default()));
    if let (Some(live), Some(observed)) = (live.as_object_mut(), observed.attrs.as_object()) {
        for (key, value) in observed {
            live.insert(key.clone(), value.clone());
        }
    }
    live
}

fn flatten(prefix: &str, value: &Value, out: &mut BTreeMap<String, Value>) {
    match value {
        // Lists of objects (containers, ports) are compared element by
        // element: `containers[web].image`, by name where elements have one.
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_object) => {
            for (i, item) in items.iter().enumerate() {
                let key = item
                    .get("name")
                    .and_then(Value::as_str)
                    .map_or_else(|| i.to_string(), str::to_string);
                flatten(&format!("{prefix}[{key}]"), item, out);
            }
        }
        Value::Object(map) if !map.is_empty() => {
            for (key, child) in map {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                flatten(&path, child, out);
            }
        }
        _ => {
            out.insert(prefix.to_string(), value.clone());
        }
    }
}

/// Field-by-field differences between the live view and the desired attributes.
/// Only fields the stack manages count: a live field the stack does not set is
/// ignored, except under `tags`, where a tag stack set before is still managed.
fn field_changes(
    kind: &str,
    before: Option<&Value>,
    live: &Value,
    desired: &Value,
) -> Vec<FieldChange> {
    let (mut b, mut l, mut d) = (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
    if let Some(before) = before {
        flatten("", before, &mut b);
    }
    flatten("", live, &mut l);
    flatten("", desired, &mut d);
    // A Kubernetes object's fields the stack set before and no longer sets
    // are removed by the next apply, so they count too.
    let kube = crate::kube::is_kube(kind);
    let managed: BTreeSet<&String> = d
        .keys()
        .chain(b.keys().filter(|k| kube || k.starts_with("tags.")))
        .collect();
    managed
        .into_iter()
        .filter(|path| l.get(*path) != d.get(*path))
        .map(|path| FieldChange {
            path: path.clone(),
            before: b.get(path).cloned(),
            observed: l.get(path).cloned(),
            after: d.get(path).cloned(),
            drift: before.is_some() && b.get(path) != l.get(path),
        })
        .collect()
}

/// The plan that makes the live world match `desired`.
pub fn plan(
    stack: &str,
    provider: &str,
    desired: &[Resource],
    state: &State,
    observed: &[Observed],
) -> Plan {
    let mut changes = Vec::new();
    let mut adopt = Vec::new();
    let mut forget = Vec::new();
    let wanted: BTreeSet<&str> = desired.iter().map(|r| r.address.as_str()).collect();

    for resource in desired {
        let record = state.get(&resource.address);
        let mut found: Vec<&Observed> = observed
            .iter()
            .filter(|o| o.address == resource.address)
            .collect();
        // Keep the one the state knows, else the first; the rest are duplicates.
        let keep = found
            .iter()
            .position(|o| record.and_then(|r| r.id.as_deref()) == Some(o.id.as_str()))
            .unwrap_or(0);
        let live = if found.is_empty() {
            None
        } else {
            Some(found.remove(keep))
        };
        for duplicate in found {
            changes.push(delete_change(
                duplicate,
                None,
                "a duplicate of the same address (an interrupted create made two)",
                false,
            ));
        }
        let after = Some(resource.attrs.clone());
        match live {
            None => {
                let was_made = record.is_some_and(|r| r.id.is_some());
                changes.push(Change {
                    address: resource.address.clone(),
                    kind: resource.kind.clone(),
                    action: Action::Create,
                    id: None,
                    drift: was_made,
                    reason: if was_made {
                        "gone from the live world (deleted or terminated out of band)".to_string()
                    } else if record.is_some_and(|r| r.pending_token.is_some()) {
                        "a create that was interrupted; resumed with the same token".to_string()
                    } else {
                        "new in the stack".to_string()
                    },
                    before: record.map(|r| r.attrs.clone()),
                    observed: None,
                    after,
                    fields: Vec::new(),
                    token: record.and_then(|r| r.pending_token.clone()),
                    step: None,
                    stage: None,
                });
            }
            Some(live) => {
                let recorded = record.filter(|r| r.id.as_deref() == Some(live.id.as_str()));
                let view = live_view(recorded, live);
                let fields = field_changes(
                    &resource.kind,
                    recorded.map(|r| &r.attrs),
                    &view,
                    &resource.attrs,
                );
                if recorded.is_none() {
                    adopt.push(live.clone());
                }
                if fields.is_empty() {
                    continue;
                }
                let replace = fields.iter().any(|f| {
                    let top = f.path.split('.').next().unwrap_or("");
                    resource.replace_on.contains(&top)
                });
                let drift = fields.iter().any(|f| f.drift);
                let names = |drifted: bool| {
                    fields
                        .iter()
                        .filter(|f| f.drift == drifted)
                        .map(|f| f.path.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let mut parts = Vec::new();
                if drift {
                    parts.push(format!("changed out of band: {}", names(true)));
                }
                if fields.iter().any(|f| !f.drift) {
                    parts.push(format!("changed in the stack: {}", names(false)));
                }
                let mut reason = parts.join("; ");
                if replace {
                    reason.push_str(" (cannot change in place: replaced)");
                }
                changes.push(Change {
                    address: resource.address.clone(),
                    kind: resource.kind.clone(),
                    action: if replace {
                        Action::Replace
                    } else {
                        Action::Update
                    },
                    id: Some(live.id.clone()),
                    drift,
                    reason,
                    before: recorded.map(|r| r.attrs.clone()),
                    observed: Some(live.attrs.clone()),
                    after,
                    fields,
                    token: None,
                    step: None,
                    stage: None,
                });
            }
        }
    }

    for live in observed
        .iter()
        .filter(|o| !wanted.contains(o.address.as_str()))
    {
        let record = state
            .get(&live.address)
            .filter(|r| r.id.as_deref() == Some(live.id.as_str()));
        let reason = if record.is_some() {
            "no longer in the stack"
        } else {
            "tagged with the stack but not recorded in state"
        };
        changes.push(delete_change(live, record, reason, false));
    }
    for record in &state.resources {
        let exists = observed.iter().any(|o| o.address == record.address);
        if !exists && !wanted.contains(record.address.as_str()) {
            forget.push(record.address.clone());
        }
    }
    Plan::new(stack, provider, Mode::Normal, changes, adopt, forget)
}

fn delete_change(live: &Observed, record: Option<&Record>, reason: &str, drift: bool) -> Change {
    Change {
        address: live.address.clone(),
        kind: live.kind.clone(),
        action: Action::Delete,
        id: Some(live.id.clone()),
        drift,
        reason: reason.to_string(),
        before: record.map(|r| r.attrs.clone()),
        observed: Some(live.attrs.clone()),
        after: None,
        fields: Vec::new(),
        token: None,
        step: None,
        stage: None,
    }
}

/// The plan that removes everything the stack made: all that refresh found
/// by tag or by recorded id.
pub fn destroy(stack: &str, provider: &str, state: &State, observed: &[Observed]) -> Plan {
    let changes = observed
        .iter()
        .map(|live| {
            let record = state
                .get(&live.address)
                .filter(|r| r.id.as_deref() == Some(live.id.as_str()));
            delete_change(live, record, "destroying the stack", false)
        })
        .collect();
    let forget = state
        .resources
        .iter()
        .filter(|r| !observed.iter().any(|o| o.address == r.address))
        .map(|r| r.address.clone())
        .collect();
    Plan::new(stack, provider, Mode::Destroy, changes, Vec::new(), forget)
}

const SENSITIVE: &[&str] = &["password", "secret", "privatekey", "token", "cookie"];

fn is_sensitive(path: &str) -> bool {
    let last = path.rsplit('.').next().unwrap_or(path).to_lowercase();
    SENSITIVE.iter().any(|s| last.contains(s))
}

/// Replaces sensitive values in a JSON tree with `"(sensitive)"`.
pub fn redact(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    let v = if is_sensitive(k) {
                        Value::String("(sensitive)".into())
                    } else {
                        redact(v)
                    };
                    (k.clone(), v)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(redact).collect()),
        other => other.clone(),
    }
}

/// The plan for machines, secrets redacted.
pub fn to_json(plan: &Plan) -> Value {
    let mut value = serde_json::to_value(plan).expect("plan serialises");
    for change in value["changes"].as_array_mut().into_iter().flatten() {
        if !change["kind"].as_str().is_some_and(crate::kube::is_secret) {
            continue;
        }
        for view in ["before", "observed", "after"] {
            if let Some(data) = change[view].get_mut("data") {
                *data = Value::String("(sensitive)".into());
            }
        }
        for field in change["fields"].as_array_mut().into_iter().flatten() {
            if field["path"]
                .as_str()
                .is_some_and(|p| p.starts_with("data."))
            {
                for view in ["before", "observed", "after"] {
                    field[view] = Value::String("(sensitive)".into());
                }
            }
        }
    }
    redact(&value)
}

fn show(path: &str, value: Option<&Value>) -> String {
    match value {
        None => "(none)".to_string(),
        Some(_) if is_sensitive(path) => "(sensitive)".to_string(),
        Some(Value::String(s)) => format!("{s:?}"),
        Some(Value::Array(items)) => {
            let items: Vec<String> = items.iter().map(|v| show("", Some(v))).collect();
            format!("[{}]", items.join(", "))
        }
        Some(other) => other.to_string(),
    }
}

fn render_change(out: &mut String, change: &Change) {
    // A Secret's data is never printed, whatever its keys are called.
    let show = |path: &str, value: Option<&Value>| {
        if crate::kube::is_secret(&change.kind) && path.starts_with("data.") && value.is_some() {
            "(sensitive)".to_string()
        } else {
            show(path, value)
        }
    };
    let id = change
        .id
        .as_deref()
        .map(|id| format!(" ({id})"))
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "  {:<3} {}{id}",
        change.action.symbol(),
        change.address
    );
    if let Some(step) = &change.step {
        let _ = writeln!(
            out,
            "        step {} of {}: {}",
            step.number, step.of, step.description
        );
    }
    if let Some(stage) = &change.stage {
        let _ = writeln!(
            out,
            "        stage {} of {}: {}",
            stage.number, stage.of, stage.name
        );
    }
    let _ = writeln!(out, "        {}", change.reason);
    for field in &change.fields {
        if let (Some(Value::Array(live)), Some(Value::Array(want))) =
            (&field.observed, &field.after)
        {
            for item in live.iter().filter(|i| !want.contains(i)) {
                let _ = writeln!(
                    out,
                    "        {}: - {}",
                    field.path,
                    show(&field.path, Some(item))
                );
            }
            for item in want.iter().filter(|i| !live.contains(i)) {
                let _ = writeln!(
                    out,
                    "        {}: + {}",
                    field.path,
                    show(&field.path, Some(item))
                );
            }
            continue;
        }
        let mut line = format!(
            "        {}: {} → {}",
            field.path,
            show(&field.path, field.observed.as_ref()),
            show(&field.path, field.after.as_ref())
        );
        if field.drift {
            let _ = write!(
                line,
                "   (last applied: {})",
                show(&field.path, field.before.as_ref())
            );
        }
        let _ = writeln!(out, "{line}");
    }
}

/// The plan for people: drift apart from intended changes, then totals.
pub fn render(plan: &Plan) -> String {
    let mut out = String::new();
    let (drift, intended): (Vec<&Change>, Vec<&Change>) =
        plan.changes.iter().partition(|c| c.drift);
    if !drift.is_empty() {
        let _ = writeln!(
            out,
            "Drift: the live world differs from what stack last applied"
        );
        for change in &drift {
            render_change(&mut out, change);
        }
        out.push('\n');
    }
    if !intended.is_empty() {
        let heading = match plan.mode {
            Mode::Normal => "Changes",
            Mode::Destroy => "Destroy",
        };
        let _ = writeln!(out, "{heading}:");
        for change in &intended {
            render_change(&mut out, change);
        }
        out.push('\n');
    }
    if !plan.adopt.is_empty() {
        let names: Vec<&str> = plan.adopt.iter().map(|o| o.address.as_str()).collect();
        let _ = writeln!(
            out,
            "Found by tag, to be recorded in state: {}",
            names.join(", ")
        );
    }
    if !plan.forget.is_empty() {
        let _ = writeln!(
            out,
            "Recorded but gone, to be dropped from state: {}",
            plan.forget.join(", ")
        );
    }
    for note in &plan.notes {
        let _ = writeln!(out, "Note: {note}");
    }
    let s = plan.summary;
    if plan.is_empty() {
        let _ = writeln!(out, "No changes: the live world matches the stack.");
    } else {
        let _ = writeln!(
            out,
            "Plan: {} to create, {} to update, {} to replace, {} to delete ({} repairing drift).",
            s.create, s.update, s.replace, s.delete, s.drift
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn resource(address: &str, attrs: Value) -> Resource {
        Resource {
            address: address.into(),
            kind: "instance".into(),
            attrs,
            replace_on: &["ami"],
        }
    }

    fn observed(address: &str, id: &str, attrs: Value) -> Observed {
        Observed {
            address: address.into(),
            kind: "instance".into(),
            id: id.into(),
            attrs,
        }
    }

    fn state_with(address: &str, id: &str, attrs: Value) -> State {
        let mut state = State::new("demo", "ec2");
        state.put(Record {
            address: address.into(),
            kind: "instance".into(),
            id: Some(id.into()),
            attrs,
            pending_token: None,
        });
        state
    }

    #[test]
    fn a_new_resource_is_created() {
        let desired = [resource("a", json!({"ami": "x"}))];
        let plan = plan("demo", "ec2", &desired, &State::new("demo", "ec2"), &[]);
        assert_eq!(plan.changes.len(), 1);
        assert_eq!(plan.changes[0].action, Action::Create);
        assert!(!plan.changes[0].drift);
    }

    #[test]
    fn a_live_change_is_drift_and_an_edit_is_not() {
        let attrs = json!({"ami": "x", "state": "running", "tags": {"Name": "a"}});
        let state = state_with("a", "i-1", attrs.clone());
        let live = [observed(
            "a",
            "i-1",
            json!({"ami": "x", "state": "stopped", "tags": {"Name": "a", "other": "1"}}),
        )];
        let plan1 = plan(
            "demo",
            "ec2",
            &[resource("a", attrs.clone())],
            &state,
            &live,
        );
        assert_eq!(plan1.changes[0].action, Action::Update);
        assert!(plan1.changes[0].drift);
        assert_eq!(
            plan1.changes[0].fields.len(),
            1,
            "tags not set by stack are ignored"
        );
        let edited = json!({"ami": "y", "state": "running", "tags": {"Name": "a"}});
        let live = [observed("a", "i-1", attrs)];
        let plan2 = plan("demo", "ec2", &[resource("a", edited)], &state, &live);
        assert_eq!(plan2.changes[0].action, Action::Replace);
        assert!(!plan2.changes[0].drift);
    }

    #[test]
    fn duplicates_orphans_and_adoption() {
        let attrs = json!({"ami": "x"});
        let state = state_with("a", "i-1", attrs.clone());
        let live = [
            observed("a", "i-2", attrs.clone()),
            observed("a", "i-1", attrs.clone()),
            observed("b", "i-3", attrs.clone()),
            observed("c", "i-4", attrs.clone()),
        ];
        let desired = [resource("a", attrs.clone()), resource("c", attrs)];
        let plan = plan("demo", "ec2", &desired, &state, &live);
        let deleted: Vec<_> = plan
            .changes
            .iter()
            .map(|c| (c.action, c.id.clone().unwrap()))
            .collect();
        assert_eq!(
            deleted,
            vec![
                (Action::Delete, "i-2".to_string()),
                (Action::Delete, "i-3".to_string())
            ]
        );
        assert_eq!(plan.adopt.len(), 1);
        assert_eq!(plan.adopt[0].id, "i-4");
    }

    #[test]
    fn rendered_plan_snapshot() {
        let recorded = json!({"ami": "x", "instanceType": "t3.large", "state": "running", "ingress": ["all from self"], "tags": {"team": "platform"}});
        let mut state = state_with("ec2.instance.a[0]", "i-1", recorded.clone());
        state.put(Record {
            address: "ec2.instance.gone[0]".into(),
            kind: "instance".into(),
            id: Some("i-9".into()),
            attrs: json!({"ami": "x"}),
            pending_token: None,
        });
        let desired = [
            resource(
                "ec2.instance.a[0]",
                json!({"ami": "x", "instanceType": "t3.xlarge", "state": "running", "ingress": ["all from self"], "tags": {"team": "platform"}}),
            ),
            resource(
                "ec2.instance.new[0]",
                json!({"ami": "x", "adminPassword": "hunter2"}),
            ),
        ];
        let live = [
            observed(
                "ec2.instance.a[0]",
                "i-1",
                json!({"ami": "x", "instanceType": "t3.large", "state": "stopped", "ingress": ["all from self", "tcp 22 from 0.0.0.0/0"], "tags": {"team": "other"}}),
            ),
            observed("ec2.instance.old[0]", "i-7", json!({"ami": "x"})),
        ];
        let plan = plan("demo", "ec2", &desired, &state, &live);
        insta::assert_snapshot!(render(&plan));
        insta::assert_json_snapshot!(to_json(&plan));
    }

    #[test]
    fn secrets_are_redacted() {
        let value =
            json!({"adminPassword": "hunter2", "nested": {"erlangCookie": "c"}, "name": "x"});
        assert_eq!(
            redact(&value),
            json!({"adminPassword": "(sensitive)", "nested": {"erlangCookie": "(sensitive)"}, "name": "x"})
        );
    }
}
