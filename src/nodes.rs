//! What the infrastructure hands to the phases that work on its nodes: how
//! to reach each node over SSH and a few facts about the network. A
//! capability, not the provider: the bootstrap sees this and nothing else
//! of EC2 or KVM.

use std::net::SocketAddr;

use crate::future::BoxFuture;
use crate::state::State;

pub type NodesError = Box<dyn std::error::Error + Send + Sync + 'static>;

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

pub trait Nodes: Send + Sync {
    /// Whether the nodes' private addresses are known before they exist (so
    /// cloud-init can write every node into `/etc/hosts`).
    fn addresses_in_advance(&self) -> bool;

    /// Whether users reach the nodes' Kubernetes API on a loopback address
    /// (forwarded), which microk8s's own certificate already covers.
    fn api_on_loopback(&self) -> bool;

    /// The infrastructure address of a node key such as `control[0]`, as
    /// its changes in a plan are addressed.
    fn node_address(&self, key: &str) -> String;

    /// How to reach each node that exists, from the state and (where
    /// addresses are assigned by the cloud) a fresh read.
    fn ssh_nodes<'a>(&'a self, state: &'a State)
        -> BoxFuture<'a, Result<Vec<SshNode>, NodesError>>;
}
