//! A stand-in for the agent that does the least a controller must: the baseline the
//! benchmarks measure the agent against.
//!
//! It watches one node's PortAssignments (the agent's field selector) and, for every
//! generation of an object it has not answered, applies a Ready status that gives each
//! key a port (keeping the ports keys already had) — no probe, no table, no events. With
//! `finalizer` it also adds the agent's finalizer first (the JSON patch kube's finalizer
//! helper sends) and removes it when the object is deleted, as the agent must: the
//! convergence benchmark's *write floor*. Without, it is the acquire benchmark's *minimal
//! responder*. At most `concurrency` objects are answered at once.
//!
//! It runs as a process of its own, like the agent: a benchmark binary re-runs itself
//! with its `standin` subcommand ([`StandIn::spawn`]), which calls [`run`].

use std::{
    collections::{BTreeMap, HashMap},
    io::{BufRead, BufReader, Write},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU16, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, anyhow};
use futures::TryStreamExt;
use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{WatchStreamExt, watcher},
};
use portassign::api::{
    CONDITION_READY, FINALIZER, PortAssignment, PortAssignmentStatus, PortEntry, node_selector, reason,
};
use serde_json::json;
use tokio::sync::Semaphore;

/// Field manager of the stand-in's status writes.
pub const MANAGER: &str = "portassign-standin";

/// What the stand-in last started for an object (by uid), so each write is made once.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Started {
    Answer(Option<i64>),
    Release,
}

/// Runs the stand-in for `node` with the credentials of `KUBECONFIG`; prints `ready` once
/// its watch has listed. Returns only if the watch fails.
pub async fn run(node: &str, finalizer: bool, concurrency: usize) -> anyhow::Result<()> {
    let client = Client::try_default().await.context("stand-in: no client from KUBECONFIG")?;
    let config = watcher::Config::default().fields(&node_selector(node));
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let started: Arc<Mutex<HashMap<String, Started>>> = Arc::default();
    let next_port = Arc::new(AtomicU16::new(20000));
    let mut events =
        std::pin::pin!(watcher::watcher(Api::<PortAssignment>::all(client.clone()), config).default_backoff());
    while let Some(event) = events.try_next().await? {
        let object = match event {
            watcher::Event::InitDone => {
                println!("ready");
                std::io::stdout().flush()?;
                continue;
            }
            watcher::Event::Init => continue,
            watcher::Event::Delete(object) => {
                started.lock().expect("lock").remove(&object.uid().unwrap_or_default());
                continue;
            }
            watcher::Event::Apply(object) | watcher::Event::InitApply(object) => object,
        };
        let has_finalizer = object.finalizers().iter().any(|f| f == FINALIZER);
        let generation = object.metadata.generation;
        let want = if object.metadata.deletion_timestamp.is_some() {
            if !(finalizer && has_finalizer) {
                continue;
            }
            Started::Release
        } else {
            let answered = object.status.as_ref().is_some_and(|s| s.observed_generation == generation);
            if answered && (has_finalizer || !finalizer) {
                continue;
            }
            Started::Answer(generation)
        };
        if started.lock().expect("lock").insert(object.uid().unwrap_or_default(), want) == Some(want) {
            continue;
        }
        let api: Api<PortAssignment> = Api::namespaced(client.clone(), &object.namespace().unwrap_or_default());
        let (permits, next_port) = (permits.clone(), next_port.clone());
        tokio::spawn(async move {
            let _permit = permits.acquire_owned().await;
            let result = match want {
                Started::Answer(_) => answer(&api, &object, finalizer && !has_finalizer, &next_port).await,
                Started::Release => patch_finalizers(&api, &object, false).await,
            };
            if let Err(error) = result {
                eprintln!("stand-in: {}: {error:#}", object.name_any());
            }
        });
    }
    Ok(())
}

/// Adds the finalizer if asked, then applies a Ready status with a port per key.
async fn answer(
    api: &Api<PortAssignment>,
    object: &PortAssignment,
    add_finalizer: bool,
    next_port: &AtomicU16,
) -> anyhow::Result<()> {
    if add_finalizer {
        patch_finalizers(api, object, true).await?;
    }
    let held: BTreeMap<&str, u16> =
        object.status.iter().flat_map(|s| &s.ports).map(|e| (e.key.as_str(), e.port)).collect();
    let ports = object
        .spec
        .keys
        .iter()
        .map(|key| {
            let port = held.get(key.as_str()).copied().unwrap_or_else(|| next_port.fetch_add(1, Ordering::Relaxed));
            (key.clone(), port)
        })
        .collect();
    let body = json!({
        "apiVersion": PortAssignment::api_version(&()),
        "kind": PortAssignment::kind(&()),
        "status": ready_status(object, ports),
    });
    let (name, params, body) = (object.name_any(), PatchParams::apply(MANAGER).force(), Patch::Apply(body));
    retry(|| api.patch_status(&name, &params, &body)).await.context("applying the status")?;
    Ok(())
}

/// Adds the agent's finalizer to an object that has none, or removes it: the JSON patches
/// kube's finalizer helper sends.
async fn patch_finalizers(api: &Api<PortAssignment>, object: &PortAssignment, add: bool) -> anyhow::Result<()> {
    let patch = if add {
        json!([
            { "op": "test", "path": "/metadata/finalizers", "value": null },
            { "op": "add", "path": "/metadata/finalizers", "value": [FINALIZER] },
        ])
    } else {
        let index = object.finalizers().iter().position(|f| f == FINALIZER).unwrap_or_default();
        let path = format!("/metadata/finalizers/{index}");
        json!([{ "op": "test", "path": path, "value": FINALIZER }, { "op": "remove", "path": path }])
    };
    let patch: Patch<()> = Patch::Json(serde_json::from_value(patch)?);
    let (name, params) = (object.name_any(), PatchParams::default());
    retry(|| api.patch(&name, &params, &patch)).await.context("patching the finalizers")?;
    Ok(())
}

/// Retries a write a few times (the API server under load may time out a request).
async fn retry<T, F, Fut>(mut write: F) -> Result<T, kube::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, kube::Error>>,
{
    let mut attempt = 0;
    loop {
        match write().await {
            Err(_) if attempt < 5 => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            result => return result,
        }
    }
}

/// A Ready status recording `ports` (key → port), shaped as the agent writes it.
pub fn ready_status(object: &PortAssignment, ports: BTreeMap<String, u16>) -> PortAssignmentStatus {
    let generation = object.metadata.generation;
    PortAssignmentStatus {
        observed_generation: generation,
        key_count: object.spec.keys.len() as u32,
        assigned_count: ports.len() as u32,
        conditions: vec![Condition {
            type_: CONDITION_READY.into(),
            status: "True".into(),
            reason: reason::ALLOCATED.into(),
            message: format!("all {} keys have a port", ports.len()),
            observed_generation: generation,
            last_transition_time: Time(Timestamp::now()),
        }],
        ports: ports.into_iter().map(|(key, port)| PortEntry { key, port }).collect(),
        pod_conflicts: Vec::new(),
    }
}

/// A running stand-in process, killed when dropped.
pub struct StandIn {
    child: Child,
}

impl StandIn {
    /// Re-runs this binary as `standin --node NODE [--finalizer] --concurrency N` with
    /// the credentials of `kubeconfig` (the agent's, so both make their writes under
    /// the same identity and RBAC), its stderr in `log`; returns once its watch has listed.
    pub fn spawn(
        kubeconfig: &Path,
        node: &str,
        finalizer: bool,
        concurrency: usize,
        log: &Path,
    ) -> anyhow::Result<StandIn> {
        let mut command = Command::new(std::env::current_exe()?);
        command.args(["standin", "--node", node, "--concurrency", &concurrency.to_string()]);
        if finalizer {
            command.arg("--finalizer");
        }
        let mut child = command
            .env("KUBECONFIG", kubeconfig)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log)?)
            .spawn()
            .context("spawning the stand-in")?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout pipe"))?;
        let standin = StandIn { child };
        let (ready, wait) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let _ = ready.send(line.unwrap_or_default());
            }
        });
        let line = wait.recv_timeout(Duration::from_secs(30)).context("the stand-in did not list within 30 s")?;
        anyhow::ensure!(line.trim() == "ready", "unexpected output from the stand-in: {line}");
        Ok(standin)
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
