//! The chart's API Priority and Fairness objects against a real API server: installed
//! (server-side apply, as `helm install` creates them), the API server classifies every
//! request of the agent's and the janitor's ServiceAccounts into the chart's FlowSchema
//! and priority level, and nobody else's. The API server says which FlowSchema and
//! priority level served a request in the `X-Kubernetes-PF-*-UID` response headers.

use std::time::Duration;

use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams},
    discovery::ApiResource,
};
use portassign::api::PortAssignment;
use portassign_testkit::{Cluster, chart, eventually};

const GROUP: &str = "flowcontrol.apiserver.k8s.io";

fn api(client: &Client, kind: &str, plural: &str) -> Api<DynamicObject> {
    Api::all_with(client.clone(), &ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GROUP, "v1", kind), plural))
}

/// The FlowSchema and priority level UIDs the API server reports for a list of
/// PortAssignments made by `client`.
async fn classified(client: &Client) -> (String, String) {
    let path = format!("{}?limit=1", PortAssignment::url_path(&(), None));
    let request = http::Request::get(path).body(kube::client::Body::empty()).expect("request");
    let response = client.send(request).await.expect("list PortAssignments");
    assert!(response.status().is_success(), "list answered {}", response.status());
    let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    (header("X-Kubernetes-PF-FlowSchema-UID"), header("X-Kubernetes-PF-PriorityLevel-UID"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agents_and_the_janitors_requests_land_in_the_charts_priority_level() {
    let cluster = Cluster::shared().await;
    let admin = cluster.admin.client();
    let rendered = chart::render(&cluster.namespace, &["flowControl.enabled=true", "janitor.enabled=true"])
        .expect("helm template");
    let levels = api(&admin, "PriorityLevelConfiguration", "prioritylevelconfigurations");
    let schemas = api(&admin, "FlowSchema", "flowschemas");
    let params = PatchParams::apply("portassign-e2e").force();
    let mut uids = Vec::new();
    for (kind, api) in [("PriorityLevelConfiguration", &levels), ("FlowSchema", &schemas)] {
        let objects: Vec<_> = chart::of_kind(&rendered, kind).collect();
        assert_eq!(objects.len(), 1, "the chart renders one {kind}");
        let object: DynamicObject = serde_json::from_value(objects[0].clone()).expect("object");
        let applied = api
            .patch(&object.name_any(), &params, &Patch::Apply(&object))
            .await
            .unwrap_or_else(|e| panic!("the API server refuses the chart's {kind}: {e}"));
        uids.push(applied.uid().expect("uid"));
    }
    let (level_uid, schema_uid) = (uids[0].clone(), uids[1].clone());

    for identity in [&cluster.agent, &cluster.janitor] {
        let client = identity.client();
        // The API server's flow-control configuration catches up with new objects shortly.
        eventually(&format!("{}'s requests in the chart's FlowSchema", identity.user), Duration::from_secs(30), || {
            let client = client.clone();
            let expected = (schema_uid.clone(), level_uid.clone());
            async move { (classified(&client).await == expected).then_some(()) }
        })
        .await;
    }
    let (admin_schema, _) = classified(&admin).await;
    assert!(!admin_schema.is_empty(), "the API server reports a FlowSchema for every request");
    assert_ne!(admin_schema, schema_uid, "the admin's requests stay out of the chart's FlowSchema");

    for (api, name) in [(&schemas, "FlowSchema"), (&levels, "PriorityLevelConfiguration")] {
        let object: DynamicObject =
            serde_json::from_value(chart::of_kind(&rendered, name).next().expect("rendered").clone()).expect("object");
        let _ = api.delete(&object.name_any(), &DeleteParams::default()).await;
    }
}
