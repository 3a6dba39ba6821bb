//! One agent per node (docs/design.md §8): a second agent for a node stands by (not
//! ready, reading and writing nothing) while the first runs, and takes over from the
//! statuses as soon as the first is gone. The agents are real processes, so a kill is
//! a real process death and the node lock is released by the kernel, not by our code.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use k8s_openapi::api::events::v1::Event;
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use portassign::{
    api::{PortAssignment, PortAssignmentSpec, Protocol},
    checker::{self, Expectations},
    checker::{fetch_table, get, get_with},
    range::PortRange,
};
use portassign_testkit::{AgentProcess, World, eventually, port_block, ports_of};

/// The value of an agent's metric `name` (a line `name VALUE` on `/metrics`), read as the
/// world's reader.
async fn metric(w: &World, url: &str, name: &str) -> Option<f64> {
    let (code, text) = get_with(&format!("{url}/metrics"), Some(&w.reader_identity.token())).await.ok()?;
    if code != 200 {
        return None;
    }
    text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

async fn status_code(url: &str, path: &str) -> Option<u16> {
    get(&format!("{url}{path}")).await.ok().map(|(code, _)| code)
}

/// Waits until the agent at `url` reports itself on standby.
async fn standing_by(w: &World, agent: &AgentProcess) {
    let url = agent.url.clone();
    eventually(&format!("agent at {url} on standby"), Duration::from_secs(30), || async {
        (metric(w, &url, "portassign_standby").await == Some(1.0)).then_some(())
    })
    .await;
}

/// The checker's verdict on the test's namespace and one agent's table.
async fn violations(w: &World, agent_url: &str, range: PortRange) -> Vec<checker::Violation> {
    let objects = w.api().list(&Default::default()).await.map(|l| l.items).unwrap_or_default();
    let Ok(table) = fetch_table(agent_url, Some(&w.reader_identity.token())).await else {
        return vec![checker::Violation { node: w.node.clone(), message: format!("no table from {agent_url}") }];
    };
    let expect = Expectations {
        settled: true,
        stuck_after: Duration::from_secs(30),
        ranges: [(w.node.clone(), range)].into_iter().collect(),
    };
    let mut found = checker::check(&objects, &[table], &expect, k8s_openapi::jiff::Timestamp::now());
    for o in objects.iter().filter(|o| o.metadata.deletion_timestamp.is_none() && !o.is_ready()) {
        found.push(checker::Violation { node: w.node.clone(), message: format!("{} not Ready", o.name_any()) });
    }
    found
}

/// The checker finds nothing wrong within a minute.
async fn checker_clean(w: &World, agent_url: &str, range: PortRange) {
    let started = Instant::now();
    loop {
        let found = violations(w, agent_url, range).await;
        if found.is_empty() {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "checker: {} violations:\n{}",
            found.len(),
            found.iter().map(|v| v.to_string()).collect::<Vec<_>>().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_agent_for_a_node_stands_by_until_the_first_is_killed() {
    let w = World::new("standby").await;
    // Disjoint ranges, so a port the second agent assigned would show in the statuses.
    let block = port_block(20);
    let first_range = PortRange::new(block.first(), block.first() + 9).unwrap();
    let second_range = PortRange::new(block.first() + 10, block.last()).unwrap();
    let kubeconfig = &w.agent_identity.kubeconfig;
    let (first_name, second_name) = (format!("{}-first", w.node), format!("{}-second", w.node));
    let mut first = AgentProcess::new(kubeconfig, &w.node).named(&first_name).range(first_range).start().await;
    let mut second = AgentProcess::new(kubeconfig, &w.node).named(&second_name).range(second_range);
    second.spawn();

    // On standby: not ready, alive, and its log names the holder once.
    standing_by(&w, &second).await;
    let holder = format!("pid={} agent={first_name}", first.pid().unwrap());
    eventually("the standby log line naming the holder", Duration::from_secs(10), || async {
        second.log().contains(&holder).then_some(())
    })
    .await;
    assert_eq!(status_code(&second.url, "/healthz").await, Some(200), "alive while it waits");
    assert_eq!(status_code(&second.url, "/readyz").await, Some(503), "not ready while it waits");
    assert_eq!(metric(&w, &first.url, "portassign_standby").await, Some(0.0));

    // The first serves; the second assigns nothing and writes nothing.
    w.create("a", &["k0", "k1", "k2"]).await;
    w.create("b", &["k0"]).await;
    w.ready_ports("a").await;
    w.set_keys("a", &["k1", "k2", "k3"]).await;
    let a = eventually("a Ready with k3", Duration::from_secs(30), || async {
        let object = w.api().get("a").await.ok()?;
        (object.is_ready() && ports_of(&object).contains_key("k3")).then(|| ports_of(&object))
    })
    .await;
    let b = w.ready_ports("b").await;
    // Time for a second allocator to show itself, had it been running.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (key, port) in a.iter().chain(&b) {
        assert!(first_range.contains(*port), "key {key} got {port}, not from the first agent's range {first_range}");
    }
    let table = fetch_table(&second.url, Some(&w.reader_identity.token())).await.expect("the standby's table");
    assert!(!table.ready && table.ports.is_empty(), "the standby holds nothing: {table:?}");
    assert_eq!(metric(&w, &second.url, "portassign_reconciles_total").await, Some(0.0), "the standby reconciled");
    let events: Api<Event> = Api::namespaced(w.client.clone(), &w.ns);
    let reporters: Vec<String> = events
        .list(&Default::default())
        .await
        .expect("list events")
        .items
        .into_iter()
        .filter_map(|e| e.reporting_instance)
        .collect();
    assert!(!reporters.is_empty(), "the first agent recorded events");
    assert!(reporters.iter().all(|r| *r == first_name), "every event is the first agent's: {reporters:?}");

    // The first dies: the second takes over at once, from the statuses.
    first.kill();
    let killed = Instant::now();
    second.wait_ready(Duration::from_secs(10)).await;
    println!("standby: the second agent was ready {:?} after the first was killed", killed.elapsed());
    assert_eq!(metric(&w, &second.url, "portassign_standby").await, Some(0.0));
    w.set_keys("a", &["k1", "k2", "k3", "k4"]).await;
    let after = eventually("a Ready with k4", Duration::from_secs(30), || async {
        let object = w.api().get("a").await.ok()?;
        (object.is_ready() && ports_of(&object).contains_key("k4")).then(|| ports_of(&object))
    })
    .await;
    for key in ["k1", "k2", "k3"] {
        assert_eq!(after[key], a[key], "key {key} kept its port across the takeover");
    }
    assert!(second_range.contains(after["k4"]), "the new key's port {} is the second agent's", after["k4"]);
    checker_clean(&w, &second.url, block).await;

    // The first, back, now stands by in its turn.
    first.spawn();
    standing_by(&w, &first).await;
    assert_eq!(status_code(&first.url, "/readyz").await, Some(503));
    assert_eq!(status_code(&second.url, "/readyz").await, Some(200));
    drop((first, second));
    w.cleanup().await;
}

/// splitmix64: the churn's schedule from a printed seed.
struct Mix(u64);

impl Mix {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % n.max(1)
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Ports recorded under two keys at once in one listing of the namespace (objects being
/// deleted hold nothing).
fn held_twice(objects: &[PortAssignment]) -> Vec<String> {
    let mut holders: HashMap<u16, String> = HashMap::new();
    let mut twice = Vec::new();
    for object in objects.iter().filter(|o| o.metadata.deletion_timestamp.is_none()) {
        for (key, port) in ports_of(object) {
            let holder = format!("{} key {key}", object.name_any());
            if let Some(other) = holders.insert(port, holder.clone()) {
                twice.push(format!("port {port}: {other} and {holder}"));
            }
        }
    }
    twice
}

/// Bounded: `PORTASSIGN_STANDBY_SECONDS` (default 20) of churn and
/// `PORTASSIGN_STANDBY_KILLS` (default 6) kills of the agent holding the node;
/// `PORTASSIGN_STANDBY_SEED` replays a schedule.
#[tokio::test(flavor = "multi_thread")]
async fn two_agents_for_one_node_under_churn_and_kills_never_hold_a_port_twice() {
    let seed = env_u64("PORTASSIGN_STANDBY_SEED", u64::from(std::process::id()) * 7907 + 3);
    let seconds = env_u64("PORTASSIGN_STANDBY_SECONDS", 20);
    let kills = env_u64("PORTASSIGN_STANDBY_KILLS", 6);
    println!("two agents: seed {seed}, {seconds}s, {kills} kills (replay with PORTASSIGN_STANDBY_SEED={seed})");
    let mut mix = Mix(seed);
    let w = World::new("twoagents").await;
    let range = port_block(200);
    let kubeconfig = &w.agent_identity.kubeconfig;
    let mut agents = [
        AgentProcess::new(kubeconfig, &w.node).named(&format!("{}-a", w.node)).range(range).start().await,
        AgentProcess::new(kubeconfig, &w.node).named(&format!("{}-b", w.node)).range(range),
    ];
    agents[1].spawn();
    standing_by(&w, &agents[1]).await;

    // Every 20 ms, one consistent listing of the namespace: no port under two keys.
    let stop = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(AtomicU64::new(0));
    let seen_twice: Arc<Mutex<Vec<String>>> = Arc::default();
    let sampler = tokio::spawn({
        let (api, stop, samples, seen_twice) = (w.api(), stop.clone(), samples.clone(), seen_twice.clone());
        async move {
            while !stop.load(Ordering::SeqCst) {
                if let Ok(list) = api.list(&Default::default()).await {
                    samples.fetch_add(1, Ordering::SeqCst);
                    seen_twice.lock().unwrap().extend(held_twice(&list.items));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });

    let api = w.api();
    let start = Instant::now();
    let kill_every = Duration::from_secs(seconds) / (kills as u32 + 1);
    let mut next_kill = start + kill_every;
    let mut killed = 0;
    let mut back: Option<(usize, Instant)> = None;
    let mut live: Vec<String> = Vec::new();
    let mut serial = 0;
    let mut ops = [0u32; 3];
    while start.elapsed() < Duration::from_secs(seconds) || killed < kills || back.is_some() {
        if Instant::now() >= next_kill && killed < kills && back.is_none() {
            // Kill whichever agent holds the node; it comes back (on standby) shortly after.
            for (i, agent) in agents.iter_mut().enumerate() {
                if status_code(&agent.url, "/readyz").await == Some(200) {
                    agent.kill();
                    killed += 1;
                    back = Some((i, Instant::now() + Duration::from_millis(mix.below(500))));
                    break;
                }
            }
            next_kill = Instant::now() + kill_every;
        }
        if let Some((i, at)) = back
            && Instant::now() >= at
        {
            agents[i].spawn();
            back = None;
        }
        let op = mix.below(10);
        if live.len() < 4 || (op < 4 && live.len() < 30) {
            serial += 1;
            let name = format!("o{serial}");
            let keys: Vec<String> = (0..=mix.below(5)).map(|k| format!("k{k}")).collect();
            let object = PortAssignment::new(
                &name,
                PortAssignmentSpec { node_name: w.node.clone(), protocol: Protocol::Tcp, keys },
            );
            api.create(&PostParams::default(), &object).await.expect("create");
            live.push(name);
            ops[0] += 1;
        } else if op < 8 {
            let name = &live[mix.below(live.len() as u64) as usize];
            let keys: Vec<String> = (0..=mix.below(5)).map(|_| format!("k{}", mix.below(12))).collect();
            let patch =
                serde_json::json!({ "spec": { "keys": keys.iter().collect::<std::collections::BTreeSet<_>>() } });
            api.patch(name, &PatchParams::default(), &Patch::Merge(patch)).await.expect("change keys");
            ops[1] += 1;
        } else {
            let name = live.swap_remove(mix.below(live.len() as u64) as usize);
            api.delete(&name, &DeleteParams::default()).await.expect("delete");
            ops[2] += 1;
        }
        tokio::time::sleep(Duration::from_millis(20 + mix.below(60))).await;
    }
    println!("two agents: {} creates, {} key changes, {} deletes, {killed} kills", ops[0], ops[1], ops[2]);

    stop.store(true, Ordering::SeqCst);
    sampler.await.unwrap();
    let samples = samples.load(Ordering::SeqCst);
    let seen_twice = seen_twice.lock().unwrap().clone();
    println!("two agents: {samples} listings sampled, {} ports seen under two keys", seen_twice.len());
    assert!(samples >= seconds * 4, "only {samples} listings in {seconds}s");
    assert!(seen_twice.is_empty(), "seed {seed}: ports held twice:\n{}", seen_twice.join("\n"));
    assert_eq!(killed, kills, "every planned kill happened");

    // Settled: one agent holds the node, the other stands by, and the checker is clean.
    let holder = eventually("one agent ready", Duration::from_secs(30), || async {
        for (i, agent) in agents.iter().enumerate() {
            if status_code(&agent.url, "/readyz").await == Some(200) {
                return Some(i);
            }
        }
        None
    })
    .await;
    let standby = &agents[1 - holder];
    standing_by(&w, standby).await;
    let table = fetch_table(&standby.url, Some(&w.reader_identity.token())).await.expect("the standby's table");
    assert!(!table.ready && table.ports.is_empty(), "the standby holds nothing: {table:?}");
    checker_clean(&w, &agents[holder].url, range).await;

    // Everything deleted is released by whichever agent holds the node.
    for name in &live {
        api.delete(name, &DeleteParams::default()).await.expect("delete");
    }
    eventually("all objects gone", Duration::from_secs(60), || async {
        api.list(&Default::default()).await.ok().filter(|l| l.items.is_empty()).map(|_| ())
    })
    .await;
    let table = fetch_table(&agents[holder].url, Some(&w.reader_identity.token())).await.expect("the holder's table");
    assert!(table.ports.is_empty(), "the holder still holds {:?}", table.ports);
    drop(agents);
    w.cleanup().await;
}
