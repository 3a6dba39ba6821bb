//! One agent per node: the node lock.
//!
//! An agent holds its node's lock for as long as it allocates. The lock is a Unix
//! socket bound to a name in the *abstract* namespace (no file): the kernel refuses a
//! second bind of the name in the same network namespace, and frees the name the
//! instant its holder's socket closes, which a process's death does. The chart's agent
//! runs on the node's network namespace (`hostNetwork`), the port space it hands out,
//! so every agent allocating from one node's ports meets the same lock; nothing on the
//! node's filesystem, no RBAC, no expiry to wait out after a crash (docs/design.md §8).
//!
//! The holder listens on its socket: a waiting agent connects, reads one line in which
//! the holder says who it is (pid and agent name), and then waits for the end of that
//! connection, which comes when the holder goes, so it takes over at once, not after
//! a polling period.

use std::{
    io,
    os::{
        linux::net::SocketAddrExt,
        unix::{ffi::OsStrExt, net::SocketAddr},
    },
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use portassign_api::fnv1a;

use super::metrics::Metrics;

/// The lock name of `node`'s agent unless `--lock-name` says otherwise.
pub fn default_name(node: &str) -> String {
    format!("portassign-agent/{node}")
}

/// Longest abstract socket name Linux accepts (`sun_path` is 108 bytes, the first a NUL).
const MAX_NAME: usize = 107;

/// The abstract socket name of lock `name`: the name itself, or, when it is too long,
/// its start followed by a hash of the whole name, so distinct names stay distinct.
fn socket_name(name: &str) -> Vec<u8> {
    if name.len() <= MAX_NAME {
        return name.as_bytes().to_vec();
    }
    let suffix = format!("#{:016x}", fnv1a(name.as_bytes()));
    let mut out = name.as_bytes()[..MAX_NAME - suffix.len()].to_vec();
    out.extend_from_slice(suffix.as_bytes());
    out
}

fn address(name: &str) -> io::Result<SocketAddr> {
    SocketAddr::from_abstract_name(socket_name(name))
}

/// The same address for `socket2` (a path that starts with a NUL byte is abstract).
fn socket2_address(name: &str) -> io::Result<socket2::SockAddr> {
    let path = [&[0u8][..], &socket_name(name)].concat();
    socket2::SockAddr::unix(std::ffi::OsStr::from_bytes(&path))
}

/// Connects to the holder of lock `name` without blocking (a blocking connect would
/// wait while the holder's backlog is full).
fn connect(name: &str) -> io::Result<UnixStream> {
    let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    socket.connect(&socket2_address(name)?)?;
    UnixStream::from_std(socket.into())
}

/// How long a waiting agent gives the holder to say who it is.
const HELLO_WAIT: Duration = Duration::from_secs(1);
/// Pauses between attempts while the name is bound but nobody answers on it (between
/// a holder's death and the name's release, or a program that is not an agent).
const MIN_PAUSE: Duration = Duration::from_millis(1);
const MAX_PAUSE: Duration = Duration::from_millis(100);
/// Longest hello line read from a holder.
const MAX_HELLO: u64 = 256;
/// Refused this long, the name is held by something that does not answer: say so.
const SILENT_HOLDER: Duration = Duration::from_millis(300);

/// Who holds the lock, as a waiting agent learnt it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Holder {
    /// The line the holder sent (`pid=N agent=NAME`).
    Said(String),
    /// The name is bound, but its holder does not say who it is (not an agent, or hung).
    Silent,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Holder::Said(line) => f.write_str(line),
            Holder::Silent => f.write_str("a process that does not answer on the lock"),
        }
    }
}

/// What a holder said, fit for a log line (it may not be an agent).
fn printable(line: &[u8]) -> String {
    String::from_utf8_lossy(line).trim().chars().filter(|c| !c.is_control()).collect()
}

/// A held node lock; released when [`NodeLock::release`]d, dropped, or the process dies.
pub struct NodeLock {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl NodeLock {
    /// Releases the lock and returns once its name is free.
    pub async fn release(mut self) {
        self.stop.cancel();
        let _ = (&mut self.task).await;
    }
}

impl Drop for NodeLock {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Takes lock `name` if it is free.
fn try_bind(name: &str) -> io::Result<Option<UnixListener>> {
    match std::os::unix::net::UnixListener::bind_addr(&address(name)?) {
        Ok(listener) => {
            listener.set_nonblocking(true)?;
            Ok(Some(UnixListener::from_std(listener)?))
        }
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Ok(None),
        Err(e) => Err(e),
    }
}

/// Serves the held lock: tells every waiting agent who holds it (`hello`), and keeps
/// their connections open until the lock is released. The listener is closed first,
/// so a waiter that sees its connection end finds the name free.
fn serve(listener: UnixListener, hello: String) -> NodeLock {
    let stop = CancellationToken::new();
    let token = stop.clone();
    let task = tokio::spawn(async move {
        let connections = CancellationToken::new();
        loop {
            let accepted = tokio::select! {
                _ = token.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            let Ok((mut stream, _)) = accepted else {
                // Out of file descriptors, say: the waiter retries; do not spin.
                tokio::time::sleep(MAX_PAUSE).await;
                continue;
            };
            let line = format!("{hello}\n");
            let done = connections.clone();
            tokio::spawn(async move {
                let _ = stream.write_all(line.as_bytes()).await;
                let mut sink = [0u8; 64];
                loop {
                    tokio::select! {
                        _ = done.cancelled() => return,
                        read = stream.read(&mut sink) => if matches!(read, Ok(0) | Err(_)) { return },
                    }
                }
            });
        }
        drop(listener);
        connections.cancel();
    });
    NodeLock { stop, task }
}

/// Takes lock `name`, waiting for as long as another process holds it. `hello` is what
/// this process tells waiters about itself once it holds the lock; `waiting` is called
/// each time the lock is found held by a holder other than the last one reported.
pub async fn acquire(name: &str, hello: &str, mut waiting: impl FnMut(&Holder)) -> io::Result<NodeLock> {
    let mut reported: Option<Holder> = None;
    let mut report = |holder: Holder| {
        if reported.as_ref() != Some(&holder) {
            waiting(&holder);
            reported = Some(holder);
        }
    };
    let mut pause = MIN_PAUSE;
    let mut refused_since: Option<Instant> = None;
    loop {
        if let Some(listener) = try_bind(name)? {
            return Ok(serve(listener, hello.to_owned()));
        }
        match connect(name) {
            Ok(stream) => {
                refused_since = None;
                let mut reader = BufReader::new(stream);
                let mut line = Vec::new();
                let mut limited = (&mut reader).take(MAX_HELLO);
                match tokio::time::timeout(HELLO_WAIT, limited.read_until(b'\n', &mut line)).await {
                    // The holder went before it said anything: try again shortly (a
                    // process that closes every connection at once must not make this
                    // loop spin).
                    Ok(Ok(0)) | Ok(Err(_)) => {
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(MAX_PAUSE);
                        continue;
                    }
                    Ok(Ok(_)) => report(Holder::Said(printable(&line))),
                    Err(_) => report(Holder::Silent),
                }
                pause = MIN_PAUSE;
                // The connection ends when the holder goes.
                let mut sink = [0u8; 64];
                while !matches!(reader.read(&mut sink).await, Ok(0) | Err(_)) {}
            }
            Err(_) => {
                // Bound but not listening: the holder is going (its name outlives its
                // connections by an instant), or the name is held by something else;
                // or the holder's backlog is full.
                let since = *refused_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= SILENT_HOLDER {
                    report(Holder::Silent);
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_PAUSE);
            }
        }
    }
}

/// The agent's side: takes the node lock named `name` (or the node's default name),
/// retrying on unexpected errors, while the agent counts as on standby. `None` when
/// `shutdown` comes first.
pub(crate) async fn hold(
    node: &str,
    name: Option<&str>,
    instance: Option<&str>,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> Option<NodeLock> {
    let name = name.map_or_else(|| default_name(node), str::to_owned);
    let hello = format!("pid={} agent={}", std::process::id(), instance.unwrap_or("-"));
    let mut delay = Duration::from_millis(200);
    loop {
        let waiting = |holder: &Holder| {
            metrics.set_standby(true);
            warn!(node, lock = %name, %holder, "another agent holds this node's lock: standing by, not allocating, until it goes");
        };
        let attempt = tokio::select! {
            _ = shutdown.cancelled() => return None,
            attempt = acquire(&name, &hello, waiting) => attempt,
        };
        match attempt {
            Ok(lock) => {
                if metrics.standby() {
                    info!(node, lock = %name, "took over this node's lock: the other agent is gone");
                }
                metrics.set_standby(false);
                return Some(lock);
            }
            Err(error) => {
                metrics.set_standby(true);
                warn!(node, lock = %name, %error, "could not take this node's lock; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unique(test: &str) -> String {
        format!("portassign-unit/{}/{test}", std::process::id())
    }

    #[test]
    fn names_fit_and_stay_distinct() {
        assert_eq!(socket_name("portassign-agent/worker-1"), b"portassign-agent/worker-1");
        let long_a = default_name(&format!("{}a", "n".repeat(252)));
        let long_b = default_name(&format!("{}b", "n".repeat(252)));
        assert_eq!(socket_name(&long_a).len(), MAX_NAME);
        assert_ne!(socket_name(&long_a), socket_name(&long_b));
        assert!(address(&long_a).is_ok());
        let exact = "x".repeat(MAX_NAME);
        assert_eq!(socket_name(&exact), exact.as_bytes());
    }

    #[test]
    fn what_a_holder_says_is_logged_without_control_characters() {
        assert_eq!(printable(b"pid=7 agent=portassign-x2k\n"), "pid=7 agent=portassign-x2k");
        assert_eq!(printable(b"\x1b[2Jpid=7\r\xff\n"), "[2Jpid=7\u{fffd}");
    }

    #[tokio::test]
    async fn a_second_taker_waits_until_the_holder_releases() {
        let name = unique("second");
        let first = acquire(&name, "pid=1 agent=first", |_| panic!("the lock is free")).await.unwrap();
        assert!(try_bind(&name).unwrap().is_none(), "held");

        let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
        let taker = name.clone();
        let second =
            tokio::spawn(
                async move { acquire(&taker, "pid=2 agent=second", |h| seen_tx.send(h.clone()).unwrap()).await },
            );
        let holder = tokio::time::timeout(Duration::from_secs(5), seen.recv()).await.unwrap().unwrap();
        assert_eq!(holder, Holder::Said("pid=1 agent=first".into()));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!second.is_finished(), "waits while the first holds the lock");

        first.release().await;
        let second = tokio::time::timeout(Duration::from_secs(5), second).await.unwrap().unwrap().unwrap();
        assert!(try_bind(&name).unwrap().is_none(), "held by the second");
        assert!(seen.try_recv().is_err(), "the holder was reported once");
        drop(second);
    }

    #[tokio::test]
    async fn a_holder_that_never_answers_is_reported_silent_and_waited_for() {
        let name = unique("mute");
        // Listening, never accepting: connections wait in its backlog, nothing is said.
        let mute = std::os::unix::net::UnixListener::bind_addr(&address(&name).unwrap()).unwrap();
        let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
        let taker = name.clone();
        let waiter = tokio::spawn(async move { acquire(&taker, "pid=4", |h| seen_tx.send(h.clone()).unwrap()).await });
        let holder = tokio::time::timeout(Duration::from_secs(5), seen.recv()).await.unwrap().unwrap();
        assert_eq!(holder, Holder::Silent);
        assert!(!waiter.is_finished());
        drop(mute);
        let lock = tokio::time::timeout(Duration::from_secs(5), waiter).await.unwrap().unwrap().unwrap();
        lock.release().await;
    }

    #[tokio::test]
    async fn a_name_bound_by_a_silent_process_is_reported_and_waited_for() {
        let name = unique("silent");
        // A stream socket bound to the name, never listening: not an agent.
        let squatter = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).unwrap();
        squatter.bind(&socket2_address(&name).unwrap()).unwrap();
        let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
        let taker = name.clone();
        let waiter = tokio::spawn(async move { acquire(&taker, "pid=3", |h| seen_tx.send(h.clone()).unwrap()).await });
        let holder = tokio::time::timeout(Duration::from_secs(5), seen.recv()).await.unwrap().unwrap();
        assert_eq!(holder, Holder::Silent);
        drop(squatter);
        let lock = tokio::time::timeout(Duration::from_secs(5), waiter).await.unwrap().unwrap().unwrap();
        lock.release().await;
        assert!(try_bind(&name).unwrap().is_some(), "free after release");
    }
}
