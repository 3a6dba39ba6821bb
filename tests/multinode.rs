//! Several nodes on one machine: three network namespaces joined to the host by veth
//! pairs, one agent inside each, all talking to one kube-apiserver over the veths.
//! Shows that verification happens on each node's own network stack.
//!
//! Needs root (it runs `ip netns` and `ip link`); CI runs as root. Without root the
//! test fails and says so.

use std::time::Duration;

use kube::{
    Api,
    api::{DeleteParams, PostParams},
};
use portassign::{
    api::{PortAssignment, PortAssignmentSpec, Protocol},
    checker::{self, Expectations},
    range::PortRange,
};
use portassign_testkit::{
    Cluster, eventually,
    netns::{Nodes, agent_in, require_root},
    ports_of,
};

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

    // Every node has the same range; port `first` is held inside node 0's namespace only.
    let range = PortRange::new(27500, 27504).unwrap();
    nodes.hold_port(&format!("pa-{tag}-0"), range.first());

    // The agents run as the chart's ServiceAccount, reaching the API server over their veth.
    let mut agents = Vec::new();
    for i in 0..3 {
        let ns = format!("pa-{tag}-{i}");
        let agent = agent_in(&plane, &ns, &host_ips[i], &node_ips[i], &node_names[i]).range(range);
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
