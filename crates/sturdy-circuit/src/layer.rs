use std::sync::Arc;
use std::time::Duration;

use sturdy_core::classify::DefaultClassify;
use sturdy_core::events::{Event, EventHook};
use sturdy_core::key::ByHost;
use sturdy_core::keyed::SlotCache;
use sturdy_core::{Error, ErrorKind};
use tower::Layer;

use crate::breaker::CircuitState;
use crate::config::Config;
use crate::registry::{OnChange, Registry, Shared};
use crate::{CircuitBreaker, CircuitHandle};

/// The breakers of a layer, its clones and its handles: one cell, so that a setter called after
/// a clone or a [`pair`](CircuitBreakerLayer::pair) still applies to all of them.
pub(crate) type Cell = sturdy_core::keyed::SharedCell<Registry>;

/// Adds per-key circuit breakers; see the [crate docs](crate).
///
/// Every service the layer makes shares the same breakers (one `Arc`), and so do the layer's
/// clones and its [`handle`](Self::handle)s. A setter called after a clone or a handle was taken
/// applies to all of them; services made earlier keep the settings and the breakers they were
/// made with, which the handle no longer sees: call setters before making services.
#[derive(Clone)]
#[must_use]
pub struct CircuitBreakerLayer<K = ByHost, C = DefaultClassify> {
    pub(crate) cell: Arc<Cell>,
    pub(crate) key: K,
    pub(crate) classify: C,
}

impl<K: std::fmt::Debug, C: std::fmt::Debug> std::fmt::Debug for CircuitBreakerLayer<K, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CircuitBreakerLayer")
            .field("registry", &self.cell.get())
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
    /// One breaker per host with the defaults: open when at least 50 % of the calls of the last
    /// 30 s failed, once there were at least 100 (no streak trigger: a flaky API that still
    /// mostly works is ridden out); open for 30 s, doubling on each re-opening up to 5 min; 1
    /// probe at a time when half-open, 1 success to close; at most 1,024 breakers.
    pub fn new() -> Self {
        Self {
            cell: Arc::new(Cell::new(Registry::new(Config::default(), None))),
            key: ByHost,
            classify: DefaultClassify,
        }
    }
}

fn config_error(msg: String) -> Error {
    Error::new(ErrorKind::Config, msg)
}

impl<K, C> CircuitBreakerLayer<K, C> {
    fn edit(self, f: impl FnOnce(&mut Config)) -> Self {
        self.edit_shared(|s| f(&mut s.config))
    }

    fn edit_shared(self, f: impl FnOnce(&mut Shared)) -> Self {
        self.cell.replace(|r| {
            let mut shared = (*r.shared).clone();
            f(&mut shared);
            Registry::with_shared(shared)
        });
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
            cell: self.cell.clone(),
        }
    }

    /// Also opens after `n` failures in a row \[off\]; 0 turns this trigger off. Use it for a
    /// dependency that either works or is down; it trips on a flaky one.
    pub fn with_consecutive_failures(self, n: u32) -> Self {
        self.edit(|c| c.consecutive_failures = n)
    }

    /// Opens when at least `rate` (0.0 to 1.0) of the calls in the last `window` failed, once the
    /// window holds at least `min_calls` calls \[0.5, 30 s, 100\] (0 is taken as 1). A window
    /// without a failure never opens it, so a `rate` of 0.0 opens on any failure once the
    /// window holds `min_calls` calls. The window is counted in ten buckets of `window / 10`,
    /// at least 1 ms each (a window under 10 ms acts as 10 ms); a call leaves it with its bucket.
    ///
    /// # Errors
    /// A [`Config`](ErrorKind::Config) error when `rate` is not in `0.0..=1.0` or `window` is
    /// zero.
    pub fn with_failure_rate(
        self,
        rate: f64,
        window: Duration,
        min_calls: u32,
    ) -> Result<Self, Error> {
        if !(0.0..=1.0).contains(&rate) {
            return Err(config_error(format!(
                "the failure rate must be between 0.0 and 1.0, not {rate}"
            )));
        }
        if window.is_zero() {
            return Err(config_error(
                "the failure-rate window must not be zero".to_owned(),
            ));
        }
        Ok(self.edit(|c| {
            c.failure_rate = rate;
            c.window = window;
            c.min_calls = min_calls.max(1);
        }))
    }

    /// Stays open `base` the first time, doubling on each re-opening up to `max` \[30 s, 5 min\].
    /// No open period is longer than `max`: a `base` above `max` is read as `max`. A duration
    /// past about 30 years ([`FAR`](sturdy_core::clock::FAR), `Duration::MAX` included) is read
    /// as 30 years; a breaker forced open reports `max` as its `retry_in`.
    pub fn with_open_duration(self, base: Duration, max: Duration) -> Self {
        self.edit(|c| {
            // Read as at most about 30 years, as every duration too long to represent is: a
            // forced-open breaker reports `max_open` as its `retry_in`.
            let far = sturdy_core::clock::FAR;
            c.max_open = max.min(far);
            c.open_for = base.min(c.max_open);
        })
    }

    /// Probes admitted at a time when half-open \[1\]; 0 is taken as 1 (without a probe the
    /// breaker would never close).
    pub fn with_probes(self, k: u32) -> Self {
        self.edit(|c| c.probes = k.max(1))
    }

    /// Probe successes needed to close \[1\]; 0 is taken as 1.
    pub fn with_successes_to_close(self, m: u32) -> Self {
        self.edit(|c| c.successes_to_close = m.max(1))
    }

    /// The most breakers kept \[1,024\]; past it, healthy breakers (closed, no failure streak, no
    /// failure in their window) are forgotten, then new keys share one overflow breaker, `*`,
    /// kept besides the `n`. At least one is kept: 0 is taken as 1. A call in flight when its
    /// healthy breaker is forgotten reports its outcome to the breaker its key has by then.
    pub fn with_max_breakers(self, n: usize) -> Self {
        self.edit(|c| c.max_breakers = n.max(1))
    }

    /// Calls `f(key, from, to)` on every state change (after the breaker's lock is released).
    pub fn on_state_change(
        self,
        f: impl Fn(&str, CircuitState, CircuitState) + Send + Sync + 'static,
    ) -> Self {
        let f: OnChange = Arc::new(f);
        self.edit_shared(|s| s.on_change = Some(f))
    }

    /// Calls `f` with an [`Event`](sturdy_core::events::Event) for every state change
    /// (`CircuitChanged`) and every call refused by an open breaker (`CircuitRejected`)
    /// \[none\]; replaces an earlier callback. Like [`on_state_change`](Self::on_state_change),
    /// it runs after the breaker's lock is released. With the `metrics` feature the same events
    /// are counted through the `metrics` facade either way.
    pub fn on_event(self, f: impl Fn(&Event<'_>) + Send + Sync + 'static) -> Self {
        let hook = EventHook::new(f);
        self.edit_shared(|s| s.events = hook)
    }

    /// Chooses breakers with `key` instead of by host, e.g. a closure `|req| -> String`. Events
    /// then carry the key but no host (`host: None`), so a key never becomes a metric label.
    /// A key `*` names the state the keys past the bound share
    /// ([`OVERFLOW_KEY`](sturdy_core::keyed::OVERFLOW_KEY)): its calls share it with theirs.
    /// Its keys are kept as given, case and all (the default keys are host names, in lower
    /// case: [`ByHost`](sturdy_core::key::ByHost)), and the handle looks them up as given.
    pub fn with_key<K2>(self, key: K2) -> CircuitBreakerLayer<K2, C> {
        let this = self.edit_shared(|s| s.keys_are_hosts = false);
        CircuitBreakerLayer {
            cell: this.cell,
            key,
            classify: this.classify,
        }
    }

    /// Decides what counts as a failure \[[`DefaultClassify`]\]: any
    /// [`Classify`](sturdy_core::Classify), such as a closure `|result| -> Outcome`. An outcome
    /// counts against the breaker when [`Outcome::is_failure`](sturdy_core::Outcome::is_failure)
    /// says so: a retryable or permanent outcome whose kind is a 5xx, a timeout (a 408 among
    /// them), a connect, TLS or transport error, or an unrecognised error. The same classifier type configures the retry
    /// layer.
    ///
    /// ```
    /// use http::{Response, StatusCode};
    /// use sturdy_circuit::CircuitBreakerLayer;
    /// use sturdy_core::classify::{classify_result, Outcome};
    /// use sturdy_core::{BoxError, ErrorKind};
    ///
    /// // This API reports an outage as a 200 with an `x-degraded` header.
    /// let layer = CircuitBreakerLayer::new().with_classifier(|r: &Result<Response<()>, BoxError>| match r {
    ///     Ok(res) if res.headers().contains_key("x-degraded") => {
    ///         Outcome::Retryable(ErrorKind::Server(StatusCode::SERVICE_UNAVAILABLE))
    ///     }
    ///     other => classify_result(other),
    /// });
    /// # let _ = layer;
    /// ```
    pub fn with_classifier<C2>(self, classify: C2) -> CircuitBreakerLayer<K, C2> {
        CircuitBreakerLayer {
            cell: self.cell,
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
            registry: self.cell.get(),
            key: self.key.clone(),
            classify: self.classify.clone(),
            cached: SlotCache::default(),
        }
    }
}
