//! The CRD: generated file in sync with the types, and bad objects rejected by the real
//! API server with a message a user can act on.

use kube::{
    Api,
    api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams},
};
use portassign_testkit::World;
use serde_json::{Value, json};

#[test]
fn committed_crd_matches_the_rust_types() {
    let committed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/crds/portassignment.yaml"))
        .expect("crds/portassignment.yaml exists");
    let generated = portassign::api::crd_yaml().expect("render CRD");
    assert!(committed == generated, "crds/portassignment.yaml drifted from src/api.rs: run `make crd` and commit");
    let chart_copy =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/charts/portassign/crds/portassignment.yaml"))
            .expect("the chart's copy exists");
    assert!(chart_copy == generated, "charts/portassign/crds/ drifted from src/api.rs: run `make crd` and commit");
}

fn dynamic_api(w: &World) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("portassign.io", "v1alpha1", "PortAssignment");
    Api::namespaced_with(w.client.clone(), &w.ns, &ApiResource::from_gvk(&gvk))
}

fn object(name: &str, spec: Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "portassign.io/v1alpha1",
        "kind": "PortAssignment",
        "metadata": { "name": name },
        "spec": spec,
    }))
    .expect("dynamic object")
}

async fn rejected_create(api: &Api<DynamicObject>, name: &str, spec: Value) -> String {
    match api.create(&PostParams::default(), &object(name, spec)).await {
        Ok(_) => panic!("{name}: the API server accepted an invalid object"),
        Err(kube::Error::Api(status)) => status.message,
        Err(other) => panic!("{name}: unexpected error {other}"),
    }
}

/// Each case: what is wrong, the spec, and the words the API server's message must contain.
#[tokio::test(flavor = "multi_thread")]
async fn malformed_objects_are_rejected_with_a_readable_message() {
    let w = World::new("crd").await;
    let api = dynamic_api(&w);
    let long_key = "k".repeat(254);
    let too_many: Vec<String> = (0..1001).map(|i| format!("k{i}")).collect();
    let cases: Vec<(&str, Value, &str)> = vec![
        ("no-node", json!({ "keys": ["a"] }), "spec.nodeName: Required value"),
        ("empty-node", json!({ "nodeName": "", "keys": ["a"] }), "spec.nodeName"),
        ("bad-node", json!({ "nodeName": "Worker_1", "keys": ["a"] }), "spec.nodeName in body should match"),
        ("dup-keys", json!({ "nodeName": "n1", "keys": ["a", "b", "a"] }), "Duplicate value: \"a\""),
        ("space-key", json!({ "nodeName": "n1", "keys": ["team a"] }), "spec.keys[0] in body should match"),
        ("dash-key", json!({ "nodeName": "n1", "keys": ["-a"] }), "spec.keys[0] in body should match"),
        ("slash-end-key", json!({ "nodeName": "n1", "keys": ["team-a/"] }), "spec.keys[0] in body should match"),
        ("empty-key", json!({ "nodeName": "n1", "keys": [""] }), "spec.keys[0]"),
        ("long-key", json!({ "nodeName": "n1", "keys": [long_key] }), "may not be more than 253"),
        ("many-keys", json!({ "nodeName": "n1", "keys": too_many }), "must have at most 1000 items"),
        ("sctp", json!({ "nodeName": "n1", "protocol": "SCTP", "keys": ["a"] }), "Unsupported value: \"SCTP\""),
        ("keys-string", json!({ "nodeName": "n1", "keys": "a,b" }), "must be of type array"),
        ("node-number", json!({ "nodeName": 7, "keys": ["a"] }), "must be of type string"),
    ];
    for (name, spec, expected) in &cases {
        let message = rejected_create(&api, name, spec.clone()).await;
        assert!(message.contains(expected), "{name}: message {message:?} lacks {expected:?}");
    }

    // Transitions: nodeName and protocol cannot change once set.
    api.create(&PostParams::default(), &object("valid", json!({ "nodeName": "n1", "keys": ["a"] }))).await.unwrap();
    for (change, expected) in [
        (json!({ "spec": { "nodeName": "n2" } }), "spec.nodeName is immutable"),
        (json!({ "spec": { "protocol": "UDP" } }), "spec.protocol is immutable"),
    ] {
        let err = api.patch("valid", &PatchParams::default(), &Patch::Merge(change)).await.unwrap_err();
        let message = err.to_string();
        assert!(message.contains(expected), "message {message:?} lacks {expected:?}");
    }

    // The status subresource is validated too: no port outside 1-65535, no key twice.
    for (status, expected) in [
        (json!({ "ports": [{ "key": "a", "port": 70000 }] }), "should be less than or equal to 65535"),
        (json!({ "ports": [{ "key": "a", "port": 0 }] }), "should be greater than or equal to 1"),
        (json!({ "ports": [{ "key": "a", "port": 1 }, { "key": "a", "port": 2 }] }), "Duplicate value"),
    ] {
        let err = api
            .patch_status("valid", &PatchParams::default(), &Patch::Merge(json!({ "status": status })))
            .await
            .unwrap_err();
        let message = err.to_string();
        assert!(message.contains(expected), "message {message:?} lacks {expected:?}");
    }
    api.delete("valid", &Default::default()).await.unwrap();
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_node_field_selector_is_served() {
    let w = World::new("select").await;
    let api = dynamic_api(&w);
    api.create(&PostParams::default(), &object("on-a", json!({ "nodeName": "node-a", "keys": [] }))).await.unwrap();
    api.create(&PostParams::default(), &object("on-b", json!({ "nodeName": "node-b", "keys": [] }))).await.unwrap();
    let list = api.list(&kube::api::ListParams::default().fields("spec.nodeName=node-a")).await.unwrap();
    let names: Vec<_> = list.items.iter().filter_map(|o| o.metadata.name.clone()).collect();
    assert_eq!(names, vec!["on-a".to_string()]);
    for name in ["on-a", "on-b"] {
        api.delete(name, &Default::default()).await.unwrap();
    }
    w.cleanup().await;
}
