//! One trait for every infrastructure backend; one module per backend.
//!
//! Each operation is idempotent: `create` on something that already exists
//! (found by its tags) returns it instead of making a second one, `delete` on
//! something already gone succeeds.

pub mod ec2;
pub mod kvm;

use std::future::Future;
use std::net::SocketAddr;

use crate::plan::{Change, Observed, Resource};
use crate::state::{Record, State};

/// A node as `stack status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    pub address: String,
    pub id: String,
    pub state: String,
    pub public_address: Option<String>,
    pub private_address: Option<String>,
}

/// How a node is reached over SSH, and where its Kubernetes API answers.
#[derive(Debug, Clone, PartialEq)]
pub struct SshNode {
    /// The node's key in its group, such as `control[0]`.
    pub key: String,
    pub hostname: String,
    /// The provider's id of the node (instance id, VM name).
    pub id: String,
    pub ssh: SocketAddr,
    pub user: String,
    /// The host key `stack` generated for the node and pinned.
    pub host_key: String,
    /// The address the other nodes reach it at.
    pub private_ip: String,
    /// Where the user reaches its API server (host, port).
    pub api: (String, u16),
}

/// What `apply` drives: the changes of one kind of thing, made, changed or removed.
pub trait Applier: Send + Sync + 'static {
    type Error: std::error::Error + Send + Sync + 'static;

    /// The kinds a kind must wait for on create (and that wait for it on delete).
    fn dependencies(&self, kind: &str) -> &'static [&'static str];

    /// Whether a failure of this change stops the run; when not, it is
    /// reported, left unrecorded (so the next run tries again) and the rest goes on.
    fn is_fatal(&self, _change: &Change) -> bool {
        true
    }

    /// Makes the resource, or finds it when a previous run already made it.
    /// `token` is the idempotency token recorded in state before the call;
    /// `state` holds the records of the resources it depends on.
    fn create(
        &self,
        resource: &Resource,
        token: &str,
        state: &State,
    ) -> impl Future<Output = Result<Record, Self::Error>> + Send;

    /// Changes a live resource in place to match the change's `after`.
    fn update(
        &self,
        change: &Change,
        state: &State,
    ) -> impl Future<Output = Result<Record, Self::Error>> + Send;

    /// Deletes a live resource and waits until it is gone.
    fn delete(&self, kind: &str, id: &str) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

pub trait Provider: Applier {
    /// What the stack wants, as resources with addresses (no I/O).
    fn desired(&self) -> Vec<Resource>;

    /// Reads back everything tagged with the stack, and everything the state
    /// records by id (so a changed tag does not hide a resource).
    fn refresh(
        &self,
        state: &State,
    ) -> impl Future<Output = Result<Vec<Observed>, Self::Error>> + Send;

    /// Whether the nodes' private addresses are known before they exist (so
    /// cloud-init can write every node into `/etc/hosts`).
    fn private_addresses_in_advance(&self) -> bool;

    /// Whether users reach the nodes' Kubernetes API on a loopback address
    /// (forwarded), which microk8s's own certificate already covers.
    fn api_on_loopback(&self) -> bool;

    /// The infrastructure address of a node key such as `control[0]`.
    fn node_address(&self, key: &str) -> String;

    /// How to reach each recorded node, from the state and (where addresses
    /// are assigned by the cloud) a fresh read.
    fn ssh_nodes(
        &self,
        state: &State,
    ) -> impl Future<Output = Result<Vec<SshNode>, Self::Error>> + Send;

    /// Everything still tagged with the stack, as `kind id` lines (for `down`'s final check).
    fn leftovers(&self) -> impl Future<Output = Result<Vec<String>, Self::Error>> + Send;

    /// The nodes with their addresses, from a fresh read.
    fn nodes(&self) -> impl Future<Output = Result<Vec<NodeStatus>, Self::Error>> + Send;
}
