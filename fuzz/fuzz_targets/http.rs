//! The requests the agent serves, two ways: structured requests (any method, path,
//! headers and body) driven through the router with `oneshot`, and raw bytes written to
//! the bounded server loop over a loopback connection (hyper's parser, the header limits
//! and timeouts). Tokens are judged by a stand-in reviewer: `reader` may get both
//! protected paths, `other` is authenticated but not allowed, anything else is invalid.
//!
//! Checked: nothing panics; `/metrics` and `/debug/table` never answer 200 without the
//! allowed token; a missing or invalid token gets 401 and a valid one without the grant
//! 403; `/healthz` always answers 200 to GET; `/debug/table` serves the document its
//! readers decode; no response is a 5xx other than `/readyz`'s 503 before the rebuild.

#![no_main]

use std::{
    net::SocketAddr,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use arbitrary::Arbitrary;
use axum::{
    Router,
    body::Body,
    http::{HeaderName, HeaderValue, Method, Request, Uri},
};
use futures::future::BoxFuture;
use http_body_util::BodyExt;
use kube::runtime::events::Reporter;
use libfuzzer_sys::fuzz_target;
use portassign::{
    agent::{
        auth::{Access, Reviewer, Verdict, bearer_token},
        backoff,
        context::Context,
        http::{TableDocument, router},
        probe::SocketProbe,
        server::{HttpOptions, serve},
        throttle,
    },
    api::Protocol,
    range::PortRange,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    runtime::Runtime,
};
use tower::ServiceExt;

struct StandIn;

impl Reviewer for StandIn {
    fn review(&self, token: String, _path: String) -> BoxFuture<'static, Result<Verdict, String>> {
        let verdict = match token.as_str() {
            "reader" => Verdict::Allowed,
            "other" => Verdict::Forbidden("other may not".into()),
            _ => Verdict::Unauthenticated("unknown token".into()),
        };
        Box::pin(async move { Ok(verdict) })
    }
}

struct Fixture {
    runtime: Runtime,
    app: Router,
    ready: Arc<AtomicBool>,
    server: SocketAddr,
    /// Wake-ups the router never sends; kept so the channel stays open.
    _woken: tokio::sync::mpsc::UnboundedReceiver<WakeRef>,
}

type WakeRef = kube::runtime::reflector::ObjectRef<kube::core::DeserializeGuard<portassign::api::PortAssignment>>;

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
        let (app, ready, server, woken) = runtime.block_on(async {
            // A client of an API server that is not there: the routes never call it.
            let client = kube::Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap())).unwrap();
            let (wake, woken) = tokio::sync::mpsc::unbounded_channel();
            let ctx = Arc::new(Context::new(
                client,
                "node".into(),
                PortRange::new(20000, 20009).unwrap().into(),
                Arc::new(SocketProbe::detect()),
                Reporter { controller: "fuzz".into(), instance: None },
                backoff::Policy::default(),
                throttle::Rate::default(),
                wake,
            ));
            let object = portassign::api::ObjectId::new("ns", "o");
            ctx.state().reserve(&object, Protocol::Tcp, ["a", "b\"<>\u{7f}"], ctx.probe());
            let ready = Arc::new(AtomicBool::new(true));
            let access = Arc::new(Access::new(Arc::new(StandIn)));
            let app = router(ctx, ready.clone(), Some(access));
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let server = listener.local_addr().unwrap();
            let options = HttpOptions {
                header_timeout: Duration::from_millis(200),
                request_timeout: Duration::from_secs(1),
                ..Default::default()
            };
            tokio::spawn(serve(listener, app.clone(), options, tokio_util::sync::CancellationToken::new()));
            (app, ready, server, woken)
        });
        Fixture { runtime, app, ready, server, _woken: woken }
    })
}

#[derive(Arbitrary, Debug)]
struct Structured {
    method: Vec<u8>,
    path: Vec<u8>,
    headers: Vec<(Vec<u8>, Vec<u8>)>,
    token: u8,
    body: Vec<u8>,
    ready: bool,
}

#[derive(Arbitrary, Debug)]
enum Input {
    Structured(Structured),
    Raw(Vec<u8>),
}

const PROTECTED: [&str; 2] = ["/metrics", "/debug/table"];

async fn structured(f: &Fixture, input: Structured) {
    let Ok(method) = Method::from_bytes(&input.method) else { return };
    let Ok(uri) = Uri::try_from(input.path) else { return };
    let mut request = Request::builder().method(method.clone()).uri(uri);
    for (name, value) in input.headers.into_iter().take(16) {
        let (Ok(name), Ok(value)) = (HeaderName::from_bytes(&name), HeaderValue::from_bytes(&value)) else { return };
        request = request.header(name, value);
    }
    match input.token % 4 {
        0 => request = request.header("authorization", "Bearer reader"),
        1 => request = request.header("authorization", "Bearer other"),
        2 => request = request.header("authorization", "Bearer nobody"),
        _ => {}
    }
    let Ok(request) = request.body(Body::from(input.body)) else { return };
    let path = request.uri().path().to_owned();
    let token = bearer_token(request.headers()).map(str::to_owned);
    f.ready.store(input.ready, Ordering::SeqCst);
    let response = f.app.clone().oneshot(request).await.expect("the router never fails");
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.expect("a body").to_bytes();
    let get = method == Method::GET || method == Method::HEAD;
    if PROTECTED.contains(&path.as_str()) && get {
        let expected = match token.as_deref() {
            Some("reader") => 200,
            Some("other") => 403,
            _ => 401,
        };
        assert_eq!(status, expected, "{method} {path} with token {token:?}");
        if status == 200 && path == "/debug/table" && method == Method::GET {
            let document: TableDocument = serde_json::from_slice(&body).expect("the table document");
            assert_eq!(document.ports.len(), 2);
        }
    } else if PROTECTED.contains(&path.as_str()) {
        assert_ne!(status, 200, "{method} {path} served");
    }
    if path == "/healthz" && get {
        assert_eq!(status, 200);
    }
    if path == "/readyz" && get {
        assert_eq!(status, if input.ready { 200 } else { 503 });
    } else {
        assert!(status < 500, "{method} {path}: {status}");
    }
}

async fn raw(f: &Fixture, bytes: Vec<u8>) {
    let Ok(mut stream) = TcpStream::connect(f.server).await else { return };
    let _ = stream.write_all(&bytes).await;
    let _ = stream.shutdown().await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut answer)).await;
    // Whatever came back, no answer serves a protected document to a request without
    // the allowed token.
    let text = String::from_utf8_lossy(&answer);
    if !String::from_utf8_lossy(&bytes).contains("Bearer reader") {
        assert!(!text.contains("\"ports\""), "table served without a token to {bytes:?}");
        assert!(!text.contains("portassign_"), "metrics served without a token to {bytes:?}");
    }
}

fuzz_target!(|input: Input| {
    let f = fixture();
    match input {
        Input::Structured(s) => f.runtime.block_on(structured(f, s)),
        Input::Raw(bytes) => f.runtime.block_on(raw(f, bytes)),
    }
});
