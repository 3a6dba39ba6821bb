//! Typed waits and predicates on PortAssignments.

use std::{
    collections::BTreeMap,
    future::Future,
    time::{Duration, Instant},
};

use portassign::api::PortAssignment;

/// Polls `check` until it returns Some, or panics after `timeout` naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The key→port map of an object's status.
pub fn ports_of(object: &PortAssignment) -> BTreeMap<String, u16> {
    object.status.iter().flat_map(|s| &s.ports).map(|e| (e.key.clone(), e.port)).collect()
}

/// The status and reason of the Ready condition.
pub fn ready_reason(object: &PortAssignment) -> Option<(String, String)> {
    object.ready_condition().map(|c| (c.status.clone(), c.reason.clone()))
}
