//! The generic cell rate algorithm, lock-free: one `AtomicU64` per key holds the theoretical
//! arrival time (TAT) in nanoseconds since the limiter's origin.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// A quota: a sustained rate and a burst.
///
/// `Quota::per_second(10)?.with_burst(5)?` lets 5 calls through at once, then one every 100 ms.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    interval: Duration,
    burst: u32,
    // Both in nanoseconds, worked out once: the decision reads them on every call.
    interval_ns: u64,
    tolerance_ns: u64,
}

/// A quota that cannot be enforced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidQuota(&'static str);

impl fmt::Display for InvalidQuota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid quota: {}", self.0)
    }
}

impl std::error::Error for InvalidQuota {}

impl fmt::Debug for Quota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Quota")
            .field("interval", &self.interval)
            .field("burst", &self.burst)
            .finish()
    }
}

impl Quota {
    /// `calls` per `period`, spaced evenly, with a burst of 1.
    ///
    /// A spacing longer than 30 years is enforced as 30 years (`Quota::new(1, Duration::MAX)`
    /// lets one call through per 30 years, which no process outlives), a spacing under one
    /// nanosecond as one nanosecond (`Quota::per_second(u32::MAX)` is a billion calls a second,
    /// more than any process makes), and a burst's whole allowance is capped at about 146 years
    /// of calls.
    ///
    /// # Errors
    /// When `calls` is 0 or `period` is zero.
    pub fn new(calls: u32, period: Duration) -> Result<Self, InvalidQuota> {
        if calls == 0 {
            return Err(InvalidQuota("at least one call per period"));
        }
        if period.is_zero() {
            return Err(InvalidQuota("the period must not be zero"));
        }
        // The clock counts nanoseconds: a finer spacing cannot be told apart from 1 ns.
        let interval = (period / calls).max(Duration::from_nanos(1));
        Ok(Self::of(interval, 1))
    }

    /// `calls` per second, with a burst of 1.
    ///
    /// # Errors
    /// When `calls` is 0.
    pub fn per_second(calls: u32) -> Result<Self, InvalidQuota> {
        Self::new(calls, Duration::from_secs(1))
    }

    /// `calls` per minute, with a burst of 1.
    ///
    /// # Errors
    /// When `calls` is 0.
    pub fn per_minute(calls: u32) -> Result<Self, InvalidQuota> {
        Self::new(calls, Duration::from_secs(60))
    }

    /// Lets up to `burst` calls through at once.
    ///
    /// # Errors
    /// When `burst` is 0.
    pub fn with_burst(self, burst: u32) -> Result<Self, InvalidQuota> {
        if burst == 0 {
            return Err(InvalidQuota("the burst must be at least 1"));
        }
        Ok(Self::of(self.interval, burst))
    }

    /// One call per `nanos` (at least 1 ns), burst 1: a pace learned from a server.
    pub(crate) fn pace_nanos(nanos: u64) -> Self {
        Self::of(Duration::from_nanos(nanos.max(1)), 1)
    }

    /// The time between two calls at the sustained rate, as enforced: at most 30 years
    /// (`Quota::new(1, Duration::MAX).interval()` is 30 years) and at least one nanosecond.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// The burst, as given to [`with_burst`](Self::with_burst) (1 by default). How many calls go
    /// at once is at most this, and fewer when the burst's whole allowance (`burst - 1`
    /// intervals) passes its cap of about 146 years (see [`new`](Self::new)).
    pub fn burst(&self) -> u32 {
        self.burst
    }

    fn of(interval: Duration, burst: u32) -> Self {
        // A time since the limiter's origin is a u64 of nanoseconds (584 years), and a saturated
        // interval or tolerance would let every call through (the TAT minus a tolerance of
        // u64::MAX is always "now"). So the interval is read as at most 30 years (one call per
        // `Duration::MAX` is one per 30 years) and the tolerance as at most 2^62 ns (146 years):
        // sums of the two stay far from the bound.
        // `interval()` reports the spacing enforced, so that what a caller adds it to (an
        // instant, a timeout) cannot overflow where the limiter does not.
        let interval = interval.min(sturdy_core::clock::FAR);
        let interval_ns = nanos(interval);
        Self {
            interval,
            burst,
            interval_ns,
            tolerance_ns: interval_ns
                .saturating_mul(u64::from(burst.saturating_sub(1)))
                .min(1 << 62),
        }
    }

    #[inline]
    fn interval_nanos(&self) -> u64 {
        self.interval_ns
    }

    #[inline]
    fn tolerance_nanos(&self) -> u64 {
        self.tolerance_ns
    }
}

pub(crate) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The instant a limiter counts from: its times are nanoseconds since then, on tokio's clock (so
/// tests can pause it).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Origin(Instant);

impl Origin {
    pub(crate) fn now() -> Self {
        Self(Instant::now())
    }

    /// Nanoseconds since the origin.
    #[inline]
    pub(crate) fn elapsed(&self) -> u64 {
        let d = Instant::now().saturating_duration_since(self.0);
        // In u64: nanoseconds since the origin fit for 584 years (`nanos` goes through u128).
        d.as_secs()
            .saturating_mul(1_000_000_000)
            .saturating_add(u64::from(d.subsec_nanos()))
    }

    /// Nanoseconds from the origin to `at` (0 before the origin, saturating far in the future).
    pub(crate) fn nanos_at(&self, at: Instant) -> u64 {
        nanos(at.saturating_duration_since(self.0))
    }

    /// The instant `n` nanoseconds after the origin (saturating far in the future).
    pub(crate) fn instant(&self, n: u64) -> Instant {
        self.0
            .checked_add(Duration::from_nanos(n))
            .unwrap_or_else(|| self.0 + sturdy_core::clock::FAR)
    }
}

/// What a reservation got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reservation {
    /// A slot, `wait` nanoseconds after the requested time.
    Granted { wait: u64 },
    /// No slot within the allowed wait; one would be `wait` nanoseconds away.
    Denied { wait: u64 },
}

/// Reserves the next slot at or after `at`, unless it is more than `max_wait` after `at`.
/// Reserving a future slot moves the TAT, so concurrent callers queue in order.
pub(crate) fn reserve(tat: &AtomicU64, quota: &Quota, at: u64, max_wait: u64) -> Reservation {
    let interval = quota.interval_nanos();
    let tolerance = quota.tolerance_nanos();
    let mut cur = tat.load(Ordering::Acquire);
    loop {
        let start = cur.max(at);
        let wait = start.saturating_sub(tolerance).saturating_sub(at);
        if wait > max_wait {
            return Reservation::Denied { wait };
        }
        match tat.compare_exchange_weak(
            cur,
            start.saturating_add(interval),
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => return Reservation::Granted { wait },
            Err(actual) => cur = actual,
        }
    }
}

/// When a call that has `ahead` calls queued before it would go, if all of them ask for their slot
/// at `at` or later and none leaves the queue: the time the call would be granted.
pub(crate) fn estimate(tat: u64, quota: &Quota, at: u64, ahead: u64) -> u64 {
    let start = tat
        .max(at)
        .saturating_add(quota.interval_nanos().saturating_mul(ahead));
    start.saturating_sub(quota.tolerance_nanos()).max(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn burst_then_spacing() {
        let q = Quota::per_second(10).unwrap().with_burst(5).unwrap();
        let tat = AtomicU64::new(0);
        let waits: Vec<u64> = (0..8)
            .map(|_| match reserve(&tat, &q, 1_000 * MS, u64::MAX) {
                Reservation::Granted { wait } => wait / MS,
                Reservation::Denied { .. } => unreachable!(),
            })
            .collect();
        assert_eq!(waits, [0, 0, 0, 0, 0, 100, 200, 300]);
    }

    #[test]
    fn denial_does_not_reserve() {
        let q = Quota::per_second(1).unwrap();
        let tat = AtomicU64::new(0);
        assert_eq!(reserve(&tat, &q, 0, 0), Reservation::Granted { wait: 0 });
        assert_eq!(
            reserve(&tat, &q, 0, 0),
            Reservation::Denied { wait: 1_000 * MS }
        );
        assert_eq!(
            reserve(&tat, &q, 0, 0),
            Reservation::Denied { wait: 1_000 * MS }
        );
        assert_eq!(
            reserve(&tat, &q, 1_000 * MS, 0),
            Reservation::Granted { wait: 0 }
        );
    }

    #[test]
    fn idle_time_refills_only_up_to_the_burst() {
        let q = Quota::per_second(10).unwrap().with_burst(3).unwrap();
        let tat = AtomicU64::new(0);
        let later = 3_600_000 * MS;
        let granted = (0..10)
            .filter(|_| reserve(&tat, &q, later, 0) == Reservation::Granted { wait: 0 })
            .count();
        assert_eq!(granted, 3);
    }

    #[test]
    fn the_estimate_matches_successive_reservations() {
        let q = Quota::per_second(10).unwrap().with_burst(3).unwrap();
        let tat = AtomicU64::new(0);
        let at = 5_000 * MS;
        let start = tat.load(Ordering::Relaxed);
        for ahead in 0..10 {
            let want = estimate(start, &q, at, ahead);
            match reserve(&tat, &q, at, u64::MAX) {
                Reservation::Granted { wait } => assert_eq!(at + wait, want, "{ahead}"),
                Reservation::Denied { .. } => unreachable!(),
            }
        }
    }

    #[test]
    fn a_quota_too_long_to_represent_still_refuses() {
        let q = Quota::new(1, Duration::MAX).unwrap().with_burst(2).unwrap();
        let tat = AtomicU64::new(0);
        let at = 1_000;
        assert!(matches!(
            reserve(&tat, &q, at, 0),
            Reservation::Granted { wait: 0 }
        ));
        assert!(matches!(
            reserve(&tat, &q, at, 0),
            Reservation::Granted { wait: 0 }
        ));
        assert!(matches!(
            reserve(&tat, &q, at, 0),
            Reservation::Denied { .. }
        ));
        let q = Quota::new(1, Duration::MAX)
            .unwrap()
            .with_burst(u32::MAX)
            .unwrap();
        let tat = AtomicU64::new(0);
        let granted = (0..100)
            .filter(|_| matches!(reserve(&tat, &q, at, 0), Reservation::Granted { .. }))
            .count();
        assert!((2..100).contains(&granted), "{granted}");
    }

    #[test]
    fn invalid_quotas() {
        assert!(Quota::per_second(0).is_err());
        assert!(Quota::new(1, Duration::ZERO).is_err());
        assert!(Quota::per_second(1).unwrap().with_burst(0).is_err());
    }

    #[test]
    fn a_spacing_past_thirty_years_is_reported_as_enforced() {
        let far = sturdy_core::clock::FAR;
        for q in [
            Quota::new(1, Duration::MAX).unwrap(),
            Quota::new(1, Duration::MAX)
                .unwrap()
                .with_burst(u32::MAX)
                .unwrap(),
            Quota::new(2, far * 3).unwrap(),
        ] {
            assert_eq!(q.interval(), far);
            assert_eq!(q.interval_nanos(), nanos(far));
            // What a caller adds it to does not overflow.
            assert!(tokio::time::Instant::now()
                .checked_add(q.interval())
                .is_some());
        }
        assert_eq!(
            Quota::new(1, far).unwrap(),
            Quota::new(1, Duration::MAX).unwrap()
        );
        assert_eq!(
            Quota::new(1, Duration::MAX)
                .unwrap()
                .with_burst(7)
                .unwrap()
                .burst(),
            7
        );
    }

    #[test]
    fn a_spacing_under_a_nanosecond_is_one_nanosecond() {
        for q in [
            Quota::new(u32::MAX, Duration::from_nanos(1)).unwrap(),
            Quota::per_second(u32::MAX).unwrap(),
            Quota::new(2, Duration::from_nanos(1)).unwrap(),
        ] {
            assert_eq!(q.interval(), Duration::from_nanos(1));
            assert_eq!(q.burst(), 1);
        }
        // A billion a second is exact; one more is the same quota.
        assert_eq!(
            Quota::per_second(1_000_000_000).unwrap(),
            Quota::per_second(1_000_000_001).unwrap()
        );
    }
}
