//! Several nodes on one machine: three network namespaces joined to the host by veth
//! pairs, one agent inside each, all talking to one kube-apiserver over the veths.
//! Shows that verification happens on each node's own network stack.
//!
//! Needs root (it runs `ip netns` and `ip link`); CI runs as root. Without root the
//! test fails and says so.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::Duration,
};

use kube::{
    Api,
    api::{DeleteParams, PostParams},
};
use portassign::{
    api::{PortAssignment, PortAssignmentSpec, Protocol},
    checker::{self, Expectations},
    range::PortRange,
};
use portassign_testkit::{AgentProcess, Cluster, eventually, ports_of};

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Network namespaces, veths and processes of the test; removed on drop, pass or fail.
struct Nodes {
    namespaces: Vec<String>,
    host_veths: Vec<String>,
    holders: Vec<Child>,
}

impl Nodes {
    fn new() -> Self {
        Nodes { namespaces: Vec::new(), host_veths: Vec::new(), holders: Vec::new() }
    }

    /// Creates namespace `name` linked to the host: host side `host_ip/30`, inside `node_ip/30`.
    fn add(&mut self, name: &str, veth: &str, host_ip: &str, node_ip: &str) {
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
    fn hold_port(&mut self, name: &str, port: u16) {
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

fn require_root() {
    let uid = Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    assert_eq!(
        uid.as_deref().unwrap_or("?"),
        "0",
        "this test creates network namespaces and veths (`ip netns`, `ip link`) and must run as root"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn each_node_verifies_ports_on_its_own_network_stack() {
    require_root();
    let tag = std::process::id() % 10000;
    let subnet = format!("10.231.{}", tag % 250);
    let mut nodes = Nodes::new();
    let node_names: Vec<String> = (0..3).map(|i| format!("netns-node-{i}")).collect();
    let mut host_ips = Vec::new();
    let mut node_ips = Vec::new();
    for i in 0..3 {
        let (host_ip, node_ip) = (format!("{subnet}.{}", i * 4 + 1), format!("{subnet}.{}", i * 4 + 2));
        nodes.add(&format!("pa-{tag}-{i}"), &format!("pa{tag}{i}"), &host_ip, &node_ip);
        host_ips.push(host_ip);
        node_ips.push(node_ip);
    }

    // One API server for all nodes, reachable over each veth.
    let sans = host_ips.join(",");
    let plane =
        Cluster::own("multinode", &[("PORTASSIGN_APISERVER_BIND", "0.0.0.0"), ("PORTASSIGN_APISERVER_SANS", &sans)])
            .await;
    let client = plane.admin.client();
    // The agents run as the chart's ServiceAccount, reaching the API server over their veth.
    let credentials = std::fs::read_to_string(&plane.agent.kubeconfig).expect("agent kubeconfig");
    let dir = plane.plane_dir().expect("the test's own control plane").to_owned();

    // Every node has the same range; port `first` is held inside node 0's namespace only.
    let range = PortRange::new(27500, 27504).unwrap();
    nodes.hold_port(&format!("pa-{tag}-0"), range.first());

    let mut agents = Vec::new();
    for i in 0..3 {
        let kubeconfig = dir.join(format!("kubeconfig-node-{i}"));
        std::fs::write(&kubeconfig, credentials.replace("https://127.0.0.1:", &format!("https://{}:", host_ips[i])))
            .unwrap();
        let listen = SocketAddr::from(([0, 0, 0, 0], 9477));
        let http: SocketAddr = format!("{}:9477", node_ips[i]).parse().unwrap();
        let ns = format!("pa-{tag}-{i}");
        let agent = AgentProcess::new(&kubeconfig, &node_names[i]).range(range).wrapped(
            &["ip", "netns", "exec", &ns],
            listen,
            http,
        );
        agents.push(agent.start().await);
    }

    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let namespace = serde_json::from_value(serde_json::json!({ "metadata": { "name": "multinode" } })).unwrap();
    namespaces.create(&PostParams::default(), &namespace).await.expect("namespace");
    let api: Api<PortAssignment> = Api::namespaced(client.clone(), "multinode");
    for (i, node) in node_names.iter().enumerate() {
        let object = PortAssignment::new(
            &format!("pool-{i}"),
            PortAssignmentSpec { node_name: node.clone(), protocol: Protocol::Tcp, keys: vec!["sandbox".into()] },
        );
        api.create(&PostParams::default(), &object).await.expect("create");
    }
    let mut got = Vec::new();
    for i in 0..3 {
        let name = format!("pool-{i}");
        let ports = eventually(&format!("{name} Ready"), Duration::from_secs(60), || async {
            let o = api.get(&name).await.ok()?;
            o.is_ready().then(|| ports_of(&o))
        })
        .await;
        got.push(ports["sandbox"]);
    }
    assert_ne!(got[0], range.first(), "node 0 must not hand out the port bound in its own namespace");
    assert_eq!(got[1], range.first(), "node 1 has the port free on its stack, and it is the first of the range");
    assert_eq!(got[2], range.first(), "the same number may be assigned on two nodes");

    // Each agent holds only its own node's objects, and memory agrees with the statuses.
    let mut tables = Vec::new();
    for (i, agent) in agents.iter().enumerate() {
        let table = checker::fetch_table(&agent.url, Some(&plane.reader.token())).await.expect("agent table");
        let names: Vec<&str> = table.ports.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, vec![format!("pool-{i}")], "agent of node {i} holds only its node's objects");
        tables.push(table);
    }
    let objects = api.list(&Default::default()).await.unwrap().items;
    let violations = checker::check(&objects, &tables, &Expectations::default(), k8s_openapi::jiff::Timestamp::now());
    assert!(violations.is_empty(), "checker: {violations:?}");

    for i in 0..3 {
        api.delete(&format!("pool-{i}"), &DeleteParams::default()).await.unwrap();
    }
    eventually("objects released and gone", Duration::from_secs(30), || async {
        api.list(&Default::default()).await.ok().filter(|l| l.items.is_empty()).map(|_| ())
    })
    .await;
    drop(agents);
    drop(nodes);
}
