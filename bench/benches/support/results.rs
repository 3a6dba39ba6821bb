//! What the benchmark binaries measure, as the JSON that `report` reads (and, for the
//! busy-node table, the Markdown `allocator --node-ports` prints too).
//!
//! Raw measurements only (times, counts); every ratio is computed in one place, the
//! report, so the Markdown and the target checks cannot disagree.
#![allow(dead_code)]

use std::{collections::BTreeMap, path::Path};

use serde::{Deserialize, Serialize};

/// Output of `benches/allocator.rs`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Allocator {
    /// Range the project's table allocated from.
    pub range: String,
    /// Whether the probe also binds the IPv6 wildcard address on this host.
    pub probe_ipv6: bool,
    /// What single socket operations cost here (nanoseconds per call, median of
    /// batches): what the probe is made of, and what cheaper probes would cost.
    pub syscalls_ns: Vec<(String, f64)>,
    /// One entry per number of assignments.
    pub sizes: Vec<AllocatorSize>,
}

/// Assigning `n` ports from an empty table, repeated.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct AllocatorSize {
    /// Keys assigned per run.
    pub n: usize,
    /// Wall time of each project run (seconds).
    pub project_runs_s: Vec<f64>,
    /// Probe-syscall floor: wall time of `n` bare `SocketProbe::is_free` calls on the
    /// same free ports, run next to each project run (seconds).
    pub floor_runs_s: Vec<f64>,
    /// Wall time of each seed-baseline run (seconds).
    pub seed_runs_s: Vec<f64>,
    /// Wall time of the last tenth of the assignments of each project run (seconds):
    /// the marginal cost once the table is nearly full.
    pub project_tail_s: Vec<f64>,
    /// The same for the seed baseline.
    pub seed_tail_s: Vec<f64>,
    /// Keys the project no longer holds a port for at the end of each run.
    pub project_lost: Vec<usize>,
    /// Keys the seed baseline silently lost (their port went to a later key), per run.
    pub seed_lost: Vec<usize>,
    /// Size of the seed's JSON file after the last assignment (bytes).
    pub seed_file_bytes: u64,
    /// Wall time of each project run on a busy node (seconds): the same assignments with
    /// the node's pods' ports, the kernel's reservations and excluded ports looked up
    /// before each probe, as the agent does. Empty in results made before they existed.
    #[serde(default)]
    pub busy_runs_s: Vec<f64>,
}

/// The section on what the node's pods and reservations add per port, in Markdown, for
/// the sizes that measured it (empty when none did). Shared by the report and by
/// `allocator --node-ports`, so both print the same table.
pub fn busy_node_section(sizes: &[AllocatorSize]) -> String {
    use std::fmt::Write as _;
    let mut md = String::new();
    let measured: Vec<&AllocatorSize> = sizes.iter().filter(|s| !s.busy_runs_s.is_empty()).collect();
    if measured.is_empty() {
        return md;
    }
    let _ = writeln!(md, "\n### Allocator with pods and reservations\n");
    let _ = writeln!(
        md,
        "The same runs on a busy node: 130 pods of the node declaring 470 TCP ports (110 with two hostPorts, 20 \
         hostNetwork pods with five ports), 4,000 ports reserved by the kernel, 1,000 excluded by flag, the NodePort \
         range left out. Those ports lie above the ones the runs reach, so both sides probe the same ports and the \
         difference is what the lookups (`NodePorts::taken`: a bit test and a hash lookup; the pool: a sorted list \
         and a bitset) cost. Median of whole runs, each busy run interleaved with a run of today's and with the probe floor.\n"
    );
    let _ = writeln!(
        md,
        "| n | today µs/port | busy node µs/port | busy ÷ today | probe floor µs/port | busy ÷ floor | runs |"
    );
    let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|");
    for s in measured {
        let n = s.n as f64;
        let today = median(&s.project_runs_s) / n * 1e6;
        let busy = median(&s.busy_runs_s) / n * 1e6;
        let floor = median(&s.floor_runs_s) / n * 1e6;
        let _ = writeln!(
            md,
            "| {} | {today:.2} | {busy:.2} | **{:.2}×** | {floor:.2} | {:.2}× | {} |",
            s.n,
            busy / today,
            busy / floor,
            s.busy_runs_s.len()
        );
    }
    md
}

/// Output of `benches/cluster.rs`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Cluster {
    /// Reconciles (agent) or objects (floor) in flight at once.
    pub concurrency: u16,
    /// Keys per object.
    pub keys_per_object: usize,
    /// Creates the bench keeps in flight while it makes the objects.
    pub create_concurrency: usize,
    /// One entry per system and size.
    pub convergence: Vec<Convergence>,
    /// Agent restart with a full node.
    pub restart: Restart,
}

/// Which client converges the objects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum System {
    /// The real `portassign agent` binary.
    Agent,
    /// The bench's minimal client: only the writes that cannot be avoided.
    Floor,
}

impl System {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            System::Agent => "agent",
            System::Floor => "floor",
        }
    }
}

/// One create-then-delete run of `objects` objects.
#[derive(Debug, Serialize, Deserialize)]
pub struct Convergence {
    /// Agent or floor.
    pub system: System,
    /// Objects created.
    pub objects: usize,
    /// First create sent → the bench's watch has seen every object Ready (seconds).
    pub create_s: f64,
    /// First create sent → last create answered (seconds).
    pub creates_answered_s: f64,
    /// Delete-collection sent → the bench's watch has seen every object gone (seconds).
    pub delete_s: f64,
    /// Whether every object became Ready and then went away within the time limit.
    pub completed: bool,
    /// Per-object create→Ready latency percentiles (milliseconds): create request sent
    /// to the bench's watch event showing Ready=True with a port for every key.
    pub latency_ms: Percentiles,
    /// API requests on PortAssignments and Events during the create phase, by
    /// "VERB resource[/subresource]" (and " code" when not 2xx), all clients.
    pub create_requests: BTreeMap<String, u64>,
    /// The same for the delete phase.
    pub delete_requests: BTreeMap<String, u64>,
    /// CPU seconds used during the create phase.
    pub create_cpu: Cpu,
    /// CPU seconds used during the delete phase.
    pub delete_cpu: Cpu,
    /// The agent's `portassign_reconciles_total` at the end of the run (agent only).
    pub reconciles: Option<u64>,
}

/// Percentiles of a latency distribution, in milliseconds.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

/// CPU seconds (user + system) of the processes involved in a phase.
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize)]
pub struct Cpu {
    /// The agent or the floor process.
    pub system: f64,
    /// kube-apiserver.
    pub apiserver: f64,
    /// etcd.
    pub etcd: f64,
    /// The bench driver (creates, deletes, its own watch).
    pub driver: f64,
    /// Every process on the machine together (from `/proc/stat`), so that CPU taken by
    /// other work on the shared machine shows.
    #[serde(default)]
    pub machine: f64,
    /// Wall time of the phase, to read the CPU figures against.
    pub wall: f64,
}

/// Restarting the agent on a node whose statuses hold `ports` ports.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Restart {
    /// Objects on the node.
    pub objects: usize,
    /// Ports recorded in their statuses.
    pub ports: usize,
    /// One entry per agent start.
    pub runs: Vec<RestartRun>,
    /// Floor: a fresh client listing the node's objects page by page, as the rebuild
    /// does (seconds per run).
    pub list_floor_s: Vec<f64>,
    /// The same agent started for a node with no objects: spawn → ready (seconds).
    pub empty_ready_s: f64,
    /// Its VmHWM half a second after ready (KiB): the agent's fixed cost.
    pub empty_hwm_kib: u64,
}

/// One agent start.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct RestartRun {
    /// Process spawned → first `/readyz` 200 (seconds).
    pub ready_s: f64,
    /// Ports the agent's table holds at ready (`portassign_ports_assigned`).
    pub ports_at_ready: u64,
    /// VmHWM right after ready (KiB).
    pub hwm_at_ready_kib: u64,
    /// VmHWM once the agent has reconciled every object after the start (KiB).
    pub hwm_settled_kib: u64,
    /// VmRSS at the same moment (KiB).
    pub rss_settled_kib: u64,
    /// Ready → every object reconciled once (seconds).
    pub settle_s: f64,
    /// Writes (PATCH/APPLY/POST/PUT) on PortAssignments and Events from ready to settled.
    pub writes_after_ready: u64,
}

/// Everything one `scale` run measured.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Scale {
    /// Objects in every scale run, spread evenly over the agents' nodes.
    pub objects: usize,
    /// Keys per object.
    pub keys: usize,
    /// One run per number of agents.
    pub runs: Vec<ScaleRun>,
    /// The API server restarted under the most agents.
    pub storm: Option<Storm>,
    /// Agents whose status writes are all refused.
    pub failure: Vec<FailureRun>,
    /// The machine's load average (1, 5, 15 min) at the start and at the end.
    pub load_before: String,
    /// See `load_before`.
    pub load_after: String,
}

/// `agents` real agent processes, each its own node, converging `objects` together.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct ScaleRun {
    /// Agents (and nodes).
    pub agents: usize,
    /// Objects in all.
    pub objects: usize,
    /// Spawning every agent → every `/readyz` 200.
    pub start_s: f64,
    /// First create sent → the bench's watch saw every object Ready.
    pub create_s: f64,
    /// Delete-collection sent → the watch saw every object gone.
    pub delete_s: f64,
    /// Whether both phases completed within the time limit.
    pub completed: bool,
    /// kube-apiserver CPU seconds over the create phase.
    pub apiserver_cpu_create_s: f64,
    /// kube-apiserver CPU seconds over the delete phase.
    pub apiserver_cpu_delete_s: f64,
    /// etcd CPU seconds over both phases (none when a relist storm restarted etcd
    /// in between).
    pub etcd_cpu_s: Option<f64>,
    /// CPU seconds of all the agents over both phases.
    pub agents_cpu_s: f64,
    /// kube-apiserver CPU per second with every agent connected and nothing to do,
    /// over a few seconds before the creates.
    pub apiserver_idle_cores: f64,
    /// Peak RSS of kube-apiserver over the run.
    pub apiserver_rss_mib: f64,
}

/// The API server (and etcd) killed and restarted while agents watch their nodes.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Storm {
    /// Agents connected.
    pub agents: usize,
    /// Objects on their nodes (all Ready before the restart).
    pub objects: usize,
    /// Kill → the restarted API server answers `/readyz` (what `hack/control-plane.sh
    /// restart` waits for).
    pub api_back_s: f64,
    /// Kill → a new object created on every node after the API server is back is Ready:
    /// every agent has its watch back and serves its node again.
    pub all_serving_s: f64,
    /// Kill → the last of those objects created (the API server answered every create).
    #[serde(default)]
    pub probes_created_s: f64,
    /// Peak kube-apiserver CPU (cores, over 250 ms samples) in the 30 s after the restart.
    pub peak_cores: f64,
    /// kube-apiserver CPU seconds over those 30 s.
    pub cpu_30s: f64,
    /// Peak kube-apiserver RSS over those 30 s.
    pub peak_rss_mib: f64,
    /// kube-apiserver RSS just before the kill.
    pub rss_before_mib: f64,
    /// kube-apiserver's flow control over a quiet window just before the kill (the same
    /// agents connected): what a steady state looks like.
    #[serde(default)]
    pub flow_before: Option<FlowWindow>,
    /// The same over the 30 s after the restart (its counters start again with the
    /// process, so they count the whole storm).
    #[serde(default)]
    pub flow_storm: Option<FlowWindow>,
    /// `portassign check` over every agent afterwards: its exit code and last line.
    pub check_exit: i32,
    /// See `check_exit`.
    pub check_summary: String,
}

/// kube-apiserver's flow control over a window, from its `/metrics` sampled every 250 ms.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct FlowWindow {
    /// The window's length.
    pub seconds: f64,
    /// Samples read (a sample fails while the API server is down).
    pub samples: usize,
    /// Requests answered 429 Too Many Requests (`apiserver_request_total{code="429"}`).
    pub answered_429: f64,
    /// The same by "VERB resource".
    #[serde(default)]
    pub answered_429_by: std::collections::BTreeMap<String, f64>,
    /// Requests API Priority and Fairness rejected
    /// (`apiserver_flowcontrol_rejected_requests_total`).
    pub rejected: f64,
    /// The most requests waiting in its queues at once
    /// (`apiserver_flowcontrol_current_inqueue_requests`, all priority levels).
    pub peak_in_queue: f64,
    /// The most requests executing at once outside the exempt priority level
    /// (`apiserver_flowcontrol_current_executing_requests`).
    pub peak_executing: f64,
}

/// One agent whose status writes are all refused (RBAC), at the default retry cap.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct FailureRun {
    /// Failing objects on its node.
    pub objects: usize,
    /// The agent's retry cap (`--max-retry-delay`).
    pub cap_s: f64,
    /// (seconds since the creates, refused writes counted by the agent so far).
    pub samples: Vec<(f64, f64)>,
    /// Grant back → every object Ready.
    pub recovery_s: f64,
}

impl FailureRun {
    /// Refused writes per second between `from` and `to` seconds (nearest samples).
    pub fn rate(&self, from: f64, to: f64) -> f64 {
        let at = |t: f64| {
            self.samples.iter().min_by(|a, b| (a.0 - t).abs().total_cmp(&(b.0 - t).abs())).copied().unwrap_or_default()
        };
        let (a, b) = (at(from), at(to));
        if b.0 > a.0 { (b.1 - a.1) / (b.0 - a.0) } else { 0.0 }
    }

    /// The last sample's time.
    pub fn end(&self) -> f64 {
        self.samples.last().map(|s| s.0).unwrap_or_default()
    }
}

/// The fixed retry every failed reconcile had before per-object backoff.
pub const OLD_FIXED_RETRY_S: f64 = 2.0;

/// Output of `benches/acquire.rs`: latencies of each way of getting a port (ms).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Acquire {
    /// Samples of each.
    pub samples: usize,
    /// `PortClient::acquire` against the agent.
    pub acquire: Vec<f64>,
    /// One apply adding a key, then the watch until its port shows, against the agent.
    pub plain: Vec<f64>,
    /// The same against the minimal responder.
    pub floor: Vec<f64>,
}

/// Reads a JSON results file.
/// Everything one `fanout` run measured.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Fanout {
    /// Writes per second to the object of node 0.
    pub rate: u32,
    /// Seconds of writes (and of idle before them) in each run.
    pub seconds: u64,
    /// One run per number of watches and way of watching.
    pub runs: Vec<FanoutRun>,
}

/// `watchers` open watches of one kind while one object is written at a fixed rate.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct FanoutRun {
    /// `field` (cluster-wide, the agents' `spec.nodeName` selector) or `namespace` (one
    /// namespace each, no selector).
    pub scheme: String,
    /// Open watches.
    pub watchers: usize,
    /// Writes sent.
    pub writes: u64,
    /// Of those, the events node 0's watch received.
    pub events: u64,
    /// Opening every watch.
    pub open_s: f64,
    /// kube-apiserver's CPU (cores) with the watches open and no write.
    pub idle_cores: f64,
    /// kube-apiserver's CPU per write, less the idle rate: the median of the windows'.
    pub cpu_per_write_ms: f64,
    /// Each window's CPU per write (the writes costed in consecutive windows).
    pub cpu_per_write_windows_ms: Vec<f64>,
    /// Patch sent → its event received by node 0's watch.
    pub latency_p50_ms: f64,
    /// See `latency_p50_ms`.
    pub latency_p99_ms: f64,
}

pub fn read<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("parsing {}: {e}", path.display()))
}

/// Writes a JSON results file.
pub fn write<T: Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, serde_json::to_string_pretty(value)?)?;
    Ok(())
}

/// Median of a sample: the middle value, or the mean of the two middle values (0 for an
/// empty sample).
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// The `q` quantile (0..=1) of a sample by nearest rank (0 for an empty one).
pub fn percentile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}
