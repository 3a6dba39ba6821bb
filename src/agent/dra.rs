//! The agent's part of Dynamic Resource Allocation: the node's ResourceSlice, and the
//! local socket on which the kubelet plugin asks for a claim's ports.
//!
//! The node's pool is one ResourceSlice with one shared device ([`dra::DEVICE`]) whose
//! consumable capacity ([`dra::CAPACITY`]) is the size of the claims' port range: the
//! scheduler counts, and places a pod only where its claim still fits. The number is the
//! agent's choice, made when the kubelet prepares the claim, by the same path as every
//! key's port: the claim gets a PortAssignment of its own (in the claim's namespace,
//! owned by the claim, labelled [`dra::CLAIM_LABEL`]) whose keys are the claim's
//! requests; the controller reserves each port from the claims' pool (bind-verified,
//! held in memory), records it in the status, and only then does prepare answer. So a
//! restarted agent rebuilds claims' ports from the statuses like every other, `portassign
//! port N` names the claim's object, and deleting the claim (the pod's, with the pod)
//! deletes the object through the garbage collector, whose finalizer releases the ports.

use std::{collections::BTreeMap, path::PathBuf, sync::Arc, time::Duration};

use axum::{Json, Router, extract::State, http::StatusCode, routing::post};
use k8s_openapi::{
    api::resource::v1::{
        CapacityRequestPolicy, CapacityRequestPolicyRange, Device, DeviceCapacity, ResourceClaim, ResourcePool,
        ResourceSlice, ResourceSliceSpec,
    },
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{ObjectMeta, OwnerReference},
    },
};
use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions},
    core::DeserializeGuard,
    runtime::{
        events::{Event, EventType},
        reflector::{ObjectRef, Store},
    },
};
use portassign_api::{
    PortAssignment, PortAssignmentSpec, Protocol,
    dra::{self, ClaimRef, Failure, Prepared, PreparedDevice},
    range::PortPool,
};
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::context::{Context, reference_to};

/// Field manager of the agent's ResourceSlices.
const MANAGER: &str = "portassign-agent";
/// Longest a prepare waits for the claim's ports to be recorded.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(60);
/// Most ports one request may consume (a claim asking for more is refused).
const MAX_PORTS_PER_REQUEST: u64 = 64;

/// Settings of the agent's DRA driver.
#[derive(Clone, Debug)]
pub struct Config {
    /// The ports claims are given: disjoint from the keys' pool.
    pub pool: PortPool,
    /// The Unix socket the kubelet plugin reaches the agent on.
    pub socket: PathBuf,
}

/// Why a claim could not be prepared or unprepared (the kubelet retries).
#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("ResourceClaim {0} not found")]
    ClaimNotFound(String),
    #[error("ResourceClaim {claim} has UID {found}, not {wanted}: the claim was replaced")]
    ClaimReplaced { claim: String, found: String, wanted: String },
    #[error("ResourceClaim {claim} has no device of driver {driver} allocated from pool {pool}")]
    NotAllocatedHere { claim: String, driver: &'static str, pool: String },
    #[error("request {request} of ResourceClaim {claim} consumes {ports} ports; at most {MAX_PORTS_PER_REQUEST}")]
    TooMany { claim: String, request: String, ports: String },
    #[error("PortAssignment {0} belongs to another ResourceClaim of that name (still being deleted?)")]
    NameTaken(String),
    #[error(
        "the ports of ResourceClaim {claim} were not recorded within {PREPARE_TIMEOUT:?} (see PortAssignment {object})"
    )]
    Timeout { claim: String, object: String },
    #[error("API request for ResourceClaim {claim} failed: {source}")]
    Api {
        claim: String,
        #[source]
        source: kube::Error,
    },
}

impl Error {
    fn status(&self) -> StatusCode {
        match self {
            Error::ClaimNotFound(_) => StatusCode::NOT_FOUND,
            Error::ClaimReplaced { .. } | Error::NameTaken(_) => StatusCode::CONFLICT,
            Error::NotAllocatedHere { .. } | Error::TooMany { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Error::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Error::Api { .. } => StatusCode::BAD_GATEWAY,
        }
    }
}

type Answer<T> = Result<Json<T>, (StatusCode, Json<Failure>)>;

fn answer<T>(claim: &ClaimRef, result: Result<T, Error>) -> Answer<T> {
    result.map(Json).map_err(|error| {
        warn!(claim = %format!("{}/{}", claim.namespace, claim.name), uid = %claim.uid, %error, "DRA request failed");
        (error.status(), Json(Failure { error: error.to_string() }))
    })
}

#[derive(Clone)]
struct Driver {
    ctx: Arc<Context>,
    store: Store<DeserializeGuard<PortAssignment>>,
}

/// The name of the node's ResourceSlice.
pub fn slice_name(node: &str) -> String {
    let name = format!("{node}-{}", dra::DRIVER);
    if name.len() <= 253 { name } else { format!("{}-{:016x}", &node[..200], portassign_api::fnv1a(node.as_bytes())) }
}

/// The name of the PortAssignment kept for a claim named `claim`.
pub fn object_name(claim: &str) -> String {
    let name = format!("claim-{claim}");
    if name.len() <= 253 {
        name
    } else {
        format!("claim-{}-{:016x}", &claim[..200], portassign_api::fnv1a(claim.as_bytes()))
    }
}

/// The claim's `status.devices` entries of this driver: one per prepared request (keyed
/// by its share of the device), its ports in `data`.
pub fn device_status(claim: &str, node: &str, devices: &[PreparedDevice]) -> serde_json::Value {
    let entries: Vec<serde_json::Value> = devices
        .iter()
        .map(|d| {
            let mut entry = serde_json::json!({
                "driver": dra::DRIVER, "pool": node, "device": d.device,
                "data": { "request": d.request, "ports": d.ports },
            });
            if let Some(share) = &d.share_id {
                entry["shareID"] = share.clone().into();
            }
            entry
        })
        .collect();
    serde_json::json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
        "metadata": { "name": claim },
        "status": { "devices": entries },
    })
}

/// The node's pool: one device shared by every claim, `ports` of capacity.
pub fn slice(node: &str, ports: usize) -> ResourceSlice {
    let one = || Quantity("1".into());
    let capacity = DeviceCapacity {
        value: Quantity(ports.to_string()),
        request_policy: Some(CapacityRequestPolicy {
            default: Some(one()),
            valid_range: Some(CapacityRequestPolicyRange { min: one(), step: Some(one()), max: None }),
            valid_values: None,
        }),
    };
    ResourceSlice {
        metadata: ObjectMeta { name: Some(slice_name(node)), ..ObjectMeta::default() },
        spec: ResourceSliceSpec {
            driver: dra::DRIVER.into(),
            node_name: Some(node.into()),
            pool: ResourcePool { name: node.into(), generation: 1, resource_slice_count: 1 },
            devices: Some(vec![Device {
                name: dra::DEVICE.into(),
                allow_multiple_allocations: Some(true),
                capacity: Some(BTreeMap::from([(dra::CAPACITY.to_string(), capacity)])),
                ..Device::default()
            }]),
            ..ResourceSliceSpec::default()
        },
    }
}

/// Publishes the node's ResourceSlice (retrying until it is written), then serves the
/// kubelet plugin on `config.socket` until `shutdown`.
pub(crate) async fn serve(
    ctx: Arc<Context>,
    store: Store<DeserializeGuard<PortAssignment>>,
    config: Config,
    shutdown: CancellationToken,
) {
    let _ = std::fs::remove_file(&config.socket);
    let listener = match UnixListener::bind(&config.socket) {
        Ok(listener) => listener,
        Err(error) => {
            // Ends the task: the supervisor stops the agent with this reason.
            warn!(socket = %config.socket.display(), %error, "could not listen for the kubelet plugin");
            return;
        }
    };
    // The plugin runs as root without capabilities: to connect it needs write access to
    // the socket, which the agent's user owns. The socket's directory is the pod's own.
    {
        use std::os::unix::fs::PermissionsExt;
        if let Err(error) = std::fs::set_permissions(&config.socket, std::fs::Permissions::from_mode(0o666)) {
            warn!(socket = %config.socket.display(), %error, "could not open the socket to the kubelet plugin");
            return;
        }
    }
    info!(socket = %config.socket.display(), ports = %config.pool, "DRA driver {} serving the kubelet plugin", dra::DRIVER);
    let publish = publish_slice(ctx.clone(), config.pool.len(), shutdown.clone());
    let app = Router::new()
        .route(dra::PREPARE_PATH, post(prepare))
        .route(dra::UNPREPARE_PATH, post(unprepare))
        .with_state(Driver { ctx, store });
    let stop = shutdown.clone();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move { stop.cancelled().await });
    let (served, ()) = tokio::join!(server, publish);
    if let Err(error) = served {
        warn!(%error, "the kubelet plugin's socket failed");
    }
    let _ = std::fs::remove_file(&config.socket);
}

async fn publish_slice(ctx: Arc<Context>, ports: usize, shutdown: CancellationToken) {
    let api: Api<ResourceSlice> = Api::all(ctx.client().clone());
    let slice = slice(ctx.node_name(), ports);
    let name = slice_name(ctx.node_name());
    let mut delay = Duration::from_millis(200);
    loop {
        ctx.write_token().await;
        match api.patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&slice)).await {
            Ok(_) => {
                info!(slice = %name, ports, "published the node's ResourceSlice");
                return;
            }
            Err(error) => warn!(slice = %name, %error, "could not publish the node's ResourceSlice; retrying"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

async fn prepare(State(driver): State<Driver>, Json(claim): Json<ClaimRef>) -> Answer<Prepared> {
    let result = driver.prepare(&claim).await;
    answer(&claim, result)
}

async fn unprepare(State(driver): State<Driver>, Json(claim): Json<ClaimRef>) -> Answer<serde_json::Value> {
    let result = driver.unprepare(&claim).await.map(|()| serde_json::json!({}));
    answer(&claim, result)
}

/// One allocation result of this driver on this node.
struct Wanted {
    request: String,
    share_id: Option<String>,
    keys: Vec<String>,
}

impl Driver {
    async fn prepare(&self, claim: &ClaimRef) -> Result<Prepared, Error> {
        let id = format!("{}/{}", claim.namespace, claim.name);
        let api_error = |source| Error::Api { claim: id.clone(), source };
        let claims: Api<ResourceClaim> = Api::namespaced(self.ctx.client().clone(), &claim.namespace);
        let object = claims.get_opt(&claim.name).await.map_err(api_error)?.ok_or(Error::ClaimNotFound(id.clone()))?;
        let found = object.uid().unwrap_or_default();
        if found != claim.uid {
            return Err(Error::ClaimReplaced { claim: id, found, wanted: claim.uid.clone() });
        }
        let wanted = self.wanted(&object, &id)?;
        let keys: Vec<String> = wanted.iter().flat_map(|w| w.keys.iter().cloned()).collect();
        let name = object_name(&claim.name);
        let objects: Api<PortAssignment> = Api::namespaced(self.ctx.client().clone(), &claim.namespace);
        let mut record = PortAssignment::new(
            &name,
            PortAssignmentSpec {
                node_name: self.ctx.node_name().into(),
                protocol: Protocol::TcpUdp,
                keys: keys.clone(),
            },
        );
        record.metadata.labels = Some(BTreeMap::from([(dra::CLAIM_LABEL.to_string(), claim.uid.clone())]));
        record.metadata.owner_references = Some(vec![OwnerReference {
            api_version: ResourceClaim::api_version(&()).into(),
            kind: ResourceClaim::kind(&()).into(),
            name: claim.name.clone(),
            uid: claim.uid.clone(),
            controller: Some(true),
            block_owner_deletion: None,
        }]);
        self.ctx.write_token().await;
        match objects.create(&PostParams::default(), &record).await {
            Ok(_) => {}
            Err(kube::Error::Api(response)) if response.code == 409 => {
                let existing = objects.get(&name).await.map_err(api_error)?;
                if existing.labels().get(dra::CLAIM_LABEL) != Some(&claim.uid) {
                    return Err(Error::NameTaken(format!("{}/{name}", claim.namespace)));
                }
                if existing.spec.keys != keys {
                    self.ctx.write_token().await;
                    let patch = serde_json::json!({ "spec": { "keys": keys } });
                    objects.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await.map_err(api_error)?;
                }
            }
            Err(source) => return Err(api_error(source)),
        }
        let ports = self
            .recorded(&claim.namespace, &name, &claim.uid, &keys)
            .await
            .ok_or_else(|| Error::Timeout { claim: id.clone(), object: format!("{}/{name}", claim.namespace) })?;
        let devices: Vec<PreparedDevice> = wanted
            .into_iter()
            .map(|w| PreparedDevice {
                ports: w.keys.iter().map(|key| ports[key]).collect(),
                request: w.request,
                pool: self.ctx.node_name().into(),
                device: dra::DEVICE.into(),
                share_id: w.share_id,
            })
            .collect();
        let summary: Vec<String> = devices.iter().map(|d| format!("{}={:?}", d.request, d.ports)).collect();
        info!(claim = %id, uid = %claim.uid, ports = %summary.join(" "), "prepared ResourceClaim");
        // The ports on the claim itself (status.devices[].data), for `kubectl get
        // resourceclaim -o yaml`. Informational: the record is the PortAssignment, so a
        // failure here is logged and does not fail the prepare.
        self.ctx.write_token().await;
        let status = device_status(&claim.name, self.ctx.node_name(), &devices);
        if let Err(error) =
            claims.patch_status(&claim.name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&status)).await
        {
            warn!(claim = %id, %error, "could not show the ports in the claim's status");
        }
        self.ctx.publish_event(
            reference_to::<ResourceClaim>(&claim.namespace, &claim.name, Some(claim.uid.clone())),
            Event {
                type_: EventType::Normal,
                reason: "PortsPrepared".into(),
                note: Some(format!("host ports on node {}: {}", self.ctx.node_name(), summary.join(", "))),
                action: "Prepare".into(),
                secondary: None,
            },
        );
        Ok(Prepared { devices })
    }

    /// The results of `claim`'s allocation that are this node's, with their keys.
    fn wanted(&self, claim: &ResourceClaim, id: &str) -> Result<Vec<Wanted>, Error> {
        let node = self.ctx.node_name();
        let results = claim
            .status
            .as_ref()
            .and_then(|s| s.allocation.as_ref())
            .and_then(|a| a.devices.as_ref())
            .and_then(|d| d.results.as_deref())
            .unwrap_or_default();
        let mut wanted = Vec::new();
        for result in results.iter().filter(|r| r.driver == dra::DRIVER && r.pool == node) {
            let consumed = result.consumed_capacity.as_ref().and_then(|c| c.get(dra::CAPACITY));
            let ports = match consumed {
                None => 1,
                Some(quantity) => {
                    quantity.0.parse::<u64>().ok().filter(|n| (1..=MAX_PORTS_PER_REQUEST).contains(n)).ok_or_else(
                        || Error::TooMany {
                            claim: id.into(),
                            request: result.request.clone(),
                            ports: quantity.0.clone(),
                        },
                    )?
                }
            };
            wanted.push(Wanted {
                request: result.request.clone(),
                share_id: result.share_id.clone(),
                keys: (0..ports as usize).map(|i| dra::request_key(&result.request, i)).collect(),
            });
        }
        if wanted.is_empty() {
            return Err(Error::NotAllocatedHere { claim: id.into(), driver: dra::DRIVER, pool: node.into() });
        }
        Ok(wanted)
    }

    /// Waits until the status of the claim's object records a port for every key.
    async fn recorded(&self, namespace: &str, name: &str, uid: &str, keys: &[String]) -> Option<BTreeMap<String, u16>> {
        let reference = ObjectRef::new(name).within(namespace);
        let deadline = tokio::time::Instant::now() + PREPARE_TIMEOUT;
        loop {
            if let Some(guarded) = self.store.get(&reference)
                && let Ok(object) = &guarded.0
                && object.labels().get(dra::CLAIM_LABEL).map(String::as_str) == Some(uid)
                && let Some(status) = &object.status
            {
                let ports: BTreeMap<String, u16> = status.ports.iter().map(|e| (e.key.clone(), e.port)).collect();
                if keys.iter().all(|key| ports.get(key).is_some_and(|port| *port != 0)) {
                    return Some(ports);
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn unprepare(&self, claim: &ClaimRef) -> Result<(), Error> {
        let id = format!("{}/{}", claim.namespace, claim.name);
        let api_error = |source| Error::Api { claim: id.clone(), source };
        let name = object_name(&claim.name);
        let objects: Api<PortAssignment> = Api::namespaced(self.ctx.client().clone(), &claim.namespace);
        let Some(existing) = objects.get_opt(&name).await.map_err(api_error)? else {
            return Ok(());
        };
        if existing.labels().get(dra::CLAIM_LABEL) != Some(&claim.uid) {
            // Another claim's (a new claim of the same name): not this one's to delete.
            return Ok(());
        }
        let params = DeleteParams {
            preconditions: Some(Preconditions { uid: existing.uid(), resource_version: None }),
            ..DeleteParams::default()
        };
        self.ctx.write_token().await;
        match objects.delete(&name, &params).await {
            Ok(_) => {}
            Err(kube::Error::Api(response)) if response.code == 404 || response.code == 409 => {}
            Err(source) => return Err(api_error(source)),
        }
        info!(claim = %id, uid = %claim.uid, object = %name, "unprepared ResourceClaim: its ports are released with its PortAssignment");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_the_api() {
        assert_eq!(slice_name("kind-worker"), "kind-worker-ports.portassign.io");
        assert_eq!(object_name("web-0-port-x7k2"), "claim-web-0-port-x7k2");
        let long = "a".repeat(253);
        assert!(slice_name(&long).len() <= 253);
        assert!(object_name(&long).len() <= 253);
        assert_ne!(object_name(&long), object_name(&format!("{}b", &long[..252])));
    }

    #[test]
    fn the_slice_offers_one_shared_device_counted_in_ports() {
        let slice = slice("node-1", 3);
        assert_eq!(slice.spec.pool.name, "node-1");
        assert_eq!(slice.spec.node_name.as_deref(), Some("node-1"));
        let devices = slice.spec.devices.unwrap();
        assert_eq!(devices.len(), 1);
        assert_eq!(devices[0].allow_multiple_allocations, Some(true));
        assert_eq!(devices[0].capacity.as_ref().unwrap()[dra::CAPACITY].value.0, "3");
    }
}
