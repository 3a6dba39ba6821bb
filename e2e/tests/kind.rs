//! What only real pods show, on the kind provider (`hack/kind/test.sh` runs it with
//! `--features kind`): the repository's image as the chart's DaemonSet, restarted by the
//! kubelet, rolled by `helm upgrade`, and a node deleted under it. After each step the
//! invariant checker compares every status with every agent's in-memory table, read from
//! the agents' own HTTP port on their nodes' addresses. A real hostPort pod shows a port
//! that a plain bind on the node reports free and that the agent still never hands out.

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use portassign::{
    api::{PortAssignment, PortAssignmentSpec, reason},
    checker::{self, Expectations},
};
use portassign_e2e::{Installed, Provider, RELEASE, TIMEOUT, example, node_addresses};
use portassign_testkit::{cluster::ensure_namespace, eventually, ports_of, ready_reason, unique};

/// The chart's default metrics port: where each agent serves `/debug/table`.
const AGENT_PORT: u16 = 9477;

/// A hostNetwork pod on `node` running the sandbox stand-in on `port` for `key`, as
/// locked down as the agent (non-root, no capabilities, read-only root filesystem).
fn sandbox_pod(node: &str, port: u16, key: &str) -> Pod {
    named_sandbox_pod("sandbox", node, port, key)
}

/// [`sandbox_pod`] under another name.
fn named_sandbox_pod(name: &str, node: &str, port: u16, key: &str) -> Pod {
    let image = std::env::var("PORTASSIGN_E2E_SANDBOX_IMAGE")
        .expect("PORTASSIGN_E2E_SANDBOX_IMAGE (hack/kind/test.sh sets it)");
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name },
        "spec": {
            "nodeName": node, "hostNetwork": true, "restartPolicy": "Never",
            "securityContext": { "runAsNonRoot": true, "runAsUser": 65532, "seccompProfile": { "type": "RuntimeDefault" } },
            "containers": [{
                "name": "sandbox", "image": image, "imagePullPolicy": "Never",
                "args": [port.to_string(), key],
                "readinessProbe": { "tcpSocket": { "port": port }, "periodSeconds": 1 },
                "securityContext": { "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "capabilities": { "drop": ["ALL"] } }
            }]
        }
    }))
    .expect("sandbox pod")
}

/// A pod on `node` (its own network namespace) that answers `answer` on container port
/// 8080, with `host_ports` published on the node (the first to 8080, the next to 8081...):
/// the CNI's portmap plugin DNATs them to the pod, and no socket on the node holds them.
fn host_port_pod(node: &str, host_ports: &[u16], answer: &str) -> Pod {
    let image = std::env::var("PORTASSIGN_E2E_SANDBOX_IMAGE")
        .expect("PORTASSIGN_E2E_SANDBOX_IMAGE (hack/kind/test.sh sets it)");
    let ports: Vec<_> = host_ports
        .iter()
        .zip(8080..)
        .map(|(p, container)| serde_json::json!({ "containerPort": container, "hostPort": p }))
        .collect();
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        // Exempt from the chart's admission policy, which would refuse its ports otherwise.
        "metadata": { "name": "hostport", "labels": { (checker::EXEMPT_LABEL): "allowed" } },
        "spec": {
            "nodeName": node, "restartPolicy": "Never",
            "securityContext": { "runAsNonRoot": true, "runAsUser": 65532, "seccompProfile": { "type": "RuntimeDefault" } },
            "containers": [{
                "name": "web", "image": image, "imagePullPolicy": "Never",
                "args": ["8080", answer],
                "ports": ports,
                "securityContext": { "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "capabilities": { "drop": ["ALL"] } }
            }]
        }
    }))
    .expect("hostPort pod")
}

/// A Deployment of one pod like [`host_port_pod`] (without the exemption label), its
/// container port 8080 published on `host_port` of its node.
fn host_port_deployment(name: &str, host_port: u16) -> serde_json::Value {
    let image = std::env::var("PORTASSIGN_E2E_SANDBOX_IMAGE")
        .expect("PORTASSIGN_E2E_SANDBOX_IMAGE (hack/kind/test.sh sets it)");
    serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": { "name": name },
        "spec": {
            "selector": { "matchLabels": { "app": name } },
            "template": {
                "metadata": { "labels": { "app": name } },
                "spec": {
                    "securityContext": { "runAsNonRoot": true, "runAsUser": 65532, "seccompProfile": { "type": "RuntimeDefault" } },
                    "containers": [{
                        "name": "web", "image": image, "imagePullPolicy": "Never",
                        "args": ["8080", name],
                        "ports": [{ "containerPort": 8080, "hostPort": host_port }],
                        "securityContext": { "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "capabilities": { "drop": ["ALL"] } }
                    }]
                }
            }
        }
    })
}

/// Waits until the pod `name` runs and is Ready.
async fn pod_ready(pods: &Api<Pod>, name: &str) {
    eventually(&format!("pod {name} Ready"), TIMEOUT, || async {
        let pod = pods.get(name).await.ok()?;
        pod.status?.conditions?.iter().any(|c| c.type_ == "Ready" && c.status == "True").then_some(())
    })
    .await;
}

/// What the first program that accepts a connection on `address` says.
async fn answer_on(address: &str) -> String {
    eventually(&format!("an answer on {address}"), TIMEOUT, || async {
        let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
        let mut text = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut text).await.ok()?;
        Some(text)
    })
    .await
}

fn step(what: &str) {
    println!("\n=== {what}");
}

/// Runs the checker over every object and every node's agent until it is clean and every
/// object of the test (`api`'s namespace) is Ready, or panics with what it found.
async fn checker_clean(
    api: &Api<PortAssignment>,
    addresses: &BTreeMap<String, String>,
    range: portassign::range::PortRange,
    token: &str,
) {
    let expect = Expectations {
        settled: true,
        stuck_after: Duration::from_secs(60),
        ranges: addresses.keys().map(|n| (n.clone(), range)).collect::<HashMap<_, _>>(),
    };
    let mut last = Vec::new();
    for _ in 0..120 {
        // Every namespace: an agent's table holds its node's objects wherever they live.
        let everywhere: Api<PortAssignment> = Api::all(api.clone().into_client());
        let objects = everywhere.list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default();
        let mine = api.list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default();
        let mut tables = Vec::new();
        let mut unreachable = Vec::new();
        for (node, ip) in addresses {
            match checker::fetch_table(&format!("http://{ip}:{AGENT_PORT}"), Some(token)).await {
                Ok(table) => tables.push(table),
                Err(e) => unreachable.push(format!("agent of {node}: {e}")),
            }
        }
        last = checker::check(&objects, &tables, &expect, k8s_openapi::jiff::Timestamp::now())
            .iter()
            .map(|v| v.to_string())
            .chain(unreachable)
            .collect();
        // The checker agrees with every agent, but an object of this namespace may still
        // wait for ports: say which, and why.
        let waiting = mine.iter().filter(|o| !o.is_ready()).map(|o| {
            let (status, reason) = ready_reason(o).unwrap_or_default();
            format!("{} not Ready (Ready={status}, reason {reason})", o.name_any())
        });
        last.extend(waiting);
        if last.is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("the checker is not clean after 60s:\n{}", last.join("\n"));
}

/// key→port of every object.
async fn all_ports(api: &Api<PortAssignment>) -> BTreeMap<String, BTreeMap<String, u16>> {
    api.list(&ListParams::default()).await.expect("list").items.iter().map(|o| (o.name_any(), ports_of(o))).collect()
}

/// The ports of `before` that are still wanted are where they were.
fn none_moved(before: &BTreeMap<String, BTreeMap<String, u16>>, after: &BTreeMap<String, BTreeMap<String, u16>>) {
    for (name, ports) in before {
        for (key, port) in ports {
            if let Some(now) = after.get(name).and_then(|p| p.get(key)) {
                assert_eq!(now, port, "{name}: key {key} moved from {port} to {now}");
            }
        }
    }
}

/// The DRA class's name (the chart's `dra.deviceClassName`).
const DEVICE_CLASS: &str = "host-port.portassign.io";

/// A hostNetwork sandbox pod that asks for its port through Dynamic Resource Allocation
/// and listens on `$PORTASSIGN_PORT`: with a claim from the `host-port` template, or
/// (`extended`) with the extended resource alone. `node` pins it by node selector (the
/// scheduler still decides: a pod with `nodeName` skips it and its claim is never
/// allocated).
fn dra_pod(name: &str, node: Option<&str>, extended: bool) -> Pod {
    let image = std::env::var("PORTASSIGN_E2E_SANDBOX_IMAGE")
        .expect("PORTASSIGN_E2E_SANDBOX_IMAGE (hack/kind/test.sh sets it)");
    let mut spec = serde_json::json!({
        "hostNetwork": true, "restartPolicy": "Never",
        "securityContext": { "runAsNonRoot": true, "runAsUser": 65532, "seccompProfile": { "type": "RuntimeDefault" } },
        "containers": [{
            "name": "sandbox", "image": image, "imagePullPolicy": "Never",
            "args": ["env", name],
            "securityContext": { "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "capabilities": { "drop": ["ALL"] } }
        }]
    });
    if extended {
        spec["containers"][0]["resources"] = serde_json::json!({ "limits": { "portassign.io/host-port": "1" } });
    } else {
        spec["containers"][0]["resources"] = serde_json::json!({ "claims": [{ "name": "port" }] });
        spec["resourceClaims"] = serde_json::json!([{ "name": "port", "resourceClaimTemplateName": "host-port" }]);
    }
    if let Some(node) = node {
        spec["nodeSelector"] = serde_json::json!({ "kubernetes.io/hostname": node });
    }
    serde_json::from_value(
        serde_json::json!({ "apiVersion": "v1", "kind": "Pod", "metadata": { "name": name }, "spec": spec }),
    )
    .expect("DRA pod")
}

/// The port of the running pod `name`, from its claim's PortAssignment, and its node.
async fn dra_port(pods: &Api<Pod>, api: &Api<PortAssignment>, name: &str) -> (String, u16) {
    eventually(&format!("pod {name} running with its claim's port recorded"), TIMEOUT, || async {
        let pod = pods.get(name).await.ok()?;
        let status = pod.status.as_ref()?;
        if status.phase.as_deref() != Some("Running") {
            return None;
        }
        let claim = match status.resource_claim_statuses.as_ref().and_then(|s| s.first()) {
            Some(s) => s.resource_claim_name.clone()?,
            None => status.extended_resource_claim_status.as_ref()?.resource_claim_name.clone(),
        };
        let object = api.get(&format!("claim-{claim}")).await.ok()?;
        let ports: Vec<u16> = ports_of(&object).into_values().collect();
        let node = pod.spec?.node_name?;
        (ports.len() == 1).then(|| (node, ports[0]))
    })
    .await
}

/// Pods get host ports through Dynamic Resource Allocation: the scheduler places them
/// where the node's pool has capacity, the agent bind-verifies and records the port,
/// the kubelet plugin puts it in the container's environment.
async fn dra_scenarios(env: &Installed, addresses: &BTreeMap<String, String>, token: &str) {
    let client = env.client();
    let ns = unique("dra");
    ensure_namespace(&client, &ns).await.expect("namespace");
    let api: Api<PortAssignment> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let workers: Vec<String> = addresses.keys().filter(|n| !n.contains("control-plane")).cloned().collect();
    assert!(workers.len() >= 2, "two workers: {workers:?}");
    let node = workers[0].clone();
    let (first, last) = (19000u16, 19002u16);

    step(
        "DRA: three ports per node (dra.portRange 19000-19002); three pods pinned to one worker get distinct ports of it, in their environment, reachable on the node",
    );
    env.helm_upgrade(&["dra.portRange.first=19000", "dra.portRange.last=19002"]).expect("helm upgrade");
    env.rolled_out().await;
    let template = serde_json::json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaimTemplate",
        "metadata": { "name": "host-port" },
        "spec": { "spec": { "devices": { "requests": [{ "name": "port", "exactly": {
            "deviceClassName": DEVICE_CLASS, "capacity": { "requests": { "ports": "1" } } } }] } } }
    });
    let templates: Api<kube::api::DynamicObject> = Api::namespaced_with(
        client.clone(),
        &ns,
        &kube::api::ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(
            "resource.k8s.io",
            "v1",
            "ResourceClaimTemplate",
        )),
    );
    templates
        .create(&PostParams::default(), &serde_json::from_value(template).expect("template"))
        .await
        .expect("create the ResourceClaimTemplate");
    let mut held = BTreeMap::new();
    for i in 0..3 {
        let name = format!("pinned-{i}");
        pods.create(&PostParams::default(), &dra_pod(&name, Some(&node), false)).await.expect("create a DRA pod");
    }
    for i in 0..3 {
        let name = format!("pinned-{i}");
        let (on, port) = dra_port(&pods, &api, &name).await;
        assert_eq!(on, node, "{name} runs where it was pinned");
        assert!((first..=last).contains(&port), "{name} got port {port}, outside the DRA range {first}-{last}");
        let answer = answer_on(&format!("{}:{port}", addresses[&node])).await;
        assert_eq!(answer.trim(), name, "{node}:{port} is served by {name}, which read the port from its environment");
        held.insert(name, port);
    }
    let distinct: std::collections::BTreeSet<u16> = held.values().copied().collect();
    assert_eq!(distinct.len(), 3, "three pods on one node, three ports: {held:?}");
    // The claim shows its port too (status.devices[].data, written by the node's agent).
    let claims: Api<k8s_openapi::api::resource::v1::ResourceClaim> = Api::namespaced(client.clone(), &ns);
    for (name, port) in &held {
        let pod = pods.get(name).await.expect("pod");
        let claim = pod.status.and_then(|s| s.resource_claim_statuses).and_then(|s| s.into_iter().next());
        let claim = claim.and_then(|c| c.resource_claim_name).expect("the pod's claim");
        let shown = eventually(&format!("{claim}'s port in its status"), TIMEOUT, || async {
            let devices = claims.get(&claim).await.ok()?.status?.devices?;
            devices.first()?.data.as_ref().map(|d| d.0["ports"].clone())
        })
        .await;
        assert_eq!(shown, serde_json::json!([port]), "{claim} shows {name}'s port");
    }
    checker_clean(&api, addresses, env.range, token).await;

    step("DRA: a key acquired on that node never gets a DRA port");
    let keys_api: Api<PortAssignment> = Api::namespaced(client.clone(), &ns);
    let mut keyed = example("pool.yaml", "keys", &node).unwrap();
    keyed.spec.keys = (0..5).map(|i| format!("key/{i}")).collect();
    keys_api.create(&PostParams::default(), &keyed).await.expect("create keys");
    let key_ports = eventually("the keys' ports", TIMEOUT, || async {
        let o = keys_api.get("keys").await.ok()?;
        o.is_ready().then(|| ports_of(&o))
    })
    .await;
    assert!(key_ports.values().all(|p| env.range.contains(*p)), "keys get the keys' range: {key_ports:?}");

    step(
        "DRA: a fourth pod pinned to the full node stays Pending with the scheduler's reason; an unpinned one (extended resource only) goes to another node",
    );
    pods.create(&PostParams::default(), &dra_pod("pinned-3", Some(&node), false)).await.expect("create");
    let reason = eventually("pinned-3 unschedulable", TIMEOUT, || async {
        let pod = pods.get("pinned-3").await.ok()?;
        let condition = pod.status?.conditions?.into_iter().find(|c| c.type_ == "PodScheduled")?;
        (condition.status == "False").then_some(condition.message.unwrap_or_default())
    })
    .await;
    assert!(reason.contains("cannot allocate all claims"), "the scheduler's reason: {reason}");
    pods.create(&PostParams::default(), &dra_pod("anywhere", None, true)).await.expect("create");
    let (on, port) = dra_port(&pods, &api, "anywhere").await;
    assert_ne!(on, node, "the unpinned pod avoids the full node");
    assert!((first..=last).contains(&port));
    let answer = answer_on(&format!("{}:{port}", addresses[&on])).await;
    assert_eq!(answer.trim(), "anywhere");
    checker_clean(&api, addresses, env.range, token).await;

    step("DRA: a pod deleted releases its port: the pending pod starts, on it");
    pods.delete("pinned-0", &DeleteParams::default()).await.expect("delete pinned-0");
    let freed = held.remove("pinned-0").expect("pinned-0's port");
    let (on, port) = dra_port(&pods, &api, "pinned-3").await;
    assert_eq!((on.as_str(), port), (node.as_str(), freed), "pinned-3 gets the one free port of {node}");
    held.insert("pinned-3".into(), port);
    checker_clean(&api, addresses, env.range, token).await;

    step(
        "DRA: the agent pod of the node deleted: every pod keeps its port, the new agent rebuilds them, and a new pod gets the port a deleted one left",
    );
    let system: Api<Pod> = Api::namespaced(client.clone(), portassign_e2e::RELEASE);
    let selector = "app.kubernetes.io/component=agent";
    let agent = system
        .list(&ListParams::default().labels(selector))
        .await
        .expect("agent pods")
        .items
        .into_iter()
        .find(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node.as_str()))
        .expect("the node's agent pod");
    system.delete(&agent.name_any(), &DeleteParams::default()).await.expect("delete the agent pod");
    eventually("a new agent pod Ready on the node", TIMEOUT, || async {
        let list = system.list(&ListParams::default().labels(selector)).await.ok()?.items;
        let pod =
            list.into_iter().find(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node.as_str()))?;
        let ready = pod.status.as_ref()?.conditions.as_ref()?.iter().any(|c| c.type_ == "Ready" && c.status == "True");
        (pod.uid() != agent.uid() && ready).then_some(())
    })
    .await;
    checker_clean(&api, addresses, env.range, token).await;
    for (name, port) in &held {
        assert_eq!(dra_port(&pods, &api, name).await, (node.clone(), *port), "{name} kept its port");
        assert_eq!(answer_on(&format!("{}:{port}", addresses[&node])).await.trim(), name);
    }
    pods.delete("pinned-1", &DeleteParams::default()).await.expect("delete pinned-1");
    let freed = held.remove("pinned-1").expect("pinned-1's port");
    pods.create(&PostParams::default(), &dra_pod("pinned-4", Some(&node), false)).await.expect("create");
    let (_, port) = dra_port(&pods, &api, "pinned-4").await;
    assert_eq!(port, freed, "the new pod gets the port the deleted one left, no other");
    assert!(!held.values().any(|p| *p == port));
    held.insert("pinned-4".into(), port);
    checker_clean(&api, addresses, env.range, token).await;

    step("DRA: a pod deleted while its node has no agent: its port is released once the agent is back, none leaks");
    // Every node but this one labelled; the DaemonSet selecting the label takes the
    // node's agent (and so its kubelet plugin) away.
    let nodes_api: Api<Node> = Api::all(client.clone());
    for other in addresses.keys().filter(|n| **n != node) {
        let label = serde_json::json!({ "metadata": { "labels": { "e2e-agent": "yes" } } });
        nodes_api.patch(other, &PatchParams::default(), &Patch::Merge(label)).await.expect("label a node");
    }
    let dra_values = ["dra.portRange.first=19000", "dra.portRange.last=19002"];
    env.helm_upgrade(&[dra_values[0], dra_values[1], "nodeSelector.e2e-agent=yes"]).expect("helm upgrade");
    eventually("no agent pod on the node", TIMEOUT, || async {
        let list = system.list(&ListParams::default().labels(selector)).await.ok()?.items;
        list.iter().all(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) != Some(node.as_str())).then_some(())
    })
    .await;
    let (gone, freed) = held.pop_first().expect("a pod holding a port");
    pods.delete(&gone, &DeleteParams::default()).await.expect("delete a pod while the agent is away");
    env.helm_upgrade(&dra_values).expect("helm upgrade: the agent back on every node");
    env.rolled_out().await;
    eventually(&format!("{gone} gone"), TIMEOUT, || async { pods.get_opt(&gone).await.ok()?.is_none().then_some(()) })
        .await;
    checker_clean(&api, addresses, env.range, token).await;
    pods.create(&PostParams::default(), &dra_pod("pinned-5", Some(&node), false)).await.expect("create");
    let (_, port) = dra_port(&pods, &api, "pinned-5").await;
    assert_eq!(port, freed, "the port of the pod deleted while the agent was away is free again");
    for other in addresses.keys().filter(|n| **n != node) {
        let label = serde_json::json!({ "metadata": { "labels": { "e2e-agent": null } } });
        nodes_api.patch(other, &PatchParams::default(), &Patch::Merge(label)).await.expect("unlabel a node");
    }

    step("DRA: every pod deleted: every claim's object goes, every port is released");
    pods.delete_collection(&DeleteParams::default(), &ListParams::default()).await.expect("delete the pods");
    eventually("every claim's PortAssignment gone", TIMEOUT, || async {
        let left = api.list(&ListParams::default().labels(portassign::api::dra::CLAIM_LABEL)).await.ok()?.items;
        left.is_empty().then_some(())
    })
    .await;
    keys_api.delete("keys", &DeleteParams::default()).await.expect("delete keys");
    checker_clean(&api, addresses, env.range, token).await;
}

/// The DRA scenarios alone, on a fresh install: for work on the driver (`make
/// e2e-kind-dra`). `make test` runs them inside the main kind test below.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "run on purpose: make e2e-kind-dra (make test runs these scenarios in the main kind test)"]
async fn dra_scenarios_alone() {
    let env = Installed::up().await.unwrap_or_else(|e| panic!("setting up the provider: {e:#}"));
    assert_eq!(env.provider, Provider::Kind, "these scenarios need PORTASSIGN_E2E_PROVIDER=kind");
    let addresses = node_addresses(&Api::all(env.client())).await;
    let token = env.reader.as_ref().expect("the suite's reader identity").token();
    dra_scenarios(&env, &addresses, &token).await;
}

/// Seconds from `create` until the pod runs, for `pods` created one after the other (each
/// deleted before the next).
async fn start_times(pods: &Api<Pod>, make: impl Fn(&str, u16) -> Pod, count: u16) -> Vec<f64> {
    let mut times = Vec::new();
    for i in 0..count {
        let pod = make(&format!("timed-{i}"), i);
        let name = pod.name_any();
        let started = std::time::Instant::now();
        pods.create(&PostParams::default(), &pod).await.expect("create");
        eventually(&format!("{name} running"), TIMEOUT, || async {
            let pod = pods.get(&name).await.ok()?;
            let running = pod.status?.container_statuses?.first()?.state.as_ref()?.running.is_some();
            running.then_some(())
        })
        .await;
        times.push(started.elapsed().as_secs_f64());
        pods.delete(&name, &DeleteParams::default().grace_period(0)).await.expect("delete");
        eventually(&format!("{name} gone"), TIMEOUT, || async {
            pods.get_opt(&name).await.ok()?.is_none().then_some(())
        })
        .await;
    }
    times
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The benchmark of a pod's start with its port through DRA against the same pod with a
/// fixed `hostPort` (docs/benchmarks.md): 20 of each, one after the other, on the kind
/// cluster. Not part of `make test`; `hack/kind/test.sh` with `KEEP_CLUSTER=1`, then this
/// with `--ignored` and the same environment (docs/benchmarks.md has the command).
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a benchmark: run it on purpose (make bench-kind, docs/dra-benchmark.md)"]
async fn dra_pod_start_against_a_fixed_host_port() {
    let env = Installed::up().await.unwrap_or_else(|e| panic!("setting up the provider: {e:#}"));
    let client = env.client();
    let ns = unique("podstart");
    ensure_namespace(&client, &ns).await.expect("namespace");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let count = 20;
    // The same pod both ways: hostNetwork sandbox stand-in, pinned to one worker by node
    // selector (so both go through the scheduler); a fixed port outside every range.
    let worker = env.nodes.iter().find(|n| !n.contains("control-plane")).expect("a worker").clone();
    let fixed = start_times(
        &pods,
        // A port of its own per pod: a pod deleted with no grace may still hold its port
        // on the node when the next one starts.
        |name, i| {
            let port = 18_500 + i;
            let mut pod = named_sandbox_pod(name, &worker, port, name);
            let spec = pod.spec.as_mut().expect("spec");
            spec.node_name = None;
            spec.node_selector = Some([("kubernetes.io/hostname".to_string(), worker.clone())].into());
            spec.containers[0].readiness_probe = None;
            spec.containers[0].ports = Some(vec![k8s_openapi::api::core::v1::ContainerPort {
                container_port: i32::from(port),
                host_port: Some(i32::from(port)),
                ..Default::default()
            }]);
            pod
        },
        count,
    )
    .await;
    let dra = start_times(&pods, |name, _| dra_pod(name, Some(&worker), true), count).await;
    let (fixed_p50, dra_p50) = (median(fixed.clone()), median(dra.clone()));
    println!("fixed hostPort: p50 {fixed_p50:.3} s over {count} pods: {fixed:.3?}");
    println!("DRA (extended resource): p50 {dra_p50:.3} s over {count} pods: {dra:.3?}");
    println!("ratio DRA / fixed hostPort: {:.2}", dra_p50 / fixed_p50);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_chart_daemonset_keeps_every_port_through_restarts_rollouts_and_a_lost_node() {
    let mut env = Installed::up().await.unwrap_or_else(|e| panic!("setting up the provider: {e:#}"));
    assert_eq!(env.provider, Provider::Kind, "these scenarios need PORTASSIGN_E2E_PROVIDER=kind");
    let client = env.client();
    let ns = unique("kind");
    ensure_namespace(&client, &ns).await.expect("namespace");
    let api: Api<PortAssignment> = Api::namespaced(client.clone(), &ns);
    let nodes_api: Api<Node> = Api::all(client.clone());
    let pods: Api<Pod> = Api::namespaced(client.clone(), RELEASE);
    let addresses = node_addresses(&nodes_api).await;
    let token = env.reader.as_ref().expect("the suite's reader identity").token();
    let nodes: Vec<String> = addresses.keys().cloned().collect();
    assert!(nodes.len() >= 3, "a control plane and two workers: {nodes:?}");

    step("two pools on every node, Ready; the checker agrees with every agent's memory");
    for node in &nodes {
        for i in 0..2 {
            let object = example("pool.yaml", &format!("pool-{i}-{node}"), node).unwrap();
            api.create(&PostParams::default(), &object).await.expect("create");
        }
    }
    checker_clean(&api, &addresses, env.range, &token).await;

    step(
        "a sandbox pod (hostNetwork) listens on its key's port, reachable on the node's address; no other key gets it",
    );
    let victim_node = nodes.iter().find(|n| !n.contains("control-plane")).expect("a worker").clone();
    let key = "sandbox/web";
    let sandbox_pool = example("pool.yaml", "sandboxes", &victim_node).unwrap();
    let sandbox_pool =
        PortAssignment { spec: PortAssignmentSpec { keys: vec![key.into()], ..sandbox_pool.spec }, ..sandbox_pool };
    api.create(&PostParams::default(), &sandbox_pool).await.expect("create the sandboxes' pool");
    let port = eventually("the sandbox key's port", TIMEOUT, || async {
        let o = api.get("sandboxes").await.ok()?;
        o.is_ready().then(|| ports_of(&o)[key])
    })
    .await;
    let sandbox_pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    sandbox_pods.create(&PostParams::default(), &sandbox_pod(&victim_node, port, key)).await.expect("sandbox pod");
    pod_ready(&sandbox_pods, "sandbox").await;
    let address = format!("{}:{port}", addresses[&victim_node]);
    let answer = answer_on(&address).await;
    assert_eq!(answer.trim(), key, "{address} is served by the sandbox of {key}");
    // More keys on the same node while the sandbox holds its port: none gets it.
    let crowd: Vec<String> = (0..40).map(|i| format!("crowd/{i}")).collect();
    let patch = serde_json::json!({ "spec": { "keys": crowd } });
    api.patch(&format!("pool-0-{victim_node}"), &PatchParams::default(), &Patch::Merge(patch)).await.expect("grow");
    checker_clean(&api, &addresses, env.range, &token).await;
    let mut holders = Vec::new();
    for object in api.list(&ListParams::default()).await.expect("list").items {
        if object.spec.node_name == victim_node {
            let name = object.name_any();
            holders
                .extend(ports_of(&object).into_iter().filter(|(_, p)| *p == port).map(|(k, _)| format!("{name}/{k}")));
        }
    }
    assert_eq!(
        holders,
        [format!("sandboxes/{key}")],
        "port {port} on {victim_node} is held by the sandbox's key alone"
    );

    step(
        "a real hostPort pod on the worker: a plain bind reports its ports free, yet the agent hands none of them out",
    );
    // The agent's cursor is just past the highest port it assigned on this node, so
    // without the pod check the next keys would get exactly these ports.
    let table = checker::fetch_table(&format!("http://{}:{AGENT_PORT}", addresses[&victim_node]), Some(&token))
        .await
        .expect("table");
    let next = table.ports.iter().map(|e| e.port).max().expect("ports held on the worker") + 1;
    let published: Vec<u16> = (next..next + 5).collect();
    sandbox_pods
        .create(&PostParams::default(), &host_port_pod(&victim_node, &published, "hostport-pod"))
        .await
        .expect("hostPort pod");
    pod_ready(&sandbox_pods, "hostport").await;
    // A hostNetwork process binds the first of them on the node's wildcard address: the
    // bind succeeds (the stand-in exits at once if it cannot listen)...
    let binder = named_sandbox_pod("binder", &victim_node, published[0], "binder");
    sandbox_pods.create(&PostParams::default(), &binder).await.expect("binder pod");
    pod_ready(&sandbox_pods, "binder").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let phase = sandbox_pods.get("binder").await.expect("binder").status.and_then(|s| s.phase);
    assert_eq!(phase.as_deref(), Some("Running"), "a plain bind of {} on {victim_node} succeeds", published[0]);
    // ...while traffic from outside the node to that port reaches the hostPort pod.
    let address = format!("{}:{}", addresses[&victim_node], published[0]);
    let answer = answer_on(&address).await;
    assert_eq!(answer.trim(), "hostport-pod", "{address} is DNATed to the hostPort pod, not to the bound socket");
    sandbox_pods.delete("binder", &DeleteParams::default()).await.expect("delete the binder pod");
    let more: Vec<String> = (0..45).map(|i| format!("crowd/{i}")).collect();
    let patch = serde_json::json!({ "spec": { "keys": more } });
    api.patch(&format!("pool-0-{victim_node}"), &PatchParams::default(), &Patch::Merge(patch)).await.expect("grow");
    checker_clean(&api, &addresses, env.range, &token).await;
    let grown = ports_of(&api.get(&format!("pool-0-{victim_node}")).await.expect("get"));
    let taken: Vec<String> =
        grown.iter().filter(|(_, p)| published.contains(p)).map(|(k, p)| format!("{k}={p}")).collect();
    assert!(taken.is_empty(), "keys got ports a hostPort pod publishes on {victim_node}: {taken:?}");
    let why = portassign::checker::get_with(
        &format!("http://{}:{AGENT_PORT}/debug/table?port={}", addresses[&victim_node], published[0]),
        Some(&token),
    )
    .await
    .expect("explain");
    assert!(why.1.contains("pod-host-port"), "/debug/table?port= names the pod: {}", why.1);
    // `portassign check` lists it from the chart's admission policy: made with the
    // exemption label, it declares ports of the ranges.
    let policies: Api<k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicy> =
        Api::all(client.clone());
    let kept = policies
        .list(&ListParams::default().labels(&format!("app.kubernetes.io/instance={RELEASE}")))
        .await
        .expect("the chart's admission policy")
        .items
        .iter()
        .find_map(|p| checker::KeptPorts::from_policy(p.annotations()))
        .expect("the chart installs its admission policy on kind");
    let listed: Vec<String> =
        checker::pods_in_ranges(&sandbox_pods.list(&ListParams::default()).await.unwrap().items, |_| {
            Some(kept.clone())
        })
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(listed.len(), published.len(), "each published port of the hostPort pod is listed: {listed:#?}");
    assert!(
        listed.iter().all(|l| l.contains(&format!("pod {ns}/hostport container web declares hostPort"))
            && l.ends_with("(labelled portassign.io/host-ports=allowed)")),
        "{listed:#?}"
    );
    sandbox_pods.delete("hostport", &DeleteParams::default()).await.expect("delete the hostPort pod");

    step(
        "the chart's admission policy: kubectl apply refuses a Deployment with a hostPort in the range; one outside it runs",
    );
    let manifest = |name: &str, port: u16| {
        let path = std::env::temp_dir().join(format!("{ns}-{name}.json"));
        std::fs::write(&path, host_port_deployment(name, port).to_string()).expect("write the manifest");
        path.display().to_string()
    };
    let inside = manifest("inside", env.range.first() + 7);
    let (code, _, stderr) = env.kubectl(&["apply", "-n", &ns, "-f", &inside]).expect("kubectl apply");
    assert_ne!(code, 0, "a Deployment with hostPort {} in {} was admitted", env.range.first() + 7, env.range);
    for part in [
        "ValidatingAdmissionPolicy",
        &format!("container web declares hostPort {}/TCP in {}", env.range.first() + 7, env.range),
        "portassign.io/host-ports=allowed",
    ] {
        assert!(stderr.contains(part), "the refusal lacks {part:?}: {stderr}");
    }
    let outside_port = env.range.last() + 1;
    let outside = manifest("outside", outside_port);
    let (code, _, stderr) = env.kubectl(&["apply", "-n", &ns, "-f", &outside]).expect("kubectl apply");
    assert_eq!(code, 0, "a Deployment with hostPort {outside_port}, outside {}, was refused: {stderr}", env.range);
    let (code, _, stderr) = env
        .kubectl(&["rollout", "status", "-n", &ns, "deployment/outside", "--timeout=120s"])
        .expect("kubectl rollout");
    assert_eq!(code, 0, "the Deployment outside the range rolls out: {stderr}");
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> = Api::namespaced(client.clone(), &ns);
    deployments.delete("outside", &DeleteParams::default()).await.expect("delete the Deployment");
    let before = all_ports(&api).await;

    step("an agent pod deleted: the DaemonSet brings it back, every port kept (the busy sandbox port too)");
    let selector = "app.kubernetes.io/component=agent";
    let on_node = |list: Vec<Pod>, node: &str| {
        list.into_iter().find(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
    };
    let victim = on_node(pods.list(&ListParams::default().labels(selector)).await.expect("pods").items, &victim_node)
        .expect("an agent pod on the worker");
    pods.delete(&victim.name_any(), &DeleteParams::default()).await.expect("delete the agent pod");
    eventually("a new agent pod Ready on the worker", TIMEOUT, || async {
        let list = pods.list(&ListParams::default().labels(selector)).await.ok()?.items;
        let pod = on_node(list, &victim_node)?;
        let ready = pod.status.as_ref()?.conditions.as_ref()?.iter().any(|c| c.type_ == "Ready" && c.status == "True");
        (pod.uid() != victim.uid() && ready).then_some(())
    })
    .await;
    checker_clean(&api, &addresses, env.range, &token).await;
    none_moved(&before, &all_ports(&api).await);

    step("helm upgrade rolls the DaemonSet while keys change: no port moves or is held twice, nothing stuck");
    let churn_api = api.clone();
    let churn_nodes = nodes.clone();
    let churn = tokio::spawn(async move {
        for round in 0..30 {
            for node in &churn_nodes {
                let keys: Vec<String> = (0..3).map(|k| format!("churn/{}-{k}", (round + k) % 5)).collect();
                let name = format!("churn-{node}");
                let patch = serde_json::json!({
                    "apiVersion": "portassign.io/v1alpha1", "kind": "PortAssignment",
                    "metadata": { "name": name }, "spec": { "nodeName": node, "keys": keys }
                });
                let _ = churn_api.patch(&name, &PatchParams::apply("e2e-churn").force(), &Patch::Apply(patch)).await;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    env.helm_upgrade(&["concurrency=64", "logLevel=info"]).expect("helm upgrade");
    env.rolled_out().await;
    churn.await.expect("the churn task");
    checker_clean(&api, &addresses, env.range, &token).await;
    none_moved(&before, &all_ports(&api).await);

    step("no API call of an agent or the janitor was refused so far");
    let refused = env.refusals().await.expect("pod logs");
    assert!(refused.is_empty(), "refused calls:\n{}", refused.join("\n"));
    sandbox_pods.delete("sandbox", &DeleteParams::default()).await.expect("delete the sandbox pod");

    dra_scenarios(&env, &addresses, &token).await;

    step("a worker node deleted: the janitor releases its objects after its grace");
    env.helm_upgrade(&["concurrency=64", "logLevel=info", "janitor.graceSeconds=3", "janitor.intervalSeconds=1"])
        .expect("helm upgrade with a short janitor grace");
    let gone_node = nodes.iter().rev().find(|n| !n.contains("control-plane")).expect("a worker").clone();
    let deleting = format!("pool-0-{gone_node}");
    let kept = format!("pool-1-{gone_node}");
    // One of its objects is deleted with the node. Its agent may still finalize it (the pod
    // runs until it is garbage-collected), else the janitor does: either way it must go.
    nodes_api.delete(&gone_node, &DeleteParams::default()).await.expect("delete the node");
    api.delete(&deleting, &DeleteParams::default()).await.expect("delete an object of the node");
    eventually("the deleted node's deleting object finalized by the janitor", TIMEOUT, || async {
        matches!(api.get_opt(&deleting).await, Ok(None)).then_some(())
    })
    .await;
    let released = eventually("the deleted node's other object released", TIMEOUT, || async {
        let o = api.get(&kept).await.ok()?;
        (ready_reason(&o) == Some(("False".into(), reason::NODE_NOT_FOUND.into()))).then_some(o)
    })
    .await;
    assert!(ports_of(&released).is_empty(), "the ports of a gone node are no longer recorded");
    let mut remaining = addresses.clone();
    remaining.remove(&gone_node);
    let others = Api::<PortAssignment>::namespaced(client.clone(), &ns);
    for node in remaining.keys() {
        for i in 0..2 {
            assert!(
                others.get(&format!("pool-{i}-{node}")).await.expect("get").is_ready(),
                "objects of live nodes stay Ready"
            );
        }
    }

    step("no API call of an agent or the janitor was refused, across every pod and restart of the live nodes");
    let refused = env.refusals().await.expect("pod logs");
    assert!(refused.is_empty(), "refused calls:\n{}", refused.join("\n"));

    // The deleted node's objects stay released until its kubelet registers it again;
    // delete them so the namespace can go.
    for object in api.list(&ListParams::default()).await.expect("list").items {
        let name = object.name_any();
        if object.spec.node_name == gone_node {
            let strip = serde_json::json!({ "metadata": { "finalizers": null } });
            let _ = api.patch(&name, &PatchParams::default(), &Patch::Merge(strip)).await;
        }
        let _ = api.delete(&name, &DeleteParams::default()).await;
    }
}
