use std::sync::Arc;
use std::time::Duration;

use sturdy_core::events::{Event, EventHook};
use sturdy_core::key::ByHost;
use sturdy_core::{SystemClock, WallClock};
use tower::Layer;

use crate::handle::RateLimitHandle;
use crate::remote::{OnStoreError, RemoteQuota};
use crate::state::{Config, Release, State};
use crate::{Quota, RateLimit};

/// The longest pause a server can impose by default: 5 minutes. See
/// [`RateLimitLayer::with_max_pause`].
pub const DEFAULT_MAX_PAUSE: Duration = Duration::from_secs(300);

/// Limits the rate of calls per key and pauses every caller of a key when the server says so;
/// see the [crate docs](crate).
///
/// # Shared state and settings
/// A layer is made with its limiter state ([`new`](Self::new) or
/// [`adaptive_only`](Self::adaptive_only)): the quota used per key, the pauses and the calls
/// waiting. That state is shared by every clone of the layer, by every layer a setter returns
/// from it (also [`with_key`](Self::with_key)), by every service any of them makes, and by every
/// [`RateLimitHandle`]. Setters change only the settings of the layer they return (for example
/// two layers from one `new` may have different `max_wait`s and share one quota), never the quota
/// used or the pauses: a handle or a clone taken before a setter still sees the same quota and
/// pauses. Two setters belong to the state itself: [`with_max_keys`](Self::with_max_keys) (its
/// bound, fixed once the first call went through) and [`with_key`](Self::with_key) (after it, the
/// state's handles look keys up as given rather than as host names).
#[derive(Clone)]
#[must_use]
pub struct RateLimitLayer<K = ByHost> {
    pub(crate) state: Arc<State>,
    pub(crate) config: Arc<Config>,
    pub(crate) key: K,
}

impl<K: std::fmt::Debug> std::fmt::Debug for RateLimitLayer<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("state", &self.state)
            .field("config", &self.config)
            .field("key", &self.key)
            .finish()
    }
}

impl RateLimitLayer {
    /// A limiter with `quota` per host: calls wait in line for a slot up to 30 s, else fail with
    /// [`RateLimited`](sturdy_core::RateLimited); a 429 or 503 with `Retry-After`, or quota
    /// headers with nothing left, pause every caller of the host until the reset, at most 5
    /// minutes (a bare 429 pauses 1 s).
    pub fn new(quota: Quota) -> Self {
        Self::build(Some(quota))
    }

    /// No quota of our own: only the pauses servers ask for (429, `RateLimit`, `X-RateLimit-*`).
    /// After a pause, the calls that waited for it leave by slow start: one first, then one more
    /// for each released call that succeeds (so twice as many each round trip), so a server
    /// that is back gets everyone soon and a reply asking for a new pause stops the rest
    /// ([`with_release_pace`](Self::with_release_pace) spaces them in time instead). A key also
    /// learns a pace from bare 429s (one call per eighth of the pause, halved on each bare 429
    /// at that pace down to one call per pause, a sixteenth faster per success, forgotten under
    /// 1 ms): see the crate docs.
    pub fn adaptive_only() -> Self {
        Self::build(None)
    }

    fn build(quota: Option<Quota>) -> Self {
        Self {
            state: Arc::new(State::new(quota)),
            config: Arc::new(Config {
                max_wait: Duration::from_secs(30),
                default_pause: Duration::from_secs(1),
                bare_503_pauses: false,
                max_pause: DEFAULT_MAX_PAUSE,
                release: Release::SlowStart,
                remote: None,
                on_store_error: OnStoreError::default(),
                clock: Arc::new(SystemClock),
                events: EventHook::none(),
                keys_are_hosts: true,
            }),
            key: ByHost,
        }
    }
}

impl<K> RateLimitLayer<K> {
    fn edit(mut self, f: impl FnOnce(&mut Config)) -> Self {
        f(Arc::make_mut(&mut self.config));
        self
    }

    /// The longest a call waits for its turn (a slot, the end of a pause) \[30 s\]; a call that
    /// would wait longer fails at once with `RateLimited` carrying the wait. Zero: never wait.
    /// Under slow start the wait is not known in advance (the window opens when released calls
    /// answer): a call still waiting for a place when `max_wait` has passed fails then, with the
    /// default pause as its suggested wait. A call whose attempt carries its deadline (a
    /// [`sturdy_core::hold::AttemptHold`] from a retry layer with hold marks on, as in
    /// `sturdy::ClientBuilder`) waits no later than that deadline: if its turn would come after
    /// it, it fails at once the same way.
    pub fn with_max_wait(self, max_wait: Duration) -> Self {
        self.edit(|c| c.max_wait = max_wait)
    }

    /// How long a 429 without any wait header pauses its key \[1 s\] (at most `max_pause`). Once
    /// a key without a quota has learned a pace from bare 429s, a bare 429 to a call sent at
    /// that pace pauses it for one interval of the new (halved) pace instead.
    pub fn with_default_pause(self, pause: Duration) -> Self {
        self.edit(|c| c.default_pause = pause.min(sturdy_core::clock::FAR))
    }

    /// Whether a bare 503 (no header saying how long) pauses its key and teaches it a pace, as a
    /// bare 429 does \[false\]. nginx's `limit_req` refuses with a bare 503 unless
    /// `limit_req_status` says 429: against it, turn this on (or set the status). It is off by
    /// default because a dependency that is down answers bare 503s too: pausing and pacing every
    /// caller of the host would hold them in line for seconds, where the circuit breaker should
    /// fail them fast and the retry layer retry on its own backoff. A 503 with `Retry-After`
    /// pauses either way.
    ///
    /// ```
    /// use sturdy_ratelimit::RateLimitLayer;
    ///
    /// // In front of nginx's limit_req with its default status.
    /// let layer = RateLimitLayer::adaptive_only().with_bare_503_pauses(true);
    /// # let _ = layer;
    /// ```
    pub fn with_bare_503_pauses(self, pauses: bool) -> Self {
        self.edit(|c| c.bare_503_pauses = pauses)
    }

    /// The longest pause a server can impose \[5 min, [`DEFAULT_MAX_PAUSE`]\].
    ///
    /// A pause learned from a response (`Retry-After` seconds or date, `RateLimit` with `r=0`,
    /// `X-RateLimit-Remaining: 0` with a reset, on any status) that is longer is stored as this
    /// cap: the response is returned as it is, with a [`PauseCapped`](crate::PauseCapped) in its
    /// extensions and a `tracing` warning, and later callers of the key wait at most the cap. A
    /// server that still limits then answers the first call after the cap with a new pause.
    /// Zero: never pause. `Duration::MAX` (or anything past it) is read as about 30 years
    /// ([`FAR`](sturdy_core::clock::FAR)).
    pub fn with_max_pause(self, max_pause: Duration) -> Self {
        // Read as at most about 30 years, as every duration too long to represent is.
        self.edit(|c| c.max_pause = max_pause.min(sturdy_core::clock::FAR))
    }

    /// When the layer has no quota of its own ([`adaptive_only`](RateLimitLayer::adaptive_only)):
    /// space the calls that waited for a pause by `pace` when it ends, instead of the default
    /// slow start. The first leaves when the pause ends, the next one `pace` later, and so on,
    /// in the order they came; a reply asking for a new pause holds back the ones still waiting.
    /// Calls made while others wait line up behind them. Zero: all leave at once. With a quota,
    /// the quota paces them and this setting is not used.
    ///
    /// The default, slow start, lets one call out when the pause ends, then one more for each
    /// released call that gets an answer other than 429 or 503, so the number in flight doubles
    /// every round trip while the server copes, and a new pause brings it back to one.
    pub fn with_release_pace(self, pace: Duration) -> Self {
        self.edit(|c| {
            c.release = match Quota::new(1, pace) {
                Ok(q) if !pace.is_zero() => Release::Paced(q),
                _ => Release::AllAtOnce,
            };
        })
    }

    /// Keeps the quota in a shared store (e.g. `sturdy_redis::RedisQuota`) instead of in this
    /// process, so several processes share it. Pauses are also published to the store.
    pub fn with_remote(self, remote: Arc<dyn RemoteQuota>) -> Self {
        self.edit(|c| c.remote = Some(remote))
    }

    /// What to do when the remote store fails \[[`OnStoreError::Allow`]\].
    pub fn with_on_store_error(self, choice: OnStoreError) -> Self {
        self.edit(|c| c.on_store_error = choice)
    }

    /// The most keys kept \[1,024\]; past it, idle keys (no call waiting, no pause, and no pace
    /// learned from bare 429s unless the key has had no call for 16 of its intervals, at most a
    /// minute) are forgotten, then new keys share one.
    /// At least one key is kept: 0 is taken as 1.
    ///
    /// The bound belongs to the shared limiter state and is fixed when the first call goes
    /// through: set it before then. Called later, it changes nothing and logs a warning.
    pub fn with_max_keys(self, n: usize) -> Self {
        if !self.state.set_max_keys(n) {
            tracing::warn!(
                max_keys = n,
                "with_max_keys after the first call changes nothing: the key bound is fixed"
            );
        }
        self
    }

    /// The wall clock used to read HTTP-date resets \[the system clock\].
    pub fn with_clock(self, clock: Arc<dyn WallClock>) -> Self {
        self.edit(|c| c.clock = clock)
    }

    /// Calls `f` with an [`Event`](sturdy_core::events::Event) for every call that waits
    /// in line (`RateLimitWaited`; a later slot a `with_remote` store grants is not reported,
    /// nor counted by the `metrics` feature), every call refused (`RateLimitRefused`) and every pause a server asks
    /// for (`RateLimitPaused`) \[none\]; replaces an earlier callback. With the `metrics` feature
    /// the same events are counted through the `metrics` facade either way.
    pub fn on_event(self, f: impl Fn(&Event<'_>) + Send + Sync + 'static) -> Self {
        let hook = EventHook::new(f);
        self.edit(|c| c.events = hook)
    }

    /// Chooses keys with `key` instead of by host, e.g. a closure `|req| -> String` per API token.
    /// The key is written in logs, in the `RateLimited` error's words and in a Redis store's key
    /// names: return the token's id or a hash of it, never the token itself.
    /// The returned layer shares this layer's state and settings. Its events carry the key but no
    /// host (`host: None`), so a key never becomes a metric label.
    /// A key `*` names the state the keys past the bound share
    /// ([`OVERFLOW_KEY`](sturdy_core::keyed::OVERFLOW_KEY)): its calls share it with theirs.
    /// Its keys are kept as given, case and all (the default keys are host names, in lower
    /// case: [`ByHost`](sturdy_core::key::ByHost)), and the handle looks them up as given.
    pub fn with_key<K2>(self, key: K2) -> RateLimitLayer<K2> {
        let this = self.edit(|c| c.keys_are_hosts = false);
        this.state.set_custom_keys();
        RateLimitLayer {
            state: this.state,
            config: this.config,
            key,
        }
    }

    /// A handle on this layer's limiter state: read and clear pauses.
    pub fn handle(&self) -> RateLimitHandle {
        RateLimitHandle::new(self.state.clone())
    }

    /// The layer and a [`handle`](Self::handle) on its state.
    pub fn pair(self) -> (Self, RateLimitHandle) {
        let handle = self.handle();
        (self, handle)
    }
}

impl<S, K: Clone> Layer<S> for RateLimitLayer<K> {
    type Service = RateLimit<S, K>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit {
            inner,
            shared: Arc::new(crate::service::Shared {
                state: self.state.clone(),
                config: self.config.clone(),
                first: std::sync::OnceLock::new(),
            }),
            key: self.key.clone(),
            bound: None,
            used_first: false,
        }
    }
}
