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
