//! The `portassign` command line.

use std::{net::SocketAddr, process::ExitCode, sync::Arc};

use clap::{Parser, Subcommand};
use portassign::{
    acquire,
    agent::{self, probe::SocketProbe},
    api, checker, lookup,
    range::{DEFAULT_RANGE, NODEPORT_RANGE, PortPool, PortRange, PortRanges, RangeError},
    telemetry::{self, LogFormat},
};
use tracing::{error, info};

/// Hands out host ports on Kubernetes nodes, verified free on each node.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent for one node (the DaemonSet's command).
    Agent(AgentArgs),
    /// Print the PortAssignment CustomResourceDefinition as YAML.
    Crd,
    /// Which port a key holds (and on which node, in which object).
    Key(KeyArgs),
    /// Which key holds a port on a node.
    Port(PortArgs),
    /// Release PortAssignments of nodes that no longer exist (run once per cluster).
    Janitor(JanitorArgs),
    /// Check every guarantee against the statuses and the agents' tables; exit 1 on a violation.
    Check(CheckArgs),
    /// Get a port for a key on a node: prints it once the node's agent has assigned it.
    Acquire(acquire::AcquireArgs),
    /// Release a key's port: removes what the key's acquire added.
    Release(acquire::ReleaseArgs),
    /// The kubelet side of the DRA driver (the agent pod's second container): registers
    /// with the kubelet, prepares claims by asking the agent, writes their CDI specs.
    KubeletPlugin(KubeletPluginArgs),
}

#[derive(clap::Args)]
struct KubeletPluginArgs {
    /// The agent's socket (its --dra-socket).
    #[arg(long, env = "PORTASSIGN_DRA_SOCKET", default_value = "/run/portassign/agent.sock")]
    agent_socket: std::path::PathBuf,
    /// The kubelet's plugin registration directory.
    #[arg(long, default_value = "/var/lib/kubelet/plugins_registry")]
    registry_dir: std::path::PathBuf,
    /// The directory of the driver's own socket.
    #[arg(long, default_value = "/var/lib/kubelet/plugins/ports.portassign.io")]
    plugin_dir: std::path::PathBuf,
    /// The CDI spec directory the container runtime reads.
    #[arg(long, default_value = "/var/run/cdi")]
    cdi_dir: std::path::PathBuf,
    /// Log line format.
    #[arg(long, env = "PORTASSIGN_LOG_FORMAT", value_enum, default_value = "human")]
    log_format: LogFormat,
}

#[derive(clap::Args)]
struct JanitorArgs {
    /// Seconds a node must be missing before its objects are released.
    #[arg(long, env = "PORTASSIGN_JANITOR_GRACE", default_value_t = 300)]
    grace: u64,
    /// Seconds between two looks.
    #[arg(long, env = "PORTASSIGN_JANITOR_INTERVAL", default_value_t = 30)]
    interval: u64,
    /// Namespace of the Lease that makes one janitor act at a time.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Identity in the Lease (the pod name in a cluster; default: the host name).
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,
    /// Log line format.
    #[arg(long, env = "PORTASSIGN_LOG_FORMAT", value_enum, default_value = "human")]
    log_format: LogFormat,
}

#[derive(clap::Args)]
struct CheckArgs {
    /// An agent's HTTP address (http://HOST:PORT) whose /debug/table must agree with the statuses. Repeatable.
    #[arg(long = "agent")]
    agents: Vec<String>,
    /// The allocation range of a node, NODE=FIRST-LAST (default: from its agent's table). Repeatable.
    #[arg(long = "range", value_parser = parse_node_range)]
    ranges: Vec<(String, PortRange)>,
    /// Seconds after which an object still deleting counts as stuck.
    #[arg(long, default_value_t = 60)]
    stuck_after: u64,
    /// Do not require every object to be reconciled at its current generation.
    #[arg(long)]
    unsettled: bool,
    /// File holding the bearer token shown to the agents for /debug/table (default: the
    /// kubeconfig user's token). Needed when the kubeconfig authenticates otherwise
    /// (client certificate, exec plugin): e.g. the output of `kubectl create token SA`
    /// for a ServiceAccount bound to the chart's table-reader ClusterRole.
    #[arg(long, env = "PORTASSIGN_TOKEN_FILE")]
    token_file: Option<std::path::PathBuf>,
}

/// `--node-port-range`: one range, or none.
#[derive(Clone, Copy, Debug)]
struct NodePortRange(Option<PortRange>);

fn parse_node_port_range(text: &str) -> Result<NodePortRange, String> {
    let ranges: PortRanges = text.parse().map_err(|e: RangeError| e.to_string())?;
    match ranges.ranges() {
        [] => Ok(NodePortRange(None)),
        [one] => Ok(NodePortRange(Some(*one))),
        _ => Err(format!("{text:?}: expected one range FIRST-LAST (or none)")),
    }
}

fn parse_node_range(text: &str) -> Result<(String, PortRange), String> {
    let (node, range) = text.split_once('=').ok_or("expected NODE=FIRST-LAST")?;
    Ok((node.to_owned(), range.parse().map_err(|e: RangeError| e.to_string())?))
}

#[derive(clap::Args)]
struct LookupArgs {
    /// Look only in this namespace (default: all namespaces).
    #[arg(short, long)]
    namespace: Option<String>,
    /// Output format.
    #[arg(short, long, value_enum, default_value = "table")]
    output: lookup::Format,
}

#[derive(clap::Args)]
struct KeyArgs {
    /// The key, for example team-a/sandbox-7.
    key: String,
    #[command(flatten)]
    lookup: LookupArgs,
}

#[derive(clap::Args)]
struct PortArgs {
    /// The port number.
    port: u16,
    /// The node the port is on (ports are unique per node; default: every node).
    #[arg(long)]
    node: Option<String>,
    #[command(flatten)]
    lookup: LookupArgs,
}

#[derive(clap::Args)]
struct AgentArgs {
    /// Node whose PortAssignments this agent serves (from the downward API in a pod).
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// Ports to assign from: FIRST-LAST inclusive, or several separated by commas
    /// (20000-24999,26000-26999). The default stays below the NodePort range
    /// (30000-32767) and Linux's default ephemeral range (32768-60999).
    #[arg(long, env = "PORTASSIGN_PORT_RANGE", default_value = DEFAULT_RANGE)]
    port_range: PortRanges,
    /// Ports never assigned, although in the ranges: ports and ranges separated by
    /// commas (22,25000-25099).
    #[arg(long, env = "PORTASSIGN_EXCLUDE_PORTS", default_value = "")]
    exclude_ports: PortRanges,
    /// The cluster's NodePort range (kube-apiserver --service-node-port-range), never
    /// assigned; `none` to assign from it anyway.
    #[arg(long, env = "PORTASSIGN_NODE_PORT_RANGE", default_value = NODEPORT_RANGE, value_parser = parse_node_port_range)]
    node_port_range: NodePortRange,
    /// Objects reconciled at the same time.
    #[arg(long, env = "PORTASSIGN_CONCURRENCY", default_value_t = 256, value_parser = clap::value_parser!(u16).range(1..))]
    concurrency: u16,
    /// Address of the HTTP server for /healthz, /readyz, /metrics and /debug/table.
    #[arg(long, env = "PORTASSIGN_LISTEN", default_value = "0.0.0.0:9477")]
    listen: SocketAddr,
    /// Name of this agent in the events it records (the pod name in a cluster).
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,
    /// Name of the node lock, an abstract Unix socket in the agent's network namespace:
    /// of the agents sharing a name, one allocates and the others wait for it to go.
    /// Default: portassign-agent/NODE_NAME.
    #[arg(long, env = "PORTASSIGN_LOCK_NAME", value_parser = clap::builder::NonEmptyStringValueParser::new())]
    lock_name: Option<String>,
    /// Log line format.
    #[arg(long, env = "PORTASSIGN_LOG_FORMAT", value_enum, default_value = "human")]
    log_format: LogFormat,
    /// Longest wait, in seconds, before a failed reconcile is retried. Failures back off
    /// exponentially per object (from 0.2 s when transient, 1 s when refused) up to this.
    #[arg(long, env = "PORTASSIGN_MAX_RETRY_DELAY", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    max_retry_delay: u64,
    /// API writes per second the agent sustains at most (status, finalizer, events).
    #[arg(long, env = "PORTASSIGN_WRITE_RATE", default_value_t = agent::throttle::DEFAULT_RATE, value_parser = parse_rate)]
    write_rate: f64,
    /// API writes the agent may make at once after a quiet spell, above --write-rate.
    #[arg(long, env = "PORTASSIGN_WRITE_BURST", default_value_t = agent::throttle::DEFAULT_BURST, value_parser = clap::value_parser!(u32).range(1..))]
    write_burst: u32,
    /// Serve /metrics and /debug/table to anyone, without a token (for a local run only:
    /// on a node the port is reachable by everything that reaches the node).
    #[arg(long, env = "PORTASSIGN_DISABLE_HTTP_AUTH")]
    disable_http_auth: bool,
    /// Most HTTP connections open at once; past it the oldest is closed.
    #[arg(long, env = "PORTASSIGN_HTTP_MAX_CONNECTIONS", default_value_t = 128, value_parser = clap::value_parser!(u16).range(1..))]
    http_max_connections: u16,
    /// Ports pods get through Dynamic Resource Allocation (driver ports.portassign.io),
    /// same syntax as --port-range and disjoint from it. Set, the agent publishes the
    /// node's ResourceSlice and serves the kubelet plugin on --dra-socket.
    #[arg(long, env = "PORTASSIGN_DRA_PORT_RANGE")]
    dra_port_range: Option<PortRanges>,
    /// The Unix socket the kubelet plugin (`portassign kubelet-plugin`) reaches the agent on.
    #[arg(long, env = "PORTASSIGN_DRA_SOCKET", default_value = "/run/portassign/agent.sock")]
    dra_socket: std::path::PathBuf,
}

fn parse_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 => Ok(rate),
        _ => Err(format!("{text:?} is not a positive number of writes per second")),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    match parse().command {
        Command::Crd => match api::crd_yaml() {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("error: could not render the CRD: {error}");
                ExitCode::FAILURE
            }
        },
        Command::Key(args) => run_lookup(lookup::Query::Key(args.key), None, args.lookup).await,
        Command::Port(args) => {
            let node = args.node.clone();
            run_lookup(lookup::Query::Port { port: args.port, node: args.node }, node, args.lookup).await
        }
        Command::Check(args) => run_check(args).await,
        Command::Acquire(args) => acquire::acquire(args).await,
        Command::Release(args) => acquire::release(args).await,
        Command::KubeletPlugin(args) => {
            telemetry::init(args.log_format);
            logged_exit(run_kubelet_plugin(args).await)
        }
        Command::Janitor(args) => {
            telemetry::init(args.log_format);
            logged_exit(run_janitor(args).await)
        }
        Command::Agent(args) => {
            telemetry::init(args.log_format);
            logged_exit(run_agent(args).await)
        }
    }
}

/// The exit code of a long-running command; its error goes to the log.
fn logged_exit(result: Result<(), String>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            error!("{message}");
            ExitCode::FAILURE
        }
    }
}

/// Parses the command line; installed as `kubectl-portassign`, the binary is a kubectl
/// plugin, so `kubectl portassign key K` runs `portassign key K`.
fn parse() -> Cli {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let plugin = args
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .is_some_and(|name| name.to_string_lossy().starts_with("kubectl-"));
    if plugin {
        args[0] = "kubectl portassign".into();
    }
    Cli::parse_from(args)
}

/// Runs the invariant checker once and prints every violation.
async fn run_check(args: CheckArgs) -> ExitCode {
    let config = match kube::Config::infer().await {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: no Kubernetes client configuration ({e}): set KUBECONFIG");
            return ExitCode::from(2);
        }
    };
    // Without a token the agents answer 401, unless their authentication is off (a local
    // run): say why up front, and ask them anyway.
    let token = if args.agents.is_empty() {
        None
    } else {
        checker::caller_token(&config, args.token_file.as_deref()).map_err(|e| eprintln!("warning: {e}")).ok()
    };
    let client = match kube::Client::try_from(config) {
        Ok(client) => client,
        Err(e) => {
            eprintln!("error: cannot build a Kubernetes client: {e}");
            return ExitCode::from(2);
        }
    };
    let objects = match lookup::list(client.clone(), None, None).await {
        Ok(objects) => objects,
        Err(e) => {
            eprintln!("error: could not list PortAssignments: {e}");
            return ExitCode::from(2);
        }
    };
    let mut tables = Vec::new();
    for agent in &args.agents {
        match checker::fetch_table(agent, token.as_deref()).await {
            Ok(table) => tables.push(table),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let expect = checker::Expectations {
        settled: !args.unsettled,
        stuck_after: std::time::Duration::from_secs(args.stuck_after),
        ranges: args.ranges.into_iter().collect(),
    };
    let mut violations = checker::check(&objects, &tables, &expect, k8s_openapi::jiff::Timestamp::now());
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::all(client.clone());
    let pods = match pods.list(&Default::default()).await {
        Ok(list) => list.items,
        Err(e) => {
            eprintln!("warning: could not list pods ({e}): pods declaring held ports are not checked");
            Vec::new()
        }
    };
    violations.extend(checker::pod_conflicts(&objects, &pods));
    for v in &violations {
        println!("VIOLATION {v}");
    }
    // Pods declaring a port of the ranges: the admission policy refuses new ones, so these
    // were made before it (or are exempt). Not violations: the agents never assign them.
    let kept = kept_ports(&client, &tables, &expect.ranges).await;
    let mut in_range = checker::pods_in_ranges(&pods, |node| node.and_then(|n| kept.nodes.get(n)).cloned());
    for policy in &kept.policies {
        let elsewhere = |node: Option<&str>| !node.is_some_and(|n| kept.nodes.contains_key(n));
        in_range.extend(checker::pods_in_ranges(&pods, |node| elsewhere(node).then(|| policy.clone())));
    }
    for pod in &in_range {
        println!("IN-RANGE {pod}");
    }
    if kept.policies.is_empty() && kept.nodes.is_empty() {
        eprintln!(
            "warning: no admission policy of the chart found and no agent given: pods declaring ports in portassign's ranges are not listed"
        );
    }
    println!(
        "checked {} PortAssignments and {} agent tables: {} violations, {} pod ports in the ranges",
        objects.len(),
        tables.len(),
        violations.len(),
        in_range.len()
    );
    if violations.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) }
}

/// The host ports the cluster keeps for portassign, by node where known.
struct Kept {
    /// From the agents' tables and `--range`.
    nodes: std::collections::HashMap<String, checker::KeptPorts>,
    /// From the chart's admission policies (one per release): every other node's.
    policies: Vec<checker::KeptPorts>,
}

/// What `check` knows of the ranges: each agent's table (its ranges and exclusions),
/// `--range NODE=...`, and for every other node the chart's admission policy, read from
/// the ValidatingAdmissionPolicies labelled `app.kubernetes.io/part-of=portassign`.
async fn kept_ports(
    client: &kube::Client,
    tables: &[checker::TableDocument],
    ranges: &std::collections::HashMap<String, PortRange>,
) -> Kept {
    use k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicy;
    use kube::ResourceExt as _;
    let mut nodes: std::collections::HashMap<String, checker::KeptPorts> = ranges
        .iter()
        .map(|(node, range)| {
            (node.clone(), checker::KeptPorts { ranges: (*range).into(), never: PortRanges::default() })
        })
        .collect();
    for table in tables {
        if let Some(kept) = checker::KeptPorts::from_table(table) {
            nodes.insert(table.node.clone(), kept);
        }
    }
    let policies: kube::Api<ValidatingAdmissionPolicy> = kube::Api::all(client.clone());
    let policies = match policies
        .list(&kube::api::ListParams::default().labels("app.kubernetes.io/part-of=portassign"))
        .await
    {
        Ok(list) => list.items.iter().filter_map(|p| checker::KeptPorts::from_policy(p.annotations())).collect(),
        Err(e) => {
            eprintln!("warning: could not list ValidatingAdmissionPolicies ({e}): the chart's ranges are not known");
            Vec::new()
        }
    };
    Kept { nodes, policies }
}

/// Prints what a lookup found; exit code 1 when nothing matches.
async fn run_lookup(query: lookup::Query, node: Option<String>, args: LookupArgs) -> ExitCode {
    let client = match kube::Client::try_default().await {
        Ok(client) => client,
        Err(e) => {
            eprintln!("error: no Kubernetes client configuration ({e}): set KUBECONFIG");
            return ExitCode::from(2);
        }
    };
    let objects = match lookup::list(client, args.namespace.as_deref(), node.as_deref()).await {
        Ok(objects) => objects,
        Err(e) => {
            eprintln!("error: could not list PortAssignments: {e}");
            return ExitCode::from(2);
        }
    };
    let matches = lookup::find(&objects, &query);
    if matches.is_empty() {
        let what = match &query {
            lookup::Query::Key(key) => format!("key {key:?} holds no port"),
            lookup::Query::Port { port, node: Some(node) } => format!("port {port} is not assigned on node {node}"),
            lookup::Query::Port { port, node: None } => format!("port {port} is not assigned on any node"),
        };
        eprintln!("{what}");
        return ExitCode::from(1);
    }
    print!("{}", lookup::render(&matches, args.output));
    ExitCode::SUCCESS
}

async fn run_janitor(args: JanitorArgs) -> Result<(), String> {
    let client = kube::Client::try_default().await.map_err(|e| {
        format!("no Kubernetes client configuration ({e}): set KUBECONFIG or run in a pod with a service account")
    })?;
    let identity = args
        .pod_name
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|h| h.trim().to_owned()))
        .unwrap_or_else(|| format!("janitor-{}", std::process::id()));
    let config = portassign::janitor::Config {
        grace: std::time::Duration::from_secs(args.grace),
        interval: std::time::Duration::from_secs(args.interval.max(1)),
        lease_namespace: args.lease_namespace,
        identity,
        lease_duration: std::time::Duration::from_secs(15),
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let token = shutdown.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        token.cancel();
    });
    portassign::janitor::run(client, config, shutdown).await;
    Ok(())
}

async fn run_kubelet_plugin(args: KubeletPluginArgs) -> Result<(), String> {
    let mut config = portassign_kubelet_plugin::Config::new(args.agent_socket);
    config.registry_dir = args.registry_dir;
    config.plugin_dir = args.plugin_dir;
    config.cdi_dir = args.cdi_dir;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let token = shutdown.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        token.cancel();
    });
    portassign_kubelet_plugin::serve(config, shutdown).await.map_err(|e| e.to_string())
}

async fn run_agent(args: AgentArgs) -> Result<(), String> {
    let client = kube::Client::try_default().await.map_err(|e| {
        format!("no Kubernetes client configuration ({e}): set KUBECONFIG or run in a pod with a service account")
    })?;
    let dra = match args.dra_port_range {
        None => None,
        Some(ranges) => {
            let pool = PortPool::new(ranges, args.exclude_ports.clone(), args.node_port_range.0)
                .map_err(|e| format!("invalid --dra-port-range: {e}"))?;
            Some(agent::dra::Config { pool, socket: args.dra_socket })
        }
    };
    let pool = PortPool::new(args.port_range, args.exclude_ports, args.node_port_range.0)
        .map_err(|e| format!("invalid port settings: {e}"))?;
    if let Some(dra) = &dra
        && let Some(port) = (0..dra.pool.len()).map(|i| dra.pool.port_at(i)).find(|port| pool.contains(*port))
    {
        return Err(format!(
            "--dra-port-range {} and --port-range {} share port {port}: the scheduler counts the DRA range's ports, so no key may take one; make them disjoint",
            dra.pool.ranges(),
            pool.ranges()
        ));
    }
    let config = agent::Config {
        node_name: args.node_name,
        pool,
        concurrency: args.concurrency,
        listen: args.listen,
        instance: args.pod_name,
        lock_name: args.lock_name,
        retry: agent::backoff::Policy::with_cap(std::time::Duration::from_secs(args.max_retry_delay)),
        writes: agent::throttle::Rate { per_second: args.write_rate, burst: args.write_burst },
        http: agent::server::HttpOptions {
            authenticate: !args.disable_http_auth,
            max_connections: args.http_max_connections.into(),
            ..Default::default()
        },
        faults: Default::default(),
        dra,
    };
    let running = agent::start(client, config, Arc::new(SocketProbe::detect())).await.map_err(|e| e.to_string())?;
    let token = running.shutdown_token();
    tokio::spawn(async move {
        shutdown_signal().await;
        info!("shutting down: finishing in-flight reconciles");
        token.cancel();
    });
    running.wait().await.map_err(|e| e.to_string())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
