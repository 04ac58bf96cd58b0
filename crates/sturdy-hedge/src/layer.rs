use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use sturdy_core::events::{Event, EventHook};
use sturdy_core::key::ByHost;
use sturdy_core::keyed::SlotCache;
use sturdy_core::{Error, ErrorKind};
use tower::Layer;

use crate::state::edit;

use crate::budget::units;
use crate::state::{Cell, Config, Registry};
use crate::{Hedge, HedgeHandle};

/// Hedges slow safe calls; see the [crate docs](crate).
///
/// Every service the layer makes shares the per-host state (one `Arc`), and so do the layer's
/// clones and its [`handle`](Self::handle)s. A setter called after a clone or a handle was taken
/// applies to all of them (and starts the per-host state afresh); services made earlier keep the
/// settings they were made with.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use sturdy_hedge::HedgeLayer;
///
/// let (layer, handle) = HedgeLayer::new()
///     .with_percentile(0.99)? // hedge after the host's p99
///     .with_budget(0.02, 5)? // at most 2 % extra requests, plus 5 in a row
///     .with_delay_bounds(Duration::from_millis(5), Duration::from_secs(2))
///     .pair();
/// assert!(handle.stats("api.example.com").is_none(), "no call yet");
/// assert!(HedgeLayer::new().with_percentile(1.5).is_err());
/// # let _ = layer;
/// # Ok::<(), sturdy_core::Error>(())
/// ```
#[derive(Clone)]
#[must_use]
pub struct HedgeLayer<K = ByHost> {
    pub(crate) cell: Arc<Cell>,
    pub(crate) key: K,
}

impl<K: fmt::Debug> fmt::Debug for HedgeLayer<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HedgeLayer")
            .field("registry", &self.cell.get())
            .field("key", &self.key)
            .finish()
    }
}

impl Default for HedgeLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl HedgeLayer {
    /// Hedging per host with the defaults: a second copy of a GET, HEAD or OPTIONS request once
    /// it has been outstanding longer than the host's 95th-percentile latency (over the last 10
    /// to 20 s, once 100 calls were seen; never sooner than 1 ms nor later than 10 s after it
    /// was sent); at most 5 % extra requests plus a burst of 10; at most 1,024 hosts.
    pub fn new() -> Self {
        Self {
            cell: Arc::new(Cell::new(Registry::new(Config::default()))),
            key: ByHost,
        }
    }
}

fn config_error(msg: String) -> Error {
    Error::new(ErrorKind::Config, msg)
}

impl<K> HedgeLayer<K> {
    /// A layer and a handle on its per-host figures.
    pub fn pair(self) -> (Self, HedgeHandle) {
        let h = self.handle();
        (self, h)
    }

    /// A handle on this layer's per-host figures (calls, hedges, the current delay).
    pub fn handle(&self) -> HedgeHandle {
        HedgeHandle {
            cell: self.cell.clone(),
        }
    }

    /// Sends the second copy once the first has been outstanding longer than this percentile
    /// (strictly between 0.0 and 1.0) of the host's recent latencies \[0.95\].
    ///
    /// # Errors
    /// A [`Config`](ErrorKind::Config) error when `percentile` is not strictly between 0 and 1.
    pub fn with_percentile(self, percentile: f64) -> Result<Self, Error> {
        if !(percentile > 0.0 && percentile < 1.0) {
            return Err(config_error(format!(
                "the hedging percentile must be strictly between 0.0 and 1.0 (0.95 is p95), not {percentile}"
            )));
        }
        edit(&self.cell, |c| c.percentile = percentile);
        Ok(self)
    }

    /// At most `ratio` extra requests per call (0.0 to 1.0), plus `burst` in a row \[0.05, 10\].
    /// Each hedgeable call adds `ratio` of a hedge to the host's budget (capped at `burst`), each
    /// hedge spends one; a hedge that finds the budget empty is not sent. The budget starts full.
    /// A `burst` of 0 caps the budget at nothing: no call is hedged, whatever `ratio`
    /// (`with_budget(0.0, 0)` is the plain way to turn hedging off).
    ///
    /// # Errors
    /// A [`Config`](ErrorKind::Config) error when `ratio` is not in `0.0..=1.0`.
    pub fn with_budget(self, ratio: f64, burst: u32) -> Result<Self, Error> {
        if !(0.0..=1.0).contains(&ratio) {
            return Err(config_error(format!(
                "the hedging budget must be a share of calls between 0.0 and 1.0 (0.05 is 5 %), not {ratio}"
            )));
        }
        let (deposit, cap) = units(ratio, burst);
        edit(&self.cell, |c| {
            c.ratio = ratio;
            c.burst = burst;
            c.deposit = deposit;
            c.cap = cap;
        });
        Ok(self)
    }

    /// Hedges only once the host's recent windows hold at least `n` latencies \[100\] (0 is
    /// taken as 1): a percentile of a handful of calls says little.
    pub fn with_min_samples(self, n: u64) -> Self {
        edit(&self.cell, |c| c.min_samples = n.max(1));
        self
    }

    /// Bounds the delay before a hedge, whatever the percentile says \[1 ms, 10 s\]. A `max` below
    /// `min` is taken as `min`.
    pub fn with_delay_bounds(self, min: Duration, max: Duration) -> Self {
        edit(&self.cell, |c| {
            c.min_delay = min;
            c.max_delay = max.max(min);
        });
        self
    }

    /// The length of a histogram window \[10 s\]: the percentile covers the last one to two
    /// windows, so the delay follows a host whose latency changes. Zero is taken as 1 ms.
    pub fn with_window(self, window: Duration) -> Self {
        edit(&self.cell, |c| {
            c.window = window.max(Duration::from_millis(1));
        });
        self
    }

    /// Also hedges requests of any method that carry an `Idempotency-Key` header \[off\] (not
    /// a blank one, empty or only spaces and tabs, which names no operation). Only
    /// for servers that deduplicate by key and answer a concurrent duplicate with the first
    /// call's outcome: a server that answers `409 Conflict` to a duplicate in flight (as the
    /// IETF draft allows) turns a hedge of a slow POST into a 409 when the hedge answers first.
    pub fn with_keyed_requests(self, on: bool) -> Self {
        edit(&self.cell, |c| c.keyed = on);
        self
    }

    /// The header [`with_keyed_requests`](Self::with_keyed_requests) looks for
    /// \[`idempotency-key`\].
    pub fn with_idempotency_header(self, name: HeaderName) -> Self {
        edit(&self.cell, |c| c.key_header = name);
        self
    }

    /// The most hosts with state kept \[1,024\] (at least 1; about 4 KiB each); past it, hosts
    /// with no answer recorded in the last two windows (none called, or every call failed) are
    /// forgotten, then new hosts share one overflow state. So a host that answered lately keeps
    /// its state until it has been quiet that long (an answer ready on its first poll reads no
    /// clock and counts in the window of the host's last timed answer; see the guide).
    pub fn with_max_hosts(self, n: usize) -> Self {
        edit(&self.cell, |c| c.max_hosts = n.max(1));
        self
    }

    /// Calls `f` with an [`Event`](sturdy_core::events::Event) for every second copy sent
    /// (`HedgeSent`) and every second copy that answered first (`HedgeWon`) \[none\]; replaces
    /// an earlier callback. With the `metrics` feature the same events are counted through the
    /// `metrics` facade either way.
    pub fn on_event(self, f: impl Fn(&Event<'_>) + Send + Sync + 'static) -> Self {
        let hook = EventHook::new(f);
        edit(&self.cell, |c| c.events = hook);
        self
    }

    /// Keeps state per `key` instead of per host, e.g. a closure `|req| -> String`. Events then
    /// carry the key but no host (`host: None`), so a key never becomes a metric label.
    /// A key `*` names the state the keys past the bound share
    /// ([`OVERFLOW_KEY`](sturdy_core::keyed::OVERFLOW_KEY)): its calls share it with theirs.
    /// Its keys are kept as given, case and all (the default keys are host names, in lower
    /// case: [`ByHost`](sturdy_core::key::ByHost)), and the handle looks them up as given.
    pub fn with_key<K2>(self, key: K2) -> HedgeLayer<K2> {
        edit(&self.cell, |c| c.keys_are_hosts = false);
        HedgeLayer {
            cell: self.cell,
            key,
        }
    }
}

impl<S, K: Clone> Layer<S> for HedgeLayer<K> {
    type Service = Hedge<S, K>;

    fn layer(&self, inner: S) -> Self::Service {
        Hedge {
            inner,
            registry: self.cell.get(),
            key: self.key.clone(),
            cache: SlotCache::default(),
        }
    }
}
