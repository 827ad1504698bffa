//! The engine driven in-process over a TEST DOUBLE of a phase (`FakePhase`):
//! no cloud and no cluster, only the engine's own promises. Stages apply in
//! the list's order, each gated before the next, and destroy in reverse;
//! a failed gate stops the run; a stop request ends a gate at once and lets
//! the changes under way finish; a stale plan is refused; changes wait for
//! what they name and run in parallel up to the bound.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;

use super::events::Recorder;
use super::*;
use crate::future::BoxFuture;
use crate::state::{LocalBackend, Record, State};

/// What a fake phase's gate does.
#[derive(Clone, Copy, PartialEq)]
enum Gate {
    Pass,
    Fail,
    /// Waits an hour (only a stop request ends it).
    Hang,
}

/// A TEST DOUBLE of a phase: it wants `resources`, finds live what the
/// state records, takes `delay` per change, and logs what it is asked.
struct FakePhase {
    name: &'static str,
    resources: Vec<Resource>,
    delay: Duration,
    fail: Option<&'static str>,
    gate: Gate,
    log: Arc<Mutex<Vec<String>>>,
}

impl FakePhase {
    fn new(name: &'static str, addresses: &[&str], log: &Arc<Mutex<Vec<String>>>) -> FakePhase {
        FakePhase {
            name,
            resources: addresses
                .iter()
                .map(|a| Resource {
                    address: a.to_string(),
                    kind: name.to_string(),
                    attrs: json!({"n": 1}),
                    handling: Handling::default(),
                })
                .collect(),
            delay: Duration::from_millis(20),
            fail: None,
            gate: Gate::Pass,
            log: log.clone(),
        }
    }

    fn note(&self, line: String) {
        self.log.lock().unwrap().push(line);
    }
}

#[derive(Debug, thiserror::Error)]
#[error("scripted failure of {0}")]
struct Scripted(String);

impl Phase for FakePhase {
    fn name(&self) -> &str {
        self.name
    }

    fn owns(&self, record: &Record) -> bool {
        record.kind == self.name
    }

    fn plan<'a>(&'a self, input: PlanInput<'a>) -> BoxFuture<'a, Result<PlanPart, PhaseError>> {
        Box::pin(async move {
            let observed: Vec<Observed> = input
                .records
                .resources
                .iter()
                .map(|r| Observed {
                    address: r.address.clone(),
                    kind: r.kind.clone(),
                    id: r.id.clone().unwrap_or_default(),
                    attrs: r.attrs.clone(),
                    handling: self
                        .resources
                        .iter()
                        .find(|w| w.address == r.address)
                        .map(|w| w.handling.clone())
                        .unwrap_or_default(),
                })
                .collect();
            Ok(match input.mode {
                Mode::Destroy => plan::destroy(input.records, &observed),
                _ => plan::diff(&self.resources, input.records, &observed),
            })
        })
    }

    fn apply<'a>(
        &'a self,
        change: &'a Change,
        _input: ChangeInput<'a>,
    ) -> BoxFuture<'a, Result<Option<Record>, PhaseError>> {
        Box::pin(async move {
            self.note(format!("start {}", change.address));
            tokio::time::sleep(self.delay).await;
            self.note(format!("end {}", change.address));
            if self.fail == Some(change.address.as_str()) {
                return Err(Box::new(Scripted(change.address.clone())) as PhaseError);
            }
            Ok((change.action != Action::Delete).then(|| Record {
                address: change.address.clone(),
                kind: change.kind.clone(),
                id: Some(format!("id-{}", change.address)),
                attrs: change.after.clone().unwrap_or_default(),
                pending_token: None,
            }))
        })
    }

    fn gate<'a>(&'a self, _input: StageInput<'a>) -> BoxFuture<'a, Result<(), PhaseError>> {
        Box::pin(async move {
            self.note(format!("gate {}", self.name));
            match self.gate {
                Gate::Pass => Ok(()),
                Gate::Fail => {
                    Err(Box::new(Scripted(format!("the gate of {}", self.name))) as PhaseError)
                }
                Gate::Hang => {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    Ok(())
                }
            }
        })
    }
}

struct World {
    dir: tempfile::TempDir,
    log: Arc<Mutex<Vec<String>>>,
}

impl World {
    fn new() -> World {
        World {
            dir: tempfile::tempdir().unwrap(),
            log: Arc::new(Mutex::new(Vec::new())),
        }
    }

    async fn session(&self, phases: Vec<FakePhase>) -> Session {
        let backend = Box::new(LocalBackend::new(self.dir.path(), "demo", "fake"));
        let opening = Opening::write("stack up", Duration::ZERO, &Cancel::new());
        let handle = StateHandle::open(backend, &opening, "demo", "fake")
            .await
            .unwrap();
        let phases = phases
            .into_iter()
            .map(|p| Arc::new(p) as Arc<dyn Phase>)
            .collect();
        Session::new(
            "demo",
            "fake",
            handle,
            phases,
            crate::artifacts::Artifacts::new(self.dir.path(), "demo"),
        )
    }

    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    fn position(&self, line: &str) -> usize {
        self.log()
            .iter()
            .position(|l| l == line)
            .unwrap_or_else(|| panic!("no `{line}` in {:?}", self.log()))
    }

    fn saved(&self) -> State {
        let text = std::fs::read_to_string(self.dir.path().join("demo.state.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    fn three_stages(&self) -> Vec<FakePhase> {
        vec![
            FakePhase::new("one", &["one.a", "one.b"], &self.log),
            FakePhase::new("two", &["two.a"], &self.log),
            FakePhase::new("three", &["three.a"], &self.log),
        ]
    }
}

const OPTIONS: ApplyOptions = ApplyOptions { parallelism: 10 };

async fn up(session: &mut Session, cancel: &Cancel) -> Result<Applied, EngineError> {
    let events = Events::discard();
    let plan = session.plan(Mode::Normal, cancel, &events).await?;
    session.apply(&plan, &OPTIONS, cancel, &events).await
}

#[tokio::test]
async fn stages_apply_in_order_each_gated_before_the_next_and_destroy_in_reverse() {
    let world = World::new();
    let mut session = world.session(world.three_stages()).await;
    let cancel = Cancel::new();
    let recorder = Arc::new(Recorder::default());
    let events = Events::new(recorder.clone());
    let plan = session.plan(Mode::Normal, &cancel, &events).await.unwrap();
    let stages: Vec<String> = plan
        .changes
        .iter()
        .map(|c| format!("{} {}", c.address, c.stage.as_ref().unwrap()))
        .collect();
    assert_eq!(
        stages,
        [
            "one.a stage 1 of 3 (one)",
            "one.b stage 1 of 3 (one)",
            "two.a stage 2 of 3 (two)",
            "three.a stage 3 of 3 (three)"
        ]
    );
    session
        .apply(&plan, &OPTIONS, &cancel, &events)
        .await
        .unwrap();
    assert!(world.position("end one.b") < world.position("gate one"));
    assert!(world.position("gate one") < world.position("start two.a"));
    assert!(world.position("gate two") < world.position("start three.a"));
    assert_eq!(world.saved().resources.len(), 4);
    let passed = recorder
        .events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| matches!(e, Event::GatePassed { .. }))
        .count();
    assert_eq!(passed, 3);

    let again = session.plan(Mode::Normal, &cancel, &events).await.unwrap();
    assert!(again.is_empty(), "{:?}", again.changes);

    world.log.lock().unwrap().clear();
    let destroy = session.plan(Mode::Destroy, &cancel, &events).await.unwrap();
    let order: Vec<&str> = destroy.changes.iter().map(|c| c.address.as_str()).collect();
    assert_eq!(order, ["three.a", "two.a", "one.a", "one.b"]);
    session
        .apply(&destroy, &OPTIONS, &cancel, &events)
        .await
        .unwrap();
    assert!(world.position("end three.a") < world.position("start two.a"));
    assert!(world.position("end two.a") < world.position("start one.a"));
    assert!(
        !world.log().iter().any(|l| l.starts_with("gate")),
        "a destroy has no gates: {:?}",
        world.log()
    );
    assert!(world.saved().resources.is_empty());
}

#[tokio::test]
async fn a_gate_that_fails_stops_the_run_before_the_next_stage() {
    let world = World::new();
    let mut phases = world.three_stages();
    phases[1].gate = Gate::Fail;
    let mut session = world.session(phases).await;
    let err = up(&mut session, &Cancel::new()).await.unwrap_err();
    assert!(
        matches!(&err, EngineError::Stage { stage, .. } if stage.number == 2),
        "{err}"
    );
    assert_eq!(err.to_string(), "stage 2 of 3 (two) is not healthy");
    assert!(!world.log().iter().any(|l| l.contains("three.a")));
    let saved: Vec<String> = world
        .saved()
        .resources
        .into_iter()
        .map(|r| r.address)
        .collect();
    assert_eq!(saved, ["one.a", "one.b", "two.a"]);
}

#[tokio::test]
async fn a_stop_ends_a_gate_at_once_with_the_state_saved_and_the_next_run_goes_on() {
    let world = World::new();
    let mut phases = world.three_stages();
    phases[1].gate = Gate::Hang;
    let mut session = world.session(phases).await;
    let cancel = Cancel::new();
    let stopper = {
        let cancel = cancel.clone();
        let log = world.log.clone();
        tokio::spawn(async move {
            while !log.lock().unwrap().iter().any(|l| l == "gate two") {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            cancel.request(StopReason::Interrupt);
        })
    };
    let err = tokio::time::timeout(Duration::from_secs(30), up(&mut session, &cancel))
        .await
        .expect("a stop ends the gate")
        .unwrap_err();
    stopper.await.unwrap();
    let message = err.to_string();
    assert!(
        message.starts_with("interrupted by SIGINT while waiting for stage 2 of 3 (two);"),
        "{message}"
    );
    assert!(
        message.ends_with("the next `stack up` continues from there"),
        "{message}"
    );
    assert_eq!(world.saved().resources.len(), 3);

    drop(session);
    let mut phases = world.three_stages();
    phases[1].gate = Gate::Pass;
    let mut session = world.session(phases).await;
    world.log.lock().unwrap().clear();
    up(&mut session, &Cancel::new()).await.unwrap();
    assert_eq!(
        world
            .log()
            .iter()
            .filter(|l| l.starts_with("start"))
            .collect::<Vec<_>>(),
        ["start three.a"],
        "only what was left"
    );
}

#[tokio::test]
async fn a_stop_during_a_parallel_apply_lets_running_changes_finish_and_starts_no_more() {
    let world = World::new();
    let addresses: Vec<String> = (0..6).map(|i| format!("one.{i}")).collect();
    let refs: Vec<&str> = addresses.iter().map(String::as_str).collect();
    let mut phase = FakePhase::new("one", &refs, &world.log);
    phase.delay = Duration::from_millis(200);
    let mut session = world.session(vec![phase]).await;
    let cancel = Cancel::new();
    let options = ApplyOptions { parallelism: 2 };
    let events = Events::discard();
    let plan = session.plan(Mode::Normal, &cancel, &events).await.unwrap();
    let stopper = {
        let cancel = cancel.clone();
        let log = world.log.clone();
        tokio::spawn(async move {
            while log
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.starts_with("start"))
                .count()
                < 2
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            cancel.request(StopReason::Terminate);
        })
    };
    let err = session
        .apply(&plan, &options, &cancel, &events)
        .await
        .unwrap_err();
    stopper.await.unwrap();
    assert!(
        matches!(
            err,
            EngineError::Stopped {
                signal: Some(StopReason::Terminate),
                ..
            }
        ),
        "{err}"
    );
    let started = world
        .log()
        .iter()
        .filter(|l| l.starts_with("start"))
        .count();
    let ended = world.log().iter().filter(|l| l.starts_with("end")).count();
    assert_eq!((started, ended), (2, 2), "{:?}", world.log());
    let saved = world.saved();
    assert_eq!(
        saved.resources.iter().filter(|r| r.id.is_some()).count(),
        2,
        "the two that finished are recorded"
    );

    // A second request abandons the changes under way at once.
    drop(session);
    let mut phase = FakePhase::new("one", &refs, &world.log);
    phase.delay = Duration::from_secs(3600);
    let mut session = world.session(vec![phase]).await;
    let cancel = Cancel::new();
    let plan = session.plan(Mode::Normal, &cancel, &events).await.unwrap();
    let stopper = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            cancel.request(StopReason::Interrupt);
            cancel.request(StopReason::Interrupt);
        })
    };
    let err = tokio::time::timeout(
        Duration::from_secs(30),
        session.apply(&plan, &options, &cancel, &events),
    )
    .await
    .expect("a second request stops at once")
    .unwrap_err();
    stopper.await.unwrap();
    assert!(matches!(err, EngineError::Stopped { .. }), "{err}");
    let tokens = world
        .saved()
        .resources
        .iter()
        .filter(|r| r.id.is_none() && r.pending_token.is_some())
        .count();
    assert_eq!(
        tokens, 2,
        "the abandoned creates keep their tokens for the re-run"
    );
}

#[tokio::test]
async fn a_plan_whose_state_moved_is_refused() {
    let world = World::new();
    let mut session = world.session(world.three_stages()).await;
    let cancel = Cancel::new();
    let events = Events::discard();
    let old = session.plan(Mode::Normal, &cancel, &events).await.unwrap();
    let fresh = session.plan(Mode::Normal, &cancel, &events).await.unwrap();
    session
        .apply(&fresh, &OPTIONS, &cancel, &events)
        .await
        .unwrap();
    let err = session
        .apply(&old, &OPTIONS, &cancel, &events)
        .await
        .unwrap_err();
    assert!(
        matches!(err, EngineError::StalePlan { planned: 0, .. }),
        "{err}"
    );
    let drift = session
        .plan(Mode::RefreshOnly, &cancel, &events)
        .await
        .unwrap();
    assert!(matches!(
        session.apply(&drift, &OPTIONS, &cancel, &events).await,
        Err(EngineError::RefreshOnly)
    ));
}

#[tokio::test]
async fn changes_wait_for_what_they_name_removals_go_the_other_way_and_parallelism_is_bounded() {
    let world = World::new();
    let mut phase = FakePhase::new("infra", &["kp", "sg"], &world.log);
    for i in 0..6 {
        phase.resources.push(Resource {
            address: format!("vm{i}"),
            kind: "infra".into(),
            attrs: json!({"n": 1}),
            handling: Handling::default().waits_for(["kp", "sg"]),
        });
    }
    let mut session = world.session(vec![phase]).await;
    let cancel = Cancel::new();
    let options = ApplyOptions { parallelism: 3 };
    let events = Events::discard();
    let plan = session.plan(Mode::Normal, &cancel, &events).await.unwrap();
    session
        .apply(&plan, &options, &cancel, &events)
        .await
        .unwrap();
    for vm in (0..6).map(|i| format!("vm{i}")) {
        assert!(world.position(&format!("start {vm}")) > world.position("end kp"));
        assert!(world.position(&format!("start {vm}")) > world.position("end sg"));
    }
    let mut now = 0usize;
    let mut most = 0;
    for line in world.log() {
        if line.starts_with("start") {
            now += 1;
            most = most.max(now);
        } else if line.starts_with("end") {
            now -= 1;
        }
    }
    assert_eq!(most, 3, "at most --parallelism at once");

    world.log.lock().unwrap().clear();
    let destroy = session.plan(Mode::Destroy, &cancel, &events).await.unwrap();
    session
        .apply(&destroy, &options, &cancel, &events)
        .await
        .unwrap();
    for vm in (0..6).map(|i| format!("vm{i}")) {
        assert!(world.position("start kp") > world.position(&format!("end {vm}")));
        assert!(world.position("start sg") > world.position(&format!("end {vm}")));
    }
}

#[tokio::test]
async fn a_failure_starts_nothing_new_and_keeps_what_finished_and_the_failed_create_keeps_its_token(
) {
    let world = World::new();
    let mut phase = FakePhase::new("infra", &["kp", "sg"], &world.log);
    phase.fail = Some("sg");
    phase.resources.push(Resource {
        address: "vm0".into(),
        kind: "infra".into(),
        attrs: json!({"n": 1}),
        handling: Handling::default().waits_for(["kp", "sg"]),
    });
    let mut session = world.session(vec![phase]).await;
    let err = up(&mut session, &Cancel::new()).await.unwrap_err();
    let message = err.to_string();
    assert!(message.contains("1 of 3 changes failed"), "{message}");
    assert!(
        message.contains("+ sg: scripted failure of sg"),
        "{message}"
    );
    assert!(
        !world.log().iter().any(|l| l.contains("vm0")),
        "no instance may start"
    );
    let saved = world.saved();
    assert_eq!(saved.get("kp").and_then(|r| r.id.as_deref()), Some("id-kp"));
    let sg = saved.get("sg").unwrap();
    assert!(sg.id.is_none() && sg.pending_token.is_some());
}
