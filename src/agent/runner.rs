//! Which object is reconciled when: the agent's reconcile queue and the loop that runs it.
//!
//! The same contract as kube-runtime's `Controller` (which the agent used before): an
//! object triggered by the watch (or woken by a released port) is reconciled with the
//! latest copy in the reflector's store; never two reconciles of one object at once (a
//! trigger during a reconcile runs it again right after); at most `concurrency`
//! reconciles at a time; a reconcile asks to run again after a delay, or its failure's
//! retry delay does; the earlier of two requests wins; nothing runs before the store
//! holds the initial list; on shutdown nothing new starts and running reconciles end.
//!
//! The difference, and the reason it exists: kube-runtime's scheduler files every
//! request, even one due now, in a millisecond timer wheel whose deadlines round up to
//! the next tick, so each watch event waited 1-2 ms before its reconcile started, on a
//! path (key added → port in the status) of about 5 ms (docs/benchmarks.md §5). Here a
//! request due now goes straight to the ready queue; only delayed requests use a timer.
//!
//! [`Queue`] is the bookkeeping with the time passed in; [`run`] drives it.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    future::Future,
    hash::Hash,
    sync::Arc,
    time::Duration,
};

use futures::{Stream, StreamExt, stream::FuturesUnordered};
use kube::runtime::{
    reflector::{Lookup, ObjectRef, Store},
    watcher,
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What a reconcile asks for next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Nothing until the object changes (or is woken).
    AwaitChange,
    /// Reconcile again after this long, unless something triggers it sooner.
    RequeueAfter(Duration),
}

/// The reconcile queue: ready objects in trigger order, running ones, and delayed
/// requests ordered by due time. Every object is in at most one of ready, running and
/// delayed (a running one may also be marked to run again).
#[derive(Debug)]
pub struct Queue<T> {
    ready: VecDeque<T>,
    queued: HashSet<T>,
    running: HashSet<T>,
    again: HashSet<T>,
    delayed: BTreeMap<(Instant, u64), T>,
    due_at: HashMap<T, (Instant, u64)>,
    seq: u64,
}

impl<T> Default for Queue<T> {
    fn default() -> Self {
        Queue {
            ready: VecDeque::new(),
            queued: HashSet::new(),
            running: HashSet::new(),
            again: HashSet::new(),
            delayed: BTreeMap::new(),
            due_at: HashMap::new(),
            seq: 0,
        }
    }
}

impl<T: Clone + Eq + Hash> Queue<T> {
    /// `object` should be reconciled now: ready at once, or again as soon as its running
    /// reconcile ends. A delayed request for it is dropped (this one is sooner).
    pub fn trigger(&mut self, object: T) {
        if self.running.contains(&object) {
            self.again.insert(object);
            return;
        }
        if let Some(key) = self.due_at.remove(&object) {
            self.delayed.remove(&key);
        }
        if self.queued.insert(object.clone()) {
            self.ready.push_back(object);
        }
    }

    /// `object` should be reconciled at `at` (`now` is the time): a request due already
    /// is a trigger; otherwise the earlier of this and a delayed request already there
    /// is kept, and nothing changes for an object ready or running.
    pub fn schedule(&mut self, object: T, at: Instant, now: Instant) {
        if at <= now {
            return self.trigger(object);
        }
        if self.queued.contains(&object) || self.running.contains(&object) {
            return;
        }
        if let Some(&(old, seq)) = self.due_at.get(&object) {
            if old <= at {
                return;
            }
            self.delayed.remove(&(old, seq));
        }
        self.seq += 1;
        self.delayed.insert((at, self.seq), object.clone());
        self.due_at.insert(object, (at, self.seq));
    }

    /// Moves the delayed requests due at `now` to the ready queue.
    pub fn wake_due(&mut self, now: Instant) {
        while let Some(entry) = self.delayed.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let object = entry.remove();
            self.due_at.remove(&object);
            self.trigger(object);
        }
    }

    /// When the next delayed request is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.delayed.first_key_value().map(|((at, _), _)| *at)
    }

    /// The next ready object, now counted as running, if fewer than `limit` run.
    pub fn start(&mut self, limit: usize) -> Option<T> {
        if self.running.len() >= limit {
            return None;
        }
        let object = self.ready.pop_front()?;
        self.queued.remove(&object);
        self.running.insert(object.clone());
        Some(object)
    }

    /// `object`'s reconcile ended (at `now`) asking for `next`: it runs again at once if
    /// it was triggered meanwhile, else as `next` asks.
    pub fn finish(&mut self, object: T, next: Next, now: Instant) {
        self.running.remove(&object);
        if self.again.remove(&object) {
            return self.trigger(object);
        }
        if let Next::RequeueAfter(delay) = next {
            self.schedule(object, now + delay, now);
        }
    }
}

/// The objects a reflected watch's events ask to reconcile: an object applied by a
/// watch event at once; the objects of a list (the first, or a relist after the watch
/// failed) only when the list is done, because the reflector's store holds them only from
/// then on: a reconcile started earlier would find an object the list brought new (one
/// created while the watch was down) missing from the store and skip it for good.
/// Deletions ask for nothing: an object with the agent's finalizer is applied again
/// with its deletion timestamp, and one without holds no port. Watch errors pass through.
pub fn triggers<K, E>(
    events: impl Stream<Item = Result<watcher::Event<K>, E>>,
) -> impl Stream<Item = Result<ObjectRef<K>, E>>
where
    K: Lookup + Clone,
    K::DynamicType: Default + Eq + Hash + Clone,
{
    events
        .scan(Vec::new(), |listed: &mut Vec<ObjectRef<K>>, event| {
            let now: Vec<Result<ObjectRef<K>, E>> = match event {
                Ok(watcher::Event::Apply(object)) => vec![Ok(object.to_object_ref(Default::default()))],
                Ok(watcher::Event::Init) => {
                    listed.clear();
                    Vec::new()
                }
                Ok(watcher::Event::InitApply(object)) => {
                    listed.push(object.to_object_ref(Default::default()));
                    Vec::new()
                }
                Ok(watcher::Event::InitDone) => std::mem::take(listed).into_iter().map(Ok).collect(),
                Ok(watcher::Event::Delete(_)) => Vec::new(),
                Err(error) => vec![Err(error)],
            };
            std::future::ready(Some(futures::stream::iter(now)))
        })
        .flatten()
}

/// Reconciles the objects `triggers` names until `shutdown` (or the end of `triggers`),
/// then waits for the reconciles running. `reconcile` gets the store's latest copy; an
/// object no longer in the store is skipped (its deletion was seen). A failed reconcile
/// runs again after the delay `error_policy` returns.
pub async fn run<K, Ctx, E, Fut>(
    triggers: impl Stream<Item = ObjectRef<K>>,
    store: Store<K>,
    reconcile: impl Fn(Arc<K>, Arc<Ctx>) -> Fut,
    error_policy: impl Fn(Arc<K>, &E, Arc<Ctx>) -> Duration,
    ctx: Arc<Ctx>,
    concurrency: usize,
    shutdown: CancellationToken,
) where
    K: Lookup + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone,
    Fut: Future<Output = Result<Next, E>>,
{
    let mut queue = Queue::default();
    let mut running = FuturesUnordered::new();
    let mut triggers = std::pin::pin!(triggers);
    let mut listed = false;
    let mut store_ready = std::pin::pin!(store.wait_until_ready());
    let concurrency = concurrency.max(1);
    loop {
        if listed {
            while let Some(reference) = queue.start(concurrency) {
                match store.get(&reference) {
                    Some(object) => {
                        let (ctx, attempt) = (ctx.clone(), reconcile(object.clone(), ctx.clone()));
                        let error_policy = &error_policy;
                        running.push(async move {
                            let next = match attempt.await {
                                Ok(next) => next,
                                Err(error) => Next::RequeueAfter(error_policy(object, &error, ctx)),
                            };
                            (reference, next)
                        });
                    }
                    None => queue.finish(reference, Next::AwaitChange, Instant::now()),
                }
            }
        }
        let next_due = queue.next_due();
        tokio::select! {
            _ = shutdown.cancelled() => break,
            // Resolves once; the store answers "ready" only after the initial list.
            result = &mut store_ready, if !listed => {
                if result.is_err() {
                    break;
                }
                listed = true;
            }
            trigger = triggers.next() => match trigger {
                Some(reference) => queue.trigger(reference),
                None => break,
            },
            Some((reference, next)) = running.next(), if !running.is_empty() => {
                queue.finish(reference, next, Instant::now());
            }
            _ = sleep_until(next_due), if next_due.is_some() => queue.wake_due(Instant::now()),
        }
    }
    while running.next().await.is_some() {}
}

async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::runtime::reflector;
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::UnboundedReceiverStream;

    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_trigger_is_ready_at_once_and_counted_once() {
        let mut q = Queue::default();
        q.trigger("a");
        q.trigger("b");
        q.trigger("a");
        assert_eq!(q.start(10), Some("a"));
        assert_eq!(q.start(10), Some("b"));
        assert_eq!(q.start(10), None);
    }

    #[test]
    fn an_object_never_runs_twice_at_once() {
        let (mut q, t0) = (Queue::default(), Instant::now());
        q.trigger("a");
        assert_eq!(q.start(10), Some("a"));
        q.trigger("a");
        q.trigger("a");
        assert_eq!(q.start(10), None, "a is running");
        q.finish("a", Next::AwaitChange, t0);
        assert_eq!(q.start(10), Some("a"), "triggered while running: runs again right after");
        q.finish("a", Next::AwaitChange, t0);
        assert_eq!(q.start(10), None, "the triggers during one run make one run");
    }

    #[test]
    fn at_most_the_limit_run() {
        let (mut q, t0) = (Queue::default(), Instant::now());
        for o in ["a", "b", "c"] {
            q.trigger(o);
        }
        assert_eq!(q.start(2), Some("a"));
        assert_eq!(q.start(2), Some("b"));
        assert_eq!(q.start(2), None);
        q.finish("a", Next::AwaitChange, t0);
        assert_eq!(q.start(2), Some("c"));
    }

    #[test]
    fn a_requeue_waits_its_delay_and_a_trigger_overtakes_it() {
        let (mut q, t0) = (Queue::default(), Instant::now());
        q.trigger("a");
        q.start(1);
        q.finish("a", Next::RequeueAfter(ms(100)), t0);
        assert_eq!(q.next_due(), Some(t0 + ms(100)));
        q.wake_due(t0 + ms(99));
        assert_eq!(q.start(1), None, "not due yet");
        q.wake_due(t0 + ms(100));
        assert_eq!(q.start(1), Some("a"));
        q.finish("a", Next::RequeueAfter(ms(100)), t0 + ms(100));
        q.trigger("a");
        assert_eq!(q.next_due(), None, "the trigger replaced the later request");
        assert_eq!(q.start(1), Some("a"));
    }

    #[test]
    fn the_earlier_of_two_delayed_requests_wins() {
        let (mut q, t0) = (Queue::default(), Instant::now());
        q.schedule("a", t0 + ms(50), t0);
        q.schedule("a", t0 + ms(80), t0);
        assert_eq!(q.next_due(), Some(t0 + ms(50)));
        q.schedule("a", t0 + ms(20), t0);
        assert_eq!(q.next_due(), Some(t0 + ms(20)));
        q.wake_due(t0 + ms(20));
        assert_eq!(q.next_due(), None, "one request, one run");
        assert_eq!(q.start(5), Some("a"));
        assert_eq!(q.start(5), None);
    }

    #[test]
    fn a_request_due_already_is_a_trigger() {
        let (mut q, t0) = (Queue::default(), Instant::now());
        q.schedule("a", t0, t0);
        assert_eq!(q.next_due(), None);
        assert_eq!(q.start(1), Some("a"));
    }

    fn config_map(name: &str) -> ConfigMap {
        ConfigMap {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    /// The store listed with `objects` (the watcher's initial list done).
    fn listed_store(objects: &[&str]) -> (Store<ConfigMap>, reflector::store::Writer<ConfigMap>) {
        let (store, mut writer) = reflector::store();
        writer.apply_watcher_event(&watcher::Event::Init);
        for name in objects {
            writer.apply_watcher_event(&watcher::Event::InitApply(config_map(name)));
        }
        writer.apply_watcher_event(&watcher::Event::InitDone);
        (store, writer)
    }

    /// A list's objects are asked for once, when the list is done (the store holds them
    /// from then on); a list started again forgets the objects of the one it replaces.
    #[tokio::test]
    async fn a_lists_objects_are_asked_for_when_the_list_is_done() {
        use watcher::Event::{Apply, Delete, Init, InitApply, InitDone};
        let events = futures::stream::iter([
            Ok(Init),
            Ok(InitApply(config_map("a"))),
            Ok(InitApply(config_map("b"))),
            Ok(InitDone),
            Ok(Apply(config_map("c"))),
            Err("watch failed"),
            Ok(Init),
            Ok(InitApply(config_map("a"))),
            Ok(Init),
            Ok(InitApply(config_map("d"))),
            Ok(InitDone),
            Ok(Delete(config_map("d"))),
        ]);
        let asked: Vec<Result<String, &str>> =
            triggers(events).map(|r| r.map(|reference| reference.name)).collect().await;
        let names = |list: &[&str]| list.iter().map(|n| Ok(n.to_string())).collect::<Vec<_>>();
        let mut expected = names(&["a", "b", "c"]);
        expected.push(Err("watch failed"));
        expected.extend(names(&["d"]));
        assert_eq!(asked, expected);
    }

    /// A runner over `store` on a test task: send it triggers, then stop it.
    struct Running {
        triggers: mpsc::UnboundedSender<ObjectRef<ConfigMap>>,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    impl Running {
        fn start<E, Fut>(
            store: Store<ConfigMap>,
            reconcile: impl Fn(Arc<ConfigMap>, Arc<()>) -> Fut + Send + Sync + 'static,
            error_policy: impl Fn(Arc<ConfigMap>, &E, Arc<()>) -> Duration + Send + Sync + 'static,
        ) -> Running
        where
            E: Send + 'static,
            Fut: Future<Output = Result<Next, E>> + Send + 'static,
        {
            let (triggers, rx) = mpsc::unbounded_channel();
            let shutdown = CancellationToken::new();
            let stream = UnboundedReceiverStream::new(rx);
            let task = tokio::spawn(run(stream, store, reconcile, error_policy, Arc::new(()), 4, shutdown.clone()));
            Running { triggers, shutdown, task }
        }

        fn trigger(&self, name: &str) {
            self.triggers.send(ObjectRef::new(name).within("ns")).unwrap();
        }

        async fn stop(self) {
            self.shutdown.cancel();
            self.task.await.unwrap();
        }
    }

    fn never_fails(_: Arc<ConfigMap>, _: &std::convert::Infallible, _: Arc<()>) -> Duration {
        Duration::ZERO
    }

    /// A trigger is reconciled without the clock moving (the clock is paused: any timer
    /// on the way would have to be advanced by hand), a requeue only once its delay has
    /// passed, and shutdown waits for the reconcile running.
    #[tokio::test(start_paused = true)]
    async fn a_trigger_runs_without_a_timer_and_a_requeue_after_its_delay() {
        let (store, _writer) = listed_store(&["a"]);
        let (runs_tx, mut runs) = mpsc::unbounded_channel();
        let started = Instant::now();
        let reconcile = move |object: Arc<ConfigMap>, _: Arc<()>| {
            let runs_tx = runs_tx.clone();
            async move {
                runs_tx.send((object.metadata.name.clone().unwrap_or_default(), Instant::now())).ok();
                Ok::<_, std::convert::Infallible>(Next::RequeueAfter(ms(300)))
            }
        };
        let runner = Running::start(store, reconcile, never_fails);
        runner.trigger("a");
        let (name, at) = runs.recv().await.unwrap();
        assert_eq!((name.as_str(), at - started), ("a", Duration::ZERO), "reconciled at once");
        let (_, at) = runs.recv().await.unwrap();
        assert_eq!(at - started, ms(300), "the requeue ran after its delay");
        runner.stop().await;
    }

    /// A failed reconcile runs again after the delay the error policy gives it.
    #[tokio::test(start_paused = true)]
    async fn a_failure_runs_again_after_the_error_policy_delay() {
        let (store, _writer) = listed_store(&["a"]);
        let (runs_tx, mut runs) = mpsc::unbounded_channel();
        let started = Instant::now();
        let reconcile = move |_: Arc<ConfigMap>, _: Arc<()>| {
            runs_tx.send(Instant::now()).ok();
            std::future::ready(Err::<Next, _>("refused"))
        };
        let policy = |_: Arc<ConfigMap>, error: &&str, _: Arc<()>| {
            assert_eq!(*error, "refused");
            ms(250)
        };
        let runner = Running::start(store, reconcile, policy);
        runner.trigger("a");
        let times = [runs.recv().await.unwrap(), runs.recv().await.unwrap(), runs.recv().await.unwrap()];
        assert_eq!(times.map(|t| t - started), [ms(0), ms(250), ms(500)]);
        runner.stop().await;
    }

    /// A reconcile of an object triggered again while it runs: the second run starts
    /// after the first ends, not beside it.
    #[tokio::test(start_paused = true)]
    async fn a_trigger_during_a_reconcile_runs_after_it() {
        let (store, _writer) = listed_store(&["a", "b"]);
        let log = Arc::new(Mutex::new(Vec::new()));
        let reconcile = {
            let log = log.clone();
            move |object: Arc<ConfigMap>, _: Arc<()>| {
                let log = log.clone();
                async move {
                    let name = object.metadata.name.clone().unwrap_or_default();
                    log.lock().unwrap().push(format!("start {name}"));
                    tokio::time::sleep(ms(100)).await;
                    log.lock().unwrap().push(format!("end {name}"));
                    Ok::<_, std::convert::Infallible>(Next::AwaitChange)
                }
            }
        };
        let runner = Running::start(store, reconcile, never_fails);
        runner.trigger("a");
        tokio::time::sleep(ms(10)).await;
        runner.trigger("a");
        runner.trigger("b");
        tokio::time::sleep(ms(500)).await;
        runner.stop().await;
        assert_eq!(*log.lock().unwrap(), ["start a", "start b", "end a", "start a", "end b", "end a"]);
    }

    /// Nothing runs before the store has its initial list: the objects of the list are
    /// not in it until the list is done.
    #[tokio::test(start_paused = true)]
    async fn nothing_runs_before_the_initial_list() {
        let (store, mut writer) = reflector::store::<ConfigMap>();
        let runs = Arc::new(Mutex::new(Vec::new()));
        let reconcile = {
            let runs = runs.clone();
            move |object: Arc<ConfigMap>, _: Arc<()>| {
                runs.lock().unwrap().push(object.metadata.name.clone().unwrap_or_default());
                std::future::ready(Ok::<_, std::convert::Infallible>(Next::AwaitChange))
            }
        };
        let runner = Running::start(store, reconcile, never_fails);
        writer.apply_watcher_event(&watcher::Event::Init);
        writer.apply_watcher_event(&watcher::Event::InitApply(config_map("a")));
        runner.trigger("a");
        tokio::time::sleep(ms(50)).await;
        assert!(runs.lock().unwrap().is_empty(), "ran before the list was done");
        writer.apply_watcher_event(&watcher::Event::InitDone);
        tokio::time::sleep(ms(50)).await;
        assert_eq!(*runs.lock().unwrap(), ["a"]);
        runner.stop().await;
    }
}
