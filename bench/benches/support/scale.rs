//! What the `scale` benchmark measures (its JSON), and how the report shows it: the
//! Markdown section and the plot of cost against the number of agents. Shared by the
//! `scale` bench (which writes the JSON) and `report` (which renders it).

#![allow(dead_code)]

use std::fmt::Write as _;

use plotters::prelude::*;
use serde::{Deserialize, Serialize};

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
    /// Peak kube-apiserver CPU (cores, over 250 ms samples) in the 30 s after the restart.
    pub peak_cores: f64,
    /// kube-apiserver CPU seconds over those 30 s.
    pub cpu_30s: f64,
    /// Peak kube-apiserver RSS over those 30 s.
    pub peak_rss_mib: f64,
    /// kube-apiserver RSS just before the kill.
    pub rss_before_mib: f64,
    /// `portassign check` over every agent afterwards: its exit code and last line.
    pub check_exit: i32,
    /// See `check_exit`.
    pub check_summary: String,
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

/// Cost per object relative to the run with the fewest agents.
fn ratio(value: f64, base: f64) -> f64 {
    if base > 0.0 { value / base } else { 0.0 }
}

fn per_object_ms(cpu_s: f64, objects: usize) -> f64 {
    cpu_s * 1e3 / objects.max(1) as f64
}

/// Target rows for the report's table: (what, measured, met).
pub fn targets(s: &Scale) -> Vec<(String, String, bool)> {
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

/// The report's section.
pub fn section(md: &mut String, s: &Scale, svg: &str) {
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
    let _ = writeln!(md, "![API-server CPU per object and convergence time against M]({svg})\n");
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
             answers, until all are Ready. Peak figures are sampled every 250 ms over the 30 s after the restart.\n",
            storm.agents, storm.objects
        );
        let _ = writeln!(
            md,
            "| API server back | every agent serving | kube-apiserver peak CPU | its CPU over 30 s | peak RSS (before: {:.0} MiB) | checker |",
            storm.rss_before_mib
        );
        let _ = writeln!(md, "|---:|---:|---:|---:|---:|---|");
        let _ = writeln!(
            md,
            "| {:.1} s | {:.1} s | {:.2} cores | {:.1} s | {:.0} MiB | {} (exit {}) |\n",
            storm.api_back_s,
            storm.all_serving_s,
            storm.peak_cores,
            storm.cpu_30s,
            storm.peak_rss_mib,
            storm.check_summary,
            storm.check_exit
        );
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

/// Two panels against M: kube-apiserver CPU per object (create and delete), and the
/// convergence times.
pub fn plot(s: &Scale, path: &std::path::Path) -> anyhow::Result<()> {
    let err = |e: &dyn std::fmt::Debug| anyhow::anyhow!("{e:?}");
    let root = SVGBackend::new(path, (960, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let panels = root.split_evenly((1, 2));
    let max_m = s.runs.iter().map(|r| r.agents).max().unwrap_or(1) as f64;
    type Series = (&'static str, fn(&ScaleRun) -> f64, RGBColor);
    let cpu: [Series; 2] = [
        ("create", |r| per_object_ms(r.apiserver_cpu_create_s, r.objects), RED),
        ("delete", |r| per_object_ms(r.apiserver_cpu_delete_s, r.objects), BLUE),
    ];
    let time: [Series; 2] = [("create → all Ready", |r| r.create_s, RED), ("delete → all gone", |r| r.delete_s, BLUE)];
    for (area, (title, unit, series)) in
        panels.iter().zip([("kube-apiserver CPU per object", "ms", cpu), ("Convergence time", "seconds", time)])
    {
        let max_y =
            s.runs.iter().flat_map(|r| series.iter().map(move |(_, f, _)| f(r))).fold(0.0, f64::max) * 1.2 + 0.1;
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..max_m * 1.05, 0.0..max_y)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc(format!("agents (M), {} objects in all", s.objects))
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_desc(unit)
            .draw()
            .map_err(|e| err(&e))?;
        for (name, value, color) in series {
            let data: Vec<(f64, f64)> = s.runs.iter().map(|r| (r.agents as f64, value(r))).collect();
            chart
                .draw_series(LineSeries::new(data.clone(), color.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
            chart.draw_series(data.into_iter().map(|p| Circle::new(p, 4, color.filled()))).map_err(|e| err(&e))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
