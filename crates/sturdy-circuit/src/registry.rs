use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use tokio::time::Instant;

use crate::breaker::{Breaker, CircuitState, Ticket, Transition};
use crate::config::Config;

pub(crate) type OnChange = Arc<dyn Fn(&str, CircuitState, CircuitState) + Send + Sync>;

/// What every breaker of a layer shares: the configuration and the state-change callback.
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) on_change: Option<OnChange>,
}

impl Shared {
    pub(crate) fn report(&self, key: &str, t: Option<Transition>) {
        let Some(t) = t else { return };
        match t.to {
            CircuitState::Closed => tracing::info!(key, from = ?t.from, "circuit closed"),
            CircuitState::HalfOpen => tracing::info!(key, "circuit half-open: probing"),
            CircuitState::Open { retry_in } => {
                tracing::warn!(key, from = ?t.from, open_ms = retry_in.as_millis() as u64, "circuit opened");
            }
            CircuitState::ForcedOpen => tracing::warn!(key, "circuit forced open"),
        }
        if let Some(f) = &self.on_change {
            f(key, t.from, t.to);
        }
    }
}

/// Every breaker of one layer, created lazily and bounded in number.
pub(crate) struct Registry {
    pub(crate) shared: Arc<Shared>,
    breakers: RwLock<HashMap<Box<str>, Arc<Entry>>>,
}

/// One breaker with its key.
pub(crate) struct Entry {
    pub(crate) key: Box<str>,
    pub(crate) breaker: Breaker,
    pub(crate) shared: Arc<Shared>,
    /// Set when the registry forgets this entry, so services drop their cached copy.
    pub(crate) evicted: AtomicBool,
}

/// Key of the breaker shared by keys beyond `max_breakers`.
const OVERFLOW: &str = "*";

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("config", &self.shared.config)
            .field(
                "breakers",
                &self.breakers.read().map(|m| m.len()).unwrap_or(0),
            )
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl Registry {
    pub(crate) fn new(config: Config, on_change: Option<OnChange>) -> Self {
        Self {
            shared: Arc::new(Shared { config, on_change }),
            breakers: RwLock::new(HashMap::new()),
        }
    }

    pub(crate) fn config(&self) -> &Config {
        &self.shared.config
    }

    pub(crate) fn find(&self, key: &str) -> Option<Arc<Entry>> {
        self.breakers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .cloned()
    }

    pub(crate) fn get(&self, key: &str) -> Arc<Entry> {
        if let Some(e) = self.find(key) {
            return e;
        }
        let mut map = self
            .breakers
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(e) = map.get(key) {
            return e.clone();
        }
        let mut key = key;
        if map.len() >= self.shared.config.max_breakers {
            // Forget healthy breakers first; they hold no information worth keeping.
            map.retain(|_, e| {
                let keep = !e.breaker.is_idle_closed();
                if !keep {
                    e.evicted.store(true, Ordering::Release);
                }
                keep
            });
            if map.len() >= self.shared.config.max_breakers {
                key = OVERFLOW;
                if let Some(e) = map.get(key) {
                    return e.clone();
                }
            }
        }
        let entry = Arc::new(Entry {
            key: key.into(),
            breaker: Breaker::new(&self.shared.config, Instant::now()),
            shared: self.shared.clone(),
            evicted: AtomicBool::new(false),
        });
        map.insert(key.into(), entry.clone());
        entry
    }

    pub(crate) fn all(&self) -> Vec<Arc<Entry>> {
        self.breakers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }
}

/// A service's own reference to an entry (see `CircuitBreaker::cached`).
#[derive(Debug)]
pub(crate) struct Local(pub(crate) Arc<Entry>);

/// An admitted call's claim on its breaker. Dropping it unfinished gives a probe slot back.
pub(crate) struct Permit {
    pub(crate) local: Arc<Local>,
    pub(crate) ticket: Ticket,
    pub(crate) done: bool,
}

impl Permit {
    pub(crate) fn finish(&mut self, failed: Option<bool>) {
        if self.done {
            return;
        }
        self.done = true;
        if failed.is_none() && !self.ticket.probe {
            // An abandoned call in the closed state says nothing about the dependency.
            return;
        }
        let entry = &self.local.0;
        let t = entry
            .breaker
            .record(&entry.shared.config, self.ticket, failed, Instant::now());
        entry.shared.report(&entry.key, t);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.finish(None);
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("key", &self.local.0.key)
            .field("probe", &self.ticket.probe)
            .finish()
    }
}
