//! One test's world: a namespace of its own and a node name no other test uses, on a
//! prepared [`Cluster`], with in-process agents that run as the chart's ServiceAccount.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU16, Ordering},
    },
    time::Duration,
};

use k8s_openapi::api::{
    core::v1::{Namespace, Pod},
    events::v1::Event,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use portassign::{
    agent::{
        self, Running,
        probe::{PortProbe, SocketProbe},
    },
    api::{PortAssignment, PortAssignmentSpec, Protocol},
    range::{PortPool, PortRange},
};

use crate::{
    cluster::{Cluster, Identity, ensure_namespace},
    wait::{eventually, ports_of},
};

/// Turns on the product's logs once per process (they land in the test's captured output).
pub(crate) fn init_logs() {
    portassign::telemetry::init(portassign::telemetry::LogFormat::Human);
}

/// A distinct block of `size` ports for one test, inside the agent's default range so it
/// stays clear of the kernel's ephemeral ports.
pub fn port_block(size: u16) -> PortRange {
    static NEXT: AtomicU16 = AtomicU16::new(21000);
    let first = NEXT.fetch_add(size, Ordering::SeqCst);
    assert!(first + size <= 30000, "tests asked for more ports than 21000-29999 holds");
    PortRange::new(first, first + size - 1).expect("port block")
}

/// A unique, DNS-safe name with a prefix.
pub fn unique(prefix: &str) -> String {
    static SEQ: AtomicU16 = AtomicU16::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
    format!("{prefix}-{}-{:x}{:x}", std::process::id() % 10000, SEQ.fetch_add(1, Ordering::SeqCst), nanos % 0xffff)
}

/// Keys `prefix-0` .. `prefix-(n-1)`.
pub fn keys(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// One test's world.
pub struct World {
    /// Admin client: for the test's own setup and assertions only.
    pub client: Client,
    /// The test's namespace.
    pub ns: String,
    /// The node the test's agent serves.
    pub node: String,
    /// The chart's agent ServiceAccount: what every agent the world starts runs as.
    pub agent_identity: Identity,
    /// The chart's janitor ServiceAccount.
    pub janitor_identity: Identity,
    /// Allowed to read the agents' `/metrics` and `/debug/table` (the chart's reader roles).
    pub reader_identity: Identity,
    /// Namespace of the chart's ServiceAccounts (and of the janitor's Lease).
    pub system_namespace: String,
}

impl World {
    /// A world on the cluster the process shares.
    pub async fn new(test: &str) -> Self {
        Self::on(Cluster::shared().await, test).await
    }

    /// A world on `cluster`.
    pub async fn on(cluster: &Cluster, test: &str) -> Self {
        let client = cluster.admin.client();
        let ns = unique(test);
        ensure_namespace(&client, &ns).await.expect("create the test's namespace");
        World {
            client,
            ns,
            node: unique(&format!("{test}-node")),
            agent_identity: cluster.agent.clone(),
            janitor_identity: cluster.janitor.clone(),
            reader_identity: cluster.reader.clone(),
            system_namespace: cluster.namespace.clone(),
        }
    }

    /// The PortAssignment API of the test's namespace (admin).
    pub fn api(&self) -> Api<PortAssignment> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// Starts an in-process agent for the test's node with the real socket probe.
    pub async fn agent(&self, range: PortRange) -> Running {
        self.agent_for(&self.node, range, Arc::new(SocketProbe::detect())).await
    }

    /// Starts an in-process agent for `node` with `probe`, as the chart's ServiceAccount,
    /// and waits until it is ready.
    pub async fn agent_for(&self, node: &str, range: PortRange, probe: Arc<dyn PortProbe>) -> Running {
        self.agent_with(node, range.into(), probe).await
    }

    /// Starts an in-process agent for `node` assigning from `pool` (several ranges minus
    /// exclusions) with `probe`, as the chart's ServiceAccount, and waits until it is ready.
    pub async fn agent_with(&self, node: &str, pool: PortPool, probe: Arc<dyn PortProbe>) -> Running {
        self.agent_as(&self.agent_identity, self.agent_config(node, pool), probe).await
    }

    /// The settings of the kit's in-process agents for `node` (defaults otherwise),
    /// assigning from `pool` (a range, or several minus exclusions).
    pub fn agent_config(&self, node: &str, pool: impl Into<PortPool>) -> agent::Config {
        agent::Config {
            node_name: node.to_owned(),
            pool: pool.into(),
            concurrency: 16,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            instance: Some(format!("test-{node}")),
            lock_name: None,
            retry: agent::backoff::Policy::default(),
            writes: agent::throttle::Rate::default(),
            http: Default::default(),
            faults: Default::default(),
            dra: None,
        }
    }

    /// Starts an in-process agent with `config` and the real socket probe as `identity`
    /// (a ServiceAccount of the kit, never the admin), and waits until it is ready.
    pub async fn agent_as(&self, identity: &Identity, config: agent::Config, probe: Arc<dyn PortProbe>) -> Running {
        let running = agent::start(identity.client(), config, probe).await.expect("start agent");
        eventually("agent ready", Duration::from_secs(30), || async { running.is_ready().then_some(()) }).await;
        running
    }

    /// Creates a PortAssignment for the test's node.
    pub async fn create(&self, name: &str, keys: &[&str]) -> PortAssignment {
        self.create_for(&self.node, name, Protocol::Tcp, keys).await
    }

    /// Creates a PortAssignment for `node`.
    pub async fn create_for(&self, node: &str, name: &str, protocol: Protocol, keys: &[&str]) -> PortAssignment {
        let object = PortAssignment::new(
            name,
            PortAssignmentSpec {
                node_name: node.to_owned(),
                protocol,
                keys: keys.iter().map(|k| k.to_string()).collect(),
            },
        );
        self.api().create(&PostParams::default(), &object).await.unwrap_or_else(|e| panic!("create {name}: {e}"))
    }

    /// Creates a Pod in the test's namespace already bound to `node` (`spec.nodeName` set,
    /// as the scheduler would; no kubelet runs it), with `spec` merged in.
    pub async fn create_pod(&self, node: &str, name: &str, spec: serde_json::Value) -> Pod {
        let mut pod_spec =
            serde_json::json!({ "nodeName": node, "containers": [{ "name": "main", "image": "pause" }] });
        if let (Some(base), Some(extra)) = (pod_spec.as_object_mut(), spec.as_object()) {
            base.extend(extra.clone());
        }
        let pod: Pod = serde_json::from_value(serde_json::json!({ "metadata": { "name": name }, "spec": pod_spec }))
            .expect("a Pod manifest");
        self.pods().create(&PostParams::default(), &pod).await.unwrap_or_else(|e| panic!("create pod {name}: {e}"))
    }

    /// The Pod API of the test's namespace (admin).
    pub fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// Sets a pod's `status.phase` through the status subresource, as the kubelet would.
    pub async fn set_pod_phase(&self, name: &str, phase: &str) {
        let patch = serde_json::json!({ "status": { "phase": phase } });
        self.pods().patch_status(name, &PatchParams::default(), &Patch::Merge(patch)).await.expect("set pod phase");
    }

    /// Replaces the keys of an object.
    pub async fn set_keys(&self, name: &str, keys: &[&str]) {
        let patch = serde_json::json!({ "spec": { "keys": keys } });
        self.api().patch(name, &PatchParams::default(), &Patch::Merge(patch)).await.expect("set keys");
    }

    /// Waits until the object is Ready with a port for every key, and returns key→port.
    pub async fn ready_ports(&self, name: &str) -> BTreeMap<String, u16> {
        let api = self.api();
        eventually(&format!("{name} Ready"), Duration::from_secs(60), || async {
            let object = api.get(name).await.ok()?;
            object.is_ready().then(|| ports_of(&object))
        })
        .await
    }

    /// Waits until the object no longer exists.
    pub async fn gone(&self, name: &str) {
        let api = self.api();
        eventually(&format!("{name} deleted"), Duration::from_secs(60), || async {
            matches!(api.get_opt(name).await, Ok(None)).then_some(())
        })
        .await
    }

    /// Deletes an object (the agent's finalizer then releases its ports).
    pub async fn delete(&self, name: &str) {
        self.api().delete(name, &DeleteParams::default()).await.expect("delete");
    }

    /// Deletes an object without its finalizer running: strips every finalizer and deletes
    /// it at exactly that version, retrying if an agent put its finalizer back in between.
    /// The object is gone afterwards and no cleanup of the agent saw it.
    pub async fn force_delete(&self, name: &str) {
        let api = self.api();
        for _ in 0..100 {
            let strip = serde_json::json!({ "metadata": { "finalizers": null } });
            let stripped =
                api.patch(name, &PatchParams::default(), &Patch::Merge(strip)).await.expect("strip finalizers");
            let at_version = DeleteParams {
                preconditions: Some(kube::api::Preconditions {
                    resource_version: stripped.resource_version(),
                    uid: stripped.uid(),
                }),
                ..DeleteParams::default()
            };
            match api.delete(name, &at_version).await {
                Ok(_) => return self.gone(name).await,
                Err(kube::Error::Api(e)) if e.code == 409 => continue,
                Err(e) => panic!("delete {name}: {e}"),
            }
        }
        panic!("could not delete {name} without its finalizer in 100 tries");
    }

    /// Reason and note of every event recorded for an object.
    pub async fn events(&self, name: &str) -> Vec<(String, String)> {
        let events: Api<Event> = Api::namespaced(self.client.clone(), &self.ns);
        let list = events.list(&Default::default()).await.expect("list events");
        list.items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
            .collect()
    }

    /// Waits for an event of `reason` on an object (events are published after the status
    /// they describe) and returns its note.
    pub async fn event(&self, name: &str, reason: &str) -> String {
        eventually(&format!("a {reason} event on {name}"), Duration::from_secs(20), || async {
            self.events(name).await.into_iter().find(|(r, _)| r == reason).map(|(_, note)| note)
        })
        .await
    }

    /// Deletes the namespace (objects in it are deleted with it where a namespace
    /// controller runs; the local control plane has none, so delete objects first).
    pub async fn cleanup(self) {
        // Objects whose agent is gone would keep their finalizer forever: drop it.
        if let Ok(list) = self.api().list(&Default::default()).await {
            for object in list.items {
                let name = object.name_any();
                let patch = serde_json::json!({ "metadata": { "finalizers": null } });
                let _ = self.api().patch(&name, &PatchParams::default(), &Patch::Merge(patch)).await;
                let _ = self.api().delete(&name, &DeleteParams::default()).await;
            }
        }
        let _ = self.pods().delete_collection(&DeleteParams::default().grace_period(0), &Default::default()).await;
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        let _ = namespaces.delete(&self.ns, &DeleteParams::default()).await;
    }
}
