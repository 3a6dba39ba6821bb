//! The reconcile loop: joins the port table, the probe and the Kubernetes API.
//!
//! Ordering is what keeps ports from being lost or leaked across crashes and failed
//! writes: a new port is held in memory *before* the status naming it is written, and
//! a removed key's port is released from memory only *after* the status without it is
//! durable. Memory is therefore always a superset of every status, and the statuses
//! alone are enough to rebuild the table after a crash.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Resource, ResourceExt,
    api::{Patch, PatchParams},
    core::DeserializeGuard,
    runtime::{
        controller::Action,
        events::EventType,
        finalizer::{self, Event as Finalizer},
    },
};
use portassign_api::{
    CONDITION_READY, FINALIZER, PortAssignment, PortAssignmentStatus, PortEntry, event_reason, finalizer_removal_patch,
    reason,
};
use serde_json::json;
use tracing::{debug, info, warn};

use super::{
    backoff::Failure,
    context::{Context, reference_to, truncate},
    runner::Next,
    table::{ObjectId, Reservation, Shortage, Source},
};

/// Field manager of every write the agent makes.
pub const FIELD_MANAGER: &str = "portassign-agent";

/// How long an object short of ports waits before it retries on its own (it is also
/// woken at once when a port on the node is released).
const SHORTAGE_RETRY: Duration = Duration::from_secs(20);
/// Transient failures in a row after which the object's Ready condition (or an event)
/// says why it waits; a refusal says so at its first failure.
const TELL_TRANSIENT_AFTER: u32 = 5;

/// A reconcile that failed; retried after a short delay.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The status write was refused or did not reach the API server.
    #[error("writing the status of {object}: {source}")]
    WriteStatus {
        /// The object.
        object: ObjectId,
        /// What the API said.
        #[source]
        source: kube::Error,
    },
    /// Adding or removing the finalizer failed.
    #[error("finalizer of {object}: {source}")]
    Finalizer {
        /// The object.
        object: ObjectId,
        /// What failed.
        #[source]
        source: Box<finalizer::Error<Error>>,
    },
}

impl Error {
    /// The object whose reconcile failed.
    pub fn object(&self) -> &ObjectId {
        match self {
            Error::WriteStatus { object, .. } | Error::Finalizer { object, .. } => object,
        }
    }

    /// The API client error behind the failure, if one is.
    fn api_error(&self) -> Option<&kube::Error> {
        match self {
            Error::WriteStatus { source, .. } => Some(source),
            Error::Finalizer { source, .. } => match source.as_ref() {
                finalizer::Error::AddFinalizer(e) | finalizer::Error::RemoveFinalizer(e) => Some(e),
                finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e.api_error(),
                _ => None,
            },
        }
    }

    /// How the failure is retried, the HTTP code (0 without a response) and what the
    /// API server said (or why no answer came).
    pub fn failure(&self) -> (Failure, u16, String) {
        match self.api_error() {
            Some(kube::Error::Api(status)) => (Failure::of_code(status.code), status.code, status.message.clone()),
            Some(other) => (Failure::of(other), 0, other.to_string()),
            None => (Failure::Refused, 0, self.to_string()),
        }
    }

    /// Short static label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Error::WriteStatus { .. } => "write_status",
            Error::Finalizer { .. } => "finalizer",
        }
    }
}

/// Reconciles one object: the single entry point of its lifecycle.
pub async fn reconcile(guarded: Arc<DeserializeGuard<PortAssignment>>, ctx: Arc<Context>) -> Result<Next, Error> {
    let _timer = ctx.metrics().reconcile_timer();
    let object = match &guarded.0 {
        Ok(object) => object,
        Err(invalid) => return reconcile_invalid(invalid, &ctx).await,
    };
    if object.spec.node_name != ctx.node_name() {
        // The field selector keeps other nodes' objects out; this guards a misconfigured watch.
        return Ok(Next::AwaitChange);
    }
    let id = object.id();
    let api: Api<PortAssignment> = Api::namespaced(ctx.client().clone(), &id.namespace);
    // The finalizer helper patches the object when it adds the finalizer (not being
    // deleted, finalizer missing) or removes it (being deleted, finalizer present).
    let has_finalizer = object.finalizers().iter().any(|f| f == FINALIZER);
    if object.metadata.deletion_timestamp.is_some() == has_finalizer {
        ctx.write_token().await;
    }
    // The helper speaks kube's `Action`, whose delay cannot be read back: what the
    // reconcile asks for next is kept beside it (the helper's own answer, after adding
    // the finalizer, is to wait for the change that write makes).
    let next = std::sync::Mutex::new(Next::AwaitChange);
    let result = finalizer::finalizer(&api, FINALIZER, Arc::new(object.clone()), |event| async {
        let asked = match event {
            Finalizer::Apply(object) => apply(&object, &ctx).await?,
            Finalizer::Cleanup(object) => cleanup(&object, &ctx)?,
        };
        *next.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = asked;
        Ok(Action::await_change())
    })
    .await;
    ctx.update_gauges();
    let result =
        result.map(|_| next.into_inner().unwrap_or_else(|poisoned| poisoned.into_inner())).map_err(
            |source| match source {
                finalizer::Error::ApplyFailed(error) | finalizer::Error::CleanupFailed(error) => error,
                source => Error::Finalizer { object: id.clone(), source: Box::new(source) },
            },
        );
    if result.is_ok() {
        ctx.end_backoff(&id, "reconcile succeeded");
    }
    result
}

/// Gives every key a port, records the result in the status, and only then releases
/// the ports of keys that left the spec.
async fn apply(object: &PortAssignment, ctx: &Context) -> Result<Next, Error> {
    let id = object.id();
    let protocol = object.spec.protocol;
    let keys = object.spec.keys.iter().map(String::as_str);
    // An object the agent keeps for a ResourceClaim draws from the claims' pool: the
    // scheduler counts those ports, so no key may take one, and no claim a key's.
    let source =
        if object.labels().contains_key(portassign_api::dra::CLAIM_LABEL) { Source::Claims } else { Source::Keys };
    let (reservation, pod_conflicts) = ctx.state().reserve_from(source, &id, protocol, keys, ctx.probe());
    ctx.metrics().allocated(reservation.added.len());

    let mut status = desired_status(object, &reservation);
    status.pod_conflicts = pod_conflicts;
    if object.status.as_ref() != Some(&status) {
        match write_status(object, &status, ctx).await {
            Ok(()) => {}
            // The object is gone (deleted while this reconcile ran on a cached copy): no
            // status records its ports any more, so nothing else will release them.
            Err(kube::Error::Api(response)) if response.code == 404 => {
                let released = ctx.release_object(&id);
                debug!(object = %id, released, "object vanished during reconcile: released its ports");
                return Ok(Next::AwaitChange);
            }
            Err(source) => return Err(Error::WriteStatus { object: id.clone(), source }),
        }
    }
    let released = ctx.state().commit(&id, &reservation.ports);
    ctx.released(&released);

    if !reservation.added.is_empty() {
        info!(object = %id, added = reservation.added.len(), "assigned ports");
        ctx.publish(
            object,
            EventType::Normal,
            event_reason::ASSIGNED,
            format!("assigned {}", describe(&reservation.added)),
        );
    }
    if !released.ports.is_empty() {
        info!(object = %id, released = released.ports.len(), "released ports of removed keys");
        ctx.publish(
            object,
            EventType::Normal,
            event_reason::RELEASED,
            format!("released {}", describe(&released.ports)),
        );
    }
    match reservation.shortage {
        None => Ok(Next::AwaitChange),
        Some(shortage) => {
            let (reason, message) = shortage_message(shortage, &reservation, ctx);
            warn!(object = %id, reason, "{message}");
            if object.ready_condition().map(|c| c.reason.as_str()) != Some(reason) {
                ctx.publish(object, EventType::Warning, reason, message);
            }
            Ok(Next::RequeueAfter(SHORTAGE_RETRY))
        }
    }
}

/// Releases every port of a deleted object. Its status is left as it is: an object
/// being deleted holds no ports, whatever its status says.
fn cleanup(object: &PortAssignment, ctx: &Context) -> Result<Next, Error> {
    let id = object.id();
    let released = ctx.release_object(&id);
    info!(object = %id, released, "object deleted: released its ports");
    Ok(Next::AwaitChange)
}

/// An object the agent cannot decode (for example written under an older schema): it is
/// skipped with a log line and an event; if it is being deleted its ports are released
/// and the finalizer removed so deletion is not blocked.
async fn reconcile_invalid(invalid: &kube::core::error_boundary::InvalidObject, ctx: &Context) -> Result<Next, Error> {
    let meta = &invalid.metadata;
    let id = ObjectId::new(meta.namespace.clone().unwrap_or_default(), meta.name.clone().unwrap_or_default());
    warn!(object = %id, error = %invalid.error, "skipping a PortAssignment that cannot be decoded");
    ctx.metrics().invalid_object();
    let reference = k8s_openapi::api::core::v1::ObjectReference {
        resource_version: meta.resource_version.clone(),
        ..reference_to::<PortAssignment>(&id.namespace, &id.name, meta.uid.clone())
    };
    let note = format!("this agent cannot read the object ({}); it assigns no ports to it", invalid.error);
    ctx.publish_on(reference, EventType::Warning, event_reason::INVALID_OBJECT, note);
    let has_finalizer = meta.finalizers.iter().flatten().any(|f| f == FINALIZER);
    if meta.deletion_timestamp.is_none() || !has_finalizer {
        return Ok(Next::AwaitChange);
    }
    ctx.release_object(&id);
    let api: Api<DeserializeGuard<PortAssignment>> = Api::namespaced(ctx.client().clone(), &id.namespace);
    let patch = finalizer_removal_patch(meta);
    ctx.write_token().await;
    api.patch(&id.name, &PatchParams::default(), &Patch::Merge(patch)).await.map_err(|source| Error::Finalizer {
        object: id,
        source: Box::new(finalizer::Error::RemoveFinalizer(source)),
    })?;
    Ok(Next::AwaitChange)
}

/// Schedules the retry of a failed reconcile after the object's backoff delay (see
/// [`super::backoff`]), logs each new backoff step (not each retry), and says why the
/// object waits where its owner looks: its Ready condition, or an event when the status
/// write itself is what fails.
pub fn error_policy(object: Arc<DeserializeGuard<PortAssignment>>, error: &Error, ctx: Arc<Context>) -> Duration {
    ctx.metrics().reconcile_error(error.label());
    let (kind, code, message) = error.failure();
    ctx.metrics().write_failure(kind.label(), code);
    let id = error.object().clone();
    let (retry, cap) = {
        let mut backoff = ctx.backoff();
        let retry = backoff.failed(&id, kind, &message, Instant::now(), fastrand::f64());
        ctx.metrics().set_in_backoff(backoff.len());
        (retry, backoff.policy().cap)
    };
    if retry.announce {
        warn!(object = %id, kind = kind.label(), code, failures = retry.failures, retry_in = ?retry.delay,
            capped = retry.capped, "{error}; retrying with backoff");
    } else {
        debug!(object = %id, failures = retry.failures, retry_in = ?retry.delay, "{error}; retrying");
    }
    let tell = match kind {
        Failure::Refused => retry.new_situation,
        Failure::Transient => retry.failures == TELL_TRANSIENT_AFTER,
    };
    if tell && let Ok(object) = &object.0 {
        let object = object.clone();
        let waiting = waiting_message(error, &message, cap);
        let status_refused = matches!(error, Error::WriteStatus { .. });
        tokio::spawn(async move { tell_waiting(&object, waiting, status_refused, &ctx).await });
    }
    retry.delay
}

/// What the object's owner reads about a failing write.
fn waiting_message(error: &Error, api_message: &str, cap: Duration) -> String {
    let what = match error {
        Error::WriteStatus { .. } => "recording the ports in the status",
        Error::Finalizer { .. } => "adding or removing the agent's finalizer",
    };
    let said = if api_message.is_empty() { "no answer" } else { api_message };
    truncate(
        format!(
            "the agent's write failed ({what}): {said}; it retries with backoff, at least every {}s",
            cap.as_secs()
        ),
        1000,
    )
}

/// Says why `object` waits: in its Ready condition when the status can be written
/// (the failing write was another one), else (or when that write fails too) in a
/// Warning event. Called once per new failure (a first refusal, a different message,
/// or a transient failure that persists), so it adds at most one write per streak.
async fn tell_waiting(object: &PortAssignment, message: String, status_refused: bool, ctx: &Context) {
    let id = object.id();
    if !status_refused {
        let previous = object.ready_condition();
        if previous.is_some_and(|c| c.reason == reason::WRITE_FAILED && c.message == message) {
            return;
        }
        let condition = Condition {
            type_: CONDITION_READY.into(),
            status: "False".into(),
            reason: reason::WRITE_FAILED.into(),
            message: message.clone(),
            observed_generation: object.metadata.generation,
            last_transition_time: match previous {
                Some(c) if c.status == "False" => c.last_transition_time.clone(),
                _ => Time(Timestamp::now()),
            },
        };
        let api: Api<PortAssignment> = Api::namespaced(ctx.client().clone(), &id.namespace);
        let patch = json!({ "status": { "conditions": [condition] } });
        ctx.write_token().await;
        match api.patch_status(&id.name, &PatchParams::default(), &Patch::Merge(patch)).await {
            Ok(_) => return,
            Err(error) => {
                debug!(object = %id, %error, "could not write the Ready condition either; recording an event")
            }
        }
    }
    ctx.publish(object, EventType::Warning, event_reason::WRITE_FAILED, message);
}

/// The status that records `reservation`, keeping condition transition times stable.
fn desired_status(object: &PortAssignment, reservation: &Reservation) -> PortAssignmentStatus {
    let (status, reason_, message) = match reservation.shortage {
        None => ("True", reason::ALLOCATED, format!("all {} keys have a port", reservation.ports.len())),
        Some(Shortage::RangeExhausted) => (
            "False",
            reason::RANGE_EXHAUSTED,
            format!(
                "{} keys wait for a port: every port of the node's range is assigned",
                reservation.unassigned.len()
            ),
        ),
        Some(Shortage::PortConflict) => (
            "False",
            reason::PORT_CONFLICT,
            format!(
                "{} keys wait for a port: the range's unassigned ports are all in use by other programs on the node, declared by its pods or reserved by its kernel",
                reservation.unassigned.len()
            ),
        ),
    };
    let generation = object.metadata.generation;
    let previous = object.ready_condition();
    let last_transition_time = match previous {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => Time(Timestamp::now()),
    };
    PortAssignmentStatus {
        observed_generation: generation,
        key_count: count(object.spec.keys.len()),
        assigned_count: count(reservation.ports.len()),
        ports: reservation.ports.iter().map(|(key, port)| PortEntry { key: key.clone(), port: *port }).collect(),
        conditions: vec![Condition {
            type_: CONDITION_READY.into(),
            status: status.into(),
            reason: reason_.into(),
            message,
            observed_generation: generation,
            last_transition_time,
        }],
        pod_conflicts: Vec::new(),
    }
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Writes the status with server-side apply. Entries of keys the agent no longer wants
/// but that another field manager owns (a status edited by hand) survive an apply, so
/// then the list is replaced outright with a merge patch.
async fn write_status(
    object: &PortAssignment,
    status: &PortAssignmentStatus,
    ctx: &Context,
) -> Result<(), kube::Error> {
    let api: Api<PortAssignment> = Api::namespaced(ctx.client().clone(), object.namespace_or_default());
    let name = object.name_any();
    ctx.write_token().await;
    let apply = json!({
        "apiVersion": PortAssignment::api_version(&()),
        "kind": PortAssignment::kind(&()),
        "status": status,
    });
    let written = api.patch_status(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(apply)).await?;
    let stored_ports = written.status.map(|s| s.ports).unwrap_or_default();
    if stored_ports != status.ports {
        debug!(object = %name, "status holds entries of another field manager; replacing the list");
        let merge = json!({ "status": { "ports": status.ports } });
        ctx.write_token().await;
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(merge)).await?;
    }
    Ok(())
}

fn shortage_message(shortage: Shortage, reservation: &Reservation, ctx: &Context) -> (&'static str, String) {
    let range = ctx.state().table().pool().clone();
    let keys = reservation.unassigned.len();
    match shortage {
        Shortage::RangeExhausted => (
            reason::RANGE_EXHAUSTED,
            format!(
                "{keys} keys have no port: all {} ports of range {range} are assigned on this node; they complete when ports are released or the range is widened",
                range.len()
            ),
        ),
        Shortage::PortConflict => (
            reason::PORT_CONFLICT,
            format!(
                "{keys} keys have no port: every unassigned port of range {range} is in use by another program, declared by a pod or reserved by the kernel on this node"
            ),
        ),
    }
}

/// The note of an `Assigned` or `Released` event: how many ports, then `key=port` in key order.
pub fn describe(ports: &[(String, u16)]) -> String {
    let mut sorted: BTreeMap<&str, u16> = BTreeMap::new();
    for (key, port) in ports {
        sorted.insert(key, *port);
    }
    let list: Vec<String> = sorted.iter().map(|(k, p)| format!("{k}={p}")).collect();
    format!("{} port(s): {}", ports.len(), list.join(", "))
}
