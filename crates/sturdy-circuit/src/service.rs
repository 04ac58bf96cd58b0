use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use sturdy_core::{BoxError, CircuitOpen, OpenReason};
use tokio::time::Instant;
use tower::Service;

use crate::future::ResponseFuture;
use crate::registry::{Node, Permit, Registry};
use sturdy_core::classify::Classify;
use sturdy_core::events::Event;
use sturdy_core::key::KeyExtractor;
use sturdy_core::keyed::SlotCache;

/// The service made by [`CircuitBreakerLayer`](crate::CircuitBreakerLayer).
///
/// # Clone
/// Clones share the breakers.
///
/// # Backpressure
/// `poll_ready` is the inner service's. An open breaker never shows in `poll_ready`: the call is
/// rejected in `call` with a ready [`CircuitOpen`] error and the inner service is not called.
/// What the inner service reserved in `poll_ready` (a concurrency permit, a `Buffer` slot) is
/// given back at once: the refused call drops the ready service and keeps a clone, so a kept
/// service (`ready().await?.call(req)`) that was refused holds nothing until its next call.
#[derive(Clone)]
pub struct CircuitBreaker<S, K, C> {
    pub(crate) inner: S,
    pub(crate) registry: Arc<Registry>,
    pub(crate) key: K,
    pub(crate) classify: C,
    /// The breaker of the last call, to skip the registry when the next call has the same key.
    pub(crate) cached: SlotCache<Node>,
}

impl<S: std::fmt::Debug, K, C> std::fmt::Debug for CircuitBreaker<S, K, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("inner", &self.inner)
            .field("registry", &self.registry)
            .finish_non_exhaustive()
    }
}

sturdy_core::define_inner_service_accessors!(CircuitBreaker<S, K, C>);

// ===== impl CircuitBreaker =====

impl<S, K, C, B, Rb> Service<Request<B>> for CircuitBreaker<S, K, C>
where
    S: Service<Request<B>, Response = Response<Rb>> + Clone,
    S::Error: Into<BoxError>,
    K: KeyExtractor<B>,
    C: Classify<Rb, S::Error> + Clone,
{
    type Response = Response<Rb>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Request<B>) -> Self::Future {
        let key = self.key.key(&req);
        let local = self
            .cached
            .get(&self.registry.map, &key, self.registry.make());
        let (admitted, transition) = local
            .value()
            .breaker
            .admit(self.registry.config(), Instant::now);
        match admitted {
            Err((retry_in, reason)) => {
                // The inner service is not called: give back what its `poll_ready` reserved.
                sturdy_core::ready::release_ready(&mut self.inner);
                let node = local.value();
                node.shared.report(local.key(), transition);
                node.shared.events.emit(&Event::CircuitRejected {
                    key: local.key(),
                    host: node.shared.host(local.key()),
                    retry_in,
                });
                // A key past the most breakers kept shares the overflow breaker: the refusal
                // names the call's own key, and says why a host that never failed is refused.
                let open = if local.key() == sturdy_core::keyed::OVERFLOW_KEY {
                    let reason = match reason {
                        OpenReason::Failing => OpenReason::Overflow,
                        other => other,
                    };
                    CircuitOpen::new(key.as_ref(), retry_in).with_reason(reason)
                } else {
                    CircuitOpen::new(local.key(), retry_in).with_reason(reason)
                };
                if let Some(t) = sturdy_core::Trace::of(&req) {
                    t.record(sturdy_core::TraceEvent::Rejected {
                        reason: open.to_string(),
                    });
                }
                ResponseFuture::rejected(open)
            }
            Ok(ticket) => {
                let permit = Permit {
                    local,
                    ticket,
                    done: false,
                };
                // Reported once the permit holds the ticket: a hook of the user's that panics
                // here drops the permit, which gives a probe's slot back (no one else would).
                permit
                    .local
                    .value()
                    .shared
                    .report(permit.local.key(), transition);
                // The inner service was driven to readiness and is called now; only its future
                // is kept, so no clone is needed.
                ResponseFuture::called(self.inner.call(req), permit, self.classify.clone())
            }
        }
    }
}
