//! The agent's HTTP routes: `/healthz`, `/readyz`, `/metrics`, `/debug/table` (the
//! document is defined in `portassign_api::table`, read back by the checker).
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
pub use portassign_api::table::{DEBUG_TABLE_PATH, TableDocument};

use super::{auth::Access, context::Context};

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
    ([("content-type", "text/plain; version=0.0.4")], server.ctx.metrics().render())
}

async fn debug_table(State(server): State<Server>, RawQuery(query): RawQuery) -> Response {
    let asked = match query.as_deref().map(parse_port_query).transpose() {
        Ok(asked) => asked.flatten(),
        Err(message) => return (StatusCode::BAD_REQUEST, message).into_response(),
    };
    let mut document = table_document(&server);
    if let Some(port) = asked {
        document.explain = Some(server.ctx.state().explain(port, server.ctx.probe()));
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

fn table_document(server: &Server) -> TableDocument {
    server.ctx.state().document(server.ctx.node_name(), server.ready.load(Ordering::SeqCst))
}
