use std::time::Duration;

use sturdy_core::RateLimited;

use crate::gate::{Gate, Ticket};
use crate::gcra::{estimate, nanos, reserve, Origin, Reservation};
use crate::Quota;

/// One GCRA limiter without a service around it: for code that is not an HTTP call (a tool
/// loop, a queue consumer), with the same decision and the same line of waiting callers as
/// the [`RateLimitLayer`](crate::RateLimitLayer) keeps per key. The decision is lock-free; share
/// the limiter behind an `Arc`.
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
/// // Or wait in line for the slot (up to a bound):
/// limiter.until_ready(Duration::from_secs(1)).await.unwrap();
/// # }
/// ```
#[derive(Debug)]
pub struct DirectLimiter {
    gate: Gate,
    quota: Quota,
    origin: Origin,
}

impl DirectLimiter {
    /// A limiter enforcing `quota`.
    pub fn new(quota: Quota) -> Self {
        Self {
            gate: Gate::default(),
            quota,
            origin: Origin::now(),
        }
    }

    /// Takes a slot now if one is free and no [`until_ready`](Self::until_ready) caller waits
    /// for one.
    ///
    /// # Errors
    /// [`RateLimited`] with the time until a slot would be free for this call; nothing is
    /// reserved.
    pub fn check(&self) -> Result<(), RateLimited> {
        let now = self.origin.elapsed();
        let waiting = self.gate.waiting();
        let wait = if waiting == 0 {
            match reserve(self.gate.tat(), &self.quota, now, 0) {
                Reservation::Granted { .. } => return Ok(()),
                Reservation::Denied { wait } => wait,
            }
        } else {
            let tat = self.gate.tat().load(std::sync::atomic::Ordering::Acquire);
            estimate(tat, &self.quota, now, waiting as u64) - now
        };
        Err(RateLimited::new(Duration::from_nanos(wait)))
    }

    /// Reserves the next slot no more than `max_wait` away and returns how long to wait for it.
    /// The slot is the caller's from now on, used or not, and it is taken ahead of the callers
    /// waiting in [`until_ready`](Self::until_ready).
    ///
    /// # Errors
    /// [`RateLimited`] when the next slot is further away than `max_wait`; nothing is reserved.
    pub fn reserve(&self, max_wait: Duration) -> Result<Duration, RateLimited> {
        match reserve(
            self.gate.tat(),
            &self.quota,
            self.origin.elapsed(),
            nanos(max_wait),
        ) {
            Reservation::Granted { wait } => Ok(Duration::from_nanos(wait)),
            Reservation::Denied { wait } => Err(RateLimited::new(Duration::from_nanos(wait))),
        }
    }

    /// Waits in line (first come, first served) for a slot and takes it. Nothing is reserved
    /// while it waits: dropping the future gives its place back and the callers behind it move
    /// up.
    ///
    /// # Errors
    /// [`RateLimited`] with the wait, at once, when the slot would be further away than
    /// `max_wait` (counting the callers already in line).
    pub async fn until_ready(&self, max_wait: Duration) -> Result<(), RateLimited> {
        let now = self.origin.elapsed();
        if self.gate.try_now(Some(&self.quota), now) {
            return Ok(());
        }
        let deadline = now.saturating_add(nanos(max_wait));
        let (ticket, _) = self
            .gate
            .join(Some(&self.quota), now, deadline)
            .map_err(|wait| RateLimited::new(Duration::from_nanos(wait)))?;
        let mut place = Place {
            gate: &self.gate,
            ticket: Some(ticket),
        };
        let mut sleep = None;
        let turn = std::future::poll_fn(|cx| {
            self.gate.poll_turn(
                ticket,
                Some(&self.quota),
                false,
                self.origin,
                deadline,
                &mut sleep,
                cx,
            )
        })
        .await;
        match turn {
            Ok(_) => {
                place.ticket = None;
                Ok(())
            }
            Err(wait) => Err(RateLimited::new(Duration::from_nanos(wait))),
        }
    }
}

/// A place in the line, given back when dropped (unless the turn came).
struct Place<'a> {
    gate: &'a Gate,
    ticket: Option<Ticket>,
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        if let Some(t) = self.ticket.take() {
            self.gate.leave(t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_dropped_waiter_gives_its_place_back() {
        let limiter = std::sync::Arc::new(DirectLimiter::new(Quota::per_second(10).unwrap()));
        limiter.check().unwrap();
        let waiters: Vec<_> = (0..50)
            .map(|_| {
                let l = limiter.clone();
                tokio::spawn(async move { l.until_ready(Duration::from_secs(60)).await })
            })
            .collect();
        tokio::task::yield_now().await;
        assert_eq!(limiter.gate.waiting(), 50);
        for w in &waiters {
            w.abort();
        }
        for w in waiters {
            assert!(w.await.unwrap_err().is_cancelled());
        }
        assert_eq!(limiter.gate.waiting(), 0);
        let start = tokio::time::Instant::now();
        limiter.until_ready(Duration::from_secs(60)).await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(100));
    }
}
