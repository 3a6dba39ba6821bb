//! The node agent: rebuilds the node's table from the statuses, then runs the
//! controller, and serves health, readiness, metrics and the table on HTTP.
//!
//! - [`state`]: the node's state under one lock, the one place a port is allocated,
//!   released or explained; made of
//!   - [`table`]: the node's port table (sans-IO), and
//!   - [`node_ports`]: ports taken without a socket (pods' ports, kernel reservations).
//! - [`probe`]: checks a port is free on the node by binding it.
//! - [`context`]: what the tasks share (state, client, events, metrics, write bound).
//! - [`reconcile`]: the reconcile loop (finalizer, status, events).
//! - [`runner`]: which object is reconciled when (the queue, concurrency, requeues).
//! - [`pods`]: the pod watch, the kernel reservations' refresh, conflict events.
//! - [`http`]: the HTTP routes.
//! - [`auth`]: bearer tokens reviewed by the API server for `/metrics` and `/debug/table`.
//! - [`server`]: the bounded HTTP server loop.
//! - [`lock`]: the node lock that keeps a second agent of the node on standby.
//! - [`metrics`]: the Prometheus metrics.
//! - [`backoff`]: per-object retry delays after failed reconciles (sans-IO).
//! - [`throttle`]: the token bucket that bounds the agent's write rate.
//! - [`supervise`]: the background tasks, owned: one that ends stops the agent.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    Api, Client, ResourceExt,
    api::ListParams,
    core::DeserializeGuard,
    runtime::{
        WatchStreamExt,
        events::{EventType, Reporter},
        reflector, watcher,
    },
};
pub use portassign_api::node_selector;
use portassign_api::{
    PortAssignment, Protocol, event_reason,
    range::{PortPool, PortRange},
};
use tokio::{net::TcpListener, sync::mpsc, task::JoinHandle};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub mod auth;
pub mod backoff;
pub mod context;
pub mod dra;
pub mod http;
pub mod lock;
pub mod metrics;
pub mod node_ports;
pub mod pods;
pub mod probe;
pub mod reconcile;
pub mod runner;
pub mod server;
pub mod state;
pub mod supervise;
pub mod table;
pub mod throttle;

use self::{
    context::Context,
    probe::PortProbe,
    table::{ObjectId, Recorded},
};

/// Settings of one node's agent.
#[derive(Clone, Debug)]
pub struct Config {
    /// The node whose objects this agent serves.
    pub node_name: String,
    /// Ports new assignments come from: the ranges minus the exclusions.
    pub pool: PortPool,
    /// Objects reconciled at the same time.
    pub concurrency: u16,
    /// Address of the health, metrics and debug HTTP server (port 0 picks a free one).
    pub listen: SocketAddr,
    /// Name of this agent instance in events (the pod name in a cluster).
    pub instance: Option<String>,
    /// Name of the node lock (default: [`lock::default_name`] of the node).
    pub lock_name: Option<String>,
    /// How failed reconciles are retried.
    pub retry: backoff::Policy,
    /// The bound on the agent's API write rate.
    pub writes: throttle::Rate,
    /// Authentication and bounds of the HTTP server.
    pub http: server::HttpOptions,
    /// Faults injected into the background tasks (tests; none by default).
    pub faults: supervise::Faults,
    /// The Dynamic Resource Allocation driver: off when `None`.
    pub dra: Option<dra::Config>,
}

/// Failures that stop the agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The HTTP server could not bind its address.
    #[error("could not listen on {addr} for health and metrics: {source} (set --listen to a free address)")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The agent task panicked or was aborted.
    #[error("the agent task ended abnormally: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// A background task ended before the agent was told to stop (module [`supervise`]).
    #[error("{0}; stopped")]
    TaskEnded(String),
}

/// A started agent.
pub struct Running {
    /// Where the HTTP server listens.
    pub http_addr: SocketAddr,
    ready: Arc<AtomicBool>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
    failure: Arc<std::sync::Mutex<Option<String>>>,
}

impl Running {
    /// Whether the table has been rebuilt and the controller runs.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// Stops the agent gracefully: in-flight reconciles finish, then it returns. An error
    /// if a background task had ended before (the agent had stopped itself).
    pub async fn stop(self) -> Result<(), Error> {
        self.shutdown.cancel();
        self.wait().await
    }

    /// Waits until the agent stops: told to by `shutdown` (`Ok`), or because one of its
    /// background tasks ended (`Error::TaskEnded`, naming it).
    pub async fn wait(self) -> Result<(), Error> {
        self.task.await?;
        match self.failure.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(message) => Err(Error::TaskEnded(message)),
            None => Ok(()),
        }
    }

    /// The readiness `/readyz` serves, readable after the agent stopped.
    pub fn ready_flag(&self) -> Arc<AtomicBool> {
        self.ready.clone()
    }

    /// The token that stops this agent when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}

/// Starts the agent: binds the HTTP server, then (in the background) rebuilds the
/// table and runs the controller until the returned handle is stopped.
pub async fn start(client: Client, config: Config, probe: Arc<dyn PortProbe>) -> Result<Running, Error> {
    warn_on_overlaps(&config.pool);
    let listener =
        TcpListener::bind(config.listen).await.map_err(|source| Error::Listen { addr: config.listen, source })?;
    let http_addr = listener.local_addr().map_err(|source| Error::Listen { addr: config.listen, source })?;

    let (wake, woken) = mpsc::unbounded_channel();
    let reporter = Reporter { controller: "portassign-agent".into(), instance: config.instance.clone() };
    let mut ctx = Context::new(
        client.clone(),
        config.node_name.clone(),
        config.pool.clone(),
        probe,
        reporter,
        config.retry,
        config.writes,
        wake,
    );
    if let Some(dra) = &config.dra {
        ctx = ctx.with_claims_pool(dra.pool.clone());
    }
    let ctx = Arc::new(ctx);
    let ready = Arc::new(AtomicBool::new(false));
    let shutdown = CancellationToken::new();
    let failure = Arc::new(std::sync::Mutex::new(None));
    let tasks = supervise::Supervisor::new(config.faults.clone(), ready.clone(), shutdown.clone(), failure.clone());

    let access = config.http.authenticate.then(|| Arc::new(auth::Access::kubernetes(client.clone())));
    if access.is_none() {
        warn!(http = %http_addr, "/metrics and /debug/table are served to anyone who can reach this address (authentication is off)");
    }
    let app = http::router(ctx.clone(), ready.clone(), access);
    tasks.spawn(supervise::HTTP_SERVER, server::serve(listener, app, config.http.clone(), shutdown.clone()));
    info!(node = %config.node_name, ports = %config.pool, http = %http_addr, "agent starting");

    let task = tokio::spawn(run(ctx, config, ready.clone(), woken, shutdown.clone(), tasks));
    Ok(Running { http_addr, ready, shutdown, task, failure })
}

async fn run(
    ctx: Arc<Context>,
    config: Config,
    ready: Arc<AtomicBool>,
    woken: mpsc::UnboundedReceiver<kube::runtime::reflector::ObjectRef<DeserializeGuard<PortAssignment>>>,
    shutdown: CancellationToken,
    tasks: supervise::Supervisor,
) {
    // One agent per node: a second one waits here, reading and writing nothing, and
    // starts from the statuses as at start once the first is gone.
    let lock_name = config.lock_name.as_deref();
    let instance = config.instance.as_deref();
    let Some(lock) = lock::hold(&config.node_name, lock_name, instance, ctx.metrics(), &shutdown).await else { return };
    let api: Api<DeserializeGuard<PortAssignment>> = Api::all(ctx.client().clone());
    let selector = node_selector(&config.node_name);
    // The node's pods and the kernel's reservations are known before anything is
    // assigned: the pod watch lists while the table is rebuilt.
    let (synced_tx, mut synced) = tokio::sync::watch::channel(false);
    tasks.spawn(supervise::POD_WATCH, pods::watch_pods(ctx.clone(), synced_tx, shutdown.clone()));
    pods::read_reserved(&ctx);
    tasks.spawn(supervise::RESERVED_PORTS, pods::refresh_reserved(ctx.clone(), shutdown.clone()));
    let mut delay = Duration::from_millis(200);
    loop {
        match rebuild(&api, &selector, &ctx).await {
            Ok(()) => break,
            Err(error) => {
                warn!(%error, "could not read this node's PortAssignments to rebuild the table; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return lock.release().await,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
    let stopped = tokio::select! {
        _ = shutdown.cancelled() => true,
        _ = synced.wait_for(|done| *done) => false,
    };
    if stopped {
        return lock.release().await;
    }
    pods::recheck(&ctx);
    ready.store(true, Ordering::SeqCst);

    // The controller's cache holds every object of the node: managed fields (a large
    // share of each object, never read here) are dropped before they are stored.
    let watch = watcher::Config::default().fields(&selector).page_size(100);
    let (store, writer) = reflector::store();
    // The watch retries a failed list or watch after the agent's own backoff (kube's
    // default, client-go's 800 ms doubling to 30 s, kept agents deaf for up to half a
    // minute after an API-server restart).
    let events = watcher(api, watch)
        .backoff(backoff::WatchBackoff::new())
        .modify(|object| object.managed_fields_mut().clear())
        .reflect(writer);
    tasks.spawn(supervise::VANISHED_SWEEP, release_vanished(store.clone(), ctx.clone(), shutdown.clone()));
    if let Some(driver) = config.dra.clone() {
        tasks.spawn(supervise::DRA_DRIVER, dra::serve(ctx.clone(), store.clone(), driver, shutdown.clone()));
    }
    // Every object the watch applies is reconciled (a list's once it is in the store),
    // and every object woken because a port was released; a watch failure is logged and
    // the watch retries on its own.
    let changed = runner::triggers(events).filter_map(|result| {
        std::future::ready(match result {
            Ok(reference) => Some(reference),
            Err(error) => {
                warn!(%error, "watching this node's PortAssignments");
                None
            }
        })
    });
    let triggers = futures::stream::select(changed, UnboundedReceiverStream::new(woken));
    let concurrency = usize::from(config.concurrency);
    runner::run(triggers, store, reconcile::reconcile, reconcile::error_policy, ctx, concurrency, shutdown.clone())
        .await;
    ready.store(false, Ordering::SeqCst);
    lock.release().await;
    info!("agent stopped");
}

/// How often the table is compared with the watched objects.
const VANISHED_CHECK: Duration = Duration::from_secs(5);

/// Releases the ports of objects that disappeared without the agent's cleanup (their
/// finalizer was removed by hand, or the object was force-deleted): the watch reports
/// no reconcile for them, so the table is compared with the watched objects, and each
/// object missing there is confirmed gone with the API server before its ports are freed.
async fn release_vanished(
    store: kube::runtime::reflector::Store<DeserializeGuard<PortAssignment>>,
    ctx: Arc<Context>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(VANISHED_CHECK) => {}
        }
        // Polled once per pass rather than awaited: the store's readiness signal wakes
        // only the last task that waited on it, and the controller waits on it too.
        if !matches!(futures::FutureExt::now_or_never(store.wait_until_ready()), Some(Ok(()))) {
            continue;
        }
        // Failure streaks of objects gone from the watch (deleted while backing off,
        // before they held a port) end here.
        let stale: Vec<ObjectId> = ctx
            .backoff()
            .objects()
            .filter(|id| store.get(&kube::runtime::reflector::ObjectRef::new(&id.name).within(&id.namespace)).is_none())
            .cloned()
            .collect();
        for id in stale {
            ctx.end_backoff(&id, "object gone");
        }
        let held = ctx.state().table().object_ids();
        for id in held {
            let reference = kube::runtime::reflector::ObjectRef::new(&id.name).within(&id.namespace);
            if store.get(&reference).is_some() {
                continue;
            }
            match still_exists(ctx.client(), &id).await {
                Ok(false) => {
                    // Checked again under the table lock: a new object of the same name
                    // enters the store before any reconcile of it can take ports.
                    let released = {
                        let mut state = ctx.state();
                        if store.get(&reference).is_some() {
                            continue;
                        }
                        state.release_object(&id)
                    };
                    ctx.released(&released);
                    ctx.update_gauges();
                    warn!(object = %id, ports = released.ports.len(), "object vanished without its finalizer running: released its ports");
                }
                Ok(true) => {}
                Err(error) => warn!(object = %id, %error, "could not confirm that an object is gone"),
            }
        }
    }
}

/// Whether the object `id` names exists on the API server. Asked with a list by name
/// rather than a GET: the agent's role grants `list` (it lists its node's objects
/// anyway) and no `get`, and one verb fewer is one less thing a token can do.
async fn still_exists(client: &Client, id: &ObjectId) -> Result<bool, kube::Error> {
    // Metadata only: an object this agent cannot decode still counts as existing.
    let api: Api<PortAssignment> = Api::namespaced(client.clone(), &id.namespace);
    let params = ListParams::default().fields(&format!("metadata.name={}", id.name)).limit(1);
    Ok(!api.list_metadata(&params).await?.items.is_empty())
}

/// Rebuilds the table from the statuses of every live object of this node, resolving
/// ports recorded twice in favour of the older object, with a Warning event.
async fn rebuild(
    api: &Api<DeserializeGuard<PortAssignment>>,
    selector: &str,
    ctx: &Context,
) -> Result<(), kube::Error> {
    let started = std::time::Instant::now();
    let mut records = Vec::new();
    // Only a reference per object is kept (for the events of displaced keys), not the object.
    let mut references: HashMap<ObjectId, ObjectReference> = HashMap::new();
    let mut protocols: HashMap<ObjectId, Protocol> = HashMap::new();
    let mut params = ListParams::default().fields(selector).limit(500);
    loop {
        let page = api.list(&params).await?;
        for item in page.items {
            let object = match item.0 {
                Ok(object) => object,
                Err(invalid) => {
                    warn!(name = ?invalid.metadata.name, namespace = ?invalid.metadata.namespace, error = %invalid.error,
                        "cannot decode a PortAssignment; its ports are not known to this agent");
                    continue;
                }
            };
            let Some(record) = recorded(&object) else { continue };
            protocols.insert(record.object.clone(), object.spec.protocol);
            references.insert(record.object.clone(), context::event_reference(&object));
            records.push(record);
        }
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => break,
        }
    }
    let count = records.len();
    let displaced = ctx.state().rebuild(records, &protocols);
    for d in &displaced {
        let Some(reference) = references.get(&d.loser.object) else { continue };
        let message = format!(
            "port {} was recorded both for key {} of this object and for key {} of {} (older); {} keeps it and key {} gets a new port",
            d.port, d.loser.key, d.keeper.key, d.keeper.object, d.keeper.object, d.loser.key
        );
        warn!(object = %d.loser.object, "{message}");
        ctx.publish_on(reference.clone(), EventType::Warning, event_reason::DUPLICATE_PORT, message);
    }
    ctx.update_gauges();
    {
        let held = ctx.state().table().held();
        info!(
            objects = count,
            ports = held,
            duplicates = displaced.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "table rebuilt from statuses"
        );
    }
    Ok(())
}

/// What an object's status records for the rebuild: its key and port pairs, aged by its
/// creation time (an object without one sorts first). `None` for an object being deleted:
/// its ports are released already, whatever its status says.
pub fn recorded(object: &PortAssignment) -> Option<Recorded<Option<k8s_openapi::jiff::Timestamp>>> {
    if object.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let ports =
        object.status.as_ref().map(|s| s.ports.iter().map(|e| (e.key.clone(), e.port)).collect()).unwrap_or_default();
    let age = object.metadata.creation_timestamp.as_ref().map(|t| t.0);
    Some(Recorded { object: object.id(), age, ports })
}

fn warn_on_overlaps(pool: &PortPool) {
    if let Some((first, last)) = probe::ephemeral_range()
        && let Ok(ephemeral) = PortRange::new(first, last)
    {
        for range in pool.ranges().ranges().iter().filter(|r| r.overlaps(&ephemeral)) {
            warn!(%range, %ephemeral, "the port range overlaps the kernel's ephemeral range (net.ipv4.ip_local_port_range): outgoing connections may take ports from it");
        }
    }
    if let Some(nodeport) = pool.node_port()
        && pool.ranges().ranges().iter().any(|r| r.overlaps(&nodeport))
    {
        info!(%nodeport, "the NodePort range is left out of the port ranges (--node-port-range)");
    }
}
