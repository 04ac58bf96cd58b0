use std::sync::Arc;
use std::time::Duration;

use tower::Layer;

use crate::breaker::CircuitState;
use crate::classify::DefaultFailure;
use crate::config::Config;
use crate::registry::{OnChange, Registry};
use crate::{CircuitBreaker, CircuitHandle};
use sturdy_core::key::ByHost;
use sturdy_core::keyed::SlotCache;

/// Adds per-key circuit breakers; see the [crate docs](crate).
///
/// Every service the layer makes shares the same breakers (one `Arc`). Configure the layer
/// first, then take [`handle`](Self::handle)s or call [`pair`](Self::pair): each setter starts a
/// fresh set of breakers.
#[derive(Clone)]
#[must_use]
pub struct CircuitBreakerLayer<K = ByHost, C = DefaultFailure> {
    pub(crate) registry: Arc<Registry>,
    pub(crate) key: K,
    pub(crate) classify: C,
}

impl<K: std::fmt::Debug, C: std::fmt::Debug> std::fmt::Debug for CircuitBreakerLayer<K, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CircuitBreakerLayer")
            .field("registry", &self.registry)
            .field("key", &self.key)
            .field("classify", &self.classify)
            .finish()
    }
}

impl Default for CircuitBreakerLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl CircuitBreakerLayer {
    /// One breaker per host with the defaults: open on 5 consecutive failures or on a failure rate
    /// of 50 % over 30 s with at least 20 calls; open for 30 s, doubling on each re-opening up to
    /// 5 min; 1 probe at a time when half-open, 1 success to close; at most 1,024 breakers.
    pub fn new() -> Self {
        Self {
            registry: Arc::new(Registry::new(Config::default(), None)),
            key: ByHost,
            classify: DefaultFailure,
        }
    }
}

impl<K, C> CircuitBreakerLayer<K, C> {
    fn edit(mut self, f: impl FnOnce(&mut Config)) -> Self {
        let mut config = self.registry.config().clone();
        f(&mut config);
        self.registry = Arc::new(Registry::new(
            config,
            self.registry.shared.on_change.clone(),
        ));
        self
    }

    /// A layer and a handle on its breakers.
    pub fn pair(self) -> (Self, CircuitHandle) {
        let h = self.handle();
        (self, h)
    }

    /// A handle on this layer's breakers: read their state, force them open or closed.
    pub fn handle(&self) -> CircuitHandle {
        CircuitHandle {
            registry: self.registry.clone(),
        }
    }

    /// Opens after `n` consecutive failures \[5\].
    ///
    /// # Panics
    /// When `n` is 0.
    pub fn with_consecutive_failures(self, n: u32) -> Self {
        assert!(n > 0, "consecutive_failures must be at least 1");
        self.edit(|c| c.consecutive_failures = n)
    }

    /// Opens when at least `rate` (0.0 to 1.0) of the calls in the last `window` failed, once the
    /// window holds at least `min_calls` calls \[0.5, 30 s, 20\].
    ///
    /// # Panics
    /// When `rate` is not in `0.0..=1.0` or `window` is zero.
    pub fn with_failure_rate(self, rate: f64, window: Duration, min_calls: u32) -> Self {
        assert!(
            (0.0..=1.0).contains(&rate),
            "failure rate must be between 0 and 1"
        );
        assert!(!window.is_zero(), "the window must not be empty");
        self.edit(|c| {
            c.failure_rate = rate;
            c.window = window;
            c.min_calls = min_calls.max(1);
        })
    }

    /// Stays open `base` the first time, doubling on each re-opening up to `max` \[30 s, 5 min\].
    pub fn with_open_duration(self, base: Duration, max: Duration) -> Self {
        self.edit(|c| {
            c.open_for = base;
            c.max_open = max.max(base);
        })
    }

    /// Probes admitted at a time when half-open \[1\].
    ///
    /// # Panics
    /// When `k` is 0.
    pub fn with_probes(self, k: u32) -> Self {
        assert!(k > 0, "at least one probe is needed to ever close");
        self.edit(|c| c.probes = k)
    }

    /// Probe successes needed to close \[1\].
    pub fn with_successes_to_close(self, m: u32) -> Self {
        self.edit(|c| c.successes_to_close = m.max(1))
    }

    /// The most breakers kept \[1,024\]; past it, healthy breakers are forgotten, then new keys
    /// share one overflow breaker.
    pub fn with_max_breakers(self, n: usize) -> Self {
        self.edit(|c| c.max_breakers = n.max(1))
    }

    /// Calls `f(key, from, to)` on every state change (after the breaker's lock is released).
    pub fn on_state_change(
        mut self,
        f: impl Fn(&str, CircuitState, CircuitState) + Send + Sync + 'static,
    ) -> Self {
        let f: OnChange = Arc::new(f);
        self.registry = Arc::new(Registry::new(self.registry.config().clone(), Some(f)));
        self
    }

    /// Chooses breakers with `key` instead of by host, e.g. a closure `|req| -> String`.
    pub fn with_key<K2>(self, key: K2) -> CircuitBreakerLayer<K2, C> {
        CircuitBreakerLayer {
            registry: self.registry,
            key,
            classify: self.classify,
        }
    }

    /// Decides what counts as a failure, e.g. a closure `|result| -> bool`.
    pub fn with_classifier<C2>(self, classify: C2) -> CircuitBreakerLayer<K, C2> {
        CircuitBreakerLayer {
            registry: self.registry,
            key: self.key,
            classify,
        }
    }
}

impl<S, K: Clone, C: Clone> Layer<S> for CircuitBreakerLayer<K, C> {
    type Service = CircuitBreaker<S, K, C>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreaker {
            inner,
            registry: self.registry.clone(),
            key: self.key.clone(),
            classify: self.classify.clone(),
            cached: SlotCache::default(),
        }
    }
}
