//! The kubelet side of portassign's DRA driver ([`portassign_api::dra::DRIVER`]).
//!
//! The kubelet finds the plugin through its registration socket
//! (`<registry_dir>/<driver>-reg.sock`, service `pluginregistration.Registration`) and
//! then calls the DRA service on `<plugin_dir>/dra.sock` to prepare and unprepare the
//! ResourceClaims of the pods it starts and stops. The plugin does not talk to the
//! Kubernetes API: it forwards each claim to the portassign agent over the agent's Unix
//! socket (HTTP/1.1 + JSON, [`portassign_api::dra`]), writes a CDI spec that hands the
//! claim's ports to the containers as environment variables, and answers the kubelet
//! with the CDI device IDs.
//!
//! It runs in a container of its own, as root: the registry, plugin and CDI directories
//! are root-owned host directories.

mod agent;
mod authority;
pub mod cdi;
mod service;

use std::io;
use std::path::{Path, PathBuf};

use portassign_api::dra;
use tokio::net::UnixListener;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;

/// The kubelet's gRPC APIs, generated at build time from the protos of `k8s.io/kubelet`.
pub mod proto {
    /// DRA v1 (`k8s.io.kubelet.pkg.apis.dra.v1`): the service the kubelet calls to
    /// prepare and unprepare claims.
    #[allow(clippy::all, clippy::pedantic, missing_docs, rustdoc::all)]
    pub mod dra {
        include!(concat!(env!("OUT_DIR"), "/k8s.io.kubelet.pkg.apis.dra.v1.rs"));
    }

    /// Plugin registration (`pluginregistration`): how the kubelet learns about the plugin.
    #[allow(clippy::all, clippy::pedantic, missing_docs, rustdoc::all)]
    pub mod registration {
        include!(concat!(env!("OUT_DIR"), "/pluginregistration.rs"));
    }
}

/// The plugin type the kubelet's plugin manager expects of a DRA driver.
pub const PLUGIN_TYPE: &str = "DRAPlugin";
/// The DRA gRPC API versions the plugin serves.
pub const SUPPORTED_VERSIONS: [&str; 1] = ["v1.DRAPlugin"];
/// The file name of the DRA socket in [`Config::plugin_dir`].
pub const DRA_SOCKET: &str = "dra.sock";

/// Where the plugin listens, writes and forwards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The DRA driver name the plugin registers under.
    pub driver: String,
    /// The kubelet's plugin registry: the registration socket goes here.
    pub registry_dir: PathBuf,
    /// The plugin's own directory: the DRA socket ([`DRA_SOCKET`]) goes here.
    pub plugin_dir: PathBuf,
    /// Where the container runtime reads CDI specs.
    pub cdi_dir: PathBuf,
    /// The agent's Unix socket.
    pub agent_socket: PathBuf,
}

impl Config {
    /// The defaults: driver [`dra::DRIVER`], the kubelet's standard directories
    /// (`/var/lib/kubelet/plugins_registry`, `/var/lib/kubelet/plugins/<driver>`) and
    /// the runtime's dynamic CDI directory (`/var/run/cdi`).
    pub fn new(agent_socket: impl Into<PathBuf>) -> Self {
        Config {
            driver: dra::DRIVER.to_string(),
            registry_dir: PathBuf::from("/var/lib/kubelet/plugins_registry"),
            plugin_dir: Path::new("/var/lib/kubelet/plugins").join(dra::DRIVER),
            cdi_dir: PathBuf::from("/var/run/cdi"),
            agent_socket: agent_socket.into(),
        }
    }

    /// The DRA socket: `<plugin_dir>/dra.sock`.
    pub fn dra_socket(&self) -> PathBuf {
        self.plugin_dir.join(DRA_SOCKET)
    }

    /// The registration socket: `<registry_dir>/<driver>-reg.sock`.
    pub fn registration_socket(&self) -> PathBuf {
        self.registry_dir.join(format!("{}-reg.sock", self.driver))
    }
}

/// Why the plugin could not start or stopped serving. Per-claim failures are not errors
/// of the plugin: they go back to the kubelet in that claim's answer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A directory the plugin needs could not be created.
    #[error("cannot create directory {}: {source}", path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// A path could not be made absolute (the kubelet needs an absolute endpoint).
    #[error("cannot make {} absolute: {source}", path.display())]
    Absolute {
        /// The path.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// A stale socket file (from an earlier run) could not be removed.
    #[error("cannot remove stale socket {}: {source}", path.display())]
    RemoveSocket {
        /// The socket file.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// A socket could not be bound.
    #[error("cannot listen on {}: {source}", path.display())]
    Listen {
        /// The socket file.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// A gRPC server failed while serving.
    #[error("gRPC server on {} failed: {source}", path.display())]
    Serve {
        /// The socket the server listened on.
        path: PathBuf,
        /// What failed.
        source: tonic::transport::Error,
    },
}

/// Serves the plugin until `shutdown` is cancelled: the DRA service on
/// [`Config::dra_socket`] and the registration service on
/// [`Config::registration_socket`]. Creates the plugin and CDI directories if missing,
/// replaces stale socket files, and removes both sockets when it returns.
pub async fn serve(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    for dir in [&config.plugin_dir, &config.cdi_dir] {
        tokio::fs::create_dir_all(dir).await.map_err(|source| Error::CreateDir { path: dir.clone(), source })?;
    }
    let dra_socket = config.dra_socket();
    let dra_socket =
        std::path::absolute(&dra_socket).map_err(|source| Error::Absolute { path: dra_socket.clone(), source })?;
    let registration_socket = config.registration_socket();

    // The DRA socket first: once the registration socket appears the kubelet may call
    // GetInfo and then the endpoint it names.
    let dra_listener = listen(&dra_socket)?;
    let registration_listener = match listen(&registration_socket) {
        Ok(listener) => listener,
        Err(error) => {
            remove_socket(&dra_socket);
            return Err(error);
        }
    };

    let dra = service::DraService::new(config.agent_socket.clone(), config.cdi_dir.clone());
    let registration = service::RegistrationService::new(config.driver.clone(), dra_socket.clone());
    tracing::info!(
        driver = %config.driver,
        dra_socket = %dra_socket.display(),
        registration_socket = %registration_socket.display(),
        agent_socket = %config.agent_socket.display(),
        cdi_dir = %config.cdi_dir.display(),
        "kubelet plugin serving"
    );

    // Each socket is fronted (module `authority`): the kubelet's connections reach the
    // gRPC servers through in-process pipes, their `:authority` made valid on the way.
    let (dra_pipes, dra_incoming) = tokio::sync::mpsc::channel(16);
    let (registration_pipes, registration_incoming) = tokio::sync::mpsc::channel(16);
    tokio::spawn(authority::front(dra_listener, dra_pipes, shutdown.clone()));
    tokio::spawn(authority::front(registration_listener, registration_pipes, shutdown.clone()));
    let dra_server = async {
        Server::builder()
            .add_service(proto::dra::dra_plugin_server::DraPluginServer::new(dra))
            .serve_with_incoming_shutdown(ReceiverStream::new(dra_incoming), shutdown.cancelled())
            .await
            .map_err(|source| Error::Serve { path: dra_socket.clone(), source })
    };
    let registration_server = async {
        Server::builder()
            .add_service(proto::registration::registration_server::RegistrationServer::new(registration))
            .serve_with_incoming_shutdown(ReceiverStream::new(registration_incoming), shutdown.cancelled())
            .await
            .map_err(|source| Error::Serve { path: registration_socket.clone(), source })
    };
    // If one server fails, the other is dropped (and stops) with it.
    let result = tokio::try_join!(dra_server, registration_server).map(|_| ());

    // Unregister first: the kubelet stops calling a plugin whose registration socket is gone.
    remove_socket(&registration_socket);
    remove_socket(&dra_socket);
    match &result {
        Ok(()) => tracing::info!(driver = %config.driver, "kubelet plugin stopped"),
        Err(error) => tracing::error!(driver = %config.driver, %error, "kubelet plugin failed"),
    }
    result
}

/// Binds a Unix socket at `path`, replacing a stale socket file left by an earlier run.
fn listen(path: &Path) -> Result<UnixListener, Error> {
    match std::fs::remove_file(path) {
        Ok(()) => tracing::info!(path = %path.display(), "removed stale socket"),
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(source) => return Err(Error::RemoveSocket { path: path.to_path_buf(), source }),
    }
    UnixListener::bind(path).map_err(|source| Error::Listen { path: path.to_path_buf(), source })
}

fn remove_socket(path: &Path) {
    if let Err(error) = std::fs::remove_file(path)
        && error.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), %error, "cannot remove socket");
    }
}
