//! The node's pods and the kernel's reserved ports, kept in the node's state: the pod
//! watch (field selector `spec.nodeName`), the periodic re-read of
//! `net.ipv4.ip_local_reserved_ports`, and the `HostPortConflict` events when a pod
//! declares a port a key holds. docs/design.md §10.

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api,
    runtime::{
        WatchStreamExt,
        events::{Event, EventType},
        watcher,
    },
};
use portassign_api::{PortAssignment, event_reason, node_selector};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{
    backoff::WatchBackoff,
    context::{Context, reference_to},
    node_ports::{Conflict, PodChange, PodPorts, RESERVED_PORTS_FILE, pod_ports},
};

/// How often the reserved ports are read again: a change takes effect within this time.
pub const RESERVED_PORTS_REFRESH: Duration = Duration::from_secs(2);

/// Watches the node's pods (field selector `spec.nodeName`) and keeps their ports up
/// to date; `synced` turns true after the first complete list, before which the agent
/// assigns nothing.
pub(crate) async fn watch_pods(ctx: Arc<Context>, synced: watch::Sender<bool>, shutdown: CancellationToken) {
    let api: Api<Pod> = Api::all(ctx.client().clone());
    let config = watcher::Config::default().fields(&node_selector(ctx.node_name())).page_size(500);
    let mut events = watcher(api, config).backoff(WatchBackoff::new()).boxed();
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
                let change = ctx.state().replace_pods(pods);
                let _ = synced.send(true);
                change
            }
            Ok(watcher::Event::Apply(pod)) => ctx.state().set_pod(pod_ports(&pod)),
            Ok(watcher::Event::Delete(pod)) => {
                let gone = PodPorts { ports: BTreeSet::new(), ..pod_ports(&pod) };
                ctx.state().set_pod(gone)
            }
        };
        after_change(&ctx, change);
    }
}

/// Reports the conflicts that the rebuilt table and the first pod list show together.
pub(crate) fn recheck(ctx: &Context) {
    let change = ctx.state().recheck();
    after_change(ctx, change);
}

/// Reports new conflicts both ways, refreshes the metrics, and reconciles the objects
/// concerned (their status lists their conflicts) and those waiting for a port.
fn after_change(ctx: &Context, change: PodChange) {
    for (conflict, uid) in &change.new_conflicts {
        report_conflict(ctx, conflict, uid.clone());
    }
    ctx.metrics().pod_conflicts_found(change.new_conflicts.len());
    let wake = if change.freed { ctx.state().take_waiting() } else { Vec::new() };
    ctx.update_gauges();
    for id in change.touched.iter().chain(&wake) {
        ctx.wake_object(id);
    }
}

fn report_conflict(ctx: &Context, c: &Conflict, uid: Option<String>) {
    let (namespace, name) = c.pod.split_once('/').unwrap_or(("", &c.pod));
    let pod_ref = reference_to::<Pod>(namespace, name, uid);
    let object_ref = reference_to::<PortAssignment>(&c.object.namespace, &c.object.name, None);
    let proto = c.protocol.as_str();
    let on_object = format!(
        "pod {} declares host port {}/{proto}, which key {} of this object holds on node {}; the key keeps its port: traffic to that port may reach the pod instead",
        c.pod,
        c.port,
        c.key,
        ctx.node_name()
    );
    let on_pod = format!(
        "host port {}/{proto} of this pod is held by key {} of PortAssignment {} on node {} (portassign keeps it with the key)",
        c.port,
        c.key,
        c.object,
        ctx.node_name()
    );
    warn!(pod = %c.pod, object = %c.object, key = %c.key, port = c.port, "a pod declares a port a key holds");
    publish(ctx, object_ref.clone(), Some(pod_ref.clone()), on_object);
    publish(ctx, pod_ref, Some(object_ref), on_pod);
}

fn publish(
    ctx: &Context,
    regarding: k8s_openapi::api::core::v1::ObjectReference,
    related: Option<k8s_openapi::api::core::v1::ObjectReference>,
    note: String,
) {
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
        let mut state = ctx.state();
        if state.node_ports().reserved_text() == text.trim() {
            return;
        }
        match state.set_reserved(&text) {
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
    let wake = if freed { ctx.state().take_waiting() } else { Vec::new() };
    ctx.update_gauges();
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
