//! Back-pressure against a real kube-apiserver: an agent whose writes are refused backs
//! off per object (the request rate decays to objects ÷ cap), says why the objects wait,
//! and recovers within the cap once the permission returns; the write-rate limit holds.
//!
//! The refused agent runs as a ServiceAccount of its own, bound to a copy of the chart's
//! agent ClusterRole with one permission taken out; "the permission returns" is a
//! binding of that ServiceAccount to the chart's own ClusterRole (testkit `restricted`).
//! The rest of the chart's RBAC is untouched, so other tests sharing the API server are
//! not affected.
//!
//! The cap is 8 s here instead of the default 60 s so the test takes under a minute; the
//! same claim at the default cap ("at most ~1 write per second after the first minute"
//! for 50 objects) is measured by `make bench` (docs/benchmarks.md).

use std::time::{Duration, Instant};

use kube::{ResourceExt, api::PostParams};
use portassign::{
    agent::{Running, backoff::Policy, probe::SocketProbe, throttle::Rate},
    api::{FINALIZER, reason},
    checker::get_with,
};
use portassign_testkit::{Cluster, World, eventually, port_block, restricted::Restricted};

async fn restricted(without: &str) -> Restricted {
    Restricted::new(Cluster::shared().await, without).await.expect("a restricted agent identity")
}

/// The sum of a metric's samples whose label set contains every one of `labels`.
fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            (metric == name && labels.iter().all(|want| rest.contains(want))).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// API writes the agent has started so far: its `portassign_writes_total`, counted on
/// the write path itself (each status patch, finalizer patch and event takes a token of
/// the rate limit right before it is sent), not by the backoff code under test. The API
/// server cannot give this figure: requests RBAC refuses are rejected before its
/// `apiserver_request_total` counts them.
async fn writes(w: &World, agent: &Running) -> f64 {
    metric_sum(&agent_metrics(w, agent).await, "portassign_writes_total", &[])
}

/// The agent's `/metrics`, read as the world's reader.
async fn agent_metrics(w: &World, agent: &Running) -> String {
    let url = format!("http://{}/metrics", agent.http_addr);
    let (code, text) = get_with(&url, Some(&w.reader_identity.token())).await.expect("GET the agent's /metrics");
    assert_eq!(code, 200);
    text
}

async fn all_ready(w: &World, n: usize) -> bool {
    let list = w.api().list(&Default::default()).await.expect("list");
    list.items.len() == n && list.items.iter().all(|o| o.is_ready())
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_status_writes_back_off_to_objects_over_cap_and_recover_within_the_cap() {
    const OBJECTS: usize = 50;
    let cap = Duration::from_secs(8);
    let w = World::new("refused").await;
    let refused = restricted("portassignments/status").await;
    let mut config = w.agent_config(&w.node, port_block(OBJECTS as u16));
    config.retry = Policy::with_cap(cap);
    config.concurrency = 64;
    let agent = w.agent_as(&refused.identity, config, std::sync::Arc::new(SocketProbe::detect())).await;

    let start_count = writes(&w, &agent).await;
    let start = Instant::now();
    for i in 0..OBJECTS {
        w.create(&format!("o{i}"), &["k"]).await;
    }
    // Every object gets the finalizer (allowed) and no status (refused).
    eventually("every object has the finalizer", Duration::from_secs(30), || async {
        let list = w.api().list(&Default::default()).await.ok()?;
        (list.items.len() == OBJECTS && list.items.iter().all(|o| o.finalizers().contains(&FINALIZER.to_string())))
            .then_some(())
    })
    .await;

    // The status cannot say why: an event does, quoting the API server.
    let note = w.event("o0", "WriteFailed").await;
    assert!(note.contains("forbidden"), "the event quotes the API's refusal: {note}");
    assert!(note.contains("recording the ports in the status"), "{note}");

    // Warm-up: two caps, long enough for every object to reach the cap.
    let warmup = 2 * cap;
    tokio::time::sleep(warmup.saturating_sub(start.elapsed())).await;
    let at_warmup = writes(&w, &agent).await;
    let early_rate = (at_warmup - start_count) / start.elapsed().as_secs_f64();
    let window = Duration::from_secs(20);
    let window_start = Instant::now();
    tokio::time::sleep(window).await;
    let at_end = writes(&w, &agent).await;
    let late_rate = (at_end - at_warmup) / window_start.elapsed().as_secs_f64();

    // At the cap each object retries every (1 − jitter) × cap to cap.
    let bound = OBJECTS as f64 / (cap.as_secs_f64() * (1.0 - Policy::default().jitter));
    eprintln!(
        "agent writes: {early_rate:.1}/s over the first {warmup:?}, {late_rate:.1}/s after (bound {bound:.1}/s; a fixed 2 s retry makes {:.1}/s)",
        OBJECTS as f64 / 2.0
    );
    assert!(late_rate > 0.0, "the agent keeps retrying");
    assert!(late_rate <= 1.15 * bound, "after the warm-up: {late_rate:.1} writes/s, above {bound:.1}/s (+15 %)");
    assert!(late_rate < 0.7 * early_rate, "the rate decays: {early_rate:.1}/s, then {late_rate:.1}/s");

    // The agent's metrics show it: every object in backoff, failures counted by kind and code.
    let metrics = agent_metrics(&w, &agent).await;
    assert_eq!(metric_sum(&metrics, "portassign_objects_in_backoff", &[]), OBJECTS as f64, "{metrics}");
    let refusals = metric_sum(&metrics, "portassign_write_failures_total", &[r#"kind="refused""#, r#"code="403""#]);
    // Writes since the start: one finalizer patch and one event per object, the rest
    // refused status writes (the last few may be in flight).
    let status_writes = at_end - start_count - 2.0 * OBJECTS as f64;
    assert!(
        (refusals - status_writes).abs() <= 5.0,
        "refusals counted {refusals}, status writes started {status_writes}"
    );

    // The permission returns: every object Ready within the cap (plus RBAC's own delay).
    refused.grant_back().await.expect("grant the permission back");
    let granted = Instant::now();
    eventually("every object Ready after the grant", cap + Duration::from_secs(20), || async {
        all_ready(&w, OBJECTS).await.then_some(())
    })
    .await;
    let recovered = granted.elapsed();
    eprintln!("all {OBJECTS} Ready {recovered:?} after the grant (cap {cap:?})");
    assert!(recovered <= cap + Duration::from_secs(3), "recovery took {recovered:?}, cap {cap:?}");
    eventually("no object in backoff", Duration::from_secs(10), || async {
        (metric_sum(&agent_metrics(&w, &agent).await, "portassign_objects_in_backoff", &[]) == 0.0).then_some(())
    })
    .await;

    agent.stop().await.unwrap();
    w.cleanup().await;
    refused.remove().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_finalizer_is_explained_in_the_ready_condition() {
    let cap = Duration::from_secs(4);
    let w = World::new("nofinalizer").await;
    let refused = restricted("portassignments").await;
    let mut config = w.agent_config(&w.node, port_block(2));
    config.retry = Policy::with_cap(cap);
    let agent = w.agent_as(&refused.identity, config, std::sync::Arc::new(SocketProbe::detect())).await;
    w.create("pool", &["a"]).await;
    let condition = eventually("Ready=False with reason WriteFailed", Duration::from_secs(20), || async {
        let object = w.api().get("pool").await.ok()?;
        object.ready_condition().filter(|c| c.reason == reason::WRITE_FAILED).cloned()
    })
    .await;
    assert_eq!(condition.status, "False");
    assert!(condition.message.contains("finalizer"), "{}", condition.message);
    assert!(condition.message.contains("forbidden"), "the condition quotes the API: {}", condition.message);

    refused.grant_back().await.expect("grant the permission back");
    let ports = w.ready_ports("pool").await;
    assert_eq!(ports.len(), 1);
    agent.stop().await.unwrap();
    w.cleanup().await;
    refused.remove().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn writes_never_outrun_the_rate_limit() {
    const OBJECTS: usize = 60;
    let rate = Rate { per_second: 40.0, burst: 20 };
    let w = World::new("throttle").await;
    let mut config = w.agent_config(&w.node, port_block(OBJECTS as u16));
    config.writes = rate;
    config.concurrency = 64;
    let agent = w.agent_as(&w.agent_identity, config, std::sync::Arc::new(SocketProbe::detect())).await;
    let api = w.api();
    let start = Instant::now();
    let creates = futures::future::join_all((0..OBJECTS).map(|i| {
        let api = api.clone();
        let object = portassign::api::PortAssignment::new(
            &format!("o{i}"),
            portassign::api::PortAssignmentSpec {
                node_name: w.node.clone(),
                protocol: portassign::api::Protocol::Tcp,
                keys: vec!["k".into()],
            },
        );
        async move { api.create(&PostParams::default(), &object).await.expect("create") }
    }));
    creates.await;
    // Sample the agent's own count of writes started: never above burst + rate × elapsed.
    let mut samples = 0;
    while !all_ready(&w, OBJECTS).await {
        let writes = metric_sum(&agent_metrics(&w, &agent).await, "portassign_writes_total", &[]);
        let allowed = f64::from(rate.burst) + rate.per_second * start.elapsed().as_secs_f64();
        assert!(writes <= allowed, "{writes} writes after {:?}: more than {allowed}", start.elapsed());
        samples += 1;
        assert!(start.elapsed() < Duration::from_secs(60), "objects not Ready after 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = start.elapsed();
    // Each object needs at least two writes (finalizer, status): the limit must show.
    let floor = (2.0 * OBJECTS as f64 - f64::from(rate.burst)) / rate.per_second;
    assert!(elapsed.as_secs_f64() >= floor, "converged in {elapsed:?}, faster than the limit allows ({floor:.1} s)");
    let metrics = agent_metrics(&w, &agent).await;
    assert!(metric_sum(&metrics, "portassign_writes_throttled_total", &[]) > 0.0, "{metrics}");
    assert!(samples > 3, "sampled the write count {samples} times");
    agent.stop().await.unwrap();
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_watch_event_retries_at_once_whatever_the_backoff() {
    let cap = Duration::from_secs(60);
    let w = World::new("touched").await;
    let refused = restricted("portassignments/status").await;
    let mut config = w.agent_config(&w.node, port_block(2));
    config.retry = Policy::with_cap(cap);
    let agent = w.agent_as(&refused.identity, config, std::sync::Arc::new(SocketProbe::detect())).await;
    w.create("pool", &["a"]).await;
    // Refused at 0 s, 1 s and 5 s: the next retry is due 16 s later (12.8 s at least).
    eventually("three refusals", Duration::from_secs(20), || async {
        let refusals = metric_sum(&agent_metrics(&w, &agent).await, "portassign_write_failures_total", &[]);
        (refusals >= 3.0).then_some(())
    })
    .await;
    let third = Instant::now();
    refused.grant_back().await.expect("grant the permission back");
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Someone edits the object: the watch event reconciles it at once.
    let touch = serde_json::json!({ "metadata": { "labels": { "touched": "yes" } } });
    w.api()
        .patch("pool", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(touch))
        .await
        .expect("label the object");
    let touched = Instant::now();
    w.ready_ports("pool").await;
    let waited = touched.elapsed();
    assert!(
        third.elapsed() < Duration::from_secs(12),
        "Ready {:?} after the third refusal: no faster than the backoff itself",
        third.elapsed()
    );
    eprintln!("Ready {waited:?} after the edit, {:?} after the third refusal", third.elapsed());
    agent.stop().await.unwrap();
    w.cleanup().await;
    refused.remove().await;
}
