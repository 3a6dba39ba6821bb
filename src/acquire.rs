//! `portassign acquire` and `portassign release` (also `kubectl portassign …`): the
//! command-line face of [`PortClient`].

use std::{process::ExitCode, time::Duration};

use portassign_api::Protocol;
use portassign_client::{Error, Pool, PortClient, Release, exit};

/// Exit codes, as `--help` lists them.
pub const EXIT_CODES: &str = "Exit codes: 0 done; 1 other failure (API server unreachable, ...); 2 usage; \
3 invalid key; 4 forbidden; 5 no agent answered within --timeout (or the node is gone); 6 range exhausted on the node; \
7 port conflict on the node; 8 the pool cannot take the key (other node or protocol, being deleted, full).";

/// Arguments of `portassign acquire`.
#[derive(clap::Args)]
#[command(after_help = EXIT_CODES)]
pub struct AcquireArgs {
    /// The key, for example team-a/sandbox-7.
    pub key: String,
    /// The node the port is wanted on.
    #[arg(long)]
    pub node: String,
    #[command(flatten)]
    pub common: Common,
    /// How long to wait for the node's agent (for example 30s, 500ms, 2m).
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub timeout: Duration,
}

/// Arguments of `portassign release`.
#[derive(clap::Args)]
#[command(after_help = EXIT_CODES)]
pub struct ReleaseArgs {
    /// The key.
    pub key: String,
    /// The node of the default pool to release from (default: every pool of the
    /// namespace the key's acquire wrote to).
    #[arg(long)]
    pub node: Option<String>,
    #[command(flatten)]
    pub common: Common,
}

/// Options both commands take.
#[derive(clap::Args)]
pub struct Common {
    /// The pool (PortAssignment) to use (default: ports-NODE, created on first use).
    #[arg(long)]
    pub pool: Option<String>,
    /// Namespace of the pool (default: the kubeconfig context's).
    #[arg(short, long)]
    pub namespace: Option<String>,
    /// Protocol the port must be free for: TCP, UDP or TCPUDP.
    #[arg(long, value_parser = parse_protocol, default_value = "TCP")]
    pub protocol: Protocol,
    /// Output: text (acquire prints the port number alone), json or yaml.
    #[arg(short, long, value_enum, default_value = "text")]
    pub output: Output,
}

/// Output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// The port number (acquire) or a sentence (release).
    Text,
    /// A JSON object.
    Json,
    /// A YAML document.
    Yaml,
}

fn parse_protocol(text: &str) -> Result<Protocol, String> {
    serde_json::from_value(serde_json::Value::String(text.to_ascii_uppercase()))
        .map_err(|_| format!("{text:?} is not a protocol: TCP, UDP or TCPUDP"))
}

/// `30s`, `500ms`, `2m`, or plain seconds (`1.5`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, scale) = if let Some(n) = text.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60.0)
    } else {
        (text, 1.0)
    };
    match number.trim().parse::<f64>() {
        Ok(n) if n.is_finite() && n >= 0.0 && n * scale < 86_400.0 => Ok(Duration::from_secs_f64(n * scale)),
        _ => Err(format!("{text:?} is not a duration such as 30s, 500ms or 2m")),
    }
}

/// Connects with the kubeconfig (or the pod's service account) for `namespace`.
async fn connect(namespace: Option<&str>) -> Result<PortClient, ExitCode> {
    match kube::Client::try_default().await {
        Ok(client) => {
            let namespace = namespace.map(str::to_owned).unwrap_or_else(|| client.default_namespace().to_owned());
            Ok(PortClient::new(client, &namespace))
        }
        Err(e) => {
            eprintln!("error: no Kubernetes client configuration ({e}): set KUBECONFIG");
            Err(ExitCode::from(exit::OTHER))
        }
    }
}

fn failed(error: &Error) -> ExitCode {
    eprintln!("error: {error}");
    ExitCode::from(error.exit_code())
}

fn render<T: serde::Serialize>(value: &T, output: Output, text: impl FnOnce() -> String) -> String {
    match output {
        Output::Text => text(),
        Output::Json => serde_json::to_string_pretty(value).unwrap_or_default() + "\n",
        Output::Yaml => serde_saphyr::to_string(value).unwrap_or_default(),
    }
}

/// `portassign acquire`: prints the key's port once the agent has assigned it.
pub async fn acquire(args: AcquireArgs) -> ExitCode {
    // A bad key is refused before anything else (no cluster needed).
    if let Err(error) = portassign_client::validate_key(&args.key) {
        return failed(&error);
    }
    let client = match connect(args.common.namespace.as_deref()).await {
        Ok(client) => client.timeout(args.timeout),
        Err(code) => return code,
    };
    let mut pool = Pool::on_node(&args.node).protocol(args.common.protocol);
    if let Some(name) = args.common.pool {
        pool.name = name;
    }
    match client.acquire(&pool, &args.key).await {
        Ok(assignment) => {
            print!("{}", render(&assignment, args.common.output, || format!("{}\n", assignment.port)));
            ExitCode::SUCCESS
        }
        Err(error) => failed(&error),
    }
}

/// `portassign release`: removes what the key's acquire added.
pub async fn release(args: ReleaseArgs) -> ExitCode {
    if let Err(error) = portassign_client::validate_key(&args.key) {
        return failed(&error);
    }
    let client = match connect(args.common.namespace.as_deref()).await {
        Ok(client) => client,
        Err(code) => return code,
    };
    let pool = match (&args.common.pool, &args.node) {
        (Some(pool), _) => Some(pool.clone()),
        (None, Some(node)) => Some(Pool::on_node(node).protocol(args.common.protocol).name),
        (None, None) => None,
    };
    let result = match &pool {
        Some(pool) => client.release(pool, &args.key).await.map(|r| vec![r]),
        None => client.release_everywhere(&args.key).await,
    };
    let released = match result {
        Ok(released) => released,
        Err(error) => return failed(&error),
    };
    for r in released.iter().filter(|r| r.still_listed) {
        eprintln!(
            "note: key {:?} stays listed in pool {}/{} by another writer, so its port stays held",
            r.key, r.namespace, r.pool
        );
    }
    let text = || describe(&args.key, client.namespace(), &released);
    let out = match released.as_slice() {
        [one] => render(one, args.common.output, text),
        _ => render(&released, args.common.output, text),
    };
    print!("{out}");
    ExitCode::SUCCESS
}

fn describe(key: &str, namespace: &str, released: &[Release]) -> String {
    let removed: Vec<String> =
        released.iter().filter(|r| r.removed).map(|r| format!("{}/{}", r.namespace, r.pool)).collect();
    if removed.is_empty() {
        format!("key {key:?} was not held by an acquire in namespace {namespace}: nothing to release\n")
    } else {
        format!("released key {key:?} from pool {}\n", removed.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_and_without_units() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn protocols_parse_in_any_case() {
        assert_eq!(parse_protocol("tcp"), Ok(Protocol::Tcp));
        assert_eq!(parse_protocol("TCPUDP"), Ok(Protocol::TcpUdp));
        assert!(parse_protocol("sctp").unwrap_err().contains("TCP, UDP or TCPUDP"));
    }
}
