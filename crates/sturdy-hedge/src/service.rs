use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Method, Request};
use sturdy_core::hold::AttemptHold;
use sturdy_core::key::KeyExtractor;
use sturdy_core::keyed::SlotCache;
use tower::{BoxError, Service};

use crate::future::{Armed, ResponseFuture};
use crate::state::{Config, HostState, Registry};

/// The service made by [`HedgeLayer`](crate::HedgeLayer).
///
/// # Clone
/// Clones share the per-host state.
///
/// # Backpressure
/// `poll_ready` is the inner service's, and the first copy of a call goes to the service
/// `poll_ready` made ready. The second copy goes to a clone of the inner service, driven to
/// readiness when the hedge is due; over a concurrency limit that is full (the first copy holds
/// the permit of a `ConcurrencyLimit(1)`), the hedge waits for a permit and the first answer
/// still wins.
///
/// # Errors
/// The inner service's, boxed (the service's error type is [`BoxError`]): the layer makes no
/// error of its own. When one copy fails while the other is still running, the call waits for
/// the other. When both fail, the call fails with the later error, unless that one says the
/// request was never sent while the earlier one may have been processed: then with the earlier
/// one.
#[derive(Clone)]
pub struct Hedge<S, K> {
    pub(crate) inner: S,
    pub(crate) registry: Arc<Registry>,
    pub(crate) key: K,
    pub(crate) cache: SlotCache<HostState>,
}

impl<S: fmt::Debug, K> fmt::Debug for Hedge<S, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hedge")
            .field("inner", &self.inner)
            .field("registry", &self.registry)
            .finish_non_exhaustive()
    }
}

sturdy_core::define_inner_service_accessors!(Hedge<S, K>);

/// Whether a request may be sent twice.
fn hedgeable<B>(req: &Request<B>, config: &Config) -> bool {
    let m = req.method();
    m == Method::GET
        || m == Method::HEAD
        || m == Method::OPTIONS
        // A blank key names no operation: no server can deduplicate a second copy on it.
        || (config.keyed
            && sturdy_core::key::idempotency_key(req.headers().get(&config.key_header)).is_some())
}

// ===== impl Hedge =====

impl<S, K, B> Service<Request<B>> for Hedge<S, K>
where
    S: Service<Request<B>> + Clone,
    S::Error: Into<BoxError>,
    K: KeyExtractor<B>,
    B: Clone,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let config = &self.registry.config;
        if !hedgeable(&req, config) {
            return ResponseFuture::passthrough(self.inner.call(req));
        }
        let key = self.key.key(&req);
        let local = self
            .cache
            .get(&self.registry.map, &key, self.registry.make());
        let host = local.value();
        host.calls.fetch_add(1, Ordering::Relaxed);
        host.budget.deposit(config.deposit, config.cap);
        // A copy is kept only when a hedge could be sent: enough samples and a token now.
        let armed = match host.delay() {
            Some(delay) if host.budget.has_token() => {
                // The call's own key where it is not the state's (past the bound on hosts): the
                // events of its hedge name the call's host.
                let own = (*key != *local.key()).then(|| Box::<str>::from(&*key));
                // The copy is made before the mark below is put in: a mark of our own is read
                // only here, and a copy without it clones no extension map.
                let copy = req.clone();
                // The first copy carries a mark that says whether a layer below holds it back
                // before sending it (a rate limit's pause or quota, a concurrency limit's line,
                // an access token): a hedge of a call that has not been sent would only queue
                // behind it. The retry layer's mark serves when it put one; else one of ours.
                let hold = match req.extensions().get::<AttemptHold>() {
                    Some(h) => h.clone(),
                    None => {
                        let h = AttemptHold::new();
                        req.extensions_mut().insert(h.clone());
                        h
                    }
                };
                Some(Box::new(Armed::new(
                    delay,
                    self.inner.clone(),
                    copy,
                    own,
                    hold,
                )))
            }
            _ => None,
        };
        // The inner service was driven to readiness: the first copy goes to it now.
        let fut = self.inner.call(req);
        ResponseFuture::hedgeable(fut, local, armed)
    }
}
