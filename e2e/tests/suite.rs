//! The end-to-end suite: what a user does on a cluster where the chart is installed and
//! an agent serves each node — the same suite for every provider (see the crate docs).
//!
//! `cargo test -p portassign-e2e` runs it on a local control plane;
//! `PORTASSIGN_E2E_PROVIDER=kind PORTASSIGN_E2E_KUBECONFIG=… PORTASSIGN_E2E_IMAGE=…`
//! runs it on a kind cluster (`make test` does both).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::{coordination::v1::Lease, events::v1::Event};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use portassign::api::{PortAssignment, Protocol, event_reason};
use portassign_e2e::{Installed, Provider, RELEASE, TIMEOUT, example};
use portassign_testkit::{cluster::ensure_namespace, eventually, ports_of, unique};
use serde_json::Value;

/// One step of the suite, announced so a failure says where it happened.
fn step(what: &str) {
    println!("\n=== {what}");
}

/// Waits until `name` is Ready for its current spec; its key→port map.
async fn ready(api: &Api<PortAssignment>, name: &str) -> BTreeMap<String, u16> {
    eventually(&format!("{name} Ready"), TIMEOUT, || async {
        let object = api.get(name).await.ok()?;
        object.is_ready().then(|| ports_of(&object))
    })
    .await
}

/// No port is held twice on `node`, across every object of the namespace.
async fn unique_on(api: &Api<PortAssignment>, node: &str) {
    let objects = api.list(&ListParams::default()).await.expect("list");
    let mut seen: BTreeMap<u16, String> = BTreeMap::new();
    for object in objects.items.iter().filter(|o| o.spec.node_name == node) {
        for (key, port) in ports_of(object) {
            let holder = format!("{}/{key}", object.name_any());
            if let Some(other) = seen.insert(port, holder.clone()) {
                panic!("port {port} on {node} is held by {other} and {holder}");
            }
        }
    }
}

/// Replaces an object's keys (what `kubectl patch --type merge` does).
async fn set_keys(api: &Api<PortAssignment>, name: &str, keys: &[String]) {
    let patch = serde_json::json!({ "spec": { "keys": keys } });
    api.patch(name, &PatchParams::default(), &Patch::Merge(patch)).await.expect("set keys");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_product_as_users_run_it() {
    let mut env = Installed::up().await.unwrap_or_else(|e| panic!("setting up the provider: {e:#}"));
    let client = env.client();
    let ns = unique("e2e");
    ensure_namespace(&client, &ns).await.expect("namespace");
    let api: Api<PortAssignment> = Api::namespaced(client.clone(), &ns);
    println!("provider {:?}, nodes {:?}, namespace {ns}", env.provider, env.nodes);
    let nodes = env.nodes.clone();
    let pool = |node: &str| format!("pool-{node}");

    step("examples/pool.yaml on every node: Ready, in range, unique per node, kubectl get pa columns");
    for node in &nodes {
        let object = example("pool.yaml", &pool(node), node).unwrap();
        api.create(&PostParams::default(), &object).await.expect("create pool");
    }
    let mut before: BTreeMap<String, BTreeMap<String, u16>> = BTreeMap::new();
    for node in &nodes {
        let ports = ready(&api, &pool(node)).await;
        assert_eq!(ports.len(), 4, "one port per key of examples/pool.yaml");
        assert!(ports.values().all(|p| env.range.contains(*p)), "ports outside {}: {ports:?}", env.range);
        unique_on(&api, node).await;
        before.insert(node.clone(), ports);
    }
    let (code, table, err) = env.kubectl(&["get", "pa", "-n", &ns]).unwrap();
    assert_eq!(code, 0, "kubectl get pa: {err}");
    let header: Vec<&str> = table.lines().next().unwrap_or_default().split_whitespace().collect();
    assert_eq!(header, ["NAME", "NODE", "KEYS", "ASSIGNED", "READY", "AGE"]);
    for node in &nodes {
        let row = table.lines().find(|l| l.split_whitespace().next() == Some(pool(node).as_str())).expect("a row");
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(&cells[1..5], [node.as_str(), "4", "4", "True"], "kubectl get pa row: {row}");
    }
    println!("{table}");

    step("lookups with kubectl portassign: key -> port (json), port -> key (table, yaml); misses exit 1");
    for node in &nodes {
        let key = "team-a/sandbox-2";
        let want = before[node][key];
        let (code, out, err) = env.kubectl(&["portassign", "key", key, "-n", &ns, "-o", "json"]).unwrap();
        assert_eq!(code, 0, "kubectl portassign key: {err}");
        let found: Vec<Value> = serde_json::from_str(&out).expect("json");
        assert_eq!(found.len(), nodes.len(), "one match per node: {out}");
        let here = found.iter().find(|m| m["node"] == node.as_str()).expect("a match on the node");
        assert_eq!((here["name"].as_str(), here["port"].as_u64()), (Some(pool(node).as_str()), Some(u64::from(want))));

        let port = want.to_string();
        let (code, out, err) = env.kubectl(&["portassign", "port", &port, "--node", node]).unwrap();
        assert_eq!(code, 0, "kubectl portassign port: {err}");
        let rows: Vec<Vec<&str>> = out.lines().map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(rows[0], ["NAMESPACE", "NAME", "NODE", "KEY", "PORT"]);
        assert_eq!(rows[1..], [vec![ns.as_str(), pool(node).as_str(), node.as_str(), key, port.as_str()]]);
        let (code, out, _) =
            env.kubectl(&["portassign", "port", &port, "--node", node, "-n", &ns, "-o", "yaml"]).unwrap();
        assert_eq!(code, 0);
        let found: Vec<Value> = serde_saphyr::from_str(&out).expect("yaml");
        assert_eq!(found[0]["key"], key, "yaml: {out}");
    }
    let (code, _, err) = env.kubectl(&["portassign", "key", "no-such/key", "-n", &ns]).unwrap();
    assert_eq!(code, 1, "a missing key exits 1");
    assert!(err.contains("holds no port"), "message: {err}");
    let (code, _, _) = env.kubectl(&["portassign", "port", "1", "--node", &nodes[0]]).unwrap();
    assert_eq!(code, 1, "an unassigned port exits 1");

    step("grow, then shrink the keys: ports that stay never move; removed keys hold none");
    for node in &nodes {
        let mut keys: Vec<String> = before[node].keys().cloned().collect();
        keys.extend(["team-c/sandbox-1".to_owned(), "team-c/sandbox-2".to_owned()]);
        set_keys(&api, &pool(node), &keys).await;
    }
    for node in &nodes {
        let grown = ready(&api, &pool(node)).await;
        assert_eq!(grown.len(), 6);
        for (key, port) in &before[node] {
            assert_eq!(grown.get(key), Some(port), "{key} moved on {node} when keys were added");
        }
        unique_on(&api, node).await;
    }
    let removed = ["team-a/sandbox-1", "team-b/sandbox-1"];
    for node in &nodes {
        let keys: Vec<String> =
            ready(&api, &pool(node)).await.into_keys().filter(|k| !removed.contains(&k.as_str())).collect();
        set_keys(&api, &pool(node), &keys).await;
    }
    for node in &nodes {
        let shrunk = ready(&api, &pool(node)).await;
        assert_eq!(shrunk.len(), 4);
        for (key, port) in &shrunk {
            if let Some(old) = before[node].get(key) {
                assert_eq!(old, port, "{key} moved on {node} when keys were removed");
            }
        }
        unique_on(&api, node).await;
    }
    for key in removed {
        let (code, _, _) = env.kubectl(&["portassign", "key", key, "-n", &ns]).unwrap();
        assert_eq!(code, 1, "{key} was removed and holds no port");
    }

    step("examples/udp.yaml and tcpudp.yaml: Ready, unique per node across protocols");
    for node in &nodes {
        for (file, name) in [("udp.yaml", format!("udp-{node}")), ("tcpudp.yaml", format!("tcpudp-{node}"))] {
            let object = example(file, &name, node).unwrap();
            api.create(&PostParams::default(), &object).await.expect("create");
        }
    }
    for node in &nodes {
        for (name, protocol) in [(format!("udp-{node}"), Protocol::Udp), (format!("tcpudp-{node}"), Protocol::TcpUdp)] {
            assert!(!ready(&api, &name).await.is_empty());
            assert_eq!(api.get(&name).await.expect("get").spec.protocol, protocol);
        }
        unique_on(&api, node).await;
    }

    step("the events tell each assignment and release");
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    for node in &nodes {
        let name = pool(node);
        eventually(&format!("Assigned and Released events on {name}"), TIMEOUT, || async {
            let list = events.list(&ListParams::default()).await.ok()?;
            let mine: Vec<(String, String)> = list
                .items
                .into_iter()
                .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name.as_str()))
                .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
                .collect();
            let assigned_late =
                mine.iter().any(|(r, n)| r == event_reason::ASSIGNED && n.contains("team-c/sandbox-1="));
            let released = mine.iter().any(|(r, n)| r == event_reason::RELEASED && n.contains("team-a/sandbox-1="));
            (assigned_late && released).then_some(())
        })
        .await;
    }

    step("delete everything: the agents release the ports and remove their finalizers");
    let names: BTreeSet<String> =
        api.list(&ListParams::default()).await.expect("list").items.iter().map(|o| o.name_any()).collect();
    for name in &names {
        api.delete(name, &DeleteParams::default()).await.expect("delete");
    }
    eventually("every object gone", TIMEOUT, || async {
        api.list(&ListParams::default()).await.ok().filter(|l| l.items.is_empty()).map(|_| ())
    })
    .await;
    let (code, _, _) = env.kubectl(&["portassign", "key", "team-a/sandbox-2", "-n", &ns]).unwrap();
    assert_eq!(code, 1, "nothing is left to find");

    if env.provider == Provider::Local {
        step("the janitor, as the release's ServiceAccount, holds its Lease");
        let leases: Api<Lease> = Api::namespaced(client.clone(), RELEASE);
        eventually("the janitor holds its Lease", TIMEOUT, || async {
            let lease = leases.get(portassign::janitor::LEASE_NAME).await.ok()?;
            (lease.spec?.holder_identity.as_deref() == Some("e2e-janitor")).then_some(())
        })
        .await;
    }

    step("no API call of an agent or of the janitor was refused (the chart's RBAC suffices)");
    let refused = env.refusals().await.expect("read the logs");
    assert!(refused.is_empty(), "refused calls:\n{}", refused.join("\n"));
}
