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
///
/// Each key holds the layer's [`Policy`], cloned once when the key is first seen, so a call's
/// future needs no other shared reference.
#[derive(Debug)]
pub(crate) struct KeyState {
    pub(crate) tat: AtomicU64,
    pub(crate) paused_until: AtomicU64,
    pub(crate) policy: Arc<Policy>,
}

impl KeyState {
    pub(crate) fn new(policy: Arc<Policy>) -> Self {
        Self {
            tat: AtomicU64::new(0),
            paused_until: AtomicU64::new(0),
            policy,
        }
    }
}

impl Idle for KeyState {
    fn is_idle(&self) -> bool {
        let now = self.policy.now();
        self.tat.load(Ordering::Acquire) <= now && self.paused_until.load(Ordering::Acquire) <= now
    }
}

/// What the futures of a layer need after the call: the clock origin and the reaction to pauses.
pub(crate) struct Policy {
    pub(crate) origin: Instant,
    pub(crate) remote: Option<Arc<dyn RemoteQuota>>,
    pub(crate) on_store_error: OnStoreError,
    pub(crate) default_pause: Duration,
    pub(crate) clock: Arc<dyn WallClock>,
}

impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Policy")
            .field("remote", &self.remote)
            .field("on_store_error", &self.on_store_error)
            .field("default_pause", &self.default_pause)
            .finish_non_exhaustive()
    }
}

impl Policy {
    /// Nanoseconds since the layer's origin.
    pub(crate) fn now(&self) -> u64 {
        nanos(Instant::now().saturating_duration_since(self.origin))
    }

    pub(crate) fn instant(&self, n: u64) -> Instant {
        self.origin + Duration::from_nanos(n)
    }
}

/// Everything the services of one layer share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) quota: Option<Quota>,
    pub(crate) max_wait: Duration,
    pub(crate) policy: Arc<Policy>,
    pub(crate) map: KeyedMap<KeyState>,
}

impl Shared {
    /// Makes a key's state; the policy is cloned only when a key is new, not on every call.
    pub(crate) fn make(&self) -> impl FnOnce() -> KeyState + '_ {
        || KeyState::new(self.policy.clone())
    }
}
