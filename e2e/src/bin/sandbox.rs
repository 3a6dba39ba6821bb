//! A stand-in for a sandbox, for the kind scenarios: listens on the port its key was
//! given (on every address of the node, as a hostNetwork pod) and answers each
//! connection with its key, so a test can tell that it reached this sandbox and not
//! something else holding the port.
//!
//! Usage: `sandbox PORT KEY`, or `sandbox env KEY` for the port in `PORTASSIGN_PORT`
//! (what a pod that asked for its port through Dynamic Resource Allocation is given).

use std::{
    io::Write,
    net::{Ipv6Addr, SocketAddr, TcpListener},
    process::ExitCode,
};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let port = match args.first().map(String::as_str) {
        Some("env") => std::env::var("PORTASSIGN_PORT").ok(),
        other => other.map(str::to_owned),
    };
    let (Some(port), Some(key)) = (port.and_then(|p| p.parse::<u16>().ok()), args.get(1)) else {
        eprintln!("usage: sandbox PORT|env KEY (env: the port in PORTASSIGN_PORT)");
        return ExitCode::from(2);
    };
    // [::] takes IPv4 too (dual stack); 0.0.0.0 where the node has no IPv6.
    let listener = TcpListener::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)))
        .or_else(|_| TcpListener::bind(("0.0.0.0", port)));
    let listener = match listener {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("sandbox {key}: cannot listen on port {port}: {e}");
            return ExitCode::from(1);
        }
    };
    eprintln!("sandbox {key}: listening on port {port}");
    for mut stream in listener.incoming().flatten() {
        let _ = writeln!(stream, "{key}");
    }
    ExitCode::SUCCESS
}
