//! Plans: the one list of [`Change`]s that `plan` prints and `up`/`down` apply.
//!
//! A change compares three views of a resource: `before` (what the state
//! recorded as last applied), `observed` (what refresh read from the live
//! world) and `after` (what the stack wants). Where the live world differs
//! from the record, the change is drift and says so.
//!
//! Nothing here knows a phase: how a resource is ordered, replaced, shown and
//! compared travels with it as [`Handling`], set by the phase that made it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Serialize, Serializer};
use serde_json::Value;

use crate::state::{Record, State};

/// The JSON output shape's version (`stack plan --output json`).
pub const FORMAT_VERSION: u32 = 1;

/// What a plan is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Make the live world match the stack.
    Normal,
    /// Remove everything the stack made.
    Destroy,
    /// Only report drift (for scheduled checks); never applied.
    RefreshOnly,
}

/// One step of a field's place: a key, or a list element by name (or index).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Segment {
    Key(String),
    Item(String),
}

/// Where a field is in a resource's attributes. Shown as plans print it:
/// `spec.template.spec.containers[web].image`, with a key that has a dot or
/// a bracket in it quoted: `metadata.labels["app.kubernetes.io/name"]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FieldPath(Vec<Segment>);

impl FieldPath {
    /// A path written as `a.b[item].c` (keys without dots, as rules are written).
    pub fn parse(text: &str) -> FieldPath {
        let mut segments = Vec::new();
        for part in text.split('.').filter(|p| !p.is_empty()) {
            let (key, items) = part.split_once('[').unwrap_or((part, ""));
            if !key.is_empty() {
                segments.push(Segment::Key(key.to_string()));
            }
            for item in items.split('[').filter(|i| !i.is_empty()) {
                segments.push(Segment::Item(item.trim_end_matches(']').to_string()));
            }
        }
        FieldPath(segments)
    }

    pub fn segments(&self) -> &[Segment] {
        &self.0
    }

    pub fn key(&self, key: &str) -> FieldPath {
        let mut path = self.clone();
        path.0.push(Segment::Key(key.to_string()));
        path
    }

    pub fn item(&self, item: &str) -> FieldPath {
        let mut path = self.clone();
        path.0.push(Segment::Item(item.to_string()));
        path
    }

    /// Whether this path is `prefix` or lies under it.
    pub fn starts_with(&self, prefix: &FieldPath) -> bool {
        self.0.starts_with(&prefix.0)
    }

    /// The last key of the path, if it ends in a key.
    pub fn last_key(&self) -> Option<&str> {
        self.0.iter().rev().find_map(|s| match s {
            Segment::Key(k) => Some(k.as_str()),
            Segment::Item(_) => None,
        })
    }

    /// The second key when the path is `first.KEY…` (a tag's key under `tags`).
    pub fn under(&self, first: &str) -> Option<&str> {
        match self.0.as_slice() {
            [Segment::Key(top), Segment::Key(key), ..] if top == first => Some(key),
            _ => None,
        }
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                Segment::Key(key) if key.is_empty() || key.contains(['.', '[', ']', '"', ' ']) => {
                    write!(f, "[{key:?}]")?
                }
                Segment::Key(key) if i == 0 => f.write_str(key)?,
                Segment::Key(key) => write!(f, ".{key}")?,
                Segment::Item(item) => write!(f, "[{item}]")?,
            }
        }
        Ok(())
    }
}

impl Serialize for FieldPath {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// A change at `path` (or under it, but not under one of `except`) cannot
/// be made in place: the resource is deleted and made again.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplaceRule {
    pub path: FieldPath,
    pub except: Vec<FieldPath>,
}

impl ReplaceRule {
    pub fn at(path: &str) -> ReplaceRule {
        ReplaceRule {
            path: FieldPath::parse(path),
            except: Vec::new(),
        }
    }

    /// Everything under `path` but what is under one of `except`.
    pub fn under_except(path: &str, except: &[&str]) -> ReplaceRule {
        ReplaceRule {
            path: FieldPath::parse(path),
            except: except.iter().map(|e| FieldPath::parse(e)).collect(),
        }
    }

    pub fn matches(&self, field: &FieldPath) -> bool {
        field.starts_with(&self.path) && !self.except.iter().any(|e| field.starts_with(e))
    }
}

/// Which fields the stack set before, and no longer sets, still count: the
/// next apply removes them, so a live value there is a change.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum PriorFields {
    /// Only what the stack sets now is compared.
    #[default]
    Ignored,
    /// Every field of the record (server-side apply removes them).
    All,
    /// Those under these paths (tags the stack set before).
    Under(Vec<FieldPath>),
}

/// A change's place in its phase's own sequence: step `number` of `of`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepRef {
    pub number: usize,
    pub of: usize,
    pub description: String,
}

/// A change's stage: stage `number` of `of` of the whole run, named.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StageRef {
    pub number: usize,
    pub of: usize,
    pub name: String,
}

impl fmt::Display for StageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "stage {} of {} ({})", self.number, self.of, self.name)
    }
}

/// How the planner and the applier treat a resource; set by its phase.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Handling {
    /// Addresses this waits for when it is made or changed, and that wait
    /// for it when it is removed.
    pub waits_for: Vec<String>,
    pub replace: Vec<ReplaceRule>,
    /// Values at these paths are never shown.
    pub sensitive: Vec<FieldPath>,
    pub prior_fields: PriorFields,
    /// Made again whatever its record says, for this reason.
    pub rebuild: Option<String>,
    /// Changes with a step run one at a time in step order.
    pub step: Option<StepRef>,
    /// A failure is reported and left for the next run; the rest goes on.
    pub optional: bool,
    /// Refresh reads every attribute of it back: the record fills in none
    /// (a field that is gone live is gone, not taken from the record).
    pub read_whole: bool,
    /// Live, with the stack's marks, but made by another state (why it is
    /// not this state's): neither taken over nor removed.
    pub foreign: Option<String>,
}

impl Handling {
    pub fn waits_for(mut self, addresses: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.waits_for = addresses.into_iter().map(Into::into).collect();
        self
    }

    pub fn replace(mut self, rules: Vec<ReplaceRule>) -> Self {
        self.replace = rules;
        self
    }

    pub fn sensitive(mut self, paths: &[&str]) -> Self {
        self.sensitive = paths.iter().map(|p| FieldPath::parse(p)).collect();
        self
    }

    pub fn prior_fields(mut self, prior: PriorFields) -> Self {
        self.prior_fields = prior;
        self
    }
}

/// Something the stack wants to exist.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Resource {
    pub address: String,
    pub kind: String,
    /// A JSON object of the attributes the stack manages.
    pub attrs: Value,
    #[serde(skip)]
    pub handling: Handling,
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
    /// For a removal: what it waits for and what is not shown.
    #[serde(skip)]
    pub handling: Handling,
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

    /// `creating`, `created`.
    pub fn verbs(self) -> (&'static str, &'static str) {
        match self {
            Action::Create => ("creating", "created"),
            Action::Update => ("updating", "updated"),
            Action::Replace => ("replacing", "replaced"),
            Action::Delete => ("deleting", "deleted"),
        }
    }
}

/// One attribute that differs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FieldChange {
    pub path: FieldPath,
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<StepRef>,
    /// Set by the engine from its list of stages.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage: Option<StageRef>,
    #[serde(skip)]
    pub waits_for: Vec<String>,
    #[serde(skip)]
    pub sensitive: Vec<FieldPath>,
    #[serde(skip)]
    pub optional: bool,
}

impl Change {
    /// A change as a phase plans it itself (most come from [`diff`]).
    pub fn new(
        address: &str,
        kind: &str,
        action: Action,
        reason: String,
        handling: &Handling,
    ) -> Change {
        Change {
            address: address.to_string(),
            kind: kind.to_string(),
            action,
            id: None,
            drift: false,
            reason,
            before: None,
            observed: None,
            after: None,
            fields: Vec::new(),
            token: None,
            step: handling.step.clone(),
            stage: None,
            waits_for: handling.waits_for.clone(),
            sensitive: handling.sensitive.clone(),
            optional: handling.optional,
        }
    }

    /// The stage number the engine gave it (0 before it did).
    pub fn stage_number(&self) -> usize {
        self.stage.as_ref().map_or(0, |s| s.number)
    }

    /// The same change with every sensitive value shown as `(sensitive)`:
    /// values at the resource's sensitive paths, and any value whose key
    /// names a password, secret, private key, token or cookie.
    pub fn redacted(&self) -> Change {
        let hide = |value: &Option<Value>| {
            value.as_ref().map(|v| {
                let mut v = redact(v);
                for path in &self.sensitive {
                    hide_at(&mut v, path.segments());
                }
                v
            })
        };
        let mut change = self.clone();
        change.before = hide(&self.before);
        change.observed = hide(&self.observed);
        change.after = hide(&self.after);
        for field in &mut change.fields {
            let secret = self.sensitive.iter().any(|p| field.path.starts_with(p))
                || field.path.last_key().is_some_and(is_sensitive);
            if secret {
                for value in [&mut field.before, &mut field.observed, &mut field.after] {
                    if value.is_some() {
                        *value = Some(Value::String(SENSITIVE_SHOWN.into()));
                    }
                }
            }
        }
        change
    }
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

/// One phase's part of a plan, before the engine puts the parts together.
#[derive(Debug, Clone, Default)]
pub struct PlanPart {
    pub changes: Vec<Change>,
    /// Live resources carrying the stack's marks that the state did not
    /// record (a run stopped between creating and recording them).
    pub adopt: Vec<Observed>,
    /// Recorded resources that are gone and not wanted.
    pub forget: Vec<String>,
    /// What the phase leaves out on purpose, and why.
    pub notes: Vec<String>,
    /// Live things of the stack's that another state made.
    pub foreign: Vec<Observed>,
    /// Why the plan cannot be applied as it stands (the stack must change first).
    pub blocked: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    pub format_version: u32,
    pub stack: String,
    pub provider: String,
    pub mode: Mode,
    /// The serial of the state the plan was made from: a plan is applied
    /// only to that state.
    pub state_serial: u64,
    /// Which plan of its session this is (phases keep what they read for it).
    #[serde(skip)]
    pub plan_id: u64,
    pub changes: Vec<Change>,
    pub summary: Summary,
    /// Recorded on apply.
    pub adopt: Vec<Observed>,
    /// Dropped from the state on apply.
    pub forget: Vec<String>,
    /// Live things with the stack's marks that another state made: a plan
    /// with any is not applied (another checkout manages them).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub foreign: Vec<Observed>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// Why `up` refuses this plan: what the stack must change first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub blocked: Vec<String>,
}

/// Stage by stage, then step by step; removals after everything else, the
/// last stage's first.
fn order(change: &Change) -> (bool, usize, usize) {
    let stage = change.stage_number();
    let step = change.step.as_ref().map_or(0, |s| s.number);
    match change.action {
        Action::Delete => (true, usize::MAX - stage, step),
        _ => (false, stage, step),
    }
}

impl Plan {
    /// The plan of a run: each part with the stage it belongs to.
    pub fn assemble(
        stack: &str,
        provider: &str,
        mode: Mode,
        state_serial: u64,
        parts: Vec<(StageRef, PlanPart)>,
    ) -> Plan {
        let mut plan = Plan {
            format_version: FORMAT_VERSION,
            stack: stack.to_string(),
            provider: provider.to_string(),
            mode,
            state_serial,
            plan_id: 0,
            changes: Vec::new(),
            summary: Summary::default(),
            adopt: Vec::new(),
            forget: Vec::new(),
            foreign: Vec::new(),
            notes: Vec::new(),
            blocked: Vec::new(),
        };
        for (stage, part) in parts {
            for mut change in part.changes {
                change.stage = Some(stage.clone());
                plan.changes.push(change);
            }
            plan.adopt.extend(part.adopt);
            plan.forget.extend(part.forget);
            plan.foreign.extend(part.foreign);
            plan.blocked
                .extend(part.blocked.into_iter().map(|n| format!("{stage}: {n}")));
            plan.notes
                .extend(part.notes.into_iter().map(|n| format!("{stage}: {n}")));
        }
        if mode == Mode::RefreshOnly {
            plan.keep_only_drift();
        }
        plan.changes.sort_by(|a, b| {
            order(a)
                .cmp(&order(b))
                .then(a.address.cmp(&b.address))
                .then(a.id.cmp(&b.id))
        });
        plan.summary = summarise(&plan.changes);
        plan
    }

    /// What a refresh-only plan reports: the drift alone, no intended change,
    /// and nothing for the state to take.
    /// A change keeps only its drifted fields, compared with what was last
    /// applied (not with what the stack file says now).
    fn keep_only_drift(&mut self) {
        self.changes.retain(|c| c.drift);
        for change in &mut self.changes {
            if change.fields.is_empty() {
                continue;
            }
            change.fields.retain(|f| f.drift);
            for field in &mut change.fields {
                field.after = field.before.clone();
            }
            change.action = Action::Update;
            change.after = change.before.clone();
            change.reason = format!("changed out of band: {}", names(&change.fields, true));
        }
        self.adopt.clear();
        self.forget.clear();
    }

    /// Nothing to change in the world (adopting or forgetting records is
    /// bookkeeping), and nothing in the way.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.foreign.is_empty() && self.blocked.is_empty()
    }

    pub fn has_bookkeeping(&self) -> bool {
        !self.adopt.is_empty() || !self.forget.is_empty()
    }
}

fn summarise(changes: &[Change]) -> Summary {
    let mut summary = Summary::default();
    for change in changes {
        match change.action {
            Action::Create => summary.create += 1,
            Action::Update => summary.update += 1,
            Action::Replace => summary.replace += 1,
            Action::Delete => summary.delete += 1,
        }
        summary.drift += usize::from(change.drift);
    }
    summary
}

/// Merges the record's attributes with what could be observed; what refresh
/// reads whole stands alone.
fn live_view(record: Option<&Record>, observed: &Observed) -> Value {
    if observed.handling.read_whole {
        return observed.attrs.clone();
    }
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

/// Every leaf of `value` by its path. Lists of objects are compared element
/// by element (`containers[web].image`), by name where elements have one.
pub fn flatten(value: &Value) -> BTreeMap<FieldPath, Value> {
    let mut out = BTreeMap::new();
    flatten_into(&FieldPath::default(), value, &mut out);
    out
}

fn flatten_into(prefix: &FieldPath, value: &Value, out: &mut BTreeMap<FieldPath, Value>) {
    match value {
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_object) => {
            for (i, item) in items.iter().enumerate() {
                let key = item
                    .get("name")
                    .and_then(Value::as_str)
                    .map_or_else(|| i.to_string(), str::to_string);
                flatten_into(&prefix.item(&key), item, out);
            }
        }
        Value::Object(map) if !map.is_empty() => {
            for (key, child) in map {
                flatten_into(&prefix.key(key), child, out);
            }
        }
        _ => {
            out.insert(prefix.clone(), value.clone());
        }
    }
}

/// Field-by-field differences between the live view and the desired
/// attributes, over the fields the stack manages (and, as `prior` says,
/// those it set before). A field is drift when the record had it and the
/// live value is not the recorded one.
fn field_changes(
    prior: &PriorFields,
    before: Option<&Value>,
    live: &Value,
    desired: &Value,
) -> Vec<FieldChange> {
    let b = before.map(flatten).unwrap_or_default();
    let l = flatten(live);
    let d = flatten(desired);
    let still_counts = |path: &FieldPath| match prior {
        PriorFields::Ignored => false,
        PriorFields::All => true,
        PriorFields::Under(prefixes) => prefixes.iter().any(|p| path.starts_with(p)),
    };
    let managed: BTreeSet<&FieldPath> = d
        .keys()
        .chain(b.keys().filter(|k| still_counts(k)))
        .collect();
    managed
        .into_iter()
        .filter(|path| l.get(*path) != d.get(*path))
        .map(|path| FieldChange {
            path: path.clone(),
            before: b.get(path).cloned(),
            observed: l.get(path).cloned(),
            after: d.get(path).cloned(),
            drift: b.contains_key(path) && b.get(path) != l.get(path),
        })
        .collect()
}

fn names(fields: &[FieldChange], drifted: bool) -> String {
    fields
        .iter()
        .filter(|f| f.drift == drifted)
        .map(|f| f.path.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The changes that make the live world match `desired`, given what the
/// state `records` and what refresh `observed`.
pub fn diff(desired: &[Resource], records: &State, observed: &[Observed]) -> PlanPart {
    let mut part = PlanPart::default();
    let wanted: BTreeSet<&str> = desired.iter().map(|r| r.address.as_str()).collect();

    // Another state's things are named, never taken over or removed.
    let (foreign, observed): (Vec<&Observed>, Vec<&Observed>) =
        observed.iter().partition(|o| is_foreign(o, records));
    part.foreign = foreign.into_iter().cloned().collect();
    for resource in desired {
        let handling = &resource.handling;
        let record = records.get(&resource.address);
        let mut found: Vec<&Observed> = observed
            .iter()
            .copied()
            .filter(|o| o.address == resource.address)
            .collect();
        // Keep the one the state knows, else the first; the rest are duplicates.
        let keep = found
            .iter()
            .position(|o| record.and_then(|r| r.id.as_deref()) == Some(o.id.as_str()))
            .unwrap_or(0);
        let live = (!found.is_empty()).then(|| found.remove(keep));
        for duplicate in found {
            part.changes.push(delete_change(
                duplicate,
                None,
                "a duplicate of the same address (an interrupted create made two)",
                false,
            ));
        }
        let token = record.and_then(|r| r.pending_token.clone());
        match (live, &handling.rebuild) {
            (_, Some(why)) => {
                let mut change = Change::new(
                    &resource.address,
                    &resource.kind,
                    Action::Create,
                    why.clone(),
                    handling,
                );
                change.before = record.map(|r| r.attrs.clone());
                change.after = Some(resource.attrs.clone());
                change.token = token;
                part.changes.push(change);
            }
            (None, None) => {
                let was_made = record.is_some_and(|r| r.id.is_some());
                let reason = if was_made {
                    "gone from the live world (deleted or terminated out of band)"
                } else if token.is_some() {
                    "a create that did not finish (it failed, timed out or was stopped); tried again with the same token"
                } else {
                    "new in the stack"
                };
                let mut change = Change::new(
                    &resource.address,
                    &resource.kind,
                    Action::Create,
                    reason.to_string(),
                    handling,
                );
                change.drift = was_made;
                change.before = record.map(|r| r.attrs.clone());
                change.after = Some(resource.attrs.clone());
                change.token = token;
                part.changes.push(change);
            }
            (Some(live), None) => {
                let recorded = record.filter(|r| r.id.as_deref() == Some(live.id.as_str()));
                if recorded.is_none() {
                    part.adopt.push(live.clone());
                }
                let view = live_view(recorded, live);
                let fields = field_changes(
                    &handling.prior_fields,
                    recorded.map(|r| &r.attrs),
                    &view,
                    &resource.attrs,
                );
                if fields.is_empty() {
                    continue;
                }
                let fixed: Vec<String> = fields
                    .iter()
                    .filter(|f| handling.replace.iter().any(|rule| rule.matches(&f.path)))
                    .map(|f| f.path.to_string())
                    .collect();
                let drift = fields.iter().any(|f| f.drift);
                let mut parts = Vec::new();
                if drift {
                    parts.push(format!("changed out of band: {}", names(&fields, true)));
                }
                if recorded.is_none() {
                    parts.push(format!(
                        "found by its tags but not recorded, and unlike what the stack wants: {}",
                        names(&fields, false)
                    ));
                } else if fields.iter().any(|f| !f.drift) {
                    parts.push(format!("changed in the stack: {}", names(&fields, false)));
                }
                let mut reason = parts.join("; ");
                if !fixed.is_empty() {
                    reason.push_str(&format!(
                        " ({} cannot change in place: deleted and made again)",
                        fixed.join(", ")
                    ));
                }
                let action = if fixed.is_empty() {
                    Action::Update
                } else {
                    Action::Replace
                };
                let mut change =
                    Change::new(&resource.address, &resource.kind, action, reason, handling);
                change.id = Some(live.id.clone());
                change.drift = drift;
                change.before = recorded.map(|r| r.attrs.clone());
                change.observed = Some(live.attrs.clone());
                change.after = Some(resource.attrs.clone());
                change.fields = fields;
                part.changes.push(change);
            }
        }
    }

    for live in observed
        .iter()
        .copied()
        .filter(|o| !wanted.contains(o.address.as_str()))
    {
        let record = records
            .get(&live.address)
            .filter(|r| r.id.as_deref() == Some(live.id.as_str()));
        let change = match record {
            Some(_) => delete_change(live, record, "no longer in the stack", false),
            // Not declared, not recorded, but carrying the stack's marks: the
            // live world has something the stack did not apply.
            None => delete_change(
                live,
                None,
                "carries the stack's marks but the stack neither declares nor recorded it",
                true,
            ),
        };
        part.changes.push(change);
    }
    for record in &records.resources {
        let exists = observed.iter().any(|o| o.address == record.address);
        if !exists && !wanted.contains(record.address.as_str()) {
            part.forget.push(record.address.clone());
        }
    }
    part
}

fn delete_change(live: &Observed, record: Option<&Record>, reason: &str, drift: bool) -> Change {
    let mut change = Change::new(
        &live.address,
        &live.kind,
        Action::Delete,
        reason.to_string(),
        &live.handling,
    );
    change.id = Some(live.id.clone());
    change.drift = drift;
    change.before = record.map(|r| r.attrs.clone());
    change.observed = Some(live.attrs.clone());
    change
}

/// The changes that remove everything the stack made: all that refresh
/// found, by its marks or by recorded id. Records of what is gone are dropped.
/// Another state's, and not recorded here.
fn is_foreign(live: &Observed, records: &State) -> bool {
    live.handling.foreign.is_some()
        && records
            .get(&live.address)
            .is_none_or(|r| r.id.as_deref() != Some(live.id.as_str()))
}

pub fn destroy(records: &State, observed: &[Observed]) -> PlanPart {
    let ours = |live: &Observed| !is_foreign(live, records);
    let changes = observed
        .iter()
        .filter(|live| ours(live))
        .map(|live| {
            let record = records
                .get(&live.address)
                .filter(|r| r.id.as_deref() == Some(live.id.as_str()));
            delete_change(live, record, "destroying the stack", false)
        })
        .collect();
    let forget = records
        .resources
        .iter()
        .filter(|r| !observed.iter().any(|o| o.address == r.address))
        .map(|r| r.address.clone())
        .collect();
    PlanPart {
        changes,
        forget,
        foreign: observed
            .iter()
            .filter(|live| !ours(live))
            .cloned()
            .collect(),
        ..PlanPart::default()
    }
}

/// Only forgets: what the records name goes away with something else (the
/// cluster with its nodes).
pub fn forget_all(records: &State) -> PlanPart {
    PlanPart {
        forget: records
            .resources
            .iter()
            .map(|r| r.address.clone())
            .collect(),
        ..PlanPart::default()
    }
}

const SENSITIVE: &[&str] = &["password", "secret", "privatekey", "token", "cookie"];
const SENSITIVE_SHOWN: &str = "(sensitive)";

fn is_sensitive(key: &str) -> bool {
    let key = key.to_lowercase();
    SENSITIVE.iter().any(|s| key.contains(s))
}

/// Replaces values whose keys name secrets with `"(sensitive)"`.
pub fn redact(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    let v = if is_sensitive(k) {
                        Value::String(SENSITIVE_SHOWN.into())
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

/// Replaces the value at `path` in `value` (lists by element name or index).
fn hide_at(value: &mut Value, path: &[Segment]) {
    let Some((first, rest)) = path.split_first() else {
        *value = Value::String(SENSITIVE_SHOWN.into());
        return;
    };
    let child = match (first, value) {
        (Segment::Key(key), Value::Object(map)) => map.get_mut(key),
        (Segment::Item(item), Value::Array(items)) => {
            let by_name = items
                .iter()
                .position(|i| i.get("name").and_then(Value::as_str) == Some(item.as_str()));
            match by_name.or_else(|| item.parse().ok()) {
                Some(i) => items.get_mut(i),
                None => None,
            }
        }
        _ => None,
    };
    if let Some(child) = child {
        hide_at(child, rest);
    }
}

/// The plan for machines, every sensitive value redacted.
pub fn to_json(plan: &Plan) -> Value {
    let mut shown = plan.clone();
    shown.changes = plan.changes.iter().map(Change::redacted).collect();
    for adopted in &mut shown.adopt {
        adopted.attrs = redact(&adopted.attrs);
        for path in &adopted.handling.sensitive {
            hide_at(&mut adopted.attrs, path.segments());
        }
    }
    serde_json::to_value(&shown).expect("plan serialises")
}

/// A plan with drift, an edit, a stray, a secret and a forgotten record,
/// for the snapshots of its JSON and of how the CLI renders it.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;
    use serde_json::json;

    pub fn resource(address: &str, attrs: Value) -> Resource {
        Resource {
            address: address.into(),
            kind: "instance".into(),
            attrs,
            handling: Handling::default()
                .replace(vec![ReplaceRule::at("ami")])
                .prior_fields(PriorFields::Under(vec![FieldPath::parse("tags")])),
        }
    }

    pub fn observed(address: &str, id: &str, attrs: Value) -> Observed {
        Observed {
            address: address.into(),
            kind: "instance".into(),
            id: id.into(),
            attrs,
            handling: Handling::default(),
        }
    }

    pub fn record(address: &str, id: &str, attrs: Value) -> Record {
        Record {
            address: address.into(),
            kind: "instance".into(),
            id: Some(id.into()),
            attrs,
            pending_token: None,
        }
    }

    pub fn example_plan() -> Plan {
        let mut state = State::new("demo", "ec2");
        state.put(record(
            "ec2.instance.a[0]",
            "i-1",
            json!({"ami": "x", "instanceType": "t3.large", "state": "running", "ingress": ["all from self"], "tags": {"team": "platform"}}),
        ));
        state.put(record("ec2.instance.gone[0]", "i-9", json!({"ami": "x"})));
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
        let stage = StageRef {
            number: 1,
            of: 1,
            name: "infrastructure".into(),
        };
        Plan::assemble(
            "demo",
            "ec2",
            Mode::Normal,
            3,
            vec![(stage, diff(&desired, &state, &live))],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::{observed, record, resource};
    use super::*;
    use serde_json::json;

    fn state_with(address: &str, id: &str, attrs: Value) -> State {
        let mut state = State::new("demo", "ec2");
        state.put(record(address, id, attrs));
        state
    }

    fn stage(number: usize) -> StageRef {
        StageRef {
            number,
            of: 2,
            name: format!("s{number}"),
        }
    }

    fn plan_of(part: PlanPart) -> Plan {
        Plan::assemble("demo", "ec2", Mode::Normal, 0, vec![(stage(1), part)])
    }

    #[test]
    fn a_new_resource_is_created() {
        let desired = [resource("a", json!({"ami": "x"}))];
        let part = diff(&desired, &State::new("demo", "ec2"), &[]);
        assert_eq!(part.changes.len(), 1);
        assert_eq!(part.changes[0].action, Action::Create);
        assert!(!part.changes[0].drift);
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
        let part = diff(&[resource("a", attrs.clone())], &state, &live);
        assert_eq!(part.changes[0].action, Action::Update);
        assert!(part.changes[0].drift);
        assert_eq!(
            part.changes[0].fields.len(),
            1,
            "tags not set by stack are ignored"
        );
        let edited = json!({"ami": "y", "state": "running", "tags": {"Name": "a"}});
        let live = [observed("a", "i-1", attrs)];
        let part = diff(&[resource("a", edited)], &state, &live);
        assert_eq!(part.changes[0].action, Action::Replace);
        assert!(!part.changes[0].drift);
    }

    #[test]
    fn a_field_newly_set_over_a_live_value_the_stack_never_set_is_an_edit() {
        let recorded = json!({"spec": {"replicas": 3}});
        let state = state_with("a", "i-1", recorded.clone());
        let live = [observed(
            "a",
            "i-1",
            json!({"spec": {"replicas": 3, "revisionHistoryLimit": 10}}),
        )];
        let desired = json!({"spec": {"replicas": 3, "revisionHistoryLimit": 5}});
        let part = diff(&[resource("a", desired)], &state, &live);
        let change = &part.changes[0];
        assert!(!change.drift, "{change:?}");
        assert_eq!(
            change.reason,
            "changed in the stack: spec.revisionHistoryLimit"
        );
    }

    #[test]
    fn nested_replace_rules_with_exceptions() {
        let rule = ReplaceRule::under_except("spec", &["spec.replicas", "spec.template"]);
        assert!(rule.matches(&FieldPath::parse("spec.revisionHistoryLimit")));
        assert!(rule.matches(&FieldPath::parse("spec.selector.matchLabels.app")));
        assert!(!rule.matches(&FieldPath::parse("spec.replicas")));
        assert!(!rule.matches(&FieldPath::parse(
            "spec.template.spec.containers[web].image"
        )));
        assert!(!rule.matches(&FieldPath::parse("metadata.labels")));
    }

    #[test]
    fn keys_with_dots_are_quoted_and_tags_are_found_by_segment() {
        let flat = flatten(
            &json!({"metadata": {"labels": {"app.kubernetes.io/name": "web"}},
            "tags": {"cost.center": "7"}}),
        );
        let paths: Vec<String> = flat.keys().map(ToString::to_string).collect();
        assert_eq!(
            paths,
            [
                "metadata.labels[\"app.kubernetes.io/name\"]",
                "tags[\"cost.center\"]"
            ]
        );
        let tag = flat.keys().nth(1).unwrap();
        assert_eq!(tag.under("tags"), Some("cost.center"));
    }

    #[test]
    fn duplicates_strays_and_adoption() {
        let attrs = json!({"ami": "x"});
        let state = state_with("a", "i-1", attrs.clone());
        let live = [
            observed("a", "i-2", attrs.clone()),
            observed("a", "i-1", attrs.clone()),
            observed("b", "i-3", attrs.clone()),
            observed("c", "i-4", attrs.clone()),
        ];
        let desired = [resource("a", attrs.clone()), resource("c", attrs)];
        let plan = plan_of(diff(&desired, &state, &live));
        let deleted: Vec<_> = plan
            .changes
            .iter()
            .map(|c| (c.action, c.id.clone().unwrap(), c.drift))
            .collect();
        assert_eq!(
            deleted,
            vec![
                (Action::Delete, "i-2".to_string(), false),
                (Action::Delete, "i-3".to_string(), true)
            ]
        );
        assert_eq!(plan.adopt.len(), 1);
        assert_eq!(plan.adopt[0].id, "i-4");
    }

    #[test]
    fn removals_come_last_the_last_stage_first_and_refresh_only_keeps_drift() {
        let make = |address: &str, action: Action, stage_number: usize, drift: bool| {
            let mut change = Change::new(address, "k", action, String::new(), &Handling::default());
            change.drift = drift;
            (
                stage(stage_number),
                PlanPart {
                    changes: vec![change],
                    ..PlanPart::default()
                },
            )
        };
        let parts = vec![
            make("a-delete", Action::Delete, 1, false),
            make("b-create", Action::Create, 2, true),
            make("c-delete", Action::Delete, 2, true),
            make("d-update", Action::Update, 1, false),
        ];
        let plan = Plan::assemble("demo", "ec2", Mode::Normal, 0, parts.clone());
        let order: Vec<&str> = plan.changes.iter().map(|c| c.address.as_str()).collect();
        assert_eq!(order, ["d-update", "b-create", "c-delete", "a-delete"]);
        let drift = Plan::assemble("demo", "ec2", Mode::RefreshOnly, 0, parts);
        let order: Vec<&str> = drift.changes.iter().map(|c| c.address.as_str()).collect();
        assert_eq!(order, ["b-create", "c-delete"]);
        assert_eq!(drift.summary.drift, 2);
    }

    #[test]
    fn a_refresh_only_plan_reports_drift_against_what_was_last_applied_and_nothing_intended() {
        let recorded = json!({"ami": "x", "state": "running"});
        let state = state_with("a", "i-1", recorded.clone());
        let live = [observed(
            "a",
            "i-1",
            json!({"ami": "x", "state": "stopped"}),
        )];
        let desired = [resource("a", json!({"ami": "y", "state": "running"}))];
        let part = diff(&desired, &state, &live);
        assert_eq!(part.changes[0].action, Action::Replace);
        let plan = Plan::assemble("demo", "ec2", Mode::RefreshOnly, 0, vec![(stage(1), part)]);
        let change = &plan.changes[0];
        assert_eq!(change.action, Action::Update);
        assert_eq!(change.reason, "changed out of band: state");
        assert_eq!(change.after, Some(recorded));
        let fields: Vec<(String, Option<Value>)> = change
            .fields
            .iter()
            .map(|f| (f.path.to_string(), f.after.clone()))
            .collect();
        assert_eq!(fields, [("state".to_string(), Some(json!("running")))]);
        assert_eq!(plan.summary.replace, 0);
    }

    #[test]
    fn rendered_plan_json_snapshot() {
        insta::assert_json_snapshot!(to_json(&fixtures::example_plan()));
    }

    #[test]
    fn sensitive_paths_and_names_are_redacted() {
        let value =
            json!({"adminPassword": "hunter2", "nested": {"erlangCookie": "c"}, "name": "x"});
        assert_eq!(
            redact(&value),
            json!({"adminPassword": "(sensitive)", "nested": {"erlangCookie": "(sensitive)"}, "name": "x"})
        );
        let secret = Resource {
            address: "k8s.a/Secret/s".into(),
            kind: "k8s:v1:Secret".into(),
            attrs: json!({"data": {"tls.key": "a2V5"}, "type": "Opaque"}),
            handling: Handling::default().sensitive(&["data"]),
        };
        let part = diff(&[secret], &State::new("demo", "kvm"), &[]);
        let shown = part.changes[0].redacted();
        assert_eq!(
            shown.after,
            Some(json!({"data": "(sensitive)", "type": "Opaque"}))
        );
    }
}
