use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::limiter::{Cell, Limiter};

/// Reads and sets an [`AdaptiveConcurrencyLayer`](crate::AdaptiveConcurrencyLayer)'s per-host
/// limits (from [`pair`](crate::AdaptiveConcurrencyLayer::pair) or
/// [`handle`](crate::AdaptiveConcurrencyLayer::handle)).
///
/// Keys are hosts by default, kept in lower case: a host given to a method here is found in
/// any case (`"API.example.com"` finds the state of `https://api.example.com/`). Keys chosen
/// with `with_key(..)` are looked up as given.
#[derive(Debug, Clone)]
pub struct ConcurrencyHandle {
    pub(crate) cell: Arc<Cell>,
}

/// One host's limit and load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitState {
    limit: usize,
    in_flight: usize,
    waiting: usize,
    baseline: Option<Duration>,
}

impl LimitState {
    fn of(l: &Limiter) -> Self {
        Self {
            limit: l.limit(),
            in_flight: l.in_flight(),
            waiting: l.waiting.load(Ordering::Relaxed),
            baseline: l.baseline(),
        }
    }

    /// The limit in force: calls allowed at once.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Calls in flight now (at most the limit, or briefly more right after it went down).
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Calls waiting for a place now.
    pub fn waiting(&self) -> usize {
        self.waiting
    }

    /// The no-load latency [`Algorithm::Vegas`](crate::Algorithm::Vegas) measures against, once
    /// it has one.
    pub fn baseline(&self) -> Option<Duration> {
        self.baseline
    }
}

impl ConcurrencyHandle {
    /// The limit of `key` (the host, `authority` form such as `api.example.com:8080`), if it
    /// has one.
    pub fn limit(&self, key: &str) -> Option<usize> {
        self.state(key).map(|s| s.limit)
    }

    /// The limit and load of `key`, if it has a limit; for a host past the host bound, those of
    /// the overflow limit it shares with the other hosts past it.
    pub fn state(&self, key: &str) -> Option<LimitState> {
        self.cell.get().find(key).map(|s| LimitState::of(s.value()))
    }

    /// Every host's limit and load, sorted by key.
    pub fn states(&self) -> Vec<(String, LimitState)> {
        let mut v: Vec<_> = self
            .cell
            .get()
            .map
            .all()
            .iter()
            .map(|s| (s.key().to_owned(), LimitState::of(s.value())))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Sets `key`'s limit by hand (taken into the bounds); it adapts from there. A change is
    /// reported like any other: a `ConcurrencyLimitChanged` event to the layer's `on_event`
    /// callback, and so the `sturdy.concurrency.limit` gauge. A key past the layer's host bound
    /// has no limit of its own: it shares the overflow limit (key `*`), which this then sets,
    /// and the event names `*`.
    pub fn set_limit(&self, key: &str, limit: usize) {
        crate::limiter::set_by_hand(&self.cell.get().get(key), limit);
    }
}
