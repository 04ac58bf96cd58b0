use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use pin_project_lite::pin_project;
use sturdy_core::headers::pause_hint;
use sturdy_core::keyed::Local;
use sturdy_core::{BoxError, RateLimited};
use tokio::time::Sleep;
use tower::Service;

use crate::gcra::nanos;
use crate::remote::{BoxFuture, OnStoreError, Reserve};
use crate::state::{KeyState, Shared};

pin_project! {
    /// The response future of [`RateLimit`](crate::RateLimit).
    pub struct ResponseFuture<S, B, Rb>
    where
        S: Service<Request<B>, Response = Response<Rb>>,
    {
        #[pin]
        state: State<S, B, S::Future>,
        limiter: Option<(Arc<Local<KeyState>>, Arc<Shared>)>,
        deadline: u64,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, B, F> {
        Rejected { error: Option<BoxError> },
        Remote { fut: BoxFuture<Result<Reserve, BoxError>>, svc: Option<S>, req: Option<Request<B>>, at: u64 },
        Sleeping { #[pin] sleep: Sleep, svc: Option<S>, req: Option<Request<B>> },
        Ready { svc: Option<S>, req: Option<Request<B>> },
        Called { #[pin] fut: F },
    }
}

impl<S, B, Rb> std::fmt::Debug for ResponseFuture<S, B, Rb>
where
    S: Service<Request<B>, Response = Response<Rb>>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl<S, B, Rb> ResponseFuture<S, B, Rb>
where
    S: Service<Request<B>, Response = Response<Rb>>,
{
    pub(crate) fn rejected(error: BoxError) -> Self {
        Self {
            state: State::Rejected { error: Some(error) },
            limiter: None,
            deadline: 0,
        }
    }

    pub(crate) fn called(fut: S::Future, local: Arc<Local<KeyState>>, shared: Arc<Shared>) -> Self {
        Self {
            state: State::Called { fut },
            limiter: Some((local, shared)),
            deadline: 0,
        }
    }

    pub(crate) fn sleeping(
        until: tokio::time::Instant,
        svc: S,
        req: Request<B>,
        local: Arc<Local<KeyState>>,
        shared: Arc<Shared>,
        deadline: u64,
    ) -> Self {
        Self {
            state: State::Sleeping {
                sleep: tokio::time::sleep_until(until),
                svc: Some(svc),
                req: Some(req),
            },
            limiter: Some((local, shared)),
            deadline,
        }
    }

    pub(crate) fn remote(
        fut: BoxFuture<Result<Reserve, BoxError>>,
        svc: S,
        req: Request<B>,
        local: Arc<Local<KeyState>>,
        shared: Arc<Shared>,
        deadline: u64,
        at: u64,
    ) -> Self {
        Self {
            state: State::Remote {
                fut,
                svc: Some(svc),
                req: Some(req),
                at,
            },
            limiter: Some((local, shared)),
            deadline,
        }
    }
}

/// Reads a response for pauses the server asked for, and applies them to every caller of the key.
fn observe<Rb>(local: &Local<KeyState>, shared: &Shared, res: &Response<Rb>) {
    let (delay, source) = match pause_hint(res.status(), res.headers(), shared.clock.now()) {
        Some(h) => (h.delay, format!("{:?}", h.source)),
        None if res.status() == StatusCode::TOO_MANY_REQUESTS => {
            (shared.default_pause, "429 without a wait header".to_owned())
        }
        None => return,
    };
    if delay.is_zero() {
        return;
    }
    let until = shared.now().saturating_add(nanos(delay));
    // fetch_max: a later, shorter reset never cuts a longer pause short.
    let before = local
        .value()
        .paused_until
        .fetch_max(until, Ordering::AcqRel);
    if until <= before {
        return;
    }
    tracing::warn!(key = local.key(), pause_ms = delay.as_millis() as u64, source = %source, "the server asked to slow down: pausing every call to this key");
    if let Some(remote) = &shared.remote {
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let fut = remote.pause(local.key(), delay);
            rt.spawn(async move {
                if let Err(e) = fut.await {
                    tracing::warn!(error = %e, "could not share the pause with the other processes");
                }
            });
        }
    }
}

impl<S, B, Rb> Future for ResponseFuture<S, B, Rb>
where
    S: Service<Request<B>, Response = Response<Rb>>,
    S::Error: Into<BoxError>,
{
    type Output = Result<Response<Rb>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Rejected { error } => {
                    return Poll::Ready(Err(error.take().expect("polled after completion")));
                }
                StateProj::Remote { fut, svc, req, at } => {
                    let decided = ready!(fut.as_mut().poll(cx));
                    let (local, shared) =
                        this.limiter.as_ref().expect("remote state has a limiter");
                    let wait = match decided {
                        Ok(Reserve::Granted { wait }) => wait,
                        Ok(Reserve::Denied { retry_after }) => {
                            let err = RateLimited::new(retry_after).with_scope(local.key());
                            return Poll::Ready(Err(Box::new(err)));
                        }
                        Err(e) => match shared.on_store_error {
                            OnStoreError::Allow => {
                                tracing::warn!(key = local.key(), error = %e, "rate-limit store failed; letting the call through");
                                Duration::ZERO
                            }
                            OnStoreError::Fail => {
                                let err = sturdy_core::Error::new(
                                    sturdy_core::ErrorKind::Other,
                                    "the rate-limit store failed",
                                )
                                .with_source(e);
                                return Poll::Ready(Err(Box::new(err)));
                            }
                        },
                    };
                    let until = shared.instant(at.saturating_add(nanos(wait)));
                    let (svc, req) = (svc.take(), req.take());
                    this.state.set(State::Sleeping {
                        sleep: tokio::time::sleep_until(until),
                        svc,
                        req,
                    });
                }
                StateProj::Sleeping {
                    mut sleep,
                    svc,
                    req,
                } => {
                    ready!(sleep.as_mut().poll(cx));
                    let (local, shared) =
                        this.limiter.as_ref().expect("sleeping state has a limiter");
                    // A server may have asked for a pause while we waited.
                    let now = shared.now();
                    let paused = local.value().paused_until.load(Ordering::Acquire);
                    if paused > now {
                        if paused > *this.deadline {
                            let err = RateLimited::new(Duration::from_nanos(paused - now))
                                .with_scope(local.key());
                            return Poll::Ready(Err(Box::new(err)));
                        }
                        sleep.reset(shared.instant(paused));
                        continue;
                    }
                    let (svc, req) = (svc.take(), req.take());
                    this.state.set(State::Ready { svc, req });
                }
                StateProj::Ready { svc, req } => {
                    let s = svc.as_mut().expect("polled after completion");
                    ready!(s.poll_ready(cx)).map_err(Into::into)?;
                    let req = req.take().expect("polled after completion");
                    let fut = s.call(req);
                    this.state.set(State::Called { fut });
                }
                StateProj::Called { fut } => {
                    let result = ready!(fut.poll(cx)).map_err(Into::into);
                    if let (Ok(res), Some((local, shared))) = (&result, this.limiter.as_ref()) {
                        observe(local, shared, res);
                    }
                    return Poll::Ready(result);
                }
            }
        }
    }
}
