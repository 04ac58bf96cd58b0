use std::fmt;
use std::sync::{Arc, Weak};

use sturdy_core::events::{BreakerState, Event, EventHook};
use sturdy_core::keyed::{Idle, KeyedMap, Local, Slot};

use tokio::time::Instant;

use crate::breaker::{Breaker, CircuitState, Ticket, Transition};
use crate::config::Config;

pub(crate) type OnChange = Arc<dyn Fn(&str, CircuitState, CircuitState) + Send + Sync>;

/// What every breaker of a layer shares: the configuration and the state-change callbacks.
#[derive(Clone)]
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) on_change: Option<OnChange>,
    pub(crate) events: EventHook,
    /// Whether keys are hosts (false once `with_key` chose other keys).
    pub(crate) keys_are_hosts: bool,
}

impl Shared {
    #[inline]
    pub(crate) fn report(&self, key: &str, t: Option<Transition>) {
        if let Some(t) = t {
            self.report_transition(key, t);
        }
    }

    #[cold]
    fn report_transition(&self, key: &str, t: Transition) {
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
        let open_for = match t.to {
            CircuitState::Open { retry_in } => Some(retry_in),
            _ => None,
        };
        self.events.emit(&Event::CircuitChanged {
            key,
            host: self.host(key),
            from: state_of(t.from),
            to: state_of(t.to),
            open_for,
        });
    }

    /// The key as a host for events, when keys are hosts.
    pub(crate) fn host<'k>(&self, key: &'k str) -> Option<&'k str> {
        self.keys_are_hosts.then_some(key)
    }
}

fn state_of(s: CircuitState) -> BreakerState {
    match s {
        CircuitState::Closed => BreakerState::Closed,
        CircuitState::Open { .. } => BreakerState::Open,
        CircuitState::HalfOpen => BreakerState::HalfOpen,
        CircuitState::ForcedOpen => BreakerState::ForcedOpen,
    }
}

/// Every breaker of one layer, created lazily and bounded in number.
pub(crate) struct Registry {
    pub(crate) shared: Arc<Shared>,
    pub(crate) map: Arc<KeyedMap<Node>>,
}

/// One breaker, with what it shares with its siblings.
pub(crate) struct Node {
    pub(crate) breaker: Breaker,
    pub(crate) shared: Arc<Shared>,
    /// The map that holds it: a call's outcome that comes back after a full map forgot this
    /// breaker (closed and without failures, it looked idle while the call ran) counts on the
    /// breaker its key has now. Weak: the map holds the node.
    map: Weak<KeyedMap<Self>>,
}

impl Node {
    fn new(shared: &Arc<Shared>, map: Weak<KeyedMap<Self>>) -> Self {
        Self {
            breaker: Breaker::new(&shared.config, Instant::now()),
            shared: shared.clone(),
            map,
        }
    }
}

impl Idle for Node {
    fn is_idle(&self) -> bool {
        self.breaker.is_idle_closed()
    }
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("config", &self.shared.config)
            .field("breakers", &self.map)
            .finish()
    }
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Node")
            .field("breaker", &self.breaker)
            .finish_non_exhaustive()
    }
}

impl Registry {
    pub(crate) fn new(config: Config, on_change: Option<OnChange>) -> Self {
        Self::with_shared(Shared {
            config,
            on_change,
            events: EventHook::none(),
            keys_are_hosts: true,
        })
    }

    /// Fresh breakers with these settings and callbacks.
    pub(crate) fn with_shared(shared: Shared) -> Self {
        let max = shared.config.max_breakers;
        Self {
            shared: Arc::new(shared),
            map: Arc::new(KeyedMap::new(max)),
        }
    }

    pub(crate) fn config(&self) -> &Config {
        &self.shared.config
    }

    pub(crate) fn make(&self) -> impl FnOnce() -> Node + '_ {
        || Node::new(&self.shared, Arc::downgrade(&self.map))
    }

    /// `key` as the breakers are kept under it (a host in lower case).
    pub(crate) fn stored_key<'k>(&self, key: &'k str) -> std::borrow::Cow<'k, str> {
        sturdy_core::key::stored_key(key, self.shared.keys_are_hosts)
    }

    /// `key`'s own breaker, made even past `max_breakers`: a key forced open by hand must not
    /// force the overflow breaker that the other keys past the bound share.
    pub(crate) fn get_own(&self, key: &str) -> Arc<Slot<Node>> {
        self.map.get_or_insert_own(key, self.make())
    }
}

/// An admitted call's claim on its breaker. Dropping it unfinished gives a probe slot back.
pub(crate) struct Permit {
    pub(crate) local: Arc<Local<Node>>,
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
        if self.local.was_forgotten() && self.finish_elsewhere(failed) {
            return;
        }
        let node = self.local.value();
        let t = node
            .breaker
            .record(&node.shared.config, self.ticket, failed, Instant::now());
        node.shared.report(self.local.key(), t);
    }

    /// The outcome of a call whose breaker a full map forgot while it ran (it was closed, with
    /// no failure to keep): it counts on the breaker the key has now, if that one is closed (a
    /// breaker that opened or probes since has news of its own), so that a host whose calls
    /// all outlast the churn of other hosts still has its failures counted.
    /// `false` when the map kept the breaker after all (it marks every slot while it decides,
    /// see `KeyedMap`): the outcome is then this breaker's, a probe's included.
    #[cold]
    fn finish_elsewhere(&self, failed: Option<bool>) -> bool {
        let node = self.local.value();
        let Some(map) = node.map.upgrade() else {
            return false;
        };
        let key = self.local.key();
        let mine: &Slot<Node> = &self.local;
        // The read lock waits for a map that is deciding.
        if map
            .find(key)
            .is_some_and(|s| std::ptr::eq(Arc::as_ptr(&s), mine))
        {
            return false;
        }
        let Some(failed) = failed else {
            return true;
        };
        let slot = map.get_or_insert_with(key, || Node::new(&node.shared, node.map.clone()));
        let now = slot.value();
        if let Some(ticket) = now.breaker.closed_ticket() {
            let t = now
                .breaker
                .record(&now.shared.config, ticket, Some(failed), Instant::now());
            now.shared.report(slot.key(), t);
        }
        true
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
            .field("key", &self.local.key())
            .field("probe", &self.ticket.probe)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sturdy_core::keyed::SlotCache;

    fn permit(registry: &Registry, cache: &mut SlotCache<Node>, key: &str) -> Permit {
        let local = cache.get(&registry.map, key, registry.make());
        let (ticket, _) = local.value().breaker.admit(registry.config(), Instant::now);
        Permit {
            local,
            ticket: ticket.ok().unwrap(),
            done: false,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_outcome_after_its_breaker_was_forgotten_counts_on_the_keys_breaker_now() {
        let registry = Registry::new(
            Config {
                consecutive_failures: 2,
                max_breakers: 1,
                ..Config::default()
            },
            None,
        );
        let mut cache = SlotCache::default();
        // Two calls to "a" in flight; its breaker is closed and has no failure: idle.
        let mut first = permit(&registry, &mut cache, "a");
        let mut second = permit(&registry, &mut cache, "a");
        // A call to "b" makes the full map forget it.
        let _b = permit(&registry, &mut SlotCache::default(), "b");
        assert!(registry.map.find("a").is_none());
        // Both calls to "a" fail: the failures count on the breaker "a" has now, which opens.
        first.finish(Some(true));
        second.finish(Some(true));
        let now = registry.map.find("a").expect("a breaker for a again");
        assert!(matches!(
            now.value().breaker.state(Instant::now()),
            CircuitState::Open { .. }
        ));
    }
}
