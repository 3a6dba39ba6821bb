//! Ports taken on the node without a socket the probe could see: ports that pods of
//! the node declare (`hostPort`, and every port of a `hostNetwork` pod) and ports the
//! kernel reserves (`net.ipv4.ip_local_reserved_ports`). docs/design.md §10.
//!
//! The allocator asks [`NodePorts::taken`] for every candidate port: a bit test and a
//! hash lookup, no syscall. Plain data: the pod watch and the sysctl refresh
//! ([`super::pods`]) feed it through [`super::state::NodeState`], and report a pod that
//! declares a port a key already holds (the key keeps its port).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::Arc,
};

use k8s_openapi::api::core::v1::Pod;
pub use portassign_api::pods::{DeclaredPort, PodProtocol, declared_ports};
use portassign_api::{
    ObjectId, PodConflict, Protocol,
    range::{PortRanges, PortSet},
    table::PodPortEntry,
};

use super::table::PortTable;

/// Where the kernel lists the ports it reserves (per network namespace).
pub const RESERVED_PORTS_FILE: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// What the agent keeps of a pod: its identity and the ports it takes. The Pod object
/// itself is dropped as soon as this is derived.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodPorts {
    /// `namespace/name`.
    pub pod: Arc<str>,
    /// The pod's uid (for events about it).
    pub uid: Option<String>,
    /// The ports it takes.
    pub ports: BTreeSet<DeclaredPort>,
}

/// What the agent keeps of `pod`.
pub fn pod_ports(pod: &Pod) -> PodPorts {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    PodPorts { pod: format!("{namespace}/{name}").into(), uid: pod.metadata.uid.clone(), ports: declared_ports(pod) }
}

/// Why the kernel's reserved ports could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("cannot parse {RESERVED_PORTS_FILE}: {0}")]
pub struct ReservedParseError(String);

/// Parses the sysctl's format: `8080,9000-9100` (empty when nothing is reserved), the
/// same list syntax as the agent's port flags.
fn parse_reserved(text: &str) -> Result<PortSet, ReservedParseError> {
    let ranges: PortRanges =
        text.trim().parse().map_err(|e: portassign_api::range::RangeError| ReservedParseError(e.to_string()))?;
    Ok(PortSet::from(&ranges))
}

/// A key holding a port that a pod of the node declares too.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Conflict {
    /// The object of the key.
    pub object: ObjectId,
    /// The key (it keeps its port).
    pub key: String,
    /// The port.
    pub port: u16,
    /// The pod's protocol for it.
    pub protocol: PodProtocol,
    /// `namespace/name` of the pod.
    pub pod: Arc<str>,
}

/// The node's ports taken without a socket. Part of [`super::state::NodeState`], which
/// changes it together with the table.
#[derive(Debug, Default)]
pub struct NodePorts {
    pods: HashMap<Arc<str>, PodPorts>,
    /// Port → the pods that declare it.
    by_port: HashMap<u16, Vec<(Arc<str>, DeclaredPort)>>,
    reserved: PortSet,
    reserved_text: String,
    /// Protocol of every object the agent knows: decides whether a pod's port clashes.
    protocols: HashMap<ObjectId, Protocol>,
    /// Conflicts already reported with events.
    reported: HashSet<Conflict>,
}

/// What changed when the pods were updated.
#[derive(Debug, Default)]
pub struct PodChange {
    /// Conflicts not reported before.
    pub new_conflicts: Vec<(Conflict, Option<String>)>,
    /// Objects whose conflicts (in their status) may have changed.
    pub touched: BTreeSet<ObjectId>,
    /// Whether some port was given back (a pod left or dropped a port).
    pub freed: bool,
}

impl NodePorts {
    /// Whether `port` is taken for `protocol` by a pod or a kernel reservation: the
    /// allocator's check, a bit test and a hash lookup.
    pub fn taken(&self, port: u16, protocol: Protocol) -> bool {
        self.reserved.contains(port)
            || self
                .by_port
                .get(&port)
                .is_some_and(|takers| takers.iter().any(|(_, d)| d.protocol.clashes_with(protocol)))
    }

    /// Whether the kernel reserves `port`.
    pub fn is_reserved(&self, port: u16) -> bool {
        self.reserved.contains(port)
    }

    /// The sysctl's text as last read.
    pub fn reserved_text(&self) -> &str {
        &self.reserved_text
    }

    /// Number of ports the kernel reserves.
    pub fn reserved_count(&self) -> usize {
        self.reserved.len()
    }

    /// The pods that declare `port`, with how.
    pub fn takers(&self, port: u16) -> impl Iterator<Item = (&str, &DeclaredPort)> {
        self.by_port.get(&port).into_iter().flatten().map(|(pod, d)| (&**pod, d))
    }

    /// Every port pods take, in port order.
    pub fn pod_ports(&self) -> Vec<PodPortEntry> {
        let mut out: Vec<PodPortEntry> = self
            .by_port
            .iter()
            .flat_map(|(port, takers)| {
                takers.iter().map(move |(pod, d)| PodPortEntry {
                    port: *port,
                    protocol: d.protocol,
                    host_ip: d.host_ip.clone(),
                    pod: pod.to_string(),
                })
            })
            .collect();
        out.sort_by(|a, b| (a.port, &a.pod, a.protocol).cmp(&(b.port, &b.pod, b.protocol)));
        out
    }

    /// Number of distinct ports pods take.
    pub fn pod_port_count(&self) -> usize {
        self.by_port.len()
    }

    /// Remembers the protocol of `object` (its conflicts depend on it).
    pub fn remember(&mut self, object: &ObjectId, protocol: Protocol) {
        if self.protocols.get(object) != Some(&protocol) {
            self.protocols.insert(object.clone(), protocol);
        }
    }

    /// Forgets an object that holds nothing any more.
    pub fn forget(&mut self, object: &ObjectId) {
        self.protocols.remove(object);
        self.reported.retain(|c| &c.object != object);
    }

    fn clashes(&self, object: &ObjectId, protocol: PodProtocol) -> bool {
        // An object not seen yet counts as asking for both protocols: report rather than miss.
        protocol.clashes_with(self.protocols.get(object).copied().unwrap_or(Protocol::TcpUdp))
    }

    /// The conflicts of the keys of `object` that hold `ports` (key → port), for its status.
    pub fn conflicts_of(&self, object: &ObjectId, ports: &BTreeMap<String, u16>) -> Vec<PodConflict> {
        let mut out = Vec::new();
        for (key, port) in ports {
            for (pod, d) in self.takers(*port) {
                if self.clashes(object, d.protocol) {
                    out.push(PodConflict {
                        key: key.clone(),
                        port: *port,
                        protocol: d.protocol.as_str().to_owned(),
                        pod: pod.to_owned(),
                    });
                }
            }
        }
        out.sort_by(|a, b| (&a.key, &a.pod, &a.protocol).cmp(&(&b.key, &b.pod, &b.protocol)));
        out.dedup();
        out
    }

    /// Every current conflict between a pod and a key of `table`.
    pub fn conflicts(&self, table: &PortTable) -> Vec<Conflict> {
        let mut out = Vec::new();
        for (port, takers) in &self.by_port {
            let Some(holder) = table.holder(*port) else { continue };
            for (pod, d) in takers {
                if self.clashes(&holder.object, d.protocol) {
                    out.push(Conflict {
                        object: ObjectId::clone(&holder.object),
                        key: holder.key.clone(),
                        port: *port,
                        protocol: d.protocol,
                        pod: pod.clone(),
                    });
                }
            }
        }
        out.sort();
        out
    }

    /// Replaces the kernel's reserved ports with `text` (the sysctl's content); whether
    /// some port stopped being reserved.
    pub fn set_reserved(&mut self, text: &str) -> Result<bool, ReservedParseError> {
        let bits = parse_reserved(text)?;
        let freed = self.reserved.has_any_outside(&bits);
        self.reserved = bits;
        self.reserved_text = text.trim().to_owned();
        Ok(freed)
    }

    /// Sets the ports of one pod (empty when it is terminal or gone).
    pub fn set_pod(&mut self, pod: PodPorts, table: &PortTable) -> PodChange {
        let mut change = PodChange::default();
        let previous = self.pods.remove(&pod.pod);
        let before = previous.as_ref().map(|p| p.ports.clone()).unwrap_or_default();
        for gone in before.difference(&pod.ports) {
            change.freed = true;
            if let Some(takers) = self.by_port.get_mut(&gone.port) {
                takers.retain(|(p, d)| !(*p == pod.pod && d == gone));
                if takers.is_empty() {
                    self.by_port.remove(&gone.port);
                }
            }
            if let Some(holder) = table.holder(gone.port) {
                change.touched.insert(ObjectId::clone(&holder.object));
            }
            self.reported.retain(|c| !(c.pod == pod.pod && c.port == gone.port && c.protocol == gone.protocol));
        }
        for added in pod.ports.difference(&before) {
            self.by_port.entry(added.port).or_default().push((pod.pod.clone(), added.clone()));
            let Some(holder) = table.holder(added.port) else { continue };
            if !self.clashes(&holder.object, added.protocol) {
                continue;
            }
            let conflict = Conflict {
                object: ObjectId::clone(&holder.object),
                key: holder.key.clone(),
                port: added.port,
                protocol: added.protocol,
                pod: pod.pod.clone(),
            };
            change.touched.insert(conflict.object.clone());
            if self.reported.insert(conflict.clone()) {
                change.new_conflicts.push((conflict, pod.uid.clone()));
            }
        }
        if !pod.ports.is_empty() {
            self.pods.insert(pod.pod.clone(), pod);
        }
        change
    }

    /// The current conflicts not reported yet (after the table was rebuilt, a pod list
    /// that finished first found no holder): each is reported once, like a new one.
    pub fn recheck(&mut self, table: &PortTable) -> PodChange {
        let mut change = PodChange::default();
        for conflict in self.conflicts(table) {
            if self.reported.insert(conflict.clone()) {
                let uid = self.pods.get(&conflict.pod).and_then(|p| p.uid.clone());
                change.touched.insert(conflict.object.clone());
                change.new_conflicts.push((conflict, uid));
            }
        }
        change
    }

    /// Replaces every pod (after a full list): pods missing from `pods` are gone.
    pub fn replace_pods(&mut self, pods: HashMap<Arc<str>, PodPorts>, table: &PortTable) -> PodChange {
        let mut change = PodChange::default();
        let gone: Vec<Arc<str>> = self.pods.keys().filter(|k| !pods.contains_key(*k)).cloned().collect();
        for pod in gone {
            change.absorb(self.set_pod(PodPorts { pod, uid: None, ports: BTreeSet::new() }, table));
        }
        for (_, pod) in pods {
            change.absorb(self.set_pod(pod, table));
        }
        change
    }
}

impl PodChange {
    fn absorb(&mut self, other: PodChange) {
        self.new_conflicts.extend(other.new_conflicts);
        self.touched.extend(other.touched);
        self.freed |= other.freed;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use portassign_api::range::PortRange;

    #[test]
    fn taken_follows_protocols_pods_and_reservations() {
        let table = PortTable::new(PortRange::new(100, 200).unwrap());
        let mut node = NodePorts::default();
        let udp = DeclaredPort { port: 150, protocol: PodProtocol::Udp, host_ip: None };
        node.set_pod(PodPorts { pod: "ns/p".into(), uid: None, ports: [udp].into() }, &table);
        assert!(node.taken(150, Protocol::Udp) && node.taken(150, Protocol::TcpUdp));
        assert!(!node.taken(150, Protocol::Tcp));
        let change = node.set_pod(PodPorts { pod: "ns/p".into(), uid: None, ports: BTreeSet::new() }, &table);
        assert!(change.freed && !node.taken(150, Protocol::Udp));
        assert_eq!(node.set_reserved("120, 130-132\n"), Ok(false));
        assert!(node.taken(131, Protocol::Tcp) && node.taken(120, Protocol::Udp) && !node.taken(133, Protocol::Tcp));
        assert_eq!(node.set_reserved(""), Ok(true));
        assert!(!node.taken(131, Protocol::Tcp));
        assert!(node.set_reserved("12x").is_err());
    }

    #[test]
    fn a_pod_on_a_held_port_is_a_conflict_reported_once() {
        let mut table = PortTable::new(PortRange::new(100, 100).unwrap());
        let a = ObjectId::new("ns", "a");
        let r = table.reserve(&a, ["k"], &mut |_| true);
        table.commit(&a, &r.ports);
        let mut node = NodePorts::default();
        node.remember(&a, Protocol::Tcp);
        let tcp = DeclaredPort { port: 100, protocol: PodProtocol::Tcp, host_ip: None };
        let pod = PodPorts { pod: "ns/p".into(), uid: Some("u".into()), ports: [tcp].into() };
        let change = node.set_pod(pod.clone(), &table);
        assert_eq!(change.new_conflicts.len(), 1);
        assert_eq!(change.new_conflicts[0].0.key, "k");
        assert_eq!(node.conflicts(&table).len(), 1);
        assert_eq!(node.conflicts_of(&a, &r.ports)[0].pod, "ns/p");
        // The same pod seen again (a relist) is not reported twice.
        assert!(node.set_pod(pod, &table).new_conflicts.is_empty());
        // A UDP pod on a TCP key's port is no conflict.
        let udp = DeclaredPort { port: 100, protocol: PodProtocol::Udp, host_ip: None };
        let change = node.set_pod(PodPorts { pod: "ns/q".into(), uid: None, ports: [udp].into() }, &table);
        assert!(change.new_conflicts.is_empty());
        assert_eq!(node.conflicts(&table).len(), 1);
    }
}
