//! The plugin as the kubelet sees it: gRPC over its two Unix sockets, with a fake agent
//! behind it on a third.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use hyper_util::rt::TokioIo;
use portassign_api::dra::{self, ClaimRef, Failure, Prepared, PreparedDevice};
use portassign_kubelet_plugin::proto::dra::dra_plugin_client::DraPluginClient;
use portassign_kubelet_plugin::proto::dra::{
    Claim, Device, NodePrepareResourcesRequest, NodePrepareResourcesResponse, NodeUnprepareResourcesRequest,
    NodeUnprepareResourcesResponse,
};
use portassign_kubelet_plugin::proto::registration::registration_client::RegistrationClient;
use portassign_kubelet_plugin::proto::registration::{InfoRequest, RegistrationStatus};
use portassign_kubelet_plugin::{Config, Error, serve};
use serde_json::json;
use tempfile::TempDir;
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint, Uri};

/// Claims whose name starts with this are refused by the fake agent.
const BROKEN: &str = "broken";

/// The agent's side: answers with fixed ports and records every call.
#[derive(Clone, Default)]
struct FakeAgent {
    calls: Arc<Mutex<Vec<(&'static str, ClaimRef)>>>,
    refuse_unprepare: Arc<AtomicBool>,
}

impl FakeAgent {
    fn calls(&self) -> Vec<(&'static str, ClaimRef)> {
        self.calls.lock().unwrap().clone()
    }

    async fn prepare(State(agent): State<FakeAgent>, Json(claim): Json<ClaimRef>) -> Response {
        agent.calls.lock().unwrap().push(("prepare", claim.clone()));
        if claim.name.starts_with(BROKEN) {
            let failure = Failure { error: "no free port in the DRA range".into() };
            return (StatusCode::INTERNAL_SERVER_ERROR, Json(failure)).into_response();
        }
        Json(Prepared {
            devices: vec![
                PreparedDevice {
                    request: "port".into(),
                    pool: "node-1".into(),
                    device: dra::DEVICE.into(),
                    share_id: Some(format!("share-{}", claim.uid)),
                    ports: vec![40001],
                },
                PreparedDevice {
                    request: "web/http".into(),
                    pool: "node-1".into(),
                    device: dra::DEVICE.into(),
                    share_id: None,
                    ports: vec![40010, 40011],
                },
            ],
        })
        .into_response()
    }

    async fn unprepare(State(agent): State<FakeAgent>, Json(claim): Json<ClaimRef>) -> Response {
        agent.calls.lock().unwrap().push(("unprepare", claim));
        if agent.refuse_unprepare.load(Ordering::SeqCst) {
            let failure = Failure { error: "the agent's table is not loaded yet".into() };
            return (StatusCode::SERVICE_UNAVAILABLE, Json(failure)).into_response();
        }
        Json(json!({})).into_response()
    }

    /// Serves on `socket` until the test ends.
    fn start(&self, socket: &Path) {
        let listener = UnixListener::bind(socket).unwrap();
        let app = Router::new()
            .route(dra::PREPARE_PATH, post(Self::prepare))
            .route(dra::UNPREPARE_PATH, post(Self::unprepare))
            .with_state(self.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    }
}

/// The plugin serving in a temporary directory, the fake agent and the kubelet's clients.
struct Harness {
    dir: TempDir,
    config: Config,
    agent: FakeAgent,
    shutdown: CancellationToken,
    plugin: JoinHandle<Result<(), Error>>,
    dra: DraPluginClient<Channel>,
}

impl Harness {
    async fn start() -> Harness {
        Self::start_with(true).await
    }

    /// `with_agent`: whether anything listens on the agent's socket.
    async fn start_with(with_agent: bool) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let agent = FakeAgent::default();
        let mut config = Config::new(dir.path().join("agent.sock"));
        config.registry_dir = dir.path().join("plugins_registry");
        config.plugin_dir = dir.path().join("plugins").join(&config.driver);
        config.cdi_dir = dir.path().join("cdi");
        // The kubelet's directory exists; the plugin creates its own and the CDI one.
        std::fs::create_dir(&config.registry_dir).unwrap();
        if with_agent {
            agent.start(&config.agent_socket);
        }
        let shutdown = CancellationToken::new();
        let plugin = tokio::spawn(serve(config.clone(), shutdown.clone()));
        wait_for(&config.dra_socket()).await;
        wait_for(&config.registration_socket()).await;
        let dra = DraPluginClient::new(connect(config.dra_socket()).await);
        Harness { dir, config, agent, shutdown, plugin, dra }
    }

    async fn prepare(&mut self, claims: &[Claim]) -> NodePrepareResourcesResponse {
        self.dra
            .node_prepare_resources(NodePrepareResourcesRequest { claims: claims.to_vec() })
            .await
            .unwrap()
            .into_inner()
    }

    async fn unprepare(&mut self, claims: &[Claim]) -> NodeUnprepareResourcesResponse {
        self.dra
            .node_unprepare_resources(NodeUnprepareResourcesRequest { claims: claims.to_vec() })
            .await
            .unwrap()
            .into_inner()
    }

    fn spec_path(&self, uid: &str) -> PathBuf {
        self.config.cdi_dir.join(format!("portassign.io-port_{uid}.json"))
    }

    fn spec(&self, uid: &str) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(self.spec_path(uid)).unwrap()).unwrap()
    }

    /// Files in the CDI directory (no temporary file may be left behind).
    fn cdi_files(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.config.cdi_dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    async fn stop(self) -> TempDir {
        self.shutdown.cancel();
        drop(self.dra);
        let result = tokio::time::timeout(Duration::from_secs(10), self.plugin).await.expect("serve stops").unwrap();
        assert!(result.is_ok(), "{result:?}");
        assert!(!self.config.dra_socket().exists(), "DRA socket removed");
        assert!(!self.config.registration_socket().exists(), "registration socket removed");
        self.dir
    }
}

fn claim(name: &str, uid: &str) -> Claim {
    Claim { namespace: "team-a".into(), name: name.into(), uid: uid.into() }
}

fn claim_ref(claim: &Claim) -> ClaimRef {
    ClaimRef { namespace: claim.namespace.clone(), name: claim.name.clone(), uid: claim.uid.clone() }
}

async fn wait_for(path: &Path) {
    for _ in 0..500 {
        if path.exists() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{} never appeared", path.display());
}

/// A gRPC channel over a Unix socket (the URI is not used). Retries while the socket
/// is not served yet (or is a stale one the plugin has still to replace).
async fn connect(socket: PathBuf) -> Channel {
    let mut last_error = None;
    for _ in 0..500 {
        let socket = socket.clone();
        let connector = tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { Ok::<_, io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
        });
        match Endpoint::from_static("http://localhost").connect_with_connector(connector).await {
            Ok(channel) => return channel,
            Err(error) => last_error = Some(error),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("cannot connect to {}: {last_error:?}", socket.display());
}

/// What the kubelet must get for a claim the fake agent prepared.
fn expected_devices(uid: &str) -> Vec<Device> {
    vec![
        Device {
            request_names: vec!["port".into()],
            pool_name: "node-1".into(),
            device_name: "ports".into(),
            cdi_device_ids: vec![format!("portassign.io/port={uid}-port")],
            share_id: Some(format!("share-{uid}")),
        },
        Device {
            request_names: vec!["web/http".into()],
            pool_name: "node-1".into(),
            device_name: "ports".into(),
            cdi_device_ids: vec![format!("portassign.io/port={uid}-web_http")],
            share_id: None,
        },
    ]
}

fn expected_spec(uid: &str) -> serde_json::Value {
    json!({
        "cdiVersion": "0.6.0",
        "kind": "portassign.io/port",
        "devices": [
            {
                "name": format!("{uid}-port"),
                "containerEdits": {"env": ["PORTASSIGN_PORT=40001", "PORTASSIGN_PORT_PORT=40001"]},
            },
            {
                "name": format!("{uid}-web_http"),
                "containerEdits": {"env": [
                    "PORTASSIGN_PORT=40010",
                    "PORTASSIGN_PORT_WEB_HTTP=40010",
                    "PORTASSIGN_PORTS=40010,40011",
                ]},
            },
        ],
    })
}

#[tokio::test]
async fn registers_as_a_dra_plugin() {
    let harness = Harness::start().await;
    let mut registration = RegistrationClient::new(connect(harness.config.registration_socket()).await);

    let info = registration.get_info(InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.r#type, "DRAPlugin");
    assert_eq!(info.name, "ports.portassign.io");
    assert_eq!(info.supported_versions, ["v1.DRAPlugin"]);
    let endpoint = PathBuf::from(&info.endpoint);
    assert!(endpoint.is_absolute(), "{endpoint:?}");
    assert_eq!(endpoint, harness.dir.path().join("plugins/ports.portassign.io/dra.sock"));
    assert_eq!(
        harness.config.registration_socket(),
        harness.dir.path().join("plugins_registry/ports.portassign.io-reg.sock")
    );

    for (plugin_registered, error) in [(true, ""), (false, "version mismatch")] {
        let status = RegistrationStatus { plugin_registered, error: error.into() };
        registration.notify_registration_status(status).await.unwrap();
    }
    drop(registration);
    harness.stop().await;
}

#[tokio::test]
async fn prepare_writes_the_cdi_spec_and_unprepare_removes_it() {
    let mut harness = Harness::start().await;
    let web = claim("web", "6f1c2d3e-0000-4000-8000-000000000001");

    let answer = harness.prepare(std::slice::from_ref(&web)).await;
    assert_eq!(answer.claims.len(), 1);
    let prepared = &answer.claims[&web.uid];
    assert_eq!(prepared.error, "");
    assert_eq!(prepared.devices, expected_devices(&web.uid));
    assert_eq!(harness.spec(&web.uid), expected_spec(&web.uid));
    assert_eq!(harness.cdi_files(), [format!("portassign.io-port_{}.json", web.uid)]);

    // The kubelet may prepare a claim again (after a restart, say): same answer, same file.
    let again = harness.prepare(std::slice::from_ref(&web)).await;
    assert_eq!(again, answer);
    assert_eq!(harness.spec(&web.uid), expected_spec(&web.uid));
    assert_eq!(harness.cdi_files(), [format!("portassign.io-port_{}.json", web.uid)]);

    let answer = harness.unprepare(std::slice::from_ref(&web)).await;
    assert_eq!(answer.claims.len(), 1);
    assert_eq!(answer.claims[&web.uid].error, "");
    assert!(!harness.spec_path(&web.uid).exists(), "spec removed");
    assert!(harness.cdi_files().is_empty());

    // Unpreparing again is fine: the spec is already gone.
    let answer = harness.unprepare(std::slice::from_ref(&web)).await;
    assert_eq!(answer.claims[&web.uid].error, "");

    let web_ref = claim_ref(&web);
    assert_eq!(
        harness.agent.calls(),
        [
            ("prepare", web_ref.clone()),
            ("prepare", web_ref.clone()),
            ("unprepare", web_ref.clone()),
            ("unprepare", web_ref)
        ]
    );
    harness.stop().await;
}

#[tokio::test]
async fn an_agent_failure_fails_only_that_claim() {
    let mut harness = Harness::start().await;
    let good = claim("db", "6f1c2d3e-0000-4000-8000-000000000002");
    let bad = claim("broken-db", "6f1c2d3e-0000-4000-8000-000000000003");

    let answer = harness.prepare(&[good.clone(), bad.clone()]).await;
    assert_eq!(answer.claims.len(), 2);
    assert_eq!(answer.claims[&good.uid].error, "");
    assert_eq!(answer.claims[&good.uid].devices, expected_devices(&good.uid));
    let failed = &answer.claims[&bad.uid];
    assert!(failed.devices.is_empty());
    assert!(failed.error.contains("no free port in the DRA range"), "{}", failed.error);
    assert!(failed.error.contains("500"), "{}", failed.error);
    assert_eq!(harness.spec(&good.uid), expected_spec(&good.uid));
    assert!(!harness.spec_path(&bad.uid).exists(), "no spec for a failed claim");
    assert_eq!(harness.cdi_files(), [format!("portassign.io-port_{}.json", good.uid)]);

    let mut calls = harness.agent.calls();
    calls.sort_by(|a, b| a.1.name.cmp(&b.1.name));
    assert_eq!(calls, [("prepare", claim_ref(&bad)), ("prepare", claim_ref(&good))]);

    // A failed unprepare keeps the spec: the kubelet retries, the container may still run.
    harness.agent.refuse_unprepare.store(true, Ordering::SeqCst);
    let answer = harness.unprepare(std::slice::from_ref(&good)).await;
    let error = &answer.claims[&good.uid].error;
    assert!(error.contains("the agent's table is not loaded yet"), "{error}");
    assert!(error.contains("503"), "{error}");
    assert_eq!(harness.spec(&good.uid), expected_spec(&good.uid));

    harness.agent.refuse_unprepare.store(false, Ordering::SeqCst);
    let answer = harness.unprepare(std::slice::from_ref(&good)).await;
    assert_eq!(answer.claims[&good.uid].error, "");
    assert!(harness.cdi_files().is_empty());
    harness.stop().await;
}

#[tokio::test]
async fn an_unreachable_agent_is_a_claim_error() {
    let mut harness = Harness::start_with(false).await;
    let web = claim("web", "6f1c2d3e-0000-4000-8000-000000000004");

    let answer = harness.prepare(std::slice::from_ref(&web)).await;
    let error = &answer.claims[&web.uid].error;
    assert!(error.contains("cannot connect to the portassign agent"), "{error}");
    assert!(error.contains(&*harness.config.agent_socket.to_string_lossy()), "{error}");
    assert!(answer.claims[&web.uid].devices.is_empty());
    assert!(harness.cdi_files().is_empty());

    let answer = harness.unprepare(std::slice::from_ref(&web)).await;
    assert!(answer.claims[&web.uid].error.contains("cannot connect to the portassign agent"));
    harness.stop().await;
}

#[tokio::test]
async fn a_claim_uid_that_cannot_name_a_file_is_refused_before_the_agent_is_asked() {
    let mut harness = Harness::start().await;
    let evil = claim("web", "../../etc/passwd");

    let answer = harness.prepare(std::slice::from_ref(&evil)).await;
    assert!(answer.claims[&evil.uid].error.contains("not usable in a CDI spec file name"));
    assert!(harness.agent.calls().is_empty());
    assert!(harness.cdi_files().is_empty());
    harness.stop().await;
}

#[tokio::test]
async fn stale_sockets_are_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::new(dir.path().join("agent.sock"));
    config.registry_dir = dir.path().join("registry");
    config.plugin_dir = dir.path().join("plugin");
    config.cdi_dir = dir.path().join("cdi");
    for path in [config.registration_socket(), config.dra_socket()] {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        // A socket left by a plugin that was killed.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
    }
    let shutdown = CancellationToken::new();
    let plugin = tokio::spawn(serve(config.clone(), shutdown.clone()));
    let mut registration = RegistrationClient::new(connect(config.registration_socket()).await);
    let info = registration.get_info(InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.endpoint, config.dra_socket().to_string_lossy());
    drop(registration);
    shutdown.cancel();
    plugin.await.unwrap().unwrap();
    assert!(!config.dra_socket().exists());
    assert!(!config.registration_socket().exists());
}

#[tokio::test]
async fn a_missing_registry_dir_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::new(dir.path().join("agent.sock"));
    config.registry_dir = dir.path().join("no-such-registry");
    config.plugin_dir = dir.path().join("plugin");
    config.cdi_dir = dir.path().join("cdi");
    let error = serve(config.clone(), CancellationToken::new()).await.unwrap_err();
    assert!(matches!(error, Error::Listen { .. }), "{error:?}");
    assert!(error.to_string().contains("no-such-registry/ports.portassign.io-reg.sock"), "{error}");
    // The DRA socket it had bound is gone again.
    assert!(!config.dra_socket().exists());
}

#[test]
fn defaults_are_the_kubelets_directories() {
    let config = Config::new("/run/portassign/agent.sock");
    assert_eq!(config.driver, "ports.portassign.io");
    assert_eq!(config.registry_dir, Path::new("/var/lib/kubelet/plugins_registry"));
    assert_eq!(config.plugin_dir, Path::new("/var/lib/kubelet/plugins/ports.portassign.io"));
    assert_eq!(config.cdi_dir, Path::new("/var/run/cdi"));
    assert_eq!(config.agent_socket, Path::new("/run/portassign/agent.sock"));
    assert_eq!(config.dra_socket(), Path::new("/var/lib/kubelet/plugins/ports.portassign.io/dra.sock"));
    assert_eq!(
        config.registration_socket(),
        Path::new("/var/lib/kubelet/plugins_registry/ports.portassign.io-reg.sock")
    );
}
