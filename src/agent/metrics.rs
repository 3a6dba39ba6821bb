//! Prometheus metrics of the agent, served as text on `/metrics`.

use std::{
    sync::{Arc, atomic::AtomicU64},
    time::Instant,
};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use super::state::Gauges;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    error: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    kind: &'static str,
    code: String,
}

/// The agent's metrics; cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    ports_assigned: Gauge,
    ports_free: Gauge,
    objects: Gauge,
    reconciles: Counter,
    reconcile_errors: Family<ErrorLabels, Counter>,
    reconcile_duration: Histogram,
    allocations: Counter,
    releases: Counter,
    invalid_objects: Counter,
    standby: Gauge,
    writes: Counter,
    writes_throttled: Counter,
    write_throttle_wait: Counter<f64, AtomicU64>,
    write_failures: Family<FailureLabels, Counter>,
    objects_in_backoff: Gauge,
    pod_ports: Gauge,
    reserved_ports: Gauge,
    pod_conflicts: Gauge,
    pod_conflicts_found: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric under the `portassign_` prefix.
    pub fn new() -> Self {
        let ports_assigned = Gauge::default();
        let ports_free = Gauge::default();
        let objects = Gauge::default();
        let reconciles = Counter::default();
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        let reconcile_duration =
            Histogram::new([0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]);
        let allocations = Counter::default();
        let releases = Counter::default();
        let invalid_objects = Counter::default();
        let standby = Gauge::default();
        let writes = Counter::default();
        let writes_throttled = Counter::default();
        let write_throttle_wait = Counter::<f64, AtomicU64>::default();
        let write_failures = Family::<FailureLabels, Counter>::default();
        let objects_in_backoff = Gauge::default();
        let pod_ports = Gauge::default();
        let reserved_ports = Gauge::default();
        let pod_conflicts = Gauge::default();
        let pod_conflicts_found = Counter::default();
        let mut registry = Registry::with_prefix("portassign");
        registry.register("ports_assigned", "Ports held by keys on this node", ports_assigned.clone());
        registry.register("ports_free", "Ports of the range no key holds", ports_free.clone());
        registry.register("objects", "PortAssignments holding ports on this node", objects.clone());
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        registry.register("reconcile_errors", "Reconciles that failed, by error", reconcile_errors.clone());
        registry.register("reconcile_duration_seconds", "Time a reconcile takes", reconcile_duration.clone());
        registry.register("allocations", "Ports assigned to keys", allocations.clone());
        registry.register("releases", "Ports released", releases.clone());
        registry.register(
            "invalid_objects",
            "Reconciles of objects that could not be decoded",
            invalid_objects.clone(),
        );
        registry.register(
            "standby",
            "1 while another agent holds this node's lock and this one waits without allocating",
            standby.clone(),
        );
        registry.register("writes", "API writes started (status, finalizer, events)", writes.clone());
        registry.register(
            "writes_throttled",
            "API writes that waited for the write-rate limit (--write-rate, --write-burst)",
            writes_throttled.clone(),
        );
        registry.register(
            "write_throttle_wait_seconds",
            "Time API writes spent waiting for the write-rate limit",
            write_throttle_wait.clone(),
        );
        registry.register(
            "write_failures",
            "Failed reconciles by kind (transient: retried quickly; refused: backed off) and HTTP code (0: no response)",
            write_failures.clone(),
        );
        registry.register(
            "objects_in_backoff",
            "Objects whose last reconcile failed, waiting to be retried",
            objects_in_backoff.clone(),
        );
        registry.register(
            "pod_host_ports",
            "Ports that pods of this node declare (hostPort, hostNetwork)",
            pod_ports.clone(),
        );
        registry.register(
            "kernel_reserved_ports",
            "Ports the kernel reserves (net.ipv4.ip_local_reserved_ports)",
            reserved_ports.clone(),
        );
        registry.register(
            "pod_port_conflicts",
            "Ports a key holds that a pod of this node declares too",
            pod_conflicts.clone(),
        );
        registry.register(
            "pod_port_conflicts_detected",
            "Pods found declaring a port a key holds",
            pod_conflicts_found.clone(),
        );
        Metrics {
            registry: Arc::new(registry),
            ports_assigned,
            ports_free,
            objects,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            allocations,
            releases,
            invalid_objects,
            standby,
            writes,
            writes_throttled,
            write_throttle_wait,
            write_failures,
            objects_in_backoff,
            pod_ports,
            reserved_ports,
            pod_conflicts,
            pod_conflicts_found,
        }
    }

    /// Counts a reconcile and observes its duration when the returned guard drops.
    pub fn reconcile_timer(&self) -> ReconcileTimer {
        self.reconciles.inc();
        ReconcileTimer { start: Instant::now(), histogram: self.reconcile_duration.clone() }
    }

    /// Counts a failed reconcile.
    pub fn reconcile_error(&self, label: &'static str) {
        self.reconcile_errors.get_or_create(&ErrorLabels { error: label }).inc();
    }

    /// Counts `n` new assignments.
    pub fn allocated(&self, n: usize) {
        self.allocations.inc_by(n as u64);
    }

    /// Counts `n` released ports.
    pub fn released(&self, n: usize) {
        self.releases.inc_by(n as u64);
    }

    /// Counts an object that could not be decoded.
    pub fn invalid_object(&self) {
        self.invalid_objects.inc();
    }

    /// Marks the agent as waiting for another agent of its node to go (or not).
    pub fn set_standby(&self, waiting: bool) {
        self.standby.set(i64::from(waiting));
    }

    /// Whether the agent waits for another agent of its node to go.
    pub fn standby(&self) -> bool {
        self.standby.get() != 0
    }

    /// Counts an API write about to start, which waited `throttled` for the rate limit.
    pub fn write(&self, throttled: std::time::Duration) {
        self.writes.inc();
        if !throttled.is_zero() {
            self.writes_throttled.inc();
            self.write_throttle_wait.inc_by(throttled.as_secs_f64());
        }
    }

    /// Counts a failed reconcile by kind (`transient`, `refused`) and HTTP code (0: none).
    pub fn write_failure(&self, kind: &'static str, code: u16) {
        self.write_failures.get_or_create(&FailureLabels { kind, code: code.to_string() }).inc();
    }

    /// Sets the number of objects in backoff.
    pub fn set_in_backoff(&self, n: usize) {
        self.objects_in_backoff.set(n as i64);
    }

    /// Counts `n` newly found conflicts between pods and keys.
    pub fn pod_conflicts_found(&self, n: usize) {
        self.pod_conflicts_found.inc_by(n as u64);
    }

    /// Sets the gauges of the node's state: the table, pods' ports, reservations, conflicts.
    pub fn set_state(&self, gauges: &Gauges) {
        self.ports_assigned.set(gauges.held as i64);
        self.ports_free.set(gauges.free_in_range as i64);
        self.objects.set(gauges.objects as i64);
        self.pod_ports.set(gauges.pod_ports as i64);
        self.reserved_ports.set(gauges.reserved as i64);
        self.pod_conflicts.set(gauges.conflicts as i64);
    }

    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Observes a reconcile's duration when dropped.
pub struct ReconcileTimer {
    start: Instant,
    histogram: Histogram,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}
