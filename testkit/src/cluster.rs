//! A real kube-apiserver + etcd for the tests, prepared as the chart prepares a cluster:
//! the CRD, and the chart's ServiceAccounts bound by the chart's rendered RBAC.
//!
//! With `PORTASSIGN_TEST_KUBECONFIG` set, the shared cluster is that one (`make test`
//! starts one local control plane and shares it this way). Otherwise each test process
//! starts its own with `hack/control-plane.sh`, stopped when the process exits. If no
//! control plane can be started the tests fail, saying why: they never skip.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, anyhow, bail};
use k8s_openapi::{
    api::{
        authentication::v1::{SelfSubjectReview, TokenRequest, TokenRequestSpec},
        core::v1::{Namespace, ServiceAccount},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, Config, CustomResourceExt, ResourceExt,
    api::{DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    discovery::ApiResource,
    runtime::wait::{await_condition, conditions},
};
use portassign::api::PortAssignment;
use serde_json::json;
use tokio::sync::OnceCell;

use crate::chart;

/// Field manager of the kit's own setup writes.
const FIELD_MANAGER: &str = "portassign-testkit";
/// How long minted ServiceAccount tokens live: longer than the longest test.
const TOKEN_SECONDS: i64 = 4 * 3600;

/// Credentials of one identity: a kubeconfig file (for processes) and its client config.
#[derive(Clone)]
pub struct Identity {
    /// The user name the API server sees (`system:serviceaccount:NS:NAME` for the chart's).
    pub user: String,
    /// A kubeconfig file with these credentials.
    pub kubeconfig: PathBuf,
    config: Config,
}

impl Identity {
    /// A new client with these credentials (clients belong to the runtime that made them,
    /// and every test has its own runtime).
    pub fn client(&self) -> Client {
        Client::try_from(self.config.clone()).expect("client from a kubeconfig the kit wrote")
    }

    /// The bearer token of these credentials, as `portassign check` finds it.
    pub fn token(&self) -> String {
        portassign::checker::caller_token(&self.config, None).expect("a kit identity with a bearer token")
    }
}

/// A prepared cluster: admin credentials for the tests, the chart's ServiceAccounts for
/// the agents and janitors they start.
pub struct Cluster {
    /// Cluster admin: only for the test's own setup and assertions.
    pub admin: Identity,
    /// The chart's agent ServiceAccount, with the chart's RBAC.
    pub agent: Identity,
    /// The chart's janitor ServiceAccount, with the chart's RBAC.
    pub janitor: Identity,
    /// A ServiceAccount of the kit bound (through the chart's httpAuth values) to the
    /// chart's metrics-reader and table-reader ClusterRoles: what reads the agents'
    /// `/metrics` and `/debug/table`.
    pub reader: Identity,
    /// The namespace of the chart's ServiceAccounts (and of the janitor's Lease).
    pub namespace: String,
    plane: Option<PathBuf>,
}

impl Cluster {
    /// The cluster every test of this process shares.
    pub async fn shared() -> &'static Cluster {
        static SHARED: OnceCell<Cluster> = OnceCell::const_new();
        SHARED
            .get_or_init(|| async {
                crate::world::init_logs();
                let kubeconfig = match std::env::var_os("PORTASSIGN_TEST_KUBECONFIG") {
                    Some(path) => PathBuf::from(path),
                    None => {
                        let dir = std::env::temp_dir().join(format!("portassign-test-{}", std::process::id()));
                        start_control_plane(&dir, &[]).unwrap_or_else(|why| {
                            panic!(
                                "no control plane for the tests: {why}\n\
                                 Build the tools with `make tools`, or point PORTASSIGN_TEST_KUBECONFIG at a cluster."
                            )
                        })
                    }
                };
                Cluster::prepare(&kubeconfig, None)
                    .await
                    .unwrap_or_else(|e| panic!("preparing the test cluster: {e:#}"))
            })
            .await
    }

    /// A control plane of the test's own (for tests that restart it, act cluster-wide, or
    /// need it reachable from network namespaces), stopped when dropped. `env` adds
    /// variables for `hack/control-plane.sh` (bind address, SANs).
    pub async fn own(name: &str, env: &[(&str, &str)]) -> Cluster {
        crate::world::init_logs();
        let dir = std::env::temp_dir().join(format!("portassign-{name}-{}", std::process::id()));
        let kubeconfig =
            start_control_plane(&dir, env).unwrap_or_else(|why| panic!("could not start a control plane: {why}"));
        Cluster::prepare(&kubeconfig, Some(dir)).await.unwrap_or_else(|e| panic!("preparing {name}'s cluster: {e:#}"))
    }

    /// Prepares the cluster of `kubeconfig` (admin credentials): the CRD, the chart's
    /// RBAC and ServiceAccounts, a token for each.
    pub async fn prepare(kubeconfig: &Path, plane: Option<PathBuf>) -> anyhow::Result<Cluster> {
        let admin = identity_from(kubeconfig, "admin".into()).await?;
        let client = admin.client();
        install_crd(&client).await?;
        let namespace = chart::NAMESPACE.to_owned();
        let subject = |role: &str| {
            [
                format!("httpAuth.{role}[0].kind=ServiceAccount"),
                format!("httpAuth.{role}[0].name={READER}"),
                format!("httpAuth.{role}[0].namespace={namespace}"),
            ]
        };
        // The DRA driver's RBAC too (on by default where the API server serves
        // resource.k8s.io/v1): tests/dra.rs runs an agent with it, tests/rbac.rs proves it.
        let mut values = vec!["janitor.enabled=true".to_owned(), "dra.enabled=true".to_owned()];
        values.extend(subject("metricsReaders"));
        values.extend(subject("tableReaders"));
        let values: Vec<&str> = values.iter().map(String::as_str).collect();
        let rendered = chart::render(&namespace, &values)?;
        apply_rbac(&client, &namespace, &rendered).await?;
        ensure_service_account(&client, &namespace, READER).await?;
        let dir = match &plane {
            Some(dir) => dir.clone(),
            None => std::env::temp_dir().join(format!("portassign-identities-{}", std::process::id())),
        };
        std::fs::create_dir_all(&dir)?;
        let agent_sa = chart::service_account_of(&rendered, "DaemonSet")?;
        let janitor_sa = chart::service_account_of(&rendered, "Deployment")?;
        let agent = service_account_identity(&client, kubeconfig, &dir, &namespace, &agent_sa).await?;
        let janitor = service_account_identity(&client, kubeconfig, &dir, &namespace, &janitor_sa).await?;
        let reader = service_account_identity(&client, kubeconfig, &dir, &namespace, READER).await?;
        Ok(Cluster { admin, agent, janitor, reader, namespace, plane })
    }

    /// The kubeconfig of the admin (for the test's own commands, such as `kubectl`).
    pub fn kubeconfig(&self) -> &Path {
        &self.admin.kubeconfig
    }

    /// The directory of this test's own control plane, if it has one.
    pub fn plane_dir(&self) -> Option<&Path> {
        self.plane.as_deref()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(dir) = &self.plane {
            let _ = Command::new(crate::repo_root().join("hack/control-plane.sh")).arg("down").arg(dir).output();
        }
    }
}

/// Starts etcd + kube-apiserver with `hack/control-plane.sh up DIR` (stopped when this
/// process exits) and returns the kubeconfig path.
fn start_control_plane(dir: &Path, env: &[(&str, &str)]) -> Result<PathBuf, String> {
    let output = Command::new(crate::repo_root().join("hack/control-plane.sh"))
        .arg("up")
        .arg(dir)
        .env("PORTASSIGN_OWNER_PID", std::process::id().to_string())
        .envs(env.iter().copied())
        .output()
        .map_err(|e| format!("cannot run hack/control-plane.sh: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "hack/control-plane.sh up failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&output.stdout).trim().lines().last().unwrap_or_default()))
}

/// Kills the etcd and kube-apiserver of the control plane in `dir` with `signal` and
/// starts them again on the same data.
pub fn restart_control_plane(dir: &Path, signal: &str) {
    let output = Command::new(crate::repo_root().join("hack/control-plane.sh"))
        .arg("restart")
        .arg(dir)
        .arg(signal)
        .output()
        .expect("run hack/control-plane.sh restart");
    assert!(output.status.success(), "control plane restart failed: {}", String::from_utf8_lossy(&output.stderr));
}

/// The identity whose credentials `kubeconfig` holds, named `user`.
pub async fn identity_from(kubeconfig: &Path, user: String) -> anyhow::Result<Identity> {
    let file = Kubeconfig::read_from(kubeconfig).with_context(|| format!("reading {}", kubeconfig.display()))?;
    let config = Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
        .await
        .with_context(|| format!("bad kubeconfig {}", kubeconfig.display()))?;
    Ok(Identity { user, kubeconfig: kubeconfig.to_owned(), config })
}

/// Installs the CRD from the Rust types (the committed YAML is checked against them) and
/// waits until PortAssignments are served.
pub async fn install_crd(client: &Client) -> anyhow::Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = PortAssignment::crd();
    let name = crd.name_any();
    crds.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&crd))
        .await
        .context("installing the CRD")?;
    tokio::time::timeout(Duration::from_secs(30), await_condition(crds, &name, conditions::is_crd_established()))
        .await
        .context("CRD not established within 30s")??;
    // Established can precede discovery by a moment.
    let api: Api<PortAssignment> = Api::all(client.clone());
    for _ in 0..50 {
        if api.list(&Default::default()).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("PortAssignments not served 5s after the CRD became established")
}

/// The kit's ServiceAccount that reads the agents' `/metrics` and `/debug/table`.
pub const READER: &str = "portassign-test-reader";

/// Creates the ServiceAccount `namespace/name` unless it exists.
pub async fn ensure_service_account(client: &Client, namespace: &str, name: &str) -> anyhow::Result<()> {
    let mut account = ServiceAccount::default();
    account.metadata.name = Some(name.to_owned());
    create_unless_exists(
        Api::namespaced(client.clone(), namespace),
        account,
        &format!("ServiceAccount {namespace}/{name}"),
    )
    .await
}

/// Creates `name` unless it exists.
pub async fn ensure_namespace(client: &Client, name: &str) -> anyhow::Result<()> {
    let mut namespace = Namespace::default();
    namespace.metadata.name = Some(name.to_owned());
    create_unless_exists(Api::all(client.clone()), namespace, &format!("namespace {name}")).await
}

async fn create_unless_exists<K>(api: Api<K>, object: K, what: &str) -> anyhow::Result<()>
where
    K: kube::Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.create(&PostParams::default(), &object).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(anyhow!("creating {what}: {e}")),
    }
}

/// The RBAC kinds taken from the rendered chart: (kind, apiVersion group/version, plural).
const RBAC_KINDS: [(&str, &str, &str, &str); 5] = [
    ("ServiceAccount", "", "v1", "serviceaccounts"),
    ("ClusterRole", "rbac.authorization.k8s.io", "v1", "clusterroles"),
    ("ClusterRoleBinding", "rbac.authorization.k8s.io", "v1", "clusterrolebindings"),
    ("Role", "rbac.authorization.k8s.io", "v1", "roles"),
    ("RoleBinding", "rbac.authorization.k8s.io", "v1", "rolebindings"),
];

/// Applies the rendered chart's ServiceAccounts and RBAC, exactly as rendered.
async fn apply_rbac(client: &Client, namespace: &str, rendered: &[serde_json::Value]) -> anyhow::Result<()> {
    ensure_namespace(client, namespace).await?;
    let mut applied = 0;
    for (kind, group, version, plural) in RBAC_KINDS {
        let resource = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural);
        for object in chart::of_kind(rendered, kind) {
            let object: DynamicObject = serde_json::from_value(object.clone())?;
            let name = object.name_any();
            let api: Api<DynamicObject> = match object.namespace() {
                Some(ns) => Api::namespaced_with(client.clone(), &ns, &resource),
                None => Api::all_with(client.clone(), &resource),
            };
            api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&object))
                .await
                .with_context(|| format!("applying the chart's {kind} {name}"))?;
            applied += 1;
        }
    }
    anyhow::ensure!(applied >= 5, "the chart rendered only {applied} RBAC objects");
    Ok(())
}

/// Mints a token for the ServiceAccount `namespace/name` (TokenRequest, as the kubelet
/// does for a pod), writes a kubeconfig with it into `dir`, and checks the API server
/// sees that identity. `client` and `admin_kubeconfig` are the admin's.
pub async fn service_account_identity(
    client: &Client,
    admin_kubeconfig: &Path,
    dir: &Path,
    namespace: &str,
    name: &str,
) -> anyhow::Result<Identity> {
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let request = TokenRequest {
        spec: TokenRequestSpec { expiration_seconds: Some(TOKEN_SECONDS), ..Default::default() },
        ..Default::default()
    };
    let minted: TokenRequest = accounts
        .create_subresource("token", name, &PostParams::default(), &request)
        .await
        .with_context(|| format!("minting a token for {namespace}/{name}"))?;
    let token = minted.status.map(|s| s.token).context("TokenRequest without a token")?;

    let admin = Kubeconfig::read_from(admin_kubeconfig)?;
    let context = admin
        .contexts
        .iter()
        .find(|c| Some(&c.name) == admin.current_context.as_ref())
        .and_then(|c| c.context.as_ref())
        .context("the admin kubeconfig has no current context")?;
    let cluster = admin
        .clusters
        .iter()
        .find(|c| c.name == context.cluster)
        .context("the admin kubeconfig's context names no cluster")?;
    let user = format!("system:serviceaccount:{namespace}:{name}");
    let file = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [cluster],
        "users": [{ "name": name, "user": { "token": token } }],
        "contexts": [{ "name": name, "context": { "cluster": cluster.name, "user": name } }],
        "current-context": name,
    });
    let path = dir.join(format!("{namespace}-{name}.kubeconfig"));
    std::fs::write(&path, serde_json::to_vec_pretty(&file)?).with_context(|| format!("writing {}", path.display()))?;
    let identity = identity_from(&path, user.clone()).await?;

    let review: SelfSubjectReview = serde_json::from_value(json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"
    }))?;
    let reviewed = Api::<SelfSubjectReview>::all(identity.client())
        .create(&PostParams::default(), &review)
        .await
        .with_context(|| format!("asking who {} is", path.display()))?;
    let seen = reviewed.status.and_then(|s| s.user_info).and_then(|u| u.username).unwrap_or_default();
    anyhow::ensure!(seen == user, "the token minted for {namespace}/{name} authenticates as {seen:?}");
    Ok(identity)
}
