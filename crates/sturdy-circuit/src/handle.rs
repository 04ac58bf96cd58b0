use std::sync::Arc;

use tokio::time::Instant;

use crate::breaker::CircuitState;
use crate::layer::Cell;

/// Reads and steers the breakers of one layer (from [`CircuitBreakerLayer::pair`](crate::CircuitBreakerLayer::pair)).
///
/// Keys are hosts by default, kept in lower case: a host given to a method here is found in
/// any case (`"API.example.com"` finds the state of `https://api.example.com/`). Keys chosen
/// with `with_key(..)` are looked up as given.
#[derive(Debug, Clone)]
pub struct CircuitHandle {
    pub(crate) cell: Arc<Cell>,
}

impl CircuitHandle {
    /// The state of the breaker for `key`, if it exists. For a key past `max_breakers`, that is
    /// the overflow breaker it shares with the other keys past the bound (listed as `*`).
    pub fn state(&self, key: &str) -> Option<CircuitState> {
        let registry = self.cell.get();
        registry
            .map
            .find_serving(&registry.stored_key(key))
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
        let registry = self.cell.get();
        let e = registry.get_own(&registry.stored_key(key));
        let t = e.value().breaker.force_open(Instant::now());
        e.value().shared.report(e.key(), t);
    }

    /// Resets `key`'s breaker to closed, forgetting its failures. A key past `max_breakers`
    /// gets a closed breaker of its own, and the overflow breaker the other keys past the bound
    /// share is left as it is (`force_close("*")` resets that one).
    pub fn force_close(&self, key: &str) {
        let registry = self.cell.get();
        let e = registry.get_own(&registry.stored_key(key));
        let t = e.value().breaker.force_close(Instant::now());
        e.value().shared.report(e.key(), t);
    }
}
