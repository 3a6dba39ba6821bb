//! Turns the JSON of `allocator`, `cluster`, `scale` and `acquire` into
//! `docs/benchmarks.md` and its plots (`convergence.svg`, `scale.svg`, next to it).
//! Every ratio and every target verdict is computed here from the measured numbers.
//!
//! `cargo bench -p portassign-bench --bench report -- --allocator FILE --cluster FILE --scale FILE
//! --acquire FILE --commands FILE --md docs/benchmarks.md`. Under `cargo test` (no `--bench`)
//! it does nothing.

#[path = "support/results.rs"]
mod results;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Context as _;
use clap::Parser;
use plotters::prelude::*;
use results::{
    Acquire, Allocator, Cluster, Convergence, Cpu, Fanout, FanoutRun, OLD_FIXED_RETRY_S, Scale, ScaleRun, System,
    median, percentile,
};

#[derive(Parser)]
struct Args {
    /// `allocator`'s JSON.
    #[arg(long)]
    allocator: PathBuf,
    /// `cluster`'s JSON.
    #[arg(long)]
    cluster: PathBuf,
    /// `scale`'s JSON.
    #[arg(long)]
    scale: PathBuf,
    /// `acquire`'s JSON.
    #[arg(long)]
    acquire: PathBuf,
    /// `fanout`'s JSON (its section says it was not run without it).
    #[arg(long)]
    fanout: Option<PathBuf>,
    /// The commands `hack/bench.sh` ran, with their times.
    #[arg(long)]
    commands: PathBuf,
    /// The report to write; its plots go next to it.
    #[arg(long)]
    md: PathBuf,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> ExitCode {
    if !std::env::args().any(|a| a == "--bench") {
        println!("benchmark report: run by `make bench`; nothing to do under cargo test");
        return ExitCode::SUCCESS;
    }
    match report(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("benchmark report failed: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The measured runs, read.
struct Runs {
    allocator: Allocator,
    cluster: Cluster,
    scale: Scale,
    acquire: Acquire,
    fanout: Option<Fanout>,
}

fn report(args: Args) -> anyhow::Result<()> {
    let runs = Runs {
        allocator: results::read(&args.allocator)?,
        cluster: results::read(&args.cluster)?,
        scale: results::read(&args.scale)?,
        acquire: results::read(&args.acquire)?,
        fanout: args.fanout.as_deref().map(results::read).transpose()?,
    };
    let commands =
        std::fs::read_to_string(&args.commands).with_context(|| format!("reading {}", args.commands.display()))?;
    let dir = args.md.parent().unwrap_or(Path::new("."));
    plot(&dir.join("convergence.svg"), convergence_panels(&runs.cluster))?;
    plot(&dir.join("scale.svg"), scale_panels(&runs.scale))?;
    std::fs::write(&args.md, markdown(&runs, &commands))?;
    println!("wrote {} and its plots", args.md.display());
    Ok(())
}

// ----------------------------------------------------------------------------------
// Derived figures.
// ----------------------------------------------------------------------------------

/// Per-size allocator figures.
struct AllocatorRow {
    n: usize,
    project_ops: f64,
    seed_ops: f64,
    project_us: f64,
    floor_us: f64,
    seed_us: f64,
    project_tail_us: f64,
    seed_tail_us: f64,
    project_lost: usize,
    seed_lost: usize,
    seed_file_kib: f64,
}

fn allocator_rows(a: &Allocator) -> Vec<AllocatorRow> {
    a.sizes
        .iter()
        .map(|s| {
            let n = s.n as f64;
            let tail = (s.n / 10).max(1) as f64;
            let project = median(&s.project_runs_s);
            let seed = median(&s.seed_runs_s);
            AllocatorRow {
                n: s.n,
                project_ops: n / project,
                seed_ops: n / seed,
                project_us: project / n * 1e6,
                floor_us: median(&s.floor_runs_s) / n * 1e6,
                seed_us: seed / n * 1e6,
                project_tail_us: median(&s.project_tail_s) / tail * 1e6,
                seed_tail_us: median(&s.seed_tail_s) / tail * 1e6,
                project_lost: s.project_lost.iter().copied().max().unwrap_or(0),
                seed_lost: median(&s.seed_lost.iter().map(|&l| l as f64).collect::<Vec<_>>()) as usize,
                seed_file_kib: s.seed_file_bytes as f64 / 1024.0,
            }
        })
        .collect()
}

/// Median figures of one system at one size.
#[derive(Clone, Copy, Default)]
struct Point {
    create: f64,
    delete: f64,
    p50: f64,
    p99: f64,
    runs: usize,
    completed: bool,
}

fn points(c: &Cluster, system: System) -> BTreeMap<usize, Point> {
    let mut by_size: BTreeMap<usize, Vec<&Convergence>> = BTreeMap::new();
    for run in c.convergence.iter().filter(|r| r.system == system) {
        by_size.entry(run.objects).or_default().push(run);
    }
    by_size
        .into_iter()
        .map(|(n, runs)| {
            let m = |f: fn(&Convergence) -> f64| median(&runs.iter().map(|r| f(r)).collect::<Vec<_>>());
            let point = Point {
                create: m(|r| r.create_s),
                delete: m(|r| r.delete_s),
                p50: m(|r| r.latency_ms.p50),
                p99: m(|r| r.latency_ms.p99),
                runs: runs.len(),
                completed: runs.iter().all(|r| r.completed),
            };
            (n, point)
        })
        .collect()
}

/// A target line: what is asked, what was measured, whether it is met.
type Target = (String, String, bool);

fn targets(runs: &Runs) -> Vec<Target> {
    let (a, c) = (&runs.allocator, &runs.cluster);
    let mut out = Vec::new();
    let rows = allocator_rows(a);
    let small = rows.iter().find(|r| r.n == 1000).or(rows.first());
    let large = rows.iter().find(|r| r.n == 10000).or(rows.last());
    if let (Some(small), Some(large)) = (small, large) {
        let speedup = large.project_ops / large.seed_ops;
        out.push((
            format!("Allocator at {}: at least 100× the seed baseline's rate", thousands(large.n)),
            format!("{speedup:.0}×"),
            speedup >= 100.0,
        ));
        let flat = large.project_us / small.project_us;
        out.push((
            format!("Allocator per-op cost flat from {} to {} (within 1.5×)", thousands(small.n), thousands(large.n)),
            format!("{flat:.2}×"),
            flat <= 1.5,
        ));
        let floor = large.project_us / large.floor_us;
        out.push((
            format!("Allocator at {} within 2× of the probe-syscall floor", thousands(large.n)),
            format!("{floor:.2}×"),
            floor <= 2.0,
        ));
        let lost: usize = rows.iter().map(|r| r.project_lost).sum();
        out.push(("Allocator loses no key (every run, every size)".into(), format!("{lost} lost"), lost == 0));
    }
    let agent = points(c, System::Agent);
    let floor = points(c, System::Floor);
    if let (Some((&n, a_pt)), Some(f_pt)) = (agent.iter().next_back(), floor.iter().next_back().map(|(_, p)| p)) {
        for (phase, a_s, f_s) in [("create", a_pt.create, f_pt.create), ("delete", a_pt.delete, f_pt.delete)] {
            let ratio = a_s / f_s;
            out.push((
                format!(
                    "Convergence at N = {}, K = {}: {phase} at most 1.3× the write floor",
                    thousands(n),
                    c.keys_per_object
                ),
                format!("{ratio:.2}× ({a_s:.2} s vs {f_s:.2} s)"),
                ratio <= 1.3 && a_pt.completed && f_pt.completed,
            ));
        }
    }
    let r = &c.restart;
    if !r.runs.is_empty() {
        let ready = median(&r.runs.iter().map(|x| x.ready_s).collect::<Vec<_>>());
        let all_ports = r.runs.iter().all(|x| x.ports_at_ready as usize == r.ports);
        out.push((
            format!("Restart to ready with {} ports: under 2 s", thousands(r.ports)),
            format!("{ready:.2} s"),
            ready < 2.0 && all_ports,
        ));
        let peak = r.runs.iter().map(|x| x.hwm_settled_kib.max(x.hwm_at_ready_kib)).max().unwrap_or(0) as f64 / 1024.0;
        out.push((
            format!("Peak RSS with {} ports: under 64 MiB", thousands(r.ports)),
            format!("{peak:.1} MiB"),
            peak < 64.0,
        ));
    }
    out.extend(scale_targets(&runs.scale));
    if let Some(f) = &runs.fanout {
        // The API server's own cost of more agents, without M agent processes on the cores.
        let field = |m: usize| f.runs.iter().find(|r| r.scheme == "field" && r.watchers == m);
        let most = f.runs.iter().filter(|r| r.watchers <= 100).map(|r| r.watchers).max().unwrap_or(1);
        if let (Some(one), Some(many)) = (field(1), field(most)) {
            let ratio = many.cpu_per_write_ms / one.cpu_per_write_ms;
            out.push((
                format!(
                    "Watch fan-out, the agents' selector: API-server CPU per write flat from 1 to {most} watches (≤ 1.2×)"
                ),
                format!("{ratio:.2}× ({:.2} vs {:.2} ms/write)", many.cpu_per_write_ms, one.cpu_per_write_ms),
                ratio <= 1.2,
            ));
        }
    }
    let q = &runs.acquire;
    for (what, series) in [("Acquire (client API)", &q.acquire), ("A plain key added → its port visible", &q.plain)] {
        let ratio = median(series) / median(&q.floor);
        let measured = format!("{ratio:.2}× ({:.1} ms vs {:.1} ms)", median(series), median(&q.floor));
        out.push((format!("{what}: p50 at most 1.3× the minimal responder's"), measured, ratio <= 1.3));
    }
    out
}

// ----------------------------------------------------------------------------------
// Markdown.
// ----------------------------------------------------------------------------------

fn markdown(runs: &Runs, commands: &str) -> String {
    let mut md = String::new();
    let now = k8s_openapi::jiff::Timestamp::now().round(k8s_openapi::jiff::Unit::Second).unwrap_or_default();
    let _ = writeln!(
        md,
        "# Benchmarks\n\nGenerated by `make bench` on {now}; do not edit by hand. The machine is shared and noisy, so \
         every figure is read against a baseline measured in the same run, on the same machine, interleaved with it.\n"
    );
    let _ = writeln!(md, "## Targets\n\n| target | measured | met |\n|---|---|---|");
    for (what, measured, met) in targets(runs) {
        let _ = writeln!(md, "| {what} | {measured} | {} |", if met { "yes" } else { "**no**" });
    }
    let _ = writeln!(md, "\n## Machine\n\n{}", machine());
    allocator_section(&mut md, &runs.allocator);
    convergence_section(&mut md, &runs.cluster);
    restart_section(&mut md, &runs.cluster);
    scale_section(&mut md, &runs.scale);
    acquire_section(&mut md, &runs.acquire);
    fanout_section(&mut md, runs.fanout.as_ref());
    let _ = writeln!(
        md,
        "## Commands\n\n`make bench` runs `hack/bench.sh`, which ran these commands (seconds each took, then the \
         command):\n\n```console\n{commands}```"
    );
    md
}

fn allocator_section(md: &mut String, a: &Allocator) {
    let rows = allocator_rows(a);
    let _ = writeln!(md, "\n## 1. Allocator\n");
    let _ = writeln!(
        md,
        "Assigning n ports to n keys, one key per call, from an empty table. **Project**: \
         the agent's allocation path, `NodeState::reserve` with the real `SocketProbe` (TCP, range {range}), \
         then `commit`. **Seed baseline** \
         (docs/design.md §1, written in the bench): bind `127.0.0.1:0`, close, insert into a bimap where a port already \
         mapped silently moves to the new key, rewrite the whole JSON file with a non-atomic write after every \
         assignment. Median of whole runs ({runs}). \"Last 10 %\" is the cost per assignment over the final tenth \
         of a run, when the table is nearly full. A key is *lost* when, at the end, it no longer holds the port it \
         was given (or shares it).\n",
        range = a.range,
        runs = a
            .sizes
            .iter()
            .map(|s| format!(
                "{} project / {} seed runs at {}",
                s.project_runs_s.len(),
                s.seed_runs_s.len(),
                thousands(s.n)
            ))
            .collect::<Vec<_>>()
            .join(", "),
    );
    let _ = writeln!(
        md,
        "| n | project ops/s | seed ops/s | ratio | project µs/op | probe floor µs/port | project ÷ floor | seed µs/op | project µs/op, last 10 % | seed µs/op, last 10 % | keys lost, project | keys lost, seed | seed file |"
    );
    let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        let _ = writeln!(
            md,
            "| {} | {} | {} | **{:.0}×** | {:.2} | {:.2} | **{:.2}×** | {:.1} | {:.2} | {:.1} | {} | {} ({:.1} %) | {:.0} KiB |",
            thousands(r.n),
            thousands(r.project_ops as usize),
            thousands(r.seed_ops as usize),
            r.project_ops / r.seed_ops,
            r.project_us,
            r.floor_us,
            r.project_us / r.floor_us,
            r.seed_us,
            r.project_tail_us,
            r.seed_tail_us,
            r.project_lost,
            r.seed_lost,
            r.seed_lost as f64 * 100.0 / r.n as f64,
            r.seed_file_kib
        );
    }
    if let (Some(first), Some(last)) = (rows.first(), rows.last()) {
        let _ = writeln!(
            md,
            "\nPer-op cost from {} to {}: project **{:.2}×** (last 10 %: {:.2}×), seed **{:.2}×** (last 10 %: {:.2}×).",
            thousands(first.n),
            thousands(last.n),
            last.project_us / first.project_us,
            last.project_tail_us / first.project_tail_us,
            last.seed_us / first.seed_us,
            last.seed_tail_us / first.seed_tail_us
        );
        let _ = writeln!(
            md,
            "\nThe **probe floor** is `SocketProbe::is_free` alone on the same n free ports, timed right next to each \
             project run; what the allocator adds on top is the table's bookkeeping (hash and B-tree inserts, key \
             strings). With the seed's cost per assignment at {} (≈ {:.0} µs), the probe floor alone caps the ratio \
             against the seed at about **{:.0}×**.",
            thousands(last.n),
            last.seed_us,
            last.seed_us / last.floor_us
        );
    }
    let _ = writeln!(
        md,
        "\nWhat single socket operations cost on this machine (median of 9 batches of 2,000 calls on free ports):\n"
    );
    let _ = writeln!(md, "| operation | µs per call |\n|---|---:|");
    for (what, ns) in &a.syscalls_ns {
        let _ = writeln!(md, "| {what} | {:.2} |", ns / 1e3);
    }
    md.push_str(&results::busy_node_section(&a.sizes));
}

/// Picks a phase's request counts out of a run.
type RequestsOf = fn(&Convergence) -> &BTreeMap<String, u64>;
/// Picks a phase's CPU figures out of a run.
type CpuOf = fn(&Convergence) -> Cpu;

fn convergence_section(md: &mut String, c: &Cluster) {
    let agent = points(c, System::Agent);
    let floor = points(c, System::Floor);
    let _ = writeln!(md, "\n## 2. Convergence\n");
    let _ = writeln!(
        md,
        "N objects × {k} keys for one node, created by the bench ({cc} creates in flight). **Create**: first create \
         sent → the bench's own watch has seen every object `Ready=True` with {k} ports. **Delete**: one \
         delete-collection on the namespace → the watch has seen every object gone. **Agent**: the real \
         `portassign agent` binary (release build, defaults: concurrency {conc}, range 20000-29999). **Floor**: a \
         separate process (the testkit's stand-in controller) with the same field-selector watch and concurrency that makes only the \
         writes no implementation can avoid: a JSON patch adding the finalizer and a server-side apply of the \
         Ready status, back to back; on delete a JSON patch removing the finalizer. No probe, no events, no \
         re-reads. Both sides run as the chart's agent ServiceAccount, under the chart's RBAC. Each run has its \
         own namespace and node name; the two sides alternate which goes first. \
         Latency per object: create request sent → the bench's watch event showing it Ready (arrival times at the \
         bench, not the seconds-granular `lastTransitionTime`).\n",
        k = c.keys_per_object,
        cc = c.create_concurrency,
        conc = c.concurrency
    );
    let _ = writeln!(md, "![convergence time vs N, agent and floor](convergence.svg)\n");
    let _ = writeln!(
        md,
        "| N | runs | create, floor | create, agent | ratio | delete, floor | delete, agent | ratio | create→Ready p50 / p99, floor | create→Ready p50 / p99, agent |"
    );
    let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (n, a) in &agent {
        let Some(f) = floor.get(n) else { continue };
        let flag = |p: &Point| if p.completed { "" } else { " (timed out)" };
        let _ = writeln!(
            md,
            "| {} | {} | {:.2} s{} | {:.2} s{} | **{:.2}×** | {:.2} s | {:.2} s | **{:.2}×** | {:.0} / {:.0} ms | {:.0} / {:.0} ms |",
            thousands(*n),
            a.runs.min(f.runs),
            f.create,
            flag(f),
            a.create,
            flag(a),
            a.create / f.create,
            f.delete,
            a.delete,
            a.delete / f.delete,
            f.p50,
            f.p99,
            a.p50,
            a.p99
        );
    }

    // Requests and CPU at the largest size: what bounds the agent.
    let Some(&largest) = agent.keys().next_back() else { return };
    let runs = |system: System| -> Vec<&Convergence> {
        c.convergence.iter().filter(|r| r.system == system && r.objects == largest).collect()
    };
    let (a_runs, f_runs) = (runs(System::Agent), runs(System::Floor));
    if a_runs.is_empty() || f_runs.is_empty() {
        return;
    }
    let pairs = |pick: fn(&Convergence) -> f64| {
        a_runs.iter().zip(&f_runs).map(|(a, f)| format!("{:.2}", pick(a) / pick(f))).collect::<Vec<_>>().join(", ")
    };
    let _ = writeln!(
        md,
        "\nAt N = {}, agent ÷ floor for each adjacent pair of runs, in run order: create {}; delete {}. The spread \
         is the shared machine's noise; the table takes the median of each side.",
        thousands(largest),
        pairs(|r| r.create_s),
        pairs(|r| r.delete_s)
    );
    let _ = writeln!(
        md,
        "\n### Where the time goes (N = {})\n\nAPI requests on PortAssignments and Events per object, from \
         kube-apiserver's `apiserver_request_total`, averaged over the runs at this size (all clients: the bench's \
         creates, delete-collection and watch are the same on both sides; a non-2xx code is shown after the verb). \
         APPLY is a server-side apply.\n",
        thousands(largest)
    );
    let per_object = |runs: &[&Convergence], pick: fn(&Convergence) -> &BTreeMap<String, u64>| {
        let mut sum: BTreeMap<String, f64> = BTreeMap::new();
        for run in runs {
            for (k, v) in pick(run) {
                *sum.entry(k.clone()).or_default() += *v as f64;
            }
        }
        let scale = (runs.len() * largest) as f64;
        sum.into_iter().map(|(k, v)| (k, v / scale)).collect::<BTreeMap<_, _>>()
    };
    let is_write =
        |k: &str| ["PATCH", "APPLY", "POST", "PUT", "CREATE", "UPDATE", "DELETE"].iter().any(|v| k.starts_with(v));
    let _ = writeln!(md, "| phase | request | floor | agent |\n|---|---|---:|---:|");
    let phases: [(&str, RequestsOf); 2] = [("create", |r| &r.create_requests), ("delete", |r| &r.delete_requests)];
    for (phase, pick) in phases {
        let (fa, aa) = (per_object(&f_runs, pick), per_object(&a_runs, pick));
        let keys: std::collections::BTreeSet<&String> = fa.keys().chain(aa.keys()).collect();
        for key in keys {
            let get = |m: &BTreeMap<String, f64>| m.get(key).copied().unwrap_or(0.0);
            let _ = writeln!(md, "| {phase} | `{key}` | {:.2} | {:.2} |", get(&fa), get(&aa));
        }
        let writes = |m: &BTreeMap<String, f64>| m.iter().filter(|(k, _)| is_write(k)).map(|(_, v)| v).sum::<f64>();
        let _ = writeln!(md, "| {phase} | **all writes** | **{:.2}** | **{:.2}** |", writes(&fa), writes(&aa));
    }
    let reconciles: Vec<f64> = a_runs.iter().filter_map(|r| r.reconciles).map(|r| r as f64 / largest as f64).collect();
    if !reconciles.is_empty() {
        let _ = writeln!(md, "\nThe agent ran {:.2} reconciles per object over a run.", median(&reconciles));
    }
    let _ = writeln!(
        md,
        "\nCPU seconds (user + system) during each phase, mean over the runs at this size. \"Ours\" is the four \
         processes together and \"other work\" what the rest of the shared machine used meanwhile (from \
         `/proc/stat`), both in cores, out of {} here:\n",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    let _ = writeln!(
        md,
        "| phase | side | wall | agent or floor | kube-apiserver | etcd | bench driver | ours | other work | apiserver CPU per object |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let mean_cpu = |runs: &[&Convergence], pick: fn(&Convergence) -> Cpu| {
        let k = runs.len() as f64;
        runs.iter().map(|r| pick(r)).fold(Cpu::default(), |acc, x| Cpu {
            system: acc.system + x.system / k,
            apiserver: acc.apiserver + x.apiserver / k,
            etcd: acc.etcd + x.etcd / k,
            driver: acc.driver + x.driver / k,
            machine: acc.machine + x.machine / k,
            wall: acc.wall + x.wall / k,
        })
    };
    let cpu_phases: [(&str, CpuOf); 2] = [("create", |r| r.create_cpu), ("delete", |r| r.delete_cpu)];
    for (phase, pick) in cpu_phases {
        for (side, runs) in [("floor", &f_runs), ("agent", &a_runs)] {
            let cpu = mean_cpu(runs, pick);
            let ours = cpu.system + cpu.apiserver + cpu.etcd + cpu.driver;
            let others = (cpu.machine - ours).max(0.0) / cpu.wall;
            let ours = ours / cpu.wall;
            let _ = writeln!(
                md,
                "| {phase} | {side} | {:.2} s | {:.2} s | {:.2} s | {:.2} s | {:.2} s | {ours:.2} | {others:.2} | {:.1} ms |",
                cpu.wall,
                cpu.system,
                cpu.apiserver,
                cpu.etcd,
                cpu.driver,
                cpu.apiserver * 1e3 / largest as f64
            );
        }
    }
}

fn restart_section(md: &mut String, c: &Cluster) {
    let r = &c.restart;
    let _ = writeln!(md, "\n## 3. Restart\n");
    let _ = writeln!(
        md,
        "A node with {} objects whose statuses hold {} ports (written beforehand exactly as the agent writes \
         them, finalizer included). **Ready**: `portassign agent` process spawned → first `/readyz` 200 (it lists \
         the node's objects in pages of 500 and rebuilds the table first). **Floor**: a fresh client in the bench, \
         with the agent's credentials, listing the same objects page by page. VmHWM is the peak RSS from `/proc/<pid>/status`, read right after \
         ready and again once the agent has reconciled every object after the start (\"settled\"); writes after \
         ready should be 0 since nothing changed.\n",
        thousands(r.objects),
        thousands(r.ports)
    );
    let _ = writeln!(
        md,
        "| run | ready | list floor | ratio | ports at ready | VmHWM at ready | VmHWM settled | VmRSS settled | ready → settled | writes after ready |"
    );
    let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (i, run) in r.runs.iter().enumerate() {
        let floor = r.list_floor_s.get(i).copied().unwrap_or(f64::NAN);
        let _ = writeln!(
            md,
            "| {} | {:.3} s | {:.3} s | {:.1}× | {} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.2} s | {} |",
            i + 1,
            run.ready_s,
            floor,
            run.ready_s / floor,
            thousands(run.ports_at_ready as usize),
            run.hwm_at_ready_kib as f64 / 1024.0,
            run.hwm_settled_kib as f64 / 1024.0,
            run.rss_settled_kib as f64 / 1024.0,
            run.settle_s,
            run.writes_after_ready
        );
    }
    if !r.runs.is_empty() {
        let ready = median(&r.runs.iter().map(|x| x.ready_s).collect::<Vec<_>>());
        let peak = r.runs.iter().map(|x| x.hwm_settled_kib.max(x.hwm_at_ready_kib)).max().unwrap_or(0);
        let _ = writeln!(
            md,
            "\nThe same binary on a node with no objects: ready in {:.3} s, VmHWM {:.1} MiB. So the {} ports add \
             {:.3} s to the start (median) and {:.1} MiB to the peak RSS; the full start is {:.1}× the bare list of \
             the objects (median).",
            r.empty_ready_s,
            r.empty_hwm_kib as f64 / 1024.0,
            thousands(r.ports),
            ready - r.empty_ready_s,
            peak.saturating_sub(r.empty_hwm_kib) as f64 / 1024.0,
            ready / median(&r.list_floor_s)
        );
    }
    md.push('\n');
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|v| v.split_once(':')).map(|(_, m)| m.trim().to_owned()))
        .unwrap_or_else(|| "unknown".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:").and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok()))
        .map(|kib| kib / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let rustc = std::process::Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    format!(
        "| | |\n|---|---|\n| CPUs (nproc) | {cores} |\n| CPU model | {model} |\n| memory | {mem_gib:.1} GiB |\n\
         | kernel | Linux {} |\n| ephemeral ports | {} |\n| compiler | {rustc} |\n| build | release: the agent from `cargo build --release`, the benches from `cargo bench` |\n",
        kernel.trim(),
        ephemeral.split_whitespace().collect::<Vec<_>>().join("-")
    )
}

fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// Cost per object relative to the run with the fewest agents.
fn ratio(value: f64, base: f64) -> f64 {
    if base > 0.0 { value / base } else { 0.0 }
}

fn per_object_ms(cpu_s: f64, objects: usize) -> f64 {
    cpu_s * 1e3 / objects.max(1) as f64
}

/// The targets of the scale section.
fn scale_targets(s: &Scale) -> Vec<Target> {
    let mut out = Vec::new();
    if let (Some(first), Some(last)) = (s.runs.first(), s.runs.last()) {
        let time = ratio(last.create_s, first.create_s);
        out.push((
            format!("Scale: convergence time flat from M = {} to {} agents (≤ 1.2×)", first.agents, last.agents),
            format!("{time:.2}× ({:.2} s vs {:.2} s)", last.create_s, first.create_s),
            time <= 1.2 && last.completed,
        ));
        let cpu = ratio(last.apiserver_cpu_create_s, first.apiserver_cpu_create_s);
        out.push((
            format!(
                "Scale: API-server CPU per object flat from M = {} to {} agents (≤ 1.2×)",
                first.agents, last.agents
            ),
            format!(
                "{cpu:.2}× ({:.2} vs {:.2} ms/object)",
                per_object_ms(last.apiserver_cpu_create_s, last.objects),
                per_object_ms(first.apiserver_cpu_create_s, first.objects)
            ),
            cpu <= 1.2,
        ));
    }
    if let Some(storm) = &s.storm {
        out.push((
            format!("Relist storm, M = {}: no port lost or duplicated (checker)", storm.agents),
            storm.check_summary.clone(),
            storm.check_exit == 0,
        ));
        let after = storm.all_serving_s - storm.api_back_s;
        out.push((
            format!("Relist storm, M = {}: every agent serving within 5 s of the API server's return", storm.agents),
            format!(
                "{after:.1} s ({:.1} s after the kill, the server back at {:.1} s)",
                storm.all_serving_s, storm.api_back_s
            ),
            after <= 5.0,
        ));
    }
    for f in &s.failure {
        if f.end() > 60.0 {
            let after = f.rate(60.0, f.end());
            let bound = f.objects as f64 / 50.0;
            out.push((
                format!(
                    "{} objects, every status write refused: ≤ ~{:.0} writes/s after the first minute",
                    f.objects,
                    bound.max(1.0)
                ),
                format!("{after:.2}/s"),
                after <= bound.max(1.0) * 1.05,
            ));
            out.push((
                format!("{} objects: all Ready within the cap ({:.0} s) once permitted", f.objects, f.cap_s),
                format!("{:.1} s", f.recovery_s),
                f.recovery_s <= f.cap_s + 2.0,
            ));
        }
    }
    out
}

/// Many agents, the relist storm, persistent failure.
fn scale_section(md: &mut String, s: &Scale) {
    let _ = writeln!(md, "## 4. Scale and back-pressure\n");
    let _ = writeln!(
        md,
        "Run by the `scale` bench against the same control plane, after the other cases. Every agent is a real \
         `portassign agent` process (the release build, default flags) under the chart's agent ServiceAccount, \
         each with a node name of its own. Machine load average (1, 5, 15 min): {} at the start of this \
         section, {} at its end; two cores shared with other work, so absolute figures are noisy.\n",
        s.load_before, s.load_after
    );
    let _ = writeln!(md, "### Cost against the number of agents\n");
    let _ = writeln!(
        md,
        "The same {} objects × {} keys spread evenly over M nodes, one agent each; created by the bench (32 in \
         flight), then deleted with one delete-collection. CPU from `/proc/<pid>/stat` of kube-apiserver, etcd \
         and the agents, over each phase. **Idle** is kube-apiserver's CPU with the M agents connected and \
         nothing to do, measured over 5 s before the creates: the price of M open watches. All M agents run \
         on this machine next to the control plane and the bench, so with many agents their own CPU \
         competes with the API server's for the same cores.\n",
        s.objects, s.keys
    );
    let _ = writeln!(md, "![API-server CPU per object and convergence time against M](scale.svg)\n");
    let _ = writeln!(
        md,
        "| M agents | objects per node | all ready (start) | create → all Ready | ratio | delete → all gone | \
         kube-apiserver CPU per object, create | ratio | per object, delete | etcd CPU | agents' CPU | idle kube-apiserver | kube-apiserver peak RSS |"
    );
    let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let base = s.runs.first().cloned().unwrap_or_default();
    for r in &s.runs {
        let _ = writeln!(
            md,
            "| {} | {} | {:.2} s | {:.2} s{} | **{:.2}×** | {:.2} s | {:.2} ms | **{:.2}×** | {:.2} ms | {} | {:.2} s | {:.3} cores | {:.0} MiB |",
            r.agents,
            r.objects / r.agents.max(1),
            r.start_s,
            r.create_s,
            if r.completed { "" } else { " (incomplete)" },
            ratio(r.create_s, base.create_s),
            r.delete_s,
            per_object_ms(r.apiserver_cpu_create_s, r.objects),
            ratio(r.apiserver_cpu_create_s, base.apiserver_cpu_create_s),
            per_object_ms(r.apiserver_cpu_delete_s, r.objects),
            r.etcd_cpu_s.map_or_else(|| "(restarted)".to_owned(), |s| format!("{s:.2} s")),
            r.agents_cpu_s,
            r.apiserver_idle_cores,
            r.apiserver_rss_mib,
        );
    }
    let _ = writeln!(md);
    if let Some(storm) = &s.storm {
        let _ = writeln!(md, "### Relist storm\n");
        let _ = writeln!(
            md,
            "{} agents connected, {} objects Ready on their nodes; then etcd and kube-apiserver are killed (SIGKILL) \
             and started again on the same data (`hack/control-plane.sh restart`). Every agent's watch fails and \
             relists. **Serving** is measured by creating one new object on every node once the API server \
             answers, until all are Ready; **probes created** is when the API server had answered the last of \
             those creates (the agents cannot serve an object before it exists). Peak figures are sampled every 250 ms over the 30 s after the restart.\n",
            storm.agents, storm.objects
        );
        let _ = writeln!(
            md,
            "| API server back | probes created | every agent serving | kube-apiserver peak CPU | its CPU over 30 s | peak RSS (before: {:.0} MiB) | checker |",
            storm.rss_before_mib
        );
        let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|---|");
        let _ = writeln!(
            md,
            "| {:.1} s | {} | {:.1} s | {:.2} cores | {:.1} s | {:.0} MiB | {} (exit {}) |\n",
            storm.api_back_s,
            // Not measured by runs before the field existed.
            if storm.probes_created_s > 0.0 { format!("{:.1} s", storm.probes_created_s) } else { "–".into() },
            storm.all_serving_s,
            storm.peak_cores,
            storm.cpu_30s,
            storm.peak_rss_mib,
            storm.check_summary,
            storm.check_exit
        );
        if let (Some(before), Some(during)) = (&storm.flow_before, &storm.flow_storm) {
            let _ = writeln!(
                md,
                "Back-pressure, from kube-apiserver's `/metrics` read every 250 ms: requests answered 429 Too Many \
                 Requests (`apiserver_request_total`), requests API Priority and Fairness rejected \
                 (`apiserver_flowcontrol_rejected_requests_total`), and the most requests waiting in its queues \
                 and executing at once (`apiserver_flowcontrol_current_inqueue_requests`, \
                 `apiserver_flowcontrol_current_executing_requests` outside the exempt level). **Before**: the \
                 same agents connected and idle, just before the kill; **storm**: from the kill to 30 s after \
                 the restart (the restarted server's counters start at zero, so they count all of it). A watch \
                 that reaches the restarted server before its watch cache of PortAssignments is filled from etcd \
                 is answered 429 with a `Retry-After` of at least 1 s (k8s.io/apiserver v0.36.3, \
                 `pkg/storage/cacher/cacher.go` `Watch`); kube-client's default retry layer waits as told and \
                 asks again, so WATCH 429s are agents waiting for that cache, not work refused.\n"
            );
            let _ = writeln!(
                md,
                "| window | length | reads | 429s | 429s by request | APF rejected | peak in queue | peak executing |"
            );
            let _ = writeln!(md, "|---|---:|---:|---:|---|---:|---:|---:|");
            for (name, w) in [("before", before), ("storm", during)] {
                let by: Vec<String> = w.answered_429_by.iter().map(|(r, n)| format!("{r}: {n:.0}")).collect();
                let _ = writeln!(
                    md,
                    "| {name} | {:.1} s | {} | {:.0} | {} | {:.0} | {:.0} | {:.0} |",
                    w.seconds,
                    w.samples,
                    w.answered_429,
                    if by.is_empty() { "–".to_owned() } else { by.join(", ") },
                    w.rejected,
                    w.peak_in_queue,
                    w.peak_executing
                );
            }
            let _ = writeln!(md);
        }
    }
    if !s.failure.is_empty() {
        let _ = writeln!(md, "### Persistent failure\n");
        let _ = writeln!(
            md,
            "An agent whose ServiceAccount may not patch `portassignments/status` (a copy of the chart's role \
             without it), default flags (retry cap {:.0} s), with its node's objects created at once. Refused \
             status writes as the agent counts them (`portassign_write_failures_total{{kind=\"refused\"}}`, \
             sampled every 5 s; kube-apiserver's own `apiserver_request_total` does not count requests that \
             RBAC refuses). Then the permission is granted back and the time until every object is Ready is \
             taken. **Fixed 2 s retry** is the behaviour before per-object backoff, computed, not run: every \
             object retried {:.0} s after each failure, objects ÷ {:.0} s (the issue measured 25/s for 50 objects).\n",
            s.failure.first().map(|f| f.cap_s).unwrap_or_default(),
            OLD_FIXED_RETRY_S,
            OLD_FIXED_RETRY_S
        );
        let _ = writeln!(
            md,
            "Time 0 is when the last create was answered (the objects of the smaller node were created first, so \
             their first refusals, at 0, 1 and 5 s, may fall before it).\n"
        );
        let _ = writeln!(
            md,
            "| objects | first 10 s | 10-60 s | after the first minute (60 s → end) | fixed 2 s retry | after ÷ fixed | all Ready after the grant |"
        );
        let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|");
        for f in &s.failure {
            let old = f.objects as f64 / OLD_FIXED_RETRY_S;
            let after = f.rate(60.0, f.end());
            let _ = writeln!(
                md,
                "| {} | {:.1}/s | {:.1}/s | **{:.2}/s** ({:.0} s → {:.0} s) | {:.0}/s | {:.3} | {:.1} s |",
                f.objects,
                f.rate(0.0, 10.0),
                f.rate(10.0, 60.0),
                after,
                60.0,
                f.end(),
                old,
                ratio(after, old),
                f.recovery_s
            );
        }
        let _ = writeln!(
            md,
            "\nAt the cap an object retries every 48 to 60 s (jitter only shortens), so objects refused together \
             retry in waves of one write each, about a cap apart, and a window that is not a whole number of waves \
             long counts one wave too many or too few. The refused writes counted so far, every 5 s (time: count):\n"
        );
        for f in &s.failure {
            let series: Vec<String> = f.samples.iter().map(|(t, n)| format!("{t:.0}: {n:.0}")).collect();
            let _ = writeln!(md, "- {} objects: {}", f.objects, series.join(", "));
        }
        let _ = writeln!(md);
    }
}

/// The "Getting a port" section.
fn acquire_section(md: &mut String, q: &Acquire) {
    let _ = writeln!(md, "\n## 5. Getting a port: acquire latency\n");
    let _ = writeln!(
        md,
        "One key at a time on a warm pool (the pool exists, the agent's finalizer is on, a standing key holds a \
         port), {} samples of each, alternating. **Acquire**: `PortClient::acquire` of a new key against \
         the real `portassign agent` binary (release build, as the chart's agent ServiceAccount): call → port \
         returned. **Plain key**: one server-side apply adding a key to the existing object, then a watch from \
         the version it returned until the status shows the key's port, same agent. **Floor**: the plain \
         sequence against a minimal responder (the testkit's stand-in controller: a separate process that \
         applies a status giving every key a port for each new generation: no probe, no table, no events). \
         After each sample the key is released and the pool settles, untimed.\n",
        q.samples
    );
    let _ = writeln!(md, "| what | p50 | p99 | p50 ÷ floor p50 |\n|---|---:|---:|---:|");
    let series = [
        ("acquire (client API, agent)", &q.acquire),
        ("plain key → port visible (agent)", &q.plain),
        ("floor (apply + watch, minimal responder)", &q.floor),
    ];
    for (what, s) in series {
        let (p50, p99) = (median(s), percentile(s, 0.99));
        let _ = writeln!(md, "| {what} | {p50:.1} ms | {p99:.1} ms | **{:.2}×** |", p50 / median(&q.floor));
    }
    let _ = writeln!(
        md,
        "\nThe agent's path is the floor's (one watch event in, one server-side apply of the status out) plus \
         its own work: the probe (one bind, about 7 µs, §1), the table, the event it publishes after the \
         write. Timestamps in the agent showed the rest of the gap this ratio used to have (1.35 to 1.44× \
         before): 1 to 2 ms between a watch event and the start of its reconcile, kube-runtime's scheduler \
         waiting for its next millisecond tick even for a request due now; the agent's own reconcile \
         runner starts it at once (docs/design.md §13)."
    );
    md.push('\n');
}

/// Least squares `y = a + b·x` over `points` (`None` with fewer than two distinct x).
fn linear_fit(points: &[(f64, f64)]) -> Option<(f64, f64)> {
    let n = points.len() as f64;
    let (sx, sy) = points.iter().fold((0.0, 0.0), |(sx, sy), (x, y)| (sx + x, sy + y));
    let (mx, my) = (sx / n, sy / n);
    let sxx: f64 = points.iter().map(|(x, _)| (x - mx) * (x - mx)).sum();
    let sxy: f64 = points.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    (sxx > 0.0).then(|| (my - sxy / sxx * mx, sxy / sxx))
}

/// The "Watch fan-out" section: kube-apiserver's cost per write against open watches.
fn fanout_section(md: &mut String, f: Option<&Fanout>) {
    let _ = writeln!(md, "\n## 6. Watch fan-out\n");
    let Some(f) = f else {
        let _ = writeln!(md, "Not run (`make bench` runs it; `report` had no `--fanout`).\n");
        return;
    };
    let _ = writeln!(
        md,
        "What one change of a PortAssignment costs kube-apiserver while M watches are open, without the agents' \
         own work: one light process (`--bench fanout`) holds the M watches, one HTTP connection each as M agents \
         have. One object of node 0 is patched {} times a second for {} s; kube-apiserver's CPU over the writes \
         (the run time of its threads, `/proc/<pid>/task/*/schedstat`, in nanoseconds), less its idle rate measured for as long just before with the same watches open, is divided by the \
         writes (each the median of 5 windows, each window costed alone). The latency is from the patch sent to its event at node 0's watch. **field**: every watch \
         cluster-wide with the agents' selector `spec.nodeName=<node>` (what each agent opens). **namespace**: \
         each watch scoped to a namespace of its own, no selector.\n",
        f.rate, f.seconds
    );
    let _ = writeln!(
        md,
        "| M watches | field: CPU per write | field: event p50 / p99 | namespace: CPU per write | namespace: event \
         p50 / p99 | idle (field, namespace) |\n|---:|---:|---:|---:|---:|---:|"
    );
    let of = |scheme: &str| -> Vec<&FanoutRun> { f.runs.iter().filter(|r| r.scheme == scheme).collect() };
    let (field, namespace) = (of("field"), of("namespace"));
    for r in &field {
        let other = namespace.iter().find(|n| n.watchers == r.watchers);
        let (n_cpu, n_lat, n_idle) = other.map_or(("–".into(), "–".into(), "–".into()), |n| {
            (
                format!("{:.3} ms", n.cpu_per_write_ms),
                format!("{:.1} / {:.1} ms", n.latency_p50_ms, n.latency_p99_ms),
                format!("{:.3}", n.idle_cores),
            )
        });
        let _ = writeln!(
            md,
            "| {} | {:.3} ms | {:.1} / {:.1} ms | {n_cpu} | {n_lat} | {:.3}, {n_idle} cores |",
            thousands(r.watchers),
            r.cpu_per_write_ms,
            r.latency_p50_ms,
            r.latency_p99_ms,
            r.idle_cores
        );
    }
    let missing: u64 = f.runs.iter().map(|r| r.writes - r.events.min(r.writes)).sum();
    if missing > 0 {
        let _ = writeln!(md, "\n{missing} writes had no event at node 0's watch within the run (not timed).");
    }
    let _ = writeln!(
        md,
        "\nA straight line through each column (least squares, CPU per write against M), and where it \
         leads. A slope that adds less than a quarter of the column's mean over 3,000 watches is read as no \
         growth, and the mean is carried forward:\n\n| watching | fit | at 5,000 watches | at 15,000 watches |\n|---|---|---:|---:|"
    );
    for (name, runs) in [("field (the agents' way)", &field), ("namespace", &namespace)] {
        let points: Vec<(f64, f64)> = runs.iter().map(|r| (r.watchers as f64, r.cpu_per_write_ms)).collect();
        let Some((a, b)) = linear_fit(&points) else { continue };
        let mean = points.iter().map(|(_, y)| y).sum::<f64>() / points.len() as f64;
        // A slope within the noise (or below zero) is no growth: then the mean is the forecast.
        let grows = b * 3000.0 > 0.25 * mean;
        let at = |m: f64| if grows { a + b * m } else { mean };
        let fit = if grows {
            format!("{a:.3} ms + {:.3} µs × M", b * 1e3)
        } else {
            format!("no growth with M (slope {:.3} µs × M); mean {mean:.3} ms", b * 1e3)
        };
        let _ = writeln!(
            md,
            "| {name} | {fit} | {:.2} ms ({:.0} writes/s per core) | {:.2} ms ({:.0} writes/s per core) |",
            at(5000.0),
            1e3 / at(5000.0),
            at(15000.0),
            1e3 / at(15000.0)
        );
    }
    let _ = writeln!(
        md,
        "\nWhy the two differ (kube-apiserver v1.36.3, `staging/src/k8s.io/apiserver/pkg/storage/cacher/`): the \
         watch cache hands each change to the watches of its bucket (`startDispatching` in `cacher.go`: the \
         buckets of the object's namespace and name, the cluster-wide bucket, and a trigger index only when the \
         resource has one). Pods and ResourceSlices index `spec.nodeName`; a custom resource never has a trigger \
         (`apiextensions-apiserver/pkg/registry/customresource/etcd.go` gives its store no `TriggerFunc`), so \
         every cluster-wide watch of PortAssignments gets every change and its own goroutine evaluates the \
         selector (`cache_watcher.go`, `convertToWatchEvent`). A namespace-scoped watch sits in its namespace's \
         bucket and never sees other namespaces' changes.\n"
    );
}

/// One panel of a plot: title, axis names, and up to two series (name, points).
struct Panel {
    title: &'static str,
    x: String,
    y: &'static str,
    series: Vec<(&'static str, Vec<(f64, f64)>)>,
}

/// Create and delete: seconds against N for the agent and the floor.
fn convergence_panels(c: &Cluster) -> [Panel; 2] {
    let (agent, floor) = (points(c, System::Agent), points(c, System::Floor));
    let line = |p: &BTreeMap<usize, Point>, f: fn(&Point) -> f64| p.iter().map(|(n, p)| (*n as f64, f(p))).collect();
    let panel = |title, f: fn(&Point) -> f64| Panel {
        title,
        x: "objects (N), 4 keys each".into(),
        y: "seconds",
        series: vec![("agent", line(&agent, f)), ("floor", line(&floor, f))],
    };
    [panel("Create → all Ready", |p| p.create), panel("Delete → all gone", |p| p.delete)]
}

/// Against M: kube-apiserver CPU per object (create and delete), and the convergence times.
fn scale_panels(s: &Scale) -> [Panel; 2] {
    let line = |f: &dyn Fn(&ScaleRun) -> f64| s.runs.iter().map(|r| (r.agents as f64, f(r))).collect();
    let x = format!("agents (M), {} objects in all", s.objects);
    [
        Panel {
            title: "kube-apiserver CPU per object",
            x: x.clone(),
            y: "ms",
            series: vec![
                ("create", line(&|r| per_object_ms(r.apiserver_cpu_create_s, r.objects))),
                ("delete", line(&|r| per_object_ms(r.apiserver_cpu_delete_s, r.objects))),
            ],
        },
        Panel {
            title: "Convergence time",
            x,
            y: "seconds",
            series: vec![("create → all Ready", line(&|r| r.create_s)), ("delete → all gone", line(&|r| r.delete_s))],
        },
    ]
}

/// Two panels side by side, each a line and points per series (red, then blue).
fn plot(path: &Path, panels: [Panel; 2]) -> anyhow::Result<()> {
    let err = |e: &dyn std::fmt::Debug| anyhow::anyhow!("plotting {}: {e:?}", path.display());
    let root = SVGBackend::new(path, (960, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    for (area, panel) in root.split_evenly((1, 2)).iter().zip(panels) {
        let points = || panel.series.iter().flat_map(|(_, data)| data);
        let max_x = points().map(|p| p.0).fold(1.0, f64::max) * 1.05;
        let max_y = points().map(|p| p.1).fold(0.0, f64::max) * 1.2 + 0.1;
        let mut chart = ChartBuilder::on(area)
            .caption(panel.title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..max_x, 0.0..max_y)
            .map_err(|e| err(&e))?;
        let mesh =
            chart.configure_mesh().x_desc(&panel.x).x_label_formatter(&|x| format!("{x:.0}")).y_desc(panel.y).draw();
        mesh.map_err(|e| err(&e))?;
        for ((name, data), color) in panel.series.iter().zip([RED, BLUE]) {
            chart
                .draw_series(LineSeries::new(data.clone(), color.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(*name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
            chart.draw_series(data.iter().map(|p| Circle::new(*p, 4, color.filled()))).map_err(|e| err(&e))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))
}
