//! Image upgrades of a stack's databases: which newer image each
//! database's rule allows, found in its registry through the OCI
//! distribution API, and its rollout member by member behind the
//! database's own health gate. `reference` says where an image lives,
//! `policy` chooses among tags (pure), `docker_config` reads the user's
//! registry credentials as container tools do, `registry` is the bounded
//! distribution client with its per-run cache, and `check` puts them
//! together for every database of a stack. `rollout` rolls one database,
//! `apply` records and pins a stack's upgrades, `schedule` says when
//! scheduled ones are due and `write` puts pinned images into the file.

pub mod apply;
pub mod check;
pub mod docker_config;
pub mod policy;
pub mod reference;
pub mod registry;
pub mod rollout;
pub mod schedule;
pub mod write;

pub use check::{check, CheckError, Checked, DatabaseCheck, Outcome, Report};
pub use docker_config::{Credentials, DockerConfig, DockerConfigError};
pub use policy::{choose, NoCandidate, TagVersion};
pub use reference::{pinned, Location};
pub use registry::{Registries, RegistryError};
