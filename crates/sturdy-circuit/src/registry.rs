use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};

use tokio::time::Instant;

use crate::breaker::{Breaker, CircuitState, Ticket, Transition};
use crate::config::Config;

pub(crate) type OnChange = Arc<dyn Fn(&str, CircuitState, CircuitState) + Send + Sync>;

/// Every breaker of one layer, created lazily and bounded in number.
pub(crate) struct Registry {
    pub(crate) config: Config,
    breakers: RwLock<HashMap<Box<str>, Arc<Entry>>>,
    pub(crate) on_change: Option<OnChange>,
}

pub(crate) struct Entry {
    pub(crate) key: Box<str>,
    pub(crate) breaker: Breaker,
}

/// Key of the breaker shared by hosts beyond `max_breakers`.
const OVERFLOW: &str = "*";

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("config", &self.config)
            .field(
                "breakers",
                &self.breakers.read().map(|m| m.len()).unwrap_or(0),
            )
            .finish_non_exhaustive()
    }
}

impl Registry {
    pub(crate) fn new(config: Config, on_change: Option<OnChange>) -> Self {
        Self {
            config,
            breakers: RwLock::new(HashMap::new()),
            on_change,
        }
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
        if map.len() >= self.config.max_breakers {
            // Forget healthy breakers first; they hold no information worth keeping.
            map.retain(|_, e| !e.breaker.is_idle_closed());
            if map.len() >= self.config.max_breakers {
                key = OVERFLOW;
                if let Some(e) = map.get(key) {
                    return e.clone();
                }
            }
        }
        let entry = Arc::new(Entry {
            key: key.into(),
            breaker: Breaker::new(&self.config, Instant::now()),
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

/// An admitted call's claim on its breaker. Dropping it unfinished gives a probe slot back.
pub(crate) struct Permit {
    pub(crate) registry: Arc<Registry>,
    pub(crate) entry: Arc<Entry>,
    pub(crate) ticket: Ticket,
    pub(crate) done: bool,
}

impl Permit {
    pub(crate) fn finish(&mut self, failed: Option<bool>) {
        if self.done {
            return;
        }
        self.done = true;
        let t =
            self.entry
                .breaker
                .record(&self.registry.config, self.ticket, failed, Instant::now());
        self.registry.report(&self.entry.key, t);
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
            .field("key", &self.entry.key)
            .field("probe", &self.ticket.probe)
            .finish()
    }
}
