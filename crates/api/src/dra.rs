//! Dynamic Resource Allocation: what the agent and its kubelet plugin say to each other.
//!
//! A pod asks for a port with a ResourceClaim for the driver [`DRIVER`]. The scheduler
//! allocates it from the node's shared device [`DEVICE`] (consumable capacity
//! [`CAPACITY`]); the kubelet then asks the driver's kubelet plugin to prepare the claim.
//! The plugin (a container of its own: it writes to root-owned host directories) asks
//! the agent, over a Unix socket the two containers share, to give the claim its ports
//! ([`PREPARE_PATH`]), and hands them to the containers as environment variables through
//! CDI. The agent is the one that allocates: through the same table, ordering and
//! durable record as every other port.

use serde::{Deserialize, Serialize};

/// The DRA driver name (ResourceSlices, DeviceClass selectors, the kubelet plugin).
pub const DRIVER: &str = "ports.portassign.io";
/// The one device each node's pool publishes: shared by every claim, counted by capacity.
pub const DEVICE: &str = "ports";
/// The consumable capacity of [`DEVICE`]: how many ports the node's DRA range holds.
pub const CAPACITY: &str = "ports";
/// CDI kind of the devices the plugin writes (`<vendor>/<class>`).
pub const CDI_KIND: &str = "portassign.io/port";
/// The environment variable that carries a claim's (first) port.
pub const PORT_ENV: &str = "PORTASSIGN_PORT";
/// Label on the PortAssignments the agent keeps for claims: the claim's UID. Objects with
/// it draw from the DRA range, and only from it.
pub const CLAIM_LABEL: &str = "portassign.io/resource-claim-uid";
/// HTTP path (on the agent's local socket) that prepares a claim: body [`ClaimRef`],
/// answer [`Prepared`] or [`Failure`].
pub const PREPARE_PATH: &str = "/dra/v1/prepare";
/// HTTP path that releases a claim's ports: body [`ClaimRef`], answer `{}` or [`Failure`].
pub const UNPREPARE_PATH: &str = "/dra/v1/unprepare";

/// A claim as the kubelet names it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
pub struct ClaimRef {
    /// Namespace of the ResourceClaim.
    pub namespace: String,
    /// Name of the ResourceClaim.
    pub name: String,
    /// UID of the ResourceClaim (a claim recreated under the same name is another claim).
    pub uid: String,
}

/// The ports of a prepared claim, one entry per allocation result of this driver.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Prepared {
    /// One per request of the claim allocated from this node's pool.
    pub devices: Vec<PreparedDevice>,
}

/// One allocation result and the ports it got.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PreparedDevice {
    /// The request's name (`container-0-request-0` for an extended resource).
    pub request: String,
    /// The pool (the node's name).
    pub pool: String,
    /// The device ([`DEVICE`]).
    pub device: String,
    /// The share of the device the scheduler allocated (consumable capacity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share_id: Option<String>,
    /// The ports, as many as the request consumed capacity; never empty.
    pub ports: Vec<u16>,
}

/// Why the agent could not prepare or unprepare a claim (the kubelet retries).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// For the kubelet's events and the plugin's log.
    pub error: String,
}

/// The environment variables a container gets for one prepared request: [`PORT_ENV`] (the
/// first port), `PORTASSIGN_PORT_<REQUEST>` (the same, named by the request, for pods
/// whose claim has several requests) and, when the request has several ports,
/// `PORTASSIGN_PORTS` (all, comma-separated).
pub fn port_env(device: &PreparedDevice) -> Vec<String> {
    let Some(first) = device.ports.first() else {
        return Vec::new();
    };
    let request: String =
        device.request.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect();
    let mut env = vec![format!("{PORT_ENV}={first}"), format!("{PORT_ENV}_{request}={first}")];
    if device.ports.len() > 1 {
        let all: Vec<String> = device.ports.iter().map(u16::to_string).collect();
        env.push(format!("PORTASSIGN_PORTS={}", all.join(",")));
    }
    env
}

/// The key a claim's request holds in the claim's PortAssignment: the request's name,
/// with a `.<n>` suffix for its second and later ports. Request names of a claim are
/// unique and keys allow `/` (subrequests are `request/subrequest`).
pub fn request_key(request: &str, index: usize) -> String {
    if index == 0 { request.to_string() } else { format!("{request}.{index}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(request: &str, ports: &[u16]) -> PreparedDevice {
        PreparedDevice {
            request: request.into(),
            pool: "node-1".into(),
            device: DEVICE.into(),
            share_id: None,
            ports: ports.to_vec(),
        }
    }

    #[test]
    fn one_port_names_it_twice() {
        assert_eq!(
            port_env(&device("container-0-request-0", &[40001])),
            ["PORTASSIGN_PORT=40001", "PORTASSIGN_PORT_CONTAINER_0_REQUEST_0=40001"]
        );
    }

    #[test]
    fn several_ports_are_listed() {
        assert_eq!(
            port_env(&device("web/http", &[40001, 40007])),
            ["PORTASSIGN_PORT=40001", "PORTASSIGN_PORT_WEB_HTTP=40001", "PORTASSIGN_PORTS=40001,40007"]
        );
        assert!(port_env(&device("none", &[])).is_empty());
    }

    #[test]
    fn keys_are_request_names() {
        assert_eq!(request_key("port", 0), "port");
        assert_eq!(request_key("port", 2), "port.2");
    }

    #[test]
    fn wire_format_is_camel_case() {
        let mut d = device("port", &[1]);
        d.share_id = Some("abc".into());
        let json = serde_json::to_value(&d).unwrap();
        assert_eq!(json["shareId"], "abc");
        assert_eq!(json["ports"][0], 1);
    }
}
