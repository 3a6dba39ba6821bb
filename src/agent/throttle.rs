//! A bound on the agent's write rate: a token bucket every API write takes a token from.
//!
//! The bucket holds up to `burst` tokens and refills at `rate` tokens a second. A write
//! that finds no token *reserves* the next one (the count goes below zero) and waits until
//! it is due, so waiting writes are served in the order they asked, each sleeping once,
//! and over any interval of length `t` at most `burst + rate × t` writes start. The
//! arithmetic ([`Bucket`]) takes the time as an argument; [`Throttle`] is the async,
//! shared wrapper the agent uses.

use std::time::{Duration, Instant};

/// The bucket's settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    /// Tokens added per second (writes per second, sustained).
    pub per_second: f64,
    /// Tokens the bucket holds at most (writes that may start at once after a quiet spell).
    pub burst: u32,
}

/// Default sustained write rate of one agent.
pub const DEFAULT_RATE: f64 = 500.0;
/// Default burst of one agent.
pub const DEFAULT_BURST: u32 = 2000;

impl Default for Rate {
    fn default() -> Self {
        Rate { per_second: DEFAULT_RATE, burst: DEFAULT_BURST }
    }
}

/// Token bucket arithmetic with the time passed in.
#[derive(Clone, Debug)]
pub struct Bucket {
    rate: Rate,
    /// Tokens at `at`; negative when writes are waiting for tokens not yet added.
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// A full bucket at `now`.
    pub fn new(rate: Rate, now: Instant) -> Self {
        Bucket { rate, tokens: f64::from(rate.burst.max(1)), at: now }
    }

    /// Takes a token at `now`: how long the write must wait for it (zero if one was there).
    pub fn take(&mut self, now: Instant) -> Duration {
        let per_second = self.rate.per_second.max(f64::MIN_POSITIVE);
        if now > self.at {
            let added = now.duration_since(self.at).as_secs_f64() * per_second;
            self.tokens = (self.tokens + added).min(f64::from(self.rate.burst.max(1)));
            self.at = now;
        }
        self.tokens -= 1.0;
        if self.tokens >= 0.0 { Duration::ZERO } else { Duration::from_secs_f64(-self.tokens / per_second) }
    }
}

/// The shared bucket of one agent.
#[derive(Debug)]
pub struct Throttle {
    bucket: std::sync::Mutex<Bucket>,
}

impl Throttle {
    /// A full bucket.
    pub fn new(rate: Rate) -> Self {
        Throttle { bucket: std::sync::Mutex::new(Bucket::new(rate, Instant::now())) }
    }

    /// Waits for a token; returns how long it waited (zero when not throttled).
    pub async fn acquire(&self) -> Duration {
        let wait = self.bucket.lock().unwrap_or_else(|p| p.into_inner()).take(Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        wait
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn a_burst_passes_then_the_rate_holds() {
        let t0 = Instant::now();
        let mut bucket = Bucket::new(Rate { per_second: 10.0, burst: 5 }, t0);
        let waits: Vec<Duration> = (0..8).map(|_| bucket.take(t0)).collect();
        assert_eq!(&waits[..5], &[Duration::ZERO; 5]);
        // The 6th, 7th and 8th wait 0.1 s, 0.2 s, 0.3 s: one token per 100 ms.
        for (wait, expected) in waits[5..].iter().zip([0.1, 0.2, 0.3]) {
            assert!((wait.as_secs_f64() - expected).abs() < 1e-9, "{wait:?} vs {expected}");
        }
    }

    #[test]
    fn tokens_refill_up_to_the_burst_only() {
        let t0 = Instant::now();
        let mut bucket = Bucket::new(Rate { per_second: 10.0, burst: 3 }, t0);
        for _ in 0..3 {
            bucket.take(t0);
        }
        let later = t0 + secs(100.0);
        let free = (0..10).take_while(|_| bucket.take(later).is_zero()).count();
        assert_eq!(free, 3);
    }

    proptest! {
        /// However the writes arrive, the number that may start by time t (their arrival
        /// plus their wait) is at most burst + rate × t.
        #[test]
        fn never_more_than_burst_plus_rate_times_elapsed(
            per_second in 1.0f64..2000.0,
            burst in 1u32..500,
            gaps_ms in proptest::collection::vec(0u64..50, 1..3000),
        ) {
            let t0 = Instant::now();
            let mut bucket = Bucket::new(Rate { per_second, burst }, t0);
            let mut now = t0;
            let mut starts = Vec::new();
            for gap in gaps_ms {
                now += Duration::from_millis(gap);
                let wait = bucket.take(now);
                starts.push((now + wait).duration_since(t0).as_secs_f64());
            }
            starts.sort_by(f64::total_cmp);
            for (i, start) in starts.iter().enumerate() {
                let allowed = f64::from(burst) + per_second * start;
                prop_assert!((i + 1) as f64 <= allowed + 1e-6, "write {} started at {start}s, allowed {allowed}", i + 1);
            }
        }
    }
}
