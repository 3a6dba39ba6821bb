//! The agent's HTTP server loop, bounded so that a slow or flooding client on the node's
//! network cannot starve the kubelet's health probes or exhaust the agent's file
//! descriptors:
//! - a cap on the connections of one peer address (a quarter of the total): a peer at
//!   its cap loses its own oldest connection to make room for its new one, so one
//!   flooding address churns through its own share and never through the others';
//! - a cap on all open connections: reached, the oldest connection is closed;
//! - a deadline for a request's head, a cap on its size, a deadline for each response,
//!   and a longest life for a connection.

use std::{collections::VecDeque, convert::Infallible, net::IpAddr, sync::Arc, time::Duration};

use axum::{Router, body::Body, http::StatusCode, response::IntoResponse};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tracing::{debug, warn};

/// Settings of the agent's HTTP server.
#[derive(Clone, Debug)]
pub struct HttpOptions {
    /// Require a reviewed bearer token on `/metrics` and `/debug/table` (see `auth`).
    pub authenticate: bool,
    /// Most connections open at once; beyond it the oldest is closed. One peer address
    /// may hold a quarter of them (at least one); beyond that its own oldest is closed.
    pub max_connections: usize,
    /// Time a client has to send a request's headers.
    pub header_timeout: Duration,
    /// Largest request head (request line and headers) in bytes; larger gets 431.
    pub max_header_bytes: usize,
    /// Time a response may take (a token review included); then 503.
    pub request_timeout: Duration,
    /// Longest a connection stays open, however busy.
    pub connection_lifetime: Duration,
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self {
            authenticate: true,
            max_connections: 128,
            header_timeout: Duration::from_secs(5),
            max_header_bytes: 16 * 1024,
            request_timeout: Duration::from_secs(10),
            connection_lifetime: Duration::from_secs(120),
        }
    }
}

/// The open connections in the order they were accepted: id, peer address, and the
/// token that closes it.
type Open = Arc<std::sync::Mutex<VecDeque<(u64, IpAddr, CancellationToken)>>>;

/// Makes room for a connection from `peer`: closes the peer's oldest connections while
/// it holds its share, then the oldest of all while the total is at the cap.
fn make_room(open: &mut VecDeque<(u64, IpAddr, CancellationToken)>, peer: IpAddr, max_connections: usize) {
    let total = max_connections.max(1);
    let per_peer = (total / 4).max(1);
    let mut of_peer = open.iter().filter(|(_, ip, _)| *ip == peer).count();
    while of_peer >= per_peer {
        let Some(at) = open.iter().position(|(_, ip, _)| *ip == peer) else { break };
        if let Some((_, _, oldest)) = open.remove(at) {
            oldest.cancel();
        }
        of_peer -= 1;
    }
    while open.len() >= total {
        let Some((_, _, oldest)) = open.pop_front() else { break };
        oldest.cancel();
    }
}

/// Serves `app` on `listener` within `options`' bounds until `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, app: Router, options: HttpOptions, shutdown: CancellationToken) {
    let open: Open = Arc::default();
    let mut next_id = 0u64;
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, or the peer gave up already: wait a little
                    // rather than spinning, then accept again.
                    warn!(%error, "could not accept an HTTP connection");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        next_id += 1;
        let id = next_id;
        let close = shutdown.child_token();
        {
            let mut open = open.lock().unwrap_or_else(|p| p.into_inner());
            make_room(&mut open, peer.ip(), options.max_connections);
            open.push_back((id, peer.ip(), close.clone()));
        }
        let app = app.clone();
        let options = options.clone();
        let open = open.clone();
        tokio::spawn(async move {
            let request_timeout = options.request_timeout;
            let service = service_fn(move |request: hyper::Request<Incoming>| {
                let app = app.clone();
                async move {
                    let response = tokio::time::timeout(request_timeout, app.oneshot(request.map(Body::new))).await;
                    Ok::<_, Infallible>(match response {
                        Ok(Ok(response)) => response,
                        Ok(Err(never)) => match never {},
                        Err(_) => {
                            (StatusCode::SERVICE_UNAVAILABLE, "the agent did not answer in time\n").into_response()
                        }
                    })
                }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(options.header_timeout)
                .max_header_size(options.max_header_bytes)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                result = connection => {
                    if let Err(error) = result {
                        debug!(%peer, %error, "HTTP connection ended with an error");
                    }
                }
                _ = close.cancelled() => debug!(%peer, "HTTP connection closed to make room or on shutdown"),
                _ = tokio::time::sleep(options.connection_lifetime) => debug!(%peer, "HTTP connection closed after its longest life"),
            }
            open.lock().unwrap_or_else(|p| p.into_inner()).retain(|(other, _, _)| *other != id);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(peers: &[u8]) -> VecDeque<(u64, IpAddr, CancellationToken)> {
        peers
            .iter()
            .enumerate()
            .map(|(i, p)| (i as u64, IpAddr::from([127, 0, 0, *p]), CancellationToken::new()))
            .collect()
    }

    #[test]
    fn a_peer_at_its_share_loses_its_own_oldest_connection() {
        // Cap 8: a peer's share is 2. Peer 2 holds two, peer 1 one.
        let mut connections = open(&[2, 1, 2]);
        let tokens: Vec<_> = connections.iter().map(|(_, _, t)| t.clone()).collect();
        make_room(&mut connections, IpAddr::from([127, 0, 0, 2]), 8);
        assert!(tokens[0].is_cancelled(), "peer 2's oldest closed");
        assert!(!tokens[1].is_cancelled() && !tokens[2].is_cancelled());
        assert_eq!(connections.len(), 2);
    }

    #[test]
    fn at_the_total_cap_the_oldest_of_all_goes() {
        let mut connections = open(&[1, 2, 3, 4]);
        let tokens: Vec<_> = connections.iter().map(|(_, _, t)| t.clone()).collect();
        make_room(&mut connections, IpAddr::from([127, 0, 0, 5]), 4);
        assert!(tokens[0].is_cancelled());
        assert!(tokens[1..].iter().all(|t| !t.is_cancelled()));
        assert_eq!(connections.len(), 3);
    }
}
