use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::state::{Cell, HostState};

/// Reads a [`HedgeLayer`](crate::HedgeLayer)'s per-host figures (from
/// [`pair`](crate::HedgeLayer::pair) or [`handle`](crate::HedgeLayer::handle)).
///
/// Keys are hosts by default, kept in lower case: a host given to a method here is found in
/// any case (`"API.example.com"` finds the state of `https://api.example.com/`). Keys chosen
/// with `with_key(..)` are looked up as given.
#[derive(Debug, Clone)]
pub struct HedgeHandle {
    pub(crate) cell: Arc<Cell>,
}

/// One host's hedging figures since its state was created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HedgeStats {
    calls: u64,
    hedges: u64,
    hedge_wins: u64,
    delay: Option<Duration>,
    samples: u64,
}

impl HedgeStats {
    fn of(h: &HostState, now: Instant) -> Self {
        Self {
            calls: h.calls.load(Ordering::Relaxed),
            hedges: h.hedges.load(Ordering::Relaxed),
            hedge_wins: h.wins.load(Ordering::Relaxed),
            delay: h.current_delay(now),
            samples: h.samples(now),
        }
    }

    /// Hedgeable calls seen (GET, HEAD, OPTIONS, and keyed requests when allowed).
    pub fn calls(&self) -> u64 {
        self.calls
    }

    /// Second copies sent: the extra requests.
    pub fn hedges(&self) -> u64 {
        self.hedges
    }

    /// Calls whose second copy answered first.
    pub fn hedge_wins(&self) -> u64 {
        self.hedge_wins
    }

    /// Extra requests per call (`hedges / calls`), 0.0 before the first call.
    pub fn extra_ratio(&self) -> f64 {
        if self.calls == 0 {
            0.0
        } else {
            self.hedges as f64 / self.calls as f64
        }
    }

    /// The delay after which a call is hedged now; `None` while the recent windows hold fewer
    /// samples than the minimum (no call is hedged then).
    pub fn delay(&self) -> Option<Duration> {
        self.delay
    }

    /// Latencies in the current and the previous window.
    pub fn samples(&self) -> u64 {
        self.samples
    }
}

impl HedgeHandle {
    /// The figures of `key` (the host, `authority` form such as `api.example.com:8080`), if it
    /// has state; for a host past the host bound, those of the overflow state it shares with the
    /// other hosts past it.
    pub fn stats(&self, key: &str) -> Option<HedgeStats> {
        let now = Instant::now();
        self.cell
            .get()
            .find(key)
            .map(|s| HedgeStats::of(s.value(), now))
    }

    /// Every host's figures, sorted by key; past the host bound, the overflow state shared by
    /// the hosts beyond it is listed as `*`.
    pub fn all(&self) -> Vec<(String, HedgeStats)> {
        let now = Instant::now();
        let mut v: Vec<_> = self
            .cell
            .get()
            .map
            .all()
            .iter()
            .map(|s| (s.key().to_owned(), HedgeStats::of(s.value(), now)))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// A percentile (strictly between 0.0 and 1.0) of `key`'s recent latencies to the first
    /// answer, to the top of its 12.5 % histogram bucket; `None` without samples or for a
    /// percentile out of range.
    pub fn latency_percentile(&self, key: &str, q: f64) -> Option<Duration> {
        if !(q > 0.0 && q < 1.0) {
            return None;
        }
        let now = Instant::now();
        self.cell
            .get()
            .find(key)
            .and_then(|s| s.value().percentile(q, now))
    }
}
