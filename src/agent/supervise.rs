//! The agent's background tasks, owned: the HTTP server, the pod watch, the
//! reserved-ports refresh and the vanished-object sweep each run under a [`Supervisor`].
//! None of them is meant to end before the agent is told to stop. If one does (its stream
//! ended, it panicked), the agent would go on assigning from a frozen view of the node and
//! answering ready, so instead the supervisor logs which task ended and why, turns the
//! agent not ready and stops it; [`super::Running::wait`] then returns
//! [`super::Error::TaskEnded`] and `portassign agent` exits non-zero, for the DaemonSet
//! to restart it (the restart rebuilds everything from the statuses).
//!
//! [`Faults`] lets a test end or panic a task's work on purpose; the default injects
//! nothing.

use std::{
    future::Future,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::error;

/// The HTTP server (health, readiness, metrics, table).
pub const HTTP_SERVER: &str = "http server";
/// The watch of the node's pods.
pub const POD_WATCH: &str = "pod watch";
/// The periodic read of the kernel's reserved ports.
pub const RESERVED_PORTS: &str = "reserved-ports refresh";
/// The sweep that releases objects gone without their finalizer.
pub const VANISHED_SWEEP: &str = "vanished-object sweep";
/// The DRA driver's socket for the kubelet plugin (only with `--dra-port-range`).
pub const DRA_DRIVER: &str = "DRA driver";
/// Every supervised task that always runs.
pub const TASKS: [&str; 4] = [HTTP_SERVER, POD_WATCH, RESERVED_PORTS, VANISHED_SWEEP];

/// Faults injected into named tasks after a delay (tests only; empty by default).
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Tasks whose work stops after the delay, as if its stream had ended.
    pub end: Vec<(&'static str, Duration)>,
    /// Tasks that panic after the delay.
    pub panic: Vec<(&'static str, Duration)>,
}

/// Spawns the agent's background tasks and stops the agent when one ends on its own.
#[derive(Clone)]
pub(crate) struct Supervisor {
    ended: mpsc::UnboundedSender<(&'static str, String)>,
    faults: Faults,
}

impl Supervisor {
    /// A supervisor that, when a task ends before `shutdown` is cancelled, records why in
    /// `failure`, clears `ready` and cancels `shutdown`.
    pub(crate) fn new(
        faults: Faults,
        ready: Arc<AtomicBool>,
        shutdown: CancellationToken,
        failure: Arc<Mutex<Option<String>>>,
    ) -> Self {
        let (ended, mut reports) = mpsc::unbounded_channel::<(&'static str, String)>();
        tokio::spawn(async move {
            while let Some((task, how)) = reports.recv().await {
                // Tasks end when the agent stops: that is no failure.
                if shutdown.is_cancelled() {
                    continue;
                }
                let message = format!("the agent's {task} task {how}");
                error!(task, "{message}: the agent stops and turns not ready, so that it is restarted");
                ready.store(false, Ordering::SeqCst);
                failure.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(message);
                shutdown.cancel();
            }
        });
        Supervisor { ended, faults }
    }

    /// Runs `work` as the task `name`.
    pub(crate) fn spawn(&self, name: &'static str, work: impl Future<Output = ()> + Send + 'static) {
        let end = self.faults.end.iter().find(|(task, _)| *task == name).map(|(_, after)| *after);
        let panic = self.faults.panic.iter().find(|(task, _)| *task == name).map(|(_, after)| *after);
        let work = async move {
            tokio::select! {
                () = work => {}
                () = sleep_or_never(end) => {}
                () = sleep_or_never(panic) => panic!("fault injected into the {name} task"),
            }
        };
        let ended = self.ended.clone();
        let handle = tokio::spawn(work);
        tokio::spawn(async move {
            let how = match handle.await {
                Ok(()) => "ended".to_owned(),
                Err(error) if error.is_panic() => format!("panicked: {}", panic_message(error.into_panic())),
                Err(error) => format!("was cancelled: {error}"),
            };
            let _ = ended.send((name, how));
        });
    }
}

async fn sleep_or_never(after: Option<Duration>) {
    match after {
        Some(after) => tokio::time::sleep(after).await,
        None => std::future::pending().await,
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned())
}
