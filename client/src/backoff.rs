//! Reconnect delays: exponential growth with full jitter (shared/LESSONS.md, nats.go#563:
//! without jitter, every client of a restarted node comes back in the same instant).
//!
//! Owns: the delay before reconnect attempt *n*. Must not: sleep, or know about
//! sockets; the caller sleeps.
//!
//! Attempt `n` (counting from 0) waits a uniformly random time in
//! `[min, cap(n)]` with `cap(n) = min(max, min · 2^(n+1))`: the first attempt
//! waits between `min` and `2·min`, and from some attempt on, between `min` and
//! `max`. When `min == max` the delay is constant.

use std::time::Duration;

use rand::Rng;

/// Delay generator for one reconnect episode; [`Backoff::reset`] after a success.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// Delays between `min` and `max` (the caller checked `min <= max`; if not,
    /// `max` is raised to `min`).
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max: max.max(min),
            attempt: 0,
        }
    }

    /// The upper bound of the next delay.
    pub(crate) fn ceiling(&self) -> Duration {
        // 2^(attempt+1), saturating: beyond 2^63 the cap is `max` anyway.
        let factor = 1u128
            .checked_shl(self.attempt.saturating_add(1))
            .unwrap_or(u128::MAX);
        let cap = self.min.as_nanos().saturating_mul(factor);
        if cap >= self.max.as_nanos() {
            self.max
        } else {
            // Below `max`, which is a Duration, so it fits.
            Duration::from_nanos(u64::try_from(cap).unwrap_or(u64::MAX))
        }
    }

    /// The delay before the next attempt, drawn from `rng`; advances the attempt count.
    pub(crate) fn next_delay_with<R: Rng + ?Sized>(&mut self, rng: &mut R) -> Duration {
        let low = u64::try_from(self.min.as_nanos()).unwrap_or(u64::MAX);
        let high = u64::try_from(self.ceiling().as_nanos()).unwrap_or(u64::MAX);
        self.attempt = self.attempt.saturating_add(1);
        if high <= low {
            return Duration::from_nanos(low);
        }
        Duration::from_nanos(rng.random_range(low..=high))
    }

    /// The delay before the next attempt, from the thread-local generator.
    pub(crate) fn next_delay(&mut self) -> Duration {
        self.next_delay_with(&mut rand::rng())
    }

    /// Attempts made since creation or the last reset.
    #[cfg(test)]
    pub(crate) fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Starts over from `min` (after a successful connection).
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn ceiling_doubles_then_caps() {
        let mut b = Backoff::new(100 * MS, 1000 * MS);
        let mut rng = StdRng::seed_from_u64(1);
        let mut ceilings = Vec::new();
        for _ in 0..8 {
            ceilings.push(b.ceiling());
            b.next_delay_with(&mut rng);
        }
        assert_eq!(
            ceilings,
            [200, 400, 800, 1000, 1000, 1000, 1000, 1000].map(|m| m * MS)
        );
        assert_eq!(b.attempts(), 8);
        b.reset();
        assert_eq!(b.attempts(), 0);
        assert_eq!(b.ceiling(), 200 * MS);
    }

    #[test]
    fn every_delay_is_within_min_and_cap() {
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..200 {
            let mut b = Backoff::new(50 * MS, 3000 * MS);
            for _ in 0..20 {
                let cap = b.ceiling();
                let d = b.next_delay_with(&mut rng);
                assert!(
                    d >= 50 * MS && d <= cap && cap <= 3000 * MS,
                    "{d:?} {cap:?}"
                );
            }
        }
    }

    #[test]
    fn delays_are_jittered_across_the_whole_range() {
        // At the cap, 1000 draws must spread over [min, max]: some in the lowest
        // tenth, some in the highest tenth, and many distinct values.
        let mut rng = StdRng::seed_from_u64(42);
        let mut b = Backoff::new(100 * MS, 1000 * MS);
        for _ in 0..10 {
            b.next_delay_with(&mut rng);
        }
        let draws: Vec<Duration> = (0..1000).map(|_| b.next_delay_with(&mut rng)).collect();
        assert!(draws.iter().any(|d| *d < 190 * MS));
        assert!(draws.iter().any(|d| *d > 910 * MS));
        let mut distinct = draws.clone();
        distinct.sort();
        distinct.dedup();
        assert!(distinct.len() > 900);
        // Two clients with different generators do not wait the same time.
        let mut other = StdRng::seed_from_u64(43);
        let mut a = Backoff::new(100 * MS, 1000 * MS);
        let mut c = Backoff::new(100 * MS, 1000 * MS);
        let da: Vec<_> = (0..5).map(|_| a.next_delay_with(&mut rng)).collect();
        let dc: Vec<_> = (0..5).map(|_| c.next_delay_with(&mut other)).collect();
        assert_ne!(da, dc);
    }

    #[test]
    fn grows_on_average() {
        let mut rng = StdRng::seed_from_u64(3);
        let mean = |attempt: u32, rng: &mut StdRng| {
            let total: Duration = (0..2000)
                .map(|_| {
                    let mut b = Backoff::new(10 * MS, 10_000 * MS);
                    for _ in 0..attempt {
                        b.next_delay_with(rng);
                    }
                    b.next_delay_with(rng)
                })
                .sum();
            total / 2000
        };
        let m0 = mean(0, &mut rng);
        let m3 = mean(3, &mut rng);
        let m6 = mean(6, &mut rng);
        assert!(m0 < m3 && m3 < m6, "{m0:?} {m3:?} {m6:?}");
    }

    #[test]
    fn equal_bounds_give_a_constant_delay_and_huge_attempt_counts_saturate() {
        let mut rng = StdRng::seed_from_u64(0);
        let mut b = Backoff::new(250 * MS, 250 * MS);
        for _ in 0..5 {
            assert_eq!(b.next_delay_with(&mut rng), 250 * MS);
        }
        let mut b = Backoff::new(MS, Duration::from_secs(3600));
        b.attempt = u32::MAX - 1;
        assert_eq!(b.ceiling(), Duration::from_secs(3600));
        let d = b.next_delay_with(&mut rng);
        assert!(d <= Duration::from_secs(3600));
        assert_eq!(b.attempts(), u32::MAX);
        b.next_delay_with(&mut rng);
        assert_eq!(b.attempts(), u32::MAX);
        // min > max is treated as a constant min.
        let mut b = Backoff::new(5 * MS, MS);
        assert_eq!(b.next_delay(), 5 * MS);
    }
}
