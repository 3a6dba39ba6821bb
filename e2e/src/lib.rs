//! The end-to-end suite's provider: a cluster with the chart installed by `helm`, an
//! agent serving each node under the chart's ServiceAccount, and the user's tools
//! (`kubectl`, the `kubectl portassign` plugin).
//!
//! Two providers, chosen with `PORTASSIGN_E2E_PROVIDER`:
//! - `local` (default): the test kit's local control plane (or the cluster of
//!   `PORTASSIGN_E2E_KUBECONFIG`); no kubelet runs there, so one `portassign agent`
//!   process per node runs with a token of the release's ServiceAccount.
//! - `kind`: the cluster of `PORTASSIGN_E2E_KUBECONFIG` (`hack/kind/cluster.sh up`), the
//!   image `PORTASSIGN_E2E_IMAGE` loaded into its nodes; the agents are the chart's
//!   DaemonSet pods.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{Node, Pod},
};
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, LogParams},
};
use portassign::range::PortRange;
use portassign_testkit::{
    AgentProcess, Cluster, Identity, Process,
    chart::chart_dir,
    cluster::{ensure_service_account, identity_from, service_account_identity},
    eventually, portassign_bin, tool,
};

/// The release the suite installs, and its namespace.
pub const RELEASE: &str = "portassign-e2e";
/// The ServiceAccount the suite reads the agents' `/debug/table` as.
pub const READER: &str = "portassign-e2e-reader";
/// Ports the release's agents assign.
pub const RANGE: &str = "23000-23999";
/// Nodes of the local provider (there are no Node objects: the agents are processes).
const LOCAL_NODES: [&str; 2] = ["e2e-node-a", "e2e-node-b"];
/// How long any one thing may take.
pub const TIMEOUT: Duration = Duration::from_secs(120);

/// Where the agents run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Provider {
    /// Processes next to a local control plane.
    Local,
    /// The chart's DaemonSet on a kind cluster.
    Kind,
}

impl Provider {
    /// The provider `PORTASSIGN_E2E_PROVIDER` names (default: local).
    pub fn from_env() -> anyhow::Result<Self> {
        match std::env::var("PORTASSIGN_E2E_PROVIDER").as_deref() {
            Err(_) | Ok("local") => Ok(Provider::Local),
            Ok("kind") => Ok(Provider::Kind),
            Ok(other) => bail!("PORTASSIGN_E2E_PROVIDER={other}: expected local or kind"),
        }
    }
}

/// A cluster with the chart installed and an agent serving every node.
pub struct Installed {
    /// Where the agents run.
    pub provider: Provider,
    /// Cluster admin (the test's own setup and assertions).
    pub admin: Identity,
    /// The nodes that have an agent.
    pub nodes: Vec<String>,
    /// The agents' range.
    pub range: PortRange,
    /// The local provider's agent and janitor processes.
    pub processes: Vec<Process>,
    /// The local provider's agents, by node.
    pub agents: BTreeMap<String, AgentProcess>,
    /// A scratch directory: kubeconfigs, the plugin's PATH entry.
    pub work: PathBuf,
    /// A ServiceAccount bound by the release (httpAuth values) to the chart's
    /// metrics-reader and table-reader ClusterRoles: reads the agents' `/debug/table`.
    pub reader: Option<Identity>,
    _cluster: Option<Cluster>,
}

impl Installed {
    /// Sets up the provider `PORTASSIGN_E2E_PROVIDER` names: installs (or upgrades) the
    /// chart and waits until an agent is ready on every node.
    pub async fn up() -> anyhow::Result<Installed> {
        let mut installed = Self::connect().await?;
        installed.install().await?;
        Ok(installed)
    }

    /// The provider's cluster as the admin, with nothing installed or changed (for a test
    /// that installs a chart of its own, such as an older release).
    pub async fn connect() -> anyhow::Result<Installed> {
        let provider = Provider::from_env()?;
        let work = std::env::temp_dir().join(format!("portassign-e2e-{}", std::process::id()));
        std::fs::create_dir_all(&work)?;
        let (kubeconfig, cluster) = match (provider, std::env::var_os("PORTASSIGN_E2E_KUBECONFIG")) {
            (_, Some(path)) => (PathBuf::from(path), None),
            (Provider::Local, None) => {
                let cluster = Cluster::own("e2e", &[]).await;
                (cluster.kubeconfig().to_owned(), Some(cluster))
            }
            (Provider::Kind, None) => {
                bail!("the kind provider needs PORTASSIGN_E2E_KUBECONFIG (hack/kind/cluster.sh up prints it)")
            }
        };
        let admin = identity_from(&kubeconfig, "admin".into()).await?;
        let range: PortRange = RANGE.parse()?;
        let mut installed = Installed {
            provider,
            admin,
            nodes: Vec::new(),
            range,
            processes: Vec::new(),
            agents: BTreeMap::new(),
            work,
            reader: None,
            _cluster: cluster,
        };
        if provider == Provider::Kind {
            installed.nodes = node_names(&installed.client()).await?;
        }
        Ok(installed)
    }

    /// The suite's reader ServiceAccount (bound by the release's httpAuth values) and its
    /// identity in `self.reader`.
    pub async fn ensure_reader(&mut self) -> anyhow::Result<()> {
        let client = self.client();
        ensure_service_account(&client, RELEASE, READER).await?;
        self.reader = Some(service_account_identity(&client, self.kubeconfig(), &self.work, RELEASE, READER).await?);
        Ok(())
    }

    /// The admin's kubeconfig.
    pub fn kubeconfig(&self) -> &Path {
        &self.admin.kubeconfig
    }

    /// A new admin client.
    pub fn client(&self) -> Client {
        self.admin.client()
    }

    /// `helm ARGS...` against the cluster, failing with helm's message.
    pub fn helm(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = Command::new(tool("helm")?).args(args).env("KUBECONFIG", self.kubeconfig()).output()?;
        text_of("helm", args, output)
    }

    /// `kubectl ARGS...` as the admin, with the `kubectl portassign` plugin on PATH: exit
    /// code, stdout, stderr.
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<(i32, String, String)> {
        let plugins = self.work.join("bin");
        if !plugins.join("kubectl-portassign").exists() {
            std::fs::create_dir_all(&plugins)?;
            std::os::unix::fs::symlink(portassign_bin(), plugins.join("kubectl-portassign"))?;
        }
        let path = format!("{}:{}", plugins.display(), std::env::var("PATH").unwrap_or_default());
        let output = Command::new(tool("kubectl")?)
            .args(args)
            .env("KUBECONFIG", self.kubeconfig())
            .env("PATH", path)
            .output()?;
        Ok((
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        ))
    }

    /// The `helm upgrade --install` values of this provider, plus `extra`.
    pub fn values(&self, extra: &[&str]) -> anyhow::Result<Vec<String>> {
        let mut values = vec![
            format!("portRange.first={}", self.range.first()),
            format!("portRange.last={}", self.range.last()),
            "logFormat=human".to_owned(),
        ];
        for role in ["metricsReaders", "tableReaders"] {
            values.push(format!("httpAuth.{role}[0].kind=ServiceAccount"));
            values.push(format!("httpAuth.{role}[0].name={READER}"));
            values.push(format!("httpAuth.{role}[0].namespace={RELEASE}"));
        }
        if self.provider == Provider::Kind {
            let image = std::env::var("PORTASSIGN_E2E_IMAGE")
                .context("the kind provider needs PORTASSIGN_E2E_IMAGE, the image loaded into the nodes")?;
            let (repository, tag) = image.rsplit_once(':').context("PORTASSIGN_E2E_IMAGE is REPOSITORY:TAG")?;
            values.push(format!("image.repository={repository}"));
            values.push(format!("image.tag={tag}"));
            values.push("image.pullPolicy=Never".to_owned());
        }
        values.extend(extra.iter().map(|v| v.to_string()));
        Ok(values)
    }

    /// `helm upgrade --install` of the chart with this provider's values plus `extra`.
    pub fn helm_upgrade(&self, extra: &[&str]) -> anyhow::Result<String> {
        let chart = chart_dir().to_string_lossy().into_owned();
        let mut args: Vec<String> = ["upgrade", "--install", RELEASE, &chart, "-n", RELEASE, "--create-namespace"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        for value in self.values(extra)? {
            args.push("--set".into());
            args.push(value);
        }
        self.helm(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }

    async fn install(&mut self) -> anyhow::Result<()> {
        // helm installs a chart's CRD only when it is absent: bring it up to date first,
        // as the README tells users to.
        portassign_testkit::cluster::install_crd(&self.client()).await?;
        // A fresh release: one left from an earlier run (a kept cluster) may be of an
        // older chart whose DaemonSet cannot be upgraded in place.
        let releases = self.helm(&["list", "-n", RELEASE, "-q"])?;
        if releases.lines().any(|r| r == RELEASE) {
            self.uninstall()?;
        }
        self.helm_upgrade(&[])?;
        self.ensure_reader().await?;
        match self.provider {
            Provider::Local => self.start_local_agents().await,
            Provider::Kind => self.wait_for_daemonset().await,
        }
    }

    /// One agent process per node and a janitor, each with a token of the release's
    /// ServiceAccounts: the chart's RBAC is all they have.
    async fn start_local_agents(&mut self) -> anyhow::Result<()> {
        let client = self.client();
        let agent_sa = service_account_identity(&client, self.kubeconfig(), &self.work, RELEASE, RELEASE).await?;
        let janitor_name = format!("{RELEASE}-janitor");
        let janitor_sa =
            service_account_identity(&client, self.kubeconfig(), &self.work, RELEASE, &janitor_name).await?;
        for node in LOCAL_NODES {
            let agent = AgentProcess::new(&agent_sa.kubeconfig, node).range(self.range).start().await;
            self.agents.insert(node.to_owned(), agent);
            self.nodes.push(node.to_owned());
        }
        // A grace of an hour: it takes its Lease and sweeps, but releases nothing.
        let args = [
            "janitor",
            "--grace",
            "3600",
            "--interval",
            "1",
            "--lease-namespace",
            RELEASE,
            "--pod-name",
            "e2e-janitor",
        ];
        let mut janitor = Process::new(&janitor_sa.kubeconfig, "e2e-janitor", &args);
        janitor.spawn();
        self.processes.push(janitor);
        Ok(())
    }

    /// Every node runs a Ready agent pod of the DaemonSet.
    async fn wait_for_daemonset(&mut self) -> anyhow::Result<()> {
        // `connect` listed them.
        ensure!(!self.nodes.is_empty(), "the kind cluster has no nodes");
        self.rolled_out().await;
        Ok(())
    }

    /// Waits until the DaemonSet's rollout is complete: every node runs an up-to-date,
    /// Ready and available agent.
    pub async fn rolled_out(&self) {
        let daemonsets: Api<DaemonSet> = Api::namespaced(self.client(), RELEASE);
        let want = i32::try_from(self.nodes.len()).unwrap_or(i32::MAX);
        eventually("the DaemonSet rolled out on every node", TIMEOUT, || async {
            let ds = daemonsets.get(RELEASE).await.ok()?;
            let status = ds.status?;
            (status.observed_generation == ds.metadata.generation
                && status.desired_number_scheduled == want
                && status.updated_number_scheduled == Some(want)
                && status.number_ready == want
                && status.number_available == Some(want))
            .then_some(())
        })
        .await;
    }

    /// Every line the agents and the janitor logged that says the API server refused a
    /// call (their RBAC lacks a permission).
    pub async fn refusals(&mut self) -> anyhow::Result<Vec<String>> {
        let mut logs = Vec::new();
        match self.provider {
            Provider::Local => {
                for agent in self.agents.values_mut() {
                    ensure!(agent.is_running(), "the agent for {} exited: {}", agent.node, agent.log_path().display());
                    logs.push(agent.log());
                }
                for process in &mut self.processes {
                    ensure!(process.is_running(), "{} exited", process.log_path().display());
                    logs.push(process.log());
                }
            }
            Provider::Kind => {
                let pods: Api<Pod> = Api::namespaced(self.client(), RELEASE);
                let nodes = node_names(&self.client()).await?;
                for pod in pods.list(&ListParams::default()).await?.items {
                    let name = pod.name_any();
                    // A pod of a node that was deleted has no kubelet to serve its log.
                    let node = pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default();
                    if !node.is_empty() && !nodes.contains(&node) {
                        println!("(log of {name} not readable: its node {node} is gone)");
                        continue;
                    }
                    // Every container (the agent pod has the kubelet plugin too), and every
                    // restart: the previous container's log, if any.
                    let containers: Vec<String> =
                        pod.spec.iter().flat_map(|s| s.containers.iter().map(|c| c.name.clone())).collect();
                    for container in containers {
                        let params = LogParams { container: Some(container.clone()), ..Default::default() };
                        if let Ok(previous) = pods.logs(&name, &LogParams { previous: true, ..params.clone() }).await {
                            logs.push(previous);
                        }
                        logs.push(
                            pods.logs(&name, &params).await.with_context(|| format!("logs of {name}/{container}"))?,
                        );
                    }
                }
            }
        }
        Ok(logs
            .iter()
            .flat_map(|log| log.lines())
            .filter(|line| {
                let line = line.to_ascii_lowercase();
                line.contains("forbidden") || line.contains("unauthorized")
            })
            .map(str::to_owned)
            .collect())
    }

    /// Uninstalls the release (the CRD stays, as with every chart's crds/).
    pub fn uninstall(&self) -> anyhow::Result<()> {
        self.helm(&["uninstall", RELEASE, "-n", RELEASE, "--wait"])?;
        Ok(())
    }
}

/// Each node's InternalIP.
pub async fn node_addresses(nodes: &Api<Node>) -> BTreeMap<String, String> {
    let mut addresses = BTreeMap::new();
    for node in nodes.list(&ListParams::default()).await.expect("nodes").items {
        let ip = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .and_then(|a| a.iter().find(|a| a.type_ == "InternalIP"))
            .map(|a| a.address.clone())
            .expect("an InternalIP");
        addresses.insert(node.name_any(), ip);
    }
    addresses
}

/// The names of the cluster's nodes.
async fn node_names(client: &Client) -> anyhow::Result<Vec<String>> {
    Ok(Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .map(|n| n.name_any())
        .collect())
}

fn text_of(program: &str, args: &[&str], output: Output) -> anyhow::Result<String> {
    if !output.status.success() {
        bail!("{program} {} failed: {}", args.join(" "), String::from_utf8_lossy(&output.stderr));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// An example manifest from `examples/`, as a typed object for `node`.
pub fn example(file: &str, name: &str, node: &str) -> anyhow::Result<portassign::api::PortAssignment> {
    let path = portassign_testkit::repo_root().join("examples").join(file);
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut object: portassign::api::PortAssignment =
        serde_saphyr::from_str(&text).with_context(|| format!("{} is not a PortAssignment", path.display()))?;
    ensure!(object.spec.node_name == "NODE_NAME", "{file} no longer has the NODE_NAME placeholder");
    object.spec.node_name = node.to_owned();
    object.metadata.name = Some(name.to_owned());
    Ok(object)
}
