use std::sync::Arc;
use std::time::Duration;

use sturdy_core::key::ByHost;
use sturdy_core::keyed::{KeyedMap, SlotCache};
use sturdy_core::{SystemClock, WallClock};
use tokio::time::Instant;
use tower::Layer;

use crate::remote::{OnStoreError, RemoteQuota};
use crate::state::{Policy, Shared};
use crate::{Quota, RateLimit};

/// Limits the rate of calls per key and pauses every caller of a key when the server says so;
/// see the [crate docs](crate).
///
/// All services made by one layer (and their clones) share one limiter state behind one `Arc`.
/// Configure the layer first: each setter starts a fresh state.
#[derive(Clone)]
#[must_use]
pub struct RateLimitLayer<K = ByHost> {
    pub(crate) shared: Arc<Shared>,
    pub(crate) key: K,
}

impl<K: std::fmt::Debug> std::fmt::Debug for RateLimitLayer<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("shared", &self.shared)
            .field("key", &self.key)
            .finish()
    }
}

struct Settings {
    quota: Option<Quota>,
    remote: Option<Arc<dyn RemoteQuota>>,
    on_store_error: OnStoreError,
    max_wait: Duration,
    default_pause: Duration,
    clock: Arc<dyn WallClock>,
    max_keys: usize,
}

impl Settings {
    fn of(s: &Shared, max_keys: usize) -> Self {
        Self {
            quota: s.quota,
            remote: s.policy.remote.clone(),
            on_store_error: s.policy.on_store_error,
            max_wait: s.max_wait,
            default_pause: s.policy.default_pause,
            clock: s.policy.clock.clone(),
            max_keys,
        }
    }

    fn build(self) -> Arc<Shared> {
        Arc::new(Shared {
            quota: self.quota,
            max_wait: self.max_wait,
            policy: Arc::new(Policy {
                origin: Instant::now(),
                remote: self.remote,
                on_store_error: self.on_store_error,
                default_pause: self.default_pause,
                clock: self.clock,
            }),
            map: KeyedMap::new(self.max_keys),
        })
    }
}

const DEFAULT_MAX_KEYS: usize = 1_024;

impl RateLimitLayer {
    /// A limiter with `quota` per host: calls wait for a slot up to 30 s, else fail with
    /// [`RateLimited`](sturdy_core::RateLimited); a 429 or 503 with `Retry-After`, or quota
    /// headers with nothing left, pause every caller of the host until the reset (a bare 429
    /// pauses 1 s).
    pub fn new(quota: Quota) -> Self {
        Self::build(Some(quota))
    }

    /// No quota of our own: only the pauses servers ask for (429, `RateLimit`, `X-RateLimit-*`).
    pub fn adaptive_only() -> Self {
        Self::build(None)
    }

    fn build(quota: Option<Quota>) -> Self {
        Self {
            shared: Settings {
                quota,
                remote: None,
                on_store_error: OnStoreError::default(),
                max_wait: Duration::from_secs(30),
                default_pause: Duration::from_secs(1),
                clock: Arc::new(SystemClock),
                max_keys: DEFAULT_MAX_KEYS,
            }
            .build(),
            key: ByHost,
        }
    }
}

impl<K> RateLimitLayer<K> {
    fn edit(mut self, f: impl FnOnce(&mut Settings)) -> Self {
        let mut s = Settings::of(&self.shared, DEFAULT_MAX_KEYS);
        f(&mut s);
        self.shared = s.build();
        self
    }

    /// The longest a call waits for a slot or a pause to end \[30 s\]; past it, the call fails at
    /// once with `RateLimited` carrying the wait. Zero: never wait.
    pub fn with_max_wait(self, max_wait: Duration) -> Self {
        self.edit(|s| s.max_wait = max_wait)
    }

    /// How long a 429 without any wait header pauses its key \[1 s\].
    pub fn with_default_pause(self, pause: Duration) -> Self {
        self.edit(|s| s.default_pause = pause)
    }

    /// Keeps the quota in a shared store (e.g. `sturdy_redis::RedisQuota`) instead of in this
    /// process, so several processes share it. Pauses are also published to the store.
    pub fn with_remote(self, remote: Arc<dyn RemoteQuota>) -> Self {
        self.edit(|s| s.remote = Some(remote))
    }

    /// What to do when the remote store fails [`OnStoreError::Allow`].
    pub fn on_store_error(self, choice: OnStoreError) -> Self {
        self.edit(|s| s.on_store_error = choice)
    }

    /// The most keys kept \[1,024\]; past it, idle keys are forgotten, then new keys share one.
    pub fn with_max_keys(self, n: usize) -> Self {
        self.edit(|s| s.max_keys = n)
    }

    /// The wall clock used to read HTTP-date resets \[the system clock\].
    pub fn with_clock(self, clock: Arc<dyn WallClock>) -> Self {
        self.edit(|s| s.clock = clock)
    }

    /// Chooses keys with `key` instead of by host, e.g. a closure `|req| -> String` per API token.
    pub fn with_key<K2>(self, key: K2) -> RateLimitLayer<K2> {
        RateLimitLayer {
            shared: self.shared,
            key,
        }
    }
}

impl<S, K: Clone> Layer<S> for RateLimitLayer<K> {
    type Service = RateLimit<S, K>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit {
            inner,
            shared: self.shared.clone(),
            key: self.key.clone(),
            cache: SlotCache::default(),
        }
    }
}
