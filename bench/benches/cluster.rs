//! Convergence and restart benchmarks against a real kube-apiserver + etcd.
//!
//! `cargo bench -p portassign-bench --bench cluster -- --kubeconfig FILE --cp-dir DIR --out FILE`
//! (what `make bench` runs against the control plane it starts) measures:
//!
//! - **convergence**: N objects × 4 keys created for one node, time until the bench's
//!   own watch has seen every one Ready with a port per key; then one delete-collection,
//!   time until every object is gone. Once with the real `portassign agent` binary, and
//!   once with the *floor*: this binary re-run as `cluster floor`, a minimal client that
//!   makes only the writes no implementation can avoid (add the finalizer, apply the
//!   status; remove the finalizer), driven by a watch, with the agent's concurrency.
//!   Each run gets a namespace and a node name of its own.
//! - **restart**: a node whose statuses hold 10,000 ports; time from spawning the agent
//!   to `/readyz` 200, its peak RSS, against a fresh client listing the same objects.
//!
//! The cluster is prepared by the test kit as the chart prepares one (the CRD, the chart's
//! ServiceAccounts bound by its rendered RBAC). The agents, and the floor, run as the
//! chart's agent ServiceAccount; the admin kubeconfig is the driver's only (creates,
//! deletes, its watch, kube-apiserver's `/metrics`).
//!
//! The agent measured is the binary the kit's `portassign_bin()` names (printed at the
//! start): `PORTASSIGN_BIN`, else `portassign` in this bench's own profile directory,
//! `target/release/`. `cargo bench` does not build it (it is another package's binary):
//! `hack/bench.sh` builds it first with `cargo build --release -p portassign --bin
//! portassign`, the product's release build as the image makes it, and clears
//! `PORTASSIGN_BIN` so that build is the one measured.
//!
//! Run by `cargo test -p portassign-bench --benches` (no `--bench` argument) it does
//! nothing: it needs the control plane `make bench` starts.

#[path = "support/procfs.rs"]
mod procfs;
#[path = "support/results.rs"]
mod results;

use std::{
    collections::{BTreeMap, HashMap},
    fs::File,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow};
use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::{
    api::core::v1::Namespace,
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
    runtime::{
        WatchStreamExt,
        watcher::{self, Event},
    },
};
use portassign::{
    agent::reconcile::FIELD_MANAGER,
    api::{CONDITION_READY, FINALIZER, PortAssignment, PortAssignmentSpec, PortAssignmentStatus, PortEntry, Protocol},
    checker as http,
};
use portassign_testkit::{AgentProcess, Identity, cluster::ensure_namespace, portassign_bin};
use procfs::{cpu_seconds, proc_status_kib};
use results::{Cluster, Convergence, Cpu, Percentiles, Restart, RestartRun, System};
use serde_json::json;
use tokio::sync::{Semaphore, watch};

/// Keys per object.
const KEYS: usize = 4;
/// The agent's default `--concurrency`; the floor uses the same.
const CONCURRENCY: u16 = 256;
/// Creates the bench keeps in flight.
const CREATE_CONCURRENCY: usize = 32;
/// Field manager of the floor's status writes.
const FLOOR_MANAGER: &str = "portassign-bench-floor";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the tokio runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = if args.first().map(String::as_str) == Some("floor") {
        runtime.block_on(floor(Options::parse(&args[1..])))
    } else if args.iter().any(|a| a == "--bench") {
        runtime.block_on(measure(Options::parse(&args)))
    } else {
        println!("cluster benchmark: needs the control plane that `make bench` starts; nothing to do under cargo test");
        Ok(())
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("cluster benchmark failed: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Command-line options of both modes.
#[derive(Default)]
struct Options {
    kubeconfig: Option<PathBuf>,
    cp_dir: Option<PathBuf>,
    out: Option<PathBuf>,
    logs: Option<PathBuf>,
    node: Option<String>,
    sizes: Vec<usize>,
    repeats_at_largest: usize,
    restart_objects: usize,
}

impl Options {
    fn parse(args: &[String]) -> Self {
        let value = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
        let sizes = value("--sizes")
            .map(|s| s.split(',').filter_map(|n| n.trim().parse().ok()).collect())
            .unwrap_or_else(|| vec![100, 300, 1000]);
        Options {
            kubeconfig: value("--kubeconfig").or_else(|| std::env::var("KUBECONFIG").ok()).map(PathBuf::from),
            cp_dir: value("--cp-dir").map(PathBuf::from),
            out: value("--out").map(PathBuf::from),
            logs: value("--logs").map(PathBuf::from),
            node: value("--node"),
            sizes,
            repeats_at_largest: value("--repeats-at-largest").and_then(|n| n.parse().ok()).unwrap_or(5),
            restart_objects: value("--restart-objects").and_then(|n| n.parse().ok()).unwrap_or(2500),
        }
    }

    fn kubeconfig(&self) -> anyhow::Result<&Path> {
        self.kubeconfig.as_deref().ok_or_else(|| anyhow!("no kubeconfig: pass --kubeconfig FILE or set KUBECONFIG"))
    }
}

// ----------------------------------------------------------------------------------
// The floor: only the writes that cannot be avoided.
// ----------------------------------------------------------------------------------

/// What the floor has started for an object (by uid), so each write is made once.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Started {
    Assign,
    Release,
}

/// Runs as a separate process, like the agent: watches the node's objects (the same
/// field selector as the agent) and, with at most `CONCURRENCY` objects in flight,
/// adds the finalizer and applies a Ready status with a port per key in one go; for an
/// object being deleted it removes the finalizer. Prints `ready` once the watch has
/// listed. No probing, no table, no events, no re-reads. Its credentials come from
/// `KUBECONFIG`, as the agent's do (see `start_floor`).
async fn floor(options: Options) -> anyhow::Result<()> {
    let node = options.node.clone().ok_or_else(|| anyhow!("floor: --node is required"))?;
    let client = Client::try_default().await.context("floor: no client from KUBECONFIG")?;
    let api: Api<PortAssignment> = Api::all(client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let permits = Arc::new(Semaphore::new(usize::from(CONCURRENCY)));
    let started: Arc<Mutex<HashMap<String, Started>>> = Arc::default();
    let next_port = Arc::new(AtomicU32::new(20000));
    let mut events = std::pin::pin!(watcher::watcher(api, config).default_backoff());
    while let Some(event) = events.try_next().await? {
        let object = match event {
            Event::InitDone => {
                println!("ready");
                std::io::stdout().flush()?;
                continue;
            }
            Event::Init => continue,
            Event::Delete(object) => {
                started.lock().expect("lock").remove(&object.uid().unwrap_or_default());
                continue;
            }
            Event::Apply(object) | Event::InitApply(object) => object,
        };
        let has_finalizer = object.finalizers().iter().any(|f| f == FINALIZER);
        let want = if object.metadata.deletion_timestamp.is_some() {
            if !has_finalizer {
                continue;
            }
            Started::Release
        } else {
            if has_finalizer && object.is_ready() {
                continue;
            }
            Started::Assign
        };
        if started.lock().expect("lock").insert(object.uid().unwrap_or_default(), want) == Some(want) {
            continue;
        }
        let api: Api<PortAssignment> = Api::namespaced(client.clone(), &object.namespace().unwrap_or_default());
        let permits = permits.clone();
        let next_port = next_port.clone();
        tokio::spawn(async move {
            let _permit = permits.acquire_owned().await;
            let result = match want {
                Started::Assign => floor_assign(&api, &object, has_finalizer, &next_port).await,
                Started::Release => floor_release(&api, &object).await,
            };
            if let Err(error) = result {
                eprintln!("floor: {}: {error:#}", object.name_any());
            }
        });
    }
    Ok(())
}

async fn floor_assign(
    api: &Api<PortAssignment>,
    object: &PortAssignment,
    has_finalizer: bool,
    next_port: &AtomicU32,
) -> anyhow::Result<()> {
    let name = object.name_any();
    if !has_finalizer {
        // The same patch kube's finalizer helper sends for an object without finalizers.
        let patch = json!([
            { "op": "test", "path": "/metadata/finalizers", "value": null },
            { "op": "add", "path": "/metadata/finalizers", "value": [FINALIZER] },
        ]);
        let patch: Patch<()> = Patch::Json(serde_json::from_value(patch)?);
        let params = PatchParams::default();
        retry(|| api.patch(&name, &params, &patch)).await.context("adding the finalizer")?;
    }
    let first = next_port.fetch_add(object.spec.keys.len() as u32, Ordering::SeqCst);
    let ports =
        object.spec.keys.iter().enumerate().map(|(i, key)| (key.clone(), (first as usize + i) as u16)).collect();
    let body = json!({
        "apiVersion": PortAssignment::api_version(&()),
        "kind": PortAssignment::kind(&()),
        "status": ready_status(object, ports),
    });
    let body = Patch::Apply(body);
    let params = PatchParams::apply(FLOOR_MANAGER).force();
    retry(|| api.patch_status(&name, &params, &body)).await.context("applying the status")?;
    Ok(())
}

async fn floor_release(api: &Api<PortAssignment>, object: &PortAssignment) -> anyhow::Result<()> {
    let index = object.finalizers().iter().position(|f| f == FINALIZER).unwrap_or_default();
    let path = format!("/metadata/finalizers/{index}");
    let patch = json!([{ "op": "test", "path": path, "value": FINALIZER }, { "op": "remove", "path": path }]);
    let patch: Patch<()> = Patch::Json(serde_json::from_value(patch)?);
    let (name, params) = (object.name_any(), PatchParams::default());
    retry(|| api.patch(&name, &params, &patch)).await.context("removing the finalizer")?;
    Ok(())
}

/// Retries a write a few times (the API server under load may time out a request).
async fn retry<T, F, Fut, E>(mut write: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: Into<anyhow::Error>,
{
    let mut attempt = 0;
    loop {
        match write().await.map_err(Into::into) {
            Ok(value) => return Ok(value),
            Err(error) if attempt >= 5 => return Err(error),
            Err(_) => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// A Ready status recording `ports`, shaped as the agent writes it.
fn ready_status(object: &PortAssignment, ports: BTreeMap<String, u16>) -> PortAssignmentStatus {
    let generation = object.metadata.generation;
    PortAssignmentStatus {
        observed_generation: generation,
        key_count: object.spec.keys.len() as u32,
        assigned_count: ports.len() as u32,
        conditions: vec![Condition {
            type_: CONDITION_READY.into(),
            status: "True".into(),
            reason: "Allocated".into(),
            message: format!("all {} keys have a port", ports.len()),
            observed_generation: generation,
            last_transition_time: Time(Timestamp::now()),
        }],
        ports: ports.into_iter().map(|(key, port)| PortEntry { key, port }).collect(),
        pod_conflicts: Vec::new(),
    }
}

// ----------------------------------------------------------------------------------
// The driver.
// ----------------------------------------------------------------------------------

/// What every measurement needs.
struct Bench {
    /// Cluster admin: the driver's creates, deletes, watch and kube-apiserver's `/metrics`.
    client: Client,
    /// The chart's agent ServiceAccount: what the agents and the floor run as.
    agent: Identity,
    logs: PathBuf,
    apiserver_pid: Option<u32>,
    etcd_pid: Option<u32>,
    run: u32,
}

async fn measure(options: Options) -> anyhow::Result<()> {
    let kubeconfig = options.kubeconfig()?;
    let pid = |name: &str| -> Option<u32> {
        let dir = options.cp_dir.as_ref()?;
        std::fs::read_to_string(dir.join(format!("{name}.pid"))).ok()?.trim().parse().ok()
    };
    let logs = options.logs.clone().unwrap_or_else(|| std::env::temp_dir().join("portassign-bench-logs"));
    std::fs::create_dir_all(&logs)?;
    // The CRD, the chart's RBAC and ServiceAccounts, a kubeconfig for each.
    let cluster = portassign_testkit::Cluster::prepare(kubeconfig, None).await.context("preparing the cluster")?;
    eprintln!("agent binary: {}; agents and floor run as {}", portassign_bin().display(), cluster.agent.user);
    let mut bench = Bench {
        client: cluster.admin.client(),
        agent: cluster.agent.clone(),
        logs,
        apiserver_pid: pid("kube-apiserver"),
        etcd_pid: pid("etcd"),
        run: std::process::id() % 10000,
    };

    // Warm-up: the API server's watch caches, handlers and connections for this CRD.
    for system in [System::Floor, System::Agent] {
        convergence(&mut bench, system, 50).await.context("warm-up")?;
    }

    let mut runs = Vec::new();
    let largest = options.sizes.iter().copied().max().unwrap_or(0);
    for (i, &n) in options.sizes.iter().enumerate() {
        let repeats = if n == largest { options.repeats_at_largest.max(1) } else { 1 };
        for r in 0..repeats {
            // Alternate which side goes first, so drift on a shared machine hits both.
            let order = if (i + r) % 2 == 0 { [System::Floor, System::Agent] } else { [System::Agent, System::Floor] };
            for system in order {
                let run = convergence(&mut bench, system, n).await?;
                eprintln!(
                    "{:>5} {:>5} objects: ready in {:.2}s, gone in {:.2}s (p50 {:.0} ms, p99 {:.0} ms){}",
                    system.name(),
                    n,
                    run.create_s,
                    run.delete_s,
                    run.latency_ms.p50,
                    run.latency_ms.p99,
                    if run.completed { "" } else { " INCOMPLETE" }
                );
                runs.push(run);
            }
        }
    }

    let restart = restart(&mut bench, options.restart_objects, 3).await?;
    let report = Cluster {
        concurrency: CONCURRENCY,
        keys_per_object: KEYS,
        create_concurrency: CREATE_CONCURRENCY,
        convergence: runs,
        restart,
    };
    match &options.out {
        Some(path) => results::write(path, &report)?,
        None => println!("{}", serde_json::to_string_pretty(&report)?),
    }
    Ok(())
}

fn object(name: &str, node: &str) -> PortAssignment {
    let keys = (0..KEYS).map(|k| format!("{name}/sandbox-{k}")).collect();
    PortAssignment::new(name, PortAssignmentSpec { node_name: node.to_owned(), protocol: Protocol::Tcp, keys })
}

/// When the bench's watch saw each object Ready and gone.
#[derive(Default)]
struct Seen {
    created: HashMap<String, Instant>,
    ready: HashMap<String, Instant>,
    gone: HashMap<String, Instant>,
}

/// Counts of objects seen Ready and gone.
#[derive(Clone, Copy, Default)]
struct Counts {
    ready: usize,
    gone: usize,
}

/// Watches the namespace and notes when each object is first seen Ready and gone.
fn observe(api: Api<PortAssignment>, seen: Arc<Mutex<Seen>>) -> (watch::Receiver<Counts>, tokio::task::JoinHandle<()>) {
    let (counts, receiver) = watch::channel(Counts::default());
    let task = tokio::spawn(async move {
        let mut events = std::pin::pin!(watcher::watcher(api, watcher::Config::default()).default_backoff());
        while let Some(event) = events.next().await {
            let now = Instant::now();
            let mut seen = seen.lock().expect("lock");
            match event {
                Ok(Event::Apply(o) | Event::InitApply(o)) if o.is_ready() => {
                    seen.ready.entry(o.name_any()).or_insert(now);
                }
                Ok(Event::Delete(o)) => {
                    seen.gone.entry(o.name_any()).or_insert(now);
                }
                Ok(_) => {}
                Err(error) => eprintln!("bench watch: {error}"),
            }
            let next = Counts { ready: seen.ready.len(), gone: seen.gone.len() };
            counts.send_replace(next);
        }
    });
    (receiver, task)
}

/// A resource snapshot: API request counts and CPU seconds.
struct Snapshot {
    requests: BTreeMap<String, u64>,
    cpu: Cpu,
    at: Instant,
}

async fn snapshot(bench: &Bench, system_pid: Option<u32>) -> anyhow::Result<Snapshot> {
    let requests = request_counts(&bench.client).await?;
    let cpu = Cpu {
        system: system_pid.map(cpu_seconds).unwrap_or_default(),
        apiserver: bench.apiserver_pid.map(cpu_seconds).unwrap_or_default(),
        etcd: bench.etcd_pid.map(cpu_seconds).unwrap_or_default(),
        driver: cpu_seconds(std::process::id()),
        machine: machine_busy_seconds(),
        wall: 0.0,
    };
    Ok(Snapshot { requests, cpu, at: Instant::now() })
}

fn delta(before: &Snapshot, after: &Snapshot) -> (BTreeMap<String, u64>, Cpu) {
    let requests = after
        .requests
        .iter()
        .filter_map(|(k, v)| {
            let d = v.saturating_sub(before.requests.get(k).copied().unwrap_or(0));
            (d > 0).then(|| (k.clone(), d))
        })
        .collect();
    let cpu = Cpu {
        system: after.cpu.system - before.cpu.system,
        apiserver: after.cpu.apiserver - before.cpu.apiserver,
        etcd: after.cpu.etcd - before.cpu.etcd,
        driver: after.cpu.driver - before.cpu.driver,
        machine: after.cpu.machine - before.cpu.machine,
        wall: (after.at - before.at).as_secs_f64(),
    };
    (requests, cpu)
}

/// One create-then-delete run of `n` objects converged by `system`.
async fn convergence(bench: &mut Bench, system: System, n: usize) -> anyhow::Result<Convergence> {
    bench.run += 1;
    let ns = format!("bench-{}-{n}-{}", system.name(), bench.run);
    let node = format!("bench-node-{}-{n}-{}", system.name(), bench.run);
    ensure_namespace(&bench.client, &ns).await?;
    let process = match system {
        System::Agent => Side::Agent(agent(bench, &node).start().await),
        System::Floor => Side::Floor(start_floor(bench, &node)?),
    };
    // Both sides have listed the node's (no) objects; give their watches a moment to be
    // established so start-up requests stay out of the measured phases.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let api: Api<PortAssignment> = Api::namespaced(bench.client.clone(), &ns);
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let (mut counts, observer) = observe(api.clone(), seen.clone());
    // The observer has listed the (empty) namespace once it reports a first count.
    tokio::time::timeout(Duration::from_secs(30), counts.changed()).await.context("bench watch did not start")??;

    let before = snapshot(bench, process.pid()).await?;
    let limit = Duration::from_secs(60) + Duration::from_millis(150) * n as u32;
    let t0 = Instant::now();
    let created: Vec<anyhow::Result<()>> = stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            let seen = seen.clone();
            let node = node.clone();
            async move {
                let name = format!("pa-{i}");
                let object = object(&name, &node);
                seen.lock().expect("lock").created.insert(name, Instant::now());
                api.create(&PostParams::default(), &object).await?;
                Ok(())
            }
        })
        .buffer_unordered(CREATE_CONCURRENCY)
        .collect()
        .await;
    created.into_iter().collect::<anyhow::Result<Vec<()>>>().context("creating objects")?;
    let creates_answered_s = t0.elapsed().as_secs_f64();
    let all_ready =
        tokio::time::timeout(limit, counts.wait_for(|c| c.ready >= n)).await.map(|r| r.is_ok()).unwrap_or(false);
    let mid = snapshot(bench, process.pid()).await?;

    let t1 = Instant::now();
    api.delete_collection(&DeleteParams::default(), &ListParams::default()).await?;
    let all_gone =
        tokio::time::timeout(limit, counts.wait_for(|c| c.gone >= n)).await.map(|r| r.is_ok()).unwrap_or(false);
    let after = snapshot(bench, process.pid()).await?;
    let reconciles = match &process {
        Side::Agent(agent) => agent_metric(agent, "portassign_reconciles_total").await,
        Side::Floor(_) => None,
    };
    process.stop();
    observer.abort();
    let namespaces: Api<Namespace> = Api::all(bench.client.clone());
    let _ = namespaces.delete(&ns, &DeleteParams::default()).await;

    let seen = seen.lock().expect("lock");
    let last = |times: &HashMap<String, Instant>, from: Instant| {
        times.values().map(|t| t.saturating_duration_since(from).as_secs_f64()).fold(0.0, f64::max)
    };
    let latencies: Vec<f64> = seen
        .ready
        .iter()
        .filter_map(|(name, ready)| Some(ready.saturating_duration_since(*seen.created.get(name)?).as_secs_f64() * 1e3))
        .collect();
    let (create_requests, create_cpu) = delta(&before, &mid);
    let (delete_requests, delete_cpu) = delta(&mid, &after);
    Ok(Convergence {
        system,
        objects: n,
        create_s: if all_ready { last(&seen.ready, t0) } else { limit.as_secs_f64() },
        creates_answered_s,
        delete_s: if all_gone { last(&seen.gone, t1) } else { limit.as_secs_f64() },
        completed: all_ready && all_gone,
        latency_ms: Percentiles {
            p50: results::percentile(&latencies, 0.5),
            p99: results::percentile(&latencies, 0.99),
            max: results::percentile(&latencies, 1.0),
        },
        create_requests,
        delete_requests,
        create_cpu,
        delete_cpu,
        reconciles,
    })
}

/// Restarts the agent `runs` times on a node whose statuses hold `objects` × 4 ports.
async fn restart(bench: &mut Bench, objects: usize, runs: usize) -> anyhow::Result<Restart> {
    bench.run += 1;
    let ns = format!("bench-restart-{}", bench.run);
    let node = format!("bench-node-restart-{}", bench.run);
    ensure_namespace(&bench.client, &ns).await?;
    populate(&bench.client, &ns, &node, objects).await?;

    let mut out = Restart { objects, ports: objects * KEYS, ..Restart::default() };
    // The fixed cost: the same binary on a node with nothing on it.
    let empty = agent(bench, &format!("{node}-empty"));
    let spawned = Instant::now();
    let mut empty = empty.start().await;
    out.empty_ready_s = spawned.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    out.empty_hwm_kib = proc_status_kib(empty.pid(), "VmHWM:");
    empty.terminate();
    for _ in 0..runs {
        // Floor: what the rebuild must at least do, a fresh client listing the node's
        // objects page by page, with the agent's credentials.
        let started = Instant::now();
        let fresh = bench.agent.client();
        let api: Api<PortAssignment> = Api::all(fresh);
        let mut params = ListParams::default().fields(&format!("spec.nodeName={node}")).limit(500);
        let mut listed = 0;
        loop {
            let page = api.list(&params).await?;
            listed += page.items.len();
            match page.metadata.continue_ {
                Some(token) if !token.is_empty() => params = params.continue_token(&token),
                _ => break,
            }
        }
        out.list_floor_s.push(started.elapsed().as_secs_f64());
        anyhow::ensure!(listed == objects, "listed {listed} objects, expected {objects}");

        out.runs.push(restart_once(bench, &node, objects).await?);
        let last = out.runs.last().expect("just pushed");
        eprintln!(
            "restart: ready in {:.3}s with {} ports (list floor {:.3}s), VmHWM {} KiB at ready, {} KiB settled",
            last.ready_s,
            last.ports_at_ready,
            out.list_floor_s.last().copied().unwrap_or_default(),
            last.hwm_at_ready_kib,
            last.hwm_settled_kib
        );
    }
    Ok(out)
}

/// Creates `objects` objects for `node` with the finalizer and the status the agent
/// itself would have written (same field manager, same content), so a restarted agent
/// finds a full node and has nothing to change.
async fn populate(client: &Client, ns: &str, node: &str, objects: usize) -> anyhow::Result<()> {
    let api: Api<PortAssignment> = Api::namespaced(client.clone(), ns);
    let started = Instant::now();
    let done: Vec<anyhow::Result<()>> = stream::iter(0..objects)
        .map(|i| {
            let api = api.clone();
            let node = node.to_owned();
            async move {
                let name = format!("pa-{i}");
                let mut object = object(&name, &node);
                object.metadata.finalizers = Some(vec![FINALIZER.to_owned()]);
                let created = api.create(&PostParams::default(), &object).await?;
                let ports =
                    created.spec.keys.iter().enumerate().map(|(k, key)| (key.clone(), (20000 + i * KEYS + k) as u16));
                let body = json!({
                    "apiVersion": PortAssignment::api_version(&()),
                    "kind": PortAssignment::kind(&()),
                    "status": ready_status(&created, ports.collect()),
                });
                api.patch_status(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(body)).await?;
                Ok(())
            }
        })
        .buffer_unordered(CREATE_CONCURRENCY)
        .collect()
        .await;
    done.into_iter().collect::<anyhow::Result<Vec<()>>>().context("populating the restart node")?;
    eprintln!(
        "restart: {objects} objects with {} ports written in {:.1}s",
        objects * KEYS,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn restart_once(bench: &Bench, node: &str, objects: usize) -> anyhow::Result<RestartRun> {
    let process = agent(bench, node);
    // Spawned → first `/readyz` 200, polled every 2 ms.
    let spawned = Instant::now();
    let mut process = process.start().await;
    let ready_s = spawned.elapsed().as_secs_f64();
    let at_ready = Instant::now();
    let hwm_at_ready_kib = proc_status_kib(process.pid(), "VmHWM:");
    let ports_at_ready = agent_metric(&process, "portassign_ports_assigned").await.unwrap_or(0);
    let before = request_counts(&bench.client).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while agent_metric(&process, "portassign_reconciles_total").await.unwrap_or(0) < objects as u64 {
        anyhow::ensure!(Instant::now() < deadline, "agent did not reconcile {objects} objects within 60s of ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let the last reconciles (up to the concurrency) finish.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let settle_s = at_ready.elapsed().as_secs_f64();
    let after = request_counts(&bench.client).await?;
    let writes_after_ready = after
        .iter()
        .filter(|(k, _)| ["PATCH", "APPLY", "POST", "PUT", "CREATE", "UPDATE"].iter().any(|v| k.starts_with(v)))
        .map(|(k, v)| v.saturating_sub(before.get(k).copied().unwrap_or(0)))
        .sum();
    let run = RestartRun {
        ready_s,
        ports_at_ready,
        hwm_at_ready_kib,
        hwm_settled_kib: proc_status_kib(process.pid(), "VmHWM:"),
        rss_settled_kib: proc_status_kib(process.pid(), "VmRSS:"),
        settle_s,
        writes_after_ready,
    };
    process.terminate();
    Ok(run)
}

// ----------------------------------------------------------------------------------
// Processes under test.
// ----------------------------------------------------------------------------------

/// What converges a run's objects.
enum Side {
    Agent(AgentProcess),
    Floor(Floor),
}

impl Side {
    fn pid(&self) -> Option<u32> {
        match self {
            Side::Agent(agent) => agent.pid(),
            Side::Floor(floor) => Some(floor.0.id()),
        }
    }

    fn stop(self) {
        if let Side::Agent(mut agent) = self {
            agent.terminate();
        }
    }
}

/// `portassign agent` for `node` (defaults otherwise: range, concurrency) as the chart's
/// agent ServiceAccount, listening where the kit's `--listen` says; its log goes to the
/// logs dir. Not started yet. Its `/metrics` is open (on loopback): the benchmark polls
/// it, and token reviews would add API calls that are not the agent's work.
fn agent(bench: &Bench, node: &str) -> AgentProcess {
    AgentProcess::new(&bench.agent.kubeconfig, node)
        .arg("--disable-http-auth")
        .arg("--log-format")
        .arg("json")
        .log_to(bench.logs.join(format!("{node}.log")))
}

/// The floor's process; it has nothing to clean up, so it is killed when dropped.
struct Floor(Child);

impl Drop for Floor {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawns this binary as the floor for `node` and waits until its watch has listed. It
/// runs as the chart's agent ServiceAccount, like the agent it is the baseline for, so
/// both sides make their writes under the same identity and RBAC.
fn start_floor(bench: &Bench, node: &str) -> anyhow::Result<Floor> {
    let mut child = Command::new(std::env::current_exe()?)
        .args(["floor", "--node", node])
        .env("KUBECONFIG", &bench.agent.kubeconfig)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(File::create(bench.logs.join(format!("{node}.log")))?)
        .spawn()
        .context("spawning the floor")?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout pipe"))?;
    let process = Floor(child);
    let (ready, wait) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        if let Some(Ok(line)) = lines.next() {
            let _ = ready.send(line);
        }
        for _ in lines {}
    });
    let line = wait.recv_timeout(Duration::from_secs(30)).context("the floor did not become ready within 30s")?;
    anyhow::ensure!(line.trim() == "ready", "unexpected output from the floor: {line}");
    Ok(process)
}

/// A gauge or counter from the agent's `/metrics`.
async fn agent_metric(agent: &AgentProcess, name: &str) -> Option<u64> {
    let (_, body) = http::get(&format!("{}/metrics", agent.url)).await.ok()?;
    body.lines().find_map(|line| {
        let value = line.strip_prefix(name)?.strip_prefix(' ')?;
        value.trim().parse::<f64>().ok().map(|v| v as u64)
    })
}

// ----------------------------------------------------------------------------------
// What the processes cost.
// ----------------------------------------------------------------------------------

/// `apiserver_request_total` for PortAssignments and Events, summed by
/// "VERB resource[/subresource]" plus the code when it is not 2xx.
async fn request_counts(client: &Client) -> anyhow::Result<BTreeMap<String, u64>> {
    let request = ::http::Request::get("/metrics").body(Vec::new())?;
    let text = client.request_text(request).await.context("reading kube-apiserver /metrics")?;
    let mut counts = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else { continue };
        let Some((labels, value)) = rest.rsplit_once("} ") else { continue };
        let labels: HashMap<&str, &str> = labels
            .split("\",")
            .filter_map(|pair| pair.split_once("=\""))
            .map(|(k, v)| (k, v.trim_end_matches('"')))
            .collect();
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
        *counts.entry(key).or_insert(0) += value.trim().parse::<f64>().unwrap_or(0.0) as u64;
    }
    Ok(counts)
}

/// CPU seconds all CPUs have spent busy (not idle, not waiting for I/O) since boot.
fn machine_busy_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else { return 0.0 };
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else { return 0.0 };
    let ticks: Vec<f64> = line.split_whitespace().skip(1).filter_map(|t| t.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let busy: f64 = ticks.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, t)| t).sum();
    busy / 100.0
}
