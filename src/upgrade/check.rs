//! `stack upgrade --check`: for every database of a stack, the newest
//! image its rule allows, pinned by digest, or why there is none. Every
//! database is checked; the ones whose registry failed say so, naming
//! the database, the image and the registry.

use std::sync::Arc;

use serde::{Serialize, Serializer};

use super::policy::{choose, NoCandidate};
use super::reference::{pinned, Location};
use super::registry::{Registries, RegistryError};
use crate::engine::Cancel;
use crate::model::{Database, DatabaseKind, ImageRef, Stack, UpgradePolicy};

/// A registry failure of one database's check.
#[derive(Debug, thiserror::Error)]
#[error("database {database}: cannot check image {image} at registry {registry}")]
pub struct CheckError {
    pub database: String,
    pub image: String,
    pub registry: String,
    #[source]
    pub source: Arc<RegistryError>,
}

/// The image a database may move to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Checked {
    pub tag: String,
    /// `sha256:...`, as the registry has it.
    pub digest: String,
    /// `REPO:TAG@sha256:...`, as a pod spec takes it.
    pub reference: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Outcome {
    Candidate(Checked),
    NoCandidate(NoCandidate),
    #[serde(serialize_with = "as_chain")]
    Failed(CheckError),
}

fn as_chain<S: Serializer>(err: &CheckError, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&crate::error_chain::error_chain(err))
}

/// One database's check.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseCheck {
    pub database: String,
    pub kind: DatabaseKind,
    /// The current image, as written.
    pub image: String,
    pub registry: String,
    pub repository: String,
    pub current_tag: Option<String>,
    pub outcome: Outcome,
}

/// Every database's check, in the stack's order.
#[derive(Debug, Serialize)]
pub struct Report {
    pub databases: Vec<DatabaseCheck>,
}

impl Report {
    pub fn failures(&self) -> impl Iterator<Item = &CheckError> {
        self.databases.iter().filter_map(|d| match &d.outcome {
            Outcome::Failed(err) => Some(err),
            _ => None,
        })
    }
}

/// Checks every database of `stack`. `current` gives each database's
/// current image (the stack file's, or one an earlier upgrade pinned);
/// `registries` is the run's client and cache.
pub async fn check(
    stack: &Stack,
    current: impl Fn(&Database) -> ImageRef,
    registries: &Registries,
    cancel: &Cancel,
) -> Report {
    let mut databases = Vec::new();
    for database in &stack.databases {
        let image = current(database);
        let outcome = check_one(database, &image, registries, cancel).await;
        let location = Location::of(&image);
        databases.push(DatabaseCheck {
            database: database.name.clone(),
            kind: database.kind,
            image: image.to_string(),
            registry: location.registry,
            repository: location.repository,
            current_tag: image.tag.clone(),
            outcome,
        });
    }
    Report { databases }
}

async fn check_one(
    database: &Database,
    image: &ImageRef,
    registries: &Registries,
    cancel: &Cancel,
) -> Outcome {
    let rule = &database.upgrade;
    // No registry is asked when no tag could be a candidate.
    let early = if rule.policy == UpgradePolicy::None {
        Some(NoCandidate::PolicyNone)
    } else {
        match &image.tag {
            None => Some(NoCandidate::DigestOnly),
            Some(tag) if super::policy::TagVersion::parse(tag).is_none() => {
                Some(NoCandidate::NotAVersion { tag: tag.clone() })
            }
            Some(_) => None,
        }
    };
    if let Some(reason) = early {
        return Outcome::NoCandidate(reason);
    }
    let location = Location::of(image);
    let failed = |source: Arc<RegistryError>| {
        Outcome::Failed(CheckError {
            database: database.name.clone(),
            image: image.to_string(),
            registry: location.registry.clone(),
            source,
        })
    };
    let tags = match registries.tags(&location, cancel).await {
        Ok(tags) => tags,
        Err(err) => return failed(err),
    };
    let tag = match choose(image.tag.as_deref(), &tags, rule) {
        Ok(tag) => tag,
        Err(reason) => return Outcome::NoCandidate(reason),
    };
    match registries.digest(&location, &tag, cancel).await {
        Ok(digest) => Outcome::Candidate(Checked {
            reference: pinned(image, &tag, &digest),
            tag,
            digest,
        }),
        Err(err) => failed(err),
    }
}
