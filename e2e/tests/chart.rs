//! The chart against a real API server: every rendering (default and `ci/` values) passes
//! the server's validation (dry-run), and `helm install`, `upgrade` and `uninstall` do
//! what the chart's README says. Template-level assertions live in
//! `charts/portassign/tests` (helm-unittest).

use std::process::Command;

use anyhow::Context as _;
use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment},
        core::v1::ServiceAccount,
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DynamicObject, Patch, PatchParams},
    discovery::{Discovery, Scope},
};
use portassign_testkit::{Cluster, chart, cluster::ensure_namespace, tool};
use serde_json::{Value, json};

/// `helm ARGS...` against the cluster of `kubeconfig`.
fn helm(kubeconfig: &std::path::Path, args: &[&str]) -> String {
    let output =
        Command::new(tool("helm").expect("helm")).args(args).env("KUBECONFIG", kubeconfig).output().expect("run helm");
    assert!(output.status.success(), "helm {} failed: {}", args.join(" "), String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The Prometheus Operator's ServiceMonitor and PrometheusRule kinds, as stubs that
/// accept any fields, so the dry-run can check the envelope of the chart's objects.
async fn stub_service_monitor_crd(client: &Client) {
    for (kind, plural) in [("ServiceMonitor", "servicemonitors"), ("PrometheusRule", "prometheusrules")] {
        stub_monitoring_crd(client, kind, plural).await;
    }
}

async fn stub_monitoring_crd(client: &Client, kind: &str, plural: &str) {
    let crd: CustomResourceDefinition = serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": { "name": format!("{plural}.monitoring.coreos.com") },
        "spec": {
            "group": "monitoring.coreos.com", "scope": "Namespaced",
            "names": { "kind": kind, "listKind": format!("{kind}List"), "plural": plural, "singular": kind.to_lowercase() },
            "versions": [{ "name": "v1", "served": true, "storage": true,
                "schema": { "openAPIV3Schema": { "type": "object", "x-kubernetes-preserve-unknown-fields": true } } }]
        }
    }))
    .expect("stub CRD");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(&crd.name_any(), &PatchParams::apply("portassign-e2e").force(), &Patch::Apply(&crd))
        .await
        .expect("stub CRD");
    portassign_testkit::eventually(
        &format!("the stub {kind} kind is served"),
        std::time::Duration::from_secs(30),
        || async {
            let discovery = Discovery::new(client.clone()).run().await.ok()?;
            let gvk = kube::api::GroupVersionKind::gvk("monitoring.coreos.com", "v1", kind);
            discovery.resolve_gvk(&gvk).map(|_| ())
        },
    )
    .await;
}

/// Applies every rendered object with `dryRun=All` (server-side apply, so objects that
/// exist already are checked as an upgrade would change them): the API server validates
/// each against its schema (and the CRD's) and admission, and stores nothing.
async fn dry_run(client: &Client, discovery: &Discovery, namespace: &str, objects: &[Value]) -> anyhow::Result<usize> {
    let params = PatchParams::apply("portassign-e2e-dry-run").dry_run().force();
    for object in objects {
        let object: DynamicObject = serde_json::from_value(object.clone())?;
        let types = object.types.clone().context("a rendered object without apiVersion/kind")?;
        let (group, version) = types.api_version.rsplit_once('/').unwrap_or(("", &types.api_version));
        let gvk = kube::api::GroupVersionKind::gvk(group, version, &types.kind);
        let (resource, capabilities) =
            discovery.resolve_gvk(&gvk).with_context(|| format!("the server does not serve {gvk:?}"))?;
        let api: Api<DynamicObject> = match capabilities.scope {
            Scope::Namespaced => {
                Api::namespaced_with(client.clone(), object.namespace().as_deref().unwrap_or(namespace), &resource)
            }
            Scope::Cluster => Api::all_with(client.clone(), &resource),
        };
        api.patch(&object.name_any(), &params, &Patch::Apply(&object))
            .await
            .with_context(|| format!("{} {} rejected", types.kind, object.name_any()))?;
    }
    Ok(objects.len())
}

#[tokio::test(flavor = "multi_thread")]
async fn every_rendering_passes_the_api_servers_validation() {
    let cluster = Cluster::shared().await;
    let client = cluster.admin.client();
    let namespace = "portassign-dry-run";
    ensure_namespace(&client, namespace).await.expect("namespace");
    stub_service_monitor_crd(&client).await;
    let discovery = Discovery::new(client.clone()).run().await.expect("discovery");
    let ci = chart::chart_dir().join("ci");
    let mut sets: Vec<Option<std::path::PathBuf>> = vec![None];
    for entry in std::fs::read_dir(&ci).expect("charts/portassign/ci") {
        sets.push(Some(entry.expect("entry").path()));
    }
    assert!(sets.len() >= 3, "at least two values files in {}", ci.display());
    for values in sets {
        let file = values.as_ref().map(|p| p.display().to_string());
        let mut args = vec![];
        if let Some(file) = &file {
            args.push(format!("--values={file}"));
        }
        let rendered = chart::render_with(namespace, &args).expect("helm template");
        let checked = dry_run(&client, &discovery, namespace, &rendered)
            .await
            .unwrap_or_else(|e| panic!("{}: {e:#}", file.as_deref().unwrap_or("default values")));
        println!("{checked} objects accepted by the API server: {}", file.as_deref().unwrap_or("default values"));
    }
    // The examples users are pointed at, as they would apply them (the manifests; the
    // launcher beside them is a program).
    let mut examples = Vec::new();
    for entry in std::fs::read_dir(portassign_testkit::repo_root().join("examples")).expect("examples/") {
        let file = entry.expect("entry").file_name().to_string_lossy().into_owned();
        if !file.ends_with(".yaml") {
            continue;
        }
        // A PortAssignment example gets a name and a node, as the README says; the others
        // (a pod asking for a port through DRA) are applied as they are.
        let path = portassign_testkit::repo_root().join("examples").join(&file);
        let documents: Vec<serde_json::Value> =
            serde_saphyr::from_multiple(&std::fs::read_to_string(&path).expect("read")).expect("YAML");
        if documents.iter().all(|d| d["kind"] == "PortAssignment") {
            let object = portassign_e2e::example(&file, "example", "node-1").expect("an example PortAssignment");
            examples.push(serde_json::to_value(object).expect("json"));
        } else {
            examples.extend(documents);
        }
    }
    let checked = dry_run(&client, &discovery, namespace, &examples).await.expect("the examples are accepted");
    println!("{checked} examples accepted by the API server");
}

#[tokio::test(flavor = "multi_thread")]
async fn install_upgrade_and_uninstall_do_what_the_readme_says() {
    let cluster = Cluster::shared().await;
    let client = cluster.admin.client();
    let kubeconfig = cluster.kubeconfig();
    let (release, namespace) = ("portassign-chart", "portassign-chart");
    let chart_dir = chart::chart_dir().display().to_string();
    let install = ["upgrade", "--install", release, &chart_dir, "-n", namespace, "--create-namespace"];
    helm(
        kubeconfig,
        &[
            &install[..],
            &["--set", "metricsPort=9555", "--set", "portRange.first=24000", "--set", "portRange.last=24999"],
        ]
        .concat(),
    );

    let daemonsets: Api<DaemonSet> = Api::namespaced(client.clone(), namespace);
    let args = |ds: &DaemonSet| -> Vec<String> {
        ds.spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|p| p.containers[0].args.clone())
            .unwrap_or_default()
    };
    let ds = daemonsets.get(release).await.expect("the DaemonSet is installed");
    assert!(args(&ds).contains(&"--port-range=24000-24999".to_owned()), "args: {:?}", args(&ds));
    assert!(args(&ds).contains(&"--listen=0.0.0.0:9555".to_owned()), "args: {:?}", args(&ds));
    Api::<ServiceAccount>::namespaced(client.clone(), namespace).get(release).await.expect("its ServiceAccount");
    Api::<ClusterRole>::all(client.clone()).get(release).await.expect("its ClusterRole");
    Api::<ClusterRoleBinding>::all(client.clone()).get(release).await.expect("its ClusterRoleBinding");
    Api::<Deployment>::namespaced(client.clone(), namespace)
        .get(&format!("{release}-janitor"))
        .await
        .expect("the janitor");

    helm(
        kubeconfig,
        &[
            &install[..],
            &[
                "--reuse-values",
                "--set",
                "concurrency=4",
                "--set",
                "portRange.first=22000",
                "--set",
                "portRange.last=22999",
            ],
        ]
        .concat(),
    );
    let status = helm(kubeconfig, &["status", release, "-n", namespace, "-o", "json"]);
    let status: Value = serde_json::from_str(&status).expect("helm status json");
    assert_eq!(status["version"], 2, "one upgrade, revision 2");
    let ds = daemonsets.get(release).await.expect("DaemonSet");
    assert!(
        args(&ds).contains(&"--port-range=22000-22999".to_owned()),
        "the upgrade changed the range: {:?}",
        args(&ds)
    );
    assert!(args(&ds).contains(&"--concurrency=4".to_owned()), "and the concurrency: {:?}", args(&ds));
    // ...and what the admission policy refuses: the old range's ports are admitted again,
    // the new range's refused (dry-run pods outside the release's namespace, which is exempt).
    let checked = "portassign-chart-checked";
    ensure_namespace(&client, checked).await.expect("namespace");
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), checked);
    let admitted = |port: u16| {
        let pods = pods.clone();
        async move {
            let pod = serde_json::from_value(json!({
                "metadata": { "name": "probe" },
                "spec": { "containers": [{ "name": "c", "image": "x", "ports": [{ "containerPort": 80, "hostPort": port }] }] }
            }))
            .expect("pod");
            pods.create(&kube::api::PostParams { dry_run: true, ..Default::default() }, &pod).await.is_ok()
        }
    };
    portassign_testkit::eventually(
        "the upgraded policy refuses 22500 and admits 24500",
        std::time::Duration::from_secs(30),
        || async { (!admitted(22500).await && admitted(24500).await).then_some(()) },
    )
    .await;

    helm(kubeconfig, &["uninstall", release, "-n", namespace, "--wait"]);
    assert!(daemonsets.get_opt(release).await.expect("get").is_none(), "the DaemonSet is gone");
    assert!(
        Api::<ClusterRole>::all(client.clone()).get_opt(release).await.expect("get").is_none(),
        "the ClusterRole is gone"
    );
    assert!(
        Api::<ClusterRoleBinding>::all(client.clone()).get_opt(release).await.expect("get").is_none(),
        "the ClusterRoleBinding is gone"
    );
    portassign_testkit::eventually(
        "the uninstalled policy refuses nothing",
        std::time::Duration::from_secs(30),
        || async { admitted(22500).await.then_some(()) },
    )
    .await;
    let crd = Api::<CustomResourceDefinition>::all(client).get_opt("portassignments.portassign.io").await.expect("get");
    assert!(crd.is_some(), "helm uninstall keeps the CRD (and the objects in it)");
}

/// `helm install` into a namespace that enforces the `baseline` Pod Security level fails
/// at once, naming the label that fixes it (rather than leaving a DaemonSet that never
/// gets a pod); with that label it goes through. `--dry-run=server` runs the chart's
/// `lookup` against the live namespace and installs nothing.
#[tokio::test(flavor = "multi_thread")]
async fn install_refuses_a_namespace_enforcing_baseline_and_takes_the_documented_label() {
    let cluster = Cluster::shared().await;
    let client = cluster.admin.client();
    let namespace = portassign_testkit::unique("psa-chart");
    ensure_namespace(&client, &namespace).await.unwrap();
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let label = |level: &str| json!({ "metadata": { "labels": { "pod-security.kubernetes.io/enforce": level } } });
    namespaces.patch(&namespace, &PatchParams::default(), &Patch::Merge(label("baseline"))).await.unwrap();

    let chart = chart::chart_dir().to_string_lossy().into_owned();
    // Without the DRA driver: its DeviceClass is cluster-wide, and the README's install
    // (another test, maybe running now) holds it; one release per cluster serves DRA.
    let install = ["install", "psa-check", &chart, "-n", &namespace, "--dry-run=server", "--set", "dra.enabled=false"];
    let output = Command::new(tool("helm").unwrap())
        .args(install)
        .env("KUBECONFIG", cluster.kubeconfig())
        .output()
        .expect("run helm");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "installed into a baseline namespace");
    assert!(
        stderr.contains("enforces Pod Security level \"baseline\"")
            && stderr.contains(&format!(
                "kubectl label namespace {namespace} pod-security.kubernetes.io/enforce=privileged"
            )),
        "{stderr}"
    );

    namespaces.patch(&namespace, &PatchParams::default(), &Patch::Merge(label("privileged"))).await.unwrap();
    helm(cluster.kubeconfig(), &install);
    namespaces.delete(&namespace, &Default::default()).await.unwrap();
}

/// `make package` (hack/package.sh): the same sources give the same bytes, a second
/// apart; the archive carries the Artifact Hub annotations and renders what the chart's
/// folder renders.
#[test]
fn make_package_is_reproducible() {
    let package = |dir: &std::path::Path| -> std::path::PathBuf {
        let output = Command::new(portassign_testkit::repo_root().join("hack/package.sh"))
            .arg(dir)
            .output()
            .expect("hack/package.sh");
        assert!(output.status.success(), "hack/package.sh: {}", String::from_utf8_lossy(&output.stderr));
        std::path::PathBuf::from(String::from_utf8_lossy(&output.stdout).trim())
    };
    let base = std::env::temp_dir().join(portassign_testkit::unique("package"));
    let first = package(&base.join("a"));
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let second = package(&base.join("b"));
    let version = chart::chart_version().expect("Chart.yaml");
    assert_eq!(first.file_name().unwrap().to_string_lossy(), format!("portassign-{version}.tgz"));
    assert_eq!(std::fs::read(&first).unwrap(), std::fs::read(&second).unwrap(), "two packages of one tree differ");

    let helm = tool("helm").expect("helm");
    let shown = Command::new(&helm).args(["show", "chart"]).arg(&first).output().expect("helm show chart");
    let shown = String::from_utf8_lossy(&shown.stdout);
    for annotation in
        ["artifacthub.io/images", "artifacthub.io/crds", "artifacthub.io/changes", "artifacthub.io/license"]
    {
        assert!(shown.contains(annotation), "the archive's Chart.yaml lacks {annotation}:\n{shown}");
    }
    let template = |chart: &std::path::Path| {
        let output = Command::new(&helm).args(["template", "r"]).arg(chart).output().expect("helm template");
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        output.stdout
    };
    assert_eq!(template(&first), template(&chart::chart_dir()), "the archive renders what the chart's folder renders");
    let _ = std::fs::remove_dir_all(&base);
}
