//! The agent's in-memory table as it serves it on `/debug/table`: one definition for
//! both sides of the wire (the agent writes it, the checker and the tests read it).

use serde::{Deserialize, Serialize};

use crate::pods::PodProtocol;

/// Path of the agent's table document.
pub const DEBUG_TABLE_PATH: &str = "/debug/table";

/// The agent's in-memory table as served on `/debug/table`: what the invariant checker
/// compares with the statuses.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TableDocument {
    /// The agent's node.
    pub node: String,
    /// The agent's ranges, `FIRST-LAST[,FIRST-LAST...]`.
    pub range: String,
    /// The ranges ResourceClaims get ports from (`--dra-port-range`; empty without).
    #[serde(default, rename = "claimRange", skip_serializing_if = "String::is_empty")]
    pub claim_range: String,
    /// Whether the agent had rebuilt its table.
    pub ready: bool,
    /// Every port it holds.
    pub ports: Vec<TableEntry>,
    /// Ports of the ranges never assigned, by rule: `--exclude-ports`, the NodePort
    /// range, the kernel's reservations, pods' ports.
    #[serde(default)]
    pub skipped: Skipped,
    /// Keys holding a port that a pod of the node declares too.
    #[serde(default)]
    pub conflicts: Vec<ConflictEntry>,
    /// Why one port is or is not assigned (`/debug/table?port=N`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub explain: Option<Explanation>,
}

/// The rules that keep ports out, besides sockets.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Skipped {
    /// `--exclude-ports`.
    pub excluded_by_flag: String,
    /// `--node-port-range` (empty when not excluded).
    pub nodeport_range: String,
    /// `net.ipv4.ip_local_reserved_ports` as last read.
    pub kernel_reserved: String,
    /// Ports pods of the node declare.
    pub pod_ports: Vec<PodPortEntry>,
}

/// A key holding a port that a pod of the node declares too.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConflictEntry {
    /// The port.
    pub port: u16,
    /// Namespace of the object holding it.
    pub namespace: String,
    /// Name of the object holding it.
    pub name: String,
    /// The key holding it (it keeps it).
    pub key: String,
    /// The pod, `namespace/name`.
    pub pod: String,
    /// The pod's protocol for it.
    pub protocol: String,
}

/// Why a port is or is not assigned.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Explanation {
    /// The port asked about.
    pub port: u16,
    /// Whether a new key could get it now (no rule below applies).
    pub assignable: bool,
    /// Every rule that keeps it out, in the order the agent checks them.
    pub rules: Vec<Rule>,
}

/// One rule that keeps a port out.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Rule {
    /// `outside-ranges`, `excluded-by-flag`, `nodeport-range`, `held`, `kernel-reserved`,
    /// `pod-host-port` or `socket-in-use`.
    pub rule: String,
    /// Details: the range, the holder, the pod, the protocol.
    pub detail: String,
}

/// One port held in an agent's memory.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct TableEntry {
    /// The port.
    pub port: u16,
    /// Namespace of the holder.
    pub namespace: String,
    /// Name of the holder.
    pub name: String,
    /// Key of the holder.
    pub key: String,
}

/// One port a pod takes, with the pod, as the agent shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodPortEntry {
    /// The port.
    pub port: u16,
    /// `TCP` or `UDP`.
    pub protocol: PodProtocol,
    /// The host address, if the pod names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<String>,
    /// `namespace/name` of the pod.
    pub pod: String,
}
