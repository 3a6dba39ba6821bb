//! portassign: a Kubernetes node agent that hands out host ports verified free on
//! the node's own network stack, recorded durably in `PortAssignment` statuses.
//!
//! - [`api`]: the `PortAssignment` custom resource.
//! - [`table`]: the node's port table (sans-IO).
//! - [`probe`]: checks a port is free by binding it.
//! - [`controller`]: the reconcile loop.
//! - [`agent`]: wiring, rebuild at start, health and metrics.
//! - [`janitor`]: releases objects of nodes that are gone.
//! - [`checker`]: the independent invariant checker.
//! - [`lookup`]: key→port and port→key lookups for operators.

pub mod agent;
pub mod api;
pub mod checker;
pub mod controller;
pub mod janitor;
pub mod lookup;
pub mod metrics;
pub mod probe;
pub mod table;
pub mod telemetry;
