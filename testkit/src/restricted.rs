//! An agent identity with one permission less than the chart grants: a ServiceAccount of
//! its own, bound to a copy of the chart's agent ClusterRole without `patch` on one
//! resource, and later given the chart's full role back (a binding to the chart's own
//! ClusterRole). The chart's RBAC is left untouched, so other tests and agents sharing
//! the API server keep theirs.

use anyhow::{Context as _, ensure};
use k8s_openapi::api::{
    core::v1::ServiceAccount,
    rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, RoleRef, Subject},
};
use kube::{
    Api, Client,
    api::{DeleteParams, PostParams},
};

use crate::{
    cluster::{Cluster, Identity, service_account_identity},
    world::unique,
};

/// A ServiceAccount with the chart's agent permissions minus `patch` on one resource.
pub struct Restricted {
    /// Its credentials (a minted token).
    pub identity: Identity,
    name: String,
    namespace: String,
    chart_role: String,
    client: Client,
}

impl Restricted {
    /// Creates the ServiceAccount, the reduced ClusterRole and its binding on `cluster`
    /// (`without` is a resource such as `portassignments/status`).
    pub async fn new(cluster: &Cluster, without: &str) -> anyhow::Result<Restricted> {
        let client = cluster.admin.client();
        let chart_sa = cluster.agent.user.rsplit(':').next().unwrap_or_default().to_owned();
        let bindings: Api<ClusterRoleBinding> = Api::all(client.clone());
        let chart_role = bindings
            .list(&Default::default())
            .await?
            .items
            .into_iter()
            .find(|b| {
                b.subjects.iter().flatten().any(|s| {
                    s.kind == "ServiceAccount"
                        && s.name == chart_sa
                        && s.namespace.as_deref() == Some(&cluster.namespace)
                })
            })
            .map(|b| b.role_ref.name)
            .context("the chart binds no ClusterRole to the agent's ServiceAccount")?;
        let roles: Api<ClusterRole> = Api::all(client.clone());
        let chart_rules = roles.get(&chart_role).await?.rules.unwrap_or_default();
        let rules = without_patch(&chart_rules, without);
        ensure!(rules != chart_rules, "the chart's role grants no patch on {without}");

        let name = unique("restricted-agent");
        let namespace = cluster.namespace.clone();
        let mut role = ClusterRole::default();
        role.metadata.name = Some(name.clone());
        role.rules = Some(rules);
        roles.create(&PostParams::default(), &role).await.context("creating the reduced ClusterRole")?;
        let mut account = ServiceAccount::default();
        account.metadata.name = Some(name.clone());
        Api::<ServiceAccount>::namespaced(client.clone(), &namespace)
            .create(&PostParams::default(), &account)
            .await
            .context("creating the ServiceAccount")?;
        bind(&client, &name, &namespace, &name, &name).await?;
        let identity =
            service_account_identity(&client, cluster.kubeconfig(), &std::env::temp_dir(), &namespace, &name).await?;
        Ok(Restricted { identity, name, namespace, chart_role, client })
    }

    /// Binds the ServiceAccount to the chart's own agent ClusterRole as well.
    pub async fn grant_back(&self) -> anyhow::Result<()> {
        bind(&self.client, &format!("{}-granted", self.name), &self.namespace, &self.name, &self.chart_role).await
    }

    /// Deletes what [`Restricted::new`] and [`Restricted::grant_back`] created.
    pub async fn remove(self) {
        let bindings: Api<ClusterRoleBinding> = Api::all(self.client.clone());
        let _ = bindings.delete(&self.name, &DeleteParams::default()).await;
        let _ = bindings.delete(&format!("{}-granted", self.name), &DeleteParams::default()).await;
        let _ = Api::<ClusterRole>::all(self.client.clone()).delete(&self.name, &DeleteParams::default()).await;
        let _ = Api::<ServiceAccount>::namespaced(self.client.clone(), &self.namespace)
            .delete(&self.name, &DeleteParams::default())
            .await;
    }
}

/// `rules` with `patch` on `resource` taken out: a rule granting it is split so the
/// other resources keep every verb and `resource` keeps every verb but `patch`.
pub fn without_patch(rules: &[PolicyRule], resource: &str) -> Vec<PolicyRule> {
    let mut kept = Vec::new();
    for rule in rules {
        let resources = rule.resources.clone().unwrap_or_default();
        if !resources.iter().any(|r| r == resource) || !rule.verbs.iter().any(|v| v == "patch") {
            kept.push(rule.clone());
            continue;
        }
        let others: Vec<String> = resources.into_iter().filter(|r| r != resource).collect();
        if !others.is_empty() {
            kept.push(PolicyRule { resources: Some(others), ..rule.clone() });
        }
        let verbs: Vec<String> = rule.verbs.iter().filter(|v| *v != "patch").cloned().collect();
        if !verbs.is_empty() {
            kept.push(PolicyRule { resources: Some(vec![resource.to_owned()]), verbs, ..rule.clone() });
        }
    }
    kept
}

async fn bind(client: &Client, binding: &str, namespace: &str, account: &str, role: &str) -> anyhow::Result<()> {
    let mut object = ClusterRoleBinding {
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: role.into(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: account.to_owned(),
            namespace: Some(namespace.to_owned()),
            ..Default::default()
        }]),
        ..Default::default()
    };
    object.metadata.name = Some(binding.to_owned());
    Api::<ClusterRoleBinding>::all(client.clone())
        .create(&PostParams::default(), &object)
        .await
        .with_context(|| format!("creating ClusterRoleBinding {binding}"))?;
    Ok(())
}
