//! An example launcher: gets a port for a sandbox from the node's agent, starts a
//! listener on it that stands in for the sandbox, shows it reachable, and releases the
//! port when it exits — at the end of `--seconds`, or on Ctrl-C / SIGTERM.
//!
//! ```sh
//! cargo run --example launcher -- --node NODE [--key team-a/sandbox-1] [-n default] [--seconds 0]
//! ```
//!
//! The cluster is the one of `KUBECONFIG`; the caller needs get, list, watch, create and
//! patch on PortAssignments in the namespace (README, "Getting a port from a program").

use std::{process::ExitCode, time::Duration};

use clap::Parser;
use portassign_client::{Pool, PortClient};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// Starts a stand-in sandbox on a port the node's agent assigned.
#[derive(Parser)]
struct Args {
    /// The node to get the port on (the agent of that node assigns it).
    #[arg(long)]
    node: String,
    /// The sandbox's key.
    #[arg(long, default_value = "team-a/sandbox-1")]
    key: String,
    /// Namespace of the pool (default: the kubeconfig context's).
    #[arg(short, long)]
    namespace: Option<String>,
    /// Run this long, then release and exit (0: until Ctrl-C).
    #[arg(long, default_value_t = 0)]
    seconds: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let kube = match kube::Client::try_default().await {
        Ok(kube) => kube,
        Err(e) => {
            eprintln!("launcher: no cluster ({e}): set KUBECONFIG");
            return ExitCode::FAILURE;
        }
    };
    let namespace = args.namespace.clone().unwrap_or_else(|| kube.default_namespace().to_owned());
    let ports = PortClient::new(kube, &namespace);
    let pool = Pool::on_node(&args.node);

    // 1. The port: acquire returns once the agent has recorded it in the pool's status.
    let assignment = match ports.acquire(&pool, &args.key).await {
        Ok(assignment) => assignment,
        Err(e) => {
            eprintln!("launcher: {e}");
            return ExitCode::from(e.exit_code());
        }
    };
    println!(
        "launcher: key {} holds port {} on node {} (pool {}/{})",
        assignment.key, assignment.port, assignment.node, assignment.namespace, assignment.pool
    );

    // 2. The "sandbox": a listener on the port, answering every connection with a greeting.
    let result = serve_until_stopped(&args, assignment.port).await;

    // 3. Release on every way out (the end of --seconds, Ctrl-C, SIGTERM, a failure).
    match ports.release(&pool.name, &args.key).await {
        Ok(r) if r.removed => println!("launcher: released {} from {}/{}", r.key, r.namespace, r.pool),
        Ok(r) => println!("launcher: {} was no longer held by this launcher", r.key),
        Err(e) => eprintln!("launcher: release failed: {e}"),
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("launcher: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Listens on `port`, proves the port reachable with a connection of its own, then serves
/// until the time is up or a signal arrives.
async fn serve_until_stopped(args: &Args, port: u16) -> std::io::Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", port)).await?;
    let greeting = format!("sandbox {} on port {port}\n", args.key);
    tokio::spawn(async move {
        while let Ok((mut connection, _)) = listener.accept().await {
            let _ = connection.write_all(greeting.as_bytes()).await;
        }
    });
    let mut answer = String::new();
    TcpStream::connect(("127.0.0.1", port)).await?.read_to_string(&mut answer).await?;
    println!("launcher: reachable: connected to 127.0.0.1:{port}, it says {:?}", answer.trim_end());

    let time_up = async {
        match args.seconds {
            0 => std::future::pending().await,
            n => tokio::time::sleep(Duration::from_secs(n)).await,
        }
    };
    println!("launcher: serving; Ctrl-C releases the port and exits");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = time_up => println!("launcher: time is up"),
        _ = tokio::signal::ctrl_c() => println!("launcher: interrupted"),
        _ = term.recv() => println!("launcher: terminated"),
    }
    Ok(())
}
