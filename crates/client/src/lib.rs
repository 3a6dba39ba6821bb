//! Getting a port from a program: acquire, look up and release the port of a key.
//!
//! A launcher names a key (a sandbox identifier) and a node; the client adds the key to
//! a pool (a `PortAssignment` of that node, created on first use), waits by watch until
//! the node's agent records the key's port in the status, and returns it. Release
//! removes the key again. `portassign acquire` / `portassign release` (also as
//! `kubectl portassign …`) are built on this module.
//!
//! **Many callers, one pool.** Each key is written with server-side apply under a field
//! manager of its own ([`field_manager`]); `spec.keys` is a list of type `set`, so the API
//! server merges concurrent applies item by item. Callers never read-modify-write the
//! list, never see a conflict, and never overwrite each other's keys. Releasing applies
//! an empty configuration under the key's manager: exactly the items that manager
//! added go away, and a key someone else also lists (another manager, `kubectl apply`)
//! stays listed.
//!
//! **Failures** are typed ([`Error`]) and each has its own exit code
//! ([`Error::exit_code`]). A failed acquire withdraws the key it added, so it leaves
//! nothing behind. Why the agent gives a key no port is read from the `Ready`
//! condition's reason, mapped in one table ([`SHORTAGES`]).
//!
//! ```no_run
//! use portassign_client::{Pool, PortClient};
//!
//! # async fn launch() -> Result<(), Box<dyn std::error::Error>> {
//! let kube = kube::Client::try_default().await?;
//! let ports = PortClient::new(kube, "team-a");
//! // The default pool of node worker-1, created on first use.
//! let pool = Pool::on_node("worker-1");
//! let assignment = ports.acquire(&pool, "team-a/sandbox-7").await?;
//! println!("sandbox-7 listens on {}:{}", assignment.node, assignment.port);
//!
//! // Later, or from another process: the same key's port, without waiting.
//! let again = ports.get(&pool.name, "team-a/sandbox-7").await?;
//! assert_eq!(again.map(|a| a.port), Some(assignment.port));
//!
//! // Done: remove what this key's acquire added; the agent frees the port.
//! ports.release(&pool.name, "team-a/sandbox-7").await?;
//! # Ok(())
//! # }
//! ```

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::StreamExt;
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{Patch, PatchParams, PostParams, WatchEvent, WatchParams},
};
use serde::Serialize;
use serde_json::json;
use tokio::sync::watch;

use portassign_api::{MAX_KEY_LEN, MAX_KEYS, PortAssignment, PortAssignmentSpec, Protocol, fnv1a, reason};

/// Field manager of the pool objects the client creates: it owns `spec.nodeName` and
/// `spec.protocol`, so releasing every key never touches them.
pub const POOL_MANAGER: &str = "portassign-pool";
/// Prefix of the field manager of each key's writes.
pub const KEY_MANAGER_PREFIX: &str = "portassign-client/";
/// How long an acquire waits for the agent by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest field manager name the API server accepts.
const MAX_MANAGER_LEN: usize = 128;

/// The pool a key goes to: a `PortAssignment` of one node in the client's namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pool {
    /// Name of the PortAssignment.
    pub name: String,
    /// The node whose agent assigns the ports.
    pub node: String,
    /// The protocol the ports are verified free for.
    pub protocol: Protocol,
}

impl Pool {
    /// The default TCP pool of `node` ([`Pool::default_name`]).
    pub fn on_node(node: &str) -> Self {
        Pool { name: Pool::default_name(node, Protocol::Tcp), node: node.to_owned(), protocol: Protocol::Tcp }
    }

    /// The pool named `name` for `node` (TCP unless [`Pool::protocol`] says otherwise).
    pub fn named(name: &str, node: &str) -> Self {
        Pool { name: name.to_owned(), node: node.to_owned(), protocol: Protocol::Tcp }
    }

    /// The same pool for `protocol`; the default pool's name follows the protocol.
    pub fn protocol(mut self, protocol: Protocol) -> Self {
        if self.name == Pool::default_name(&self.node, self.protocol) {
            self.name = Pool::default_name(&self.node, protocol);
        }
        self.protocol = protocol;
        self
    }

    /// The default pool's name: `ports-NODE` for TCP, `ports-NODE-udp` and
    /// `ports-NODE-tcpudp` for the others; shortened with a hash when the node name is too
    /// long for an object name.
    pub fn default_name(node: &str, protocol: Protocol) -> String {
        let suffix = match protocol {
            Protocol::Tcp => "",
            Protocol::Udp => "-udp",
            Protocol::TcpUdp => "-tcpudp",
        };
        let name = format!("ports-{node}{suffix}");
        if name.len() <= 253 {
            return name;
        }
        // At most 200 bytes of the node name, cut on a character boundary (the name is not
        // validated here, and may hold multi-byte characters).
        let cut = (0..=200).rev().find(|&i| node.is_char_boundary(i)).unwrap_or(0);
        format!("ports-{}-{:016x}{suffix}", &node[..cut], fnv1a(node.as_bytes()))
    }
}

/// A key's port, as the agent recorded it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Assignment {
    /// The key.
    pub key: String,
    /// Its host port.
    pub port: u16,
    /// The node the port is on.
    pub node: String,
    /// Namespace of the pool.
    pub namespace: String,
    /// Name of the pool (the PortAssignment).
    pub pool: String,
    /// Protocol the port was verified free for.
    pub protocol: Protocol,
}

/// What a release did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Release {
    /// The key.
    pub key: String,
    /// Namespace of the pool.
    pub namespace: String,
    /// Name of the pool.
    pub pool: String,
    /// Whether this key's manager had listed the key (and so removed it now).
    pub removed: bool,
    /// Whether the key is still listed after the release, because another writer lists
    /// it too (its port stays held then).
    pub still_listed: bool,
}

/// Why the agent gives a key no port, read from the `Ready` condition of a status that
/// covers the key. New reasons are added in [`SHORTAGES`] only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Shortage {
    /// Every port of the node's range is held by some key.
    RangeExhausted,
    /// The unassigned ports of the range are busy on the node (other programs hold them).
    PortConflict,
    /// The node is gone (the janitor released the pool); no agent will answer.
    NodeNotFound,
}

/// The one mapping from the reasons of the `Ready` condition (`api::reason`) to client
/// failures: reason, failure, exit code, and the words of the message.
pub const SHORTAGES: &[(&str, Shortage, u8, &str)] = &[
    (reason::RANGE_EXHAUSTED, Shortage::RangeExhausted, 6, "range exhausted"),
    (reason::PORT_CONFLICT, Shortage::PortConflict, 7, "port conflict"),
    (reason::NODE_NOT_FOUND, Shortage::NodeNotFound, 5, "node not found"),
];

impl Shortage {
    /// The shortage a `Ready=False` reason stands for; `None` for reasons the client
    /// does not know (it then keeps waiting).
    pub fn from_reason(reason: &str) -> Option<Shortage> {
        SHORTAGES.iter().find(|(r, ..)| *r == reason).map(|(_, s, ..)| *s)
    }

    fn entry(self) -> &'static (&'static str, Shortage, u8, &'static str) {
        SHORTAGES.iter().find(|(_, s, ..)| *s == self).expect("every shortage is in SHORTAGES")
    }

    /// The exit code of the CLI for this shortage.
    pub fn exit_code(self) -> u8 {
        self.entry().2
    }

    /// What the message calls it.
    pub fn describe(self) -> &'static str {
        self.entry().3
    }
}

/// Exit codes of `portassign acquire|release` besides the shortages of [`SHORTAGES`].
pub mod exit {
    /// Any other failure: the API server unreachable, an unexpected answer.
    pub const OTHER: u8 = 1;
    /// Bad command-line usage (clap's own code).
    pub const USAGE: u8 = 2;
    /// The key is not a valid key.
    pub const INVALID_KEY: u8 = 3;
    /// The API server refused the caller (RBAC).
    pub const FORBIDDEN: u8 = 4;
    /// No agent answered within the timeout.
    pub const NO_AGENT: u8 = 5;
    /// The pool cannot take the key: it is for another node or protocol, is being
    /// deleted, or already lists the most keys an object may hold.
    pub const POOL_UNUSABLE: u8 = 8;
}

/// Why an acquire, get or release failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The key does not match the CRD's key pattern.
    #[error(
        "invalid key {key:?}: {why}; a key is 1 to {MAX_KEY_LEN} characters: letters, digits, '-', '_', '.' and '/', starting and ending with a letter or digit"
    )]
    InvalidKey {
        /// The key.
        key: String,
        /// What is wrong with it.
        why: String,
    },
    /// The API server refused the call (RBAC).
    #[error(
        "forbidden: {message}; a caller needs get, list, watch, create and patch on portassignments.portassign.io in namespace {namespace}"
    )]
    Forbidden {
        /// The namespace.
        namespace: String,
        /// The API server's message.
        message: String,
    },
    /// No status covering the key arrived in time.
    #[error(
        "no agent answered within {}: key {key:?} got no port in pool {namespace}/{pool} on node {node}; is the portassign agent running on that node? The key was withdrawn",
        seconds(*timeout)
    )]
    NoAgent {
        /// The key.
        key: String,
        /// The node.
        node: String,
        /// Namespace of the pool.
        namespace: String,
        /// The pool.
        pool: String,
        /// How long the client waited.
        timeout: Duration,
    },
    /// The agent answered that the key has no port.
    #[error("{} on node {node}: key {key:?} got no port: {message}; the key was withdrawn", shortage.describe())]
    Shortage {
        /// Why.
        shortage: Shortage,
        /// The key.
        key: String,
        /// The node.
        node: String,
        /// The agent's message (the `Ready` condition's).
        message: String,
    },
    /// The pool cannot take the key.
    #[error("pool {namespace}/{pool} cannot take key {key:?}: {why}")]
    PoolUnusable {
        /// Namespace of the pool.
        namespace: String,
        /// The pool.
        pool: String,
        /// The key.
        key: String,
        /// Why.
        why: String,
    },
    /// While the client waited, the key left the pool (another writer removed it).
    #[error("key {key:?} was removed from pool {namespace}/{pool} by another writer while waiting for its port")]
    Removed {
        /// The key.
        key: String,
        /// Namespace of the pool.
        namespace: String,
        /// The pool.
        pool: String,
    },
    /// Any other failure of an API call.
    #[error("{what}: {source}")]
    Api {
        /// What the client was doing.
        what: String,
        /// The error.
        #[source]
        source: kube::Error,
    },
}

impl Error {
    /// The exit code of the CLI for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::InvalidKey { .. } => exit::INVALID_KEY,
            Error::Forbidden { .. } => exit::FORBIDDEN,
            Error::NoAgent { .. } => exit::NO_AGENT,
            Error::Shortage { shortage, .. } => shortage.exit_code(),
            Error::PoolUnusable { .. } => exit::POOL_UNUSABLE,
            Error::Removed { .. } | Error::Api { .. } => exit::OTHER,
        }
    }
}

fn seconds(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 { format!("{s:.0}s") } else { format!("{s}s") }
}

/// Checks a key against the CRD's rule for `spec.keys` items, so a bad key is refused
/// before anything is written.
pub fn validate_key(key: &str) -> Result<(), Error> {
    let invalid = |why: &str| Err(Error::InvalidKey { key: key.to_owned(), why: why.to_owned() });
    if key.is_empty() {
        return invalid("it is empty");
    }
    if key.len() > MAX_KEY_LEN {
        return invalid(&format!("it is {} characters long", key.len()));
    }
    if let Some(c) = key.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))) {
        return invalid(&format!("{c:?} is not allowed"));
    }
    let edge_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if !edge_ok(key.chars().next()) || !edge_ok(key.chars().last()) {
        return invalid("it must start and end with a letter or digit");
    }
    Ok(())
}

/// The field manager of `key`'s writes: `portassign-client/KEY`, shortened with a hash
/// when it would exceed the API server's 128 characters. The same key always gets the
/// same manager, so a release (from any process) removes what the acquire added.
pub fn field_manager(key: &str) -> String {
    let manager = format!("{KEY_MANAGER_PREFIX}{key}");
    if manager.len() <= MAX_MANAGER_LEN {
        return manager;
    }
    let keep = MAX_MANAGER_LEN - KEY_MANAGER_PREFIX.len() - 17;
    format!("{KEY_MANAGER_PREFIX}{}~{:016x}", &key[..keep], fnv1a(key.as_bytes()))
}

/// What a status says about a key, given the generation that lists it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The key holds this port.
    Port(u16),
    /// The agent gave it none, for this reason.
    Short(Shortage, String),
    /// No status covering the key yet.
    Wait,
}

/// Reads `object` for `key`, which the write at `generation` listed: a port once a
/// status of that generation or later records one; a shortage when such a status says
/// the key has none for a known reason.
pub(crate) fn judge(object: &PortAssignment, key: &str, generation: Option<i64>) -> Verdict {
    let Some(status) = &object.status else { return Verdict::Wait };
    let covers = match (status.observed_generation, generation) {
        (Some(observed), Some(generation)) => observed >= generation,
        _ => false,
    };
    if !covers {
        return Verdict::Wait;
    }
    if let Some(entry) = status.ports.iter().find(|e| e.key == key) {
        return Verdict::Port(entry.port);
    }
    match status.ready_condition() {
        Some(c) if c.status == "False" => match Shortage::from_reason(&c.reason) {
            Some(shortage) => Verdict::Short(shortage, c.message.clone()),
            None => Verdict::Wait,
        },
        _ => Verdict::Wait,
    }
}

/// Acquires, looks up and releases keys' ports in the pools of one namespace.
#[derive(Clone)]
pub struct PortClient {
    api: Api<PortAssignment>,
    namespace: String,
    timeout: Duration,
    /// The pools this client watches for its waiting acquires, shared by its clones.
    follows: Arc<Mutex<HashMap<String, watch::Sender<Seen>>>>,
    /// One lock per pool: this client's writes to a pool go out one at a time.
    writes: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

/// The latest a pool's watch has seen.
#[derive(Clone, Debug)]
enum Seen {
    /// Nothing yet.
    Nothing,
    /// This version of the pool.
    Object(Arc<PortAssignment>),
    /// The pool was deleted.
    Deleted,
    /// The watch was refused.
    Failed(Failure),
}

/// A refused watch.
#[derive(Clone, Debug)]
struct Failure {
    code: u16,
    message: String,
}

impl Failure {
    fn to_error(&self, client: &PortClient, pool: &str) -> Error {
        let status = kube::core::Status::failure(&self.message, "").with_code(self.code);
        client.api_error(kube::Error::Api(Box::new(status)), "watching the pool", pool)
    }
}

impl PortClient {
    /// A client for the pools of `namespace`, waiting at most [`DEFAULT_TIMEOUT`] for an agent.
    pub fn new(client: Client, namespace: &str) -> Self {
        PortClient {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            timeout: DEFAULT_TIMEOUT,
            follows: Arc::default(),
            writes: Arc::default(),
        }
    }

    /// How long [`PortClient::acquire`] waits for the agent before it gives up.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The namespace of the pools.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Gives `key` a port in `pool` and returns it once the node's agent has recorded it.
    ///
    /// Adds the key with server-side apply under the key's own field manager (creating the
    /// pool first if it does not exist), then waits on a watch of the pool until a status
    /// of that generation or later shows the key's port. Idempotent: a key that already
    /// holds a port gets the same port back at once. On failure the key is withdrawn.
    pub async fn acquire(&self, pool: &Pool, key: &str) -> Result<Assignment, Error> {
        validate_key(key)?;
        let deadline = Instant::now() + self.timeout;
        let applied = match self.apply_key(pool, key).await {
            // The apply would have created the pool without a node: it does not exist yet.
            Err(Error::Api { source: kube::Error::Api(status), .. }) if lacks_node(&status) => {
                self.create_pool(pool).await?;
                self.apply_key(pool, key).await?
            }
            other => other?,
        };
        if let Err(why) = usable(&applied, pool) {
            self.withdraw(pool, key).await;
            return Err(self.unusable(pool, key, why));
        }
        match self.wait(pool, key, applied, deadline).await {
            Ok(port) => Ok(self.assignment(pool, key, port)),
            Err(error) => {
                if !matches!(error, Error::Removed { .. } | Error::Forbidden { .. }) {
                    self.withdraw(pool, key).await;
                }
                Err(error)
            }
        }
    }

    /// The port `key` holds in the pool `pool`, as its status records it now; `None` if
    /// the pool does not exist, does not list the key, or has not given it a port yet.
    pub async fn get(&self, pool: &str, key: &str) -> Result<Option<Assignment>, Error> {
        validate_key(key)?;
        let Some(object) = self.api.get_opt(pool).await.map_err(|e| self.api_error(e, "reading the pool", pool))?
        else {
            return Ok(None);
        };
        if object.metadata.deletion_timestamp.is_some() || !object.spec.keys.iter().any(|k| k == key) {
            return Ok(None);
        }
        let port = object.status.iter().flat_map(|s| &s.ports).find(|e| e.key == key).map(|e| e.port);
        Ok(port.map(|port| Assignment {
            key: key.to_owned(),
            port,
            node: object.spec.node_name.clone(),
            namespace: self.namespace.clone(),
            pool: pool.to_owned(),
            protocol: object.spec.protocol,
        }))
    }

    /// Removes from the pool `pool` what `key`'s acquire added. The key stays listed (and
    /// keeps its port) if another writer lists it too. Releasing a key that is not held
    /// is not an error (`removed: false`).
    pub async fn release(&self, pool: &str, key: &str) -> Result<Release, Error> {
        validate_key(key)?;
        let manager = field_manager(key);
        let mut release = Release {
            key: key.to_owned(),
            namespace: self.namespace.clone(),
            pool: pool.to_owned(),
            removed: false,
            still_listed: false,
        };
        let Some(object) = self.api.get_opt(pool).await.map_err(|e| self.api_error(e, "reading the pool", pool))?
        else {
            return Ok(release);
        };
        release.still_listed = object.spec.keys.iter().any(|k| k == key);
        if !managers(&object).any(|m| m == manager) {
            return Ok(release);
        }
        let written = self.apply(pool, &manager, None).await.map_err(|e| self.api_error(e, "releasing", pool))?;
        release.removed = true;
        release.still_listed = written.spec.keys.iter().any(|k| k == key);
        Ok(release)
    }

    /// Releases `key` from every pool of the namespace its acquire wrote to (a key is
    /// usually in one; this finds it without naming the pool or node).
    pub async fn release_everywhere(&self, key: &str) -> Result<Vec<Release>, Error> {
        validate_key(key)?;
        let manager = field_manager(key);
        let list = self.api.list(&Default::default()).await.map_err(|e| self.api_error(e, "listing the pools", "*"))?;
        let mut out = Vec::new();
        for object in list.items.iter().filter(|o| managers(o).any(|m| m == manager)) {
            out.push(self.release(&object.name_any(), key).await?);
        }
        Ok(out)
    }

    /// Server-side apply of `spec` to the pool under `manager`, never forced: fields the
    /// configuration leaves out are removed if this manager alone set them.
    /// `None` applies a configuration without spec: the manager then owns nothing and its
    /// entry leaves `metadata.managedFields`.
    ///
    /// The writes of this client (and its clones) to one pool go out one at a time. The
    /// API server applies the writes of one object one after another anyway, and makes a
    /// write that lost the race start over: many writes of one object in flight at once
    /// cost it far more than the same writes in a row (docs/design.md §9).
    async fn apply(
        &self,
        pool: &str,
        manager: &str,
        spec: Option<serde_json::Value>,
    ) -> Result<PortAssignment, kube::Error> {
        let lock = {
            let mut writes = self.writes.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            writes.entry(pool.to_owned()).or_default().clone()
        };
        let _turn = lock.lock().await;
        let mut body = json!({
            "apiVersion": PortAssignment::api_version(&()),
            "kind": PortAssignment::kind(&()),
            "metadata": { "name": pool },
        });
        if let Some(spec) = spec {
            body["spec"] = spec;
        }
        self.api.patch(pool, &PatchParams::apply(manager), &Patch::Apply(body)).await
    }

    /// Lists `key` in the pool under the key's field manager.
    async fn apply_key(&self, pool: &Pool, key: &str) -> Result<PortAssignment, Error> {
        match self.apply(&pool.name, &field_manager(key), Some(json!({ "keys": [key] }))).await {
            Ok(object) => Ok(object),
            // The API server's own validation of spec.keys: the list is full, or the key
            // breaks a rule the client does not know.
            Err(kube::Error::Api(status)) if status.code == 422 && status.message.contains("spec.keys") => {
                if status.message.contains("Too many") {
                    Err(self.unusable(pool, key, format!("it lists the most keys an object may hold ({MAX_KEYS})")))
                } else {
                    Err(Error::InvalidKey { key: key.to_owned(), why: status.message.clone() })
                }
            }
            Err(e) => Err(self.api_error(e, &format!("adding key {key:?}"), &pool.name)),
        }
    }

    /// Creates the pool (no keys) under [`POOL_MANAGER`]; another caller creating it at
    /// the same moment is fine.
    async fn create_pool(&self, pool: &Pool) -> Result<(), Error> {
        let object = PortAssignment::new(
            &pool.name,
            PortAssignmentSpec { node_name: pool.node.clone(), protocol: pool.protocol, keys: Vec::new() },
        );
        let params = PostParams { field_manager: Some(POOL_MANAGER.into()), ..Default::default() };
        match self.api.create(&params, &object).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
            Err(e) => Err(self.api_error(e, "creating the pool", &pool.name)),
        }
    }

    /// Best effort: removes what `key`'s manager added after a failed acquire.
    async fn withdraw(&self, pool: &Pool, key: &str) {
        if let Err(error) = self.apply(&pool.name, &field_manager(key), None).await {
            tracing::warn!(%error, key, pool = %pool.name, "could not withdraw the key of a failed acquire");
        }
    }

    /// Waits until a status covering the key's write (`applied`) shows the key's port, or
    /// says why it has none. Every acquire of this client waiting on the same pool shares
    /// one watch of it ([`PortClient::follow`]), so a launcher acquiring many keys at once
    /// costs the API server one watch, not one per key.
    async fn wait(&self, pool: &Pool, key: &str, applied: PortAssignment, deadline: Instant) -> Result<u16, Error> {
        let generation = applied.metadata.generation;
        if let Some(decided) = self.decide(pool, key, generation, &applied) {
            return decided;
        }
        let mut seen = self.subscribe(&pool.name, &applied);
        loop {
            let current = seen.borrow_and_update().clone();
            match current {
                Seen::Object(object) if object.metadata.generation >= generation => {
                    if let Some(decided) = self.decide(pool, key, generation, &object) {
                        return decided;
                    }
                }
                Seen::Object(_) | Seen::Nothing => {}
                Seen::Deleted => return Err(self.unusable(pool, key, "it was deleted".into())),
                Seen::Failed(failure) => return Err(failure.to_error(self, &pool.name)),
            }
            match tokio::time::timeout_at(deadline.into(), seen.changed()).await {
                Err(_elapsed) => return Err(self.no_agent(pool, key)),
                Ok(Ok(())) => {}
                // The watch ended for good without saying why: follow the pool afresh.
                Ok(Err(_)) => seen = self.subscribe(&pool.name, &applied),
            }
        }
    }

    /// What `object` (at or after the key's write of `generation`) means for the acquire;
    /// `None` while the agent has not answered yet.
    fn decide(
        &self,
        pool: &Pool,
        key: &str,
        generation: Option<i64>,
        object: &PortAssignment,
    ) -> Option<Result<u16, Error>> {
        if object.metadata.deletion_timestamp.is_some() {
            return Some(Err(self.unusable(pool, key, "it is being deleted".into())));
        }
        if !object.spec.keys.iter().any(|k| k == key) {
            return Some(Err(Error::Removed {
                key: key.into(),
                namespace: self.namespace.clone(),
                pool: pool.name.clone(),
            }));
        }
        match judge(object, key, generation) {
            Verdict::Port(port) => Some(Ok(port)),
            Verdict::Short(shortage, message) => {
                Some(Err(Error::Shortage { shortage, key: key.into(), node: pool.node.clone(), message }))
            }
            Verdict::Wait => None,
        }
    }

    /// A receiver of the pool's watch: the running one, or a new one started from the
    /// version of `from`.
    fn subscribe(&self, pool: &str, from: &PortAssignment) -> watch::Receiver<Seen> {
        let mut follows = self.follows.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(sender) = follows.get(pool) {
            return sender.subscribe();
        }
        let (sender, receiver) = watch::channel(Seen::Nothing);
        follows.insert(pool.to_owned(), sender.clone());
        let version = from.resource_version().unwrap_or_default();
        tokio::spawn(self.clone().follow(pool.to_owned(), version, sender));
        receiver
    }

    /// Follows one pool with a watch from `version` and publishes every version of it,
    /// for as long as some acquire waits on it.
    async fn follow(self, pool: String, mut version: String, seen: watch::Sender<Seen>) {
        let fields = format!("metadata.name={pool}");
        loop {
            let params = WatchParams::default().fields(&fields).timeout(290);
            let stream = tokio::select! {
                _ = seen.closed() => if self.unfollow(&pool, &seen) { return } else { continue },
                stream = self.api.watch(&params, &version) => stream,
            };
            let mut stream = match stream {
                Ok(stream) => stream.boxed(),
                Err(error) => {
                    if self.failed(&pool, &seen, &error).await {
                        return;
                    }
                    continue;
                }
            };
            loop {
                let event = tokio::select! {
                    _ = seen.closed() => {
                        if self.unfollow(&pool, &seen) { return } else { continue }
                    }
                    event = stream.next() => event,
                };
                match event {
                    None => break,
                    Some(Err(error)) => {
                        if self.failed(&pool, &seen, &error).await {
                            return;
                        }
                        break;
                    }
                    Some(Ok(WatchEvent::Added(object) | WatchEvent::Modified(object))) => {
                        version = object.resource_version().unwrap_or_default();
                        seen.send_replace(Seen::Object(Arc::new(object)));
                    }
                    Some(Ok(WatchEvent::Deleted(_))) => {
                        seen.send_replace(Seen::Deleted);
                        self.unfollow(&pool, &seen);
                        return;
                    }
                    Some(Ok(WatchEvent::Bookmark(bookmark))) => version = bookmark.metadata.resource_version,
                    // Too old to watch from: read the pool afresh and go on from there.
                    Some(Ok(WatchEvent::Error(status))) if status.code == 410 => {
                        match self.api.get_opt(&pool).await {
                            Ok(Some(object)) => {
                                version = object.resource_version().unwrap_or_default();
                                seen.send_replace(Seen::Object(Arc::new(object)));
                            }
                            Ok(None) => {
                                seen.send_replace(Seen::Deleted);
                                self.unfollow(&pool, &seen);
                                return;
                            }
                            Err(error) => {
                                if self.failed(&pool, &seen, &error).await {
                                    return;
                                }
                            }
                        }
                        break;
                    }
                    Some(Ok(WatchEvent::Error(status))) => {
                        if self.failed(&pool, &seen, &kube::Error::Api(status)).await {
                            return;
                        }
                        break;
                    }
                }
            }
        }
    }

    /// Stops following `pool` if no acquire waits on it any more (checked under the lock
    /// new waiters subscribe under, so none is left without a watch).
    fn unfollow(&self, pool: &str, seen: &watch::Sender<Seen>) -> bool {
        let mut follows = self.follows.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if seen.receiver_count() > 0 && !matches!(*seen.borrow(), Seen::Deleted | Seen::Failed(_)) {
            return false;
        }
        if follows.get(pool).is_some_and(|s| s.same_channel(seen)) {
            follows.remove(pool);
        }
        true
    }

    /// A watch call failed: refusals end the follow (the waiters report them); anything
    /// else is retried after a pause. Whether the follow ended.
    async fn failed(&self, pool: &str, seen: &watch::Sender<Seen>, error: &kube::Error) -> bool {
        if let kube::Error::Api(status) = error
            && matches!(status.code, 401 | 403 | 404)
        {
            seen.send_replace(Seen::Failed(Failure { code: status.code, message: status.message.clone() }));
            self.unfollow(pool, seen);
            return true;
        }
        tracing::debug!(%error, pool, "watch of the pool failed; retrying");
        tokio::time::sleep(Duration::from_millis(500)).await;
        false
    }

    fn assignment(&self, pool: &Pool, key: &str, port: u16) -> Assignment {
        Assignment {
            key: key.to_owned(),
            port,
            node: pool.node.clone(),
            namespace: self.namespace.clone(),
            pool: pool.name.clone(),
            protocol: pool.protocol,
        }
    }

    fn no_agent(&self, pool: &Pool, key: &str) -> Error {
        Error::NoAgent {
            key: key.to_owned(),
            node: pool.node.clone(),
            namespace: self.namespace.clone(),
            pool: pool.name.clone(),
            timeout: self.timeout,
        }
    }

    fn unusable(&self, pool: &Pool, key: &str, why: String) -> Error {
        Error::PoolUnusable { namespace: self.namespace.clone(), pool: pool.name.clone(), key: key.to_owned(), why }
    }

    /// Names the failure of an API call: refused by RBAC, or other.
    fn api_error(&self, source: kube::Error, what: &str, pool: &str) -> Error {
        match &source {
            kube::Error::Api(status) if status.code == 403 => {
                Error::Forbidden { namespace: self.namespace.clone(), message: status.message.clone() }
            }
            _ => Error::Api { what: format!("{what} (pool {}/{pool})", self.namespace), source },
        }
    }
}

/// Whether the pool the key was written to is the one asked for.
fn usable(object: &PortAssignment, pool: &Pool) -> Result<(), String> {
    if object.spec.node_name != pool.node {
        return Err(format!("it is for node {}, not {}", object.spec.node_name, pool.node));
    }
    if object.spec.protocol != pool.protocol {
        return Err(format!(
            "it is for protocol {}, not {}",
            protocol_name(object.spec.protocol),
            protocol_name(pool.protocol)
        ));
    }
    Ok(())
}

/// Whether the API server refused a write because the object it would make has no
/// `spec.nodeName`: the key's apply reached a pool that does not exist.
fn lacks_node(status: &kube::core::Status) -> bool {
    status.code == 422
        && status
            .details
            .as_ref()
            .is_some_and(|d| d.causes.iter().any(|c| c.field == "spec.nodeName" && c.reason == "FieldValueRequired"))
}

/// The protocol as the API writes it (TCP, UDP, TCPUDP).
pub fn protocol_name(protocol: Protocol) -> String {
    serde_json::to_value(protocol).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}

/// The field managers recorded on an object.
fn managers(object: &PortAssignment) -> impl Iterator<Item = &str> {
    object.metadata.managed_fields.iter().flatten().filter_map(|m| m.manager.as_deref())
}

#[cfg(test)]
mod tests;
