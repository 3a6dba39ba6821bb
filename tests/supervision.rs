//! The agent's background tasks are supervised (docs/design.md §5, "Supervised tasks"):
//! when the work of any of them ends or panics before the agent is told to stop, the agent
//! turns not ready and stops with an error naming the task — `portassign agent` exits
//! non-zero and its DaemonSet restarts it — instead of assigning from a frozen view of the
//! node. Each task's work is ended on purpose through `agent::supervise::Faults`, against
//! the real API server.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use portassign::agent::{
    Error, Running,
    probe::SocketProbe,
    supervise::{self, Faults},
};
use portassign_testkit::{World, port_block};

/// An agent of `w` with `faults`, ready.
async fn agent_with(w: &World, faults: Faults) -> Running {
    let mut config = w.agent_config(&w.node, port_block(2));
    config.faults = faults;
    w.agent_as(&w.agent_identity, config, Arc::new(SocketProbe::detect())).await
}

/// Waits (bounded) for `agent` to stop on its own, and returns its error.
async fn stopped(agent: Running) -> String {
    match tokio::time::timeout(Duration::from_secs(30), agent.wait()).await {
        Ok(Err(Error::TaskEnded(message))) => message,
        Ok(other) => panic!("the agent stopped with {other:?}, not a task error"),
        Err(_) => panic!("the agent still ran 30 s after its task's work ended"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_stops_not_ready_when_any_task_ends() {
    for task in supervise::TASKS {
        let w = World::new("supervised").await;
        // Long enough for the agent to be ready first (the vanished-object sweep starts
        // with the controller).
        let agent = agent_with(&w, Faults { end: vec![(task, Duration::from_secs(2))], ..Faults::default() }).await;
        assert!(agent.is_ready(), "{task}: ready before the fault");
        let ready = agent.ready_flag();
        let message = stopped(agent).await;
        assert_eq!(message, format!("the agent's {task} task ended"), "{task}");
        assert!(!ready.load(Ordering::SeqCst), "{task}: not ready once stopped");
        w.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_panicking_task_stops_the_agent_with_the_panic() {
    let w = World::new("panicked").await;
    let faults = Faults { panic: vec![(supervise::POD_WATCH, Duration::from_secs(2))], ..Faults::default() };
    let agent = agent_with(&w, faults).await;
    let message = stopped(agent).await;
    assert_eq!(message, "the agent's pod watch task panicked: fault injected into the pod watch task");
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn stopping_the_agent_is_no_failure() {
    let w = World::new("unsupervised").await;
    let agent = agent_with(&w, Faults::default()).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    agent.stop().await.expect("every task ends with the agent, and that is no failure");
    w.cleanup().await;
}
