//! The upgrade path on kind (`hack/kind/test.sh` runs it with `--features kind`): the
//! previous release — chart 0.1.0, whose agent selector lacked `component: agent`, with an
//! agent image built from the same commit (`hack/kind/previous.sh`) — installed with
//! keys holding ports on every node, then upgraded to the working tree's chart exactly as
//! CHANGELOG.md says (the CRD first, the DaemonSet deleted with `--cascade=orphan`,
//! `helm upgrade`, then `kubectl rollout restart`). No port moves, no key loses its port,
//! every 0.1.0 agent is replaced, no node ever runs two agent containers at once (sampled
//! throughout), and the invariant checker agrees with every agent's memory before and
//! after.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, PostParams},
};
use portassign::{
    api::PortAssignment,
    checker::{self, Expectations},
};
use portassign_e2e::{Installed, Provider, RELEASE, TIMEOUT, example, node_addresses};
use portassign_testkit::{cluster::ensure_namespace, eventually, ports_of, unique};

/// The agents' HTTP port (both charts' default).
const AGENT_PORT: u16 = 9477;

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} (hack/kind/test.sh sets it)"))
}

/// Every port of every object of `api`'s namespace: object → key → port.
async fn all_ports(api: &Api<PortAssignment>) -> BTreeMap<String, BTreeMap<String, u16>> {
    api.list(&ListParams::default()).await.expect("list").items.iter().map(|o| (o.name_any(), ports_of(o))).collect()
}

/// The agent pods running a container now, per node.
async fn running_agents(pods: &Api<Pod>) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for pod in pods.list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default() {
        let Some(spec) = &pod.spec else { continue };
        let is_agent =
            spec.containers.iter().any(|c| c.args.as_ref().and_then(|a| a.first()).is_some_and(|a| a == "agent"));
        let running = pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.state.as_ref().is_some_and(|s| s.running.is_some())));
        if is_agent && running {
            out.entry(spec.node_name.clone().unwrap_or_default()).or_default().push(pod.name_any());
        }
    }
    out
}

/// The checker over every object and every node's agent table, until clean.
async fn checker_clean(env: &Installed, addresses: &BTreeMap<String, String>, token: Option<&str>) {
    let all: Api<PortAssignment> = Api::all(env.client());
    let range = env.range;
    eventually("the checker clean against every agent", TIMEOUT, || async {
        let objects = all.list(&ListParams::default()).await.ok()?.items;
        let mut tables = Vec::new();
        for address in addresses.values() {
            tables.push(checker::fetch_table(&format!("http://{address}:{AGENT_PORT}"), token).await.ok()?);
        }
        let expect =
            Expectations { ranges: addresses.keys().map(|n| (n.clone(), range)).collect(), ..Expectations::default() };
        let violations = checker::check(&objects, &tables, &expect, k8s_openapi::jiff::Timestamp::now());
        if violations.is_empty() {
            Some(())
        } else {
            println!("checker: {violations:?}");
            None
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn upgrading_from_the_previous_chart_as_the_changelog_says_keeps_every_port() {
    let mut env = Installed::connect().await.unwrap_or_else(|e| panic!("the provider: {e:#}"));
    assert_eq!(env.provider, Provider::Kind, "the upgrade runs on kind (PORTASSIGN_E2E_PROVIDER=kind)");
    let previous_chart = format!("{}/charts/portassign", var("PORTASSIGN_E2E_PREVIOUS_SRC"));
    let previous_crds = format!("{}/crds/", var("PORTASSIGN_E2E_PREVIOUS_SRC"));
    let previous_image = var("PORTASSIGN_E2E_PREVIOUS_IMAGE");
    let (repository, tag) = previous_image.rsplit_once(':').expect("REPOSITORY:TAG");
    let client = env.client();
    let pods: Api<Pod> = Api::namespaced(client.clone(), RELEASE);

    // From nothing, as a 0.1.0 user had it: that release's CRD and chart.
    let releases = env.helm(&["list", "-n", RELEASE, "-q"]).expect("helm list");
    if releases.lines().any(|r| r == RELEASE) {
        env.helm(&["uninstall", RELEASE, "-n", RELEASE, "--wait"]).expect("helm uninstall");
    }
    eventually("no agent left from an earlier install", TIMEOUT, || async {
        running_agents(&pods).await.is_empty().then_some(())
    })
    .await;
    let (code, _, stderr) = env
        .kubectl(&["apply", "--server-side", "--force-conflicts", "-f", &previous_crds])
        .expect("kubectl apply the previous CRD");
    assert_eq!(code, 0, "{stderr}");
    let range = env.range;
    let previous_values = [
        format!("image.repository={repository}"),
        format!("image.tag={tag}"),
        "image.pullPolicy=Never".to_owned(),
        format!("portRange.first={}", range.first()),
        format!("portRange.last={}", range.last()),
        "logFormat=human".to_owned(),
    ];
    let mut install = vec!["install", RELEASE, &previous_chart, "-n", RELEASE, "--create-namespace"];
    for value in &previous_values {
        install.extend(["--set", value]);
    }
    env.helm(&install).expect("helm install the previous chart");
    env.rolled_out().await;
    let chart_version = env.helm(&["list", "-n", RELEASE, "-o", "json"]).expect("helm list");
    assert!(
        chart_version.contains("\"chart\":\"portassign-0.1.0\""),
        "the previous release is chart 0.1.0: {chart_version}"
    );

    let nodes = env.nodes.clone();
    let addresses = node_addresses(&Api::all(client.clone())).await;
    let ns = unique("upgrade");
    ensure_namespace(&client, &ns).await.expect("namespace");
    let api: Api<PortAssignment> = Api::namespaced(client.clone(), &ns);
    for node in &nodes {
        for i in 0..2 {
            let object = example("pool.yaml", &format!("pool-{i}-{node}"), node).expect("example");
            api.create(&PostParams::default(), &object).await.expect("create");
        }
    }
    eventually("every key holds a port under the previous release", TIMEOUT, || async {
        let list = api.list(&ListParams::default()).await.ok()?.items;
        (list.len() == 2 * nodes.len() && list.iter().all(|o| o.is_ready() && !ports_of(o).is_empty())).then_some(())
    })
    .await;
    // The previous agent serves /debug/table to anyone.
    checker_clean(&env, &addresses, None).await;
    let before = all_ports(&api).await;
    let held: usize = before.values().map(BTreeMap::len).sum();
    println!("{held} keys hold ports on {} nodes under chart 0.1.0", nodes.len());

    let old_agents = running_agents(&pods).await;
    assert_eq!(old_agents.len(), nodes.len(), "one previous agent per node: {old_agents:?}");
    // Watch, through the whole upgrade, how many agent containers run on each node.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (pods, stop) = (pods.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut samples, mut doubles) = (0usize, BTreeSet::new());
            while !stop.load(Ordering::SeqCst) {
                for (node, running) in running_agents(&pods).await {
                    if running.len() > 1 {
                        doubles.insert(format!("{node}: {running:?}"));
                    }
                }
                samples += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (samples, doubles)
        })
    };

    // CHANGELOG.md, "upgrading from 0.1.0": the CRD first, then the DaemonSet deleted
    // with its pods kept, then helm upgrade, then a restart of the DaemonSet.
    env.ensure_reader().await.expect("the reader ServiceAccount");
    let crds = format!("{}/crds/", portassign_testkit::repo_root().display());
    let (code, _, stderr) =
        env.kubectl(&["apply", "--server-side", "--force-conflicts", "-f", &crds]).expect("kubectl apply the CRD");
    assert_eq!(code, 0, "{stderr}");
    let (code, _, stderr) = env
        .kubectl(&["-n", RELEASE, "delete", "daemonset", RELEASE, "--cascade=orphan"])
        .expect("kubectl delete --cascade=orphan");
    assert_eq!(code, 0, "{stderr}");
    env.helm_upgrade(&[]).expect("helm upgrade to the working tree's chart");
    // The adopted 0.1.0 pods look up to date to the new DaemonSet (same
    // pod-template-generation): the restart CHANGELOG.md asks for replaces them.
    let (code, _, stderr) =
        env.kubectl(&["-n", RELEASE, "rollout", "restart", "daemonset", RELEASE]).expect("kubectl rollout restart");
    assert_eq!(code, 0, "{stderr}");
    env.rolled_out().await;
    // The new DaemonSet adopts the orphaned pods and replaces each (its template differs).
    eventually("every previous agent replaced", TIMEOUT, || async {
        let now = running_agents(&pods).await;
        old_agents
            .iter()
            .all(|(node, old)| now.get(node).is_some_and(|new| new.len() == 1 && !old.contains(&new[0])))
            .then_some(())
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let (samples, doubles) = sampler.await.expect("the sampler");
    assert!(samples >= 3, "the agents were sampled {samples} times");
    assert!(doubles.is_empty(), "two agent containers ran on one node at once: {doubles:?}");

    let token = env.reader.as_ref().expect("reader").token();
    checker_clean(&env, &addresses, Some(&token)).await;
    let after = all_ports(&api).await;
    assert_eq!(after, before, "every key keeps its port through the upgrade");
    let list = api.list(&ListParams::default()).await.expect("list").items;
    assert!(list.iter().all(|o| o.is_ready()), "every object stays Ready");
    let status = env.helm(&["list", "-n", RELEASE, "-o", "json"]).expect("helm list");
    let version = portassign_testkit::chart::chart_version().expect("Chart.yaml");
    assert!(status.contains(&format!("\"chart\":\"portassign-{version}\"")), "upgraded to chart {version}: {status}");
    println!(
        "upgraded 0.1.0 -> {version}: {held} keys kept their ports; {samples} samples, never two agents on a node"
    );

    for object in list {
        let _ = api.delete(&object.name_any(), &DeleteParams::default()).await;
    }
    eventually("the test's objects released", TIMEOUT, || async {
        api.list(&ListParams::default()).await.ok()?.items.is_empty().then_some(())
    })
    .await;
    let _ = Api::<Namespace>::all(client).delete(&ns, &DeleteParams::default()).await;
}
