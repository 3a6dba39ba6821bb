//! The ports a pod takes on its node: every `hostPort`, and every container port of a
//! `hostNetwork` pod. One reading of the pod spec, shared by the agent (which keeps
//! those ports out of its assignments) and the checker (which reports keys on them).

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::Pod;
use serde::{Deserialize, Serialize};

use crate::Protocol;

/// Transport protocol of a port a pod declares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum PodProtocol {
    /// TCP.
    #[serde(rename = "TCP")]
    Tcp,
    /// UDP.
    #[serde(rename = "UDP")]
    Udp,
}

impl PodProtocol {
    /// Whether a port declared for this protocol keeps a port for `wanted` out.
    pub fn clashes_with(self, wanted: Protocol) -> bool {
        match self {
            PodProtocol::Tcp => wanted.tcp(),
            PodProtocol::Udp => wanted.udp(),
        }
    }

    /// `TCP` or `UDP`.
    pub fn as_str(self) -> &'static str {
        match self {
            PodProtocol::Tcp => "TCP",
            PodProtocol::Udp => "UDP",
        }
    }
}

/// One port a pod takes on the node.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeclaredPort {
    /// The host port.
    pub port: u16,
    /// Its protocol.
    pub protocol: PodProtocol,
    /// The host address it is mapped on, when the pod names one (`hostIP`); the port is
    /// kept out all the same, since an assigned port is promised on every address.
    pub host_ip: Option<String>,
}

/// The ports `pod` takes on its node: every `hostPort` of its containers, init
/// containers and sidecars (restartable init containers), and every container port of a
/// `hostNetwork` pod — from the moment it is bound until it is terminal (`Succeeded`,
/// `Failed`). SCTP ports are left out: they never clash with TCP or UDP.
pub fn declared_ports(pod: &Pod) -> BTreeSet<DeclaredPort> {
    let mut out = BTreeSet::new();
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return out;
    }
    let Some(spec) = &pod.spec else { return out };
    let host_network = spec.host_network == Some(true);
    let containers = spec.containers.iter().chain(spec.init_containers.iter().flatten());
    for port in containers.flat_map(|c| c.ports.iter().flatten()) {
        let number = match port.host_port {
            Some(host) if host > 0 => host,
            _ if host_network => port.container_port,
            _ => continue,
        };
        let Ok(number) = u16::try_from(number) else { continue };
        let protocol = match port.protocol.as_deref() {
            None | Some("TCP") => PodProtocol::Tcp,
            Some("UDP") => PodProtocol::Udp,
            Some(_) => continue,
        };
        let host_ip = port.host_ip.clone().filter(|ip| !ip.is_empty() && ip != "0.0.0.0" && ip != "::");
        out.insert(DeclaredPort { port: number, protocol, host_ip });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(value: serde_json::Value) -> Pod {
        serde_json::from_value(value).unwrap()
    }

    fn ports(p: &Pod) -> Vec<(u16, PodProtocol)> {
        declared_ports(p).iter().map(|d| (d.port, d.protocol)).collect()
    }

    #[test]
    fn host_ports_of_every_container_kind_are_declared() {
        let p = pod(serde_json::json!({
            "metadata": { "name": "p", "namespace": "ns" },
            "spec": {
                "nodeName": "n",
                "containers": [{ "name": "a", "ports": [
                    { "containerPort": 80, "hostPort": 20004 },
                    { "containerPort": 53, "hostPort": 20053, "protocol": "UDP", "hostIP": "10.0.0.5" },
                    { "containerPort": 81 },
                    { "containerPort": 99, "hostPort": 20099, "protocol": "SCTP" }
                ]}],
                "initContainers": [
                    { "name": "init", "ports": [{ "containerPort": 1, "hostPort": 20001 }] },
                    { "name": "sidecar", "restartPolicy": "Always", "ports": [{ "containerPort": 2, "hostPort": 20002 }] }
                ]
            }
        }));
        assert_eq!(
            ports(&p),
            vec![
                (20001, PodProtocol::Tcp),
                (20002, PodProtocol::Tcp),
                (20004, PodProtocol::Tcp),
                (20053, PodProtocol::Udp)
            ]
        );
        assert!(declared_ports(&p).iter().any(|d| d.host_ip.as_deref() == Some("10.0.0.5")));
    }

    #[test]
    fn every_port_of_a_host_network_pod_is_declared_until_it_is_terminal() {
        let mut p = pod(serde_json::json!({
            "metadata": { "name": "p", "namespace": "ns" },
            "spec": { "hostNetwork": true, "containers": [{ "name": "a", "ports": [{ "containerPort": 20010 }] }] },
            "status": { "phase": "Pending" }
        }));
        assert_eq!(ports(&p), vec![(20010, PodProtocol::Tcp)]);
        p.status.as_mut().unwrap().phase = Some("Running".into());
        assert_eq!(ports(&p).len(), 1);
        for terminal in ["Succeeded", "Failed"] {
            p.status.as_mut().unwrap().phase = Some(terminal.into());
            assert!(ports(&p).is_empty(), "{terminal}");
        }
    }
}
