//! The agent against a real kube-apiserver: docs/design.md guarantees as a user sees them.

use std::{
    collections::{BTreeMap, HashSet},
    net::TcpListener,
    time::Duration,
};

use kube::{
    ResourceExt,
    api::{Patch, PatchParams},
};
use portassign::{
    api::{FINALIZER, Protocol},
    checker::{fetch_table, get, get_with},
};
use portassign_testkit::{World, eventually, keys, port_block, ports_of, ready_reason};

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn assert_unique_in(ports: &BTreeMap<String, u16>, range: portassign::range::PortRange) {
    let distinct: HashSet<u16> = ports.values().copied().collect();
    assert_eq!(distinct.len(), ports.len(), "a port is held twice: {ports:?}");
    for (key, port) in ports {
        assert!(range.contains(*port), "key {key} got {port}, outside {range}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn create_gives_every_key_a_unique_port_in_range() {
    let w = World::new("create").await;
    let range = port_block(20);
    let agent = w.agent(range).await;
    w.create("pool", &["team-a/sandbox-7", "team-a/sandbox-8", "x"]).await;
    let ports = w.ready_ports("pool").await;
    assert_eq!(ports.len(), 3);
    assert_unique_in(&ports, range);
    let object = w.api().get("pool").await.unwrap();
    assert!(object.finalizers().contains(&FINALIZER.to_string()), "finalizer set");
    assert_eq!(ready_reason(&object), Some(("True".into(), "Allocated".into())));
    let status = object.status.unwrap();
    assert_eq!((status.key_count, status.assigned_count), (3, 3));
    w.event("pool", "Assigned").await;
    let token = w.reader_identity.token();
    let (code, metrics) =
        get_with(&format!("http://{}/metrics", agent.http_addr), Some(&token)).await.expect("GET /metrics");
    assert_eq!(code, 200);
    assert!(metrics.lines().any(|l| l == "portassign_ports_assigned 3"), "gauge of assigned ports:\n{metrics}");
    assert!(metrics.contains(&format!("portassign_ports_free {}", range.len() - 3)));
    agent.stop().await.unwrap();
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_port_bound_on_the_node_is_never_assigned() {
    let w = World::new("busy").await;
    let range = port_block(5);
    // Hold two ports of the range, one on the wildcard and one on loopback only.
    let _a = TcpListener::bind(("0.0.0.0", range.first())).expect("bind first port of the block");
    let _b = TcpListener::bind(("127.0.0.1", range.first() + 2)).expect("bind third port of the block");
    let agent = w.agent(range).await;
    w.create("pool", &["a", "b", "c"]).await;
    let ports = w.ready_ports("pool").await;
    let got: HashSet<u16> = ports.values().copied().collect();
    assert_eq!(got, HashSet::from([range.first() + 1, range.first() + 3, range.first() + 4]));
    // A fourth key finds only busy ports: PortConflict, and the three keep theirs.
    w.set_keys("pool", &["a", "b", "c", "d"]).await;
    let object = eventually("PortConflict", Duration::from_secs(30), || async {
        let o = w.api().get("pool").await.ok()?;
        (ready_reason(&o) == Some(("False".into(), "PortConflict".into()))).then_some(o)
    })
    .await;
    let after = ports_of(&object);
    assert_eq!(after.len(), 3);
    assert_eq!(after, ports);
    agent.stop().await.unwrap();
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_added_and_removed_keep_existing_ports_and_freed_ports_are_reused() {
    let w = World::new("grow").await;
    let range = port_block(4);
    let agent = w.agent(range).await;
    w.create("pool", &["a", "b", "c"]).await;
    let first = w.ready_ports("pool").await;

    w.set_keys("pool", &["a", "c"]).await;
    let shrunk = w.ready_ports("pool").await;
    assert_eq!(shrunk, BTreeMap::from([("a".into(), first["a"]), ("c".into(), first["c"])]));

    // The range has 4 ports: d takes the untouched one, e can only get b's freed port.
    w.set_keys("pool", &["a", "c", "d", "e"]).await;
    let grown = w.ready_ports("pool").await;
    assert_eq!(grown["a"], first["a"]);
    assert_eq!(grown["c"], first["c"]);
    assert_unique_in(&grown, range);
    assert!(grown["d"] == first["b"] || grown["e"] == first["b"], "b's port was reused: {grown:?}");
    w.event("pool", "Released").await;
    agent.stop().await.unwrap();
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_releases_every_port_and_the_object_goes_away() {
    let w = World::new("delete").await;
    let range = port_block(3);
    let agent = w.agent(range).await;
    w.create("first", &["a", "b", "c"]).await;
    let held = w.ready_ports("first").await;
    w.delete("first").await;
    w.gone("first").await;
    // The whole range was held by "first": the new object can only be served by released ports.
    w.create("second", &["x", "y", "z"]).await;
    let reused = w.ready_ports("second").await;
    let a: HashSet<u16> = held.values().copied().collect();
    let b: HashSet<u16> = reused.values().copied().collect();
    assert_eq!(a, b);
    agent.stop().await.unwrap();
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_objects_of_ten_keys_created_at_once_are_unique_and_ready() {
    let w = World::new("many").await;
    let range = port_block(600);
    let agent = w.agent(range).await;
    let names: Vec<String> = (0..50).map(|i| format!("pool-{i}")).collect();
    futures::future::join_all(names.iter().map(|name| {
        let keys = keys(name, 10);
        let w = &w;
        async move { w.create(name, &strs(&keys)).await }
    }))
    .await;
    let mut all = BTreeMap::new();
    for name in &names {
        for (key, port) in w.ready_ports(name).await {
            all.insert(format!("{name}/{key}"), port);
        }
    }
    assert_eq!(all.len(), 500);
    assert_unique_in(&all, range);
    agent.stop().await.unwrap();
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_keeps_every_port_and_allocates_only_after_the_rebuild() {
    let w = World::new("restart").await;
    let range = port_block(12);
    let agent = w.agent(range).await;
    w.create("one", &["a", "b", "c"]).await;
    w.create("two", &["d", "e"]).await;
    let one = w.ready_ports("one").await;
    let two = w.ready_ports("two").await;
    agent.stop().await.unwrap();

    // While no agent runs: a key is added, and a new object appears. An agent that
    // allocated before rebuilding would start again at the first port of the range,
    // which "one" holds, and hand it out twice.
    w.set_keys("one", &["a", "b", "c", "new"]).await;
    w.create("three", &["f"]).await;
    let agent = w.agent(range).await;
    let one_after = w.ready_ports("one").await;
    let two_after = w.ready_ports("two").await;
    let three = w.ready_ports("three").await;
    for key in ["a", "b", "c"] {
        assert_eq!(one_after[key], one[key], "key {key} kept its port across the restart");
    }
    assert_eq!(two_after, two);
    let mut all: BTreeMap<String, u16> = BTreeMap::new();
    for (prefix, map) in [("one", &one_after), ("two", &two_after), ("three", &three)] {
        for (k, p) in map {
            all.insert(format!("{prefix}/{k}"), *p);
        }
    }
    assert_unique_in(&all, range);
    let table = fetch_table(&format!("http://{}", agent.http_addr), Some(&w.reader_identity.token()))
        .await
        .expect("the agent's table");
    assert_eq!(table.ports.len(), all.len(), "memory holds exactly the statuses' ports");
    agent.stop().await.unwrap();
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_port_recorded_twice_goes_to_the_older_object_with_a_warning() {
    let w = World::new("dup").await;
    let range = port_block(10);
    let agent = w.agent(range).await;
    w.create("older", &["o"]).await;
    let older = w.ready_ports("older").await;
    // Creation timestamps have one-second resolution.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    w.create("younger", &["y", "z"]).await;
    let younger = w.ready_ports("younger").await;
    agent.stop().await.unwrap();

    // Hand-edit the younger status so that y claims o's port.
    let contested = older["o"];
    let patch = serde_json::json!({ "status": { "ports": [ { "key": "y", "port": contested }, { "key": "z", "port": younger["z"] } ] } });
    w.api().patch_status("younger", &PatchParams::default(), &Patch::Merge(patch)).await.expect("edit status");

    let agent = w.agent(range).await;
    let fixed = eventually("younger's y gets a new port", Duration::from_secs(30), || async {
        let o = w.api().get("younger").await.ok()?;
        let ports = ports_of(&o);
        (ports.get("y").is_some_and(|p| *p != contested) && ports.len() == 2).then_some(ports)
    })
    .await;
    assert_eq!(fixed["z"], younger["z"], "the uncontested key keeps its port");
    assert_eq!(w.ready_ports("older").await, older, "the older object keeps the contested port");
    let warning = w.event("younger", "DuplicatePort").await;
    assert!(warning.contains(&contested.to_string()), "the event names the port: {warning}");
    agent.stop().await.unwrap();
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn exhaustion_is_reported_and_completes_when_ports_are_freed() {
    let w = World::new("exhaust").await;
    let range = port_block(3);
    let agent = w.agent(range).await;
    w.create("holder", &["a", "b"]).await;
    w.ready_ports("holder").await;
    w.create("wants", &["x", "y"]).await;
    let object = eventually("RangeExhausted", Duration::from_secs(30), || async {
        let o = w.api().get("wants").await.ok()?;
        (ready_reason(&o) == Some(("False".into(), "RangeExhausted".into()))).then_some(o)
    })
    .await;
    assert_eq!(ports_of(&object).len(), 1, "keeps the port it could get");
    let events = eventually("RangeExhausted event", Duration::from_secs(10), || async {
        let e = w.events("wants").await;
        e.iter().any(|(r, _)| r == "RangeExhausted").then_some(e)
    })
    .await;
    assert!(!events.is_empty());
    let started = std::time::Instant::now();
    w.delete("holder").await;
    let ports = w.ready_ports("wants").await;
    assert_eq!(ports.len(), 2);
    // Woken by the release, not by the 20 s retry.
    assert!(started.elapsed() < Duration::from_secs(15), "completed {:?} after the release", started.elapsed());
    agent.stop().await.unwrap();
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_never_touches_another_nodes_objects() {
    let w = World::new("scope").await;
    let range = port_block(10);
    let agent = w.agent(range).await;
    let other_node = portassign_testkit::unique("elsewhere");
    w.create_for(&other_node, "theirs", Protocol::Udp, &["a"]).await;
    w.create("mine", &["a"]).await;
    w.ready_ports("mine").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let theirs = w.api().get("theirs").await.unwrap();
    assert!(theirs.status.is_none(), "status written on another node's object");
    assert!(theirs.finalizers().is_empty(), "finalizer put on another node's object");
    agent.stop().await.unwrap();
    // Unblock deletion of the object nobody serves.
    w.delete("theirs").await;
    w.gone("theirs").await;
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn udp_and_tcpudp_ports_are_checked_for_their_protocols() {
    let w = World::new("proto").await;
    let range = port_block(4);
    // UDP held on the first port: a TCP object may take it, UDP and TCPUDP objects may not.
    let _udp = std::net::UdpSocket::bind(("0.0.0.0", range.first())).expect("bind udp");
    let agent = w.agent(range).await;
    w.create_for(&w.node, "udp", Protocol::Udp, &["u"]).await;
    w.create_for(&w.node, "both", Protocol::TcpUdp, &["b"]).await;
    let udp = w.ready_ports("udp").await;
    let both = w.ready_ports("both").await;
    assert_ne!(udp["u"], range.first());
    assert_ne!(both["b"], range.first());
    agent.stop().await.unwrap();
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_fails_until_the_table_is_rebuilt() {
    // An API server that is not there: the agent can never rebuild its table.
    let dead = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://{}", dead.local_addr().unwrap());
    drop(dead);
    let config = kube::Config::new(url.parse().unwrap());
    let client = kube::Client::try_from(config).unwrap();
    let agent_config = portassign::agent::Config {
        node_name: "nowhere".into(),
        pool: port_block(2).into(),
        concurrency: 1,
        listen: "127.0.0.1:0".parse().unwrap(),
        instance: None,
        lock_name: None,
        retry: Default::default(),
        writes: Default::default(),
        http: Default::default(),
        faults: Default::default(),
        dra: None,
    };
    let agent = portassign::agent::start(
        client,
        agent_config,
        std::sync::Arc::new(portassign::agent::probe::SocketProbe::detect()),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let base = format!("http://{}", agent.http_addr);
    let live = get(&format!("{base}/healthz")).await.expect("GET /healthz").0;
    let ready = get(&format!("{base}/readyz")).await.expect("GET /readyz").0;
    assert_eq!(live, 200, "alive while it retries");
    assert_eq!(ready, 503, "not ready before the rebuild");
    assert!(!agent.is_ready());
    agent.stop().await.unwrap();
}

/// An object that disappears without the agent's cleanup (its finalizer stripped, then
/// deleted at exactly that version) leaves no port held: the agent's vanished-object
/// check confirms it gone and frees its ports, with only the chart's RBAC (which grants
/// `list`, not `get`). The freed ports are assignable again.
#[tokio::test(flavor = "multi_thread")]
async fn ports_of_an_object_deleted_without_its_cleanup_are_released() {
    let w = World::new("vanish").await;
    let range = port_block(3);
    let agent = w.agent(range).await;
    w.create("forced", &["a", "b", "c"]).await;
    assert_eq!(w.ready_ports("forced").await.len(), 3);
    w.force_delete("forced").await;

    let base = format!("http://{}", agent.http_addr);
    let token = w.reader_identity.token();
    eventually("the vanished object's ports released", Duration::from_secs(20), || async {
        fetch_table(&base, Some(&token)).await.ok().filter(|t| t.ports.is_empty()).map(|_| ())
    })
    .await;
    // The whole range again, for another object.
    w.create("next", &["x", "y", "z"]).await;
    assert_eq!(w.ready_ports("next").await.len(), 3);
    agent.stop().await.unwrap();
    w.cleanup().await;
}

/// Each assignment and each release can be read in the object's events: a key added
/// later gets an `Assigned` event naming its port (not a repeat count on the first one),
/// and a removed key a `Released` event naming the port it gave back.
#[tokio::test(flavor = "multi_thread")]
async fn every_assignment_and_release_is_readable_in_the_events() {
    let w = World::new("events").await;
    let agent = w.agent(port_block(10)).await;
    w.create("pool", &["a", "b"]).await;
    let first = w.ready_ports("pool").await;
    w.set_keys("pool", &["a", "b", "c"]).await;
    let grown = w.ready_ports("pool").await;
    w.set_keys("pool", &["a", "c"]).await;
    w.ready_ports("pool").await;

    let expected = [
        ("Assigned", format!("a={}", first["a"])),
        ("Assigned", format!("c={}", grown["c"])),
        ("Released", format!("b={}", first["b"])),
    ];
    for (reason, fragment) in expected {
        eventually(&format!("a {reason} event naming {fragment}"), Duration::from_secs(10), || async {
            let events = w.events("pool").await;
            events.iter().any(|(r, note)| r == reason && note.contains(&fragment)).then_some(())
        })
        .await;
    }
    agent.stop().await.unwrap();
    w.cleanup().await;
}
