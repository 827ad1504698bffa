//! The phases of a stack, and the one list that orders them. Each phase is a
//! folder of its own behind the engine's `Phase` trait; the engine walks
//! this list forward to build and backward to destroy, and numbers the
//! stages from it. Adding a phase is a folder and one line below.

pub mod bootstrap;
pub mod databases;
pub mod infra;
pub mod kube;

use std::sync::Arc;

use crate::artifacts::Artifacts;
use crate::engine::{Access, EngineError, Opening, Phase, Session, StateHandle};
use crate::keys::{self, KeyError};
use crate::model::{LoadError, Stack};
use crate::state::Place;
use kube::kinds::Stage;

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Infra(#[from] infra::InfraError),
    #[error("cannot build the Kubernetes objects of stack {stack}")]
    Kube {
        stack: String,
        #[source]
        source: Box<kube::KubeError>,
    },
}

/// Everything about a stack that can be checked without the network, each
/// phase checking its part: sections this version does not build, the local
/// files the stack names, what EC2 would refuse, the Kubernetes objects. Runs
/// before a plan reads anything (`validate` runs it too), so a stack that
/// cannot work fails before anything is made. A destroy plan does not need it.
pub fn check(stack: &Stack) -> Result<(), LoadError> {
    let mut diags = stack.diagnostics();
    for section in &stack.unbuilt {
        diags.push(
            stack.positions.of(&section.path),
            &section.path,
            "only what this version of stack builds (remove the section to plan and apply the rest)",
            format!("{}, not built yet", section.what),
        );
    }
    infra::check(stack, &mut diags);
    kube::check(stack, databases::contribution(stack).as_ref(), &mut diags);
    if diags.is_empty() {
        return Ok(());
    }
    Err(LoadError::Invalid {
        path: stack.file.clone(),
        diagnostics: diags.into_sorted(),
    })
}

/// The stage list of a stack, in the order the engine applies it.
async fn stage_list(
    running: &databases::pins::Running,
    artifacts: &Artifacts,
    access: Access,
    lineage: &str,
) -> Result<Vec<Arc<dyn Phase>>, OpenError> {
    let stack = &running.stack;
    let key = match access {
        Access::Write => keys::ensure(artifacts)?,
        Access::Read => keys::existing(artifacts)?,
    };
    let mut phases: Vec<Arc<dyn Phase>> = Vec::new();
    if let Some((infra, nodes)) = infra::connect(stack, &key, artifacts, lineage).await? {
        phases.push(Arc::new(infra));
        if let Some(bootstrap) =
            bootstrap::Bootstrap::for_stack(stack, nodes, key.private_path.clone(), artifacts)
        {
            phases.push(Arc::new(bootstrap));
        }
    }
    let kube = kube_of(stack, artifacts)?;
    if let Some(kube) = kube {
        phases.push(kube.stage(Stage::Foundation));
        phases.push(kube.stage(Stage::Workloads));
        if let Some(databases) = databases::Databases::for_stack(running, &kube) {
            phases.push(Arc::new(databases));
        }
        phases.push(kube.stage(Stage::Ingress));
        phases.push(kube.stage(Stage::Monitoring));
    }
    Ok(phases)
}

/// The stack's Kubernetes layer with its databases' objects; `None`
/// without a `kubernetes` section.
fn kube_of(stack: &Stack, artifacts: &Artifacts) -> Result<Option<Arc<kube::Kube>>, OpenError> {
    kube::Kube::for_stack(stack, artifacts, databases::contribution(stack)).map_err(|source| {
        OpenError::Kube {
            stack: stack.name.clone(),
            source: Box::new(source),
        }
    })
}

/// The database phase of a running stack on its own, for `stack upgrade`
/// to roll and gate members with: its health gates wait at most `health`.
/// `None` without databases.
pub fn databases_alone(
    running: &databases::pins::Running,
    artifacts: &Artifacts,
    health: std::time::Duration,
) -> Result<Option<databases::Databases>, OpenError> {
    let mut running = databases::pins::Running {
        stack: running.stack.clone(),
        notes: Vec::new(),
        stale: Vec::new(),
    };
    running.stack.timeouts.healthy = health;
    let stack = &running.stack;
    let kube = kube_of(stack, artifacts)?;
    Ok(kube.and_then(|kube| databases::Databases::for_stack(&running, &kube)))
}

/// The kubeconfig and context of the stack's cluster (whether the file is
/// there yet or not); `None` when the stack has no `kubernetes` section.
pub fn kubeconfig(stack: &Stack) -> Result<Option<(std::path::PathBuf, String)>, OpenError> {
    let artifacts = Artifacts::new(&stack.state_dir(), &stack.name);
    let target = kube::target(stack, &artifacts).map_err(|source| OpenError::Kube {
        stack: stack.name.clone(),
        source: Box::new(source),
    })?;
    Ok(target.map(|t| (t.kubeconfig, t.context)))
}

/// When the stack's environment expires: its `ttl` after its state was
/// made, so the expiry stays put from one run to the next.
pub fn expiry(stack: &Stack, state: &crate::state::State) -> Option<u64> {
    stack
        .ttl
        .map(|ttl| state.created.saturating_add(ttl.as_secs()))
}

/// Opens a session on a loaded stack: its state (locked, for `Access::Write`,
/// before anything is generated) where the stack keeps it, its artifacts
/// (put in place first by a backend that keeps them) and its stages.
pub async fn open(stack: &Stack, opening: &Opening) -> Result<Session, OpenError> {
    let provider = stack.provider_name();
    let artifacts = Artifacts::new(&stack.state_dir(), &stack.name);
    let backend = Place::of(stack).backend(stack, &artifacts).await?;
    let handle = StateHandle::open(backend, opening, &stack.name, provider).await?;
    let mut stack = stack.clone();
    stack.expires = expiry(&stack, handle.state());
    let running = databases::pins::running(&stack, handle.state());
    let access = opening.access;
    let phases = stage_list(&running, &artifacts, access, handle.lineage()).await?;
    Ok(Session::new(
        &stack.name,
        provider,
        handle,
        phases,
        artifacts,
    ))
}
