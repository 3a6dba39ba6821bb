//! The one test kit every portassign test uses: the integration tests under `tests/`,
//! the end-to-end suite (`e2e/`) and the benchmarks (`bench/`).
//!
//! - [`cluster`]: a real control plane (shared, or one of the test's own), admin
//!   client, the CRD, and the chart's ServiceAccounts with the chart's RBAC.
//! - [`chart`]: the Helm chart rendered with the real `helm`.
//! - [`world`]: one test's namespace and node, objects, in-process agents.
//! - [`process`]: `portassign` agent and janitor processes.
//! - [`restricted`]: an agent identity with one permission less than the chart's.
//! - [`standin`]: the least a controller must do, the benchmarks' baseline.
//! - [`netns`]: network namespaces as nodes with network stacks of their own (root).
//! - [`wait`]: typed waits and predicates on PortAssignments.
//!
//! Agents and janitors started through the kit run with the credentials of the chart's
//! ServiceAccounts, bound by the chart's own rendered ClusterRoles and Roles; the admin
//! client is for the test's own setup and assertions only.

pub mod chart;
pub mod cluster;
pub mod netns;
pub mod process;
pub mod restricted;
pub mod standin;
pub mod wait;
pub mod world;

use std::path::{Path, PathBuf};

pub use cluster::{Cluster, Identity};
pub use process::{AgentProcess, Process, free_port, portassign_bin};
pub use wait::{eventually, ports_of, ready_reason};
pub use world::{World, keys, port_block, unique};

/// The repository's root (where `hack/` and `charts/` are).
pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("testkit lives in a folder of the repository")
}

/// A tool built by `hack/build-tools.sh` from its Go module (cached by version): its path.
pub fn tool(name: &str) -> anyhow::Result<PathBuf> {
    let output = std::process::Command::new(repo_root().join("hack/build-tools.sh")).arg(name).output()?;
    anyhow::ensure!(
        output.status.success(),
        "hack/build-tools.sh {name} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let dir = String::from_utf8_lossy(&output.stdout).trim().lines().last().unwrap_or_default().to_owned();
    Ok(PathBuf::from(dir).join(name))
}
