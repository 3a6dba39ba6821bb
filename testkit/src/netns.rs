//! Network namespaces a test makes for itself: "nodes" joined to the host by veth pairs,
//! each with its own network stack (sockets, `net.ipv4.*` sysctls). Needs root (`ip netns`,
//! `ip link`); CI runs as root. Everything made is removed on drop, pass or fail.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
};

use crate::{AgentProcess, Cluster};

/// Runs `ip ARGS...`.
pub fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Fails the test, saying why, unless it runs as root.
pub fn require_root() {
    let uid = Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    assert_eq!(
        uid.as_deref().unwrap_or("?"),
        "0",
        "this test creates network namespaces and veths (`ip netns`, `ip link`) and must run as root"
    );
}

/// Network namespaces, veths and processes of the test; removed on drop, pass or fail.
#[derive(Default)]
pub struct Nodes {
    namespaces: Vec<String>,
    host_veths: Vec<String>,
    holders: Vec<Child>,
}

impl Nodes {
    /// No namespace yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Creates namespace `name` linked to the host: host side `host_ip/30`, inside `node_ip/30`.
    pub fn add(&mut self, name: &str, veth: &str, host_ip: &str, node_ip: &str) {
        ip(&["netns", "add", name]).expect("create network namespace");
        self.namespaces.push(name.to_owned());
        let (host_end, node_end) = (format!("{veth}h"), format!("{veth}n"));
        ip(&["link", "add", &host_end, "type", "veth", "peer", "name", &node_end]).expect("create veth");
        self.host_veths.push(host_end.clone());
        ip(&["link", "set", &node_end, "netns", name]).expect("move veth");
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_end]).expect("host address");
        ip(&["link", "set", &host_end, "up"]).expect("host veth up");
        for args in [
            vec!["netns", "exec", name, "ip", "addr", "add", &format!("{node_ip}/30"), "dev", &node_end],
            vec!["netns", "exec", name, "ip", "link", "set", &node_end, "up"],
            vec!["netns", "exec", name, "ip", "link", "set", "lo", "up"],
        ] {
            ip(&args).expect("configure the node's namespace");
        }
    }

    /// Holds TCP `port` bound on the wildcard address inside namespace `name`.
    pub fn hold_port(&mut self, name: &str, port: u16) {
        let script = format!(
            "import socket,time\ns=socket.socket()\ns.bind(('0.0.0.0',{port}))\ns.listen()\nprint('bound',flush=True)\ntime.sleep(3600)"
        );
        let mut child = Command::new("ip")
            .args(["netns", "exec", name, "python3", "-c", &script])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start port holder");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("holder output");
        assert_eq!(line.trim(), "bound", "port holder in {name} did not bind {port}");
        self.holders.push(child);
    }

    /// Sets `net.ipv4.SYSCTL` to `value` inside namespace `name` only (`/proc/sys/net`
    /// shows the network namespace of the process that opens it).
    pub fn sysctl(&self, name: &str, sysctl: &str, value: &str) {
        let script = format!("printf '%s\\n' \"$1\" > /proc/sys/net/ipv4/{sysctl}");
        ip(&["netns", "exec", name, "sh", "-c", &script, "sh", value])
            .unwrap_or_else(|e| panic!("set net.ipv4.{sysctl} in {name}: {e}"));
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for child in &mut self.holders {
            let _ = child.kill();
            let _ = child.wait();
        }
        for veth in &self.host_veths {
            let _ = ip(&["link", "del", veth]);
        }
        for ns in &self.namespaces {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

/// An agent for `node` running inside namespace `ns` (whose veth has `node_ip`, the host
/// side `host_ip`), as the chart's agent ServiceAccount of `plane` (a control plane of the
/// test's own, listening on the host's veth addresses), reached over the veth.
pub fn agent_in(plane: &Cluster, ns: &str, host_ip: &str, node_ip: &str, node: &str) -> AgentProcess {
    let credentials = std::fs::read_to_string(&plane.agent.kubeconfig).expect("agent kubeconfig");
    let dir: PathBuf = plane.plane_dir().expect("the test's own control plane").to_owned();
    let kubeconfig = dir.join(format!("kubeconfig-{ns}"));
    std::fs::write(&kubeconfig, credentials.replace("https://127.0.0.1:", &format!("https://{host_ip}:")))
        .expect("write the namespace's kubeconfig");
    let listen = SocketAddr::from(([0, 0, 0, 0], 9477));
    let http: SocketAddr = format!("{node_ip}:9477").parse().expect("node address");
    AgentProcess::new(&kubeconfig, node).wrapped(&["ip", "netns", "exec", ns], listen, http)
}
