//! Crash at any instant: while a workload creates, grows, shrinks and deletes objects
//! on several nodes, agents are SIGKILLed and restarted at random moments and etcd +
//! kube-apiserver are killed and restarted on the same data. Afterwards the invariant
//! checker must find nothing wrong.
//!
//! Bounded: `PORTASSIGN_CHAOS_SECONDS` (default 45) of churn and
//! `PORTASSIGN_CHAOS_KILLS` (default 10) agent kills; `make chaos` runs the long form.
//! `PORTASSIGN_CHAOS_SEED` replays a run (the seed is printed).

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use portassign::{
    api::{PortAssignment, PortAssignmentSpec, Protocol},
    checker::{self, Expectations},
    range::PortRange,
};
use portassign_testkit::{AgentProcess, Cluster, World, cluster::restart_control_plane, eventually, port_block};

/// A small deterministic generator (xorshift64*), so a seed replays a run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread")]
async fn no_port_is_lost_or_leaked_when_agents_and_the_api_server_crash() {
    let seed = env_u64("PORTASSIGN_CHAOS_SEED", std::process::id() as u64 * 7919 + 1);
    let seconds = env_u64("PORTASSIGN_CHAOS_SECONDS", 45);
    let kills = env_u64("PORTASSIGN_CHAOS_KILLS", 10);
    println!("chaos: seed {seed}, {seconds}s, {kills} agent kills (replay with PORTASSIGN_CHAOS_SEED={seed})");
    let mut rng = Rng(seed);

    let plane = Cluster::own("chaos", &[]).await;
    let client = plane.admin.client();
    let ns = "chaos";
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let namespace = serde_json::from_value(serde_json::json!({ "metadata": { "name": ns } })).unwrap();
    namespaces.create(&PostParams::default(), &namespace).await.expect("namespace");

    let nodes = ["chaos-a", "chaos-b", "chaos-c"];
    let ranges: Vec<PortRange> =
        (0..3).map(|i| PortRange::new(26000 + i * 200, 26000 + i * 200 + 199).unwrap()).collect();
    let mut agents: Vec<AgentProcess> = Vec::new();
    for (node, range) in nodes.iter().zip(&ranges) {
        agents.push(AgentProcess::new(&plane.agent.kubeconfig, node).range(*range).start().await);
    }

    let api: Api<PortAssignment> = Api::namespaced(client.clone(), ns);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let kill_every = Duration::from_secs(seconds) / (kills as u32 + 1);
    let mut next_kill = start + kill_every;
    let mut killed = 0;
    let mut restart: Option<std::thread::JoinHandle<()>> = None;
    let mut down: Vec<(usize, Instant)> = Vec::new();
    let mut live: BTreeMap<String, (usize, Vec<String>)> = BTreeMap::new();
    let mut serial = 0u64;
    let mut ops = [0u32; 4];
    let mut failed_ops = 0u32;

    // Churn until the deadline, and on until every planned kill has happened.
    while Instant::now() < deadline || killed < kills || !down.is_empty() {
        // Chaos: kill an agent at a random moment; it comes back after a random pause
        // while the workload goes on.
        if Instant::now() >= next_kill && killed < kills {
            let victim = rng.below(3) as usize;
            agents[victim].kill();
            down.push((victim, Instant::now() + Duration::from_millis(rng.below(1500))));
            killed += 1;
            next_kill = Instant::now() + kill_every.mul_f64(0.5 + rng.below(1000) as f64 / 1000.0);
        }
        down.retain(|(victim, back)| {
            if Instant::now() >= *back {
                agents[*victim].spawn();
                false
            } else {
                true
            }
        });
        // Once, halfway: etcd and the API server die and come back on the same data,
        // in the background, so the workload and the agents meet a dead API meanwhile.
        if restart.is_none() && Instant::now() > start + Duration::from_secs(seconds) / 2 {
            println!("chaos: killing etcd + kube-apiserver at {:?}", start.elapsed());
            let dir = plane.plane_dir().expect("the chaos test's own control plane").to_owned();
            restart = Some(std::thread::spawn(move || restart_control_plane(&dir, "KILL")));
        }
        let op = rng.below(10);
        let result = if live.len() < 4 || (op < 4 && live.len() < 40) {
            serial += 1;
            let name = format!("o{serial}");
            let node = rng.below(3) as usize;
            let keys: Vec<String> = (0..=rng.below(8)).map(|i| format!("k{i}")).collect();
            let object = PortAssignment::new(
                &name,
                PortAssignmentSpec { node_name: nodes[node].into(), protocol: Protocol::Tcp, keys: keys.clone() },
            );
            ops[0] += 1;
            let r = api.create(&PostParams::default(), &object).await.map(|_| ());
            if r.is_ok() {
                live.insert(name, (node, keys));
            }
            r
        } else {
            let pick = rng.below(live.len() as u64) as usize;
            let name = live.keys().nth(pick).cloned().unwrap_or_default();
            let (_, keys) = live.get(&name).cloned().unwrap_or_default();
            if op < 7 {
                // Grow and shrink at once: drop one key, add one or two.
                let mut keys = keys;
                if !keys.is_empty() {
                    keys.remove(rng.below(keys.len() as u64) as usize);
                }
                for _ in 0..=rng.below(2) {
                    keys.push(format!("k{}", 10 + rng.below(90)));
                }
                keys.sort();
                keys.dedup();
                ops[1] += 1;
                let patch = serde_json::json!({ "spec": { "keys": keys } });
                let r = api.patch(&name, &PatchParams::default(), &Patch::Merge(patch)).await.map(|_| ());
                if r.is_ok() {
                    live.get_mut(&name).unwrap().1 = keys;
                }
                r
            } else {
                ops[2] += 1;
                let r = api.delete(&name, &DeleteParams::default()).await.map(|_| ());
                if r.is_ok() {
                    live.remove(&name);
                }
                r
            }
        };
        if result.is_err() {
            failed_ops += 1;
        }
        tokio::time::sleep(Duration::from_millis(20 + rng.below(80))).await;
    }
    ops[3] = killed as u32;
    let api_restarted = restart.map(|t| t.join().is_ok()).unwrap_or(false);
    println!(
        "chaos: {} creates, {} key changes, {} deletes ({failed_ops} refused while the API was down), {} agent kills, API restarted: {api_restarted}",
        ops[0], ops[1], ops[2], ops[3]
    );

    // Settle: every agent up, then the checker must pass within a minute.
    for agent in &agents {
        agent.wait_ready(Duration::from_secs(60)).await;
    }
    let expect = Expectations {
        settled: true,
        stuck_after: Duration::from_secs(30),
        ranges: nodes.iter().map(|n| n.to_string()).zip(ranges.iter().copied()).collect(),
    };
    let settle = Instant::now();
    let violations = loop {
        let objects = api.list(&Default::default()).await.map(|l| l.items).unwrap_or_default();
        let mut tables = Vec::new();
        for agent in &agents {
            tables.push(checker::fetch_table(&agent.url, Some(&plane.reader.token())).await.expect("agent table"));
        }
        let mut violations = checker::check(&objects, &tables, &expect, k8s_openapi::jiff::Timestamp::now());
        for o in &objects {
            if o.metadata.deletion_timestamp.is_none() && !o.is_ready() {
                violations.push(checker::Violation {
                    node: o.spec.node_name.clone(),
                    message: format!("{} not Ready", o.metadata.name.clone().unwrap_or_default()),
                });
            }
        }
        if violations.is_empty() || settle.elapsed() > Duration::from_secs(60) {
            println!("chaos: {} objects checked after settling {:?}", objects.len(), settle.elapsed());
            break violations;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    if !violations.is_empty() {
        for agent in &agents {
            eprintln!("--- log of {} (last 40 lines)", agent.node);
            let log = agent.log();
            for line in log.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
    assert!(
        violations.is_empty(),
        "seed {seed}: {} violations:\n{}",
        violations.len(),
        violations.iter().map(|v| v.to_string()).collect::<Vec<_>>().join("\n")
    );
    assert!(killed >= kills.min(1), "the chaos loop killed agents");

    // Everything deleted is released: delete what is left and check again.
    // (List rather than trust `live`: a create or delete refused while the API server
    // was down may still have happened.)
    for object in api.list(&Default::default()).await.expect("list").items {
        let _ = api.delete(&object.metadata.name.unwrap_or_default(), &DeleteParams::default()).await;
    }
    portassign_testkit::eventually("all objects gone", Duration::from_secs(60), || async {
        api.list(&Default::default()).await.ok().filter(|l| l.items.is_empty()).map(|_| ())
    })
    .await;
    for agent in &agents {
        let table = checker::fetch_table(&agent.url, Some(&plane.reader.token())).await.expect("agent table");
        assert!(
            table.ports.is_empty(),
            "agent {} still holds {:?} after every object was deleted",
            agent.node,
            table.ports
        );
    }
}

/// Objects created while the API server was down, or just after it returned, reach the
/// agent in its watch's relist, and each is served within seconds of the server's return.
/// (A reconcile started on the relist's event, before the list is done and in the
/// reflector's store, found the object missing and dropped it: nothing asked again.)
#[tokio::test(flavor = "multi_thread")]
async fn objects_created_across_an_api_server_restart_are_served_after_the_relist() {
    let plane = Cluster::own("relist", &[]).await;
    let w = World::on(&plane, "relist").await;
    let range = port_block(20);
    let agent = w.agent(range).await;
    w.create("before", &["a"]).await;
    w.ready_ports("before").await;

    let dir = plane.plane_dir().expect("the test's own control plane").to_owned();
    tokio::task::spawn_blocking(move || restart_control_plane(&dir, "KILL")).await.expect("restart");
    let back = Instant::now();
    let api = w.api();
    let names: Vec<String> = (0..5).map(|i| format!("after-{i}")).collect();
    for name in &names {
        let object = PortAssignment::new(
            name,
            PortAssignmentSpec { node_name: w.node.clone(), protocol: Protocol::Tcp, keys: vec!["k".into()] },
        );
        // The restarted server may take a moment to serve the custom resource again.
        eventually(&format!("{name} created"), Duration::from_secs(30), || async {
            api.create(&PostParams::default(), &object).await.ok().map(|_| ())
        })
        .await;
    }
    let created = back.elapsed();
    eventually("every object created after the restart Ready", Duration::from_secs(15), || async {
        let list = api.list(&Default::default()).await.ok()?;
        let ready = list.items.iter().filter(|o| o.is_ready()).count();
        (ready == names.len() + 1).then_some(())
    })
    .await;
    println!("relist: created {:?} after the return, all Ready {:?} after it", created, back.elapsed());
    let mut all = BTreeMap::new();
    for name in names.iter().map(String::as_str).chain(["before"]) {
        let key = if name == "before" { "a" } else { "k" };
        all.insert(name.to_owned(), w.ready_ports(name).await[key]);
    }
    let distinct: std::collections::BTreeSet<u16> = all.values().copied().collect();
    assert_eq!(distinct.len(), all.len(), "every object its own port: {all:?}");
    assert!(distinct.iter().all(|p| range.contains(*p)), "ports in the range: {all:?}");
    agent.stop().await.expect("agent stops");
}
