//! Objects of a node that no longer exists: the janitor releases them, so nothing hangs
//! in Terminating and no status keeps counting ports. On a control plane of its own,
//! because the janitor acts cluster-wide.

use std::time::Duration;

use k8s_openapi::api::{coordination::v1::Lease, core::v1::Node};
use kube::{
    Api,
    api::{DeleteParams, PostParams},
};
use portassign::janitor;
use portassign_testkit::{Cluster, World, eventually, port_block, ports_of, ready_reason};
use tokio_util::sync::CancellationToken;

async fn create_node(client: &kube::Client, name: &str) {
    let node: Node = serde_json::from_value(serde_json::json!({ "metadata": { "name": name } })).unwrap();
    Api::<Node>::all(client.clone()).create(&PostParams::default(), &node).await.expect("create node");
}

#[tokio::test(flavor = "multi_thread")]
async fn objects_of_a_deleted_node_are_released_and_not_left_terminating() {
    let plane = Cluster::own("orphans", &[]).await;
    let client = plane.admin.client();
    let w = World::on(&plane, "orphans").await;
    let gone_node = "node-gone";
    let live_node = w.node.clone();
    create_node(&client, gone_node).await;
    create_node(&client, &live_node).await;

    let range = port_block(10);
    let gone_agent =
        w.agent_for(gone_node, range, std::sync::Arc::new(portassign::agent::probe::SocketProbe::detect())).await;
    let live_agent = w.agent(range).await;
    w.create_for(gone_node, "kept", portassign::api::Protocol::Tcp, &["a", "b"]).await;
    w.create_for(gone_node, "deleting", portassign::api::Protocol::Tcp, &["c"]).await;
    w.create("healthy", &["d"]).await;
    for name in ["kept", "deleting", "healthy"] {
        w.ready_ports(name).await;
    }
    let healthy = w.ready_ports("healthy").await;

    // The node goes away with its agent; one of its objects is deleted afterwards.
    gone_agent.stop().await.unwrap();
    Api::<Node>::all(client.clone()).delete(gone_node, &DeleteParams::default()).await.unwrap();
    w.delete("deleting").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(w.api().get_opt("deleting").await.unwrap().is_some(), "without the janitor it hangs in Terminating");

    let config = janitor::Config {
        grace: Duration::from_secs(2),
        interval: Duration::from_millis(300),
        lease_namespace: w.system_namespace.clone(),
        identity: "janitor-1".into(),
        lease_duration: Duration::from_secs(15),
    };
    let stop = CancellationToken::new();
    // Both janitors run as the chart's janitor ServiceAccount, with the chart's RBAC.
    let first = tokio::spawn(janitor::run(w.janitor_identity.client(), config.clone(), stop.clone()));
    let second = tokio::spawn(janitor::run(
        w.janitor_identity.client(),
        janitor::Config { identity: "janitor-2".into(), ..config },
        stop.clone(),
    ));

    w.gone("deleting").await;
    let kept = eventually("kept released", Duration::from_secs(30), || async {
        let o = w.api().get("kept").await.ok()?;
        (ready_reason(&o) == Some(("False".into(), "NodeNotFound".into()))).then_some(o)
    })
    .await;
    assert!(ports_of(&kept).is_empty(), "the ports of a gone node are no longer recorded");
    w.event("kept", "NodeNotFound").await;

    // The object of the node that still exists is untouched, even with its agent stopped.
    live_agent.stop().await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(ports_of(&w.api().get("healthy").await.unwrap()), healthy);

    // One lease, one holder.
    let lease = Api::<Lease>::namespaced(client.clone(), &w.system_namespace).get(janitor::LEASE_NAME).await.unwrap();
    let holder = lease.spec.and_then(|s| s.holder_identity).unwrap_or_default();
    assert!(holder == "janitor-1" || holder == "janitor-2", "lease held by {holder}");

    stop.cancel();
    first.await.unwrap();
    second.await.unwrap();
    w.cleanup().await;
}
