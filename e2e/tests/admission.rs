//! The chart's ValidatingAdmissionPolicy against a real kube-apiserver, which evaluates
//! it itself (no webhook server): a table of Pods and workloads, each created with
//! `dryRun=All` (admission runs, nothing is stored) and asserted admitted or refused with
//! the policy's message; an update of an object made before the policy; `Warn` mode; and
//! `portassign check` listing a pod made before the policy.
//!
//! The policy is rendered by `helm template` from the chart under a name and ranges of
//! its own (41000-41999 and 43000-43099, 41500 excluded), which no other test uses, so
//! the pods of other tests on the shared control plane are never in its ranges.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams},
    core::ApiResource,
};
use portassign::checker::{self, KeptPorts};
use portassign_testkit::{Cluster, chart, cluster::ensure_namespace, eventually, portassign_bin, unique};
use serde_json::{Value, json};

const LABEL: &str = "portassign.io/host-ports";

/// A container named `name` with `ports`.
fn container(name: &str, ports: Value) -> Value {
    json!({ "name": name, "image": "registry.invalid/pause", "ports": ports })
}

/// A pod spec with one container declaring `ports`.
fn spec(ports: Value) -> Value {
    json!({ "containers": [container("web", ports)] })
}

fn host_port(port: u16, protocol: &str) -> Value {
    json!([{ "containerPort": 8080, "hostPort": port, "protocol": protocol }])
}

fn pod(labels: Value, spec: Value) -> Value {
    json!({ "apiVersion": "v1", "kind": "Pod", "metadata": { "name": "p", "labels": labels }, "spec": spec })
}

/// A pod template with `labels`, of the pod spec `spec`.
fn template(labels: Value, spec: Value) -> Value {
    let mut labels = labels;
    labels["app"] = json!("a");
    json!({ "metadata": { "labels": labels }, "spec": spec })
}

/// A workload of `kind` whose pods are made from `template`.
fn workload(kind: &str, labels: Value, template: Value) -> Value {
    let selector = json!({ "matchLabels": { "app": "a" } });
    let mut restart_never = template.clone();
    restart_never["spec"]["restartPolicy"] = json!("Never");
    let (api_version, spec) = match kind {
        "Deployment" | "ReplicaSet" | "DaemonSet" => ("apps/v1", json!({ "selector": selector, "template": template })),
        "StatefulSet" => ("apps/v1", json!({ "selector": selector, "serviceName": "s", "template": template })),
        "ReplicationController" => ("v1", json!({ "selector": { "app": "a" }, "template": template })),
        "Job" => ("batch/v1", json!({ "template": restart_never })),
        "CronJob" => {
            ("batch/v1", json!({ "schedule": "@hourly", "jobTemplate": { "spec": { "template": restart_never } } }))
        }
        "PodTemplate" => {
            return json!({ "apiVersion": "v1", "kind": kind, "metadata": { "name": "w", "labels": labels }, "template": template });
        }
        other => panic!("no workload {other}"),
    };
    json!({ "apiVersion": api_version, "kind": kind, "metadata": { "name": "w", "labels": labels }, "spec": spec })
}

/// The API of `object`'s kind in `namespace`.
fn api_of(client: &Client, namespace: &str, object: &Value) -> Api<DynamicObject> {
    let (group, version) = match object["apiVersion"].as_str().expect("apiVersion").split_once('/') {
        Some((group, version)) => (group.to_owned(), version.to_owned()),
        None => (String::new(), object["apiVersion"].as_str().unwrap().to_owned()),
    };
    let kind = object["kind"].as_str().expect("kind");
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(&group, &version, kind));
    Api::namespaced_with(client.clone(), namespace, &resource)
}

/// Creates `object` in `namespace` with `dryRun=All`: `Ok` when admitted, else the API
/// server's message.
async fn try_create(client: &Client, namespace: &str, object: &Value) -> Result<(), String> {
    let dynamic: DynamicObject = serde_json::from_value(object.clone()).expect("object");
    match api_of(client, namespace, object).create(&PostParams { dry_run: true, ..Default::default() }, &dynamic).await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) => Err(status.message),
        Err(other) => panic!("create {}: {other}", object["kind"]),
    }
}

/// What a case expects.
enum Expect {
    Admitted,
    /// Refused, with these in the message.
    Refused(&'static [&'static str]),
}

/// Server-side applies the rendered objects of `kind`.
async fn apply(client: &Client, rendered: &[Value], kind: &str, plural: &str) -> Vec<String> {
    let resource =
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("admissionregistration.k8s.io", "v1", kind), plural);
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
    let mut names = Vec::new();
    for object in chart::of_kind(rendered, kind) {
        let object: DynamicObject = serde_json::from_value(object.clone()).expect("object");
        api.patch(&object.name_any(), &PatchParams::apply("portassign-e2e").force(), &Patch::Apply(&object))
            .await
            .unwrap_or_else(|e| panic!("the API server refuses the chart's {kind}: {e}"));
        names.push(object.name_any());
    }
    assert_eq!(names.len(), 1, "the chart renders one {kind}");
    names
}

/// Deletes the `kind` named `name`: whether there was one.
async fn delete_named(client: &Client, kind: &str, plural: &str, name: &str) -> bool {
    let resource =
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("admissionregistration.k8s.io", "v1", kind), plural);
    Api::<DynamicObject>::all_with(client.clone(), &resource).delete(name, &DeleteParams::default()).await.is_ok()
}

/// Renders the chart's policy for the test's ranges with `values` more.
fn render(release_namespace: &str, fullname: &str, values: &[&str]) -> Vec<Value> {
    let mut all = vec![
        format!("fullnameOverride={fullname}"),
        "portRange.first=41000".to_owned(),
        "portRange.last=41999".to_owned(),
        "extraPortRanges[0].first=43000".to_owned(),
        "extraPortRanges[0].last=43099".to_owned(),
        // The DRA driver's range (on by default where resource.k8s.io/v1 is served): the
        // policy keeps it too.
        "dra.portRange.first=44000".to_owned(),
        "dra.portRange.last=44009".to_owned(),
    ];
    all.extend(values.iter().map(|v| v.to_string()));
    let mut args: Vec<String> = all.iter().map(|v| format!("--set={v}")).collect();
    args.push("--set-string=excludePorts[0]=41500".to_owned());
    chart::render_with(release_namespace, &args).expect("helm template")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_policy_refuses_host_ports_in_the_ranges_and_admits_the_rest() {
    let cluster = Cluster::shared().await;
    let client = cluster.admin.client();
    let (checked, exempt, release) = (unique("adm-checked"), unique("adm-exempt"), unique("adm-release"));
    for namespace in [&checked, &exempt, &release] {
        ensure_namespace(&client, namespace).await.expect("namespace");
    }
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .patch(
            &exempt,
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "labels": { LABEL: "allowed" } } })),
        )
        .await
        .expect("label the exempt namespace");

    // One name, so that a run that failed half-way leaves nothing behind for the next
    // (once the API server has let go of it).
    let fullname = "e2e-admission";
    let name = "e2e-admission-host-ports";
    let left =
        delete_named(&client, "ValidatingAdmissionPolicyBinding", "validatingadmissionpolicybindings", name).await;
    delete_named(&client, "ValidatingAdmissionPolicy", "validatingadmissionpolicies", name).await;
    if left {
        let probe = pod(json!({}), spec(host_port(41001, "TCP")));
        eventually("the policy of an earlier run gone", Duration::from_secs(30), || async {
            try_create(&client, &checked, &probe).await.is_ok().then_some(())
        })
        .await;
    }

    // Made before the policy: a Deployment and a Pod (bound to a node no kubelet serves)
    // declaring ports of the ranges.
    let mut old_deployment = workload("Deployment", json!({}), template(json!({}), spec(host_port(41100, "TCP"))));
    old_deployment["metadata"]["name"] = json!("before-the-policy");
    let stored: DynamicObject = serde_json::from_value(old_deployment.clone()).unwrap();
    api_of(&client, &checked, &old_deployment).create(&PostParams::default(), &stored).await.expect("old Deployment");
    let mut old_pod = pod(json!({}), spec(host_port(41101, "UDP")));
    old_pod["metadata"]["name"] = json!("before-the-policy");
    old_pod["spec"]["nodeName"] = json!("admission-node");
    let stored: DynamicObject = serde_json::from_value(old_pod.clone()).unwrap();
    api_of(&client, &checked, &old_pod).create(&PostParams::default(), &stored).await.expect("old Pod");

    let rendered = render(&release, fullname, &[]);
    let policy = apply(&client, &rendered, "ValidatingAdmissionPolicy", "validatingadmissionpolicies").await;
    let binding =
        apply(&client, &rendered, "ValidatingAdmissionPolicyBinding", "validatingadmissionpolicybindings").await;
    // The API server loads new policies from its informer within a second or so.
    let probe = pod(json!({}), spec(host_port(41001, "TCP")));
    eventually("the policy refuses a pod", Duration::from_secs(30), || async {
        try_create(&client, &checked, &probe).await.is_err().then_some(())
    })
    .await;

    let range = "41000-41999,43000-43099,44000-44009 (except 41500)";
    let how = "label the pod (of a workload: its pod template) or its namespace portassign.io/host-ports=allowed";
    let in_range = |p: u16| template(json!({}), spec(host_port(p, "TCP")));
    let mut cases: Vec<(&str, &str, Value, Expect)> = vec![
        (
            "hostPort in the range",
            checked.as_str(),
            pod(json!({}), spec(host_port(41017, "TCP"))),
            Expect::Refused(&[
                "container web declares hostPort 41017/TCP in 41000-41999,43000-43099,44000-44009 (except 41500)",
            ]),
        ),
        ("hostPort just below the range", &checked, pod(json!({}), spec(host_port(40999, "TCP"))), Expect::Admitted),
        ("hostPort just above the range", &checked, pod(json!({}), spec(host_port(42000, "TCP"))), Expect::Admitted),
        (
            "the range's last port",
            checked.as_str(),
            pod(json!({}), spec(host_port(41999, "TCP"))),
            Expect::Refused(&["hostPort 41999/TCP"]),
        ),
        ("an excluded port", &checked, pod(json!({}), spec(host_port(41500, "TCP"))), Expect::Admitted),
        (
            "UDP, in the extra range",
            checked.as_str(),
            pod(json!({}), spec(host_port(43050, "UDP"))),
            Expect::Refused(&["hostPort 43050/UDP"]),
        ),
        (
            "hostPort in the DRA range",
            checked.as_str(),
            pod(json!({}), spec(host_port(44005, "TCP"))),
            Expect::Refused(&["hostPort 44005/TCP in 41000-41999,43000-43099,44000-44009"]),
        ),
        (
            "hostPort just above the DRA range",
            &checked,
            pod(json!({}), spec(host_port(44010, "TCP"))),
            Expect::Admitted,
        ),
        ("SCTP", &checked, pod(json!({}), spec(host_port(41018, "SCTP"))), Expect::Refused(&["hostPort 41018/SCTP"])),
        (
            "two ports of two containers, both named",
            checked.as_str(),
            pod(
                json!({}),
                json!({ "containers": [
                    container("a", host_port(41019, "TCP")),
                    container("b", json!([{ "containerPort": 1, "hostPort": 41020 }, { "containerPort": 2, "hostPort": 41021, "protocol": "UDP" }]))
                ] }),
            ),
            Expect::Refused(&[
                "container a declares hostPort 41019/TCP; container b declares hostPort 41020/TCP, 41021/UDP",
            ]),
        ),
        (
            "an init container",
            checked.as_str(),
            pod(
                json!({}),
                json!({ "initContainers": [container("init", host_port(41022, "TCP"))], "containers": [container("web", json!([]))] }),
            ),
            Expect::Refused(&["container init declares hostPort 41022/TCP"]),
        ),
        (
            "a sidecar (restartable init container)",
            checked.as_str(),
            pod(
                json!({}),
                json!({ "initContainers": [{ "restartPolicy": "Always", "name": "side", "image": "x", "ports": host_port(41023, "TCP") }], "containers": [container("web", json!([]))] }),
            ),
            Expect::Refused(&["container side declares hostPort 41023/TCP"]),
        ),
        (
            "a hostNetwork pod's containerPort",
            checked.as_str(),
            pod(
                json!({}),
                json!({ "hostNetwork": true, "containers": [container("web", json!([{ "containerPort": 41024 }]))] }),
            ),
            Expect::Refused(&["container web declares hostNetwork port 41024/TCP"]),
        ),
        (
            "a containerPort in the range without hostNetwork",
            checked.as_str(),
            pod(json!({}), spec(json!([{ "containerPort": 41025 }]))),
            Expect::Admitted,
        ),
        ("an exempt namespace", &exempt, pod(json!({}), spec(host_port(41026, "TCP"))), Expect::Admitted),
        ("the release's namespace", &release, pod(json!({}), spec(host_port(41027, "TCP"))), Expect::Admitted),
        (
            "a pod labelled allowed",
            &checked,
            pod(json!({ LABEL: "allowed" }), spec(host_port(41028, "TCP"))),
            Expect::Admitted,
        ),
        (
            "a pod labelled otherwise",
            checked.as_str(),
            pod(json!({ LABEL: "yes" }), spec(host_port(41029, "TCP"))),
            Expect::Refused(&["hostPort 41029/TCP"]),
        ),
        (
            "a Deployment whose pod template is labelled allowed",
            checked.as_str(),
            workload("Deployment", json!({}), template(json!({ LABEL: "allowed" }), spec(host_port(41030, "TCP")))),
            Expect::Admitted,
        ),
        (
            "a Deployment labelled allowed, its pod template not (its pods would be refused)",
            checked.as_str(),
            workload("Deployment", json!({ LABEL: "allowed" }), in_range(41031)),
            Expect::Refused(&["the pod template of this Deployment: container web declares hostPort 41031/TCP"]),
        ),
    ];
    for kind in [
        "Deployment",
        "StatefulSet",
        "DaemonSet",
        "ReplicaSet",
        "ReplicationController",
        "Job",
        "CronJob",
        "PodTemplate",
    ] {
        let refused: &'static [&'static str] = match kind {
            "Deployment" => &["the pod template of this Deployment: container web declares hostPort 41040/TCP"],
            "StatefulSet" => &["the pod template of this StatefulSet: container web declares hostPort 41040/TCP"],
            "DaemonSet" => &["the pod template of this DaemonSet: container web declares hostPort 41040/TCP"],
            "ReplicaSet" => &["the pod template of this ReplicaSet: container web declares hostPort 41040/TCP"],
            "ReplicationController" => {
                &["the pod template of this ReplicationController: container web declares hostPort 41040/TCP"]
            }
            "Job" => &["the pod template of this Job: container web declares hostPort 41040/TCP"],
            "CronJob" => &["the pod template of this CronJob: container web declares hostPort 41040/TCP"],
            _ => &["the pod template of this PodTemplate: container web declares hostPort 41040/TCP"],
        };
        cases.push((kind, &checked, workload(kind, json!({}), in_range(41040)), Expect::Refused(refused)));
        cases.push((kind, &checked, workload(kind, json!({}), in_range(42040)), Expect::Admitted));
    }

    // What `portassign check` reads (the policy's annotations) must say the same as the
    // CEL: a pod is refused exactly when a port it declares is kept.
    let policy_object = chart::of_kind(&rendered, "ValidatingAdmissionPolicy").next().expect("rendered");
    let annotations = serde_json::from_value(policy_object["metadata"]["annotations"].clone()).expect("annotations");
    let kept = KeptPorts::from_policy(&annotations).expect("the policy names its ranges");

    let mut failures = Vec::new();
    for (what, namespace, object, expect) in &cases {
        let outcome = try_create(&client, namespace, object).await;
        match (expect, &outcome) {
            (Expect::Admitted, Ok(())) => {}
            (Expect::Refused(parts), Err(message)) => {
                let mut wanted = vec![range, how, "ValidatingAdmissionPolicy"];
                wanted.extend(parts.iter());
                for part in wanted {
                    if !message.contains(part) {
                        failures.push(format!("{what}: refused, but the message lacks {part:?}: {message}"));
                    }
                }
            }
            (Expect::Admitted, Err(message)) => failures.push(format!("{what}: refused: {message}")),
            (Expect::Refused(_), Ok(())) => failures.push(format!("{what}: admitted")),
        }
        if object["kind"] == "Pod" && *namespace == checked && object["metadata"]["labels"].get(LABEL).is_none() {
            let as_pod: Pod = serde_json::from_value(object.clone()).expect("pod");
            let listed = !checker::pods_in_ranges(&[as_pod], |_| Some(kept.clone())).is_empty();
            if listed != outcome.is_err() {
                failures.push(format!(
                    "{what}: portassign check would list it: {listed}, the policy refuses it: {}",
                    outcome.is_err()
                ));
            }
        }
    }
    println!("{} cases against the API server's policy", cases.len());
    assert!(cases.len() >= 15);
    assert!(failures.is_empty(), "{failures:#?}");

    // Objects made before the policy: an update leaving the pod spec as it was passes
    // (labels, a controller's bookkeeping); one that changes it must leave the ranges.
    let deployments = api_of(&client, &checked, &old_deployment);
    deployments
        .patch(
            "before-the-policy",
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "labels": { "touched": "yes" } } })),
        )
        .await
        .expect("a label on a Deployment made before the policy is admitted");
    let image = json!({ "spec": { "template": { "spec": { "containers": [{ "name": "web", "image": "registry.invalid/other" }] } } } });
    let error = deployments
        .patch("before-the-policy", &PatchParams::default(), &Patch::Strategic(image))
        .await
        .expect_err("a new pod template declaring a port of the ranges is refused");
    assert!(error.to_string().contains("hostPort 41100/TCP"), "{error}");

    // `portassign check` lists the pod made before the policy, from the policy's
    // annotations (it lists every chart policy of the cluster; this one is ours).
    let output = std::process::Command::new(portassign_bin())
        .args(["check", "--unsettled"])
        .env("KUBECONFIG", cluster.kubeconfig())
        .output()
        .expect("portassign check");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = format!(
        "IN-RANGE node admission-node: pod {checked}/before-the-policy container web declares hostPort 41101/UDP in portassign's ranges 41000-41999,43000-43099,44000-44009 (except 41500)"
    );
    assert!(stdout.lines().any(|l| l == line), "portassign check does not list {line:?}:\n{stdout}");

    // [Warn, Audit]: the same refusal comes back as a warning, and the object is admitted.
    let warn = render(&release, fullname, &["admissionPolicy.validationActions={Warn,Audit}"]);
    apply(&client, &warn, "ValidatingAdmissionPolicyBinding", "validatingadmissionpolicybindings").await;
    let offending = pod(json!({}), spec(host_port(41050, "TCP")));
    let path = format!("/api/v1/namespaces/{checked}/pods?dryRun=All");
    let warning = eventually("a warning instead of a refusal", Duration::from_secs(30), || async {
        let body = serde_json::to_vec(&offending).unwrap();
        let request = http::Request::post(&path)
            .header("content-type", "application/json")
            .body(kube::client::Body::from(body))
            .unwrap();
        let response = client.send(request).await.ok()?;
        let status = response.status();
        let warnings: Vec<String> =
            response.headers().get_all("warning").iter().filter_map(|v| v.to_str().ok().map(str::to_owned)).collect();
        (status.is_success() && !warnings.is_empty()).then(|| warnings.join("\n"))
    })
    .await;
    assert!(warning.contains("container web declares hostPort 41050/TCP") && warning.contains(range), "{warning}");

    for name in &binding {
        delete_named(&client, "ValidatingAdmissionPolicyBinding", "validatingadmissionpolicybindings", name).await;
    }
    for name in &policy {
        delete_named(&client, "ValidatingAdmissionPolicy", "validatingadmissionpolicies", name).await;
    }
    for namespace in [&checked, &exempt, &release] {
        let _ = namespaces.delete(namespace, &DeleteParams::default()).await;
    }
}
