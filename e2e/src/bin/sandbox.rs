//! A stand-in for a sandbox, for the kind scenarios: listens on the port its key was
//! given (on every address of the node, as a hostNetwork pod) and answers each
//! connection with its key, so a test can tell that it reached this sandbox and not
//! something else holding the port.
//!
//! Usage: `sandbox PORT KEY`

use std::{
    io::Write,
    net::{Ipv6Addr, SocketAddr, TcpListener},
    process::ExitCode,
};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(port), Some(key)) = (args.first().and_then(|p| p.parse::<u16>().ok()), args.get(1)) else {
        eprintln!("usage: sandbox PORT KEY");
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
