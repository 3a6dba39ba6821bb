//! Latency of getting a port, against a real kube-apiserver + etcd.
//!
//! `cargo bench -p portassign-bench --bench acquire -- --kubeconfig FILE --out FILE --md FILE`
//! (what `make bench` runs) measures, one sample at a time on a warm pool:
//!
//! - **acquire**: `PortClient::acquire` of a new key against the real `portassign agent`
//!   binary (a process, as the chart's agent ServiceAccount): call → port returned.
//! - **plain key**: the same without the client: one server-side apply adding a key to
//!   the existing object, then a watch from the version it returned until the status
//!   shows the key's port, against the same agent.
//! - **floor**: that plain sequence against a *minimal responder* instead of the agent:
//!   this binary re-run as `acquire responder`, a separate process that watches its
//!   node's objects and, for each new generation, applies a status giving every key a
//!   port (no probe, no table, no events, no finalizer). One apply plus the watch event
//!   of a status written by the least a responder can do.
//!
//! The three alternate sample by sample, so the machine's noise falls on all of them.
//! After each sample the key is released and the pool settles (untimed). The section it
//! writes with `--md` is appended to docs/benchmarks.md by `hack/bench.sh`.
//!
//! Under `cargo test` (no `--bench`) it does nothing: it needs a control plane.

#[path = "support/results.rs"]
mod results;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::PathBuf,
    process::{Child, Command, ExitCode, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{Patch, PatchParams, WatchEvent, WatchParams},
    runtime::watcher::{self, Event},
};
use portassign::{
    api::{CONDITION_READY, PortAssignment, PortAssignmentStatus, PortEntry},
    client::{Pool, PortClient},
};
use portassign_testkit::{AgentProcess, cluster::ensure_namespace, portassign_bin};
use results::{median, percentile};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// Field manager of the responder's status writes.
const RESPONDER: &str = "portassign-bench-responder";
/// Field manager of the plain key writes.
const PLAIN: &str = "portassign-bench-plain";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the tokio runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = if args.first().map(String::as_str) == Some("responder") {
        runtime.block_on(responder(value("--node").unwrap_or_default()))
    } else if args.iter().any(|a| a == "--bench") {
        let samples = value("--samples").and_then(|n| n.parse().ok()).unwrap_or(200);
        runtime.block_on(measure(
            value("--kubeconfig").or_else(|| std::env::var("KUBECONFIG").ok()).map(PathBuf::from),
            samples,
            value("--out").map(PathBuf::from),
            value("--md").map(PathBuf::from),
        ))
    } else {
        println!("acquire benchmark: needs the control plane that `make bench` starts; nothing to do under cargo test");
        Ok(())
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("acquire benchmark failed: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The minimal responder: for every new generation of its node's objects, one status
/// apply giving each key a port (kept for keys that had one). Prints `ready` once its
/// watch has listed.
async fn responder(node: String) -> anyhow::Result<()> {
    let client = Client::try_default().await.context("responder: no client from KUBECONFIG")?;
    let api: Api<PortAssignment> = Api::all(client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut next_port: u16 = 20000;
    let mut events = std::pin::pin!(watcher::watcher(api, config));
    while let Some(event) = events.try_next().await? {
        let object = match event {
            Event::InitDone => {
                println!("ready");
                continue;
            }
            Event::Apply(object) | Event::InitApply(object) => object,
            Event::Init | Event::Delete(_) => continue,
        };
        let status = object.status.clone().unwrap_or_default();
        if status.observed_generation == object.metadata.generation {
            continue;
        }
        let held: BTreeMap<&str, u16> = status.ports.iter().map(|e| (e.key.as_str(), e.port)).collect();
        let mut ports = Vec::new();
        for key in &object.spec.keys {
            let port = held.get(key.as_str()).copied().unwrap_or_else(|| {
                next_port = next_port.wrapping_add(1).max(20000);
                next_port
            });
            ports.push(PortEntry { key: key.clone(), port });
        }
        let generation = object.metadata.generation;
        let status = PortAssignmentStatus {
            observed_generation: generation,
            key_count: ports.len() as u32,
            assigned_count: ports.len() as u32,
            conditions: vec![Condition {
                type_: CONDITION_READY.into(),
                status: "True".into(),
                reason: "Allocated".into(),
                message: format!("all {} keys have a port", ports.len()),
                observed_generation: generation,
                last_transition_time: Time(Timestamp::now()),
            }],
            ports,
            pod_conflicts: Vec::new(),
        };
        let body = json!({
            "apiVersion": PortAssignment::api_version(&()),
            "kind": PortAssignment::kind(&()),
            "status": status,
        });
        let api: Api<PortAssignment> = Api::namespaced(client.clone(), &object.namespace().unwrap_or_default());
        if let Err(error) =
            api.patch_status(&object.name_any(), &PatchParams::apply(RESPONDER).force(), &Patch::Apply(body)).await
        {
            eprintln!("responder: {}: {error}", object.name_any());
        }
    }
    Ok(())
}

/// A child process stopped when dropped.
struct Responder(Child);

impl Drop for Responder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Latencies of one way of getting a port, in milliseconds.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Series {
    samples_ms: Vec<f64>,
}

impl Series {
    fn p50(&self) -> f64 {
        median(&self.samples_ms)
    }
    fn p99(&self) -> f64 {
        percentile(&self.samples_ms, 0.99)
    }
}

/// What the run measured.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Results {
    acquire: Series,
    plain: Series,
    floor: Series,
}

/// Adds `key` with one server-side apply and waits on a watch until the status shows its
/// port: the plain sequence, and the floor's. Returns the port.
async fn plain_key(api: &Api<PortAssignment>, pool: &str, key: &str) -> anyhow::Result<u16> {
    let body = json!({
        "apiVersion": PortAssignment::api_version(&()),
        "kind": PortAssignment::kind(&()),
        "metadata": { "name": pool },
        "spec": { "keys": [key] },
    });
    let written = api.patch(pool, &PatchParams::apply(&format!("{PLAIN}/{key}")), &Patch::Apply(body)).await?;
    let generation = written.metadata.generation;
    let shows = |o: &PortAssignment| {
        let status = o.status.as_ref()?;
        (status.observed_generation >= generation).then_some(())?;
        status.ports.iter().find(|e| e.key == key).map(|e| e.port)
    };
    if let Some(port) = shows(&written) {
        return Ok(port);
    }
    let params = WatchParams::default().fields(&format!("metadata.name={pool}")).timeout(60);
    let mut stream = api.watch(&params, &written.resource_version().unwrap_or_default()).await?.boxed();
    while let Some(event) = stream.try_next().await? {
        if let WatchEvent::Added(o) | WatchEvent::Modified(o) = event
            && let Some(port) = shows(&o)
        {
            return Ok(port);
        }
    }
    Err(anyhow!("the watch ended before {key} got a port"))
}

/// Removes `key` (whichever way it was added) and waits until the pool's status no
/// longer shows it: untimed, so each sample starts from a settled pool.
async fn settle(api: &Api<PortAssignment>, ports: &PortClient, pool: &str, key: &str) -> anyhow::Result<()> {
    ports.release(pool, key).await?;
    let body = json!({ "apiVersion": PortAssignment::api_version(&()), "kind": PortAssignment::kind(&()), "metadata": { "name": pool } });
    api.patch(pool, &PatchParams::apply(&format!("{PLAIN}/{key}")), &Patch::Apply(body)).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let o = api.get(pool).await?;
        let status = o.status.unwrap_or_default();
        if status.observed_generation == o.metadata.generation && !status.ports.iter().any(|e| e.key == key) {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "{pool} did not settle after releasing {key}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn measure(
    kubeconfig: Option<PathBuf>,
    samples: usize,
    out: Option<PathBuf>,
    md: Option<PathBuf>,
) -> anyhow::Result<()> {
    let kubeconfig = kubeconfig.ok_or_else(|| anyhow!("no kubeconfig: pass --kubeconfig FILE or set KUBECONFIG"))?;
    let cluster = portassign_testkit::Cluster::prepare(&kubeconfig, None).await.context("preparing the cluster")?;
    let admin = cluster.admin.client();
    let run = std::process::id() % 10000;
    let ns = format!("bench-acquire-{run}");
    ensure_namespace(&admin, &ns).await?;
    let agent_node = format!("acquire-agent-{run}");
    let floor_node = format!("acquire-floor-{run}");
    eprintln!("agent binary: {}; agent and responder run as {}", portassign_bin().display(), cluster.agent.user);

    let logs = std::env::temp_dir().join(format!("portassign-bench-acquire-{run}"));
    std::fs::create_dir_all(&logs)?;
    let _agent = AgentProcess::new(&cluster.agent.kubeconfig, &agent_node).log_to(logs.join("agent.log")).start().await;
    let mut child = Command::new(std::env::current_exe()?)
        .args(["responder", "--node", &floor_node])
        .env("KUBECONFIG", &cluster.agent.kubeconfig)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(logs.join("responder.log"))?)
        .spawn()
        .context("spawning the responder")?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout pipe"))?;
    let _responder = Responder(child);
    let (ready, wait) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            let _ = ready.send(line.unwrap_or_default());
        }
    });
    wait.recv_timeout(Duration::from_secs(30)).context("the responder did not become ready within 30s")?;

    // The measuring client: the admin's (a launcher's credentials change nothing here).
    let ports = PortClient::new(admin.clone(), &ns);
    let api: Api<PortAssignment> = Api::namespaced(admin, &ns);
    let agent_pool = Pool::on_node(&agent_node);
    let floor_pool = Pool::on_node(&floor_node);
    // Warm: both pools exist with a standing key, the agent's finalizer is on.
    ports.acquire(&agent_pool, "standing").await?;
    ports.acquire(&floor_pool, "standing").await?;
    for i in 0..10 {
        let key = format!("warm-{i}");
        ports.acquire(&agent_pool, &key).await?;
        settle(&api, &ports, &agent_pool.name, &key).await?;
        plain_key(&api, &floor_pool.name, &key).await?;
        settle(&api, &ports, &floor_pool.name, &key).await?;
    }

    let mut results = Results::default();
    for i in 0..samples {
        let key = format!("sample-{i}");
        let t = Instant::now();
        ports.acquire(&agent_pool, &key).await?;
        results.acquire.samples_ms.push(t.elapsed().as_secs_f64() * 1e3);
        settle(&api, &ports, &agent_pool.name, &key).await?;

        let t = Instant::now();
        plain_key(&api, &agent_pool.name, &key).await?;
        results.plain.samples_ms.push(t.elapsed().as_secs_f64() * 1e3);
        settle(&api, &ports, &agent_pool.name, &key).await?;

        let t = Instant::now();
        plain_key(&api, &floor_pool.name, &key).await?;
        results.floor.samples_ms.push(t.elapsed().as_secs_f64() * 1e3);
        settle(&api, &ports, &floor_pool.name, &key).await?;
    }
    eprintln!(
        "acquire p50 {:.1} ms p99 {:.1} ms; plain key p50 {:.1} ms p99 {:.1} ms; floor p50 {:.1} ms p99 {:.1} ms",
        results.acquire.p50(),
        results.acquire.p99(),
        results.plain.p50(),
        results.plain.p99(),
        results.floor.p50(),
        results.floor.p99()
    );
    if let Some(out) = out {
        results::write(&out, &results)?;
    }
    if let Some(md) = md {
        std::fs::write(&md, section(&results, samples))?;
    }
    Ok(())
}

/// The "Getting a port" section of docs/benchmarks.md.
fn section(r: &Results, samples: usize) -> String {
    let mut md = String::new();
    let floor = r.floor.p50();
    let _ = writeln!(md, "\n## 5. Getting a port: acquire latency\n");
    let _ = writeln!(
        md,
        "One key at a time on a warm pool (the pool exists, the agent's finalizer is on, a standing key holds a \
         port), {samples} samples of each, alternating. **Acquire**: `PortClient::acquire` of a new key against \
         the real `portassign agent` binary (release build, as the chart's agent ServiceAccount): call → port \
         returned. **Plain key**: one server-side apply adding a key to the existing object, then a watch from \
         the version it returned until the status shows the key's port, same agent. **Floor**: the plain \
         sequence against a minimal responder (a separate process that applies a status giving every key a \
         port for each new generation: no probe, no table, no events). After each sample the key is released \
         and the pool settles, untimed. `cargo bench -p portassign-bench --bench acquire` (`bench/benches/acquire.rs`).\n"
    );
    let _ =
        writeln!(md, "| what | p50 | p99 | p50 ÷ floor p50 | target (p50 ≤ 1.3× floor) |\n|---|---:|---:|---:|---|");
    for (what, s) in [("acquire (client API, agent)", &r.acquire), ("plain key → port visible (agent)", &r.plain)] {
        let ratio = s.p50() / floor;
        let _ = writeln!(
            md,
            "| {what} | {:.1} ms | {:.1} ms | **{ratio:.2}×** | {} |",
            s.p50(),
            s.p99(),
            if ratio <= 1.3 { "met" } else { "**not met**" }
        );
    }
    let _ = writeln!(
        md,
        "| floor (apply + watch, minimal responder) | {:.1} ms | {:.1} ms | 1.00× | |",
        floor,
        r.floor.p99()
    );
    md
}
