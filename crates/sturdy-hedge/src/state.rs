//! Per-host state: a latency histogram, the hedge delay taken from it, the budget and counters.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use sturdy_core::events::EventHook;
use sturdy_core::keyed::{Idle, KeyedMap, Slot};
use tokio::time::Instant;

use crate::budget::{units, Budget};
use crate::histogram::Histogram;

/// Recompute the delay after this many new samples (or when the window turns).
const REFRESH_EVERY: u64 = 16;
/// `delay` when there is none (too few samples).
const NO_DELAY: u64 = u64::MAX;

/// The layer's settings, shared by every host.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) percentile: f64,
    pub(crate) min_samples: u64,
    pub(crate) ratio: f64,
    pub(crate) burst: u32,
    /// Per call and cap, in billionths of a hedge.
    pub(crate) deposit: u64,
    pub(crate) cap: u64,
    pub(crate) min_delay: Duration,
    pub(crate) max_delay: Duration,
    pub(crate) window: Duration,
    pub(crate) keyed: bool,
    pub(crate) key_header: HeaderName,
    pub(crate) max_hosts: usize,
    pub(crate) events: EventHook,
    /// Whether keys are hosts (false once `with_key` chose other keys).
    pub(crate) keys_are_hosts: bool,
}

impl Default for Config {
    fn default() -> Self {
        let (deposit, cap) = units(0.05, 10);
        Self {
            percentile: 0.95,
            min_samples: 100,
            ratio: 0.05,
            burst: 10,
            deposit,
            cap,
            min_delay: Duration::from_millis(1),
            max_delay: Duration::from_secs(10),
            window: Duration::from_secs(10),
            keyed: false,
            key_header: HeaderName::from_static("idempotency-key"),
            max_hosts: 1_024,
            events: EventHook::none(),
            keys_are_hosts: true,
        }
    }
}

/// One host's state.
pub(crate) struct HostState {
    pub(crate) config: Arc<Config>,
    origin: Instant,
    window_ns: u64,
    hist: Histogram,
    pub(crate) budget: Budget,
    /// The hedge delay in µs, or [`NO_DELAY`].
    delay: AtomicU64,
    /// The window in which the delay was computed.
    computed: AtomicU64,
    pub(crate) calls: AtomicU64,
    pub(crate) hedges: AtomicU64,
    pub(crate) wins: AtomicU64,
}

impl fmt::Debug for HostState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostState")
            .field("delay", &self.delay())
            .field("calls", &self.calls.load(Ordering::Relaxed))
            .field("hedges", &self.hedges.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl HostState {
    pub(crate) fn new(config: Arc<Config>, now: Instant) -> Self {
        let window_ns = u64::try_from(config.window.as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        Self {
            budget: Budget::new(config.cap),
            config,
            origin: now,
            window_ns,
            hist: Histogram::new(),
            delay: AtomicU64::new(NO_DELAY),
            computed: AtomicU64::new(0),
            calls: AtomicU64::new(0),
            hedges: AtomicU64::new(0),
            wins: AtomicU64::new(0),
        }
    }

    fn epoch(&self, now: Instant) -> u64 {
        let ns = u64::try_from(now.saturating_duration_since(self.origin).as_nanos())
            .unwrap_or(u64::MAX);
        ns / self.window_ns
    }

    /// The hedge delay: `None` while the recent windows hold too few samples.
    ///
    /// A host that goes quiet keeps its last delay until its next answered call, which starts a
    /// new window and recomputes it; a call that would hedge on it checks first that it is
    /// current ([`Self::current_delay`]).
    pub(crate) fn delay(&self) -> Option<Duration> {
        let d = self.delay.load(Ordering::Relaxed);
        (d != NO_DELAY).then(|| Duration::from_micros(d))
    }

    /// The hedge delay as a reader outside the hot path sees it: also `None` when it was
    /// computed two windows ago or more, from calls the histogram has forgotten.
    /// Also `None` when a window turned since it was computed and the two recent windows now
    /// hold fewer samples than the minimum (the older ones left them).
    pub(crate) fn current_delay(&self, now: Instant) -> Option<Duration> {
        let epoch = self.epoch(now);
        let computed = self.computed.load(Ordering::Relaxed);
        if epoch > computed + 1 {
            return None;
        }
        if epoch != computed && self.hist.len(epoch) < self.config.min_samples {
            return None;
        }
        self.delay()
    }

    /// Records the latency of a call answered at `now`.
    pub(crate) fn record(&self, latency: Duration, now: Instant) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.record_in(self.epoch(now), micros);
    }

    /// Records a call answered without waiting (its future was ready when first polled), in the
    /// window of the last computation, without reading the clock.
    pub(crate) fn record_instant(&self) {
        self.record_in(self.computed.load(Ordering::Relaxed), 0);
    }

    fn record_in(&self, epoch: u64, micros: u64) {
        let n = self.hist.record(epoch, micros);
        let due = n.is_multiple_of(REFRESH_EVERY)
            || self.computed.load(Ordering::Relaxed) != epoch
            // The sample that completes the minimum turns hedging on at once: in this window
            // alone, or, while hedging is off, in this window and the one before together.
            || n == self.config.min_samples
            || (self.delay.load(Ordering::Relaxed) == NO_DELAY
                && self.hist.len(epoch) >= self.config.min_samples);
        if due {
            self.refresh(epoch);
        }
    }

    fn refresh(&self, epoch: u64) {
        let c = &self.config;
        let d = match self.hist.quantile(epoch, c.percentile) {
            Some((micros, n)) if n >= c.min_samples => {
                let lo = u64::try_from(c.min_delay.as_micros()).unwrap_or(u64::MAX);
                let hi = u64::try_from(c.max_delay.as_micros()).unwrap_or(u64::MAX);
                micros.clamp(lo, hi.max(lo)).min(NO_DELAY - 1)
            }
            _ => NO_DELAY,
        };
        self.delay.store(d, Ordering::Relaxed);
        self.computed.store(epoch, Ordering::Relaxed);
    }

    /// Samples in the current and the previous window.
    pub(crate) fn samples(&self, now: Instant) -> u64 {
        self.hist.len(self.epoch(now))
    }

    /// A percentile of the recent latencies (to the top of its 12.5 % bucket).
    pub(crate) fn percentile(&self, q: f64, now: Instant) -> Option<Duration> {
        self.hist
            .quantile(self.epoch(now), q)
            .map(|(us, _)| Duration::from_micros(us))
    }
}

impl Idle for HostState {
    /// A host with no sample in the last two windows has nothing worth keeping.
    fn is_idle(&self) -> bool {
        let last = self.hist.latest().unwrap_or(0);
        self.epoch(Instant::now()) > last + 1
    }
}

/// Every host's state, bounded in number.
pub(crate) struct Registry {
    pub(crate) config: Arc<Config>,
    pub(crate) map: KeyedMap<HostState>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("config", &self.config)
            .field("hosts", &self.map)
            .finish()
    }
}

impl Registry {
    pub(crate) fn new(config: Config) -> Self {
        let max = config.max_hosts;
        Self {
            config: Arc::new(config),
            map: KeyedMap::new(max),
        }
    }

    pub(crate) fn make(&self) -> impl FnOnce() -> HostState + '_ {
        || HostState::new(self.config.clone(), Instant::now())
    }

    /// The state serving `key` (a host in any case, when keys are hosts): its own, or the
    /// overflow one past the bound. For the handle: calls look their state up by their key.
    pub(crate) fn find(&self, key: &str) -> Option<Arc<Slot<HostState>>> {
        let key = sturdy_core::key::stored_key(key, self.config.keys_are_hosts);
        self.map.find_serving(&key)
    }
}

/// The registry of a layer, its clones and its handles: one cell, so that a setter called after a
/// clone or a handle still applies to all of them.
pub(crate) type Cell = sturdy_core::keyed::SharedCell<Registry>;

/// Setters replace the registry with one of edited settings (hosts start afresh).
pub(crate) fn edit(cell: &Cell, f: impl FnOnce(&mut Config)) {
    cell.replace(|r| {
        let mut config = (*r.config).clone();
        f(&mut config);
        Registry::new(config)
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The minimum reached across a window's turn turns hedging on at that sample; once the
    /// older samples leave the windows, the delay read outside the hot path is gone.
    #[tokio::test(start_paused = true)]
    async fn the_minimum_across_two_windows_turns_hedging_on_at_once() {
        let t0 = Instant::now();
        let h = HostState::new(Arc::new(Config::default()), t0);
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        for i in 0..60 {
            h.record(Duration::from_millis(200), at(200 * (i + 1)));
        }
        for i in 0..39 {
            h.record(Duration::from_millis(10), at(12_000 + 10 * (i + 1)));
        }
        assert_eq!(h.samples(at(12_390)), 99);
        assert_eq!(h.current_delay(at(12_390)), None);
        h.record(Duration::from_millis(10), at(12_400));
        assert_eq!(h.samples(at(12_400)), 100);
        let d = h.current_delay(at(12_400)).expect("on at the 100th sample");
        assert!(d > Duration::from_millis(200), "{d:?}");
        // At 21 s the first window's 49 samples have left: 51 remain, too few.
        assert_eq!(h.samples(at(21_000)), 51);
        assert_eq!(h.current_delay(at(21_000)), None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_delay_follows_the_percentile_once_there_are_enough_samples() {
        let config = Arc::new(Config {
            min_samples: 20,
            ..Config::default()
        });
        let h = HostState::new(config, Instant::now());
        for _ in 0..16 {
            h.record(Duration::from_millis(4), Instant::now());
        }
        assert_eq!(h.delay(), None, "16 samples are too few");
        for _ in 0..16 {
            h.record(Duration::from_millis(4), Instant::now());
        }
        let d = h.delay().unwrap();
        assert!(
            d >= Duration::from_millis(4) && d < Duration::from_micros(4_500),
            "{d:?}"
        );
        // Two windows of silence: the delay is forgotten and the host is idle.
        tokio::time::advance(Duration::from_secs(21)).await;
        assert_eq!(h.current_delay(Instant::now()), None);
        assert!(h.is_idle());
    }

    #[tokio::test(start_paused = true)]
    async fn the_delay_is_clamped() {
        let config = Arc::new(Config {
            min_samples: 1,
            min_delay: Duration::from_millis(2),
            max_delay: Duration::from_millis(50),
            ..Config::default()
        });
        let h = HostState::new(config, Instant::now());
        for _ in 0..16 {
            h.record(Duration::from_micros(100), Instant::now());
        }
        assert_eq!(h.delay(), Some(Duration::from_millis(2)));
        for _ in 0..1_000 {
            h.record(Duration::from_secs(1), Instant::now());
        }
        assert_eq!(h.delay(), Some(Duration::from_millis(50)));
    }
}
