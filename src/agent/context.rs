//! What the agent's tasks share: the node's state, the probe, the API client, the event
//! recorder, the metrics, the backoff tracker and the write bound. Built in one place
//! ([`Context::new`]); its fields are private, so every change of the node's state goes
//! through [`NodeState`]'s methods and every API write takes a token from the bound.

use std::sync::{Arc, Mutex, MutexGuard};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    Client, Resource,
    core::DeserializeGuard,
    runtime::{
        events::{Event, EventType, Recorder, Reporter},
        reflector::ObjectRef,
    },
};
use portassign_api::{ObjectId, PortAssignment, range::PortPool};
use tokio::sync::mpsc::UnboundedSender;
use tracing::{info, warn};

use super::{
    backoff::{Policy, Tracker},
    metrics::Metrics,
    probe::PortProbe,
    state::NodeState,
    table::Released,
    throttle::{Rate, Throttle},
};

/// The channel that asks the controller to reconcile an object again.
pub type Wake = UnboundedSender<ObjectRef<DeserializeGuard<PortAssignment>>>;

/// What the agent's tasks share across reconciles of one node.
pub struct Context {
    client: Client,
    node_name: String,
    state: Mutex<NodeState>,
    probe: Arc<dyn PortProbe>,
    recorder: Recorder,
    metrics: Metrics,
    wake: Wake,
    backoff: Mutex<Tracker>,
    throttle: Arc<Throttle>,
}

impl Context {
    /// The context of the agent of `node_name`, assigning from `pool`, with an empty
    /// state; events are signed by `reporter`, retries follow `retry`, writes are bound
    /// by `writes`, and `wake` reaches the controller.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: Client,
        node_name: String,
        pool: PortPool,
        probe: Arc<dyn PortProbe>,
        reporter: Reporter,
        retry: Policy,
        writes: Rate,
        wake: Wake,
    ) -> Self {
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            node_name,
            state: Mutex::new(NodeState::new(pool)),
            probe,
            metrics: Metrics::new(),
            wake,
            backoff: Mutex::new(Tracker::new(retry)),
            throttle: Arc::new(Throttle::new(writes)),
        }
    }

    /// Gives ResourceClaims their ports from `claims` (disjoint from the keys' pool).
    /// Called before the agent starts: it replaces the (empty) state.
    pub fn with_claims_pool(mut self, claims: PortPool) -> Self {
        let keys = self.state().table().pool().clone();
        self.state = Mutex::new(NodeState::with_pools(keys, Some(claims)));
        self
    }

    /// The API client (every write through it takes a [`Self::write_token`] first).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The node this agent assigns ports on.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// The probe that verifies a port is free on the node.
    pub fn probe(&self) -> &dyn PortProbe {
        &*self.probe
    }

    /// The agent's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Locks the node's state. A panic while holding the lock cannot leave it
    /// half-updated (each method finishes its bookkeeping before returning), so
    /// poisoning is ignored.
    pub fn state(&self) -> MutexGuard<'_, NodeState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Locks the backoff tracker (poisoning ignored, as for the state).
    pub fn backoff(&self) -> MutexGuard<'_, Tracker> {
        self.backoff.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits until the write-rate bound lets one more API write start, and counts it.
    pub async fn write_token(&self) {
        let waited = self.throttle.acquire().await;
        self.metrics.write(waited);
    }

    /// Ends `object`'s failure streak (it succeeded or is gone).
    pub fn end_backoff(&self, object: &ObjectId, why: &str) {
        let (ended, in_backoff) = {
            let mut backoff = self.backoff();
            (backoff.reset(object), backoff.len())
        };
        self.metrics.set_in_backoff(in_backoff);
        if let Some(streak) = ended {
            info!(object = %object, failures = streak.failures, after = ?streak.since.elapsed(), "{why}: backoff ended");
        }
    }

    /// Sets the gauges of the node's state.
    pub fn update_gauges(&self) {
        let gauges = self.state().gauges();
        self.metrics.set_state(&gauges);
    }

    /// Publishes an event about `object` without delaying the caller; a failure is only logged.
    pub fn publish(&self, object: &PortAssignment, type_: EventType, reason: &str, note: String) {
        self.publish_on(event_reference(object), type_, reason, note);
    }

    /// Publishes an event about the object `reference` points to.
    pub fn publish_on(&self, reference: ObjectReference, type_: EventType, reason: &str, note: String) {
        let event =
            Event { type_, reason: reason.into(), note: Some(note), action: "Reconcile".into(), secondary: None };
        self.publish_event(reference, event);
    }

    /// Publishes `event` about the object `reference` points to, in the background and
    /// within the write-rate bound like every other API write; a failure is only logged.
    pub fn publish_event(&self, reference: ObjectReference, mut event: Event) {
        let recorder = self.recorder.clone();
        let throttle = self.throttle.clone();
        let metrics = self.metrics.clone();
        event.note = event.note.map(|note| truncate(note, 1000));
        tokio::spawn(async move {
            metrics.write(throttle.acquire().await);
            if let Err(error) = recorder.publish(&event, &reference).await {
                warn!(%error, "could not publish event");
            }
        });
    }

    /// Releases every port `object` holds, counts them and wakes the objects waiting for
    /// a port; how many ports it held.
    pub fn release_object(&self, object: &ObjectId) -> usize {
        let released = self.state().release_object(object);
        self.end_backoff(object, "object gone");
        self.released(&released);
        released.ports.len()
    }

    /// Counts ports released and wakes the objects that were short of ports.
    pub fn released(&self, released: &Released) {
        self.metrics.released(released.ports.len());
        for id in &released.wake {
            self.wake_object(id);
        }
    }

    /// Asks the controller to reconcile `id` again.
    pub fn wake_object(&self, id: &ObjectId) {
        let _ = self.wake.send(ObjectRef::new(&id.name).within(&id.namespace));
    }
}

/// The object an event is about, at the version it was reconciled at. The recorder
/// merges events with the same reason and reference into one series that keeps the
/// first note, so without the version a second `Assigned` (a key added later) would
/// only bump the count of the first and its ports would appear in no event. With it,
/// each change of the object gets events of its own, and only a true repeat (the same
/// version reconciled again) is counted in a series.
pub fn event_reference(object: &PortAssignment) -> ObjectReference {
    ObjectReference { resource_version: object.metadata.resource_version.clone(), ..object.object_ref(&()) }
}

/// A reference to the object of kind `K` named `namespace/name` (for events about
/// objects the agent holds no copy of).
pub fn reference_to<K: Resource<DynamicType = ()>>(
    namespace: &str,
    name: &str,
    uid: Option<String>,
) -> ObjectReference {
    ObjectReference {
        api_version: Some(K::api_version(&()).into()),
        kind: Some(K::kind(&()).into()),
        namespace: Some(namespace.into()),
        name: Some(name.into()),
        uid,
        ..ObjectReference::default()
    }
}

/// Cuts `text` to at most `max` bytes (`max` >= 3) on a character boundary, ending in `...` when cut.
pub fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max - 3;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
    text
}
