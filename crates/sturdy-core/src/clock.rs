//! The wall clock, behind a trait so tests can fake it.
//!
//! Durations (backoff, quotas, breaker periods, token lifetimes) use `tokio::time` so tests can
//! pause time. Only comparisons with timestamps that come from elsewhere (webhook timestamps,
//! HTTP dates) need the wall clock, and they read it through [`WallClock`].

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// How far "forever" is: about 30 years, which no call, lease or pause outlives. Every duration
/// too long to represent (`Duration::MAX`, a peer's absurd value) is read as this, in every
/// crate, so that adding it to a time never overflows.
pub const FAR: Duration = Duration::from_secs(86_400 * 365 * 30);

/// `at + d`, for a `d` from configuration or from a peer: an instant too far to represent
/// (`Duration::MAX`, say) reads as about 30 years from `at`, which no call outlives, instead of
/// panicking.
///
/// ```
/// use std::time::Duration;
/// use sturdy_core::clock::after;
/// use tokio::time::Instant;
///
/// let now = Instant::now();
/// assert_eq!(after(now, Duration::from_secs(5)), now + Duration::from_secs(5));
/// assert!(after(now, Duration::MAX) > now + Duration::from_secs(86_400 * 365 * 29));
/// ```
pub fn after(at: tokio::time::Instant, d: Duration) -> tokio::time::Instant {
    at.checked_add(d.min(FAR))
        .or_else(|| at.checked_add(FAR))
        .unwrap_or(at)
}

/// `min(cap, base * 2^times)`, exactly, for any values: what a backoff or an open period that
/// doubles on each repeat comes to after `times` doublings. It saturates instead of overflowing
/// and never stops doubling short of `cap`, however small `base` or large `times` is.
///
/// ```
/// use std::time::Duration;
/// use sturdy_core::clock::doubled;
///
/// let ms = Duration::from_millis(1);
/// assert_eq!(doubled(ms * 250, 0, Duration::from_secs(20)), ms * 250);
/// assert_eq!(doubled(ms * 250, 3, Duration::from_secs(20)), Duration::from_secs(2));
/// assert_eq!(doubled(ms * 250, 7, Duration::from_secs(20)), Duration::from_secs(20));
/// // A nanosecond doubled 40 times is about 18 minutes; no doubling is lost on the way.
/// assert_eq!(doubled(Duration::from_nanos(1), 40, Duration::MAX), Duration::from_nanos(1 << 40));
/// assert_eq!(doubled(Duration::MAX, u32::MAX, Duration::MAX), Duration::MAX);
/// ```
pub fn doubled(base: Duration, times: u32, cap: Duration) -> Duration {
    let n = base.as_nanos();
    let scaled = if n == 0 {
        0
    } else if times >= n.leading_zeros() {
        u128::MAX
    } else {
        n << times
    };
    let capped = scaled.min(cap.as_nanos());
    // At most `cap`, so the seconds fit.
    Duration::new(
        u64::try_from(capped / 1_000_000_000).unwrap_or(u64::MAX),
        u32::try_from(capped % 1_000_000_000).unwrap_or(0),
    )
}

/// A source of wall-clock time.
pub trait WallClock: Send + Sync + fmt::Debug {
    /// The current time.
    fn now(&self) -> SystemTime;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl WallClock for SystemClock {
    fn now(&self) -> SystemTime {
        // The one sanctioned read of the system clock (see clippy.toml).
        #[allow(clippy::disallowed_methods)]
        SystemTime::now()
    }
}

/// A clock that stands still until told to move; for tests.
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    millis: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock reading `t`.
    pub fn at(t: SystemTime) -> Self {
        let c = Self::default();
        c.set(t);
        c
    }

    /// Sets the time.
    pub fn set(&self, t: SystemTime) {
        let ms = t
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        self.millis
            .store(u64::try_from(ms).unwrap_or(u64::MAX), Ordering::SeqCst);
    }

    /// Moves the time forward.
    pub fn advance(&self, d: Duration) {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self.millis.fetch_add(ms, Ordering::SeqCst);
    }
}

impl WallClock for ManualClock {
    fn now(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(self.millis.load(Ordering::SeqCst))
    }
}

impl<C: WallClock + ?Sized> WallClock for Arc<C> {
    fn now(&self) -> SystemTime {
        (**self).now()
    }
}
