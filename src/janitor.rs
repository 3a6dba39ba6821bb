//! The cluster-wide janitor: releases PortAssignments whose node no longer exists.
//!
//! Without it, an object of a deleted node would hang in Terminating forever (no agent
//! removes its finalizer) and its status would keep listing ports nobody holds. One
//! janitor acts at a time per cluster (a coordination Lease); it waits for a node to be
//! missing for a grace period before it acts, so a node that is re-registering is left
//! alone.

use std::{
    collections::{BTreeSet, HashMap},
    time::Duration,
};

use k8s_openapi::{
    api::{
        coordination::v1::{Lease, LeaseSpec},
        core::v1::Node,
    },
    apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, Time},
    jiff::{SignedDuration, Timestamp},
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ListParams, Patch, PatchParams, PostParams},
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use portassign_api::{CONDITION_READY, FINALIZER, PortAssignment, event_reason, finalizer_removal_patch, reason};

/// Field manager of the janitor's writes.
pub const FIELD_MANAGER: &str = "portassign-janitor";
/// Name of the Lease that elects the acting janitor.
pub const LEASE_NAME: &str = "portassign-janitor";

/// Settings of the janitor.
#[derive(Clone, Debug)]
pub struct Config {
    /// How long a node must be missing before its objects are released.
    pub grace: Duration,
    /// How often the janitor looks.
    pub interval: Duration,
    /// Namespace of the Lease.
    pub lease_namespace: String,
    /// This janitor's identity in the Lease (the pod name in a cluster).
    pub identity: String,
    /// How long a Lease holder keeps it without renewing.
    pub lease_duration: Duration,
}

/// What one sweep did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Objects being deleted whose finalizer was removed.
    pub finalized: Vec<String>,
    /// Objects whose status ports were released.
    pub released: Vec<String>,
    /// Missing nodes still within their grace period.
    pub waiting: Vec<String>,
}

/// Remembers since when each node has been missing.
#[derive(Debug, Default)]
pub struct Missing {
    since: HashMap<String, Timestamp>,
}

/// Looks once: releases objects of nodes missing for longer than `grace`.
pub async fn sweep(
    client: &Client,
    recorder: &Recorder,
    missing: &mut Missing,
    grace: Duration,
) -> Result<Sweep, kube::Error> {
    let nodes: BTreeSet<String> = Api::<Node>::all(client.clone())
        .list_metadata(&ListParams::default())
        .await?
        .items
        .iter()
        .map(|n| n.name_any())
        .collect();
    let objects = Api::<PortAssignment>::all(client.clone()).list(&ListParams::default()).await?.items;
    let now = Timestamp::now();
    let mut report = Sweep::default();
    missing.since.retain(|node, _| !nodes.contains(node));
    let grace = SignedDuration::try_from(grace).unwrap_or(SignedDuration::MAX);
    for object in &objects {
        let node = &object.spec.node_name;
        if nodes.contains(node) {
            continue;
        }
        let since = *missing.since.entry(node.clone()).or_insert(now);
        if now.duration_since(since) < grace {
            if !report.waiting.contains(node) {
                report.waiting.push(node.clone());
            }
            continue;
        }
        let id = object.id().to_string();
        let api: Api<PortAssignment> = Api::namespaced(client.clone(), object.namespace_or_default());
        if object.metadata.deletion_timestamp.is_some() {
            if object.finalizers().iter().any(|f| f == FINALIZER) {
                let patch = finalizer_removal_patch(&object.metadata);
                api.patch(&object.name_any(), &PatchParams::default(), &Patch::Merge(patch)).await?;
                info!(object = %id, %node, "node is gone: removed the finalizer of a deleted object");
                report.finalized.push(id);
            }
            continue;
        }
        let already = object.status.as_ref().is_some_and(|s| {
            s.ports.is_empty() && s.ready_condition().is_some_and(|c| c.reason == reason::NODE_NOT_FOUND)
        });
        if already {
            continue;
        }
        let message = format!(
            "node {node} does not exist: the object's ports were released; it is served again if the node returns"
        );
        let condition = Condition {
            type_: CONDITION_READY.into(),
            status: "False".into(),
            reason: reason::NODE_NOT_FOUND.into(),
            message: message.clone(),
            observed_generation: object.metadata.generation,
            last_transition_time: Time(now),
        };
        let patch = json!({ "status": {
            "ports": [], "assignedCount": 0, "conditions": [condition],
            "observedGeneration": object.metadata.generation,
        }});
        api.patch_status(&object.name_any(), &PatchParams::default(), &Patch::Merge(patch)).await?;
        warn!(object = %id, %node, "node is gone: released the object's ports");
        let event = Event {
            type_: EventType::Warning,
            reason: event_reason::NODE_NOT_FOUND.into(),
            note: Some(message),
            action: "Release".into(),
            secondary: None,
        };
        if let Err(error) = recorder.publish(&event, &object.object_ref(&())).await {
            warn!(%error, "could not publish event");
        }
        report.released.push(id);
    }
    Ok(report)
}

/// Takes or renews the Lease; true when this janitor holds it.
async fn hold_lease(api: &Api<Lease>, config: &Config) -> Result<bool, kube::Error> {
    let now = Timestamp::now();
    let seconds = i32::try_from(config.lease_duration.as_secs()).unwrap_or(i32::MAX);
    let mut lease = match api.get_opt(LEASE_NAME).await? {
        Some(lease) => lease,
        None => {
            let mut lease = Lease::default();
            lease.metadata.name = Some(LEASE_NAME.into());
            lease.spec = Some(LeaseSpec {
                holder_identity: Some(config.identity.clone()),
                lease_duration_seconds: Some(seconds),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                ..Default::default()
            });
            return match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
                Err(error) => Err(error),
            };
        }
    };
    let spec = lease.spec.get_or_insert_with(Default::default);
    let mine = spec.holder_identity.as_deref() == Some(config.identity.as_str());
    let expired = match (&spec.renew_time, spec.lease_duration_seconds) {
        (Some(renewed), Some(duration)) => now.duration_since(renewed.0) > SignedDuration::from_secs(duration.into()),
        _ => true,
    };
    if !mine && !expired {
        return Ok(false);
    }
    if !mine {
        spec.holder_identity = Some(config.identity.clone());
        spec.acquire_time = Some(MicroTime(now));
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.renew_time = Some(MicroTime(now));
    spec.lease_duration_seconds = Some(seconds);
    // The resourceVersion in `lease` makes this a compare-and-swap: two janitors cannot both win.
    match api.replace(LEASE_NAME, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(error) => Err(error),
    }
}

/// Runs the janitor until `shutdown` is cancelled: sweeps while it holds the Lease.
pub async fn run(client: Client, config: Config, shutdown: CancellationToken) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), &config.lease_namespace);
    let reporter = Reporter { controller: "portassign-janitor".into(), instance: Some(config.identity.clone()) };
    let recorder = Recorder::new(client.clone(), reporter);
    let mut missing = Missing::default();
    let mut leading = false;
    info!(grace = ?config.grace, identity = %config.identity, "janitor starting");
    loop {
        match hold_lease(&leases, &config).await {
            Ok(now_leading) => {
                if now_leading != leading {
                    info!(leading = now_leading, "janitor lease");
                    // A new leader starts its grace periods afresh.
                    missing = Missing::default();
                }
                leading = now_leading;
            }
            Err(error) => {
                warn!(%error, "could not take or renew the janitor lease");
                leading = false;
            }
        }
        if leading {
            match sweep(&client, &recorder, &mut missing, config.grace).await {
                Ok(report) if report != Sweep::default() => info!(?report, "janitor sweep"),
                Ok(_) => {}
                Err(error) => warn!(%error, "janitor sweep failed; retrying"),
            }
        }
        let pause = config.interval.min(config.lease_duration / 3);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}
