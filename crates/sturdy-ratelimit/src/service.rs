use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use sturdy_core::key::KeyExtractor;
use sturdy_core::keyed::SlotCache;
use sturdy_core::{BoxError, RateLimited};
use tower::Service;

use crate::future::ResponseFuture;
use crate::gcra::{nanos, reserve, Reservation};
use crate::state::{KeyState, Shared};

/// The service made by [`RateLimitLayer`](crate::RateLimitLayer).
///
/// # Clone
/// Clones share the limiter state.
///
/// # Backpressure
/// `poll_ready` is the inner service's: a call that must wait for a slot waits inside its response
/// future (a timer, no polling loop), and a call that would wait longer than `max_wait` fails at
/// once with [`RateLimited`]. After a wait, the inner service is driven to readiness again.
#[derive(Clone)]
pub struct RateLimit<S, K> {
    pub(crate) inner: S,
    pub(crate) shared: Arc<Shared>,
    pub(crate) key: K,
    pub(crate) cache: SlotCache<KeyState>,
}

impl<S: std::fmt::Debug, K> std::fmt::Debug for RateLimit<S, K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimit")
            .field("inner", &self.inner)
            .field("shared", &self.shared)
            .finish_non_exhaustive()
    }
}

sturdy_core::define_inner_service_accessors!(RateLimit<S, K>);

// ===== impl RateLimit =====

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

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let shared = &self.shared;
        let key = self.key.key(&req);
        let local = self.cache.get(&shared.map, &key, shared.make());
        let policy = &local.value().policy;
        let now = policy.now();
        let max_wait = nanos(shared.max_wait);
        let deadline = now.saturating_add(max_wait);

        // A pause a server asked for comes first.
        let paused = local.value().paused_until.load(Ordering::Acquire);
        if paused > deadline {
            let err = RateLimited::new(std::time::Duration::from_nanos(paused - now))
                .with_scope(local.key());
            if let Some(t) = sturdy_core::Trace::of(&req) {
                t.record(sturdy_core::TraceEvent::Rejected {
                    reason: err.to_string(),
                });
            }
            return ResponseFuture::rejected(Box::new(err));
        }
        let at = paused.max(now);

        if let Some(remote) = &policy.remote {
            let wait_left = std::time::Duration::from_nanos(deadline - at);
            let fut = remote.reserve(local.key(), wait_left);
            return ResponseFuture::remote(fut, self.inner.clone(), req, local, deadline, at);
        }

        let wait = match &shared.quota {
            None => 0,
            Some(q) => match reserve(&local.value().tat, q, at, deadline - at) {
                Reservation::Granted { wait } => wait,
                Reservation::Denied { wait } => {
                    let retry_after = std::time::Duration::from_nanos(at - now + wait);
                    let err = RateLimited::new(retry_after).with_scope(local.key());
                    return ResponseFuture::rejected(Box::new(err));
                }
            },
        };
        let go_at = at + wait;
        if go_at <= now {
            // The inner service was driven to readiness and is called now; only its future is
            // kept, so no clone is needed. (A call that waits takes a clone and drives it to
            // readiness again after the wait.)
            return ResponseFuture::called(self.inner.call(req), local);
        }
        tracing::trace!(
            key = local.key(),
            wait_ms = (go_at - now) / 1_000_000,
            "waiting for a rate-limit slot"
        );
        if let Some(t) = sturdy_core::Trace::of(&req) {
            t.record(sturdy_core::TraceEvent::Delay {
                duration: std::time::Duration::from_nanos(go_at - now),
                source: sturdy_core::trace::DelaySource::RateLimit,
            });
        }
        let until = policy.instant(go_at);
        ResponseFuture::sleeping(until, self.inner.clone(), req, local, deadline)
    }
}
