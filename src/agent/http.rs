//! The agent's HTTP server (`/healthz`, `/readyz`, `/metrics`, `/debug/table`), the
//! `/debug/table` document it serves, and the client that reads it back (the checker
//! and the tests): one owner for the document on both sides of the wire.
//!
//! `/metrics` and `/debug/table` answer only callers with a token the API server
//! accepts and authorizes for them (see [`super::auth`]); `/healthz` and `/readyz` are
//! open, because the kubelet probes them without credentials.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use axum::{
    Json, Router,
    extract::{RawQuery, State},
    http::StatusCode,
    middleware::from_fn_with_state,
    response::{IntoResponse, Response},
    routing::get as route_get,
};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::{client::legacy::Client as HttpClient, rt::TokioExecutor};
use serde::{Deserialize, Serialize};

use super::{auth::Access, node_ports::PodPortEntry, reconcile::Context};
use crate::api::Protocol;

/// Path of the agent's table document.
pub const DEBUG_TABLE_PATH: &str = "/debug/table";

/// The agent's in-memory table as served on `/debug/table`: what the invariant checker
/// compares with the statuses.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TableDocument {
    /// The agent's node.
    pub node: String,
    /// The agent's ranges, `FIRST-LAST[,FIRST-LAST...]`.
    pub range: String,
    /// Whether the agent had rebuilt its table.
    pub ready: bool,
    /// Every port it holds.
    pub ports: Vec<TableEntry>,
    /// Ports of the ranges never assigned, by rule: `--exclude-ports`, the NodePort
    /// range, the kernel's reservations, pods' ports.
    #[serde(default)]
    pub skipped: Skipped,
    /// Keys holding a port that a pod of the node declares too.
    #[serde(default)]
    pub conflicts: Vec<ConflictEntry>,
    /// Why one port is or is not assigned (`/debug/table?port=N`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub explain: Option<Explanation>,
}

/// The rules that keep ports out, besides sockets.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Skipped {
    /// `--exclude-ports`.
    pub excluded_by_flag: String,
    /// `--node-port-range` (empty when not excluded).
    pub nodeport_range: String,
    /// `net.ipv4.ip_local_reserved_ports` as last read.
    pub kernel_reserved: String,
    /// Ports pods of the node declare.
    pub pod_ports: Vec<PodPortEntry>,
}

/// A key holding a port that a pod of the node declares too.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConflictEntry {
    /// The port.
    pub port: u16,
    /// Namespace of the object holding it.
    pub namespace: String,
    /// Name of the object holding it.
    pub name: String,
    /// The key holding it (it keeps it).
    pub key: String,
    /// The pod, `namespace/name`.
    pub pod: String,
    /// The pod's protocol for it.
    pub protocol: String,
}

/// Why a port is or is not assigned.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Explanation {
    /// The port asked about.
    pub port: u16,
    /// Whether a new key could get it now (no rule below applies).
    pub assignable: bool,
    /// Every rule that keeps it out, in the order the agent checks them.
    pub rules: Vec<Rule>,
}

/// One rule that keeps a port out.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Rule {
    /// `outside-ranges`, `excluded-by-flag`, `nodeport-range`, `held`, `kernel-reserved`,
    /// `pod-host-port` or `socket-in-use`.
    pub rule: String,
    /// Details: the range, the holder, the pod, the protocol.
    pub detail: String,
}

/// One port held in an agent's memory.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct TableEntry {
    /// The port.
    pub port: u16,
    /// Namespace of the holder.
    pub namespace: String,
    /// Name of the holder.
    pub name: String,
    /// Key of the holder.
    pub key: String,
}

#[derive(Clone)]
struct Server {
    ctx: Arc<Context>,
    ready: Arc<AtomicBool>,
}

/// The routes of the agent's HTTP server; with `access`, `/metrics` and `/debug/table`
/// are behind it.
pub fn router(ctx: Arc<Context>, ready: Arc<AtomicBool>, access: Option<Arc<Access>>) -> Router {
    let mut protected =
        Router::new().route("/metrics", route_get(metrics)).route(DEBUG_TABLE_PATH, route_get(debug_table));
    if let Some(access) = access {
        protected = protected.route_layer(from_fn_with_state(access, super::auth::require));
    }
    Router::new()
        .route("/healthz", route_get(|| async { "ok" }))
        .route("/readyz", route_get(readyz))
        .merge(protected)
        .with_state(Server { ctx, ready })
}

async fn readyz(State(server): State<Server>) -> impl IntoResponse {
    if server.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "rebuilding the port table")
    }
}

async fn metrics(State(server): State<Server>) -> impl IntoResponse {
    ([("content-type", "text/plain; version=0.0.4")], server.ctx.metrics.render())
}

async fn debug_table(State(server): State<Server>, RawQuery(query): RawQuery) -> Response {
    let asked = match query.as_deref().map(parse_port_query).transpose() {
        Ok(asked) => asked.flatten(),
        Err(message) => return (StatusCode::BAD_REQUEST, message).into_response(),
    };
    let mut document = table_document(&server);
    if let Some(port) = asked {
        document.explain = Some(explain(&server.ctx, port));
    }
    Json(document).into_response()
}

/// `port=N` (other parameters are ignored).
fn parse_port_query(query: &str) -> Result<Option<u16>, String> {
    for pair in query.split('&') {
        if let Some(value) = pair.strip_prefix("port=") {
            return match value.parse::<u16>() {
                Ok(port) if port > 0 => Ok(Some(port)),
                _ => Err(format!("port={value}: expected a port number between 1 and 65535\n")),
            };
        }
    }
    Ok(None)
}

/// Every rule that keeps `port` out. The sockets are probed (both protocols) only here,
/// on request; the lookups are the allocator's own.
fn explain(ctx: &Context, port: u16) -> Explanation {
    let mut rules = Vec::new();
    let mut rule = |rule: &str, detail: String| rules.push(Rule { rule: rule.to_owned(), detail });
    {
        let table = ctx.table();
        let node = ctx.node_ports();
        if let Some(exclusion) = table.pool().exclusion(port) {
            rule(exclusion.rule(), exclusion.to_string());
        }
        if let Some(holder) = table.holder(port) {
            rule("held", format!("key {} of {}", holder.key, holder.object));
        }
        if node.is_reserved(port) {
            rule("kernel-reserved", format!("listed in net.ipv4.ip_local_reserved_ports ({})", node.reserved_text()));
        }
        for (pod, declared) in node.takers(port) {
            let on = declared.host_ip.as_deref().map(|ip| format!(" on {ip}")).unwrap_or_default();
            rule("pod-host-port", format!("pod {pod} declares it for {}{on}", declared.protocol.as_str()));
        }
    }
    for (protocol, name) in [(Protocol::Tcp, "TCP"), (Protocol::Udp, "UDP")] {
        if !ctx.probe.is_free(port, protocol) {
            rule("socket-in-use", format!("a socket on the node holds it for {name}"));
        }
    }
    Explanation { port, assignable: rules.is_empty(), rules }
}

fn table_document(server: &Server) -> TableDocument {
    let table = server.ctx.table();
    let node = server.ctx.node_ports();
    let ports = table
        .entries()
        .into_iter()
        .map(|(port, h)| TableEntry {
            port,
            namespace: h.object.namespace.clone(),
            name: h.object.name.clone(),
            key: h.key.clone(),
        })
        .collect();
    let pool = table.pool();
    let skipped = Skipped {
        excluded_by_flag: pool.excluded().to_string(),
        nodeport_range: pool.node_port().map(|r| r.to_string()).unwrap_or_default(),
        kernel_reserved: node.reserved_text().to_owned(),
        pod_ports: node.pod_ports(),
    };
    let conflicts = node
        .conflicts(&table)
        .into_iter()
        .map(|c| ConflictEntry {
            port: c.port,
            namespace: c.object.namespace,
            name: c.object.name,
            key: c.key,
            pod: c.pod.to_string(),
            protocol: c.protocol.as_str().to_owned(),
        })
        .collect();
    TableDocument {
        node: server.ctx.node_name.clone(),
        range: pool.ranges().to_string(),
        ready: server.ready.load(Ordering::SeqCst),
        ports,
        skipped,
        conflicts,
        explain: None,
    }
}

/// Why a GET against an agent failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The URL is not `http://HOST:PORT/PATH`.
    #[error("{url} is not an http:// URL: {source}")]
    Url {
        /// The URL.
        url: String,
        /// Why.
        #[source]
        source: hyper::http::uri::InvalidUri,
    },
    /// No answer (refused, reset, timed out).
    #[error("GET {url}: {source}")]
    Request {
        /// The URL.
        url: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// An answer other than 200.
    #[error("GET {url}: HTTP {status}: {body}")]
    Status {
        /// The URL.
        url: String,
        /// The status code.
        status: u16,
        /// The body.
        body: String,
    },
    /// The body is not the document expected.
    #[error("GET {url}: not the expected document: {source}")]
    Decode {
        /// The URL.
        url: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

/// How long a GET may take, connection included: an agent that does not answer by then
/// counts as unreachable rather than stalling the caller.
const GET_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// GET `url` (plain HTTP) without credentials: the status code and the body.
pub async fn get(url: &str) -> Result<(u16, String), FetchError> {
    get_with(url, None).await
}

/// GET `url` (plain HTTP), sending `token` as a bearer token if given: the status code
/// and the body.
pub async fn get_with(url: &str, token: Option<&str>) -> Result<(u16, String), FetchError> {
    let uri: hyper::Uri = url.parse().map_err(|source| FetchError::Url { url: url.to_owned(), source })?;
    let client = HttpClient::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let failed = |source: Box<dyn std::error::Error + Send + Sync>| FetchError::Request { url: url.to_owned(), source };
    let mut request = hyper::Request::get(uri);
    if let Some(token) = token {
        request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = request.body(Empty::new()).map_err(|e| failed(e.into()))?;
    let exchange = async {
        let response = client.request(request).await.map_err(|e| failed(e.into()))?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.map_err(|e| failed(e.into()))?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(GET_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|elapsed| Err(failed(format!("no answer within {GET_TIMEOUT:?} ({elapsed})").into())))
}

/// Reads the table of the agent at `base` (`http://HOST:PORT`), showing `token` (a
/// bearer token of an identity allowed to `get` `/debug/table`).
pub async fn fetch_table(base: &str, token: Option<&str>) -> Result<TableDocument, FetchError> {
    let url = format!("{}{DEBUG_TABLE_PATH}", base.trim_end_matches('/'));
    let (status, body) = get_with(&url, token).await?;
    if status != 200 {
        return Err(FetchError::Status { url, status, body });
    }
    serde_json::from_str(&body).map_err(|source| FetchError::Decode { url, source })
}
