//! The Helm chart rendered by the real `helm` (built from its Go module, cached): the
//! tests take the RBAC and the identities from what the chart ships, never from a copy.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};
use serde_json::Value;

/// The release name the tests install or render the chart under.
pub const RELEASE: &str = "portassign";
/// The namespace the chart's namespaced objects (ServiceAccounts, Roles) go to in tests.
pub const NAMESPACE: &str = "portassign-system";

/// The chart's folder.
pub fn chart_dir() -> PathBuf {
    crate::repo_root().join("charts/portassign")
}

/// `helm template` of the chart with `values` (`key=value`, as `--set` takes them) into
/// `namespace`: every rendered object, as JSON.
pub fn render(namespace: &str, values: &[&str]) -> anyhow::Result<Vec<Value>> {
    let args: Vec<String> = values.iter().map(|v| format!("--set={v}")).collect();
    render_with(namespace, &args)
}

/// `helm template` of the chart into `namespace` with more of helm's arguments (such as
/// `--values=FILE`): every rendered object, as JSON.
pub fn render_with(namespace: &str, args: &[String]) -> anyhow::Result<Vec<Value>> {
    let helm = crate::tool("helm")?;
    let mut command = Command::new(&helm);
    command.args(["template", RELEASE]).arg(chart_dir()).args(["--namespace", namespace]).args(args);
    let output = command.output().with_context(|| format!("running {}", helm.display()))?;
    if !output.status.success() {
        bail!("helm template failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    let text = String::from_utf8(output.stdout).context("helm template printed non-UTF-8")?;
    let documents: Vec<Value> = serde_saphyr::from_multiple(&text).context("helm template output is not YAML")?;
    Ok(documents.into_iter().filter(|d| !d.is_null()).collect())
}

/// The rendered objects of `kind`.
pub fn of_kind<'a>(objects: &'a [Value], kind: &str) -> impl Iterator<Item = &'a Value> {
    objects.iter().filter(move |o| o["kind"] == kind)
}

/// The ServiceAccount the pods of the rendered workload `kind` (`DaemonSet` for the
/// agent, `Deployment` for the janitor) run as.
pub fn service_account_of(objects: &[Value], kind: &str) -> anyhow::Result<String> {
    of_kind(objects, kind)
        .find_map(|o| o["spec"]["template"]["spec"]["serviceAccountName"].as_str())
        .map(str::to_owned)
        .with_context(|| format!("the chart renders no {kind} with a serviceAccountName"))
}

/// The chart's version, from its Chart.yaml.
pub fn chart_version() -> anyhow::Result<String> {
    let text = std::fs::read_to_string(chart_dir().join("Chart.yaml")).context("reading Chart.yaml")?;
    let chart: Value = serde_saphyr::from_str(&text).context("Chart.yaml is not YAML")?;
    chart["version"].as_str().map(str::to_owned).context("Chart.yaml has no version")
}
