//! The integration tests: one binary that drives the real `stack` binary
//! (`CARGO_BIN_EXE_stack`) against real peers: a `moto_server` on loopback
//! for EC2, QEMU booting the Debian test image, the test image's OpenSSH for
//! `stack ssh` and the bootstrap, the Kubernetes API test double (no real
//! API server can run here), and Debian's PostgreSQL for the state for
//! teams. One module per subsystem; the helpers for each peer are in
//! `support`.

mod allegrograph;
mod architecture;
mod bootstrap;
mod cli;
mod couchdb;
mod ec2;
mod immudb;
mod kube;
mod kube_server;
mod kvm;
mod preflight;
mod quickstart;
mod registry;
mod run;
mod state_pg;
mod support;
mod upgrade;
mod vagrant;
mod validate;
