//! The decision trace: what a composed stack did for one call.
//!
//! A [`Trace`] travels in the request's extensions; the deciding layers (auth,
//! circuit, client idempotency keys, rate limit, retry) append [`TraceEvent`]s to it.
//! It is cheap to clone (one `Arc`) and the lock is held only to push or copy.

use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Why a delay happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DelaySource {
    /// Retry backoff.
    Backoff,
    /// The server's `Retry-After`.
    RetryAfter,
    /// A rate limiter's wait or pause.
    RateLimit,
    /// A circuit breaker.
    Breaker,
}

/// One fact about a call.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TraceEvent {
    /// The idempotency key used for every attempt.
    IdempotencyKey(String),
    /// An attempt finished.
    Attempt {
        /// 1-based attempt number.
        number: u32,
        /// What happened, in words.
        outcome: String,
    },
    /// The stack waited.
    Delay {
        /// How long.
        duration: Duration,
        /// Why.
        source: DelaySource,
    },
    /// A token was fetched or refreshed.
    TokenRefresh,
    /// A layer refused the call without calling the service.
    Rejected {
        /// Which layer and why, in words.
        reason: String,
    },
}

/// The shared record of one call; see the module docs.
#[derive(Debug, Clone, Default)]
pub struct Trace(Arc<Mutex<Vec<TraceEvent>>>);

impl Trace {
    /// An empty trace.
    pub fn new() -> Self {
        Self::default()
    }

    /// The trace in a request's extensions, if one was put there.
    pub fn of<B>(req: &http::Request<B>) -> Option<&Self> {
        req.extensions().get::<Self>()
    }

    /// Appends an event.
    pub fn record(&self, event: TraceEvent) {
        // A poisoned lock only means another thread panicked mid-push; the data is still a Vec.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(event);
    }

    /// A copy of the events so far.
    pub fn events(&self) -> Vec<TraceEvent> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_one_record() {
        let t = Trace::new();
        let mut req = http::Request::new(());
        req.extensions_mut().insert(t.clone());
        Trace::of(&req).unwrap().record(TraceEvent::TokenRefresh);
        assert_eq!(t.events(), vec![TraceEvent::TokenRefresh]);
    }
}
