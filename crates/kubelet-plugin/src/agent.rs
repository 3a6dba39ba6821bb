//! The agent's DRA endpoints, over its Unix socket: one HTTP/1.1 connection per call.

use std::path::PathBuf;
use std::time::Duration;

use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use portassign_api::dra::{ClaimRef, Failure, PREPARE_PATH, Prepared, UNPREPARE_PATH};
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;

/// How long one call to the agent may take, connection included. The agent may have to
/// wait for its table to be loaded; the kubelet retries a claim that failed.
const TIMEOUT: Duration = Duration::from_secs(60);
/// How much of a body that is not the expected JSON goes into an error message.
const BODY_EXCERPT: usize = 200;

/// Why one call to the agent failed: the message goes to the kubelet as the claim's error.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AgentError {
    #[error("cannot connect to the portassign agent at {}: {source}", socket.display())]
    Connect { socket: PathBuf, source: std::io::Error },
    #[error("HTTP exchange with the portassign agent at {} failed: {source}", socket.display())]
    Http { socket: PathBuf, source: hyper::Error },
    #[error("the portassign agent at {} did not answer {path} within {}s", socket.display(), TIMEOUT.as_secs())]
    Timeout { socket: PathBuf, path: &'static str },
    #[error("the portassign agent refused {path} ({status}): {error}")]
    Refused { path: &'static str, status: StatusCode, error: String },
    #[error("the portassign agent answered {path} with a body that is not the expected JSON: {source}: {excerpt:?}")]
    BadJson { path: &'static str, source: serde_json::Error, excerpt: String },
}

/// The agent, reached through its Unix socket.
#[derive(Clone, Debug)]
pub(crate) struct Agent {
    socket: PathBuf,
}

impl Agent {
    pub(crate) fn new(socket: PathBuf) -> Self {
        Agent { socket }
    }

    /// Gives the claim its ports.
    pub(crate) async fn prepare(&self, claim: &ClaimRef) -> Result<Prepared, AgentError> {
        self.call(PREPARE_PATH, claim).await
    }

    /// Releases the claim's ports.
    pub(crate) async fn unprepare(&self, claim: &ClaimRef) -> Result<(), AgentError> {
        // The answer is `{}`: any JSON object will do.
        self.call::<serde_json::Map<String, serde_json::Value>>(UNPREPARE_PATH, claim).await.map(|_| ())
    }

    async fn call<T: DeserializeOwned>(&self, path: &'static str, claim: &ClaimRef) -> Result<T, AgentError> {
        let (status, body) = tokio::time::timeout(TIMEOUT, self.post(path, claim))
            .await
            .map_err(|_| AgentError::Timeout { socket: self.socket.clone(), path })??;
        if status.is_success() {
            serde_json::from_slice(&body).map_err(|source| AgentError::BadJson {
                path,
                source,
                excerpt: excerpt(&body),
            })
        } else {
            let error = match serde_json::from_slice::<Failure>(&body) {
                Ok(failure) => failure.error,
                Err(_) => excerpt(&body),
            };
            Err(AgentError::Refused { path, status, error })
        }
    }

    async fn post(&self, path: &'static str, claim: &ClaimRef) -> Result<(StatusCode, Bytes), AgentError> {
        let http = |source| AgentError::Http { socket: self.socket.clone(), source };
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|source| AgentError::Connect { socket: self.socket.clone(), source })?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(http)?;
        // Drives the connection; aborted when this call ends, or is dropped on a timeout.
        let _connection = AbortOnDrop(tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "agent connection ended with an error");
            }
        }));
        let body = serde_json::to_vec(claim).expect("a ClaimRef serializes");
        let request = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header(header::HOST, "localhost")
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "application/json")
            .body(Full::new(Bytes::from(body)))
            .expect("a valid request");
        let response = sender.send_request(request).await.map_err(http)?;
        let status = response.status();
        let body = response.into_body().collect().await.map_err(http)?.to_bytes();
        Ok((status, body))
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    match text.char_indices().nth(BODY_EXCERPT) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.into_owned(),
    }
}
