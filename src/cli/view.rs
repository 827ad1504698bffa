//! What the commands print on stdout for people: plans with drift shown
//! apart from intended changes, the status of a stack, and what an apply
//! did. Sensitive values are redacted before anything is shown.

use std::fmt::Write as _;

use serde_json::Value;

use crate::engine::{Applied, Change, Expiring, Mode, Plan, Status};
use crate::upgrade::{Outcome, Report};

fn show(value: Option<&Value>) -> String {
    match value {
        None => "(none)".to_string(),
        Some(Value::String(s)) => format!("{s:?}"),
        Some(Value::Array(items)) => {
            let items: Vec<String> = items.iter().map(|v| show(Some(v))).collect();
            format!("[{}]", items.join(", "))
        }
        Some(other) => other.to_string(),
    }
}

fn render_change(out: &mut String, change: &Change) {
    let change = change.redacted();
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
    if let Some(stage) = change.stage.as_ref().filter(|s| s.of > 1) {
        let _ = writeln!(
            out,
            "        stage {} of {}: {}",
            stage.number, stage.of, stage.name
        );
    }
    let _ = writeln!(out, "        {}", change.reason);
    for field in &change.fields {
        let path = field.path.to_string();
        if let (Some(Value::Array(live)), Some(Value::Array(want))) =
            (&field.observed, &field.after)
        {
            for item in live.iter().filter(|i| !want.contains(i)) {
                let _ = writeln!(out, "        {path}: - {}", show(Some(item)));
            }
            for item in want.iter().filter(|i| !live.contains(i)) {
                let _ = writeln!(out, "        {path}: + {}", show(Some(item)));
            }
            continue;
        }
        let mut line = format!(
            "        {path}: {} → {}",
            show(field.observed.as_ref()),
            show(field.after.as_ref())
        );
        if field.drift {
            let _ = write!(line, "   (last applied: {})", show(field.before.as_ref()));
        }
        let _ = writeln!(out, "{line}");
    }
}

/// The plan for people: drift apart from intended changes, then totals.
pub fn plan(plan: &Plan) -> String {
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
            Mode::Destroy => "Destroy",
            Mode::Normal | Mode::RefreshOnly => "Changes",
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
    if !plan.foreign.is_empty() {
        let _ = writeln!(
            out,
            "Made by another state of this stack (another checkout, or a lost state file), left alone:"
        );
        for live in &plan.foreign {
            let _ = writeln!(
                out,
                "  {} ({}): {}",
                live.address,
                live.id,
                live.handling.foreign.as_deref().unwrap_or_default()
            );
        }
        let _ = writeln!(
            out,
            "  This plan is not applied while they are there: use another stack name, or take them over into a new state with `--adopt`."
        );
    }
    for note in &plan.notes {
        let _ = writeln!(out, "Note: {note}");
    }
    if !plan.blocked.is_empty() {
        let _ = writeln!(
            out,
            "Cannot be applied as the stack stands (`up` refuses it):"
        );
        for reason in &plan.blocked {
            let _ = writeln!(out, "  {reason}");
        }
    }
    let s = plan.summary;
    match (plan.is_empty(), plan.mode) {
        (true, Mode::RefreshOnly) => {
            let _ = writeln!(out, "No drift: the live world is as stack last applied it.");
        }
        (true, _) => {
            let _ = writeln!(out, "No changes: the live world matches the stack.");
        }
        (false, Mode::RefreshOnly) => {
            let _ = writeln!(
                out,
                "Drift: {} resource{} differ from what stack last applied (`stack up` repairs {}).",
                s.drift,
                if s.drift == 1 { "" } else { "s" },
                if s.drift == 1 { "it" } else { "them" }
            );
        }
        (false, _) => {
            let _ = writeln!(
                out,
                "Plan: {} to create, {} to update, {} to replace, {} to delete ({} repairing drift).",
                s.create, s.update, s.replace, s.delete, s.drift
            );
        }
    }
    out
}

/// What an apply did, in one line, with the calls it had to retry.
pub fn applied(plan: &Plan, applied: &Applied) -> String {
    let s = plan.summary;
    let retried = if applied.retries.is_empty() {
        String::new()
    } else {
        let each: Vec<String> = applied
            .retries
            .iter()
            .map(|r| {
                let times = if r.count == 1 { "time" } else { "times" };
                format!("{} {} {times}", r.service, r.count)
            })
            .collect();
        format!(
            " (calls retried after transient errors: {})",
            each.join(", ")
        )
    };
    format!(
        "Applied: {} created, {} updated, {} replaced, {} deleted{retried}. State: {}",
        s.create, s.update, s.replace, s.delete, applied.state_location
    )
}

/// `stack status` for people.
pub fn status(status: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "stack {} ({})", status.stack, status.provider);
    match status.state_serial {
        Some(serial) => {
            let _ = writeln!(
                out,
                "state:   {} (serial {serial}, {} resources)",
                status.state_file, status.recorded_resources
            );
        }
        None => {
            let _ = writeln!(
                out,
                "state:   {} (none yet: run `stack up`)",
                status.state_file
            );
        }
    }
    match (&status.ssh_key, &status.ssh_user) {
        (Some(key), Some(user)) => {
            let _ = writeln!(out, "ssh key: {} (user {user})", key.display());
        }
        (Some(key), None) => {
            let _ = writeln!(out, "ssh key: {}", key.display());
        }
        (None, _) => {
            let _ = writeln!(out, "ssh key: none yet");
        }
    }
    match (&status.kubeconfig, &status.context) {
        (Some(path), Some(context)) => {
            let _ = writeln!(
                out,
                "kubeconfig: {} (context {context}; `stack kubeconfig --merge` adds it to yours)",
                path.display()
            );
        }
        _ if status.cluster => {
            let _ = writeln!(out, "kubeconfig: none yet (run `stack up`)");
        }
        _ => {}
    }
    if let Some(ca) = &status.ca_certificate {
        let _ = writeln!(
            out,
            "CA certificate: {} (trust it to reach the endpoints)",
            ca.display()
        );
    }
    if !status.endpoints.is_empty() {
        let _ = writeln!(out, "endpoints:");
        for endpoint in &status.endpoints {
            let _ = writeln!(out, "  {}: {}", endpoint.name, endpoint.url);
        }
    }
    if let Some(grafana) = &status.grafana {
        let _ = writeln!(out, "grafana: {grafana}");
    }
    for db in &status.databases {
        let _ = writeln!(
            out,
            "database {} ({}): membership {}",
            db.name, db.kind, db.membership
        );
        let _ = writeln!(out, "  image: {}", db.image);
        for endpoint in &db.endpoints {
            let _ = writeln!(out, "  endpoint: {endpoint}");
        }
        let _ = writeln!(
            out,
            "  credentials: Secret {} (username, password)",
            db.credentials_secret
        );
        let _ = writeln!(out, "    {}", db.credentials_command);
        for r in &db.replications {
            match &r.error {
                Some(error) => {
                    let _ = writeln!(out, "  replication {}: {} ({error})", r.name, r.state);
                }
                None => {
                    let _ = writeln!(out, "  replication {}: {}", r.name, r.state);
                }
            }
        }
        for r in &db.replicas {
            let lag = match (r.lag, &r.problem) {
                (Some(n), _) => format!("{n} transactions behind the primary"),
                (None, Some(problem)) => format!("lag unknown ({problem})"),
                (None, None) => "lag unknown".to_string(),
            };
            let _ = writeln!(out, "  replica {}: {lag}", r.pod);
        }
        // The last few; `--output json` has them all.
        for u in db.upgrades.iter().rev().take(5).rev() {
            let line = upgrade_line(&u.from, &u.to, u.result, u.detail.as_deref());
            let _ = writeln!(out, "  upgrade {}: {line}", u.started);
        }
        for problem in &db.problems {
            let _ = writeln!(out, "  problem: {problem}");
        }
    }
    if status.nodes.is_empty() {
        let _ = writeln!(out, "no nodes");
    } else {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<28} {:<21} {:<9} {:<16} {:<16}",
            "NODE", "ID", "STATE", "PUBLIC", "PRIVATE"
        );
        for node in &status.nodes {
            let _ = writeln!(
                out,
                "{:<28} {:<21} {:<9} {:<16} {:<16}",
                node.address,
                node.id,
                node.state,
                node.public_address.as_deref().unwrap_or("-"),
                node.private_address.as_deref().unwrap_or("-")
            );
        }
    }
    out
}

/// `stack upgrade --check` for people: a row per database with its
/// candidate and the candidate's digest (short), or why there is none.
pub fn upgrade_check(report: &Report) -> String {
    let mut rows = vec![[
        "DATABASE".to_string(),
        "IMAGE".to_string(),
        "CURRENT".to_string(),
        "CANDIDATE".to_string(),
        "DIGEST".to_string(),
    ]];
    for db in &report.databases {
        let current = db.current_tag.clone().unwrap_or_else(|| "-".to_string());
        let (candidate, digest) = match &db.outcome {
            Outcome::Candidate(c) => {
                let hex = c.digest.strip_prefix("sha256:").unwrap_or(&c.digest);
                (
                    c.tag.clone(),
                    format!("sha256:{}", &hex[..hex.len().min(12)]),
                )
            }
            Outcome::NoCandidate(reason) => ("-".to_string(), format!("none: {reason}")),
            Outcome::Failed(_) => ("-".to_string(), "failed (see below)".to_string()),
        };
        rows.push([
            db.database.clone(),
            db.image.clone(),
            current,
            candidate,
            digest,
        ]);
    }
    let widths: Vec<usize> = (0..4)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            match widths.get(i) {
                Some(width) => {
                    let _ = write!(line, "{cell:<width$}  ");
                }
                None => line.push_str(cell),
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
    out
}

/// The upgrades `stack upgrade` is about to roll out.
pub fn rollout_plan(targets: &[crate::upgrade::apply::Target]) -> String {
    let mut out = String::from(
        "\nTo roll out, one member at a time from the highest ordinal (replicas before the primary), each ready and the cluster healthy before the next:\n",
    );
    for t in targets {
        let _ = writeln!(out, "  database {}: {} -> {}", t.database, t.from, t.to);
    }
    out
}

/// `FROM -> TO: RESULT (DETAIL)`, as status and upgrade show an upgrade.
fn upgrade_line(
    from: &str,
    to: &str,
    result: crate::engine::UpgradeResult,
    detail: Option<&str>,
) -> String {
    let mut line = format!("{from} -> {to}: {}", result.as_str());
    if let Some(detail) = detail {
        line.push_str(&format!(" ({detail})"));
    }
    line
}

/// What `stack upgrade` rolled out.
pub fn rolled(rolled: &[crate::upgrade::apply::Rolled]) -> String {
    if rolled.is_empty() {
        return "nothing to roll out\n".into();
    }
    let mut out = String::new();
    for r in rolled {
        let line = upgrade_line(&r.from, &r.to, r.result, r.detail.as_deref());
        let _ = writeln!(out, "database {}: {line}", r.database);
    }
    out
}

/// `stack state history`: one line per serial, oldest first.
pub fn history(entries: &[crate::state::HistoryEntry]) -> String {
    if entries.is_empty() {
        return "no serial of this stack's state was written yet\n".to_string();
    }
    let mut out = String::new();
    let who = entries
        .iter()
        .map(|e| e.who.len())
        .max()
        .unwrap_or(0)
        .max(3);
    let _ = writeln!(
        out,
        "{:>6}  {:<20}  {:<who$}  {:>7}  COMMAND",
        "SERIAL", "WHEN", "WHO", "PID"
    );
    for entry in entries {
        let _ = writeln!(
            out,
            "{:>6}  {:<20}  {:<who$}  {:>7}  {}",
            entry.serial, entry.at, entry.who, entry.pid, entry.command
        );
    }
    out
}

/// What `stack gc` found: the expired environments it removes, and those
/// it leaves until they expire.
pub fn environments(stack: &str, expired: &[Expiring], alive: &[Expiring]) -> String {
    let mut out = String::new();
    if expired.is_empty() && alive.is_empty() {
        let _ = writeln!(out, "no environment of stack {stack} carries an expiry");
        return out;
    }
    for (title, envs) in [("expired", expired), ("not expired", alive)] {
        for env in envs {
            let _ = writeln!(
                out,
                "{title}: {} (expires {}): {}",
                env.name,
                crate::expiry::rfc3339(env.expires),
                env.things.join(", ")
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn rendered_plan_snapshot() {
        let plan = crate::engine::plan::fixtures::example_plan();
        insta::assert_snapshot!(super::plan(&plan));
    }
}
