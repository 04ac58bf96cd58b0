use std::sync::atomic::AtomicU32;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::BodyExt;
use sturdy_core::BoxError;
use tower::timeout::Timeout;
use tower::util::{Either, MapErr};
use tower::Service;

use crate::future::ResponseFuture;
use crate::policy::{Config, HostBudget, RetryPolicy};
use crate::RetryLayer;
use sturdy_core::keyed::SlotCache;

/// One attempt: the inner service with its error boxed, and a timeout when one is configured.
pub(crate) type Attempt<S, E> = Either<Timeout<S>, MapErr<S, fn(E) -> BoxError>>;

/// The service made by [`RetryLayer`].
///
/// # Clone
/// Clones share the configuration and the retry budgets.
///
/// # Backpressure
/// `poll_ready` is the inner service's. Each retry waits for readiness again on its own clone.
#[derive(Debug, Clone)]
pub struct Retry<S> {
    inner: S,
    config: Arc<Config>,
    /// The budget of the last host called, to skip the budget map on the next call.
    budgets: SlotCache<HostBudget>,
}

sturdy_core::define_inner_service_accessors!(Retry<S>);

impl<S> Retry<S> {
    pub(crate) fn from_parts(
        inner: S,
        config: Arc<Config>,
        budgets: SlotCache<HostBudget>,
    ) -> Self {
        Self {
            inner,
            config,
            budgets,
        }
    }

    /// Wraps `inner` with the default configuration.
    pub fn new(inner: S) -> Self {
        tower::Layer::layer(&RetryLayer::new(), inner)
    }

    /// A layer with the default configuration; shortcut for [`RetryLayer::new`].
    pub fn layer() -> RetryLayer {
        RetryLayer::new()
    }
}

fn boxed<E: Into<BoxError>>(e: E) -> BoxError {
    e.into()
}

// ===== impl Retry =====

impl<S, B, Rb> Service<Request<B>> for Retry<S>
where
    S: Service<Request<B>, Response = Response<Rb>> + Clone,
    S::Error: Into<BoxError>,
    B: Body + From<Bytes>,
    B::Error: Into<BoxError>,
{
    type Response = Response<Rb>;
    type Error = BoxError;
    type Future = ResponseFuture<S, B, Rb>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // Take the service that was driven to readiness; leave a fresh clone behind.
        let clone = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, clone);
        let attempt: Attempt<S, S::Error> = match self.config.attempt_timeout {
            Some(t) => Either::Left(Timeout::new(ready, t)),
            None => Either::Right(MapErr::new(
                ready,
                boxed::<S::Error> as fn(S::Error) -> BoxError,
            )),
        };
        let host = sturdy_core::key::host(&req);
        let budget = self.config.budget.for_host(host, &mut self.budgets);
        let attempts = self.config.deadline.map(|_| Arc::new(AtomicU32::new(0)));
        let replayable = sturdy_core::body::fits(req.body(), self.config.body_limit)
            && self.config.max_attempts > 1;
        if !replayable {
            if self.config.max_attempts > 1 {
                tracing::debug!(host = %host, "body is not known to fit the replay limit: sent once, not retried");
            }
            let policy = RetryPolicy::new(self.config.clone(), budget, None, attempts.clone());
            return ResponseFuture::running(policy, attempt, req, &self.config, attempts);
        }
        let policy = RetryPolicy::new(self.config.clone(), budget, None, attempts.clone());
        let (parts, body) = req.into_parts();
        ResponseFuture::buffering(
            body.collect(),
            parts,
            attempt,
            policy,
            &self.config,
            attempts,
        )
    }
}
