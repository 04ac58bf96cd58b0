use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use sturdy_core::classify::DefaultClassify;
use sturdy_core::events::{Event, EventHook};
use sturdy_core::key::ByHost;
use sturdy_core::keyed::SlotCache;
use sturdy_core::{Error, ErrorKind};
use tower::Layer;

use crate::limiter::edit;

use crate::limiter::{Cell, Config, Registry, MAX_LIMIT};
use crate::{AdaptiveConcurrency, Algorithm, ConcurrencyHandle};

/// Limits the calls in flight per host to a limit that adapts; see the [crate docs](crate).
///
/// Every service the layer makes shares the per-host limits (one `Arc`), and so do the layer's
/// clones and its [`handle`](Self::handle)s. A setter called after a clone or a handle was taken
/// applies to all of them (and the limits start afresh); services made earlier keep the settings
/// they were made with.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use sturdy_concurrency::{AdaptiveConcurrencyLayer, Algorithm};
///
/// let (layer, handle) = AdaptiveConcurrencyLayer::new()
///     .with_algorithm(Algorithm::Vegas)
///     .with_limits(2, 200)
///     .with_initial_limit(10)
///     .with_max_wait(Duration::from_secs(5))
///     .with_backoff(0.8)?
///     .pair();
/// // A host gets its limit with its first call; a handle can also set one.
/// handle.set_limit("api.example.com", 50);
/// assert_eq!(handle.limit("api.example.com"), Some(50));
/// # let _ = layer;
/// # Ok::<(), sturdy_core::Error>(())
/// ```
#[derive(Clone)]
#[must_use]
pub struct AdaptiveConcurrencyLayer<K = ByHost, C = DefaultClassify> {
    pub(crate) cell: Arc<Cell>,
    pub(crate) key: K,
    pub(crate) classify: C,
}

impl<K: fmt::Debug, C: fmt::Debug> fmt::Debug for AdaptiveConcurrencyLayer<K, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdaptiveConcurrencyLayer")
            .field("registry", &self.cell.get())
            .field("key", &self.key)
            .field("classify", &self.classify)
            .finish()
    }
}

impl Default for AdaptiveConcurrencyLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl AdaptiveConcurrencyLayer {
    /// A limit per host with the defaults: [`Algorithm::Aimd`], starting at 20 calls at once,
    /// between 1 and 1,000, backing off to 0.9 of the limit on an overload signal; a call that
    /// finds the limit full waits up to 30 s for a place; at most 1,024 hosts.
    pub fn new() -> Self {
        Self {
            cell: Arc::new(Cell::new(Registry::new(Config::default()))),
            key: ByHost,
            classify: DefaultClassify,
        }
    }
}

impl<K, C> AdaptiveConcurrencyLayer<K, C> {
    /// A layer and a handle on its limits.
    pub fn pair(self) -> (Self, ConcurrencyHandle) {
        let h = self.handle();
        (self, h)
    }

    /// A handle on this layer's limits: read them, or set one by hand.
    pub fn handle(&self) -> ConcurrencyHandle {
        ConcurrencyHandle {
            cell: self.cell.clone(),
        }
    }

    /// How the limit adapts \[[`Algorithm::Aimd`]\].
    pub fn with_algorithm(self, algorithm: Algorithm) -> Self {
        edit(&self.cell, |c| c.algorithm = algorithm);
        self
    }

    /// The bounds of the limit \[1, 1,000\]. A `min` of 0 is taken as 1 (a limit of 0 would never
    /// let a call through to learn that the server recovered), a `max` below `min` as `min`, and
    /// both are capped at 1,000,000.
    pub fn with_limits(self, min: usize, max: usize) -> Self {
        let min = min.clamp(1, MAX_LIMIT);
        let max = max.clamp(min, MAX_LIMIT);
        edit(&self.cell, |c| {
            c.min = min;
            c.max = max;
        });
        self
    }

    /// The limit a host starts with \[20\], taken into the bounds.
    pub fn with_initial_limit(self, n: usize) -> Self {
        edit(&self.cell, |c| c.initial = n);
        self
    }

    /// On an overload signal, the limit is multiplied by `ratio` \[0.9\], at most once per round
    /// trip.
    ///
    /// # Errors
    /// A [`Config`](ErrorKind::Config) error when `ratio` is not strictly between 0.0 and 1.0.
    pub fn with_backoff(self, ratio: f64) -> Result<Self, Error> {
        if !(ratio > 0.0 && ratio < 1.0) {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "the backoff ratio must be strictly between 0.0 and 1.0 (0.9 lowers the limit by 10 %), not {ratio}"
                ),
            ));
        }
        edit(&self.cell, |c| c.backoff = ratio);
        Ok(self)
    }

    /// How long a call waits for a place when its host's limit is full \[30 s\]; past it, the
    /// call fails with a [`LimitReached`](crate::LimitReached) error and is not sent. Zero sheds
    /// load: a call that finds the limit full fails at once.
    pub fn with_max_wait(self, wait: Duration) -> Self {
        edit(&self.cell, |c| c.max_wait = wait);
        self
    }

    /// The most hosts with a limit kept \[1,024\] (at least 1); past it, hosts with nothing in
    /// flight are forgotten (they start again from the initial limit), then new hosts share one
    /// overflow limit.
    pub fn with_max_hosts(self, n: usize) -> Self {
        edit(&self.cell, |c| c.max_hosts = n.max(1));
        self
    }

    /// Calls `f` with an [`Event`](sturdy_core::events::Event) whenever a key's limit changes
    /// (`ConcurrencyLimitChanged`, the whole number of calls) and for every call refused
    /// (`ConcurrencyRejected`) \[none\]; replaces an earlier callback. With the `metrics`
    /// feature the same events are counted through the `metrics` facade either way.
    pub fn on_event(self, f: impl Fn(&Event<'_>) + Send + Sync + 'static) -> Self {
        let hook = EventHook::new(f);
        edit(&self.cell, |c| c.events = hook);
        self
    }

    /// Keeps a limit per `key` instead of per host, e.g. a closure `|req| -> String`. Events then
    /// carry the key but no host (`host: None`), so a key never becomes a metric label.
    /// A key `*` names the state the keys past the bound share
    /// ([`OVERFLOW_KEY`](sturdy_core::keyed::OVERFLOW_KEY)): its calls share it with theirs.
    /// Its keys are kept as given, case and all (the default keys are host names, in lower
    /// case: [`ByHost`](sturdy_core::key::ByHost)), and the handle looks them up as given.
    pub fn with_key<K2>(self, key: K2) -> AdaptiveConcurrencyLayer<K2, C> {
        edit(&self.cell, |c| c.keys_are_hosts = false);
        AdaptiveConcurrencyLayer {
            cell: self.cell,
            key,
            classify: self.classify,
        }
    }

    /// Decides what an outcome says \[[`DefaultClassify`]\]: any
    /// [`Classify`](sturdy_core::Classify), such as a closure `|result| -> Outcome`, the same
    /// type the retry layer and the circuit breaker take. An outcome whose kind is
    /// [`RateLimited`](ErrorKind::RateLimited), [`Timeout`](ErrorKind::Timeout), or a
    /// [`Server`](ErrorKind::Server) error 503 or 504 is an overload signal; a success is a
    /// success; anything else says nothing about capacity.
    pub fn with_classifier<C2>(self, classify: C2) -> AdaptiveConcurrencyLayer<K, C2> {
        AdaptiveConcurrencyLayer {
            cell: self.cell,
            key: self.key,
            classify,
        }
    }
}

impl<S, K: Clone, C: Clone> Layer<S> for AdaptiveConcurrencyLayer<K, C> {
    type Service = AdaptiveConcurrency<S, K, C>;

    fn layer(&self, inner: S) -> Self::Service {
        AdaptiveConcurrency {
            inner,
            registry: self.cell.get(),
            key: self.key.clone(),
            classify: self.classify.clone(),
            cache: SlotCache::default(),
        }
    }
}
