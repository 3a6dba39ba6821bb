//! Turns the JSON of `allocator` and `cluster` into `docs/benchmarks.md` and the plot
//! `docs/convergence.svg`. Every ratio and every target verdict is computed here from
//! the measured numbers.
//!
//! `cargo bench -p portassign-bench --bench report -- --allocator FILE --cluster FILE --commands FILE
//! --md docs/benchmarks.md --svg docs/convergence.svg`. Under `cargo test` (no
//! `--bench`) it does nothing.

#[path = "support/results.rs"]
mod results;
#[path = "support/scale.rs"]
mod scale;

use std::{collections::BTreeMap, fmt::Write as _, path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use plotters::prelude::*;
use results::{Allocator, Cluster, Convergence, Cpu, System, median};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        println!("benchmark report: run by `make bench`; nothing to do under cargo test");
        return ExitCode::SUCCESS;
    }
    let value = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).map(PathBuf::from);
    let run = || -> anyhow::Result<()> {
        let need = |flag: &str| value(flag).with_context(|| format!("{flag} FILE is required"));
        let allocator: Allocator = results::read(&need("--allocator")?)?;
        let cluster: Cluster = results::read(&need("--cluster")?)?;
        let commands = std::fs::read_to_string(need("--commands")?)?;
        let md = need("--md")?;
        let svg = need("--svg")?;
        let svg_name = svg.file_name().and_then(|n| n.to_str()).unwrap_or("convergence.svg").to_owned();
        plot(&cluster, &svg)?;
        // The scale section is optional (`--scale FILE --scale-svg FILE`).
        let scale = match (value("--scale"), value("--scale-svg")) {
            (Some(json), Some(svg)) => {
                let measured: scale::Scale = results::read(&json)?;
                scale::plot(&measured, &svg)?;
                let name = svg.file_name().and_then(|n| n.to_str()).unwrap_or("scale.svg").to_owned();
                Some((measured, name))
            }
            _ => None,
        };
        std::fs::write(&md, markdown(&allocator, &cluster, &commands, &svg_name, scale.as_ref()))?;
        println!("wrote {} and {}", md.display(), svg.display());
        Ok(())
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("benchmark report failed: {error:#}");
            ExitCode::FAILURE
        }
    }
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
struct Target {
    what: String,
    measured: String,
    met: bool,
}

fn targets(a: &Allocator, c: &Cluster) -> Vec<Target> {
    let mut out = Vec::new();
    let rows = allocator_rows(a);
    let small = rows.iter().find(|r| r.n == 1000).or(rows.first());
    let large = rows.iter().find(|r| r.n == 10000).or(rows.last());
    if let (Some(small), Some(large)) = (small, large) {
        let speedup = large.project_ops / large.seed_ops;
        out.push(Target {
            what: format!("Allocator at {}: at least 100× the seed baseline's rate", thousands(large.n)),
            measured: format!("{speedup:.0}×"),
            met: speedup >= 100.0,
        });
        let flat = large.project_us / small.project_us;
        out.push(Target {
            what: format!(
                "Allocator per-op cost flat from {} to {} (within 1.5×)",
                thousands(small.n),
                thousands(large.n)
            ),
            measured: format!("{flat:.2}×"),
            met: flat <= 1.5,
        });
        let floor = large.project_us / large.floor_us;
        out.push(Target {
            what: format!("Allocator at {} within 2× of the probe-syscall floor", thousands(large.n)),
            measured: format!("{floor:.2}×"),
            met: floor <= 2.0,
        });
        let lost: usize = rows.iter().map(|r| r.project_lost).sum();
        out.push(Target {
            what: "Allocator loses no key (every run, every size)".into(),
            measured: format!("{lost} lost"),
            met: lost == 0,
        });
    }
    let agent = points(c, System::Agent);
    let floor = points(c, System::Floor);
    if let (Some((&n, a_pt)), Some(f_pt)) = (agent.iter().next_back(), floor.iter().next_back().map(|(_, p)| p)) {
        for (phase, a_s, f_s) in [("create", a_pt.create, f_pt.create), ("delete", a_pt.delete, f_pt.delete)] {
            let ratio = a_s / f_s;
            out.push(Target {
                what: format!(
                    "Convergence at N = {}, K = {}: {phase} at most 1.3× the write floor",
                    thousands(n),
                    c.keys_per_object
                ),
                measured: format!("{ratio:.2}× ({a_s:.2} s vs {f_s:.2} s)"),
                met: ratio <= 1.3 && a_pt.completed && f_pt.completed,
            });
        }
    }
    let r = &c.restart;
    if !r.runs.is_empty() {
        let ready = median(&r.runs.iter().map(|x| x.ready_s).collect::<Vec<_>>());
        let all_ports = r.runs.iter().all(|x| x.ports_at_ready as usize == r.ports);
        out.push(Target {
            what: format!("Restart to ready with {} ports: under 2 s", thousands(r.ports)),
            measured: format!("{ready:.2} s"),
            met: ready < 2.0 && all_ports,
        });
        let peak = r.runs.iter().map(|x| x.hwm_settled_kib.max(x.hwm_at_ready_kib)).max().unwrap_or(0) as f64 / 1024.0;
        out.push(Target {
            what: format!("Peak RSS with {} ports: under 64 MiB", thousands(r.ports)),
            measured: format!("{peak:.1} MiB"),
            met: peak < 64.0,
        });
    }
    out
}

// ----------------------------------------------------------------------------------
// Markdown.
// ----------------------------------------------------------------------------------

fn markdown(a: &Allocator, c: &Cluster, commands: &str, svg: &str, scale: Option<&(scale::Scale, String)>) -> String {
    let mut md = String::new();
    let now = k8s_openapi::jiff::Timestamp::now().round(k8s_openapi::jiff::Unit::Second).unwrap_or_default();
    let _ = writeln!(md, "# Benchmarks\n");
    let _ = writeln!(
        md,
        "Generated by `make bench` on {now}; do not edit by hand. The machine is shared and noisy, so every \
         figure is read against a baseline measured in the same run, on the same machine, interleaved with it.\n"
    );

    let _ = writeln!(md, "## Targets\n");
    let _ = writeln!(md, "| target | measured | met |\n|---|---|---|");
    for t in targets(a, c) {
        let _ = writeln!(md, "| {} | {} | {} |", t.what, t.measured, if t.met { "yes" } else { "**no**" });
    }
    for (what, measured, met) in scale.map(|(s, _)| scale::targets(s)).unwrap_or_default() {
        let _ = writeln!(md, "| {what} | {measured} | {} |", if met { "yes" } else { "**no**" });
    }

    let _ = writeln!(md, "\n## Machine\n");
    let _ = writeln!(md, "{}", machine());

    allocator_section(&mut md, a);
    convergence_section(&mut md, c, svg);
    restart_section(&mut md, c);
    if let Some((s, svg)) = scale {
        scale::section(&mut md, s, svg);
    }

    let _ = writeln!(md, "## Commands\n");
    let _ = writeln!(
        md,
        "`make bench` runs `hack/bench.sh`, which ran these commands (seconds each took, then the command):\n"
    );
    let _ = writeln!(md, "```console\n{}```", commands);
    md
}

fn allocator_section(md: &mut String, a: &Allocator) {
    let rows = allocator_rows(a);
    let _ = writeln!(md, "\n## 1. Allocator\n");
    let _ = writeln!(
        md,
        "Assigning n ports to n keys, one key per call, from an empty table. **Project**: \
         `PortTable::reserve` with the real `SocketProbe` (TCP, range {range}), then `commit`. **Seed baseline** \
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

fn convergence_section(md: &mut String, c: &Cluster, svg: &str) {
    let agent = points(c, System::Agent);
    let floor = points(c, System::Floor);
    let _ = writeln!(md, "\n## 2. Convergence\n");
    let _ = writeln!(
        md,
        "N objects × {k} keys for one node, created by the bench ({cc} creates in flight). **Create**: first create \
         sent → the bench's own watch has seen every object `Ready=True` with {k} ports. **Delete**: one \
         delete-collection on the namespace → the watch has seen every object gone. **Agent**: the real \
         `portassign agent` binary (release build, defaults: concurrency {conc}, range 20000-29999). **Floor**: a \
         separate process (`cluster floor`) with the same field-selector watch and concurrency that makes only the \
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
    let _ = writeln!(md, "![convergence time vs N, agent and floor]({svg})\n");
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

// ----------------------------------------------------------------------------------
// The plot.
// ----------------------------------------------------------------------------------

/// A panel's title and the figure it plots.
type Phase = (&'static str, fn(&Point) -> f64);

/// Two panels, create and delete: seconds against N for the agent and the floor.
fn plot(c: &Cluster, path: &std::path::Path) -> anyhow::Result<()> {
    let agent = points(c, System::Agent);
    let floor = points(c, System::Floor);
    let max_n = agent.keys().chain(floor.keys()).copied().max().unwrap_or(1) as f64;
    let root = SVGBackend::new(path, (960, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let panels = root.split_evenly((1, 2));
    let phases: [Phase; 2] = [("Create → all Ready", |p| p.create), ("Delete → all gone", |p| p.delete)];
    for (area, (title, value)) in panels.iter().zip(phases) {
        let max_s = agent.values().chain(floor.values()).map(value).fold(0.0, f64::max) * 1.15 + 0.1;
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..max_n * 1.05, 0.0..max_s)
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        chart
            .configure_mesh()
            .x_desc("objects (N), 4 keys each")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_desc("seconds")
            .draw()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        for (name, series, color) in [("agent", &agent, RED), ("floor", &floor, BLUE)] {
            let data: Vec<(f64, f64)> = series.iter().map(|(n, p)| (*n as f64, value(p))).collect();
            chart
                .draw_series(LineSeries::new(data.clone(), color.stroke_width(2)))
                .map_err(|e| anyhow::anyhow!("{e:?}"))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
            chart
                .draw_series(data.into_iter().map(|p| Circle::new(p, 4, color.filled())))
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    }
    root.present().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    Ok(())
}
