//! The DRA driver against a real kube-apiserver, with the kubelet played by the test: the
//! agent (the chart's RBAC) with a claims' range publishes the node's ResourceSlice; the
//! kubelet plugin, in process, prepares a ResourceClaim allocated from that pool (the test
//! writes the allocation as the scheduler would) by asking the agent, which records the
//! claim's ports in a PortAssignment of its own from the claims' range only; the CDI spec
//! carries them; a second prepare gives the same ports; unprepare releases them.

use std::{io, path::PathBuf, sync::Arc, time::Duration};

use hyper_util::rt::TokioIo;
use k8s_openapi::api::resource::v1::{ResourceClaim, ResourceSlice};
use kube::{
    Api, ResourceExt,
    api::{Patch, PatchParams, PostParams},
};
use portassign::{
    agent::{self, probe::SocketProbe},
    api::{PortAssignment, dra},
    range::PortPool,
};
use portassign_kubelet_plugin::proto::dra::{
    Claim, NodePrepareResourcesRequest, NodeUnprepareResourcesRequest, dra_plugin_client::DraPluginClient,
};
use portassign_testkit::{World, eventually, port_block, ports_of};
use serde_json::json;
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint, Uri};

async fn connect(socket: PathBuf) -> Channel {
    eventually("the plugin's socket", Duration::from_secs(10), || async {
        let path = socket.clone();
        let connector = tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        });
        Endpoint::from_static("http://localhost").connect_with_connector(connector).await.ok()
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_claim_gets_bind_verified_ports_of_the_claims_range_recorded_like_every_other() {
    let w = World::new("dra").await;
    let keys = port_block(4);
    let claims = port_block(4);
    let dir = std::env::temp_dir().join(portassign_testkit::unique("dra"));
    let cdi = dir.join("cdi");
    std::fs::create_dir_all(dir.join("registry")).unwrap();
    let config = agent::Config {
        dra: Some(agent::dra::Config { pool: PortPool::from(claims), socket: dir.join("agent.sock") }),
        ..w.agent_config(&w.node, keys)
    };
    let running = w.agent_as(&w.agent_identity, config, Arc::new(SocketProbe::detect())).await;
    let stop = CancellationToken::new();
    let mut plugin = portassign_kubelet_plugin::Config::new(dir.join("agent.sock"));
    plugin.registry_dir = dir.join("registry");
    plugin.plugin_dir = dir.join("plugin");
    plugin.cdi_dir = cdi.clone();
    let dra_socket = plugin.dra_socket();
    let served = tokio::spawn(portassign_kubelet_plugin::serve(plugin, stop.clone()));

    // The node's pool: one shared device, as many ports of capacity as the claims' range.
    let slices: Api<ResourceSlice> = Api::all(w.client.clone());
    let slice = eventually("the node's ResourceSlice", Duration::from_secs(30), || async {
        slices.get_opt(&agent::dra::slice_name(&w.node)).await.ok().flatten()
    })
    .await;
    assert_eq!(slice.spec.driver, dra::DRIVER);
    let device = &slice.spec.devices.as_ref().unwrap()[0];
    assert_eq!(device.capacity.as_ref().unwrap()[dra::CAPACITY].value.0, claims.len().to_string());

    // A claim for two ports, allocated from the node's pool as the scheduler would.
    let claims_api: Api<ResourceClaim> = Api::namespaced(w.client.clone(), &w.ns);
    let claim: ResourceClaim = serde_json::from_value(json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
        "metadata": { "name": "web" },
        "spec": { "devices": { "requests": [{ "name": "http", "exactly": {
            "deviceClassName": "host-port.portassign.io", "capacity": { "requests": { "ports": "2" } } } }] } }
    }))
    .unwrap();
    let claim = claims_api.create(&PostParams::default(), &claim).await.expect("create the claim");
    let allocation = json!({ "status": { "allocation": { "devices": { "results": [{
        "request": "http", "driver": dra::DRIVER, "pool": w.node, "device": dra::DEVICE,
        "shareID": "7a3e8f4c-0b1d-4c2e-9f6a-5d8b2c1e0f93", "consumedCapacity": { "ports": "2" }
    }] } } } });
    claims_api
        .patch_status("web", &PatchParams::default(), &Patch::Merge(&allocation))
        .await
        .expect("allocate the claim");
    let uid = claim.uid().unwrap();
    let kubelet_claim = Claim { namespace: w.ns.clone(), uid: uid.clone(), name: "web".into() };

    let mut kubelet = DraPluginClient::new(connect(dra_socket).await);
    let prepare = NodePrepareResourcesRequest { claims: vec![kubelet_claim.clone()] };
    let answer = kubelet.node_prepare_resources(prepare.clone()).await.expect("prepare").into_inner();
    let prepared = &answer.claims[&uid];
    assert_eq!(prepared.error, "", "prepare failed");
    assert_eq!(prepared.devices.len(), 1);
    assert_eq!(prepared.devices[0].request_names, ["http"]);
    assert_eq!(prepared.devices[0].share_id.as_deref(), Some("7a3e8f4c-0b1d-4c2e-9f6a-5d8b2c1e0f93"));

    // Recorded like every other port: the claim's own object, owned by the claim.
    let objects: Api<PortAssignment> = Api::namespaced(w.client.clone(), &w.ns);
    let object = objects.get(&agent::dra::object_name("web")).await.expect("the claim's PortAssignment");
    assert_eq!(object.labels()[dra::CLAIM_LABEL], uid);
    assert_eq!(object.owner_references()[0].uid, uid);
    let ports = ports_of(&object);
    assert_eq!(ports.keys().map(String::as_str).collect::<Vec<_>>(), ["http", "http.1"]);
    assert!(ports.values().all(|p| claims.contains(*p)), "claims get the claims' range only: {ports:?}");

    // The ports on the claim itself need the driver's permission for claims of the
    // agent's own node, which only a token bound to a pod on that node carries: this
    // test's token is not, so the status stays empty here (the kind scenarios check it).
    // The container's environment, through CDI.
    let spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cdi.join(format!("portassign.io-port_{uid}.json"))).unwrap()).unwrap();
    let env: Vec<String> = serde_json::from_value(spec["devices"][0]["containerEdits"]["env"].clone()).unwrap();
    assert!(env.contains(&format!("PORTASSIGN_PORT={}", ports["http"])), "{env:?}");
    assert!(env.contains(&format!("PORTASSIGN_PORTS={},{}", ports["http"], ports["http.1"])), "{env:?}");

    // The kubelet may prepare again (after its restart): the same ports.
    let again = kubelet.node_prepare_resources(prepare).await.expect("prepare again").into_inner();
    assert_eq!(again.claims[&uid], *prepared);
    assert_eq!(ports_of(&objects.get(&agent::dra::object_name("web")).await.unwrap()), ports);

    // Keys on the same node never get the claims' ports, and claims never the keys'.
    w.create("sandboxes", &["a", "b", "c", "d", "e"]).await;
    let held = eventually("the keys' ports", Duration::from_secs(30), || async {
        let o = w.api().get("sandboxes").await.ok()?;
        (ports_of(&o).len() == 4).then(|| ports_of(&o))
    })
    .await;
    assert!(held.values().all(|p| keys.contains(*p)), "keys get the keys' range only: {held:?}");

    // Unprepare: the claim's object goes and its ports are free again.
    let unprepare = NodeUnprepareResourcesRequest { claims: vec![kubelet_claim] };
    let answer = kubelet.node_unprepare_resources(unprepare).await.expect("unprepare").into_inner();
    assert_eq!(answer.claims[&uid].error, "");
    eventually("the claim's PortAssignment gone", Duration::from_secs(30), || async {
        objects.get_opt(&agent::dra::object_name("web")).await.ok()?.is_none().then_some(())
    })
    .await;
    assert!(!cdi.join(format!("portassign.io-port_{uid}.json")).exists());

    stop.cancel();
    served.await.unwrap().expect("the plugin stops cleanly");
    running.stop().await.expect("the agent stops cleanly");
    let _ = std::fs::remove_dir_all(&dir);
    w.cleanup().await;
}
