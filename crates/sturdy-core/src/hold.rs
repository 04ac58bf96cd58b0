//! What an attempt is held back for before it is sent, so that a deadline that ends meanwhile
//! can say the attempt was never sent, and why.
//!
//! The retry layer, when told to (`RetryLayer::with_hold_marks`; `sturdy::ClientBuilder` turns
//! it on), puts an [`AttemptHold`] in the extensions of every attempt of a call that has a
//! deadline. A layer below it that makes an attempt wait before passing it on (the rate limit,
//! the auth layer waiting for a token, the adaptive concurrency limit) marks the wait with
//! [`AttemptHold::hold`] and clears it with [`AttemptHold::release`] when the attempt goes on.
//! When the deadline ends while the mark is set, the call's error says the attempt was not sent
//! (`Delivery::NotSent` unless an earlier attempt may have been processed) and what it waited
//! for. The hedge layer reads the mark too: it sends no second copy of a call whose first copy
//! is still held back (and puts a mark of its own, without a deadline, on a call it may hedge
//! when the retry layer put none); it waits with [`AttemptHold::poll_released`], which
//! [`AttemptHold::release`] wakes, so no timer runs while the copy waits. A layer that sends
//! more than one copy of a request (hedging), sends it again (the auth layer's replay after a
//! 401) or shares it with other calls (coalescing) calls [`AttemptHold::fan_out`]: from then on
//! nothing can be said, and nothing is. A layer that does
//! any of these without calling it must not sit between the retry layer and the layers that
//! hold, or the retry layer must not mark.
//!
//! The mark also carries the call's deadline ([`AttemptHold::deadline`]), so that a layer can
//! refuse at once a wait that would end after it, instead of waiting until the deadline cuts the
//! call: the rate limit refuses such a call with `RateLimited`, carrying the wait.
//!
//! ```
//! use sturdy_core::hold::{AttemptHold, HeldFor};
//!
//! let hold = AttemptHold::new();
//! let mut req = http::Request::new(());
//! req.extensions_mut().insert(hold.clone());
//!
//! // A layer below makes the attempt wait for its turn, then lets it go.
//! let mark = AttemptHold::of(&req);
//! if let Some(h) = &mark {
//!     h.hold(HeldFor::RateLimit);
//! }
//! assert_eq!(hold.held_for(), Some(HeldFor::RateLimit));
//! if let Some(h) = &mark {
//!     h.release();
//! }
//! assert_eq!(hold.held_for(), None);
//! ```

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use tokio::time::Instant;

/// What a layer holds an attempt back for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HeldFor {
    /// Its turn under a rate limit: a pause the server asked for, or a slot of the quota.
    RateLimit,
    /// An access token.
    Token,
    /// A place under a concurrency limit.
    Concurrency,
}

impl fmt::Display for HeldFor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::RateLimit => "its turn under the rate limit",
            Self::Token => "an access token",
            Self::Concurrency => "a place under the concurrency limit",
        })
    }
}

const FREE: u8 = 0;
const RATE_LIMIT: u8 = 1;
const TOKEN: u8 = 2;
const CONCURRENCY: u8 = 3;
/// Sticky: copies of the request went more than one way.
const FANNED_OUT: u8 = u8::MAX;

/// The mark one attempt carries in its extensions: what it is held back for right now, if
/// anything, and the call's deadline, if it has one. Clones share the mark. See the
/// [module docs](self).
#[derive(Clone, Default)]
pub struct AttemptHold(Arc<Mark>);

#[derive(Default)]
struct Mark {
    state: AtomicU8,
    deadline: Option<Instant>,
    /// Set once a task waits in `poll_released`: only then does `release` take the lock.
    watched: AtomicBool,
    /// The task waiting for the attempt to be let go (the hedge layer's).
    waiter: Mutex<Option<Waker>>,
}

impl AttemptHold {
    /// A mark that says the attempt is not held, for a call without a deadline.
    pub fn new() -> Self {
        Self::default()
    }

    /// A mark that says the attempt is not held, for a call that must have its answer by
    /// `deadline`.
    pub fn until(deadline: Instant) -> Self {
        Self(Arc::new(Mark {
            deadline: Some(deadline),
            ..Mark::default()
        }))
    }

    /// The call's deadline, if it has one: a wait that would end after it cannot be met.
    /// `None` after a [`fan_out`](Self::fan_out): a copy may have been sent, and a refusal of
    /// this one must not read as the whole attempt's.
    pub fn deadline(&self) -> Option<Instant> {
        if self.0.state.load(Ordering::Acquire) == FANNED_OUT {
            return None;
        }
        self.0.deadline
    }

    /// The mark in `req`'s extensions, if the retry layer (or the hedge layer) put one there.
    pub fn of<B>(req: &http::Request<B>) -> Option<Self> {
        req.extensions().get::<Self>().cloned()
    }

    /// The attempt waits for `what` before it goes on.
    pub fn hold(&self, what: HeldFor) {
        let v = match what {
            HeldFor::RateLimit => RATE_LIMIT,
            HeldFor::Token => TOKEN,
            HeldFor::Concurrency => CONCURRENCY,
        };
        // Never over a fan-out: one copy may have been sent already.
        let _ = self
            .0
            .state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                (cur != FANNED_OUT).then_some(v)
            });
    }

    /// The attempt goes on (to the next layer; it may be sent from here on). Wakes the task
    /// waiting in [`poll_released`](Self::poll_released), if any.
    pub fn release(&self) {
        // SeqCst, with the waiter's store of `watched` and load of the state: one of the two
        // sides sees the other's write, so a waiter is never left asleep.
        let _ = self
            .0
            .state
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |cur| {
                (cur != FANNED_OUT).then_some(FREE)
            });
        self.wake();
    }

    /// Copies of the attempt go more than one way (a hedge): from now on the mark says nothing.
    pub fn fan_out(&self) {
        self.0.state.store(FANNED_OUT, Ordering::SeqCst);
        self.wake();
    }

    /// Ready once the attempt is not held back (see [`held_for`](Self::held_for)); pending
    /// while it is, with `cx`'s waker kept to be woken by [`release`](Self::release) or
    /// [`fan_out`](Self::fan_out). One task waits at a time: a second one's waker replaces the
    /// first's. A layer that holds an attempt and drops it without releasing the mark does not
    /// wake the waiter; the call it belongs to ends with it.
    ///
    /// ```
    /// use std::task::Poll;
    /// use sturdy_core::hold::{AttemptHold, HeldFor};
    ///
    /// let hold = AttemptHold::new();
    /// hold.hold(HeldFor::Concurrency);
    /// let released = std::future::poll_fn(|cx| hold.poll_released(cx));
    /// let mut waiting = tokio_test::task::spawn(released);
    /// assert!(waiting.poll().is_pending());
    /// hold.release();
    /// assert!(waiting.is_woken());
    /// assert!(waiting.poll().is_ready());
    /// ```
    pub fn poll_released(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.held_for().is_none() {
            return Poll::Ready(());
        }
        {
            let mut waiter = self.0.waiter.lock().unwrap_or_else(PoisonError::into_inner);
            match waiter.as_mut() {
                Some(w) => w.clone_from(cx.waker()),
                None => *waiter = Some(cx.waker().clone()),
            }
        }
        self.0.watched.store(true, Ordering::SeqCst);
        match self.0.state.load(Ordering::SeqCst) {
            RATE_LIMIT | TOKEN | CONCURRENCY => Poll::Pending,
            _ => Poll::Ready(()),
        }
    }

    fn wake(&self) {
        if !self.0.watched.load(Ordering::SeqCst) {
            return;
        }
        let waker = self
            .0
            .waiter
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// What the attempt is held back for right now; `None` when it is not held (it may have
    /// been sent) or after a fan-out.
    pub fn held_for(&self) -> Option<HeldFor> {
        match self.0.state.load(Ordering::Acquire) {
            RATE_LIMIT => Some(HeldFor::RateLimit),
            TOKEN => Some(HeldFor::Token),
            CONCURRENCY => Some(HeldFor::Concurrency),
            _ => None,
        }
    }
}

impl fmt::Debug for AttemptHold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AttemptHold")
            .field("held_for", &self.held_for())
            .field("deadline", &self.0.deadline)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fan_out_is_sticky() {
        let h = AttemptHold::new();
        h.hold(HeldFor::Token);
        h.fan_out();
        assert_eq!(h.held_for(), None);
        h.hold(HeldFor::RateLimit);
        assert_eq!(h.held_for(), None);
        h.release();
        assert_eq!(h.held_for(), None);
    }
}
