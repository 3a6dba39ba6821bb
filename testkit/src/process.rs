//! `portassign` as a real process (so tests can SIGKILL it, run it in a network
//! namespace, or measure it), always with credentials the test chooses. Its HTTP address
//! is the one the kit passes with `--listen`, never read from its log.

use std::{
    fs::OpenOptions,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use portassign::{checker as http, range::PortRange};

/// The `portassign` binary: `PORTASSIGN_BIN`, else `portassign` in the target directory
/// of the running test (cargo builds it for the root package's tests; `make test`
/// builds it first for the other crates').
pub fn portassign_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("PORTASSIGN_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("the test's own path");
    // target/debug/deps/test-HASH -> target/debug/portassign
    let profile = exe.parent().and_then(Path::parent).expect("a test binary lives in target/PROFILE/deps");
    let bin = profile.join("portassign");
    assert!(bin.exists(), "{} is missing: run `cargo build --bin portassign` (or set PORTASSIGN_BIN)", bin.display());
    bin
}

/// A free TCP port on loopback (bound and released), never the same twice in this
/// process: agents started together each get their own, where two callers racing
/// between release and use could otherwise get one port, and the agent that lost the
/// race would fail while the test polled the other one's `/readyz`.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    loop {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        let port = listener.local_addr().expect("its address").port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Environment variables that would change an agent's settings behind the test's back.
const SETTINGS_ENV: [&str; 16] = [
    "NODE_NAME",
    "POD_NAME",
    "PORTASSIGN_LOCK_NAME",
    "PORTASSIGN_MAX_RETRY_DELAY",
    "PORTASSIGN_WRITE_RATE",
    "PORTASSIGN_WRITE_BURST",
    "PORTASSIGN_PORT_RANGE",
    "PORTASSIGN_EXCLUDE_PORTS",
    "PORTASSIGN_NODE_PORT_RANGE",
    "PORTASSIGN_CONCURRENCY",
    "PORTASSIGN_LISTEN",
    "PORTASSIGN_LOG_FORMAT",
    "PORTASSIGN_DISABLE_HTTP_AUTH",
    "PORTASSIGN_HTTP_MAX_CONNECTIONS",
    "PORTASSIGN_TOKEN_FILE",
    "RUST_LOG",
];

/// A `portassign` process (any subcommand) with credentials the test chooses, stopped
/// (SIGKILL) when dropped.
pub struct Process {
    name: String,
    args: Vec<String>,
    prefix: Vec<String>,
    kubeconfig: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Process {
    /// `portassign ARGS...` authenticating with `kubeconfig`, logging to a file named
    /// after `name`; not started yet.
    pub fn new(kubeconfig: &Path, name: &str, args: &[&str]) -> Self {
        Process {
            name: name.to_owned(),
            args: args.iter().map(|a| a.to_string()).collect(),
            prefix: Vec::new(),
            kubeconfig: kubeconfig.to_owned(),
            log: std::env::temp_dir().join(format!("portassign-{name}-{}.log", std::process::id())),
            child: None,
        }
    }

    /// (Re)starts the process.
    pub fn spawn(&mut self) {
        let log = OpenOptions::new().create(true).append(true).open(&self.log).expect("process log");
        let bin = portassign_bin().to_string_lossy().into_owned();
        let mut command = match self.prefix.split_first() {
            Some((program, rest)) => {
                let mut command = Command::new(program);
                command.args(rest).arg(&bin);
                command
            }
            None => Command::new(&bin),
        };
        for var in SETTINGS_ENV {
            command.env_remove(var);
        }
        let child = command
            .args(&self.args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("RUST_LOG", "info,kube=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {bin} for {}: {e}", self.name));
        self.child = Some(child);
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL: no cleanup, no graceful shutdown.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then SIGKILL after 10 s; whether it stopped on SIGTERM.
    pub fn terminate(&mut self) -> bool {
        let Some(mut child) = self.child.take() else { return true };
        let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    /// The process's output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The path of the process's output.
    pub fn log_path(&self) -> &Path {
        &self.log
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The node lock of the agents for `node` of the cluster `kubeconfig` reaches: the
/// node's default lock name scoped by the cluster's address, so the control planes of
/// tests running side by side on one machine (one network namespace, where the locks
/// live) keep their nodes' locks apart even where they use the same node names.
pub fn lock_name(kubeconfig: &Path, node: &str) -> String {
    let server = kube::config::Kubeconfig::read_from(kubeconfig)
        .ok()
        .and_then(|k| k.clusters.first()?.cluster.as_ref()?.server.clone())
        .unwrap_or_default();
    format!("portassign-test/{server}/{}", portassign::agent::lock::default_name(node))
}

/// A `portassign agent` process for one node, reached at the address it was told to
/// listen on.
pub struct AgentProcess {
    /// Node it serves.
    pub node: String,
    /// `http://HOST:PORT` of its HTTP server.
    pub url: String,
    process: Process,
}

impl std::ops::Deref for AgentProcess {
    type Target = Process;
    fn deref(&self) -> &Process {
        &self.process
    }
}

impl std::ops::DerefMut for AgentProcess {
    fn deref_mut(&mut self) -> &mut Process {
        &mut self.process
    }
}

impl AgentProcess {
    /// An agent for `node` that authenticates with `kubeconfig` (a kit identity's, so the
    /// chart's RBAC applies), listening on a free loopback port; not started yet. Agents
    /// for one node of one cluster share its node lock (see [`lock_name`]).
    pub fn new(kubeconfig: &Path, node: &str) -> Self {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let pod = format!("test-{node}");
        let lock = lock_name(kubeconfig, node);
        let args =
            ["agent", "--node-name", node, "--listen", &addr.to_string(), "--pod-name", &pod, "--lock-name", &lock];
        AgentProcess {
            node: node.to_owned(),
            url: format!("http://{addr}"),
            process: Process::new(kubeconfig, &format!("agent-{node}"), &args),
        }
    }

    /// Assigns ports from `range`.
    pub fn range(self, range: PortRange) -> Self {
        self.arg("--port-range").arg(&range.to_string())
    }

    /// Runs the agent through `prefix` (for example `ip netns exec NS`), listening on
    /// `listen` and reached by the test at `reach`.
    pub fn wrapped(mut self, prefix: &[&str], listen: SocketAddr, reach: SocketAddr) -> Self {
        let args = &mut self.process.args;
        let at = args.iter().position(|a| a == "--listen").expect("--listen is always set") + 1;
        args[at] = listen.to_string();
        self.process.prefix = prefix.iter().map(|s| s.to_string()).collect();
        self.url = format!("http://{reach}");
        self
    }

    /// Names the agent `pod` in its events (default `test-NODE`) and logs to a file
    /// named after it: for several agents of one node.
    pub fn named(mut self, pod: &str) -> Self {
        let args = &mut self.process.args;
        let at = args.iter().position(|a| a == "--pod-name").expect("--pod-name is always set") + 1;
        args[at] = pod.to_owned();
        self.process.log = std::env::temp_dir().join(format!("portassign-agent-{pod}-{}.log", std::process::id()));
        self
    }

    /// One more command-line argument.
    pub fn arg(mut self, arg: &str) -> Self {
        self.process.args.push(arg.to_owned());
        self
    }

    /// Writes the agent's output to `path` (default: a file in the temp directory).
    pub fn log_to(mut self, path: PathBuf) -> Self {
        self.process.log = path;
        self
    }

    /// Starts the agent and waits until `/readyz` answers 200; panics, with the log's
    /// path, if the agent exits first.
    pub async fn start(mut self) -> Self {
        self.spawn();
        self.wait_ready(Duration::from_secs(60)).await;
        assert!(self.is_running(), "agent {} exited at start; log: {}", self.node, self.log_path().display());
        self
    }

    /// Waits until `/readyz` answers 200 (polled every 2 ms, so restart times can be
    /// measured with it); panics after `timeout` with the log's path.
    pub async fn wait_ready(&self, timeout: Duration) {
        let url = format!("{}/readyz", self.url);
        let deadline = Instant::now() + timeout;
        while !matches!(http::get(&url).await, Ok((200, _))) {
            assert!(
                Instant::now() < deadline,
                "agent {} not ready after {timeout:?}; log: {}",
                self.node,
                self.log_path().display()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}
