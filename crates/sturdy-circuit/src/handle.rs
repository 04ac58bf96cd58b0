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
    /// The state of the breaker for `key`, if it exists.
    pub fn state(&self, key: &str) -> Option<CircuitState> {
        self.cell
            .get()
            .map
            .find(key)
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

    /// Isolates `key`: its breaker stays open until [`force_close`](Self::force_close).
    pub fn force_open(&self, key: &str) {
        let e = self.cell.get().get(key);
        let t = e.value().breaker.force_open(Instant::now());
        e.value().shared.report(e.key(), t);
    }

    /// Resets `key`'s breaker to closed, forgetting its failures.
    pub fn force_close(&self, key: &str) {
        let e = self.cell.get().get(key);
        let t = e.value().breaker.force_close(Instant::now());
        e.value().shared.report(e.key(), t);
    }
}
