//! Hostile and malformed input across the API: each case is either rejected by the API
//! server with a readable message, or handled by the agent with a condition, an event or
//! a repair — never a crash, a stall or a lost port. The invariant checker runs after
//! the handled cases. On a control plane of its own, because one case changes the CRD.
//!
//! The rejected spec cases of `tests/crd.rs` (13 creates, 2 immutable fields, 3 status
//! writes) complete this table.

use std::{sync::Arc, time::Duration};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    Api, ResourceExt,
    api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams},
};
use portassign::{
    agent::probe::SocketProbe,
    checker::{self, Expectations},
};
use portassign_testkit::{Cluster, World, eventually, keys, port_block, ports_of, ready_reason};
use serde_json::{Value, json};

fn dynamic(w: &World) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("portassign.io", "v1alpha1", "PortAssignment");
    Api::namespaced_with(w.client.clone(), &w.ns, &ApiResource::from_gvk(&gvk))
}

fn manifest(name: &str, spec: Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "portassign.io/v1alpha1", "kind": "PortAssignment",
        "metadata": { "name": name }, "spec": spec,
    }))
    .unwrap()
}

fn report(case: &str, outcome: &str) {
    println!("hostile | {case} | {outcome}");
}

/// Writes `status` over the object's status by hand (a merge patch, as `kubectl edit
/// --subresource status` would).
async fn edit_status(w: &World, name: &str, status: Value) -> Result<(), kube::Error> {
    w.api().patch_status(name, &PatchParams::default(), &Patch::Merge(json!({ "status": status }))).await.map(|_| ())
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_input_is_rejected_or_handled_without_losing_a_port() {
    let plane = Cluster::own("hostile", &[]).await;
    let w = World::on(&plane, "hostile").await;
    let raw = dynamic(&w);
    let range = port_block(1100);
    let agent = w.agent(range).await;

    // --- Rejected by the API server ---------------------------------------------
    raw.create(&PostParams::default(), &manifest("target", json!({ "nodeName": w.node, "keys": ["a", "b"] })))
        .await
        .unwrap();
    let target = w.ready_ports("target").await;
    let rejected: Vec<(&str, Value, &str)> = vec![
        ("status port 0", json!({ "ports": [{ "key": "a", "port": 0 }] }), "greater than or equal to 1"),
        ("status port 70000", json!({ "ports": [{ "key": "a", "port": 70000 }] }), "less than or equal to 65535"),
        (
            "status key twice",
            json!({ "ports": [{ "key": "a", "port": 1 }, { "key": "a", "port": 2 }] }),
            "Duplicate value",
        ),
        ("status empty key", json!({ "ports": [{ "key": "", "port": 5 }] }), "at least 1 chars long"),
        ("status ports not a list", json!({ "ports": "a=1" }), "must be of type array"),
        (
            "status condition without reason",
            json!({ "conditions": [{ "type": "Ready", "status": "True", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z" }] }),
            "reason: Required value",
        ),
        (
            "status condition with a bad time",
            json!({ "conditions": [{ "type": "Ready", "status": "True", "reason": "X", "message": "", "lastTransitionTime": "yesterday" }] }),
            "must be of type date-time",
        ),
    ];
    for (case, status, expected) in &rejected {
        let err = edit_status(&w, "target", status.clone()).await.expect_err(case).to_string();
        assert!(err.contains(expected), "{case}: {err:?} lacks {expected:?}");
        report(case, &format!("rejected: \"{expected}\""));
    }
    for (case, spec, expected) in [
        ("key with a newline", json!({ "nodeName": w.node, "keys": ["a\nb"] }), "should match"),
        ("1001 keys", json!({ "nodeName": w.node, "keys": keys("k", 1001) }), "must have at most 1000 items"),
    ] {
        let err = raw.create(&PostParams::default(), &manifest("bad", spec)).await.expect_err(case).to_string();
        assert!(err.contains(expected), "{case}: {err:?} lacks {expected:?}");
        report(case, &format!("rejected: \"{expected}\""));
    }
    assert_eq!(w.ready_ports("target").await, target, "rejected writes changed nothing");

    // --- Handled by the agent ------------------------------------------------------
    // Hand-edited statuses are repaired from the agent's table (the durable truth it
    // rebuilt at start), so a port is never given away by an edit.
    let other = range.last();
    let edits: Vec<(&str, Value)> = vec![
        (
            "status lists a key not in spec",
            json!({ "ports": [{ "key": "a", "port": target["a"] }, { "key": "b", "port": target["b"] }, { "key": "ghost", "port": other }] }),
        ),
        (
            "status moves a key to another port",
            json!({ "ports": [{ "key": "a", "port": other }, { "key": "b", "port": target["b"] }] }),
        ),
        (
            "status port outside the range",
            json!({ "ports": [{ "key": "a", "port": 80 }, { "key": "b", "port": target["b"] }] }),
        ),
        ("status wiped", json!({ "ports": [] })),
        (
            "Ready forged on the status",
            json!({ "conditions": [{ "type": "Ready", "status": "False", "reason": "Bogus", "message": "x", "lastTransitionTime": "2026-01-01T00:00:00Z" }] }),
        ),
    ];
    for (case, status) in edits {
        edit_status(&w, "target", status).await.unwrap_or_else(|e| panic!("{case}: {e}"));
        eventually(case, Duration::from_secs(30), || async {
            let o = w.api().get("target").await.ok()?;
            let ok = ports_of(&o) == target && ready_reason(&o) == Some(("True".into(), "Allocated".into()));
            ok.then_some(())
        })
        .await;
        report(case, "repaired by the agent: the status again says what the agent holds");
    }

    // A port another object holds, copied into this status: repaired the same way.
    w.create("neighbour", &["n"]).await;
    let neighbour = w.ready_ports("neighbour").await;
    edit_status(
        &w,
        "target",
        json!({ "ports": [{ "key": "a", "port": neighbour["n"] }, { "key": "b", "port": target["b"] }] }),
    )
    .await
    .unwrap();
    eventually("duplicate repaired", Duration::from_secs(30), || async {
        (ports_of(&w.api().get("target").await.ok()?) == target).then_some(())
    })
    .await;
    assert_eq!(w.ready_ports("neighbour").await, neighbour);
    report("status copies another object's port", "repaired; the other object keeps its port");

    // Limits.
    let thousand = keys("key", 1000);
    let thousand_refs: Vec<&str> = thousand.iter().map(String::as_str).collect();
    w.create("big", &thousand_refs).await;
    let big = w.ready_ports("big").await;
    assert_eq!(big.len(), 1000);
    report("1000 keys (the limit)", "Ready with 1000 distinct ports");
    w.delete("big").await;
    w.gone("big").await;

    let small_node = format!("{}-small", w.node);
    let small = w.agent_for(&small_node, port_block(50), Arc::new(SocketProbe::detect())).await;
    w.create_for(&small_node, "starved", portassign::api::Protocol::Tcp, &thousand_refs).await;
    let starved = eventually("RangeExhausted", Duration::from_secs(30), || async {
        let o = w.api().get("starved").await.ok()?;
        (ready_reason(&o) == Some(("False".into(), "RangeExhausted".into()))).then_some(o)
    })
    .await;
    assert_eq!(ports_of(&starved).len(), 50);
    report("1000 keys on a 50-port range", "Ready=False RangeExhausted with 50 ports, event");
    w.delete("starved").await;
    w.gone("starved").await;
    small.stop().await.unwrap();

    let long_key = "k".repeat(253);
    w.create("edge", &[long_key.as_str()]).await;
    w.create("empty", &[]).await;
    assert_eq!(w.ready_ports("edge").await.len(), 1);
    assert!(w.ready_ports("empty").await.is_empty());
    report("key of 253 characters", "Ready");
    report("no keys at all", "Ready with no ports");

    // Our finalizer stripped from a live object: put back, ports unchanged.
    w.api()
        .patch("target", &PatchParams::default(), &Patch::Merge(json!({ "metadata": { "finalizers": null } })))
        .await
        .unwrap();
    eventually("finalizer back", Duration::from_secs(30), || async {
        let o = w.api().get("target").await.ok()?;
        o.finalizers().iter().any(|f| f == portassign::api::FINALIZER).then_some(())
    })
    .await;
    assert_eq!(w.ready_ports("target").await, target);
    report("finalizer stripped from a live object", "finalizer added back, ports unchanged");

    // Finalizer stripped, then deleted: the agent never sees a cleanup, yet frees the ports.
    w.create("forced", &["f1", "f2"]).await;
    let forced = w.ready_ports("forced").await;
    w.api()
        .patch("forced", &PatchParams::default(), &Patch::Merge(json!({ "metadata": { "finalizers": null } })))
        .await
        .unwrap();
    w.delete("forced").await;
    w.gone("forced").await;
    let url = format!("http://{}", agent.http_addr);
    eventually("force-deleted object's ports released", Duration::from_secs(20), || async {
        let table = checker::fetch_table(&url, Some(&w.reader_identity.token())).await.ok()?;
        table.ports.iter().all(|e| !forced.values().any(|p| *p == e.port)).then_some(())
    })
    .await;
    report(
        "finalizer stripped, then deleted",
        "ports released (by the cleanup if the agent re-added its finalizer first, else by its vanished-object check)",
    );

    // Someone else's finalizer: ours is removed and the ports released; theirs keeps it.
    w.create("shared", &["s"]).await;
    w.ready_ports("shared").await;
    w.api()
        .patch(
            "shared",
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "finalizers": [portassign::api::FINALIZER, "example.com/other"] } })),
        )
        .await
        .unwrap();
    w.delete("shared").await;
    eventually("our finalizer removed", Duration::from_secs(30), || async {
        let o = w.api().get("shared").await.ok()?;
        (o.finalizers() == ["example.com/other"]).then_some(())
    })
    .await;
    report(
        "deleted with another controller's finalizer",
        "our finalizer removed, ports released; object waits for the other",
    );

    // Rapid create/delete of one name.
    for _ in 0..15 {
        let _ = w
            .api()
            .create(
                &PostParams::default(),
                &portassign::api::PortAssignment::new("flicker", spec(&w.node, &["x", "y"])),
            )
            .await;
        let _ = w.api().delete("flicker", &DeleteParams::default()).await;
    }
    w.gone("flicker").await;
    report("create and delete the same name 15 times", "nothing left behind (checker below)");

    // An object this agent cannot decode: a newer CRD allows protocol SCTP.
    let crds: Api<CustomResourceDefinition> = Api::all(w.client.clone());
    let mut crd = crds.get("portassignments.portassign.io").await.unwrap();
    let schema = crd.spec.versions[0].schema.as_mut().and_then(|s| s.open_api_v3_schema.as_mut()).expect("schema");
    let protocol = schema
        .properties
        .as_mut()
        .and_then(|p| p.get_mut("spec"))
        .and_then(|s| s.properties.as_mut())
        .and_then(|p| p.get_mut("protocol"))
        .expect("protocol property");
    protocol
        .enum_
        .get_or_insert_with(Vec::new)
        .push(k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSON(json!("SCTP")));
    crds.replace("portassignments.portassign.io", &PostParams::default(), &crd).await.expect("widen the CRD");
    eventually("SCTP accepted", Duration::from_secs(10), || async {
        raw.create(
            &PostParams::default(),
            &manifest("future", json!({ "nodeName": w.node, "protocol": "SCTP", "keys": ["z"] })),
        )
        .await
        .ok()
    })
    .await;
    let events = eventually("InvalidObject event", Duration::from_secs(30), || async {
        let e = w.events("future").await;
        e.iter().any(|(r, _)| r == "InvalidObject").then_some(e)
    })
    .await;
    assert!(!events.is_empty());
    w.create("after-future", &["q"]).await;
    w.ready_ports("after-future").await;
    report(
        "object the agent cannot decode (a newer CRD's protocol)",
        "skipped with an InvalidObject event; others still served",
    );
    raw.delete("future", &DeleteParams::default()).await.unwrap();

    // Nothing lost, nothing leaked, once the agent has caught up (a few seconds at most).
    let url = format!("http://{}", agent.http_addr);
    let expect = Expectations { ranges: [(w.node.clone(), range)].into_iter().collect(), ..Default::default() };
    let started = std::time::Instant::now();
    let violations = loop {
        let table = checker::fetch_table(&url, Some(&w.reader_identity.token())).await.unwrap();
        let objects: Vec<_> = w.api().list(&Default::default()).await.unwrap().items;
        let objects: Vec<_> = objects.into_iter().filter(|o| o.spec.node_name == w.node).collect();
        let violations = checker::check(&objects, &[table], &expect, k8s_openapi::jiff::Timestamp::now());
        if violations.is_empty() || started.elapsed() > Duration::from_secs(15) {
            break violations;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    println!("hostile: checker clean {:?} after the last case", started.elapsed());
    assert!(violations.is_empty(), "checker after the hostile cases: {violations:#?}");
    agent.stop().await.unwrap();
}

fn spec(node: &str, keys: &[&str]) -> portassign::api::PortAssignmentSpec {
    portassign::api::PortAssignmentSpec {
        node_name: node.into(),
        protocol: portassign::api::Protocol::Tcp,
        keys: keys.iter().map(|k| k.to_string()).collect(),
    }
}
