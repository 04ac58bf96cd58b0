use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use sturdy_core::events::Event;
use sturdy_core::hold::AttemptHold;
use sturdy_core::key::KeyExtractor;
use sturdy_core::trace::DelaySource;
use sturdy_core::{BoxError, RateLimited, Trace, TraceEvent};
use tower::Service;

use crate::future::{line_pace, ResponseFuture};
use crate::gcra::nanos;
use crate::state::{Bound, Config, State};

/// The service made by [`RateLimitLayer`](crate::RateLimitLayer).
///
/// # Clone
/// Clones share the limiter state and the settings.
///
/// # Backpressure
/// `poll_ready` is the inner service's. A call that can go now calls the inner service at once; a
/// call that must wait (for a slot, for a pause to end, for the remote store's decision) waits
/// inside its response future (a timer, no polling loop) holding the inner service that
/// `poll_ready` made ready, and calls that very service when its turn comes, without asking for
/// readiness again. So whatever the inner service reserved in `poll_ready` (a concurrency permit,
/// a `Buffer` slot) is used by this call and released with it, and `RateLimit` may sit over or
/// under `Buffer` and concurrency limits, driven by `oneshot` or by a kept service
/// (`ready().await?.call(req)`). A call that would wait longer than `max_wait` fails at once with
/// [`RateLimited`], without calling the inner service, and gives back at once what the inner
/// service reserved in `poll_ready`.
pub struct RateLimit<S, K> {
    pub(crate) inner: S,
    pub(crate) shared: Arc<Shared>,
    pub(crate) key: K,
    pub(crate) bound: Option<Arc<Bound>>,
    /// Whether this service used the shared first binding already.
    pub(crate) used_first: bool,
}

/// What a service and its clones share, behind one reference count: services are cloned for
/// every call, and each `Arc` in a clone is an atomic increment and decrement.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) state: Arc<State>,
    pub(crate) config: Arc<Config>,
    /// The state of the first key any clone of this service used: services are usually cloned
    /// per call from one that is never called, so this is what skips the map on the common path.
    pub(crate) first: std::sync::OnceLock<Arc<Bound>>,
}

impl<S: Clone, K: Clone> Clone for RateLimit<S, K> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            key: self.key.clone(),
            bound: self.bound.clone(),
            used_first: false,
        }
    }
}

impl<S: std::fmt::Debug, K> std::fmt::Debug for RateLimit<S, K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimit")
            .field("inner", &self.inner)
            .field("state", &self.shared.state)
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

sturdy_core::define_inner_service_accessors!(RateLimit<S, K>);

// ===== impl RateLimit =====

impl<S, K> RateLimit<S, K> {
    /// The state of `key` with this service's settings: the cached one when the key is the same
    /// as last time (no lock, no hash), else from the shared map.
    #[inline]
    fn bound(&mut self, key: &str) -> Arc<Bound> {
        if let Some(b) = &self.bound {
            if b.key() == key {
                return b.clone();
            }
        }
        let shared = &*self.shared;
        if let Some(b) = shared.first.get() {
            if b.key() == key && !self.used_first {
                // A clone made for one call: the shared state, without a lookup.
                self.used_first = true;
                return b.clone();
            }
        }
        // A clone called again is kept (on a thread of its own, often): it binds the key itself,
        // so that its futures do not count references on the line other threads use.
        let b = shared.state.bind(key, &shared.config);
        if shared.first.get().is_none() {
            let _ = shared.first.set(b.clone());
        }
        self.bound = Some(b.clone());
        b
    }
}

impl<S, K, B, Rb> Service<Request<B>> for RateLimit<S, K>
where
    S: Service<Request<B>, Response = Response<Rb>> + Clone,
    S::Error: Into<BoxError>,
    K: KeyExtractor<B>,
{
    type Response = Response<Rb>;
    type Error = BoxError;
    type Future = ResponseFuture<S, B, Rb>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Request<B>) -> Self::Future {
        let key = self.key.key(&req);
        let bound = self.bound(&key);
        drop(key);
        let ks = bound.state();
        // Without a quota, the pace learned from bare 429s (if any) takes its place.
        let learned;
        let quota = match &ks.quota {
            Some(q) => Some(q),
            None => {
                learned = ks.gate.learned();
                learned.as_ref()
            }
        };
        let local = bound.config.remote.is_none();
        // The fast path: a slot is free now and nobody waits. The service that poll_ready made
        // ready is called at once. Without a quota or a pace, and with no pause set, that needs
        // no clock: a clock read is the largest part of a decision.
        if local && quota.is_none() && ks.gate.open() {
            return ResponseFuture::called(self.inner.call(req), bound);
        }
        let now = ks.origin.elapsed();
        if local && ks.gate.try_now(quota, now) {
            return ResponseFuture::called(self.inner.call(req), bound);
        }
        self.wait(req, bound, now)
    }
}

impl<S, K> RateLimit<S, K> {
    /// The slow path: the call waits (or is refused at once when it would wait past `max_wait`).
    #[cold]
    fn wait<B, Rb>(
        &mut self,
        req: Request<B>,
        bound: Arc<Bound>,
        now: u64,
    ) -> ResponseFuture<S, B, Rb>
    where
        S: Service<Request<B>, Response = Response<Rb>> + Clone,
    {
        let ks = bound.state();
        let config = &bound.config;
        let mut deadline = now.saturating_add(nanos(config.max_wait));
        // A call that must have its answer by a deadline (the retry layer's mark carries it) is
        // refused at once when its turn would come after the deadline, with the wait, instead of
        // waiting in line until the deadline cuts it.
        if let Some(at) = req
            .extensions()
            .get::<AttemptHold>()
            .and_then(AttemptHold::deadline)
        {
            deadline = deadline.min(ks.origin.nanos_at(at));
        }
        let refuse = |wait: u64, req: &Request<B>| {
            bound.config.events.emit(&Event::RateLimitRefused {
                key: bound.key(),
                host: bound.host(),
                wait: Duration::from_nanos(wait),
            });
            let err = RateLimited::new(Duration::from_nanos(wait)).with_scope(bound.scope());
            if let Some(t) = Trace::of(req) {
                t.record(TraceEvent::Rejected {
                    reason: err.to_string(),
                });
            }
            ResponseFuture::rejected(Box::new(err))
        };
        if config.remote.is_some() && ks.gate.paused_until() <= now {
            let svc = sturdy_core::ready::take_ready(&mut self.inner);
            return ResponseFuture::remote(svc, req, bound, now, deadline);
        }
        // Wait in line: for a slot of the local quota, or (remote quota) for the pause to end.
        // The estimate assumes slow start lets everyone out as soon as the pause ends.
        let (pace, _slow_start) = line_pace(&bound);
        let (ticket, go_at) = match ks.gate.join(pace.as_ref(), now, deadline) {
            Ok(t) => t,
            Err(wait) => {
                // Refused without calling the inner service: what its `poll_ready` reserved is
                // given back now.
                sturdy_core::ready::release_ready(&mut self.inner);
                return refuse(wait, &req);
            }
        };
        let wait = Duration::from_nanos(go_at.saturating_sub(now));
        tracing::trace!(
            key = bound.key(),
            wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
            waiting = ks.gate.waiting(),
            "waiting in line for the rate limit"
        );
        if let Some(t) = Trace::of(&req) {
            t.record(TraceEvent::Delay {
                duration: wait,
                source: DelaySource::RateLimit,
            });
        }
        // The ticket goes into the future (whose drop leaves the line) before any hook of the
        // user's runs: a hook that panics must not leave a place in line that no one holds.
        let svc = sturdy_core::ready::take_ready(&mut self.inner);
        let fut = ResponseFuture::queued(svc, req, bound.clone(), ticket, deadline);
        bound.config.events.emit(&Event::RateLimitWaited {
            key: bound.key(),
            host: bound.host(),
            wait,
        });
        fut
    }
}
