//! The engine: turns a stack's phases and state into plans and applies them.
//!
//! It knows no phase. A [`Session`] holds the stage list (phases behind the
//! [`Phase`] trait, in order), the locked state and the artifacts; `plan`
//! asks every phase for its part, `apply` applies exactly that plan stage by
//! stage with health gates, saving the state after every change. It prints
//! nothing and asks nothing: it emits [`Event`]s, and every wait watches one
//! [`Cancel`] token.

mod apply;
pub mod cancel;
pub mod events;
pub mod phase;
pub mod plan;
mod session;

pub use apply::{Failure, Outcome};
pub use cancel::{Cancel, Level, StopReason, Stopped};
pub use events::{Event, EventSink, Events};
pub use phase::{
    ChangeInput, DatabaseStatus, EndpointStatus, Expiring, ImageUpgrade, Leftovers, Login,
    NodeStatus, Phase, PhaseError, PlanInput, Prepared, ReplicaStatus, ReplicationStatus, Retries,
    SshAccess, StageInput, StatusPart, UpgradeResult,
};
pub use plan::{
    Action, Change, FieldChange, FieldPath, Handling, Mode, Observed, Plan, PlanPart, PriorFields,
    ReplaceRule, Resource, Segment, StageRef, StepRef, Summary,
};
pub use session::{
    Access, Applied, ApplyOptions, EngineError, Opening, PlanRequest, Remains, Session,
    StateHandle, Status,
};

#[cfg(test)]
mod tests;
