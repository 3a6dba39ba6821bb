//! The node's state: the port table and the ports taken on the node without a socket,
//! under one lock, in one type whose methods are the only way to allocate, release and
//! explain a port.
//!
//! [`NodeState::reserve`] is the one place a port is chosen: a port of the pool that no
//! key holds, no pod declares, the kernel does not reserve, and the probe finds free.
//! Everything else (the reconciler, the pod watch, the rebuild, the vanished-object
//! sweep, `/debug/table`) goes through the methods below, so the table and the node's
//! ports are always seen and changed together.

use std::{collections::HashMap, sync::Arc};

use portassign_api::{
    PodConflict, Protocol,
    range::PortPool,
    table::{ConflictEntry, Explanation, Rule, Skipped, TableDocument, TableEntry},
};

use super::{
    node_ports::{Conflict, NodePorts, PodChange, PodPorts, ReservedParseError},
    probe::PortProbe,
    table::{Displaced, ObjectId, PortTable, Recorded, Released, Reservation, Source},
};

/// The gauges the node's state feeds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gauges {
    /// Ports held by keys.
    pub held: usize,
    /// Ports of the pool no key holds.
    pub free_in_range: usize,
    /// Objects holding ports.
    pub objects: usize,
    /// Distinct ports pods of the node declare.
    pub pod_ports: usize,
    /// Ports the kernel reserves.
    pub reserved: usize,
    /// Keys holding a port a pod declares too.
    pub conflicts: usize,
}

/// The table and the node's taken ports, changed together.
#[derive(Debug)]
pub struct NodeState {
    table: PortTable,
    node: NodePorts,
}

impl NodeState {
    /// An empty state allocating from `pool`.
    pub fn new(pool: PortPool) -> Self {
        Self::with_pools(pool, None)
    }

    /// An empty state allocating keys from `keys` and ResourceClaims from `claims`.
    pub fn with_pools(keys: PortPool, claims: Option<PortPool>) -> Self {
        Self { table: PortTable::with_pools(keys, claims), node: NodePorts::default() }
    }

    /// The port table, read-only.
    pub fn table(&self) -> &PortTable {
        &self.table
    }

    /// The node's ports taken without a socket, read-only.
    pub fn node_ports(&self) -> &NodePorts {
        &self.node
    }

    /// Gives every key of `object` a port, keeping the ports its keys hold; what the
    /// object's status should say, and the pods that declare one of its ports. The
    /// ports are held from here on: the caller records them, then [`Self::commit`]s.
    pub fn reserve<'k>(
        &mut self,
        object: &ObjectId,
        protocol: Protocol,
        keys: impl IntoIterator<Item = &'k str>,
        probe: &dyn PortProbe,
    ) -> (Reservation, Vec<PodConflict>) {
        self.reserve_from(Source::Keys, object, protocol, keys, probe)
    }

    /// [`Self::reserve`] from the pool of `source` (an object kept for a ResourceClaim
    /// draws from the claims' pool only).
    pub fn reserve_from<'k>(
        &mut self,
        source: Source,
        object: &ObjectId,
        protocol: Protocol,
        keys: impl IntoIterator<Item = &'k str>,
        probe: &dyn PortProbe,
    ) -> (Reservation, Vec<PodConflict>) {
        self.node.remember(object, protocol);
        let node = &self.node;
        // Ports pods declare and ports the kernel reserves are looked up in memory
        // before the probe's bind: no syscall for them.
        let reservation = self.table.reserve_from(source, object, keys, &mut |port| {
            !node.taken(port, protocol) && probe.is_free(port, protocol)
        });
        let conflicts = self.node.conflicts_of(object, &reservation.ports);
        (reservation, conflicts)
    }

    /// The status naming `ports` (key → port) is durable: the ports of keys it no longer
    /// lists are released.
    pub fn commit(&mut self, object: &ObjectId, ports: &std::collections::BTreeMap<String, u16>) -> Released {
        self.table.commit(object, ports)
    }

    /// Releases every port of `object` (deleted, or gone) and forgets it.
    pub fn release_object(&mut self, object: &ObjectId) -> Released {
        self.node.forget(object);
        self.table.release_object(object)
    }

    /// Rebuilds the table from the statuses (`protocols`: each recorded object's
    /// protocol); the keys that lost a port recorded twice.
    pub fn rebuild<T: Ord>(
        &mut self,
        records: Vec<Recorded<T>>,
        protocols: &HashMap<ObjectId, Protocol>,
    ) -> Vec<Displaced> {
        for (object, protocol) in protocols {
            self.node.remember(object, *protocol);
        }
        self.table.rebuild(records)
    }

    /// Sets the ports of one pod (empty when it is terminal or gone).
    pub fn set_pod(&mut self, pod: PodPorts) -> PodChange {
        self.node.set_pod(pod, &self.table)
    }

    /// Replaces every pod after a full list.
    pub fn replace_pods(&mut self, pods: HashMap<Arc<str>, PodPorts>) -> PodChange {
        self.node.replace_pods(pods, &self.table)
    }

    /// The conflicts between pods and keys not reported yet.
    pub fn recheck(&mut self) -> PodChange {
        self.node.recheck(&self.table)
    }

    /// Replaces the kernel's reserved ports with the sysctl's text; whether a port
    /// stopped being reserved.
    pub fn set_reserved(&mut self, text: &str) -> Result<bool, ReservedParseError> {
        self.node.set_reserved(text)
    }

    /// The objects that were short of ports, to wake now that a port came free by other
    /// means than a release.
    pub fn take_waiting(&mut self) -> Vec<ObjectId> {
        self.table.take_waiting()
    }

    /// Every current conflict between a pod and a key.
    pub fn conflicts(&self) -> Vec<Conflict> {
        self.node.conflicts(&self.table)
    }

    /// The values of the state's gauges.
    pub fn gauges(&self) -> Gauges {
        Gauges {
            held: self.table.held(),
            free_in_range: self.table.free_in_range(),
            objects: self.table.objects(),
            pod_ports: self.node.pod_port_count(),
            reserved: self.node.reserved_count(),
            conflicts: self.conflicts().len(),
        }
    }

    /// Every rule that keeps `port` out, in the allocator's order; the sockets are
    /// probed (both protocols) only here, on request.
    pub fn explain(&self, port: u16, probe: &dyn PortProbe) -> Explanation {
        let mut rules = Vec::new();
        let mut rule = |rule: &str, detail: String| rules.push(Rule { rule: rule.to_owned(), detail });
        if let Some(exclusion) = self.table.pool().exclusion(port) {
            rule(exclusion.rule(), exclusion.to_string());
        }
        if let Some(holder) = self.table.holder(port) {
            rule("held", format!("key {} of {}", holder.key, holder.object));
        }
        if self.node.is_reserved(port) {
            let text = self.node.reserved_text();
            rule("kernel-reserved", format!("listed in net.ipv4.ip_local_reserved_ports ({text})"));
        }
        for (pod, declared) in self.node.takers(port) {
            let on = declared.host_ip.as_deref().map(|ip| format!(" on {ip}")).unwrap_or_default();
            rule("pod-host-port", format!("pod {pod} declares it for {}{on}", declared.protocol.as_str()));
        }
        for (protocol, name) in [(Protocol::Tcp, "TCP"), (Protocol::Udp, "UDP")] {
            if !probe.is_free(port, protocol) {
                rule("socket-in-use", format!("a socket on the node holds it for {name}"));
            }
        }
        Explanation { port, assignable: rules.is_empty(), rules }
    }

    /// The `/debug/table` document of node `node`.
    pub fn document(&self, node: &str, ready: bool) -> TableDocument {
        let ports = self
            .table
            .entries()
            .into_iter()
            .map(|(port, h)| TableEntry {
                port,
                namespace: h.object.namespace.clone(),
                name: h.object.name.clone(),
                key: h.key.clone(),
            })
            .collect();
        let pool = self.table.pool();
        let skipped = Skipped {
            excluded_by_flag: pool.excluded().to_string(),
            nodeport_range: pool.node_port().map(|r| r.to_string()).unwrap_or_default(),
            kernel_reserved: self.node.reserved_text().to_owned(),
            pod_ports: self.node.pod_ports(),
        };
        let conflicts = self
            .conflicts()
            .into_iter()
            .map(|c| ConflictEntry {
                port: c.port,
                namespace: c.object.namespace,
                name: c.object.name,
                key: c.key,
                pod: c.pod.to_string(),
                protocol: c.protocol.as_str().to_owned(),
            })
            .collect();
        TableDocument {
            node: node.to_owned(),
            range: pool.ranges().to_string(),
            claim_range: self.table.claims_pool().map(|p| p.ranges().to_string()).unwrap_or_default(),
            ready,
            ports,
            skipped,
            conflicts,
            explain: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use portassign_api::{
        pods::{DeclaredPort, PodProtocol},
        range::PortRange,
    };

    use super::*;

    struct AllFree;

    impl PortProbe for AllFree {
        fn is_free(&self, _port: u16, _protocol: Protocol) -> bool {
            true
        }
    }

    fn pod(name: &str, port: u16) -> PodPorts {
        let declared = DeclaredPort { port, protocol: PodProtocol::Tcp, host_ip: None };
        PodPorts { pod: name.into(), uid: None, ports: BTreeSet::from([declared]) }
    }

    #[test]
    fn reserve_skips_pod_ports_and_reservations_and_release_forgets_the_object() {
        let mut state = NodeState::new(PortRange::new(100, 103).unwrap().into());
        let a = ObjectId::new("ns", "a");
        state.set_pod(pod("ns/p", 100));
        state.set_reserved("101").unwrap();
        let (r, conflicts) = state.reserve(&a, Protocol::Tcp, ["k1", "k2", "k3"], &AllFree);
        assert_eq!(r.ports.values().copied().collect::<Vec<_>>(), vec![102, 103]);
        assert_eq!(r.unassigned, vec!["k3".to_owned()]);
        assert!(conflicts.is_empty());
        state.commit(&a, &r.ports);
        let explained = state.explain(100, &AllFree);
        assert!(!explained.assignable && explained.rules[0].rule == "pod-host-port", "{explained:?}");
        assert_eq!(state.explain(102, &AllFree).rules[0].rule, "held");
        // A pod that comes on a held port is a conflict until the object is released.
        state.set_pod(pod("ns/q", 102));
        assert_eq!(state.gauges().conflicts, 1);
        let released = state.release_object(&a);
        assert_eq!(released.ports.len(), 2);
        assert_eq!(
            state.gauges(),
            Gauges { held: 0, free_in_range: 4, objects: 0, pod_ports: 2, reserved: 1, conflicts: 0 }
        );
        assert_eq!(state.document("n", true).skipped.pod_ports.len(), 2);
    }
}
