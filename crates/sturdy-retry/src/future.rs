use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::request::Parts;
use http::{Request, Response};
use http_body::Body;
use http_body_util::combinators::Collect;
use pin_project_lite::pin_project;
use sturdy_core::classify::Classify;
use sturdy_core::{human_duration, BoxError, CallReport, Delivery, ErrorKind};
use tokio::time::Sleep;
use tower::Service;

use crate::policy::{advise, CallState, RetryPolicy};
use crate::service::Attempt;

type TowerFuture<S, B, C> = tower::retry::future::ResponseFuture<
    RetryPolicy<C>,
    Attempt<S, <S as Service<Request<B>>>::Error>,
    Request<B>,
>;

pin_project! {
    /// The response future of [`Retry`](crate::Retry).
    pub struct ResponseFuture<S, B, Rb, C = sturdy_core::DefaultClassify>
    where
        S: Service<Request<B>, Response = Response<Rb>>,
        S::Error: Into<BoxError>,
        B: Body,
        B: From<Bytes>,
        C: Classify<Rb, BoxError>,
        C: Clone,
    {
        #[pin]
        state: State<Collect<B>, TowerFuture<S, B, C>, (Parts, Attempt<S, S::Error>, RetryPolicy<C>)>,
        #[pin]
        deadline: Option<Sleep>,
        deadline_len: Duration,
        call: Option<Arc<CallState>>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<Co, F, H> {
        Buffering { #[pin] collect: Co, head: Option<H> },
        Running { #[pin] fut: F },
    }
}

impl<S, B, Rb, C> ResponseFuture<S, B, Rb, C>
where
    S: Service<Request<B>, Response = Response<Rb>> + Clone,
    S::Error: Into<BoxError>,
    B: Body + From<Bytes>,
    C: Classify<Rb, BoxError> + Clone,
{
    pub(crate) fn running(
        policy: RetryPolicy<C>,
        attempt: Attempt<S, S::Error>,
        req: Request<B>,
        deadline: Option<Duration>,
        call: Option<Arc<CallState>>,
    ) -> Self {
        let mut retry = tower::retry::Retry::new(policy, attempt);
        // The attempt service was driven to readiness by `Retry::poll_ready`.
        let fut = retry.call(req);
        Self {
            state: State::Running { fut },
            deadline: deadline.map(tokio::time::sleep),
            deadline_len: deadline.unwrap_or_default(),
            call,
        }
    }

    pub(crate) fn buffering(
        collect: Collect<B>,
        parts: Parts,
        attempt: Attempt<S, S::Error>,
        policy: RetryPolicy<C>,
        deadline: Option<Duration>,
        call: Option<Arc<CallState>>,
    ) -> Self {
        Self {
            state: State::Buffering {
                collect,
                head: Some((parts, attempt, policy)),
            },
            deadline: deadline.map(tokio::time::sleep),
            deadline_len: deadline.unwrap_or_default(),
            call,
        }
    }
}

impl<S, B, Rb, C> std::fmt::Debug for ResponseFuture<S, B, Rb, C>
where
    S: Service<Request<B>, Response = Response<Rb>>,
    S::Error: Into<BoxError>,
    B: Body + From<Bytes>,
    C: Classify<Rb, BoxError> + Clone,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field(
                "attempts",
                &self
                    .call
                    .as_ref()
                    .map(|a| a.attempts.load(Ordering::Relaxed)),
            )
            .finish_non_exhaustive()
    }
}

/// The error of a call cut by its deadline, with what is known about its attempts.
fn deadline_passed(len: Duration, call: Option<&CallState>) -> BoxError {
    let (n, in_flight) = call.map_or((0, true), |c| {
        (
            c.attempts.load(Ordering::Relaxed),
            c.in_flight.load(Ordering::Relaxed),
        )
    });
    let mut message = if in_flight || n == 0 {
        format!(
            "the overall deadline of {} passed during attempt {}",
            human_duration(len),
            n + 1
        )
    } else {
        format!(
            "the overall deadline of {} passed after {n} attempts",
            human_duration(len)
        )
    };
    let delivery = call.map_or(Delivery::MaybeProcessed, CallState::delivery);
    let key = call.and_then(|c| c.key.clone());
    if let Some(c) = call {
        advise(&mut message, delivery, key.as_deref(), c.unsafe_method);
    }
    Box::new(
        sturdy_core::Error::new(ErrorKind::Timeout, message).with_report(CallReport::new(
            n.max(1),
            delivery,
            key,
        )),
    )
}

impl<S, B, Rb, C> Future for ResponseFuture<S, B, Rb, C>
where
    S: Service<Request<B>, Response = Response<Rb>> + Clone,
    S::Error: Into<BoxError>,
    B: Body + From<Bytes>,
    B::Error: Into<BoxError>,
    C: Classify<Rb, BoxError> + Clone,
{
    type Output = Result<Response<Rb>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Some(d) = this.deadline.as_mut().as_pin_mut() {
            if d.poll(cx).is_ready() {
                return Poll::Ready(Err(deadline_passed(
                    *this.deadline_len,
                    this.call.as_deref(),
                )));
            }
        }
        loop {
            match this.state.as_mut().project() {
                StateProj::Buffering { collect, head } => {
                    let collected = ready!(collect.poll(cx));
                    let (parts, attempt, policy) = head.take().expect("polled after completion");
                    let mut body = match collected {
                        Ok(c) => c.aggregate(),
                        Err(e) => {
                            let e = sturdy_core::Error::new(
                                ErrorKind::Body,
                                "could not read the request body",
                            )
                            .with_source(e.into())
                            .with_delivery(Delivery::NotSent);
                            return Poll::Ready(Err(Box::new(e)));
                        }
                    };
                    let bytes = body.copy_to_bytes(body.remaining());
                    let policy = policy.with_body(bytes.clone());
                    let mut retry = tower::retry::Retry::new(policy, attempt);
                    let fut = retry.call(Request::from_parts(parts, B::from(bytes)));
                    this.state.set(State::Running { fut });
                }
                StateProj::Running { fut } => return fut.poll(cx),
            }
        }
    }
}
