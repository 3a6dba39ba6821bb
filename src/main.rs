//! The `portassign` command line.

use std::{net::SocketAddr, process::ExitCode, sync::Arc};

use clap::{Parser, Subcommand};
use portassign::{
    agent::{self, DEFAULT_RANGE},
    api,
    probe::SocketProbe,
    table::PortRange,
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
}

#[derive(clap::Args)]
struct AgentArgs {
    /// Node whose PortAssignments this agent serves (from the downward API in a pod).
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// Ports to assign from, FIRST-LAST inclusive. The default stays below the NodePort
    /// range (30000-32767) and Linux's default ephemeral range (32768-60999).
    #[arg(long, env = "PORTASSIGN_PORT_RANGE", default_value = DEFAULT_RANGE)]
    port_range: PortRange,
    /// Objects reconciled at the same time.
    #[arg(long, env = "PORTASSIGN_CONCURRENCY", default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..))]
    concurrency: u16,
    /// Address of the HTTP server for /healthz, /readyz, /metrics and /debug/table.
    #[arg(long, env = "PORTASSIGN_LISTEN", default_value = "0.0.0.0:9477")]
    listen: SocketAddr,
    /// Name of this agent in the events it records (the pod name in a cluster).
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,
    /// Log line format.
    #[arg(long, env = "PORTASSIGN_LOG_FORMAT", value_enum, default_value = "human")]
    log_format: LogFormat,
}

#[tokio::main]
async fn main() -> ExitCode {
    match Cli::parse().command {
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
        Command::Agent(args) => {
            telemetry::init(args.log_format);
            match run_agent(args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(message) => {
                    error!("{message}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn run_agent(args: AgentArgs) -> Result<(), String> {
    let client = kube::Client::try_default().await.map_err(|e| {
        format!("no Kubernetes client configuration ({e}): set KUBECONFIG or run in a pod with a service account")
    })?;
    let config = agent::Config {
        node_name: args.node_name,
        range: args.port_range,
        concurrency: args.concurrency,
        listen: args.listen,
        instance: args.pod_name,
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
