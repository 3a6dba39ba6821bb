//! Watch fan-out: what one change of a PortAssignment costs kube-apiserver when M
//! watches are open, isolated from the agents' own work (one light process holds every
//! watch; the only event it handles per write is the one its node-0 watch receives).
//!
//! `cargo bench -p portassign-bench --bench fanout -- --kubeconfig FILE --cp-dir DIR --out FILE
//! [--watchers 1,10,100,1000,3000] [--rate 20] [--seconds 10]`
//!
//! For each M and each way of watching, M watches are opened (one HTTP connection each,
//! as M agents have), then:
//! - **idle**: kube-apiserver's CPU over `seconds` with no write (the median of 5 windows);
//! - **writes**: one object of node 0 patched `rate` times a second for `seconds`; the
//!   watch of node 0 times each event from the moment its patch was sent; kube-apiserver's
//!   CPU over the writes, less the idle rate, divided by the writes: the median of 5
//!   windows, each costed alone.
//!
//! The ways of watching:
//! - `field`: every watch across all namespaces with the agents' field selector
//!   `spec.nodeName=<node>` (what each agent opens). kube-apiserver's watch cache has no
//!   index for a custom resource's selectable fields, so each change is handed to every
//!   such watch, whose own goroutine then evaluates the selector.
//! - `namespace`: each watch scoped to one namespace of its own, no selector. The watch
//!   cache files namespace-scoped watches by namespace, so a change reaches only the
//!   watches of its namespace.
//!
//! Run by `cargo test -p portassign-bench --benches` (no `--bench` argument) it does nothing.

#[path = "support/kit.rs"]
mod kit;
#[path = "support/results.rs"]
mod results;

use std::{
    collections::HashMap,
    process::ExitCode,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::api::core::v1::Namespace;
use kit::Common;
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams},
};
use portassign::api::PortAssignment;
use portassign_testkit::{Cluster, cluster::ensure_namespace};
use results::{Fanout, FanoutRun, median, percentile};
use tokio::task::JoinHandle;

#[derive(clap::Parser)]
struct Args {
    #[command(flatten)]
    common: Common,
    /// Numbers of open watches, one run each (and each way of watching).
    #[arg(long, value_delimiter = ',', default_values_t = [1, 10, 100, 1000, 3000])]
    watchers: Vec<usize>,
    /// Writes per second to the object of node 0.
    #[arg(long, default_value_t = 20)]
    rate: u32,
    /// Seconds of writes (and of idle before them) in each run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
}

fn main() -> ExitCode {
    kit::main("fanout", measure)
}

/// The label each write sets; the watch of node 0 reads it back to time the event.
const SEQ: &str = "bench.portassign.io/seq";
/// Watches opened at once (each is a TLS connection and an APF-admitted request).
const OPEN_CONCURRENCY: usize = 64;
/// Windows the writes of a run are costed in (the run's figure is their median).
const WINDOWS: u64 = 5;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Scheme {
    Field,
    Namespace,
}

impl Scheme {
    fn name(self) -> &'static str {
        match self {
            Scheme::Field => "field",
            Scheme::Namespace => "namespace",
        }
    }
}

struct Bench {
    common: Common,
    cluster: Cluster,
    prefix: String,
}

async fn measure(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.common.cp_dir.as_ref().is_some_and(|d| d.is_dir()),
        "--cp-dir DIR (the control plane's directory) is required"
    );
    let cluster = Cluster::prepare(&args.common.kubeconfig, None).await.context("preparing the cluster")?;
    let client = cluster.admin.client();
    let prefix = format!("fanout-{}", std::process::id() % 10000);
    // The object every run writes: in the first namespace, on the first node.
    let ns0 = format!("{prefix}-0");
    ensure_namespace(&client, &ns0).await?;
    let target = kit::object("target", &node(&prefix, 0), 1);
    Api::<PortAssignment>::namespaced(client.clone(), &ns0).create(&PostParams::default(), &target).await?;
    let bench = Bench { common: args.common, cluster, prefix };
    let mut report = Fanout { rate: args.rate, seconds: args.seconds, runs: Vec::new() };
    for &m in &args.watchers {
        for scheme in [Scheme::Field, Scheme::Namespace] {
            let run = fanout_run(&bench, scheme, m, args.rate, args.seconds).await?;
            eprintln!(
                "fanout: {:>9} M = {m:>5}: opened in {:.1}s, idle {:.3} cores, {:.3} ms CPU per write, event p50 {:.1} ms p99 {:.1} ms ({} of {} events)",
                run.scheme,
                run.open_s,
                run.idle_cores,
                run.cpu_per_write_ms,
                run.latency_p50_ms,
                run.latency_p99_ms,
                run.events,
                run.writes
            );
            report.runs.push(run);
        }
    }
    let _ = Api::<Namespace>::all(client).delete(&ns0, &DeleteParams::default()).await;
    bench.common.write(&report)
}

fn node(prefix: &str, i: usize) -> String {
    format!("{prefix}-node-{i}")
}

/// Opens watch `i` of `scheme`; events of node 0's watch go to `seen` as (seq, when).
async fn open(
    bench: &Bench,
    client: Client,
    scheme: Scheme,
    i: usize,
    seen: Arc<Mutex<HashMap<u64, Instant>>>,
) -> anyhow::Result<JoinHandle<()>> {
    let (api, params) = match scheme {
        Scheme::Field => (
            Api::<PortAssignment>::all(client),
            WatchParams::default().fields(&format!("spec.nodeName={}", node(&bench.prefix, i))),
        ),
        Scheme::Namespace => {
            (Api::<PortAssignment>::namespaced(client, &format!("{}-{i}", bench.prefix)), WatchParams::default())
        }
    };
    // The call returns once kube-apiserver has answered with the stream's headers: the
    // watch is registered in its watch cache by then.
    let events = api.watch(&params.timeout(290), "0").await.with_context(|| format!("opening watch {i}"))?;
    Ok(tokio::spawn(async move {
        let mut events = std::pin::pin!(events);
        while let Ok(Some(event)) = events.try_next().await {
            if let WatchEvent::Modified(object) = event {
                let seq = object.metadata.labels.as_ref().and_then(|l| l.get(SEQ)).and_then(|s| s.parse().ok());
                if let Some(seq) = seq {
                    seen.lock().expect("lock").insert(seq, Instant::now());
                }
            }
        }
    }))
}

async fn fanout_run(bench: &Bench, scheme: Scheme, m: usize, rate: u32, seconds: u64) -> anyhow::Result<FanoutRun> {
    let seen = Arc::new(Mutex::new(HashMap::new()));
    let opened = Instant::now();
    // One client per watch, as each agent has its own connection, with the agents'
    // credentials (the chart's ServiceAccount).
    let watches: Vec<JoinHandle<()>> = stream::iter(0..m)
        .map(|i| {
            let seen = seen.clone();
            async move {
                let client = bench.cluster.agent.client();
                let mut last = None;
                for _ in 0..20 {
                    match open(bench, client.clone(), scheme, i, seen.clone()).await {
                        Ok(handle) => return Ok(handle),
                        // 429 from priority and fairness while many open at once: again.
                        Err(error) => last = Some(error),
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(last.expect("an error"))
            }
        })
        .buffer_unordered(OPEN_CONCURRENCY)
        .try_collect()
        .await?;
    let open_s = opened.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Its threads' run time: a window's few dozen writes cost tens of milliseconds, which
    // `/proc/<pid>/stat`'s 10 ms ticks would round to a quarter of a millisecond per write.
    let cpu = || bench.common.thread_cpu("kube-apiserver");
    // The idle rate, like the writes, is the median of windows: a burst of the API
    // server's own in one of them must not be subtracted from every write.
    let mut idle = Vec::new();
    for _ in 0..WINDOWS {
        let (idle0, t0) = (cpu(), Instant::now());
        tokio::time::sleep(Duration::from_secs(seconds) / WINDOWS as u32).await;
        idle.push((cpu() - idle0) / t0.elapsed().as_secs_f64());
    }
    let idle_cores = median(&idle);

    let writer = bench.cluster.admin.client();
    let api: Api<PortAssignment> = Api::namespaced(writer, &format!("{}-0", bench.prefix));
    let writes = u64::from(rate) * seconds;
    let base = rand_base();
    let mut sent = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
    // The writes in WINDOWS windows, each costed alone: a burst of the API server's own
    // (a compaction, a garbage collection) lands in one window, and the median leaves it out.
    let per_window = (writes / WINDOWS).max(1);
    let mut windows_ms = Vec::new();
    let mut n = 0;
    while n < writes {
        let (cpu0, t1) = (cpu(), Instant::now());
        let end = (n + per_window).min(writes);
        for i in n..end {
            tick.tick().await;
            let seq = base + i;
            let patch = serde_json::json!({ "metadata": { "labels": { SEQ: seq.to_string() } } });
            sent.insert(seq, Instant::now());
            api.patch("target", &PatchParams::default(), &Patch::Merge(patch)).await.context("writing")?;
        }
        let spent = cpu() - cpu0 - idle_cores * t1.elapsed().as_secs_f64();
        windows_ms.push(spent.max(0.0) * 1e3 / (end - n) as f64);
        n = end;
    }
    // The last events' dispatch.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cpu_per_write_ms = median(&windows_ms);

    let seen = seen.lock().expect("lock").clone();
    let latencies: Vec<f64> = sent
        .iter()
        .filter_map(|(seq, at)| seen.get(seq).map(|got| got.saturating_duration_since(*at).as_secs_f64() * 1e3))
        .collect();
    for watch in &watches {
        watch.abort();
    }
    Ok(FanoutRun {
        scheme: scheme.name().into(),
        watchers: m,
        writes,
        events: latencies.len() as u64,
        open_s,
        idle_cores,
        cpu_per_write_ms,
        cpu_per_write_windows_ms: windows_ms,
        latency_p50_ms: percentile(&latencies, 0.50),
        latency_p99_ms: percentile(&latencies, 0.99),
    })
}

/// A base for this run's sequence numbers, so that events of an earlier run's writes
/// (which a watch opened from "0" may replay) never match.
fn rand_base() -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    (nanos as u64 % 1_000_000_000) * 1_000_000
}
