//! Convergence and restart benchmarks against a real kube-apiserver + etcd.
//!
//! `cargo bench -p portassign-bench --bench cluster -- --kubeconfig FILE --cp-dir DIR --out FILE`
//! (what `make bench` runs against the control plane it starts) measures:
//!
//! - **convergence**: N objects × 4 keys created for one node, time until the bench's
//!   own watch has seen every one Ready with a port per key; then one delete-collection,
//!   time until every object is gone. Once with the real `portassign agent` binary, and
//!   once with the *floor*: the testkit's stand-in controller (`portassign_testkit::standin`,
//!   this binary re-run as `cluster standin --finalizer`), which makes only the writes no
//!   implementation can avoid (add the finalizer, apply the status; remove the
//!   finalizer), driven by a watch, with the agent's concurrency.
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

#[path = "support/kit.rs"]
mod kit;
#[path = "support/results.rs"]
mod results;

use std::{
    collections::BTreeMap,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::Namespace;
use kit::{Common, Observer, agent, cpu_seconds, machine_busy_seconds, metric, proc_status_kib, request_counts};
use kube::{
    Api, Client, Resource,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use portassign::{
    agent::reconcile::FIELD_MANAGER,
    api::{FINALIZER, PortAssignment, node_selector},
};
use portassign_testkit::{
    AgentProcess, Identity,
    cluster::ensure_namespace,
    portassign_bin,
    standin::{StandIn, ready_status},
};
use results::{Cluster, Convergence, Cpu, Percentiles, Restart, RestartRun, System};
use serde_json::json;

/// Keys per object.
const KEYS: usize = 4;
/// The agent's default `--concurrency`; the floor uses the same.
const CONCURRENCY: u16 = 256;

/// `cargo bench -p portassign-bench --bench cluster -- --kubeconfig FILE --cp-dir DIR --out FILE`.
#[derive(clap::Parser)]
struct Args {
    #[command(flatten)]
    common: Common,
    /// Objects per convergence run, one run of each side per size.
    #[arg(long, value_delimiter = ',', default_values_t = [100, 300, 1000])]
    sizes: Vec<usize>,
    /// Runs of each side at the largest size.
    #[arg(long, default_value_t = 5)]
    repeats_at_largest: usize,
    /// Objects on the restarted node (× 4 keys).
    #[arg(long, default_value_t = 2500)]
    restart_objects: usize,
}

fn main() -> ExitCode {
    kit::main("cluster", measure)
}

/// What every measurement needs.
struct Bench {
    /// Cluster admin: the driver's creates, deletes, watch and kube-apiserver's `/metrics`.
    client: Client,
    /// The chart's agent ServiceAccount: what the agents and the floor run as.
    agent: Identity,
    common: Common,
    run: u32,
}

async fn measure(args: Args) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.common.logs)?;
    // The CRD, the chart's RBAC and ServiceAccounts, a kubeconfig for each.
    let cluster =
        portassign_testkit::Cluster::prepare(&args.common.kubeconfig, None).await.context("preparing the cluster")?;
    eprintln!("agent binary: {}; agents and floor run as {}", portassign_bin().display(), cluster.agent.user);
    let mut bench = Bench {
        client: cluster.admin.client(),
        agent: cluster.agent.clone(),
        common: args.common,
        run: std::process::id() % 10000,
    };

    // Warm-up: the API server's watch caches, handlers and connections for this CRD.
    for system in [System::Floor, System::Agent] {
        convergence(&mut bench, system, 50).await.context("warm-up")?;
    }
    let mut runs = Vec::new();
    let largest = args.sizes.iter().copied().max().unwrap_or(0);
    for (i, &n) in args.sizes.iter().enumerate() {
        let repeats = if n == largest { args.repeats_at_largest.max(1) } else { 1 };
        for r in 0..repeats {
            // Alternate which side goes first, so drift on a shared machine hits both.
            let order = if (i + r) % 2 == 0 { [System::Floor, System::Agent] } else { [System::Agent, System::Floor] };
            for system in order {
                let run = convergence(&mut bench, system, n).await?;
                eprintln!(
                    "{:>5} {n:>5} objects: ready in {:.2}s, gone in {:.2}s (p50 {:.0} ms, p99 {:.0} ms){}",
                    system.name(),
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
    let restart = restart(&mut bench, args.restart_objects, 3).await?;
    bench.common.write(&Cluster {
        concurrency: CONCURRENCY,
        keys_per_object: KEYS,
        create_concurrency: kit::CREATE_CONCURRENCY,
        convergence: runs,
        restart,
    })
}

/// A resource snapshot: API request counts and CPU seconds.
struct Snapshot {
    requests: BTreeMap<String, u64>,
    cpu: Cpu,
    at: Instant,
}

async fn snapshot(bench: &Bench, system_pid: Option<u32>) -> anyhow::Result<Snapshot> {
    let cpu = Cpu {
        system: system_pid.map(cpu_seconds).unwrap_or_default(),
        apiserver: bench.common.cpu("kube-apiserver"),
        etcd: bench.common.cpu("etcd"),
        driver: cpu_seconds(std::process::id()),
        machine: machine_busy_seconds(),
        wall: 0.0,
    };
    Ok(Snapshot { requests: request_counts(&bench.client).await?, cpu, at: Instant::now() })
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
    let (a, b) = (after.cpu, before.cpu);
    let cpu = Cpu {
        system: a.system - b.system,
        apiserver: a.apiserver - b.apiserver,
        etcd: a.etcd - b.etcd,
        driver: a.driver - b.driver,
        machine: a.machine - b.machine,
        wall: (after.at - before.at).as_secs_f64(),
    };
    (requests, cpu)
}

/// What converges a run's objects.
enum Side {
    Agent(AgentProcess),
    Floor(StandIn),
}

impl Side {
    fn pid(&self) -> Option<u32> {
        match self {
            Side::Agent(agent) => agent.pid(),
            Side::Floor(floor) => Some(floor.pid()),
        }
    }
}

/// One create-then-delete run of `n` objects converged by `system`.
async fn convergence(bench: &mut Bench, system: System, n: usize) -> anyhow::Result<Convergence> {
    bench.run += 1;
    let ns = format!("bench-{}-{n}-{}", system.name(), bench.run);
    let node = format!("bench-node-{}-{n}-{}", system.name(), bench.run);
    ensure_namespace(&bench.client, &ns).await?;
    let (kubeconfig, logs) = (&bench.agent.kubeconfig, &bench.common.logs);
    let mut side = match system {
        System::Agent => Side::Agent(agent(kubeconfig, &node, logs).start().await),
        System::Floor => {
            let log = logs.join(format!("{node}.log"));
            Side::Floor(StandIn::spawn(kubeconfig, &node, true, usize::from(CONCURRENCY), &log)?)
        }
    };
    // Both sides have listed the node's (no) objects; give their watches a moment to be
    // established so start-up requests stay out of the measured phases.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let api: Api<PortAssignment> = Api::namespaced(bench.client.clone(), &ns);
    let mut observer = Observer::start(api.clone()).await?;
    let objects: Vec<(String, String)> = (0..n).map(|i| (format!("pa-{i}"), node.clone())).collect();

    let before = snapshot(bench, side.pid()).await?;
    let t0 = Instant::now();
    observer.create(&objects, KEYS).await?;
    let creates_answered_s = t0.elapsed().as_secs_f64();
    let all_ready = observer.ready(n, kit::limit(n)).await;
    let mid = snapshot(bench, side.pid()).await?;
    let t1 = Instant::now();
    api.delete_collection(&DeleteParams::default(), &ListParams::default()).await?;
    let all_gone = observer.gone(n, kit::limit(n)).await;
    let after = snapshot(bench, side.pid()).await?;
    let reconciles = match &mut side {
        Side::Agent(agent) => {
            let count = metric(agent, "portassign_reconciles_total", "").await.map(|c| c as u64);
            agent.terminate();
            count
        }
        Side::Floor(_) => None,
    };
    drop(side);
    let _ = Api::<Namespace>::all(bench.client.clone()).delete(&ns, &DeleteParams::default()).await;

    let seen = observer.seen.lock().expect("lock");
    let last = |times: &std::collections::HashMap<String, Instant>, from: Instant| {
        times.values().map(|t| t.saturating_duration_since(from).as_secs_f64()).fold(0.0, f64::max)
    };
    let latencies: Vec<f64> = seen
        .ready
        .iter()
        .filter_map(|(name, ready)| Some(ready.saturating_duration_since(*seen.created.get(name)?).as_secs_f64() * 1e3))
        .collect();
    let (create_requests, create_cpu) = delta(&before, &mid);
    let (delete_requests, delete_cpu) = delta(&mid, &after);
    let limit = kit::limit(n).as_secs_f64();
    Ok(Convergence {
        system,
        objects: n,
        create_s: if all_ready { last(&seen.ready, t0) } else { limit },
        creates_answered_s,
        delete_s: if all_gone { last(&seen.gone, t1) } else { limit },
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
    let spawned = Instant::now();
    let mut empty = agent(&bench.agent.kubeconfig, &format!("{node}-empty"), &bench.common.logs).start().await;
    out.empty_ready_s = spawned.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    out.empty_hwm_kib = proc_status_kib(empty.pid(), "VmHWM:");
    empty.terminate();
    for _ in 0..runs {
        // Floor: what the rebuild must at least do, a fresh client listing the node's
        // objects page by page, with the agent's credentials.
        let started = Instant::now();
        let api: Api<PortAssignment> = Api::all(bench.agent.client());
        let mut params = ListParams::default().fields(&node_selector(&node)).limit(500);
        let mut listed = 0;
        loop {
            let page = api.list(&params).await?;
            listed += page.items.len();
            match page.metadata.continue_ {
                Some(token) if !token.is_empty() => params = params.continue_token(&token),
                _ => break,
            }
        }
        let floor_s = started.elapsed().as_secs_f64();
        out.list_floor_s.push(floor_s);
        anyhow::ensure!(listed == objects, "listed {listed} objects, expected {objects}");

        let run = restart_once(bench, &node, objects).await?;
        eprintln!(
            "restart: ready in {:.3}s with {} ports (list floor {:.3}s), VmHWM {} KiB at ready, {} KiB settled",
            run.ready_s, run.ports_at_ready, floor_s, run.hwm_at_ready_kib, run.hwm_settled_kib
        );
        out.runs.push(run);
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
            let mut object = kit::object(&format!("pa-{i}"), node, KEYS);
            object.metadata.finalizers = Some(vec![FINALIZER.to_owned()]);
            async move {
                let created = api.create(&PostParams::default(), &object).await?;
                let ports =
                    created.spec.keys.iter().enumerate().map(|(k, key)| (key.clone(), (20000 + i * KEYS + k) as u16));
                let body = json!({
                    "apiVersion": PortAssignment::api_version(&()),
                    "kind": PortAssignment::kind(&()),
                    "status": ready_status(&created, ports.collect()),
                });
                let params = PatchParams::apply(FIELD_MANAGER).force();
                api.patch_status(&format!("pa-{i}"), &params, &Patch::Apply(body)).await?;
                Ok(())
            }
        })
        .buffer_unordered(kit::CREATE_CONCURRENCY)
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
    let process = agent(&bench.agent.kubeconfig, node, &bench.common.logs);
    // Spawned → first `/readyz` 200, polled every 2 ms.
    let spawned = Instant::now();
    let mut process = process.start().await;
    let ready_s = spawned.elapsed().as_secs_f64();
    let at_ready = Instant::now();
    let hwm_at_ready_kib = proc_status_kib(process.pid(), "VmHWM:");
    let ports_at_ready = metric(&process, "portassign_ports_assigned", "").await.unwrap_or(0.0) as u64;
    let before = request_counts(&bench.client).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(&process, "portassign_reconciles_total", "").await.unwrap_or(0.0) < objects as f64 {
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
