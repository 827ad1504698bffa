//! `stack upgrade`: newer database images found in their registries by
//! each database's policy, and rolled out member by member behind the
//! database's own health gate.

pub mod apply;
pub mod rollout;
pub mod schedule;
pub mod write;
