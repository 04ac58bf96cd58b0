use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use sturdy_core::classify::{Classify, DefaultClassify};
use sturdy_core::{BoxError, CallOptions};
use tower::Service;

use crate::future::ResponseFuture;
use crate::policy::{is_idempotent, CallInfo, CallState, Config, HostBudget, RetryPolicy};
use crate::RetryLayer;
use sturdy_core::keyed::SlotCache;

/// The service made by [`RetryLayer`].
///
/// # Clone
/// Clones share the configuration and the retry budgets.
///
/// # Backpressure
/// `poll_ready` is the inner service's, and the first attempt goes to the service `poll_ready`
/// made ready; each retry waits for readiness again on that same service (moved into the call's
/// future, not a clone of it), so no clone of the inner stack holds a permit.
#[derive(Debug, Clone)]
pub struct Retry<S, C = DefaultClassify> {
    inner: S,
    config: Arc<Config>,
    classify: C,
    /// The budget of the last host called, to skip the budget map on the next call.
    budgets: SlotCache<HostBudget>,
}

sturdy_core::define_inner_service_accessors!(Retry<S, C>);

impl<S, C> Retry<S, C> {
    pub(crate) fn from_parts(
        inner: S,
        config: Arc<Config>,
        classify: C,
        budgets: SlotCache<HostBudget>,
    ) -> Self {
        Self {
            inner,
            config,
            classify,
            budgets,
        }
    }
}

impl<S> Retry<S> {
    /// Wraps `inner` with the default configuration.
    pub fn new(inner: S) -> Self {
        tower::Layer::layer(&RetryLayer::new(), inner)
    }

    /// A layer with the default configuration; shortcut for [`RetryLayer::new`].
    pub fn layer() -> RetryLayer {
        RetryLayer::new()
    }
}

// ===== impl Retry =====

impl<S, B, Rb, C> Service<Request<B>> for Retry<S, C>
where
    S: Service<Request<B>, Response = Response<Rb>> + Clone,
    S::Error: Into<BoxError>,
    B: Body + From<Bytes>,
    B::Error: Into<BoxError>,
    C: Classify<Rb, BoxError> + Clone,
{
    type Response = Response<Rb>;
    type Error = BoxError;
    type Future = ResponseFuture<S, B, Rb, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        // Each attempt's timeout is kept by the loop itself, not by a layer wrapped around the
        // service: a layer would move every request and future through one more frame, on every
        // call, for a timer most calls never make.
        let options = CallOptions::of(&req);
        let attempt_timeout = match options.and_then(CallOptions::attempt_timeout) {
            // The request's own setting (longer, shorter or none) is the layer below's to keep,
            // when it keeps them; the layer's own timeout applies to requests that carry none.
            Some(_) if self.config.request_timeouts_below => None,
            Some(own) => own,
            None => self.config.attempt_timeout,
        };
        let deadline = options
            .and_then(CallOptions::deadline)
            .or(self.config.deadline);
        let max_attempts = crate::policy::max_attempts(&self.config, options);
        let deadline_at =
            deadline.map(|d| sturdy_core::clock::after(tokio::time::Instant::now(), d));
        let call = deadline_at.map(|at| {
            Arc::new(CallState {
                // Carries the deadline too: a layer below refuses at once a wait past it.
                hold: sturdy_core::hold::AttemptHold::until(at),
                key: crate::policy::key_text(req.headers().get(&self.config.idempotency_header)),
                keyed: sturdy_core::key::idempotency_key(
                    req.headers().get(&self.config.idempotency_header),
                )
                .is_some(),
                unsafe_method: !is_idempotent(req.method()),
                ..CallState::default()
            })
        });
        if let Some(c) = call
            .as_ref()
            .filter(|_| self.config.hold_marks == Some(true))
        {
            // The layers below mark the waits that hold an attempt back, so that a deadline
            // ending meanwhile can say it was never sent (every attempt's copy shares the mark).
            req.extensions_mut().insert(c.hold.clone());
        }
        let budget = self
            .config
            .budget
            .for_host(&sturdy_core::key::host_key_of(&req), &mut self.budgets);
        // The policy is made where it is kept (in the loop's box), not here and moved there.
        // The closure takes the settings as arguments: capturing `self`'s fields instead made
        // the call 90 instructions dearer (callgrind).
        let policy_call = call.clone();
        let make_policy = move |config: &Arc<Config>, classify: &C| {
            RetryPolicy::new(
                config.clone(),
                classify.clone(),
                budget,
                deadline_at,
                max_attempts,
                policy_call,
            )
        };
        let replayable =
            max_attempts > 1 && sturdy_core::body::fits(req.body(), self.config.body_limit);
        if !replayable {
            if max_attempts > 1 {
                let host = sturdy_core::key::host(&req);
                tracing::debug!(host = %host, "body is not known to fit the replay limit: sent once, not retried");
            }
            let info = CallInfo::of(&req, &self.config.idempotency_header);
            let policy = make_policy(&self.config, &self.classify);
            return ResponseFuture::once(
                sturdy_core::ready::take_ready(&mut self.inner),
                policy,
                info,
                req,
                deadline,
                call,
                attempt_timeout,
            );
        }
        ResponseFuture::replayable(
            &mut self.inner,
            || make_policy(&self.config, &self.classify),
            req,
            deadline,
            call,
            attempt_timeout,
        )
    }
}
