//! The `PortAssignment` custom resource (`portassign.io/v1alpha1`).
//!
//! The Rust types are the source of truth: `crds/portassignment.yaml` is generated
//! from them (`portassign crd`) and a test fails when the committed file drifts.
//!
//! This crate is what every part of portassign shares, and only that: the resource and
//! its reasons, [`range`] (port ranges and the set the agent assigns from), [`pods`]
//! (the ports a pod takes on its node), [`table`] (the agent's `/debug/table`
//! document), and two small helpers whose output persists in names and selectors
//! ([`fnv1a`], [`node_selector`]). No client, no server.

use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta};
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use serde::{Deserialize, Serialize};

pub mod dra;
pub mod pods;
pub mod range;
pub mod table;

/// API group of the custom resource.
pub const GROUP: &str = "portassign.io";
/// Finalizer the agent puts on every object it allocated for.
pub const FINALIZER: &str = "portassign.io/release-ports";
/// Most keys one object may list (and so most ports it may hold).
pub const MAX_KEYS: usize = 1000;
/// Longest key accepted.
pub const MAX_KEY_LEN: usize = 253;

/// Condition type that is `True` once every key in spec has a port.
pub const CONDITION_READY: &str = "Ready";

/// Desired state of a PortAssignment: which node, which protocol, which keys need a port.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "portassign.io",
    version = "v1alpha1",
    kind = "PortAssignment",
    plural = "portassignments",
    shortname = "pa",
    category = "ports",
    namespaced,
    status = "PortAssignmentStatus",
    doc = "Host ports for a set of keys on one node, assigned by that node's portassign agent.",
    selectable = ".spec.nodeName",
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".spec.nodeName","description":"Node whose ports are assigned"}"#,
    printcolumn = r#"{"name":"Protocol","type":"string","jsonPath":".spec.protocol","priority":1}"#,
    printcolumn = r#"{"name":"Keys","type":"integer","jsonPath":".status.keyCount","description":"Keys listed in spec, as last seen by the agent"}"#,
    printcolumn = r#"{"name":"Assigned","type":"integer","jsonPath":".status.assignedCount","description":"Keys that hold a port"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct PortAssignmentSpec {
    /// Name of the node whose agent assigns the ports. Required and immutable: ports
    /// are unique per node, so moving an object would invalidate every port it holds.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.nodeName is immutable: delete the object and create it for the other node"))]
    pub node_name: String,

    /// Protocol the ports must be free for: TCP, UDP, or TCPUDP (free for both).
    /// Immutable, because assigned ports were only verified for the original protocol.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.protocol is immutable: delete the object and create it with the new protocol"))]
    pub protocol: Protocol,

    /// Keys (for example sandbox identifiers such as `team-a/sandbox-7`) that each need
    /// a port. A set: each key at most once. A key keeps its port for as long as it is
    /// listed; removing it releases the port.
    #[serde(default)]
    #[schemars(
        length(max = 1000),
        inner(length(min = 1, max = 253), regex(pattern = r"^[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?$"))
    )]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub keys: Vec<String>,
}

/// Transport protocol a port is verified free for.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, schemars::JsonSchema)]
pub enum Protocol {
    /// Free for TCP.
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    /// Free for UDP.
    #[serde(rename = "UDP")]
    Udp,
    /// Free for both TCP and UDP.
    #[serde(rename = "TCPUDP")]
    TcpUdp,
}

impl Protocol {
    /// Whether ports for this protocol must be free for TCP.
    pub fn tcp(self) -> bool {
        matches!(self, Protocol::Tcp | Protocol::TcpUdp)
    }

    /// Whether ports for this protocol must be free for UDP.
    pub fn udp(self) -> bool {
        matches!(self, Protocol::Udp | Protocol::TcpUdp)
    }
}

/// Observed state written by the node agent: the durable key↔port record for this object.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PortAssignmentStatus {
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Number of keys in spec when this status was written.
    #[serde(default)]
    #[schemars(with = "i32", range(min = 0))]
    pub key_count: u32,

    /// Number of keys that hold a port.
    #[serde(default)]
    #[schemars(with = "i32", range(min = 0))]
    pub assigned_count: u32,

    /// The port held by each key. Keyed by `key`; no port appears twice on a node.
    #[serde(default)]
    #[schemars(length(max = 1000))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["key".into()]))]
    pub ports: Vec<PortEntry>,

    /// Standard conditions. `Ready` is `True` (reason `Allocated`) when every key has a
    /// port; otherwise `False` with reason `RangeExhausted` or `PortConflict`.
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// Pods on the node that declare (hostPort, or a port of a hostNetwork pod) a port a
    /// key of this object holds. The key keeps its port; traffic to it may reach the pod.
    /// Empty when there is no such pod.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000))]
    pub pod_conflicts: Vec<PodConflict>,
}

/// A pod of the node that declares a port one of the object's keys holds.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub struct PodConflict {
    /// The key holding the port (it keeps it).
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
    /// The port.
    #[schemars(with = "i32", range(min = 1, max = 65535))]
    pub port: u16,
    /// The protocol the pod declares it for: TCP or UDP.
    #[schemars(length(max = 3))]
    pub protocol: String,
    /// The pod, `namespace/name`.
    #[schemars(length(max = 317))]
    pub pod: String,
}

impl PortAssignmentStatus {
    /// The `Ready` condition, if any.
    pub fn ready_condition(&self) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == CONDITION_READY)
    }
}

/// One key and the port assigned to it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub struct PortEntry {
    /// The key from spec.keys.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
    /// The host port, verified free on the node when it was assigned.
    #[schemars(with = "i32", range(min = 1, max = 65535))]
    pub port: u16,
}

/// Reasons of the `Ready` condition (and of the Warning events that announce them).
pub mod reason {
    /// Every key has a port.
    pub const ALLOCATED: &str = "Allocated";
    /// Every port of the range is held by some key on the node.
    pub const RANGE_EXHAUSTED: &str = "RangeExhausted";
    /// Ports of the range are unassigned but busy on the node (bound by other programs).
    pub const PORT_CONFLICT: &str = "PortConflict";
    /// The node does not exist (any more): the janitor released the object's ports.
    pub const NODE_NOT_FOUND: &str = "NodeNotFound";
    /// The agent's writes for the object keep failing; it retries with backoff (the
    /// message quotes the API server).
    pub const WRITE_FAILED: &str = "WriteFailed";
}

/// Reasons of the events recorded on PortAssignments.
pub mod event_reason {
    /// Keys got ports (the note lists them).
    pub const ASSIGNED: &str = "Assigned";
    /// Keys removed from spec released their ports (the note lists them).
    pub const RELEASED: &str = "Released";
    /// A port recorded under two keys was given to the older object.
    pub const DUPLICATE_PORT: &str = "DuplicatePort";
    /// The agent cannot decode the object and assigns it nothing.
    pub const INVALID_OBJECT: &str = "InvalidObject";
    /// Keys wait: every port of the range is assigned.
    pub const RANGE_EXHAUSTED: &str = super::reason::RANGE_EXHAUSTED;
    /// Keys wait: the unassigned ports are busy on the node.
    pub const PORT_CONFLICT: &str = super::reason::PORT_CONFLICT;
    /// The janitor released the object because its node is gone.
    pub const NODE_NOT_FOUND: &str = super::reason::NODE_NOT_FOUND;
    /// The agent's writes for the object keep failing (recorded when the Ready condition
    /// cannot say so, because the status write itself fails).
    pub const WRITE_FAILED: &str = super::reason::WRITE_FAILED;
    /// A pod of the node declares a port a key holds (recorded on the object and on the pod).
    pub const HOST_PORT_CONFLICT: &str = "HostPortConflict";
}

impl PortAssignment {
    /// Namespace of the object (always set for this namespaced kind once stored).
    pub fn namespace_or_default(&self) -> &str {
        self.metadata.namespace.as_deref().unwrap_or("default")
    }

    /// The object's `Ready` condition, if its status has one.
    pub fn ready_condition(&self) -> Option<&Condition> {
        self.status.as_ref()?.ready_condition()
    }

    /// Whether the agent has served the object's current spec completely: `Ready=True`
    /// for the current generation, with a port for every key.
    pub fn is_ready(&self) -> bool {
        let Some(status) = self.status.as_ref() else { return false };
        status.ready_condition().is_some_and(|c| c.status == "True")
            && status.observed_generation == self.metadata.generation
            && status.ports.len() == self.spec.keys.len()
    }

    /// The object's identity on its node's table.
    pub fn id(&self) -> ObjectId {
        ObjectId::new(self.namespace_or_default(), self.metadata.name.clone().unwrap_or_default())
    }
}

/// The merge patch that removes the agent's finalizer from an object with metadata
/// `meta` and keeps every other finalizer. It carries the resourceVersion it was computed
/// from, so it fails with a conflict (and is recomputed) if the list changed meanwhile.
pub fn finalizer_removal_patch(meta: &ObjectMeta) -> serde_json::Value {
    let remaining: Vec<&String> = meta.finalizers.iter().flatten().filter(|f| *f != FINALIZER).collect();
    serde_json::json!({ "metadata": { "finalizers": remaining, "resourceVersion": meta.resource_version } })
}

/// Why the CRD could not be rendered.
#[derive(Debug, thiserror::Error)]
#[error("cannot render the CRD as YAML: {0}")]
pub struct RenderError(#[from] serde_saphyr::ser::Error);

/// The CRD as YAML, exactly as committed under `crds/`.
pub fn crd_yaml() -> Result<String, RenderError> {
    let mut out = String::from("# Generated by `portassign crd` from src/api.rs: do not edit by hand.\n");
    out.push_str(&serde_saphyr::to_string(&PortAssignment::crd())?);
    Ok(out)
}

/// Identity of a PortAssignment object on the node.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectId {
    /// Namespace of the object.
    pub namespace: String,
    /// Name of the object.
    pub name: String,
}

impl ObjectId {
    /// The identity of `namespace/name`.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self { namespace: namespace.into(), name: name.into() }
    }
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The field selector of the objects (PortAssignments, Pods) of node `node_name`:
/// `spec.nodeName=<node>`, a selectable field of both.
pub fn node_selector(node_name: &str) -> String {
    format!("spec.nodeName={node_name}")
}

/// 64-bit FNV-1a of `bytes`: a hash stable across builds and versions, so names derived
/// from it (the node lock's holder suffix, pool and field-manager names) persist.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_is_the_published_hash() {
        // Names in clusters derive from it: a different value would orphan them.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x85944171f73967e8);
    }
}
