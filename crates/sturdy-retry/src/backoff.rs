//! Backoff strategies: how long to sleep before the next attempt.

use std::fmt;
use std::time::Duration;

/// A backoff strategy. All three are capped; the jittered ones turn a random number they are
/// given into a sleep, so the caller chooses (and tests seed) the random source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backoff {
    /// `sleep = min(cap, random_between(base, prev * 3))`, starting from `prev = base`: spreads
    /// clients apart while growing about as fast as exponential backoff. The default
    /// \[base 250 ms, cap 20 s\].
    ///
    /// The draw is made on `[base, 3 * prev]` and *then* capped, exactly as the formula reads:
    /// once `3 * prev` passes the cap, every draw above the cap sleeps the cap, so a client that
    /// keeps failing waits near the cap (the point of a cap is to bound the wait, not to shorten
    /// it). Drawing on `[base, min(cap, 3 * prev)]` instead would make the sleeps at the cap about
    /// 40 % shorter than the formula says, and never equal to the cap.
    DecorrelatedJitter {
        /// The smallest sleep.
        base: Duration,
        /// The largest sleep.
        cap: Duration,
    },
    /// `sleep = min(cap, base * 2^(retry - 1))`, no randomness (clients stay in lock-step; prefer
    /// a jittered strategy unless you need determinism).
    Exponential {
        /// The first sleep.
        base: Duration,
        /// The largest sleep.
        cap: Duration,
    },
    /// `sleep = random_between(0, min(cap, base * 2^(retry - 1)))`.
    FullJitter {
        /// The scale of the first sleep.
        base: Duration,
        /// The largest sleep.
        cap: Duration,
    },
}

/// A backoff whose parameters make no sense.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidBackoff(&'static str);

impl fmt::Display for InvalidBackoff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid backoff: {}", self.0)
    }
}

impl std::error::Error for InvalidBackoff {}

impl Default for Backoff {
    fn default() -> Self {
        Self::DecorrelatedJitter {
            base: Duration::from_millis(250),
            cap: Duration::from_secs(20),
        }
    }
}

impl Backoff {
    /// Decorrelated jitter with `base` and `cap`.
    ///
    /// # Errors
    /// When `base` is zero or larger than `cap`.
    pub fn decorrelated_jitter(base: Duration, cap: Duration) -> Result<Self, InvalidBackoff> {
        check(base, cap).map(|()| Self::DecorrelatedJitter { base, cap })
    }

    /// Exponential backoff without jitter.
    ///
    /// # Errors
    /// When `base` is zero or larger than `cap`.
    pub fn exponential(base: Duration, cap: Duration) -> Result<Self, InvalidBackoff> {
        check(base, cap).map(|()| Self::Exponential { base, cap })
    }

    /// Exponential backoff with full jitter.
    ///
    /// # Errors
    /// When `base` is zero or larger than `cap`.
    pub fn full_jitter(base: Duration, cap: Duration) -> Result<Self, InvalidBackoff> {
        check(base, cap).map(|()| Self::FullJitter { base, cap })
    }

    /// The smallest sleep of the strategy (its base).
    pub fn base(&self) -> Duration {
        match *self {
            Self::DecorrelatedJitter { base, .. }
            | Self::Exponential { base, .. }
            | Self::FullJitter { base, .. } => base,
        }
    }

    /// The sleep before retry number `retry` (1 for the first retry), given the previous sleep
    /// (`None` before the first) and `random`, a uniformly random `u64` (ignored by
    /// [`Backoff::Exponential`]). The same inputs always give the same sleep.
    ///
    /// ```
    /// use std::time::Duration;
    /// use sturdy_retry::Backoff;
    ///
    /// let b = Backoff::decorrelated_jitter(Duration::from_millis(100), Duration::from_secs(1)).unwrap();
    /// // The smallest and the largest draw of the first retry: base and 3 * base.
    /// assert_eq!(b.delay(1, None, 0), Duration::from_millis(100));
    /// assert_eq!(b.delay(1, None, u64::MAX), Duration::from_millis(300));
    /// // Past the cap, the draw is capped.
    /// assert_eq!(b.delay(5, Some(Duration::from_millis(900)), u64::MAX), Duration::from_secs(1));
    /// ```
    pub fn delay(&self, retry: u32, prev: Option<Duration>, random: u64) -> Duration {
        match *self {
            Self::DecorrelatedJitter { base, cap } => {
                let prev = prev.unwrap_or(base).max(base);
                let hi = prev.saturating_mul(3);
                between(base, hi, random).min(cap)
            }
            Self::Exponential { base, cap } => exp(base, cap, retry),
            Self::FullJitter { base, cap } => {
                between(Duration::ZERO, exp(base, cap, retry), random)
            }
        }
    }
}

/// Maps a uniformly random `u64` onto `[lo, hi]` (nanosecond resolution), without bias worth
/// speaking of and without overflow.
fn between(lo: Duration, hi: Duration, random: u64) -> Duration {
    if hi <= lo {
        return lo;
    }
    let span = (hi - lo).as_nanos().saturating_add(1);
    let r = u128::from(random);
    // span * r / 2^64, computed in two halves so that no product overflows.
    let offset = (span >> 64) * r + (((span & u128::from(u64::MAX)) * r) >> 64);
    let secs = u64::try_from(offset / 1_000_000_000).unwrap_or(u64::MAX);
    let nanos = u32::try_from(offset % 1_000_000_000).unwrap_or(0);
    lo.saturating_add(Duration::new(secs, nanos))
}

fn exp(base: Duration, cap: Duration, retry: u32) -> Duration {
    sturdy_core::clock::doubled(base, retry.saturating_sub(1), cap)
}

fn check(base: Duration, cap: Duration) -> Result<(), InvalidBackoff> {
    if base.is_zero() {
        Err(InvalidBackoff("base must be greater than zero"))
    } else if base > cap {
        Err(InvalidBackoff("base must not exceed cap"))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn validation() {
        assert!(Backoff::decorrelated_jitter(Duration::ZERO, MS).is_err());
        assert!(Backoff::exponential(MS * 10, MS).is_err());
        assert!(Backoff::full_jitter(MS, MS).is_ok());
    }

    #[test]
    fn exponential_follows_its_formula_past_retry_32() {
        // `min(cap, base * 2^(retry - 1))` for every retry: it stopped doubling at retry 32.
        let b = Backoff::exponential(Duration::from_nanos(1), Duration::from_secs(3_600)).unwrap();
        assert_eq!(b.delay(1, None, 7), Duration::from_nanos(1));
        assert_eq!(b.delay(33, None, 7), Duration::from_nanos(1 << 32));
        assert_eq!(b.delay(40, None, 7), Duration::from_nanos(1 << 39));
        assert_eq!(b.delay(43, None, 7), Duration::from_secs(3_600));
        assert_eq!(b.delay(u32::MAX, None, 7), Duration::from_secs(3_600));
        let huge = Backoff::exponential(Duration::MAX, Duration::MAX).unwrap();
        assert_eq!(huge.delay(u32::MAX, None, 7), Duration::MAX);
    }

    #[test]
    fn decorrelated_stays_in_bounds() {
        let b = Backoff::default();
        let mut rng = SmallRng::seed_from_u64(7);
        let mut prev = None;
        for n in 1..200 {
            let d = b.delay(n, prev, rng.random());
            let lo = Duration::from_millis(250);
            let hi = (prev.unwrap_or(lo) * 3).min(Duration::from_secs(20));
            assert!(d >= lo && d <= hi, "{d:?} not in [{lo:?}, {hi:?}]");
            prev = Some(d);
        }
    }

    #[test]
    fn decorrelated_follows_the_formula_at_the_cap() {
        // base 100 ms, cap 1 s, previous sleep at the cap: draws are uniform on [100 ms, 3 s]
        // and then capped, so about (3 - 1) / (3 - 0.1) = 69 % of them are exactly the cap.
        let b = Backoff::decorrelated_jitter(MS * 100, MS * 1_000).unwrap();
        let mut rng = SmallRng::seed_from_u64(11);
        let n = 100_000;
        let (mut at_cap, mut sum) = (0u32, 0.0);
        for _ in 0..n {
            let d = b.delay(9, Some(MS * 1_000), rng.random());
            if d == MS * 1_000 {
                at_cap += 1;
            }
            sum += d.as_secs_f64();
        }
        let share = f64::from(at_cap) / f64::from(n);
        assert!((0.68..0.70).contains(&share), "{share}");
        // Mean: 0.69 * 1 s + 0.31 * 0.55 s = 0.86 s.
        let mean = sum / f64::from(n);
        assert!((0.85..0.87).contains(&mean), "{mean}");
    }

    #[test]
    fn the_random_number_spans_the_range() {
        assert_eq!(between(MS, MS * 3, 0), MS);
        assert_eq!(between(MS, MS * 3, u64::MAX), MS * 3);
        assert_eq!(between(MS, MS * 3, u64::MAX / 2), MS * 2);
        assert_eq!(between(MS * 5, MS, 7), MS * 5);
        let huge = Duration::MAX;
        assert!(between(Duration::ZERO, huge, u64::MAX) <= huge);
    }

    #[test]
    fn exponential_doubles_to_the_cap() {
        let b = Backoff::exponential(MS * 100, MS * 1_000).unwrap();
        let mut rng = SmallRng::seed_from_u64(1);
        let got: Vec<u128> = (1..=6)
            .map(|n| b.delay(n, None, rng.random()).as_millis())
            .collect();
        assert_eq!(got, [100, 200, 400, 800, 1_000, 1_000]);
        assert_eq!(b.delay(u32::MAX, None, rng.random()), MS * 1_000);
    }

    #[test]
    fn full_jitter_under_the_curve() {
        let b = Backoff::full_jitter(MS * 100, MS * 1_000).unwrap();
        let mut rng = SmallRng::seed_from_u64(3);
        for n in 1..50 {
            assert!(b.delay(n, None, rng.random()) <= exp(MS * 100, MS * 1_000, n));
        }
    }
}
