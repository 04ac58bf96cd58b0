use std::sync::atomic::AtomicU64;
use std::time::Duration;

use sturdy_core::RateLimited;
use tokio::time::Instant;

use crate::gcra::{nanos, reserve, Reservation};
use crate::Quota;

/// One GCRA limiter without a service around it: for code that is not an HTTP call (a tool
/// loop, a queue consumer), and the decision the [`RateLimitLayer`](crate::RateLimitLayer) makes
/// per key. Lock-free; share it behind an `Arc`.
///
/// ```
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// use std::time::Duration;
/// use sturdy_ratelimit::{DirectLimiter, Quota};
///
/// let limiter = DirectLimiter::new(Quota::per_second(2).unwrap());
/// assert!(limiter.check().is_ok());
/// let err = limiter.check().unwrap_err();
/// assert_eq!(err.retry_after(), Duration::from_millis(500));
/// // Or wait for the slot (up to a bound):
/// limiter.until_ready(Duration::from_secs(1)).await.unwrap();
/// # }
/// ```
#[derive(Debug)]
pub struct DirectLimiter {
    tat: AtomicU64,
    quota: Quota,
    origin: Instant,
}

impl DirectLimiter {
    /// A limiter enforcing `quota`.
    pub fn new(quota: Quota) -> Self {
        Self {
            tat: AtomicU64::new(0),
            quota,
            origin: Instant::now(),
        }
    }

    fn now(&self) -> u64 {
        nanos(Instant::now().saturating_duration_since(self.origin))
    }

    /// Takes a slot now if one is free.
    ///
    /// # Errors
    /// [`RateLimited`] with the time until the next free slot; nothing is reserved.
    pub fn check(&self) -> Result<(), RateLimited> {
        match reserve(&self.tat, &self.quota, self.now(), 0) {
            Reservation::Granted { .. } => Ok(()),
            Reservation::Denied { wait } => Err(RateLimited::new(Duration::from_nanos(wait))),
        }
    }

    /// Reserves the next slot no more than `max_wait` away and returns how long to wait for it.
    ///
    /// # Errors
    /// [`RateLimited`] when the next slot is further away than `max_wait`; nothing is reserved.
    pub fn reserve(&self, max_wait: Duration) -> Result<Duration, RateLimited> {
        match reserve(&self.tat, &self.quota, self.now(), nanos(max_wait)) {
            Reservation::Granted { wait } => Ok(Duration::from_nanos(wait)),
            Reservation::Denied { wait } => Err(RateLimited::new(Duration::from_nanos(wait))),
        }
    }

    /// Reserves the next slot and sleeps until it.
    ///
    /// # Errors
    /// As [`reserve`](Self::reserve), without sleeping.
    pub async fn until_ready(&self, max_wait: Duration) -> Result<(), RateLimited> {
        let wait = self.reserve(max_wait)?;
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        Ok(())
    }
}
