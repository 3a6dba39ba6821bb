//! portassign: a Kubernetes node agent that hands out host ports verified free on
//! the node's own network stack, recorded durably in `PortAssignment` statuses.
//!
//! This package is the agent and the `portassign` binary. The parts other programs
//! use are crates of their own, re-exported here under their usual paths:
//!
//! - [`api`] (`portassign-api`): the `PortAssignment` resource, its reasons and
//!   identities, [`range`] (port ranges), the ports pods declare, the table document.
//! - [`client`] (`portassign-client`): getting a port from a program: acquire, get,
//!   release.
//! - [`checker`] (`portassign-checker`): the invariant checker, independent of the agent.
//!
//! And, in this package:
//!
//! - [`agent`]: the node agent: node state, probe, reconcile loop, HTTP, metrics.
//! - [`acquire`]: the `portassign acquire | get | release` commands over the client.
//! - [`lookup`]: key→port and port→key lookups for operators.
//! - [`janitor`]: releases objects of nodes that are gone.
//! - [`telemetry`]: log set-up.

pub mod acquire;
pub mod agent;
pub mod janitor;
pub mod lookup;
pub mod telemetry;

pub use portassign_api::{self as api, range};
pub use portassign_checker as checker;
pub use portassign_client as client;
