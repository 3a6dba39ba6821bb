//! The two gRPC services the kubelet calls.

use std::path::PathBuf;

use futures::future::join_all;
use portassign_api::dra::ClaimRef;
use tonic::{Request, Response, Status};

use crate::agent::Agent;
use crate::cdi;
use crate::proto::dra::{
    Claim, Device, NodePrepareResourceResponse, NodePrepareResourcesRequest, NodePrepareResourcesResponse,
    NodeUnprepareResourceResponse, NodeUnprepareResourcesRequest, NodeUnprepareResourcesResponse,
    dra_plugin_server::DraPlugin,
};
use crate::proto::registration::{
    InfoRequest, PluginInfo, RegistrationStatus, RegistrationStatusResponse, registration_server::Registration,
};
use crate::{PLUGIN_TYPE, SUPPORTED_VERSIONS};

/// `pluginregistration.Registration`: tells the kubelet what the plugin is and where.
pub(crate) struct RegistrationService {
    driver: String,
    endpoint: PathBuf,
}

impl RegistrationService {
    pub(crate) fn new(driver: String, endpoint: PathBuf) -> Self {
        RegistrationService { driver, endpoint }
    }
}

#[tonic::async_trait]
impl Registration for RegistrationService {
    async fn get_info(&self, _: Request<InfoRequest>) -> Result<Response<PluginInfo>, Status> {
        Ok(Response::new(PluginInfo {
            r#type: PLUGIN_TYPE.to_string(),
            name: self.driver.clone(),
            endpoint: self.endpoint.to_string_lossy().into_owned(),
            supported_versions: SUPPORTED_VERSIONS.iter().map(|v| v.to_string()).collect(),
        }))
    }

    async fn notify_registration_status(
        &self,
        request: Request<RegistrationStatus>,
    ) -> Result<Response<RegistrationStatusResponse>, Status> {
        let status = request.into_inner();
        if status.plugin_registered {
            tracing::info!(driver = %self.driver, "registered with the kubelet");
        } else {
            tracing::error!(driver = %self.driver, error = %status.error, "the kubelet refused the registration");
        }
        Ok(Response::new(RegistrationStatusResponse {}))
    }
}

/// `k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin`: prepares claims through the agent.
pub(crate) struct DraService {
    agent: Agent,
    cdi_dir: PathBuf,
}

impl DraService {
    pub(crate) fn new(agent_socket: PathBuf, cdi_dir: PathBuf) -> Self {
        DraService { agent: Agent::new(agent_socket), cdi_dir }
    }

    /// Gets the claim its ports from the agent and writes its CDI spec.
    async fn prepare(&self, claim: &ClaimRef) -> Result<Vec<Device>, String> {
        // Before the agent allocates anything for a claim whose spec could not be written.
        cdi::spec_path(&self.cdi_dir, &claim.uid).map_err(|e| e.to_string())?;
        let prepared = self.agent.prepare(claim).await.map_err(|e| e.to_string())?;
        if prepared.devices.is_empty() {
            return Err("the portassign agent prepared no device for the claim".to_string());
        }
        if let Some(device) = prepared.devices.iter().find(|d| d.ports.is_empty()) {
            return Err(format!("the portassign agent gave request {:?} no port", device.request));
        }
        let spec = cdi::spec(&claim.uid, &prepared.devices);
        let path = cdi::write_spec(&self.cdi_dir, &claim.uid, &spec).await.map_err(|e| e.to_string())?;
        for (device, cdi_device) in prepared.devices.iter().zip(&spec.devices) {
            tracing::info!(
                namespace = %claim.namespace,
                name = %claim.name,
                uid = %claim.uid,
                request = %device.request,
                ports = ?device.ports,
                cdi_device = %cdi_device.name,
                spec = %path.display(),
                "prepared claim"
            );
        }
        Ok(prepared
            .devices
            .into_iter()
            .zip(spec.devices)
            .map(|(device, cdi_device)| Device {
                request_names: vec![device.request],
                pool_name: device.pool,
                device_name: device.device,
                cdi_device_ids: vec![cdi::device_id(&cdi_device.name)],
                share_id: device.share_id,
            })
            .collect())
    }

    /// Releases the claim's ports through the agent, then removes its CDI spec.
    async fn unprepare(&self, claim: &ClaimRef) -> Result<(), String> {
        cdi::spec_path(&self.cdi_dir, &claim.uid).map_err(|e| e.to_string())?;
        self.agent.unprepare(claim).await.map_err(|e| e.to_string())?;
        cdi::remove_spec(&self.cdi_dir, &claim.uid).await.map_err(|e| e.to_string())?;
        tracing::info!(namespace = %claim.namespace, name = %claim.name, uid = %claim.uid, "unprepared claim");
        Ok(())
    }
}

fn claim_ref(claim: Claim) -> ClaimRef {
    ClaimRef { namespace: claim.namespace, name: claim.name, uid: claim.uid }
}

#[tonic::async_trait]
impl DraPlugin for DraService {
    async fn node_prepare_resources(
        &self,
        request: Request<NodePrepareResourcesRequest>,
    ) -> Result<Response<NodePrepareResourcesResponse>, Status> {
        let claims = request.into_inner().claims.into_iter().map(claim_ref);
        let results = join_all(claims.map(|claim| async move {
            let answer = match self.prepare(&claim).await {
                Ok(devices) => NodePrepareResourceResponse { devices, error: String::new() },
                Err(error) => {
                    tracing::warn!(
                        namespace = %claim.namespace, name = %claim.name, uid = %claim.uid, %error,
                        "cannot prepare claim"
                    );
                    NodePrepareResourceResponse { devices: Vec::new(), error }
                }
            };
            (claim.uid, answer)
        }))
        .await;
        Ok(Response::new(NodePrepareResourcesResponse { claims: results.into_iter().collect() }))
    }

    async fn node_unprepare_resources(
        &self,
        request: Request<NodeUnprepareResourcesRequest>,
    ) -> Result<Response<NodeUnprepareResourcesResponse>, Status> {
        let claims = request.into_inner().claims.into_iter().map(claim_ref);
        let results = join_all(claims.map(|claim| async move {
            let error = match self.unprepare(&claim).await {
                Ok(()) => String::new(),
                Err(error) => {
                    tracing::warn!(
                        namespace = %claim.namespace, name = %claim.name, uid = %claim.uid, %error,
                        "cannot unprepare claim"
                    );
                    error
                }
            };
            (claim.uid, NodeUnprepareResourceResponse { error })
        }))
        .await;
        Ok(Response::new(NodeUnprepareResourcesResponse { claims: results.into_iter().collect() }))
    }
}
