//! What the benchmarks against a control plane share: their flags and `main`, the
//! objects they create and the watch that times them, the processes they measure and
//! what `/proc` and `/metrics` say about them.
#![allow(dead_code)]

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::Parser;
use futures::{StreamExt, stream};
use kube::{
    Api, Client, ResourceExt,
    api::PostParams,
    runtime::{WatchStreamExt, watcher},
};
use portassign::api::{PortAssignment, PortAssignmentSpec, Protocol};
use portassign_testkit::{AgentProcess, standin};
use tokio::sync::watch;

/// Creates the benches keep in flight.
pub const CREATE_CONCURRENCY: usize = 32;

/// The flags every benchmark against a control plane takes.
#[derive(clap::Args, Debug)]
pub struct Common {
    /// The control plane's admin kubeconfig.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: PathBuf,
    /// The control plane's directory (`hack/control-plane.sh`): its pid files give
    /// kube-apiserver's and etcd's CPU.
    #[arg(long)]
    pub cp_dir: Option<PathBuf>,
    /// Where the logs of the processes measured go.
    #[arg(long, default_value = "target/bench/logs")]
    pub logs: PathBuf,
    /// Where the results go (JSON); standard output without.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    pub bench: bool,
}

impl Common {
    /// The pid of the control plane's process `name` (`kube-apiserver`, `etcd`), read
    /// again each time (a restarted process has a new one).
    pub fn pid(&self, name: &str) -> Option<u32> {
        std::fs::read_to_string(self.cp_dir.as_ref()?.join(format!("{name}.pid"))).ok()?.trim().parse().ok()
    }

    /// The CPU seconds of the control plane's process `name` so far.
    pub fn cpu(&self, name: &str) -> f64 {
        self.pid(name).map(cpu_seconds).unwrap_or_default()
    }

    /// The same in nanoseconds' precision ([`thread_cpu_seconds`]).
    pub fn thread_cpu(&self, name: &str) -> f64 {
        self.pid(name).map(thread_cpu_seconds).unwrap_or_default()
    }

    /// Writes `value` as JSON to `--out` (or prints it).
    pub fn write<T: serde::Serialize>(&self, value: &T) -> anyhow::Result<()> {
        let json = serde_json::to_string_pretty(value)?;
        match &self.out {
            Some(path) => std::fs::write(path, json).with_context(|| format!("writing {}", path.display())),
            None => {
                println!("{json}");
                Ok(())
            }
        }
    }
}

/// `standin --node NODE [--finalizer] [--concurrency N]`: this binary re-run as the
/// testkit's stand-in controller.
#[derive(Parser)]
struct StandInArgs {
    #[arg(long)]
    node: String,
    #[arg(long)]
    finalizer: bool,
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
}

/// A benchmark's `main`: under `cargo bench` (which passes `--bench`) it parses `A` and
/// runs `measure`; re-run as `standin` it is the stand-in controller; under `cargo test`
/// it has nothing to do (it needs the control plane `make bench` starts).
pub fn main<A: Parser, F: Future<Output = anyhow::Result<()>>>(name: &str, measure: impl FnOnce(A) -> F) -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a tokio runtime");
    let result = if args.get(1).is_some_and(|a| a == "standin") {
        let a = StandInArgs::parse_from(args.iter().take(1).chain(&args[2..]));
        runtime.block_on(standin::run(&a.node, a.finalizer, a.concurrency))
    } else if args.iter().any(|a| a == "--bench") {
        runtime.block_on(measure(A::parse()))
    } else {
        println!("{name} benchmark: needs the control plane that `make bench` starts; nothing to do under cargo test");
        Ok(())
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{name} benchmark failed: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Object `name` for `node` with `keys` keys `name/sandbox-K`.
pub fn object(name: &str, node: &str, keys: usize) -> PortAssignment {
    let keys = (0..keys).map(|k| format!("{name}/sandbox-{k}")).collect();
    PortAssignment::new(name, PortAssignmentSpec { node_name: node.to_owned(), protocol: Protocol::Tcp, keys })
}

/// When the bench created each object, and first saw it Ready and gone.
#[derive(Default)]
pub struct Seen {
    pub created: HashMap<String, Instant>,
    pub ready: HashMap<String, Instant>,
    pub gone: HashMap<String, Instant>,
}

/// The bench's own watch of a namespace, and the creates it times.
pub struct Observer {
    api: Api<PortAssignment>,
    pub seen: Arc<Mutex<Seen>>,
    counts: watch::Receiver<(usize, usize)>,
    task: tokio::task::JoinHandle<()>,
}

impl Observer {
    /// Watches `api`'s namespace; returns once the watch has listed it.
    pub async fn start(api: Api<PortAssignment>) -> anyhow::Result<Observer> {
        let seen: Arc<Mutex<Seen>> = Arc::default();
        let (counts_tx, mut counts) = watch::channel((0, 0));
        let (watched, record) = (api.clone(), seen.clone());
        let task = tokio::spawn(async move {
            let mut events = std::pin::pin!(watcher::watcher(watched, watcher::Config::default()).default_backoff());
            while let Some(event) = events.next().await {
                let now = Instant::now();
                let mut seen = record.lock().expect("lock");
                match event {
                    Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) if o.is_ready() => {
                        seen.ready.entry(o.name_any()).or_insert(now);
                    }
                    Ok(watcher::Event::Delete(o)) => {
                        seen.gone.entry(o.name_any()).or_insert(now);
                    }
                    Err(error) => eprintln!("bench watch: {error}"),
                    Ok(_) => {}
                }
                counts_tx.send_replace((seen.ready.len(), seen.gone.len()));
            }
        });
        tokio::time::timeout(Duration::from_secs(30), counts.changed()).await.context("the bench's watch")??;
        Ok(Observer { api, seen, counts, task })
    }

    /// Creates `objects` (name, node) with `keys` keys each, noting when each was sent.
    pub async fn create(&self, objects: &[(String, String)], keys: usize) -> anyhow::Result<()> {
        create_noting(&self.api, objects, keys, Some(&self.seen)).await
    }

    /// Waits until `n` objects were seen Ready; false after `limit`.
    pub async fn ready(&mut self, n: usize, limit: Duration) -> bool {
        matches!(tokio::time::timeout(limit, self.counts.wait_for(|c| c.0 >= n)).await, Ok(Ok(_)))
    }

    /// Waits until `n` objects were seen gone; false after `limit`.
    pub async fn gone(&mut self, n: usize, limit: Duration) -> bool {
        matches!(tokio::time::timeout(limit, self.counts.wait_for(|c| c.1 >= n)).await, Ok(Ok(_)))
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Creates `objects` (name, node) in `api`'s namespace with `keys` keys each,
/// `CREATE_CONCURRENCY` at a time.
pub async fn create(api: &Api<PortAssignment>, objects: &[(String, String)], keys: usize) -> anyhow::Result<()> {
    create_noting(api, objects, keys, None).await
}

/// [`create`], noting in `seen` when each create was sent.
async fn create_noting(
    api: &Api<PortAssignment>,
    objects: &[(String, String)],
    keys: usize,
    seen: Option<&Mutex<Seen>>,
) -> anyhow::Result<()> {
    let created: Vec<Result<PortAssignment, kube::Error>> = stream::iter(objects)
        .map(|(name, node)| {
            let (api, object) = (api.clone(), object(name, node, keys));
            let seen = seen.map(|seen| (seen, name.clone()));
            async move {
                if let Some((seen, name)) = seen {
                    seen.lock().expect("lock").created.insert(name, Instant::now());
                }
                api.create(&PostParams::default(), &object).await
            }
        })
        .buffer_unordered(CREATE_CONCURRENCY)
        .collect()
        .await;
    created.into_iter().collect::<Result<Vec<_>, _>>().context("creating objects")?;
    Ok(())
}

/// How long a phase over `n` objects may take before it counts as incomplete.
pub fn limit(n: usize) -> Duration {
    Duration::from_secs(60) + Duration::from_millis(150) * n as u32
}

/// `portassign agent` for `node` (defaults otherwise) with the credentials of
/// `kubeconfig`, its JSON log in `logs`; not started yet. Its `/metrics` is open (on
/// loopback): the benchmark polls it, and token reviews would add API calls that are not
/// the agent's work.
pub fn agent(kubeconfig: &Path, node: &str, logs: &Path) -> AgentProcess {
    AgentProcess::new(kubeconfig, node)
        .arg("--disable-http-auth")
        .arg("--log-format")
        .arg("json")
        .log_to(logs.join(format!("{node}.log")))
}

/// The sum of a metric's samples on the agent's `/metrics` whose line contains `labels`
/// (`None` when the agent does not answer).
pub async fn metric(agent: &AgentProcess, name: &str, labels: &str) -> Option<f64> {
    let (_, body) = portassign::checker::get(&format!("{}/metrics", agent.url)).await.ok()?;
    let samples = body.lines().filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with([' ', '{'])));
    Some(samples.filter(|l| l.contains(labels)).filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok()).sum())
}

/// One sample line of a Prometheus text exposition: its name, labels and value (`None`
/// for comments and lines that do not parse).
pub fn sample_line(line: &str) -> Option<(&str, HashMap<&str, &str>, f64)> {
    let (name_labels, value) = line.rsplit_once(' ')?;
    let value = value.trim().parse::<f64>().ok()?;
    let (name, labels) = match name_labels.split_once('{') {
        Some((name, labels)) => (name, labels.strip_suffix('}')?),
        None => (name_labels, ""),
    };
    let labels = labels
        .split("\",")
        .filter_map(|pair| pair.split_once("=\""))
        .map(|(k, v)| (k, v.trim_end_matches('"')))
        .collect();
    Some((name, labels, value))
}

/// `apiserver_request_total` for PortAssignments and Events, summed by
/// "VERB resource[/subresource]" plus the code when it is not 2xx.
pub async fn request_counts(client: &Client) -> anyhow::Result<BTreeMap<String, u64>> {
    let request = ::http::Request::get("/metrics").body(Vec::new())?;
    let text = client.request_text(request).await.context("reading kube-apiserver /metrics")?;
    let mut counts = BTreeMap::new();
    for (name, labels, value) in text.lines().filter_map(sample_line) {
        if name != "apiserver_request_total" {
            continue;
        }
        let resource = labels.get("resource").copied().unwrap_or_default();
        if resource != "portassignments" && resource != "events" {
            continue;
        }
        let mut key = format!("{} {resource}", labels.get("verb").copied().unwrap_or("?"));
        if let Some(sub) = labels.get("subresource").filter(|s| !s.is_empty()) {
            key = format!("{key}/{sub}");
        }
        if let Some(code) = labels.get("code").filter(|c| !c.starts_with('2')) {
            key = format!("{key} {code}");
        }
        *counts.entry(key).or_insert(0) += value as u64;
    }
    Ok(counts)
}

/// kube-apiserver's flow control at one moment (its `/metrics`).
#[derive(Clone, Debug, Default)]
pub struct FlowControl {
    /// Requests answered 429 since the process started.
    pub answered_429: f64,
    /// The same by "VERB resource".
    pub answered_429_by: BTreeMap<String, f64>,
    /// Requests API Priority and Fairness rejected since the process started.
    pub rejected: f64,
    /// Requests waiting in its queues now.
    pub in_queue: f64,
    /// Requests executing now, the exempt priority level (where this very read runs) left out.
    pub executing: f64,
}

/// Reads [`FlowControl`] from kube-apiserver's `/metrics`.
pub async fn flow_control(client: &Client) -> anyhow::Result<FlowControl> {
    let request = ::http::Request::get("/metrics").body(Vec::new())?;
    let text = client.request_text(request).await.context("reading kube-apiserver /metrics")?;
    Ok(parse_flow_control(&text))
}

/// [`FlowControl`] from a Prometheus text exposition.
pub fn parse_flow_control(text: &str) -> FlowControl {
    let mut flow = FlowControl::default();
    for (name, labels, value) in text.lines().filter_map(sample_line) {
        let label = |name: &str| labels.get(name).copied().unwrap_or("?");
        match name {
            "apiserver_request_total" if label("code") == "429" => {
                flow.answered_429 += value;
                *flow.answered_429_by.entry(format!("{} {}", label("verb"), label("resource"))).or_default() += value;
            }
            "apiserver_flowcontrol_rejected_requests_total" => flow.rejected += value,
            "apiserver_flowcontrol_current_inqueue_requests" => flow.in_queue += value,
            "apiserver_flowcontrol_current_executing_requests" if label("priority_level") != "exempt" => {
                flow.executing += value
            }
            _ => {}
        }
    }
    flow
}

/// User + system CPU seconds of a process so far (0 when it cannot be read).
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // The fields after the command name (which may hold spaces) start at `state`;
    // utime and stime are fields 14 and 15, in USER_HZ (100 on Linux).
    let fields: Vec<&str> =
        stat.rsplit_once(") ").map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// CPU seconds a process's threads have run so far, in nanoseconds' precision: the sum
/// of the first field of `/proc/<pid>/task/*/schedstat` (0 when it cannot be read).
/// `/proc/<pid>/stat` counts in 10 ms ticks, too coarse for a window of a few dozen
/// writes of a few milliseconds each; a thread that exits takes its time with it, so
/// this is for windows over which the process keeps its threads (Go's do).
pub fn thread_cpu_seconds(pid: u32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0.0 };
    let nanos: u64 = tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|line| line.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    nanos as f64 / 1e9
}

/// A `kB` line of `/proc/<pid>/status`, such as `VmHWM:` (0 when it cannot be read).
pub fn proc_status_kib(pid: Option<u32>, field: &str) -> u64 {
    let status = pid.and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok()).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix(field)?.split_whitespace().next()?.parse().ok()).unwrap_or(0)
}

/// CPU seconds all CPUs have spent busy (not idle, not waiting for I/O) since boot.
pub fn machine_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else { return 0.0 };
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let busy: f64 = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .filter_map(|(_, t)| t.parse::<f64>().ok())
        .sum();
    busy / 100.0
}

/// `/proc/loadavg`'s first three fields.
pub fn loadavg() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_else(|_| "unknown".into());
    text.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}
