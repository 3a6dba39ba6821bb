//! Test harness: a real kube-apiserver + etcd, one namespace and one node name per test.
//!
//! With `PORTASSIGN_TEST_KUBECONFIG` set, tests run against that cluster (`make test`
//! starts one local control plane and shares it this way). Otherwise each test binary
//! starts its own with `hack/control-plane.sh`, torn down when the process exits. If
//! no control plane can be started the tests fail, saying why: they never skip.
#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU16, Ordering},
    },
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::core::v1::Namespace, apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, Config, CustomResourceExt, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::wait::{await_condition, conditions},
};
use portassign::{
    agent::{self, Running},
    api::{PortAssignment, PortAssignmentSpec, Protocol},
    probe::{PortProbe, SocketProbe},
    table::PortRange,
};
use tokio::sync::OnceCell;

/// Path of the kubeconfig of the control plane the tests use.
pub fn kubeconfig() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        if let Ok(path) = std::env::var("PORTASSIGN_TEST_KUBECONFIG") {
            return PathBuf::from(path);
        }
        let dir = std::env::temp_dir().join(format!("portassign-test-{}", std::process::id()));
        start_control_plane(&dir, &[]).unwrap_or_else(|why| {
            panic!(
                "no control plane for the tests: {why}\n\
                 Build the tools with `make tools`, or point PORTASSIGN_TEST_KUBECONFIG at a cluster."
            )
        })
    })
}

/// Starts etcd + kube-apiserver with `hack/control-plane.sh up DIR` (stopped when this
/// process exits) and returns the kubeconfig path.
fn start_control_plane(dir: &Path, env: &[(&str, &str)]) -> Result<PathBuf, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let output = Command::new(root.join("hack/control-plane.sh"))
        .arg("up")
        .arg(dir)
        .env("PORTASSIGN_OWNER_PID", std::process::id().to_string())
        .envs(env.iter().copied())
        .output()
        .map_err(|e| format!("cannot run hack/control-plane.sh: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "hack/control-plane.sh up failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&output.stdout).trim().lines().last().unwrap_or_default()))
}

/// A client for the test control plane (admin credentials).
pub async fn client() -> Client {
    // The in-process agents log to the test's captured output (shown when a test fails).
    portassign::telemetry::init(portassign::telemetry::LogFormat::Human);
    let path = kubeconfig();
    let kubeconfig =
        Kubeconfig::read_from(path).unwrap_or_else(|e| panic!("cannot read kubeconfig {}: {e}", path.display()));
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap_or_else(|e| panic!("bad kubeconfig {}: {e}", path.display()));
    let client = Client::try_from(config).expect("client from kubeconfig");
    install_crd(&client).await;
    client
}

/// Installs the CRD from the Rust types once per process and waits until it is served.
async fn install_crd(client: &Client) {
    static DONE: OnceCell<()> = OnceCell::const_new();
    DONE.get_or_init(|| install_crd_on(client)).await;
}

/// Installs the CRD on the cluster of `client` and waits until it is served.
pub async fn install_crd_on(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = PortAssignment::crd();
    let name = crd.name_any();
    crds.patch(&name, &PatchParams::apply("portassign-tests").force(), &Patch::Apply(&crd))
        .await
        .unwrap_or_else(|e| panic!("cannot install the CRD on the test API server: {e}"));
    tokio::time::timeout(Duration::from_secs(30), await_condition(crds, &name, conditions::is_crd_established()))
        .await
        .expect("CRD established within 30s")
        .expect("watch CRD");
    // Established can precede discovery by a moment.
    let api: Api<PortAssignment> = Api::all(client.clone());
    for _ in 0..50 {
        if api.list(&Default::default()).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("PortAssignments not served 5s after the CRD became established");
}

/// A distinct block of `size` ports for one test, inside the agent's default range so it
/// stays clear of the kernel's ephemeral ports.
pub fn port_block(size: u16) -> PortRange {
    static NEXT: AtomicU16 = AtomicU16::new(21000);
    let first = NEXT.fetch_add(size, Ordering::SeqCst);
    assert!(first + size <= 30000, "tests asked for more ports than 21000-29999 holds");
    PortRange::new(first, first + size - 1).expect("port block")
}

/// A unique, DNS-safe name with a prefix.
pub fn unique(prefix: &str) -> String {
    static SEQ: AtomicU16 = AtomicU16::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
    format!("{prefix}-{}-{:x}{:x}", std::process::id() % 10000, SEQ.fetch_add(1, Ordering::SeqCst), nanos % 0xffff)
}

/// One test's world: a namespace of its own and a node name no other test uses.
pub struct World {
    /// Admin client.
    pub client: Client,
    /// The test's namespace.
    pub ns: String,
    /// The node the test's agent serves.
    pub node: String,
}

impl World {
    /// Creates the namespace on the shared test control plane.
    pub async fn new(test: &str) -> Self {
        Self::with_client(client().await, test).await
    }

    /// Creates the namespace on the cluster of `client`.
    pub async fn with_client(client: Client, test: &str) -> Self {
        let ns = unique(test);
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let mut namespace = Namespace::default();
        namespace.metadata.name = Some(ns.clone());
        namespaces.create(&PostParams::default(), &namespace).await.expect("create test namespace");
        let node = unique(&format!("{test}-node"));
        World { client, ns, node }
    }

    /// The PortAssignment API of the test's namespace.
    pub fn api(&self) -> Api<PortAssignment> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// Starts an agent for the test's node with the real socket probe.
    pub async fn agent(&self, range: PortRange) -> Running {
        self.agent_for(&self.node, range, Arc::new(SocketProbe::detect())).await
    }

    /// Starts an agent for `node` with `probe`.
    pub async fn agent_for(&self, node: &str, range: PortRange, probe: Arc<dyn PortProbe>) -> Running {
        let config = agent::Config {
            node_name: node.to_owned(),
            range,
            concurrency: 16,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            instance: Some(format!("test-{node}")),
        };
        let running = agent::start(self.client.clone(), config, probe).await.expect("start agent");
        eventually("agent ready", Duration::from_secs(30), || async { running.is_ready().then_some(()) }).await;
        running
    }

    /// Creates a PortAssignment for the test's node.
    pub async fn create(&self, name: &str, keys: &[&str]) -> PortAssignment {
        self.create_for(&self.node, name, Protocol::Tcp, keys).await
    }

    /// Creates a PortAssignment for `node`.
    pub async fn create_for(&self, node: &str, name: &str, protocol: Protocol, keys: &[&str]) -> PortAssignment {
        let object = PortAssignment::new(
            name,
            PortAssignmentSpec {
                node_name: node.to_owned(),
                protocol,
                keys: keys.iter().map(|k| k.to_string()).collect(),
            },
        );
        self.api().create(&PostParams::default(), &object).await.unwrap_or_else(|e| panic!("create {name}: {e}"))
    }

    /// Replaces the keys of an object.
    pub async fn set_keys(&self, name: &str, keys: &[&str]) {
        let patch = serde_json::json!({ "spec": { "keys": keys } });
        self.api().patch(name, &PatchParams::default(), &Patch::Merge(patch)).await.expect("set keys");
    }

    /// Waits until the object is Ready with a port for every key, and returns key→port.
    pub async fn ready_ports(&self, name: &str) -> BTreeMap<String, u16> {
        let api = self.api();
        eventually(&format!("{name} Ready"), Duration::from_secs(60), || async {
            let object = api.get(name).await.ok()?;
            let status = object.status.as_ref()?;
            let ready = status.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True");
            let current = status.observed_generation == object.metadata.generation;
            (ready && current && status.ports.len() == object.spec.keys.len()).then(|| ports_of(&object))
        })
        .await
    }

    /// Waits until the object no longer exists.
    pub async fn gone(&self, name: &str) {
        let api = self.api();
        eventually(&format!("{name} deleted"), Duration::from_secs(60), || async {
            matches!(api.get_opt(name).await, Ok(None)).then_some(())
        })
        .await
    }

    /// Deletes an object (the agent's finalizer then releases its ports).
    pub async fn delete(&self, name: &str) {
        self.api().delete(name, &DeleteParams::default()).await.expect("delete");
    }

    /// Reasons of the events recorded for an object.
    pub async fn event_reasons(&self, name: &str) -> Vec<(String, String)> {
        let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(self.client.clone(), &self.ns);
        let list = events.list(&Default::default()).await.expect("list events");
        list.items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
            .collect()
    }

    /// Deletes the namespace (objects in it are deleted with it where a namespace
    /// controller runs; the local control plane has none, so delete objects first).
    pub async fn cleanup(self) {
        // Objects whose agent is gone would keep their finalizer forever: drop it.
        if let Ok(list) = self.api().list(&Default::default()).await {
            for object in list.items {
                let name = object.name_any();
                let patch = serde_json::json!({ "metadata": { "finalizers": null } });
                let _ = self.api().patch(&name, &PatchParams::default(), &Patch::Merge(patch)).await;
                let _ = self.api().delete(&name, &DeleteParams::default()).await;
            }
        }
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        let _ = namespaces.delete(&self.ns, &DeleteParams::default()).await;
    }
}

/// The key→port map of an object's status.
pub fn ports_of(object: &PortAssignment) -> BTreeMap<String, u16> {
    object.status.iter().flat_map(|s| &s.ports).map(|e| (e.key.clone(), e.port)).collect()
}

/// The reason of the Ready condition.
pub fn ready_reason(object: &PortAssignment) -> Option<(String, String)> {
    object.status.as_ref()?.conditions.iter().find(|c| c.type_ == "Ready").map(|c| (c.status.clone(), c.reason.clone()))
}

/// Polls `check` until it returns Some, or panics after `timeout` naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Keys `prefix-0` .. `prefix-(n-1)`.
pub fn keys(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// A blocking HTTP/1.1 GET against the agent's server: (status code, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").expect("send request");
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("read response");
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, body.to_owned())
}

/// A free TCP port on loopback (bound and released; good enough for test processes).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// The `portassign` agent as a real process, so tests can SIGKILL it.
pub struct AgentProcess {
    /// Node it serves.
    pub node: String,
    /// `http://HOST:PORT` of its HTTP server.
    pub url: String,
    args: Vec<String>,
    prefix: Vec<String>,
    kubeconfig: PathBuf,
    log: PathBuf,
    child: Option<std::process::Child>,
}

impl AgentProcess {
    /// Starts `portassign agent` for `node`, optionally wrapped (e.g. `ip netns exec NS`),
    /// and waits until `/readyz` answers 200 at `http_host`.
    pub fn start(
        kubeconfig: &Path,
        node: &str,
        range: PortRange,
        prefix: &[&str],
        listen: SocketAddr,
        http_host: SocketAddr,
    ) -> Self {
        let log = std::env::temp_dir().join(format!("portassign-agent-{node}.log"));
        let mut agent = AgentProcess {
            node: node.to_owned(),
            url: format!("http://{http_host}"),
            args: vec![
                "agent".into(),
                "--node-name".into(),
                node.into(),
                "--port-range".into(),
                range.to_string(),
                "--listen".into(),
                listen.to_string(),
            ],
            prefix: prefix.iter().map(|s| s.to_string()).collect(),
            kubeconfig: kubeconfig.to_owned(),
            log,
            child: None,
        };
        agent.restart();
        agent
    }

    /// (Re)starts the process and waits until it is ready.
    pub fn restart(&mut self) {
        self.spawn();
        self.wait_ready(Duration::from_secs(60));
    }

    /// Starts the process without waiting for readiness.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("agent log");
        let (program, args): (String, Vec<String>) = match self.prefix.split_first() {
            Some((first, rest)) => (
                first.clone(),
                rest.iter()
                    .cloned()
                    .chain([env!("CARGO_BIN_EXE_portassign").to_string()])
                    .chain(self.args.clone())
                    .collect(),
            ),
            None => (env!("CARGO_BIN_EXE_portassign").to_string(), self.args.clone()),
        };
        let child = Command::new(program)
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("RUST_LOG", "info,kube=warn")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn agent");
        self.child = Some(child);
    }

    /// Waits until `/readyz` answers 200.
    pub fn wait_ready(&self, timeout: Duration) {
        let addr: SocketAddr = self.url.trim_start_matches("http://").parse().expect("agent address");
        let deadline = Instant::now() + timeout;
        loop {
            let ok = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
                && http_get(addr, "/readyz").0 == 200;
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "agent {} not ready after {timeout:?}; log: {}",
                self.node,
                self.log.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL: no cleanup, no graceful shutdown.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A control plane of the test's own (for tests that restart it or need it reachable
/// from network namespaces), stopped when dropped.
pub struct OwnControlPlane {
    /// Its directory (`hack/control-plane.sh` state).
    pub dir: PathBuf,
    /// Its kubeconfig.
    pub kubeconfig: PathBuf,
}

impl OwnControlPlane {
    /// Starts one; `env` adds variables for hack/control-plane.sh (bind address, SANs).
    pub fn start(name: &str, env: &[(&str, &str)]) -> Self {
        let dir = std::env::temp_dir().join(format!("portassign-{name}-{}", std::process::id()));
        let kubeconfig =
            start_control_plane(&dir, env).unwrap_or_else(|why| panic!("could not start a control plane: {why}"));
        OwnControlPlane { dir, kubeconfig }
    }

    /// Kills etcd and kube-apiserver with `signal` and starts them again on the same data.
    pub fn restart(&self, signal: &str) {
        restart_control_plane(&self.dir, signal);
    }

    /// An admin client.
    pub async fn client(&self) -> Client {
        portassign::telemetry::init(portassign::telemetry::LogFormat::Human);
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig).expect("kubeconfig");
        let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.expect("config");
        let client = Client::try_from(config).expect("client");
        install_crd_on(&client).await;
        client
    }
}

impl Drop for OwnControlPlane {
    fn drop(&mut self) {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let _ = Command::new(root.join("hack/control-plane.sh")).arg("down").arg(&self.dir).output();
    }
}

/// Kills the etcd and kube-apiserver of the control plane in `dir` with `signal` and
/// starts them again on the same data.
pub fn restart_control_plane(dir: &Path, signal: &str) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let output = Command::new(root.join("hack/control-plane.sh"))
        .arg("restart")
        .arg(dir)
        .arg(signal)
        .output()
        .expect("run hack/control-plane.sh restart");
    assert!(output.status.success(), "control plane restart failed: {}", String::from_utf8_lossy(&output.stderr));
}
