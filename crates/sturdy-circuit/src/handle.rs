use std::sync::Arc;

use tokio::time::Instant;

use crate::breaker::CircuitState;
use crate::layer::Cell;

/// Reads and steers the breakers of one layer (from [`CircuitBreakerLayer::pair`](crate::CircuitBreakerLayer::pair)).
#[derive(Debug, Clone)]
pub struct CircuitHandle {
    pub(crate) cell: Arc<Cell>,
}

impl CircuitHandle {
    /// The state of the breaker for `key`, if it exists. For a key past `max_breakers`, that is
    /// the overflow breaker it shares with the other keys past the bound (listed as `*`).
    pub fn state(&self, key: &str) -> Option<CircuitState> {
        self.cell
            .get()
            .map
            .find_serving(key)
            .map(|e| e.value().breaker.state(Instant::now()))
    }

    /// Every breaker and its state, sorted by key.
    pub fn states(&self) -> Vec<(String, CircuitState)> {
        let now = Instant::now();
        let mut v: Vec<_> = self
            .cell
            .get()
            .map
            .all()
            .iter()
            .map(|e| (e.key().to_owned(), e.value().breaker.state(now)))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Isolates `key`: its breaker stays open until [`force_close`](Self::force_close). A key
    /// past `max_breakers` gets a breaker of its own for this (the map grows past its bound by
    /// the keys forced open by hand), so the other keys past the bound are not refused with it.
    pub fn force_open(&self, key: &str) {
        let e = self.cell.get().get_own(key);
        let t = e.value().breaker.force_open(Instant::now());
        e.value().shared.report(e.key(), t);
    }

    /// Resets `key`'s breaker to closed, forgetting its failures. A key past `max_breakers`
    /// gets a closed breaker of its own, and the overflow breaker the other keys past the bound
    /// share is left as it is (`force_close("*")` resets that one).
    pub fn force_close(&self, key: &str) {
        let e = self.cell.get().get_own(key);
        let t = e.value().breaker.force_close(Instant::now());
        e.value().shared.report(e.key(), t);
    }
}
