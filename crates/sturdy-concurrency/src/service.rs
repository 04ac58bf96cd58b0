use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use sturdy_core::classify::Classify;
use sturdy_core::key::KeyExtractor;
use sturdy_core::keyed::{Local, SlotCache};
use sturdy_core::BoxError;
use tower::Service;

use crate::error::limit_reached;
use crate::future::ResponseFuture;
use crate::limiter::{rejected, try_acquire, Limiter, Registry};

/// The service made by [`AdaptiveConcurrencyLayer`](crate::AdaptiveConcurrencyLayer).
///
/// # Clone
/// Clones share the per-host limits.
///
/// # Backpressure
/// `poll_ready` is the inner service's: the host is known only from the request, so the permit
/// is taken in `call`, never reserved in `poll_ready`. A call that finds its host's limit full
/// moves the service `poll_ready` made ready into its response future, waits there for a place
/// (in line, first come first served) and then calls that service. Dropping the future gives back
/// its place in line, or its permit if it had one. A call refused at once (no wait allowed)
/// gives back what the inner service reserved in `poll_ready` (a `ConcurrencyLimit`'s permit, a
/// `Buffer`'s slot) at once, so a kept service that was refused holds nothing until its next
/// call.
#[derive(Clone)]
pub struct AdaptiveConcurrency<S, K, C> {
    pub(crate) inner: S,
    pub(crate) registry: Arc<Registry>,
    pub(crate) key: K,
    pub(crate) classify: C,
    pub(crate) cache: SlotCache<Limiter>,
}

impl<S: fmt::Debug, K, C> fmt::Debug for AdaptiveConcurrency<S, K, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdaptiveConcurrency")
            .field("inner", &self.inner)
            .field("registry", &self.registry)
            .finish_non_exhaustive()
    }
}

sturdy_core::define_inner_service_accessors!(AdaptiveConcurrency<S, K, C>);

// ===== impl AdaptiveConcurrency =====

impl<S, K, C, B, Rb> Service<Request<B>> for AdaptiveConcurrency<S, K, C>
where
    S: Service<Request<B>, Response = Response<Rb>> + Clone,
    S::Error: Into<BoxError>,
    K: KeyExtractor<B>,
    C: Classify<Rb, S::Error> + Clone,
{
    type Response = Response<Rb>;
    type Error = BoxError;
    type Future = ResponseFuture<S, B, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let key = self.key.key(&req);
        // A full map forgets only idle limiters; one forgotten between the look-up and the
        // permit (or the place in line) taken here is left, and the key looked up again, so
        // that no call counts on a limiter its host's later calls no longer see.
        let (local, permit) = loop {
            let local = self
                .cache
                .get(&self.registry.map, &key, self.registry.make());
            let permit = try_acquire(&local);
            if permit.is_none() {
                // About to wait: counted as waiting before the check below.
                local.value().waiting.fetch_add(1, Ordering::Relaxed);
            }
            if !local.forgotten() {
                break (local, permit);
            }
            if permit.is_none() {
                local.value().waiting.fetch_sub(1, Ordering::Relaxed);
            }
        };
        if let Some(permit) = permit {
            // The inner service was driven to readiness and is called now.
            return ResponseFuture::called(self.inner.call(req), permit, self.classify.clone());
        }
        // Counted as waiting: uncounted by this guard until the waiting future takes it over
        // (a panic in between, in the inner service's `Clone`, say, must not leave it counted).
        let counted = Counted(Some(&local));
        let limiter = local.value();
        let max_wait = limiter.config.max_wait;
        if max_wait.is_zero() {
            drop(counted);
            // Refused without calling the inner service: what its `poll_ready` reserved is
            // given back now.
            sturdy_core::ready::release_ready(&mut self.inner);
            rejected(&local, &key);
            let err = limit_reached(&key, local.key(), limiter.limit(), max_wait);
            return ResponseFuture::rejected(Box::new(err), self.classify.clone());
        }
        // The call's own key, kept for a refusal only where it is not the limit's (past the
        // bound on hosts): no copy on the common path.
        let own = (*key != *local.key()).then(|| Box::<str>::from(&*key));
        tracing::trace!(
            key = local.key(),
            "concurrency limit full: waiting for a place"
        );
        // Wait for a place, then call the service poll_ready made ready.
        let ready = sturdy_core::ready::take_ready(&mut self.inner);
        counted.hand_over();
        ResponseFuture::waiting(local, own, ready, req, max_wait, self.classify.clone())
    }
}

/// A call counted as waiting for its limiter, uncounted when dropped unless handed over.
struct Counted<'a>(Option<&'a Local<Limiter>>);

impl Counted<'_> {
    /// The waiting future, made next, uncounts it when it ends.
    fn hand_over(mut self) {
        self.0 = None;
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        if let Some(local) = self.0 {
            local.value().waiting.fetch_sub(1, Ordering::Relaxed);
        }
    }
}
