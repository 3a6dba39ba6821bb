//! Per-object retry backoff (sans-IO: the caller passes the time and the randomness).
//!
//! A failed reconcile is retried after a delay that grows exponentially with each
//! failure of the same object in a row, with jitter, up to a cap; a success resets it.
//! Failures come in two kinds:
//!
//! - **transient** (a conflict, a timeout, the API server unreachable, 429, 5xx): the
//!   first retries come quickly (from [`Policy::transient_base`]), because the next try
//!   will likely succeed; if the failure persists the delay still grows to the cap.
//! - **refused** (403, 422, 400, a webhook's denial, any other 4xx): the same request
//!   will most likely be refused again, so the delay starts higher
//!   ([`Policy::refused_base`]) and grows faster: 1 s, 4 s, 16 s, then the cap, which it
//!   reaches about 20 s after the first refusal, so by the end of the first minute the
//!   retries run at the cap's pace and have spread out.
//!
//! The delay of step `n` (0 for the first failure) is `min(cap, base × factorⁿ)`
//! (factor 2 for transient failures, 4 for refusals), shortened by a random fraction of
//! at most [`Policy::jitter`] so objects that failed together do not retry together. Jitter only ever shortens a delay: the cap is a true upper bound,
//! and with `N` objects failing for good the agent retries at most
//! `N / (cap × (1 − jitter))` times a second.
//!
//! Whatever the delay, a watch event on the object or a freed port still reconciles it
//! at once (the controller runs the earliest of its scheduled times).
//!
//! **Watches** ([`WatchBackoff`]) retry after a failed list or watch on a tighter
//! schedule: from 200 ms, doubling, to a cap of 2 s ([`WATCH_CAP`]), each delay
//! shortened by up to half at random. kube-runtime's default (client-go's: from 800 ms
//! to 30 s) left an agent deaf for up to half a minute after the API server came back
//! from a restart, with its node's keys waiting on nothing but that timer. With these
//! delays an agent lists again at most 2 s after the server answers, and agents that
//! lost the server together spread their relists over a second or more instead of
//! arriving at once.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use kube::runtime::utils::Backoff;

use super::table::ObjectId;

/// The longest an agent waits before it lists or watches again after a failure.
pub const WATCH_CAP: Duration = Duration::from_secs(2);
/// The first such delay.
pub const WATCH_BASE: Duration = Duration::from_millis(200);

/// The delays between attempts of a failing list or watch: `min(cap, base × 2ⁿ)` for
/// the `n`-th failure in a row, each shortened by a random fraction of at most a half
/// (so the cap is a true bound). Reset by the first event after a failure.
#[derive(Debug)]
pub struct WatchBackoff {
    failures: u32,
    rng: fastrand::Rng,
}

impl WatchBackoff {
    /// The agent's watch backoff.
    pub fn new() -> Self {
        Self::with_rng(fastrand::Rng::new())
    }

    /// The same with a given source of randomness (tests).
    pub fn with_rng(rng: fastrand::Rng) -> Self {
        WatchBackoff { failures: 0, rng }
    }
}

impl Default for WatchBackoff {
    fn default() -> Self {
        Self::new()
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let full = WATCH_BASE.saturating_mul(1 << self.failures.min(16)).min(WATCH_CAP);
        self.failures = self.failures.saturating_add(1);
        Some(full.mul_f64(1.0 - 0.5 * self.rng.f64()))
    }
}

impl Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.failures = 0;
    }
}

/// How a failed write is retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Likely to pass on the next try: conflict, timeout, unreachable, 429, 5xx.
    Transient,
    /// Refused by the API server (RBAC, validation, an admission webhook): likely to be
    /// refused again until someone changes something.
    Refused,
}

impl Failure {
    /// Classifies a Kubernetes client error.
    pub fn of(error: &kube::Error) -> Failure {
        match error {
            kube::Error::Api(status) => Failure::of_code(status.code),
            // Connection refused or reset, timeouts, TLS handshakes, bodies cut short.
            _ => Failure::Transient,
        }
    }

    /// Classifies an HTTP status code of a failed request.
    pub fn of_code(code: u16) -> Failure {
        match code {
            // 409: an optimistic-concurrency conflict, fixed by re-reading; 408/429/5xx:
            // the server is busy, restarting or behind a failing proxy.
            408 | 409 | 429 | 500..=599 => Failure::Transient,
            // 400, 401, 403, 404 (handled by the caller), 405, 413, 415, 422 ...
            400..=499 => Failure::Refused,
            // Not an HTTP failure at all (code 0: a status without a code).
            _ => Failure::Transient,
        }
    }

    /// Short static label for metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Failure::Transient => "transient",
            Failure::Refused => "refused",
        }
    }
}

/// The shape of the delays.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Policy {
    /// First delay after a transient failure.
    pub transient_base: Duration,
    /// First delay after a refusal.
    pub refused_base: Duration,
    /// Growth of the delay per transient failure in a row.
    pub transient_factor: u32,
    /// Growth of the delay per refusal in a row.
    pub refused_factor: u32,
    /// No delay is longer than this.
    pub cap: Duration,
    /// Largest fraction (0 to 1) by which jitter shortens a delay.
    pub jitter: f64,
}

/// Default cap of the retry delay.
pub const DEFAULT_CAP: Duration = Duration::from_secs(60);

impl Default for Policy {
    fn default() -> Self {
        Policy {
            transient_base: Duration::from_millis(200),
            refused_base: Duration::from_secs(1),
            transient_factor: 2,
            refused_factor: 4,
            cap: DEFAULT_CAP,
            jitter: 0.2,
        }
    }
}

impl Policy {
    /// The default policy with another cap (the bases shrink with a cap below them).
    pub fn with_cap(cap: Duration) -> Self {
        let default = Policy::default();
        Policy {
            transient_base: default.transient_base.min(cap),
            refused_base: default.refused_base.min(cap),
            cap,
            ..default
        }
    }

    /// The delay before retry number `step` (0-based) of a streak of `kind` failures,
    /// before jitter.
    pub fn nominal(&self, kind: Failure, step: u32) -> Duration {
        let (base, factor) = match kind {
            Failure::Transient => (self.transient_base, self.transient_factor),
            Failure::Refused => (self.refused_base, self.refused_factor),
        };
        // Saturates instead of overflowing: far beyond any cap anyway.
        let growth = factor.max(1).saturating_pow(step);
        base.saturating_mul(growth).min(self.cap)
    }

    /// The delay before retry `step`, shortened by `unit` (in [0, 1)) × jitter.
    pub fn delay(&self, kind: Failure, step: u32, unit: f64) -> Duration {
        let nominal = self.nominal(kind, step);
        let cut = (self.jitter.clamp(0.0, 1.0) * unit.clamp(0.0, 1.0)).min(1.0);
        nominal.mul_f64(1.0 - cut)
    }
}

/// One object's failure streak.
#[derive(Clone, Debug, PartialEq)]
pub struct Streak {
    /// Failures in a row so far.
    pub failures: u32,
    /// Kind of the last failure.
    pub kind: Failure,
    /// What the API said the last time.
    pub message: String,
    /// When the streak began.
    pub since: Instant,
    /// The nominal delay after the last failure.
    pub nominal: Duration,
}

/// What to do after a failure.
#[derive(Clone, Debug, PartialEq)]
pub struct Retry {
    /// Wait this long before retrying (unless a watch event or a freed port comes first).
    pub delay: Duration,
    /// Failures in a row, this one included.
    pub failures: u32,
    /// Whether this failure starts a new backoff step worth a log line: the first
    /// failure, a longer nominal delay than the last one, or another kind or message.
    /// Retries at the cap with the same error are not announced again.
    pub announce: bool,
    /// Whether the delay has reached the cap.
    pub capped: bool,
    /// Whether this failure differs from the last one of the streak (the first failure,
    /// another kind, another message): what the owner was told, if anything, is stale.
    pub new_situation: bool,
}

/// The failure streaks of every object in backoff.
#[derive(Debug, Default)]
pub struct Tracker {
    policy: Policy,
    streaks: HashMap<ObjectId, Streak>,
}

impl Tracker {
    /// No object in backoff.
    pub fn new(policy: Policy) -> Self {
        Tracker { policy, streaks: HashMap::new() }
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Records a failure of `object` at `now`; `unit` is a random number in [0, 1) for
    /// the jitter.
    pub fn failed(&mut self, object: &ObjectId, kind: Failure, message: &str, now: Instant, unit: f64) -> Retry {
        let previous = self.streaks.get(object);
        // A change of kind restarts the exponent from that kind's base: a refusal after
        // transient failures (or the reverse) is a different situation.
        let step = match previous {
            Some(streak) if streak.kind == kind => streak.failures,
            _ => 0,
        };
        let nominal = self.policy.nominal(kind, step);
        let delay = self.policy.delay(kind, step, unit);
        let new_situation = previous.is_none_or(|streak| streak.kind != kind || streak.message != message);
        let announce = new_situation || previous.is_some_and(|streak| nominal > streak.nominal);
        let failures = previous.map_or(1, |s| s.failures.saturating_add(1));
        let since = previous.map_or(now, |s| s.since);
        self.streaks.insert(object.clone(), Streak { failures, kind, message: message.to_owned(), since, nominal });
        Retry { delay, failures, announce, capped: nominal >= self.policy.cap, new_situation }
    }

    /// Ends `object`'s streak (it succeeded, or is gone); returns the streak it had.
    pub fn reset(&mut self, object: &ObjectId) -> Option<Streak> {
        self.streaks.remove(object)
    }

    /// `object`'s current streak.
    pub fn streak(&self, object: &ObjectId) -> Option<&Streak> {
        self.streaks.get(object)
    }

    /// The objects in backoff.
    pub fn objects(&self) -> impl Iterator<Item = &ObjectId> {
        self.streaks.keys()
    }

    /// Objects in backoff.
    pub fn len(&self) -> usize {
        self.streaks.len()
    }

    /// Whether no object is in backoff.
    pub fn is_empty(&self) -> bool {
        self.streaks.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn id(name: &str) -> ObjectId {
        ObjectId::new("ns".to_owned(), name.to_owned())
    }

    /// On a simulated clock: a watch fails at every attempt while the API server is down
    /// (from 0 to `back`), each attempt taking `attempt`; the time of the first attempt
    /// after the server is back.
    fn first_attempt_after(mut backoff: impl Backoff, back: Duration, attempt: Duration) -> Duration {
        let mut now = Duration::ZERO;
        while now < back {
            now += attempt + backoff.next().expect("a delay");
        }
        now
    }

    #[test]
    fn a_watch_lists_again_within_its_cap_after_the_server_returns_and_agents_spread_out() {
        let attempt = Duration::from_millis(5);
        for seconds in [1u64, 3, 6, 12, 20, 45, 120] {
            let back = Duration::from_secs(seconds);
            // 100 agents that lost the server at the same moment.
            let first: Vec<Duration> = (0..100)
                .map(|seed| first_attempt_after(WatchBackoff::with_rng(fastrand::Rng::with_seed(seed)), back, attempt))
                .collect();
            let (earliest, latest) = (first.iter().min().unwrap(), first.iter().max().unwrap());
            assert!(*latest <= back + WATCH_CAP + attempt, "server back at {back:?}: an agent waited until {latest:?}");
            if seconds >= 6 {
                // Capped by then: the relists spread over at least a second, not one burst.
                assert!(*latest - *earliest >= Duration::from_secs(1), "{back:?}: {earliest:?}..{latest:?}");
            }
        }
        // kube-runtime's default (from 800 ms to 30 s) is what made agents deaf for tens
        // of seconds: with the server back at 12 s, some agent waits past 20 s.
        let back = Duration::from_secs(12);
        let latest = (0..100)
            .map(|_| first_attempt_after(kube::runtime::watcher::DefaultBackoff::default(), back, attempt))
            .max()
            .unwrap();
        assert!(latest > back + Duration::from_secs(8), "the default waited at most until {latest:?}");
    }

    #[test]
    fn a_watch_backoff_grows_to_its_cap_and_starts_over_after_a_success() {
        let mut backoff = WatchBackoff::with_rng(fastrand::Rng::with_seed(7));
        let delays: Vec<Duration> = backoff.by_ref().take(8).collect();
        for (n, delay) in delays.iter().enumerate() {
            let full = (WATCH_BASE * 2u32.pow(n as u32)).min(WATCH_CAP);
            assert!(*delay <= full && *delay >= full / 2, "delay {n}: {delay:?} outside {:?}..={full:?}", full / 2);
        }
        backoff.reset();
        assert!(backoff.next().unwrap() <= WATCH_BASE, "a success starts the delays over");
    }

    #[test]
    fn classifies_codes() {
        for code in [408, 409, 429, 500, 502, 503, 504] {
            assert_eq!(Failure::of_code(code), Failure::Transient, "{code}");
        }
        for code in [400, 401, 403, 405, 413, 415, 422] {
            assert_eq!(Failure::of_code(code), Failure::Refused, "{code}");
        }
    }

    #[test]
    fn refusals_reach_the_cap_within_half_a_minute_and_reset_on_success() {
        let mut tracker = Tracker::new(Policy::default());
        let t0 = Instant::now();
        let a = id("a");
        let delays: Vec<u64> =
            (0..6).map(|_| tracker.failed(&a, Failure::Refused, "forbidden", t0, 0.0).delay.as_secs()).collect();
        assert_eq!(delays, [1, 4, 16, 60, 60, 60]);
        assert_eq!(tracker.streak(&a).map(|s| s.failures), Some(6));
        assert!(tracker.reset(&a).is_some());
        assert!(tracker.is_empty());
        assert_eq!(tracker.failed(&a, Failure::Refused, "forbidden", t0, 0.0).delay, Duration::from_secs(1));
    }

    #[test]
    fn transient_failures_retry_quickly_then_back_off_too() {
        let mut tracker = Tracker::new(Policy::default());
        let t0 = Instant::now();
        let a = id("a");
        let delays: Vec<u128> =
            (0..4).map(|_| tracker.failed(&a, Failure::Transient, "timeout", t0, 0.0).delay.as_millis()).collect();
        assert_eq!(delays, [200, 400, 800, 1600]);
        let last = (0..20).map(|_| tracker.failed(&a, Failure::Transient, "timeout", t0, 0.0)).last();
        assert_eq!(last.map(|r| (r.delay, r.capped)), Some((DEFAULT_CAP, true)));
    }

    #[test]
    fn a_change_of_kind_restarts_from_that_kinds_base() {
        let mut tracker = Tracker::new(Policy::default());
        let t0 = Instant::now();
        let a = id("a");
        for _ in 0..5 {
            tracker.failed(&a, Failure::Transient, "timeout", t0, 0.0);
        }
        let retry = tracker.failed(&a, Failure::Refused, "forbidden", t0, 0.0);
        assert_eq!((retry.delay, retry.failures, retry.announce), (Duration::from_secs(1), 6, true));
    }

    #[test]
    fn objects_back_off_independently() {
        let mut tracker = Tracker::new(Policy::default());
        let t0 = Instant::now();
        for _ in 0..5 {
            tracker.failed(&id("a"), Failure::Refused, "no", t0, 0.0);
        }
        assert_eq!(tracker.failed(&id("b"), Failure::Refused, "no", t0, 0.0).delay, Duration::from_secs(1));
        assert_eq!(tracker.len(), 2);
        tracker.reset(&id("a"));
        assert_eq!(tracker.streak(&id("b")).map(|s| s.failures), Some(1));
    }

    #[test]
    fn announces_each_step_but_not_each_retry_at_the_cap() {
        let mut tracker = Tracker::new(Policy::with_cap(Duration::from_secs(4)));
        let t0 = Instant::now();
        let a = id("a");
        let announced: Vec<bool> =
            (0..5).map(|_| tracker.failed(&a, Failure::Refused, "forbidden", t0, 0.5).announce).collect();
        // 1 s, 4 s (cap), 4 s, 4 s, 4 s
        assert_eq!(announced, [true, true, false, false, false]);
        let changed = tracker.failed(&a, Failure::Refused, "denied by webhook", t0, 0.5);
        assert!(changed.announce && changed.new_situation);
        let again = tracker.failed(&a, Failure::Refused, "denied by webhook", t0, 0.5);
        assert!(!again.new_situation);
    }

    #[test]
    fn a_small_cap_shrinks_the_bases() {
        let policy = Policy::with_cap(Duration::from_millis(100));
        assert_eq!(policy.nominal(Failure::Refused, 0), Duration::from_millis(100));
        assert_eq!(policy.nominal(Failure::Transient, 0), Duration::from_millis(100));
    }

    proptest! {
        /// Delays never exceed the cap, never fall below (1 − jitter) of the nominal
        /// delay, and the nominal delay never shrinks along a streak of one kind.
        #[test]
        fn delays_grow_monotonically_and_stay_within_bounds(
            cap_ms in 1u64..600_000,
            refused in any::<bool>(),
            units in proptest::collection::vec(0.0f64..1.0, 1..80),
        ) {
            let policy = Policy::with_cap(Duration::from_millis(cap_ms));
            let kind = if refused { Failure::Refused } else { Failure::Transient };
            let mut tracker = Tracker::new(policy);
            let a = id("a");
            let mut last_nominal = Duration::ZERO;
            for (i, unit) in units.iter().enumerate() {
                let retry = tracker.failed(&a, kind, "x", Instant::now(), *unit);
                let nominal = policy.nominal(kind, i as u32);
                prop_assert!(retry.delay <= policy.cap);
                prop_assert!(retry.delay <= nominal);
                prop_assert!(retry.delay >= nominal.mul_f64(1.0 - policy.jitter) - Duration::from_nanos(1));
                prop_assert!(nominal >= last_nominal);
                prop_assert_eq!(retry.failures as usize, i + 1);
                last_nominal = nominal;
            }
            // Enough failures always reach the cap.
            for _ in 0..40 {
                tracker.failed(&a, kind, "x", Instant::now(), 0.0);
            }
            prop_assert_eq!(tracker.failed(&a, kind, "x", Instant::now(), 0.0).delay, policy.cap);
            tracker.reset(&a);
            prop_assert_eq!(tracker.failed(&a, kind, "x", Instant::now(), 0.0).delay, policy.nominal(kind, 0));
        }
    }
}
