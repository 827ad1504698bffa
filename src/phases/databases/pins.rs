//! The images `stack upgrade` rolled out, and each database's upgrade
//! history, kept in the state. The stack file stays the truth: a database
//! runs the file's image until an upgrade pins a newer one by digest, and
//! keeps the pinned one only while the file still names the image that
//! upgrade replaced. Every plan says how to write a pin into the file; an
//! edited `image:` wins over the pin, which is then dropped.

use serde::{Deserialize, Serialize};

use crate::engine::ImageUpgrade;
use crate::model::{ImageRef, Stack};
use crate::state::{Record, State};

const PIN: &str = "upgrade:pin";
const HISTORY: &str = "upgrade:history";
const SERVED: &str = "upgrade:schedule";
const SERVED_ADDRESS: &str = "upgrade.schedule";
/// Upgrades kept per database; older ones are dropped.
const HISTORY_KEPT: usize = 50;

/// An image an upgrade rolled out, over the image the file named then.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Pin {
    /// Pinned by digest, as the pods run it.
    pub image: String,
    /// What the stack file named when the upgrade started.
    pub file_image: String,
    /// When the upgrade finished (RFC 3339).
    pub since: String,
}

/// Whether a record is one of these (the database phase owns them).
pub fn is_upgrade(record: &Record) -> bool {
    [PIN, HISTORY, SERVED].contains(&record.kind.as_str())
}

/// The last scheduled upgrade time that was served.
pub fn served(state: &State) -> Option<std::time::SystemTime> {
    state
        .get(SERVED_ADDRESS)
        .and_then(|r| r.attrs["served"].as_str())
        .and_then(|t| humantime::parse_rfc3339(t).ok())
}

pub fn served_record(time: std::time::SystemTime) -> Record {
    let served = humantime::format_rfc3339_seconds(time).to_string();
    Record {
        address: SERVED_ADDRESS.into(),
        kind: SERVED.into(),
        id: Some(served.clone()),
        attrs: serde_json::json!({ "served": served }),
        pending_token: None,
    }
}

fn pin_address(database: &str) -> String {
    format!("upgrade.{database}.pin")
}

fn history_address(database: &str) -> String {
    format!("upgrade.{database}.history")
}

/// The pin of `database`, when an upgrade left one.
pub fn pin(state: &State, database: &str) -> Option<Pin> {
    state
        .get(&pin_address(database))
        .and_then(|r| serde_json::from_value(r.attrs.clone()).ok())
}

/// The upgrades of `database`, oldest first.
pub fn history(state: &State, database: &str) -> Vec<ImageUpgrade> {
    state
        .get(&history_address(database))
        .and_then(|r| serde_json::from_value(r.attrs["upgrades"].clone()).ok())
        .unwrap_or_default()
}

pub fn pin_record(database: &str, pin: &Pin) -> Record {
    Record {
        address: pin_address(database),
        kind: PIN.into(),
        id: Some(pin.image.clone()),
        attrs: serde_json::to_value(pin).expect("a pin serialises"),
        pending_token: None,
    }
}

/// The history record of `database` with `entry` in it: an entry with the
/// same start replaces its earlier version (a running upgrade that ended).
pub fn history_record(state: &State, database: &str, entry: &ImageUpgrade) -> Record {
    let mut upgrades = history(state, database);
    upgrades.retain(|e| e.started != entry.started);
    upgrades.push(entry.clone());
    let drop = upgrades.len().saturating_sub(HISTORY_KEPT);
    upgrades.drain(..drop);
    Record {
        address: history_address(database),
        kind: HISTORY.into(),
        id: Some(database.to_string()),
        attrs: serde_json::json!({ "upgrades": upgrades }),
        pending_token: None,
    }
}

/// The stack as its databases run, and what plans say about the pins.
pub struct Running {
    /// The stack with each pinned image in place of the file's.
    pub stack: Stack,
    /// One note per pin in force or dropped.
    pub notes: Vec<String>,
    /// Pins to drop from the state: the file names another image now, or
    /// the database is gone.
    pub stale: Vec<String>,
}

/// Puts each pin in force while the file still names the image its upgrade
/// replaced.
pub fn running(stack: &Stack, state: &State) -> Running {
    let mut out = Running {
        stack: stack.clone(),
        notes: Vec::new(),
        stale: Vec::new(),
    };
    let file = stack.file.display();
    for record in state.resources.iter().filter(|r| r.kind == PIN) {
        let Ok(pin) = serde_json::from_value::<Pin>(record.attrs.clone()) else {
            out.stale.push(record.address.clone());
            continue;
        };
        let name = record
            .address
            .strip_prefix("upgrade.")
            .and_then(|a| a.strip_suffix(".pin"))
            .unwrap_or_default();
        let Some(db) = out.stack.databases.iter_mut().find(|d| d.name == name) else {
            out.stale.push(record.address.clone());
            continue;
        };
        let named = db.image.to_string();
        if named == pin.image {
            // The file names the pinned image now: the pin did its job.
            out.stale.push(record.address.clone());
        } else if named == pin.file_image {
            match ImageRef::parse(&pin.image) {
                Ok(image) => {
                    db.image = image;
                    out.notes.push(format!(
                        "database {name} runs {} (rolled out by `stack upgrade` at {}), while {file} names {named}: write `image: {}` there, or run `stack upgrade --write`",
                        pin.image, pin.since, pin.image
                    ));
                }
                Err(_) => out.stale.push(record.address.clone()),
            }
        } else {
            out.stale.push(record.address.clone());
            out.notes.push(format!(
                "{file} names {named} for database {name}: it replaces {}, which `stack upgrade` rolled out",
                pin.image
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::UpgradeResult;

    fn stack(image: &str) -> Stack {
        let text = format!(
            "version: 1\nname: s\nkubernetes:\n  kubeconfig: kc\ndatabases:\n  - kind: couchdb\n    name: docs\n    image: {image}\n"
        );
        crate::model::load_str(std::path::Path::new("s.yaml"), &text).expect("a valid stack")
    }

    fn state_with(pin: &Pin) -> State {
        let mut state = State::new("s", "kubernetes");
        state.put(pin_record("docs", pin));
        state
    }

    const PINNED: &str =
        "couchdb:3.5.2@sha256:0000000000000000000000000000000000000000000000000000000000000000";

    fn pinned() -> Pin {
        Pin {
            image: PINNED.into(),
            file_image: "couchdb:3.5.1".into(),
            since: "2026-12-03T03:00:00Z".into(),
        }
    }

    #[test]
    fn a_pin_is_in_force_while_the_file_names_the_image_it_replaced() {
        let running = running(&stack("couchdb:3.5.1"), &state_with(&pinned()));
        assert_eq!(running.stack.databases[0].image.to_string(), PINNED);
        assert!(running.stale.is_empty());
        assert!(
            running.notes[0].contains("stack upgrade --write"),
            "{:?}",
            running.notes
        );
    }

    #[test]
    fn an_edited_image_wins_over_the_pin() {
        let running = running(&stack("couchdb:3.6.0"), &state_with(&pinned()));
        assert_eq!(
            running.stack.databases[0].image.to_string(),
            "couchdb:3.6.0"
        );
        assert_eq!(running.stale, ["upgrade.docs.pin"]);
        assert!(running.notes[0].contains("replaces"), "{:?}", running.notes);
    }

    #[test]
    fn a_pin_written_into_the_file_is_dropped_quietly() {
        let running = running(&stack(PINNED), &state_with(&pinned()));
        assert_eq!(running.stale, ["upgrade.docs.pin"]);
        assert!(running.notes.is_empty());
    }

    #[test]
    fn history_keeps_the_latest_entries_and_replaces_a_running_one() {
        let mut state = State::new("s", "kubernetes");
        let entry = |started: String, result| ImageUpgrade {
            from: "a".into(),
            to: "b".into(),
            started,
            finished: None,
            result,
            detail: None,
        };
        for i in 0..HISTORY_KEPT + 5 {
            state.put(history_record(
                &state,
                "docs",
                &entry(format!("t{i:03}"), UpgradeResult::Running),
            ));
        }
        let last = format!("t{:03}", HISTORY_KEPT + 4);
        state.put(history_record(
            &state,
            "docs",
            &entry(last.clone(), UpgradeResult::Succeeded),
        ));
        let upgrades = history(&state, "docs");
        assert_eq!(upgrades.len(), HISTORY_KEPT);
        assert_eq!(upgrades.last().unwrap().started, last);
        assert_eq!(upgrades.last().unwrap().result, UpgradeResult::Succeeded);
        assert_eq!(upgrades[0].started, "t005");
    }
}
