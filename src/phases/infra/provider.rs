//! The one trait every infrastructure backend implements, object-safe so
//! the infrastructure phase holds its provider as a trait object.

use crate::engine::{Change, Expiring, Leftovers, Observed, Resource, Retries, StatusPart};
use crate::future::BoxFuture;
use crate::state::{Record, State};

pub type ProviderError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// One infrastructure backend.
pub trait Provider: Send + Sync {
    /// The kinds of record it makes (`instance`, `vm`, …).
    fn kinds(&self) -> &'static [&'static str];

    /// What the stack wants, as resources with addresses (no I/O).
    fn desired(&self) -> Vec<Resource>;

    /// Reads back everything carrying the stack's marks, and everything the
    /// records name by id (so a changed tag does not hide a resource).
    fn refresh<'a>(
        &'a self,
        records: &'a State,
    ) -> BoxFuture<'a, Result<Vec<Observed>, ProviderError>>;

    /// Makes the resource, or finds it when a previous run already made it.
    /// `token` is the idempotency token recorded in state before the call;
    /// `state` holds the records of what it depends on.
    fn create<'a>(
        &'a self,
        resource: &'a Resource,
        token: &'a str,
        state: &'a State,
    ) -> BoxFuture<'a, Result<Record, ProviderError>>;

    /// Changes a live resource in place to match the change's `after`.
    fn update<'a>(
        &'a self,
        change: &'a Change,
        state: &'a State,
    ) -> BoxFuture<'a, Result<Record, ProviderError>>;

    /// Deletes a live resource and waits until it is gone.
    fn delete<'a>(&'a self, kind: &'a str, id: &'a str)
        -> BoxFuture<'a, Result<(), ProviderError>>;

    /// Everything still carrying the stack's marks (for `down`'s last check).
    fn leftovers(&self) -> BoxFuture<'_, Result<Leftovers, ProviderError>>;

    /// The environments of this stack and of its runs that carry an
    /// expiry, found by their marks alone (for `stack gc`).
    fn environments(&self) -> BoxFuture<'_, Result<Vec<Expiring>, ProviderError>>;

    /// The nodes with their addresses, from a fresh read, and the SSH user.
    fn status(&self) -> BoxFuture<'_, Result<StatusPart, ProviderError>>;

    /// How often it retried its calls after transient errors so far.
    fn retries(&self) -> Option<Retries> {
        None
    }
}
