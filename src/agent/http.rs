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
    Json, Router, extract::State, http::StatusCode, middleware::from_fn_with_state, response::IntoResponse,
    routing::get as route_get,
};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::{client::legacy::Client as HttpClient, rt::TokioExecutor};
use serde::{Deserialize, Serialize};

use super::{auth::Access, reconcile::Context};

/// Path of the agent's table document.
pub const DEBUG_TABLE_PATH: &str = "/debug/table";

/// The agent's in-memory table as served on `/debug/table`: what the invariant checker
/// compares with the statuses.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TableDocument {
    /// The agent's node.
    pub node: String,
    /// The agent's range, `FIRST-LAST`.
    pub range: String,
    /// Whether the agent had rebuilt its table.
    pub ready: bool,
    /// Every port it holds.
    pub ports: Vec<TableEntry>,
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

async fn debug_table(State(server): State<Server>) -> Json<TableDocument> {
    let table = server.ctx.table();
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
    Json(TableDocument {
        node: server.ctx.node_name.clone(),
        range: table.range().to_string(),
        ready: server.ready.load(Ordering::SeqCst),
        ports,
    })
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
