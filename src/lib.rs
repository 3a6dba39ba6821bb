//! portassign: a Kubernetes node agent that hands out host ports verified free on
//! the node's own network stack, recorded durably in `PortAssignment` statuses.
//!
//! - [`api`]: the `PortAssignment` custom resource, its reasons and identities.
//! - [`range`]: port ranges and the default range.
//! - [`agent`]: the node agent: port table, probe, reconcile loop, HTTP, metrics.
//! - [`janitor`]: releases objects of nodes that are gone.
//! - [`checker`]: the independent invariant checker.
//! - [`client`]: getting a port from a program: acquire, get, release (`portassign acquire`).
//! - [`lookup`]: key→port and port→key lookups for operators.
//! - [`telemetry`]: log set-up.

pub mod agent;
pub mod api;
pub mod checker;
pub mod client;
pub mod janitor;
pub mod lookup;
pub mod range;
pub mod telemetry;
