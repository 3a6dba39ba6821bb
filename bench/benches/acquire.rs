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
//!   the testkit's stand-in controller without finalizers (`portassign_testkit::standin`,
//!   this binary re-run as `acquire standin`), a separate process that applies, for each
//!   new generation of its node's objects, a status giving every key a port (no probe,
//!   no table, no events). One apply plus the watch event of a status written by the
//!   least a responder can do.
//!
//! The three alternate sample by sample, so the machine's noise falls on all of them.
//! After each sample the key is released and the pool settles (untimed). `report`
//! renders the JSON it writes.
//!
//! Under `cargo test` (no `--bench`) it does nothing: it needs a control plane.

#[path = "support/kit.rs"]
mod kit;
#[path = "support/results.rs"]
mod results;

use std::{
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow};
use futures::{StreamExt, TryStreamExt};
use kit::Common;
use kube::{
    Api, Resource, ResourceExt,
    api::{Patch, PatchParams, WatchEvent, WatchParams},
};
use portassign::{
    api::PortAssignment,
    client::{Pool, PortClient},
};
use portassign_testkit::{AgentProcess, cluster::ensure_namespace, portassign_bin, standin::StandIn};
use results::Acquire;
use serde_json::json;

/// Field manager of the plain key writes.
const PLAIN: &str = "portassign-bench-plain";

/// `cargo bench -p portassign-bench --bench acquire -- --kubeconfig FILE --out FILE`.
#[derive(clap::Parser)]
struct Args {
    #[command(flatten)]
    common: Common,
    /// Samples of each way of getting a port.
    #[arg(long, default_value_t = 200)]
    samples: usize,
}

fn main() -> ExitCode {
    kit::main("acquire", measure)
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

async fn measure(args: Args) -> anyhow::Result<()> {
    let cluster =
        portassign_testkit::Cluster::prepare(&args.common.kubeconfig, None).await.context("preparing the cluster")?;
    let admin = cluster.admin.client();
    let run = std::process::id() % 10000;
    let ns = format!("bench-acquire-{run}");
    ensure_namespace(&admin, &ns).await?;
    let (agent_node, floor_node) = (format!("acquire-agent-{run}"), format!("acquire-floor-{run}"));
    eprintln!("agent binary: {}; agent and responder run as {}", portassign_bin().display(), cluster.agent.user);
    let logs = &args.common.logs;
    std::fs::create_dir_all(logs)?;
    let _agent =
        AgentProcess::new(&cluster.agent.kubeconfig, &agent_node).log_to(logs.join("acquire-agent.log")).start().await;
    let _responder =
        StandIn::spawn(&cluster.agent.kubeconfig, &floor_node, false, 1, &logs.join("acquire-responder.log"))?;

    // The measuring client: the admin's (a launcher's credentials change nothing here).
    let ports = PortClient::new(admin.clone(), &ns);
    let api: Api<PortAssignment> = Api::namespaced(admin, &ns);
    let (agent_pool, floor_pool) = (Pool::on_node(&agent_node), Pool::on_node(&floor_node));
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

    let mut results = Acquire { samples: args.samples, ..Acquire::default() };
    for i in 0..args.samples {
        let key = format!("sample-{i}");
        let t = Instant::now();
        ports.acquire(&agent_pool, &key).await?;
        results.acquire.push(t.elapsed().as_secs_f64() * 1e3);
        settle(&api, &ports, &agent_pool.name, &key).await?;
        for (pool, series) in [(&agent_pool, &mut results.plain), (&floor_pool, &mut results.floor)] {
            let t = Instant::now();
            plain_key(&api, &pool.name, &key).await?;
            series.push(t.elapsed().as_secs_f64() * 1e3);
            settle(&api, &ports, &pool.name, &key).await?;
        }
    }
    let p = |s: &[f64]| (results::median(s), results::percentile(s, 0.99));
    for (what, s) in [("acquire", &results.acquire), ("plain key", &results.plain), ("floor", &results.floor)] {
        eprintln!("{what}: p50 {:.1} ms, p99 {:.1} ms", p(s).0, p(s).1);
    }
    args.common.write(&results)
}
