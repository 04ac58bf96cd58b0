use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::request::Parts;
use http::{Request, Response};
use http_body::Body;
use http_body_util::combinators::Collect;
use pin_project_lite::pin_project;
use sturdy_core::{human_duration, BoxError, ErrorKind};
use tokio::time::Sleep;
use tower::Service;

use crate::policy::{Config, RetryPolicy};
use crate::service::Attempt;

type TowerFuture<S, B> = tower::retry::future::ResponseFuture<
    RetryPolicy,
    Attempt<S, <S as Service<Request<B>>>::Error>,
    Request<B>,
>;

pin_project! {
    /// The response future of [`Retry`](crate::Retry).
    pub struct ResponseFuture<S, B, Rb>
    where
        S: Service<Request<B>, Response = Response<Rb>>,
        S::Error: Into<BoxError>,
        B: Body,
        B: From<Bytes>,
    {
        #[pin]
        state: State<Collect<B>, TowerFuture<S, B>, (Parts, Attempt<S, S::Error>, RetryPolicy)>,
        #[pin]
        deadline: Option<Sleep>,
        deadline_len: Duration,
        attempts: Option<Arc<AtomicU32>>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<C, F, H> {
        Buffering { #[pin] collect: C, head: Option<H> },
        Running { #[pin] fut: F },
    }
}

impl<S, B, Rb> ResponseFuture<S, B, Rb>
where
    S: Service<Request<B>, Response = Response<Rb>> + Clone,
    S::Error: Into<BoxError>,
    B: Body + From<Bytes>,
{
    fn deadline(config: &Config) -> Option<Sleep> {
        config.deadline.map(tokio::time::sleep)
    }

    pub(crate) fn running(
        policy: RetryPolicy,
        attempt: Attempt<S, S::Error>,
        req: Request<B>,
        config: &Config,
        attempts: Option<Arc<AtomicU32>>,
    ) -> Self {
        let mut retry = tower::retry::Retry::new(policy, attempt);
        // The attempt service was driven to readiness by `Retry::poll_ready`.
        let fut = retry.call(req);
        Self {
            state: State::Running { fut },
            deadline: Self::deadline(config),
            deadline_len: config.deadline.unwrap_or_default(),
            attempts,
        }
    }

    pub(crate) fn buffering(
        collect: Collect<B>,
        parts: Parts,
        attempt: Attempt<S, S::Error>,
        policy: RetryPolicy,
        config: &Config,
        attempts: Option<Arc<AtomicU32>>,
    ) -> Self {
        Self {
            state: State::Buffering {
                collect,
                head: Some((parts, attempt, policy)),
            },
            deadline: Self::deadline(config),
            deadline_len: config.deadline.unwrap_or_default(),
            attempts,
        }
    }
}

impl<S, B, Rb> std::fmt::Debug for ResponseFuture<S, B, Rb>
where
    S: Service<Request<B>, Response = Response<Rb>>,
    S::Error: Into<BoxError>,
    B: Body + From<Bytes>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field(
                "attempts",
                &self.attempts.as_ref().map(|a| a.load(Ordering::Relaxed)),
            )
            .finish_non_exhaustive()
    }
}

impl<S, B, Rb> Future for ResponseFuture<S, B, Rb>
where
    S: Service<Request<B>, Response = Response<Rb>> + Clone,
    S::Error: Into<BoxError>,
    B: Body + From<Bytes>,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<Rb>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Some(d) = this.deadline.as_mut().as_pin_mut() {
            if d.poll(cx).is_ready() {
                let n = this
                    .attempts
                    .as_ref()
                    .map_or(0, |a| a.load(Ordering::Relaxed));
                let msg = format!(
                    "the overall deadline of {} passed during attempt {}",
                    human_duration(*this.deadline_len),
                    n + 1
                );
                return Poll::Ready(Err(Box::new(sturdy_core::Error::new(
                    ErrorKind::Timeout,
                    msg,
                ))));
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
                            .with_source(e.into());
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
