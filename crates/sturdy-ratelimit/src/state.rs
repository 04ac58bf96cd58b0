use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sturdy_core::keyed::{Idle, KeyedMap};
use sturdy_core::WallClock;
use tokio::time::Instant;

use crate::gcra::{nanos, Quota};
use crate::remote::{OnStoreError, RemoteQuota};

/// One key's limiter state: the GCRA's TAT and the pause a server asked for, both in nanoseconds
/// since the layer's origin.
#[derive(Debug)]
pub(crate) struct KeyState {
    pub(crate) tat: AtomicU64,
    pub(crate) paused_until: AtomicU64,
    origin: Instant,
}

impl KeyState {
    pub(crate) fn new(origin: Instant) -> Self {
        Self {
            tat: AtomicU64::new(0),
            paused_until: AtomicU64::new(0),
            origin,
        }
    }
}

impl Idle for KeyState {
    fn is_idle(&self) -> bool {
        let now = nanos(Instant::now().saturating_duration_since(self.origin));
        self.tat.load(Ordering::Acquire) <= now && self.paused_until.load(Ordering::Acquire) <= now
    }
}

/// Everything the services of one layer share.
pub(crate) struct Shared {
    pub(crate) quota: Option<Quota>,
    pub(crate) remote: Option<Arc<dyn RemoteQuota>>,
    pub(crate) on_store_error: OnStoreError,
    pub(crate) max_wait: Duration,
    pub(crate) default_pause: Duration,
    pub(crate) clock: Arc<dyn WallClock>,
    pub(crate) map: KeyedMap<KeyState>,
    pub(crate) origin: Instant,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("quota", &self.quota)
            .field("remote", &self.remote)
            .field("on_store_error", &self.on_store_error)
            .field("max_wait", &self.max_wait)
            .field("default_pause", &self.default_pause)
            .field("keys", &self.map)
            .finish_non_exhaustive()
    }
}

impl Shared {
    pub(crate) fn now(&self) -> u64 {
        nanos(Instant::now().saturating_duration_since(self.origin))
    }

    pub(crate) fn instant(&self, n: u64) -> Instant {
        self.origin + Duration::from_nanos(n)
    }

    pub(crate) fn make(&self) -> impl FnOnce() -> KeyState {
        let origin = self.origin;
        move || KeyState::new(origin)
    }
}
