//! Ports taken on the node without a socket the probe could see: ports that pods of
//! the node declare (`hostPort`, and every port of a `hostNetwork` pod) and ports the
//! kernel reserves (`net.ipv4.ip_local_reserved_ports`). docs/design.md §10.
//!
//! The allocator asks [`NodePorts::taken`] for every candidate port: a bit test and a
//! hash lookup, no syscall. The pod watcher keeps the declared ports up to date and
//! reports a pod that declares a port a key already holds (the key keeps its port); a
//! timer re-reads the sysctl.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    fmt,
    sync::Arc,
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use kube::{
    Api, Resource,
    runtime::{
        WatchStreamExt,
        events::{Event, EventType},
        watcher,
    },
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{reconcile::Context, table::PortTable};
use crate::api::{ObjectId, PodConflict, PortAssignment, Protocol, event_reason};

/// Where the kernel lists the ports it reserves (per network namespace).
pub const RESERVED_PORTS_FILE: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";
/// How often the reserved ports are read again: a change takes effect within this time.
pub const RESERVED_PORTS_REFRESH: Duration = Duration::from_secs(2);

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

fn pod_ports(pod: &Pod) -> PodPorts {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    PodPorts { pod: format!("{namespace}/{name}").into(), uid: pod.metadata.uid.clone(), ports: declared_ports(pod) }
}

/// A 65,536-bit set of ports.
#[derive(Clone, PartialEq, Eq)]
struct PortBits(Box<[u64; 1024]>);

impl PortBits {
    fn new() -> Self {
        Self(Box::new([0; 1024]))
    }

    fn contains(&self, port: u16) -> bool {
        self.0[usize::from(port / 64)] & (1 << (port % 64)) != 0
    }

    fn insert(&mut self, port: u16) {
        self.0[usize::from(port / 64)] |= 1 << (port % 64);
    }

    fn count(&self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }
}

impl fmt::Debug for PortBits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PortBits({} ports)", self.count())
    }
}

/// Why the kernel's reserved ports could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("cannot parse {RESERVED_PORTS_FILE} item {0:?}")]
pub struct ReservedParseError(String);

/// Parses the sysctl's format: `8080,9000-9100` (empty when nothing is reserved).
fn parse_reserved(text: &str) -> Result<PortBits, ReservedParseError> {
    let mut bits = PortBits::new();
    for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let bad = || ReservedParseError(item.to_owned());
        let (first, last) = match item.split_once('-') {
            Some((a, b)) => (a.trim().parse::<u16>().map_err(|_| bad())?, b.trim().parse::<u16>().map_err(|_| bad())?),
            None => {
                let p = item.parse::<u16>().map_err(|_| bad())?;
                (p, p)
            }
        };
        for port in first..=last {
            bits.insert(port);
        }
    }
    Ok(bits)
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

/// The node's ports taken without a socket. Guarded by its own lock, always taken
/// after the table's when both are needed.
#[derive(Debug)]
pub struct NodePorts {
    pods: HashMap<Arc<str>, PodPorts>,
    /// Port → the pods that declare it.
    by_port: HashMap<u16, Vec<(Arc<str>, DeclaredPort)>>,
    reserved: PortBits,
    reserved_text: String,
    /// Protocol of every object the agent knows: decides whether a pod's port clashes.
    protocols: HashMap<ObjectId, Protocol>,
    /// Conflicts already reported with events.
    reported: HashSet<Conflict>,
}

impl Default for NodePorts {
    fn default() -> Self {
        Self {
            pods: HashMap::new(),
            by_port: HashMap::new(),
            reserved: PortBits::new(),
            reserved_text: String::new(),
            protocols: HashMap::new(),
            reported: HashSet::new(),
        }
    }
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
        self.reserved.count()
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
        let freed = (0..1024).any(|w| self.reserved.0[w] & !bits.0[w] != 0);
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

/// Watches the node's pods (field selector `spec.nodeName`) and keeps [`NodePorts`] up
/// to date; `synced` turns true after the first complete list, before which the agent
/// assigns nothing.
pub(crate) async fn watch_pods(ctx: Arc<Context>, synced: watch::Sender<bool>, shutdown: CancellationToken) {
    let api: Api<Pod> = Api::all(ctx.client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={}", ctx.node_name)).page_size(500);
    let mut events = watcher(api, config).default_backoff().boxed();
    let mut listing: Option<HashMap<Arc<str>, PodPorts>> = None;
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return,
            event = events.next() => event,
        };
        let Some(event) = event else { return };
        let change = match event {
            Err(error) => {
                warn!(%error, "watching this node's pods failed; retrying (no port is assigned before the first list)");
                continue;
            }
            Ok(watcher::Event::Init) => {
                listing = Some(HashMap::new());
                continue;
            }
            Ok(watcher::Event::InitApply(pod)) => {
                let ports = pod_ports(&pod);
                listing.get_or_insert_with(HashMap::new).insert(ports.pod.clone(), ports);
                continue;
            }
            Ok(watcher::Event::InitDone) => {
                let pods = listing.take().unwrap_or_default();
                let change = {
                    let table = ctx.table();
                    ctx.node_ports().replace_pods(pods, &table)
                };
                let _ = synced.send(true);
                change
            }
            Ok(watcher::Event::Apply(pod)) => {
                let table = ctx.table();
                ctx.node_ports().set_pod(pod_ports(&pod), &table)
            }
            Ok(watcher::Event::Delete(pod)) => {
                let table = ctx.table();
                let gone = PodPorts { ports: BTreeSet::new(), ..pod_ports(&pod) };
                ctx.node_ports().set_pod(gone, &table)
            }
        };
        after_change(&ctx, change);
    }
}

/// Reports the conflicts that the rebuilt table and the first pod list show together.
pub(crate) fn recheck(ctx: &Context) {
    let change = {
        let table = ctx.table();
        ctx.node_ports().recheck(&table)
    };
    after_change(ctx, change);
}

/// Reports new conflicts both ways, refreshes the metrics, and reconciles the objects
/// concerned (their status lists their conflicts) and those waiting for a port.
fn after_change(ctx: &Context, change: PodChange) {
    for (conflict, uid) in &change.new_conflicts {
        report_conflict(ctx, conflict, uid.clone());
    }
    ctx.metrics.pod_conflicts_found(change.new_conflicts.len());
    let wake = {
        let mut table = ctx.table();
        ctx.set_node_gauges(&table);
        if change.freed { table.take_waiting() } else { Vec::new() }
    };
    for id in change.touched.iter().chain(&wake) {
        ctx.wake_object(id);
    }
}

fn report_conflict(ctx: &Context, c: &Conflict, uid: Option<String>) {
    let (namespace, name) = c.pod.split_once('/').unwrap_or(("", &c.pod));
    let pod_ref = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        namespace: Some(namespace.into()),
        name: Some(name.into()),
        uid,
        ..ObjectReference::default()
    };
    let object_ref = ObjectReference {
        api_version: Some(PortAssignment::api_version(&()).into()),
        kind: Some(PortAssignment::kind(&()).into()),
        namespace: Some(c.object.namespace.clone()),
        name: Some(c.object.name.clone()),
        ..ObjectReference::default()
    };
    let proto = c.protocol.as_str();
    let on_object = format!(
        "pod {} declares host port {}/{proto}, which key {} of this object holds on node {}; the key keeps its port: traffic to that port may reach the pod instead",
        c.pod, c.port, c.key, ctx.node_name
    );
    let on_pod = format!(
        "host port {}/{proto} of this pod is held by key {} of PortAssignment {} on node {} (portassign keeps it with the key)",
        c.port, c.key, c.object, ctx.node_name
    );
    warn!(pod = %c.pod, object = %c.object, key = %c.key, port = c.port, "a pod declares a port a key holds");
    publish(ctx, object_ref.clone(), Some(pod_ref.clone()), on_object);
    publish(ctx, pod_ref, Some(object_ref), on_pod);
}

fn publish(ctx: &Context, regarding: ObjectReference, related: Option<ObjectReference>, note: String) {
    let event = Event {
        type_: EventType::Warning,
        reason: event_reason::HOST_PORT_CONFLICT.into(),
        note: Some(note),
        action: "Allocate".into(),
        secondary: related,
    };
    ctx.publish_event(regarding, event);
}

/// Reads the kernel's reserved ports now.
pub(crate) fn read_reserved(ctx: &Context) {
    // No such file (not Linux, or /proc not mounted): nothing is reserved that we can see.
    let text = std::fs::read_to_string(RESERVED_PORTS_FILE).unwrap_or_default();
    let freed = {
        let mut node = ctx.node_ports();
        if node.reserved_text() == text.trim() {
            return;
        }
        match node.set_reserved(&text) {
            Ok(freed) => {
                info!(reserved = %text.trim(), "the kernel's reserved ports (ip_local_reserved_ports) are never assigned");
                freed
            }
            Err(error) => {
                warn!(%error, "keeping the reserved ports read before");
                return;
            }
        }
    };
    let wake = {
        let mut table = ctx.table();
        ctx.set_node_gauges(&table);
        if freed { table.take_waiting() } else { Vec::new() }
    };
    for id in &wake {
        ctx.wake_object(id);
    }
}

/// Re-reads the kernel's reserved ports every [`RESERVED_PORTS_REFRESH`]: a change of
/// the sysctl takes effect without a restart. One small file read per period, none per port.
pub(crate) async fn refresh_reserved(ctx: Arc<Context>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(RESERVED_PORTS_REFRESH) => {}
        }
        read_reserved(&ctx);
    }
}

impl Context {
    /// Locks the node's ports taken without a socket (after the table, when both are needed).
    pub fn node_ports(&self) -> std::sync::MutexGuard<'_, NodePorts> {
        self.node_ports.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Sets the gauges of pods' ports, reservations and conflicts (the table's lock held).
    pub(crate) fn set_node_gauges(&self, table: &PortTable) {
        let node = self.node_ports();
        self.metrics.set_node_ports(node.pod_port_count(), node.reserved_count(), node.conflicts(table).len());
    }

    /// Asks the controller to reconcile `id` again.
    pub(crate) fn wake_object(&self, id: &ObjectId) {
        let _ = self.wake.send(kube::runtime::reflector::ObjectRef::new(&id.name).within(&id.namespace));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::range::PortRange;

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
