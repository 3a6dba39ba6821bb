//! Many agents on one API server, a relist storm, and back-pressure under refused writes,
//! against a real kube-apiserver + etcd (the control plane `make bench` starts).
//!
//! `cargo bench -p portassign-bench --bench scale -- --kubeconfig FILE --cp-dir DIR --logs DIR --out FILE
//! [--agents 1,10,50,100] [--objects 1000] [--failing 50,1000] [--failing-seconds 150]`
//!
//! - **scale**: for each M, M real `portassign agent` processes (release build, default
//!   flags), each its own node, under the chart's agent ServiceAccount; the same total of
//!   objects spread evenly over their nodes; time until the bench's watch sees every one
//!   Ready, then gone after one delete-collection; CPU of kube-apiserver, etcd and the
//!   agents from `/proc/<pid>/stat` over each phase.
//! - **relist storm**: with the most agents connected and their objects Ready, etcd and
//!   kube-apiserver are killed and restarted (`hack/control-plane.sh restart`); time until
//!   the API server answers and until every agent serves its node again (a new object on
//!   every node Ready), peak CPU and RSS of kube-apiserver, then `portassign check` over
//!   every agent.
//! - **persistent failure**: agents whose ServiceAccount may not patch
//!   `portassignments/status` (testkit `restricted`), default flags; the refused writes
//!   they count, sampled every 5 s; then the permission is granted back and the time
//!   until every object is Ready is taken.
//!
//! Run by `cargo test -p portassign-bench --benches` (no `--bench` argument) it does nothing.

#[path = "support/kit.rs"]
mod kit;
#[path = "support/results.rs"]
mod results;

use std::{
    process::{Command, ExitCode},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use futures::future::join_all;
use k8s_openapi::api::core::v1::Namespace;
use kit::{Common, FlowControl, Observer, agent, cpu_seconds, flow_control, loadavg, metric, proc_status_kib};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams},
};
use portassign::api::PortAssignment;
use portassign_testkit::{
    AgentProcess, Cluster, Identity, cluster::ensure_namespace, portassign_bin, restricted::Restricted,
};
use results::{FailureRun, FlowWindow, Scale, ScaleRun, Storm};

/// Keys per object in the scale runs (as in the cluster bench).
const KEYS: usize = 4;

#[derive(clap::Parser)]
struct Args {
    #[command(flatten)]
    common: Common,
    /// Numbers of agents, one run each; the relist storm runs with the most.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 10, 50, 100])]
    agents: Vec<usize>,
    /// Objects in every run, spread evenly over the agents' nodes.
    #[arg(long, default_value_t = 1000)]
    objects: usize,
    /// Objects per agent whose status writes are refused, one agent each (empty: none).
    #[arg(long, value_delimiter = ',', default_values_t = [50, 1000])]
    failing: Vec<usize>,
    /// How long the refused writes are counted (0: no failure runs).
    #[arg(long, default_value_t = 150)]
    failing_seconds: u64,
}

fn main() -> ExitCode {
    kit::main("scale", measure)
}

struct Bench {
    client: Client,
    cluster: Cluster,
    common: Common,
    run: u32,
}

async fn measure(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.common.cp_dir.as_ref().is_some_and(|d| d.is_dir()),
        "--cp-dir DIR (the control plane's directory) is required"
    );
    std::fs::create_dir_all(&args.common.logs)?;
    let cluster = Cluster::prepare(&args.common.kubeconfig, None).await.context("preparing the cluster")?;
    eprintln!("agent binary: {}; agents run as {}", portassign_bin().display(), cluster.agent.user);
    let mut bench =
        Bench { client: cluster.admin.client(), cluster, common: args.common, run: std::process::id() % 10000 };
    let mut report = Scale { objects: args.objects, keys: KEYS, load_before: loadavg(), ..Scale::default() };
    let most = args.agents.iter().copied().max().unwrap_or(1);
    for &m in &args.agents {
        let (run, storm) = scale_run(&mut bench, m, args.objects, m == most).await?;
        eprintln!(
            "scale: {m:>3} agents: started in {:.1}s, ready in {:.2}s, gone in {:.2}s, kube-apiserver {:.2} ms/object{}",
            run.start_s,
            run.create_s,
            run.delete_s,
            run.apiserver_cpu_create_s * 1e3 / run.objects.max(1) as f64,
            if run.completed { "" } else { " INCOMPLETE" }
        );
        report.runs.push(run);
        report.storm = report.storm.or(storm);
    }
    report.failure = persistent_failure(&mut bench, &args.failing, args.failing_seconds).await?;
    report.load_after = loadavg();
    bench.common.write(&report)
}

/// Starts agents for `nodes` as `identity`, concurrently; waits until all are ready.
async fn start_agents(bench: &Bench, identity: &Identity, nodes: &[String]) -> Vec<AgentProcess> {
    join_all(nodes.iter().map(|node| agent(&identity.kubeconfig, node, &bench.common.logs).start())).await
}

/// Samples kube-apiserver's peak CPU (cores over each 250 ms) and RSS (MiB) until
/// stopped; the pid is re-read each time, so a restarted API server is followed.
fn sample_apiserver(bench: &Bench) -> (Arc<Mutex<(f64, f64)>>, Arc<AtomicBool>) {
    let peaks = Arc::new(Mutex::new((0.0f64, 0.0f64)));
    let stop = Arc::new(AtomicBool::new(false));
    let cp_dir = bench.common.cp_dir.clone().unwrap_or_default();
    let (out, flag) = (peaks.clone(), stop.clone());
    tokio::spawn(async move {
        let mut last: Option<(u32, f64, Instant)> = None;
        while !flag.load(Ordering::SeqCst) {
            let pid =
                std::fs::read_to_string(cp_dir.join("kube-apiserver.pid")).ok().and_then(|p| p.trim().parse().ok());
            if let Some(p) = pid {
                let (cpu, now) = (cpu_seconds(p), Instant::now());
                let mut peaks = out.lock().expect("lock");
                if let Some((lp, lcpu, lt)) = last
                    && lp == p
                {
                    peaks.0 = peaks.0.max((cpu - lcpu) / (now - lt).as_secs_f64());
                }
                peaks.1 = peaks.1.max(proc_status_kib(Some(p), "VmRSS:") as f64 / 1024.0);
                last = Some((p, cpu, now));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    (peaks, stop)
}

/// Reads kube-apiserver's flow control every 250 ms until finished: the peaks of its
/// queue and of its executing requests, and its counters' first and last reading. A
/// read that fails (the server is down) is skipped, and the next one uses a new client.
struct FlowSampler {
    stop: Arc<AtomicBool>,
    started: Instant,
    task: tokio::task::JoinHandle<(Option<FlowControl>, Option<FlowControl>, FlowWindow)>,
}

impl FlowSampler {
    fn start(admin: Identity) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let (mut first, mut last, mut window) = (None, None, FlowWindow::default());
            let mut client = admin.client();
            while !flag.load(Ordering::SeqCst) {
                match flow_control(&client).await {
                    Ok(flow) => {
                        window.samples += 1;
                        window.peak_in_queue = window.peak_in_queue.max(flow.in_queue);
                        window.peak_executing = window.peak_executing.max(flow.executing);
                        first.get_or_insert_with(|| flow.clone());
                        last = Some(flow);
                    }
                    Err(_) => client = admin.client(),
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            (first, last, window)
        });
        FlowSampler { stop, started: Instant::now(), task }
    }

    /// Stops and sums up. `restarted`: the API server started within the window, so its
    /// counters count from zero and their last reading is the window's; otherwise the
    /// window's is the increase from the first reading to the last.
    async fn finish(self, restarted: bool) -> Option<FlowWindow> {
        self.stop.store(true, Ordering::SeqCst);
        let (first, last, mut window) = self.task.await.ok()?;
        let (first, last) = (if restarted { FlowControl::default() } else { first? }, last?);
        window.seconds = self.started.elapsed().as_secs_f64();
        window.answered_429 = last.answered_429 - first.answered_429;
        window.answered_429_by = last
            .answered_429_by
            .iter()
            .map(|(request, n)| (request.clone(), n - first.answered_429_by.get(request).copied().unwrap_or(0.0)))
            .filter(|(_, n)| *n > 0.0)
            .collect();
        window.rejected = last.rejected - first.rejected;
        Some(window)
    }
}

async fn scale_run(bench: &mut Bench, m: usize, n: usize, storm: bool) -> anyhow::Result<(ScaleRun, Option<Storm>)> {
    bench.run += 1;
    let ns = format!("scale-{m}-{}", bench.run);
    ensure_namespace(&bench.client, &ns).await?;
    let nodes: Vec<String> = (0..m).map(|i| format!("scale-{}-{m}-node-{i}", bench.run)).collect();
    let started = Instant::now();
    let mut agents = start_agents(bench, &bench.cluster.agent.clone(), &nodes).await;
    let start_s = started.elapsed().as_secs_f64();
    let (rss_peak, rss_stop) = sample_apiserver(bench);
    // Idle cost of M connected agents.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle0 = (bench.common.cpu("kube-apiserver"), Instant::now());
    tokio::time::sleep(Duration::from_secs(5)).await;
    let apiserver_idle_cores = (bench.common.cpu("kube-apiserver") - idle0.0) / idle0.1.elapsed().as_secs_f64();

    let api: Api<PortAssignment> = Api::namespaced(bench.client.clone(), &ns);
    let mut observer = Observer::start(api.clone()).await?;
    let objects: Vec<(String, String)> = (0..n).map(|i| (format!("pa-{i}"), nodes[i % m].clone())).collect();
    let agents_cpu = |agents: &[AgentProcess]| agents.iter().filter_map(|a| a.pid()).map(cpu_seconds).sum::<f64>();
    let (etcd0, agents0, api0) = (bench.common.cpu("etcd"), agents_cpu(&agents), bench.common.cpu("kube-apiserver"));
    let t0 = Instant::now();
    observer.create(&objects, KEYS).await?;
    let ready = observer.ready(n, kit::limit(n)).await;
    let create_s = t0.elapsed().as_secs_f64();
    let api1 = bench.common.cpu("kube-apiserver");

    let storm = if storm && ready { Some(relist_storm(bench, &agents, &ns, &nodes, n).await?) } else { None };

    let api2 = bench.common.cpu("kube-apiserver");
    let t1 = Instant::now();
    api.delete_collection(&DeleteParams::default(), &ListParams::default()).await?;
    let gone = observer.gone(n + storm.as_ref().map_or(0, |_| m), kit::limit(n)).await;
    let delete_s = t1.elapsed().as_secs_f64();
    let api3 = bench.common.cpu("kube-apiserver");
    let (etcd1, agents1) = (bench.common.cpu("etcd"), agents_cpu(&agents));
    rss_stop.store(true, Ordering::SeqCst);
    drop(observer);
    for agent in &mut agents {
        agent.kill();
    }
    let _ = Api::<Namespace>::all(bench.client.clone()).delete(&ns, &DeleteParams::default()).await;
    let run = ScaleRun {
        agents: m,
        objects: n,
        start_s,
        create_s,
        delete_s,
        completed: ready && gone,
        apiserver_cpu_create_s: api1 - api0,
        apiserver_cpu_delete_s: (api3 - api2).max(0.0),
        // After a storm the restarted processes' counters start again at zero.
        etcd_cpu_s: storm.is_none().then_some(etcd1 - etcd0),
        agents_cpu_s: agents1 - agents0,
        apiserver_idle_cores,
        apiserver_rss_mib: rss_peak.lock().expect("lock").1,
    };
    Ok((run, storm))
}

/// The quiet window before the relist storm's kill.
const FLOW_BEFORE_S: u64 = 10;

async fn relist_storm(
    bench: &mut Bench,
    agents: &[AgentProcess],
    ns: &str,
    nodes: &[String],
    objects: usize,
) -> anyhow::Result<Storm> {
    // A quiet window first, the agents connected and idle: the flow control's steady state.
    let before = FlowSampler::start(bench.cluster.admin.clone());
    tokio::time::sleep(Duration::from_secs(FLOW_BEFORE_S)).await;
    let flow_before = before.finish(false).await;
    let rss_before_mib = proc_status_kib(bench.common.pid("kube-apiserver"), "VmRSS:") as f64 / 1024.0;
    let (peaks, stop) = sample_apiserver(bench);
    let during = FlowSampler::start(bench.cluster.admin.clone());
    let killed = Instant::now();
    let cp_dir = bench.common.cp_dir.clone().unwrap_or_default();
    tokio::task::spawn_blocking(move || portassign_testkit::cluster::restart_control_plane(&cp_dir, "KILL")).await?;
    let api_back_s = killed.elapsed().as_secs_f64();
    let cpu0 = bench.common.cpu("kube-apiserver");
    // A fresh client: the old one's connections died with the server.
    bench.client = bench.cluster.admin.client();
    let api: Api<PortAssignment> = Api::namespaced(bench.client.clone(), ns);
    let probes: Vec<(String, String)> = nodes.iter().map(|node| (format!("after-{node}"), node.clone())).collect();
    let mut created = false;
    for _ in 0..100 {
        if kit::create(&api, &probes, 1).await.is_ok() {
            created = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    anyhow::ensure!(created, "could not create the probe objects after the restart");
    let probes_created_s = killed.elapsed().as_secs_f64();
    let deadline = killed + Duration::from_secs(180);
    let mut all_serving_s = f64::NAN;
    while Instant::now() < deadline {
        if let Ok(list) = api.list(&ListParams::default()).await {
            let ready = list.items.iter().filter(|o| o.name_any().starts_with("after-") && o.is_ready()).count();
            if ready == probes.len() {
                all_serving_s = killed.elapsed().as_secs_f64();
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let until = killed + Duration::from_secs(30) + Duration::from_secs_f64(api_back_s);
    tokio::time::sleep(until.saturating_duration_since(Instant::now())).await;
    stop.store(true, Ordering::SeqCst);
    let flow_storm = during.finish(true).await;
    let cpu_30s = bench.common.cpu("kube-apiserver") - cpu0;
    let (peak_cores, peak_rss_mib) = *peaks.lock().expect("lock");

    let mut check = Command::new(portassign_bin());
    check.arg("check").env("KUBECONFIG", bench.cluster.kubeconfig());
    for agent in agents {
        check.arg("--agent").arg(&agent.url);
    }
    let output = tokio::task::spawn_blocking(move || check.output()).await?.context("running portassign check")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    for line in stdout.lines().filter(|l| l.starts_with("VIOLATION")).take(20) {
        eprintln!("storm: {line}");
    }
    let storm = Storm {
        agents: agents.len(),
        objects,
        api_back_s,
        all_serving_s,
        probes_created_s,
        peak_cores,
        cpu_30s,
        peak_rss_mib,
        rss_before_mib,
        flow_before,
        flow_storm,
        check_exit: output.status.code().unwrap_or(-1),
        check_summary: stdout.lines().last().unwrap_or("no output").to_owned(),
    };
    eprintln!(
        "storm: API back in {:.1}s, probes created by {:.1}s, every agent serving in {:.1}s, kube-apiserver peak {:.2} cores / {:.0} MiB; {}",
        storm.api_back_s,
        storm.probes_created_s,
        storm.all_serving_s,
        storm.peak_cores,
        storm.peak_rss_mib,
        storm.check_summary
    );
    Ok(storm)
}

async fn persistent_failure(bench: &mut Bench, sizes: &[usize], seconds: u64) -> anyhow::Result<Vec<FailureRun>> {
    if sizes.is_empty() || seconds == 0 {
        return Ok(Vec::new());
    }
    bench.run += 1;
    let restricted = Restricted::new(&bench.cluster, "portassignments/status").await?;
    let ns = format!("failing-{}", bench.run);
    ensure_namespace(&bench.client, &ns).await?;
    let nodes: Vec<String> = sizes.iter().map(|n| format!("failing-{}-{n}", bench.run)).collect();
    let agents = start_agents(bench, &restricted.identity, &nodes).await;
    let api: Api<PortAssignment> = Api::namespaced(bench.client.clone(), &ns);
    let objects: Vec<(String, String)> = sizes
        .iter()
        .zip(&nodes)
        .flat_map(|(&n, node)| (0..n).map(move |i| (format!("{node}-{i}"), node.clone())))
        .collect();
    kit::create(&api, &objects, 1).await?;
    let t0 = Instant::now();
    let mut runs: Vec<FailureRun> =
        sizes.iter().map(|&n| FailureRun { objects: n, cap_s: 60.0, ..FailureRun::default() }).collect();
    while t0.elapsed() < Duration::from_secs(seconds) {
        for (run, agent) in runs.iter_mut().zip(&agents) {
            let refused = metric(agent, "portassign_write_failures_total", "kind=\"refused\"").await;
            run.samples.push((t0.elapsed().as_secs_f64(), refused.unwrap_or(f64::NAN)));
        }
        tokio::time::sleep(
            Duration::from_secs(5).saturating_sub(Duration::from_secs_f64(t0.elapsed().as_secs_f64() % 5.0)),
        )
        .await;
    }
    restricted.grant_back().await?;
    let granted = Instant::now();
    let deadline = granted + Duration::from_secs(180);
    let mut done = vec![false; sizes.len()];
    while done.iter().any(|d| !d) && Instant::now() < deadline {
        let list = api.list(&ListParams::default()).await?;
        for (i, node) in nodes.iter().enumerate() {
            if !done[i] && list.items.iter().filter(|o| &o.spec.node_name == node).all(|o| o.is_ready()) {
                done[i] = true;
                runs[i].recovery_s = granted.elapsed().as_secs_f64();
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (run, done) in runs.iter_mut().zip(&done) {
        if !done {
            run.recovery_s = f64::INFINITY;
        }
        eprintln!(
            "failing: {} objects: {:.1} refused/s in the first 10 s, {:.2}/s after the first minute; all Ready {:.1}s after the grant",
            run.objects,
            run.rate(0.0, 10.0),
            run.rate(60.0, run.end()),
            run.recovery_s
        );
    }
    drop(agents);
    restricted.remove().await;
    Ok(runs)
}
