//! Allocator benchmark: assigning n ports, one key per call, through the real probe and
//! the real table, against a baseline that does what docs/design.md §1 says the seed does, and
//! against the probe's syscalls alone.
//!
//! `cargo bench -p portassign-bench --bench allocator -- --out FILE` measures and writes
//! JSON for `report`; the project side is the agent's own allocation path
//! (`NodeState::reserve`). With `--node-ports` it measures instead what the node's pods and
//! the kernel's reservations add per assigned port (docs/benchmarks.md, "Allocator with
//! pods and reservations") and prints that table. Run by `cargo test -p portassign-bench --benches` (no `--bench`
//! argument) it does one small run of each and fails if the project lost a key, so the
//! code stays compiled and exercised.
//!
//! A plain timing loop rather than a statistics harness: "assign n ports to an empty
//! table" is a one-shot workload whose cost grows as it runs, so every run starts from
//! an empty table and the median of whole runs is reported.

#[path = "support/results.rs"]
mod results;

use std::{
    collections::{HashMap, HashSet},
    hint::black_box,
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener},
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use clap::Parser;
use portassign::{
    agent::{
        node_ports::{DeclaredPort, PodPorts, PodProtocol},
        probe::{PortProbe, SocketProbe},
        state::NodeState,
    },
    api::{ObjectId, Protocol},
    range::{PortPool, PortRange},
};
use results::{Allocator, AllocatorSize};
use socket2::{Domain, Protocol as SockProtocol, Socket, Type};

/// 20,000 ports below the NodePort range and the kernel's ephemeral range, so 10,000
/// assignments use half of it and never run short.
const RANGE: (u16, u16) = (10000, 29999);

#[derive(Parser)]
struct Args {
    /// Where the results go (JSON); standard output without.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Measure only what the node's pods and reservations add, and print that table.
    #[arg(long)]
    node_ports: bool,
    /// Passed by `cargo bench`; without it, one small smoke run.
    #[arg(long)]
    bench: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match (args.bench, args.node_ports) {
        (true, true) => node_ports_measure(),
        (true, false) => measure(args.out),
        (false, _) => smoke(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("allocator benchmark failed: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// One small run of each side; fails if the project loses a key.
fn smoke() -> anyhow::Result<()> {
    let probe = SocketProbe::detect();
    let (project, busy, seed) = (project_run(200, &probe, false), project_run(200, &probe, true), seed_run(200)?);
    println!(
        "allocator smoke: 200 keys, project lost {} (busy node {}), seed baseline lost {}",
        project.lost, busy.lost, seed.lost
    );
    anyhow::ensure!(project.lost + busy.lost == 0, "the project lost keys: {} (busy node {})", project.lost, busy.lost);
    Ok(())
}

fn measure(out: Option<PathBuf>) -> anyhow::Result<()> {
    let probe = SocketProbe::detect();
    // Warm-up: page in the code and the kernel's socket paths.
    project_run(1000, &probe, false);
    let syscalls_ns = syscall_costs();
    for (what, ns) in &syscalls_ns {
        eprintln!("{ns:>8.0} ns  {what}");
    }
    // (n, project runs, seed runs): the seed's 10,000-key run takes seconds, so fewer.
    let mut sizes = Vec::new();
    for (n, project_reps, seed_reps) in [(1000usize, 15usize, 5usize), (10000, 7, 3)] {
        let mut size = AllocatorSize { n, ..AllocatorSize::default() };
        // Interleaved so that drift on a shared machine hits both sides alike.
        for rep in 0..project_reps.max(seed_reps) {
            if rep < project_reps {
                size.floor_runs_s.push(floor_run(n, &probe).as_secs_f64());
                let run = project_run(n, &probe, false);
                size.project_runs_s.push(run.total.as_secs_f64());
                size.project_tail_s.push(run.tail.as_secs_f64());
                size.project_lost.push(run.lost);
                let busy = project_run(n, &probe, true);
                anyhow::ensure!(busy.lost == 0, "the busy-node run lost {} keys", busy.lost);
                size.busy_runs_s.push(busy.total.as_secs_f64());
            }
            if rep < seed_reps {
                let run = seed_run(n)?;
                size.seed_runs_s.push(run.total.as_secs_f64());
                size.seed_tail_s.push(run.tail.as_secs_f64());
                size.seed_lost.push(run.lost);
                size.seed_file_bytes = run.file_bytes;
            }
        }
        eprintln!(
            "n={n}: probe floor {:.4}s, project {:.4}s (lost {:?}), seed {:.4}s (lost {:?})",
            results::median(&size.floor_runs_s),
            results::median(&size.project_runs_s),
            size.project_lost,
            results::median(&size.seed_runs_s),
            size.seed_lost
        );
        sizes.push(size);
    }
    let range = format!("{}-{}", RANGE.0, RANGE.1);
    let report = Allocator { range, probe_ipv6: probe.checks_ipv6(), syscalls_ns, sizes };
    match out {
        Some(path) => results::write(&path, &report),
        None => {
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
    }
}

/// One run: total time, time of the last tenth of the assignments, keys lost.
struct Run {
    total: Duration,
    tail: Duration,
    lost: usize,
    file_bytes: u64,
}

/// Times `assign(i)` for i in 0..n, noting when the last tenth starts.
fn timed(n: usize, mut assign: impl FnMut(usize)) -> (Duration, Duration) {
    let tail_from = n - n / 10;
    let started = Instant::now();
    let mut tail_started = started;
    for i in 0..n {
        if i == tail_from {
            tail_started = Instant::now();
        }
        assign(i);
    }
    let end = Instant::now();
    (end - started, end - tail_started)
}

/// The project: the agent's own allocation path (`NodeState::reserve` with the real
/// `SocketProbe`, one key per call, then `commit` as the reconciler does once the status
/// is written). Each key belongs to an object of its own, like a sandbox that asked for
/// one port. On a `busy` node, the allocator looks up the node's pods and reservations
/// before each probe.
///
/// A busy node is as busy as a full one: 110 pods (the kubelet's default maximum) with
/// two hostPorts each and 20 hostNetwork pods with five ports each, all TCP, 4,000 ports
/// reserved by the kernel in four ranges, 1,000 ports excluded by flag. They lie in the
/// upper part of the range, above the ports a 10,000-key run reaches, so both sides
/// probe the same ports and the difference is the cost of the lookups alone.
fn project_run(n: usize, probe: &SocketProbe, busy: bool) -> Run {
    let objects: Vec<ObjectId> = (0..n).map(|i| ObjectId::new("bench", format!("object-{i}"))).collect();
    let keys: Vec<String> = (0..n).map(|i| format!("bench/sandbox-{i}")).collect();
    let mut state =
        if busy { busy_node() } else { NodeState::new(PortRange::new(RANGE.0, RANGE.1).expect("range").into()) };
    let (total, tail) = timed(n, |i| {
        let (reservation, _) = state.reserve(&objects[i], Protocol::Tcp, [keys[i].as_str()], probe);
        state.commit(&objects[i], &reservation.ports);
    });
    // A key is kept when the table still gives it a port that nobody else holds, and
    // that port is one the node lets the agent assign.
    let (table, node) = (state.table(), state.node_ports());
    let mut seen = HashSet::new();
    let lost = objects
        .iter()
        .zip(&keys)
        .filter(|(object, key)| {
            let port = table.ports_of(object).and_then(|held| held.get(key.as_str())).copied();
            !port.is_some_and(|p| {
                table.holder(p).is_some_and(|h| h.key == **key && *h.object == **object)
                    && seen.insert(p)
                    && !node.taken(p, Protocol::Tcp)
                    && table.pool().contains(p)
            })
        })
        .count();
    Run { total, tail, lost, file_bytes: 0 }
}

/// The busy node's state (see [`project_run`]).
fn busy_node() -> NodeState {
    let range = PortRange::new(RANGE.0, RANGE.1).expect("range").into();
    let excluded = "29500-29999,23000-23499".parse().expect("excluded ports");
    let nodeport = Some(PortRange::new(30000, 32767).expect("NodePort range"));
    let mut state = NodeState::new(PortPool::new(range, excluded, nodeport).expect("pool"));
    for i in 0..130u16 {
        let (count, spacing) = if i < 110 { (2, 7) } else { (5, 3) };
        let ports = (0..count)
            .map(|j| DeclaredPort { port: 20100 + i * 60 + j * spacing, protocol: PodProtocol::Tcp, host_ip: None })
            .collect();
        state.set_pod(PodPorts { pod: format!("bench/pod-{i}").into(), uid: None, ports });
    }
    state.set_reserved("24000-24999,25500-26499,27000-27999,28500-29499").expect("reserved ports");
    state
}

/// Only what the node's pods and reservations add: the floor, plain runs and busy-node
/// runs, interleaved, at 1,000 and 10,000 ports; prints the report's section.
fn node_ports_measure() -> anyhow::Result<()> {
    let probe = SocketProbe::detect();
    project_run(1000, &probe, true);
    let mut sizes = Vec::new();
    for (n, reps) in [(1000usize, 15usize), (10000, 9)] {
        let mut size = AllocatorSize { n, ..AllocatorSize::default() };
        for _ in 0..reps {
            size.floor_runs_s.push(floor_run(n, &probe).as_secs_f64());
            size.project_runs_s.push(project_run(n, &probe, false).total.as_secs_f64());
            let busy = project_run(n, &probe, true);
            anyhow::ensure!(busy.lost == 0, "the busy-node run lost {} keys", busy.lost);
            size.busy_runs_s.push(busy.total.as_secs_f64());
        }
        sizes.push(size);
    }
    let state = busy_node();
    let lookup_ns = per_call(|port| {
        black_box(state.node_ports().taken(black_box(port), Protocol::Tcp));
    });
    print!("{}", results::busy_node_section(&sizes));
    println!("\nOne `NodePorts::taken` lookup on that node: {lookup_ns:.0} ns (median of 9 batches of 2,000).");
    Ok(())
}

/// The seed baseline in a fresh temporary directory.
fn seed_run(n: usize) -> anyhow::Result<Run> {
    let dir = std::env::temp_dir().join(format!("portassign-bench-seed-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let keys: Vec<String> = (0..n).map(|i| format!("bench/sandbox-{i}")).collect();
    let mut seed = SeedBaseline::new(dir.join("ports.json"));
    let mut failure = None;
    let (total, tail) = timed(n, |i| {
        if let Err(error) = seed.assign(&keys[i])
            && failure.is_none()
        {
            failure = Some(error);
        }
    });
    if let Some(error) = failure {
        anyhow::bail!("seed baseline: {error}");
    }
    let lost =
        keys.iter().filter(|k| seed.by_key.get(k.as_str()).is_none_or(|p| seed.by_port.get(p) != Some(k))).count();
    let file_bytes = std::fs::metadata(&seed.file).map(|m| m.len()).unwrap_or(0);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Run { total, tail, lost, file_bytes })
}

/// What docs/design.md §1 describes the seed doing, written for this benchmark: ask the OS for
/// `127.0.0.1:0`, close the socket, insert into a bimap where a port already mapped
/// silently moves to the new key, and rewrite the whole JSON file (non-atomic write)
/// after every assignment.
///
/// Where the seed does more work than needed (cloning the map before serialising, an
/// async file write through a thread pool) this version does less, so the ratios against
/// it are, if anything, flattering to the seed.
struct SeedBaseline {
    by_key: HashMap<String, u16>,
    by_port: HashMap<u16, String>,
    file: PathBuf,
}

#[derive(serde::Serialize)]
struct SeedFile<'a> {
    mappings: &'a HashMap<String, u16>,
}

impl SeedBaseline {
    fn new(file: PathBuf) -> Self {
        Self { by_key: HashMap::new(), by_port: HashMap::new(), file }
    }

    fn assign(&mut self, key: &str) -> io::Result<u16> {
        let port = {
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
            listener.local_addr()?.port()
        };
        self.insert(key, port);
        self.save()?;
        Ok(port)
    }

    /// The evicting insert: whoever held `port` before loses it without a word.
    fn insert(&mut self, key: &str, port: u16) {
        if let Some(previous) = self.by_port.insert(port, key.to_owned())
            && previous != key
        {
            self.by_key.remove(&previous);
        }
        if let Some(old) = self.by_key.insert(key.to_owned(), port)
            && old != port
        {
            self.by_port.remove(&old);
        }
    }

    fn save(&self) -> io::Result<()> {
        if let Some(parent) = self.file.parent()
            && !parent.exists()
        {
            std::fs::create_dir_all(parent)?;
        }
        let text = serde_json::to_string_pretty(&SeedFile { mappings: &self.by_key })?;
        std::fs::write(&self.file, text)
    }
}

/// The probe-syscall floor for `n` ports: `SocketProbe::is_free` alone on the ports the
/// project's run probes (the first `n` of the range, all free), no table.
fn floor_run(n: usize, probe: &SocketProbe) -> Duration {
    let started = Instant::now();
    for i in 0..n {
        black_box(probe.is_free(black_box(RANGE.0 + i as u16), Protocol::Tcp));
    }
    started.elapsed()
}

/// Nanoseconds per call of the socket operations a probe can be built from, each the
/// median of 9 batches of 2,000 calls on free ports of the range.
fn syscall_costs() -> Vec<(String, f64)> {
    let probe = SocketProbe::detect();
    let mut out = vec![(
        format!(
            "SocketProbe::is_free, TCP ({})",
            if probe.checks_ipv6() { "one dual-stack socket" } else { "IPv4 socket" }
        ),
        per_call(|port| {
            probe.is_free(port, Protocol::Tcp);
        }),
    )];
    out.push((
        "IPv4 TCP socket, bind 0.0.0.0:port, close".into(),
        per_call(|port| {
            let _ = bind_once(Domain::IPV4, port, None);
        }),
    ));
    if probe.checks_ipv6() {
        out.push((
            "IPv6-only TCP socket, bind [::]:port, close".into(),
            per_call(|port| {
                let _ = bind_once(Domain::IPV6, port, Some(true));
            }),
        ));
        out.push((
            "dual-stack TCP socket (IPV6_V6ONLY off), bind [::]:port, close".into(),
            per_call(|port| {
                let _ = bind_once(Domain::IPV6, port, Some(false));
            }),
        ));
    }
    out.push((
        "seed: TcpListener::bind(127.0.0.1:0), local_addr, close".into(),
        per_call(|_| {
            let _ = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).and_then(|l| l.local_addr());
        }),
    ));
    out
}

fn bind_once(domain: Domain, port: u16, only_v6: Option<bool>) -> io::Result<()> {
    let socket = Socket::new(domain, Type::STREAM.cloexec(), Some(SockProtocol::TCP))?;
    if let Some(only) = only_v6 {
        socket.set_only_v6(only)?;
    }
    let addr: SocketAddr = if domain == Domain::IPV6 {
        (Ipv6Addr::UNSPECIFIED, port).into()
    } else {
        (Ipv4Addr::UNSPECIFIED, port).into()
    };
    socket.bind(&addr.into())
}

fn per_call(mut op: impl FnMut(u16)) -> f64 {
    let span = usize::from(RANGE.1 - RANGE.0) + 1;
    let mut next = 0usize;
    let mut batches = Vec::new();
    for _ in 0..9 {
        let started = Instant::now();
        for _ in 0..2000 {
            op(black_box(RANGE.0 + (next % span) as u16));
            next += 1;
        }
        batches.push(started.elapsed().as_nanos() as f64 / 2000.0);
    }
    results::median(&batches)
}
