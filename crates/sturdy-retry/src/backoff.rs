//! Backoff strategies: how long to sleep before the next attempt.

use std::fmt;
use std::time::Duration;

use rand::Rng;

/// A backoff strategy. All three are capped; the jittered ones draw from the RNG they are given,
/// so tests can seed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backoff {
    /// `sleep = min(cap, random_between(base, prev * 3))`, starting from `prev = base`: spreads
    /// clients apart while growing about as fast as exponential backoff. The default
    /// \[base 250 ms, cap 20 s\].
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
    /// (`None` before the first).
    pub fn delay<R: Rng + ?Sized>(
        &self,
        retry: u32,
        prev: Option<Duration>,
        rng: &mut R,
    ) -> Duration {
        match *self {
            Self::DecorrelatedJitter { base, cap } => {
                let prev = prev.unwrap_or(base).max(base);
                let hi = prev.saturating_mul(3).min(cap);
                if hi <= base {
                    return base.min(cap);
                }
                rng.random_range(base..=hi)
            }
            Self::Exponential { base, cap } => exp(base, cap, retry),
            Self::FullJitter { base, cap } => {
                let hi = exp(base, cap, retry);
                rng.random_range(Duration::ZERO..=hi)
            }
        }
    }
}

fn exp(base: Duration, cap: Duration, retry: u32) -> Duration {
    let shift = retry.saturating_sub(1).min(31);
    base.saturating_mul(1u32 << shift).min(cap)
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
    use rand::SeedableRng;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn validation() {
        assert!(Backoff::decorrelated_jitter(Duration::ZERO, MS).is_err());
        assert!(Backoff::exponential(MS * 10, MS).is_err());
        assert!(Backoff::full_jitter(MS, MS).is_ok());
    }

    #[test]
    fn decorrelated_stays_in_bounds() {
        let b = Backoff::default();
        let mut rng = SmallRng::seed_from_u64(7);
        let mut prev = None;
        for n in 1..200 {
            let d = b.delay(n, prev, &mut rng);
            let lo = Duration::from_millis(250);
            let hi = (prev.unwrap_or(lo) * 3).min(Duration::from_secs(20));
            assert!(d >= lo && d <= hi, "{d:?} not in [{lo:?}, {hi:?}]");
            prev = Some(d);
        }
    }

    #[test]
    fn exponential_doubles_to_the_cap() {
        let b = Backoff::exponential(MS * 100, MS * 1_000).unwrap();
        let mut rng = SmallRng::seed_from_u64(1);
        let got: Vec<u128> = (1..=6)
            .map(|n| b.delay(n, None, &mut rng).as_millis())
            .collect();
        assert_eq!(got, [100, 200, 400, 800, 1_000, 1_000]);
        assert_eq!(b.delay(u32::MAX, None, &mut rng), MS * 1_000);
    }

    #[test]
    fn full_jitter_under_the_curve() {
        let b = Backoff::full_jitter(MS * 100, MS * 1_000).unwrap();
        let mut rng = SmallRng::seed_from_u64(3);
        for n in 1..50 {
            assert!(b.delay(n, None, &mut rng) <= exp(MS * 100, MS * 1_000, n));
        }
    }
}
