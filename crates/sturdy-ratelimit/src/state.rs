use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use sturdy_core::events::EventHook;
use sturdy_core::keyed::{Idle, KeyedMap, Slot};
use sturdy_core::WallClock;

use crate::gate::Gate;
use crate::gcra::{Origin, Quota};
use crate::remote::{OnStoreError, RemoteQuota};

/// One key's limiter state, with what its callers need without another shared reference: the
/// clock origin and the quota (both fixed when the limiter is made).
#[derive(Debug)]
pub(crate) struct KeyState {
    pub(crate) gate: Gate,
    pub(crate) origin: Origin,
    pub(crate) quota: Option<Quota>,
    /// Services whose cache holds this state: while any does, the key is not forgotten, so a
    /// service never keeps using a state the map no longer has.
    users: AtomicUsize,
}

impl Idle for KeyState {
    fn is_idle(&self) -> bool {
        self.users.load(Ordering::Acquire) == 0 && self.gate.is_idle(self.origin.elapsed())
    }
}

/// The limiter state: created once by [`RateLimitLayer::new`](crate::RateLimitLayer::new) or
/// [`adaptive_only`](crate::RateLimitLayer::adaptive_only) and shared by every layer derived from
/// it (clones, setters, `with_key`), every service they make, and every handle.
pub(crate) struct State {
    pub(crate) origin: Origin,
    pub(crate) quota: Option<Quota>,
    max_keys: AtomicUsize,
    map: OnceLock<KeyedMap<KeyState>>,
    /// Set once a layer sharing this state chose its own keys (`with_key`): its handles then
    /// look keys up as given, not as host names (which they fold to lower case).
    custom_keys: AtomicBool,
}

pub(crate) const DEFAULT_MAX_KEYS: usize = 1_024;

impl fmt::Debug for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("State")
            .field("quota", &self.quota)
            .field("keys", &self.map.get().map_or(0, KeyedMap::len))
            .field("max_keys", &self.max_keys.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl State {
    pub(crate) fn new(quota: Option<Quota>) -> Self {
        Self {
            origin: Origin::now(),
            quota,
            max_keys: AtomicUsize::new(DEFAULT_MAX_KEYS),
            map: OnceLock::new(),
            custom_keys: AtomicBool::new(false),
        }
    }

    /// Marks the state's keys as chosen by `with_key`, not host names.
    pub(crate) fn set_custom_keys(&self) {
        self.custom_keys.store(true, Ordering::Relaxed);
    }

    /// `key` as the state keeps it: a host name in lower case, a custom key as given.
    pub(crate) fn stored_key<'k>(&self, key: &'k str) -> std::borrow::Cow<'k, str> {
        sturdy_core::key::stored_key(key, !self.custom_keys.load(Ordering::Relaxed))
    }

    /// The key map, made with the key bound on first use.
    pub(crate) fn map(&self) -> &KeyedMap<KeyState> {
        self.map
            .get_or_init(|| KeyedMap::new(self.max_keys.load(Ordering::Acquire)))
    }

    /// The key map if any call has been made.
    pub(crate) fn map_if_used(&self) -> Option<&KeyedMap<KeyState>> {
        self.map.get()
    }

    /// Sets the key bound; `false` when the map already exists (its bound is then fixed).
    pub(crate) fn set_max_keys(&self, n: usize) -> bool {
        self.max_keys.store(n, Ordering::Release);
        self.map.get().is_none()
    }

    /// The state of `key` bound to `config`, registered as used until the binding is dropped.
    pub(crate) fn bind(&self, key: &str, config: &Arc<Config>) -> Arc<Bound> {
        let map = self.map();
        loop {
            let slot = map.get_or_insert_with(key, || KeyState {
                gate: Gate::default(),
                origin: self.origin,
                quota: self.quota,
                users: AtomicUsize::new(0),
            });
            slot.value().users.fetch_add(1, Ordering::AcqRel);
            let bound = Arc::new(Bound {
                slot,
                config: config.clone(),
            });
            // A full map may have forgotten the state between the lookup and the count; once
            // counted it no longer can. Check, and look again if it was.
            if map
                .find(bound.slot.key())
                .is_some_and(|s| Arc::ptr_eq(&s, &bound.slot))
            {
                return bound;
            }
        }
    }
}

/// How the calls that waited for a pause leave the line when it ends, when the layer has no quota
/// of its own (a quota paces them otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Release {
    /// One, then one more for each that succeeds.
    SlowStart,
    /// Spaced by this quota (one per pace).
    Paced(Quota),
    /// All at once.
    AllAtOnce,
}

/// The settings of one layer value. Setters make a new one; the [`State`] stays shared.
#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) max_wait: Duration,
    pub(crate) default_pause: Duration,
    /// Whether a bare 503 pauses (and teaches a pace) as a bare 429 does.
    pub(crate) bare_503_pauses: bool,
    pub(crate) max_pause: Duration,
    /// Without a quota: how the calls that waited for a pause leave when it ends.
    pub(crate) release: Release,
    pub(crate) remote: Option<Arc<dyn RemoteQuota>>,
    pub(crate) on_store_error: OnStoreError,
    pub(crate) clock: Arc<dyn WallClock>,
    /// Where events go, and whether keys are hosts (false once `with_key` chose other keys).
    pub(crate) events: EventHook,
    pub(crate) keys_are_hosts: bool,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("max_wait", &self.max_wait)
            .field("default_pause", &self.default_pause)
            .field("bare_503_pauses", &self.bare_503_pauses)
            .field("max_pause", &self.max_pause)
            .field("release", &self.release)
            .field("remote", &self.remote)
            .field("on_store_error", &self.on_store_error)
            .finish_non_exhaustive()
    }
}

/// A key's state together with the settings of the service that uses it: what a call's future
/// needs. Each service caches its own, so futures on different threads count references on
/// different cache lines.
pub(crate) struct Bound {
    slot: Arc<Slot<KeyState>>,
    pub(crate) config: Arc<Config>,
}

impl Bound {
    pub(crate) fn key(&self) -> &str {
        self.slot.key()
    }

    /// What a refusal names as the limit: the key, or for the shared overflow slot words that
    /// say why a key that never saw a 429 may be refused.
    pub(crate) fn scope(&self) -> &str {
        match self.slot.key() {
            sturdy_core::keyed::OVERFLOW_KEY => {
                "the overflow limiter shared by the keys past the most limiters kept"
            }
            key => key,
        }
    }

    pub(crate) fn state(&self) -> &KeyState {
        self.slot.value()
    }

    /// The key as a host for events, when keys are hosts.
    pub(crate) fn host(&self) -> Option<&str> {
        self.config.keys_are_hosts.then(|| self.key())
    }
}

impl Drop for Bound {
    fn drop(&mut self) {
        self.slot.value().users.fetch_sub(1, Ordering::AcqRel);
    }
}

impl fmt::Debug for Bound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bound")
            .field("key", &self.key())
            .field("state", self.state())
            .finish_non_exhaustive()
    }
}
