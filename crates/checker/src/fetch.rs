//! Reading an agent's HTTP endpoints from outside: `/debug/table` for the checker, any
//! path for the tests and benchmarks (with or without a bearer token).

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::{client::legacy::Client as HttpClient, rt::TokioExecutor};
use portassign_api::table::{DEBUG_TABLE_PATH, TableDocument};

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
