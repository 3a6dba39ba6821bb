//! Ports taken on a node without a socket the probe could see, against a real
//! kube-apiserver: pods' hostPorts and hostNetwork ports (Pods bound to the test's node
//! by setting `spec.nodeName`; no kubelet runs them), conflicts with a pod that arrives
//! on a held port, several ranges and exclusions, and the kernel's reserved ports in a
//! network namespace the test makes (docs/design.md §8).

use std::{collections::HashSet, sync::Arc, time::Duration};

use kube::api::DeleteParams;
use portassign::{
    agent::probe::SocketProbe,
    checker::{self, TableDocument, fetch_table, get_with},
    range::{PortPool, PortRange},
};
use portassign_testkit::{
    AgentProcess, Cluster, World, eventually,
    netns::{Nodes, agent_in, require_root},
    port_block, ports_of, ready_reason,
};
use serde_json::json;

fn host_port(port: u16, protocol: &str) -> serde_json::Value {
    json!({ "containerPort": 8080, "hostPort": port, "protocol": protocol })
}

async fn wait_reason(w: &World, name: &str, reason: &str) -> portassign::api::PortAssignment {
    eventually(&format!("{name} {reason}"), Duration::from_secs(30), || async {
        let o = w.api().get(name).await.ok()?;
        (ready_reason(&o).map(|(_, r)| r).as_deref() == Some(reason)
            && o.status.as_ref()?.observed_generation == o.metadata.generation)
            .then_some(o)
    })
    .await
}

async fn explain(w: &World, url: &str, port: u16) -> Vec<String> {
    let token = w.reader_identity.token();
    let (code, body) =
        get_with(&format!("{url}/debug/table?port={port}"), Some(&token)).await.expect("GET /debug/table?port");
    assert_eq!(code, 200, "{body}");
    let doc: TableDocument = serde_json::from_str(&body).expect("table document");
    doc.explain.expect("an explanation").rules.into_iter().map(|r| format!("{}: {}", r.rule, r.detail)).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn ports_the_nodes_pods_declare_are_never_assigned_until_the_pods_end() {
    let w = World::new("podports").await;
    let range = port_block(7);
    let p = |i: u16| range.first() + i;
    // Bound to the test's node: a hostPort of a container, of a sidecar (restartable init
    // container) and of a plain init container; a hostNetwork pod's container port (no
    // hostPort field); a UDP hostPort (a TCP object may take that port).
    w.create_pod(
        &w.node,
        "web",
        json!({ "containers": [{ "name": "c", "image": "pause", "ports": [host_port(p(0), "TCP")] }] }),
    )
    .await;
    w.create_pod(
        &w.node,
        "sidecar",
        json!({ "initContainers": [{ "name": "s", "image": "pause", "restartPolicy": "Always", "ports": [host_port(p(1), "TCP")] }] }),
    )
    .await;
    w.create_pod(
        &w.node,
        "init",
        json!({ "initContainers": [{ "name": "i", "image": "pause", "ports": [{ "containerPort": 1, "hostPort": p(2), "hostIP": "127.0.0.1" }] }] }),
    )
    .await;
    w.create_pod(
        &w.node,
        "hostnet",
        json!({ "hostNetwork": true, "containers": [{ "name": "c", "image": "pause", "ports": [{ "containerPort": p(3) }] }] }),
    )
    .await;
    w.create_pod(
        &w.node,
        "dns",
        json!({ "containers": [{ "name": "c", "image": "pause", "ports": [host_port(p(4), "UDP")] }] }),
    )
    .await;
    // Another node's pod takes nothing here.
    w.create_pod(
        "some-other-node",
        "elsewhere",
        json!({ "containers": [{ "name": "c", "image": "pause", "ports": [host_port(p(5), "TCP")] }] }),
    )
    .await;
    // A pod that already ended holds nothing.
    w.create_pod(
        &w.node,
        "done",
        json!({ "containers": [{ "name": "c", "image": "pause", "ports": [host_port(p(6), "TCP")] }] }),
    )
    .await;
    w.set_pod_phase("done", "Succeeded").await;

    let agent = w.agent(range).await;
    let url = format!("http://{}", agent.http_addr);
    w.create("pool", &["a", "b", "c", "d"]).await;
    let object = wait_reason(&w, "pool", "PortConflict").await;
    let got: HashSet<u16> = ports_of(&object).into_values().collect();
    assert_eq!(got, HashSet::from([p(4), p(5), p(6)]), "only the ports no pod of the node takes for TCP");
    let why = explain(&w, &url, p(3)).await;
    assert!(why.iter().any(|r| r.starts_with("pod-host-port: pod") && r.contains("/hostnet")), "{why:?}");

    // The pod ends (the kubelet would write the phase): its port is given to the waiting key.
    w.set_pod_phase("web", "Failed").await;
    let ports = w.ready_ports("pool").await;
    let got: HashSet<u16> = ports.into_values().collect();
    assert_eq!(got, HashSet::from([p(0), p(4), p(5), p(6)]));

    // A pod deleted is gone: its port too.
    w.set_keys("pool", &["a", "b", "c", "d", "e"]).await;
    wait_reason(&w, "pool", "PortConflict").await;
    w.pods().delete("sidecar", &DeleteParams::default().grace_period(0)).await.expect("delete pod");
    let ports = w.ready_ports("pool").await;
    assert_eq!(ports["e"], p(1));
    agent.stop().await.unwrap();
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_arriving_on_a_held_port_is_reported_both_ways_and_the_key_keeps_it() {
    let w = World::new("podconflict").await;
    let range = port_block(1);
    let agent = w.agent(range).await;
    let url = format!("http://{}", agent.http_addr);
    w.create("pool", &["sandbox"]).await;
    let held = w.ready_ports("pool").await["sandbox"];

    w.create_pod(
        &w.node,
        "late",
        json!({ "containers": [{ "name": "c", "image": "pause", "ports": [host_port(held, "TCP")] }] }),
    )
    .await;
    // The object says so in its status (and stays Ready with its port).
    let object = eventually("status.podConflicts", Duration::from_secs(30), || async {
        let o = w.api().get("pool").await.ok()?;
        (!o.status.as_ref()?.pod_conflicts.is_empty()).then_some(o)
    })
    .await;
    let status = object.status.clone().unwrap();
    assert_eq!(status.pod_conflicts.len(), 1);
    let conflict = &status.pod_conflicts[0];
    assert_eq!((conflict.key.as_str(), conflict.port, conflict.protocol.as_str()), ("sandbox", held, "TCP"));
    assert_eq!(conflict.pod, format!("{}/late", w.ns));
    assert_eq!(ports_of(&object)["sandbox"], held, "the key keeps its port");
    assert!(object.is_ready());

    // Warning events on both sides, each naming the other.
    let on_object = w.event("pool", "HostPortConflict").await;
    assert!(on_object.contains(&format!("pod {}/late", w.ns)) && on_object.contains("key sandbox"), "{on_object}");
    let on_pod = w.event("late", "HostPortConflict").await;
    assert!(on_pod.contains(&format!("PortAssignment {}/pool", w.ns)) && on_pod.contains("key sandbox"), "{on_pod}");

    // A metric, the agent's table, and the checker.
    let (_, metrics) =
        get_with(&format!("{url}/metrics"), Some(&w.reader_identity.token())).await.expect("GET /metrics");
    assert!(metrics.lines().any(|l| l == "portassign_pod_port_conflicts 1"), "{metrics}");
    let table = fetch_table(&url, Some(&w.reader_identity.token())).await.expect("table");
    assert_eq!(table.conflicts.len(), 1);
    assert_eq!(table.conflicts[0].key, "sandbox");
    let objects = w.api().list(&Default::default()).await.unwrap().items;
    let pods = w.pods().list(&Default::default()).await.unwrap().items;
    let found = checker::pod_conflicts(&objects, &pods);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].message.contains(&format!("declared by pod {}/late", w.ns)), "{}", found[0]);

    // The pod goes: the conflict clears everywhere; the key still has its port.
    w.pods().delete("late", &DeleteParams::default().grace_period(0)).await.expect("delete pod");
    let object = eventually("conflict cleared", Duration::from_secs(30), || async {
        let o = w.api().get("pool").await.ok()?;
        o.status.as_ref()?.pod_conflicts.is_empty().then_some(o)
    })
    .await;
    assert_eq!(ports_of(&object)["sandbox"], held);
    let (_, metrics) =
        get_with(&format!("{url}/metrics"), Some(&w.reader_identity.token())).await.expect("GET /metrics");
    assert!(metrics.lines().any(|l| l == "portassign_pod_port_conflicts 0"), "{metrics}");
    agent.stop().await.unwrap();
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn several_ranges_minus_excluded_ports_and_the_node_port_range() {
    let w = World::new("ranges").await;
    let (a, b) = (port_block(5), port_block(5));
    let pa = |i: u16| a.first() + i;
    let pb = |i: u16| b.first() + i;
    // The flags as the chart passes them: a's second port excluded, b's first three too
    // (a range), and a's fourth port standing in for the cluster's NodePort range.
    let cluster = Cluster::shared().await;
    let agent = AgentProcess::new(&cluster.agent.kubeconfig, &w.node)
        .arg("--port-range")
        .arg(&format!("{a},{b}"))
        .arg("--exclude-ports")
        .arg(&format!("{},{}-{}", pa(1), pb(0), pb(2)))
        .arg("--node-port-range")
        .arg(&format!("{}-{}", pa(3), pa(3)))
        .start()
        .await;
    let allowed = HashSet::from([pa(0), pa(2), pa(4), pb(3), pb(4)]);
    w.create("pool", &["k0", "k1", "k2", "k3", "k4", "k5"]).await;
    let object = wait_reason(&w, "pool", "RangeExhausted").await;
    let got: HashSet<u16> = ports_of(&object).into_values().collect();
    assert_eq!(got, allowed, "every allowed port of both ranges, and nothing else");

    let why = |p| explain(&w, &agent.url, p);
    assert_eq!(why(pa(1)).await[0], format!("excluded-by-flag: in {}-{}, excluded by --exclude-ports", pa(1), pa(1)));
    assert_eq!(why(pb(1)).await[0], format!("excluded-by-flag: in {}-{}, excluded by --exclude-ports", pb(0), pb(2)));
    assert!(why(pa(3)).await[0].starts_with("nodeport-range: "));
    assert!(why(b.last() + 1).await[0].starts_with("outside-ranges: "));
    assert!(why(pb(4)).await[0].starts_with("held: key k"));

    // A bad flag is refused with a clear message.
    let mut bad = AgentProcess::new(&cluster.agent.kubeconfig, "bad-flags").arg("--exclude-ports").arg("20000-x");
    bad.spawn();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while bad.is_running() {
        assert!(std::time::Instant::now() < deadline, "the agent kept running with a bad flag");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = bad.log();
    assert!(log.contains("port range bound \"x\" is not a number"), "{log}");
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn in_process_pool_with_exclusions_never_assigns_an_excluded_port() {
    // The same rule through the library, for agents embedded in tests and tools.
    let w = World::new("pool").await;
    let range = port_block(4);
    let pool = PortPool::new(range.into(), PortRange::new(range.first(), range.first() + 1).unwrap().into(), None)
        .expect("pool");
    let agent = w.agent_with(&w.node, pool, Arc::new(SocketProbe::detect())).await;
    w.create("pool", &["a", "b", "c"]).await;
    let object = wait_reason(&w, "pool", "RangeExhausted").await;
    let got: HashSet<u16> = ports_of(&object).into_values().collect();
    assert_eq!(got, HashSet::from([range.first() + 2, range.first() + 3]));
    agent.stop().await.unwrap();
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kernel_reserved_ports_are_never_assigned_and_a_change_applies_without_restart() {
    require_root();
    let tag = std::process::id() % 10000;
    let subnet = format!("10.232.{}", tag % 250);
    let (host_ip, node_ip) = (format!("{subnet}.1"), format!("{subnet}.2"));
    let ns = format!("pr-{tag}");
    let mut nodes = Nodes::new();
    nodes.add(&ns, &format!("pr{tag}"), &host_ip, &node_ip);
    let plane =
        Cluster::own("reserved", &[("PORTASSIGN_APISERVER_BIND", "0.0.0.0"), ("PORTASSIGN_APISERVER_SANS", &host_ip)])
            .await;
    let w = World::on(&plane, "reserved").await;
    let range = PortRange::new(27600, 27604).unwrap();
    let p = |i: u16| range.first() + i;
    // Only this namespace's stack reserves them; the host's sysctl is left alone.
    nodes.sysctl(&ns, "ip_local_reserved_ports", &format!("{},{}-{}", p(0), p(1), p(2)));
    let agent = agent_in(&plane, &ns, &host_ip, &node_ip, &w.node).range(range).start().await;

    w.create("pool", &["a", "b"]).await;
    let first: HashSet<u16> = w.ready_ports("pool").await.into_values().collect();
    assert_eq!(first, HashSet::from([p(3), p(4)]), "reserved ports are skipped");
    assert!(explain(&w, &agent.url, p(1)).await.iter().any(|r| r.starts_with("kernel-reserved: ")));

    // Reserving more while the agent runs: the last free port is kept out too.
    nodes.sysctl(&ns, "ip_local_reserved_ports", &format!("{}-{}", p(0), p(4)));
    eventually("the agent read the new reservation", Duration::from_secs(15), || async {
        let (_, body) = get_with(&format!("{}/debug/table", agent.url), Some(&w.reader_identity.token())).await.ok()?;
        let doc: TableDocument = serde_json::from_str(&body).ok()?;
        (doc.skipped.kernel_reserved == format!("{}-{}", p(0), p(4))).then_some(())
    })
    .await;
    w.set_keys("pool", &["a", "b", "c"]).await;
    let object = wait_reason(&w, "pool", "PortConflict").await;
    let kept: HashSet<u16> = ports_of(&object).into_values().collect();
    assert_eq!(kept, first, "keys keep ports reserved after they got them");

    // Releasing the reservation while the key waits: it gets a port, no restart.
    nodes.sysctl(&ns, "ip_local_reserved_ports", "");
    let ports = w.ready_ports("pool").await;
    assert!([p(0), p(1), p(2)].contains(&ports["c"]), "{ports:?}");
    assert!(agent.pid().is_some());
    drop(agent);
    drop(w);
    drop(plane);
    drop(nodes);
}

/// The agent's `HostPortConflict` events in the test's namespace, as the API server has them.
async fn conflict_events(w: &World) -> usize {
    let events: kube::Api<k8s_openapi::api::events::v1::Event> = kube::Api::namespaced(w.client.clone(), &w.ns);
    let list = events.list(&Default::default()).await.expect("list events").items;
    list.iter().filter(|e| e.reason.as_deref() == Some("HostPortConflict")).count()
}

/// Conflict events are API writes too: under a tiny `--write-rate` they arrive no faster
/// than the bound (burst + rate × time since the agent started), counted at the API
/// server, and all of them arrive in the end, each counted in `portassign_writes_total`.
#[tokio::test(flavor = "multi_thread")]
async fn conflict_events_take_their_turn_under_the_write_rate() {
    const PODS: u16 = 6;
    let rate = portassign::agent::throttle::Rate { per_second: 2.0, burst: 3 };
    let w = World::new("conflictrate").await;
    let range = port_block(PODS);
    let mut config = w.agent_config(&w.node, range);
    config.writes = rate;
    let start = std::time::Instant::now();
    let agent = w.agent_as(&w.agent_identity, config, Arc::new(SocketProbe::detect())).await;
    let keys: Vec<String> = (0..PODS).map(|i| format!("k{i}")).collect();
    w.create("pool", &keys.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let ports = w.ready_ports("pool").await;
    // Every held port declared by a pod of its own: two events each (object and pod).
    for (i, port) in ports.values().enumerate() {
        let spec = json!({ "containers": [{ "name": "c", "image": "pause", "ports": [host_port(*port, "TCP")] }] });
        w.create_pod(&w.node, &format!("late-{i}"), spec).await;
    }
    let expected = 2 * usize::from(PODS);
    let mut samples = 0;
    loop {
        let seen = conflict_events(&w).await;
        let allowed = f64::from(rate.burst) + rate.per_second * start.elapsed().as_secs_f64();
        assert!(
            seen as f64 <= allowed,
            "{seen} conflict events after {:?}: more than {allowed:.1} writes",
            start.elapsed()
        );
        samples += 1;
        if seen == expected {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "{seen} of {expected} conflict events after 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(samples > 10, "sampled {samples} times: the bound must show");
    let (_, metrics) =
        get_with(&format!("http://{}/metrics", agent.http_addr), Some(&w.reader_identity.token())).await.expect("GET");
    let writes: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("portassign_writes_total ").and_then(|v| v.parse().ok()))
        .expect("portassign_writes_total");
    assert!(writes >= expected as f64, "{writes} writes counted for {expected} conflict events and more");
    agent.stop().await.unwrap();
    w.cleanup().await;
}
