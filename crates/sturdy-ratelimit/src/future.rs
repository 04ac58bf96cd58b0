use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use pin_project_lite::pin_project;
use sturdy_core::headers::{may_pause, pause_hint};
use sturdy_core::keyed::Local;
use sturdy_core::{BoxError, RateLimited};
use tokio::time::Sleep;
use tower::Service;

use crate::gcra::nanos;
use crate::remote::{BoxFuture, OnStoreError, Reserve};
use crate::state::KeyState;

pin_project! {
    /// The response future of [`RateLimit`](crate::RateLimit).
    pub struct ResponseFuture<S, B, Rb>
    where
        S: Service<Request<B>, Response = Response<Rb>>,
    {
        #[pin]
        state: State<S, B, S::Future>,
        limiter: Option<Arc<Local<KeyState>>>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, B, F> {
        Rejected { error: Option<BoxError> },
        // Waiting is the slow path: boxed, so the common future stays small and cheap to move.
        Waiting { slow: Box<Slow<S, B>> },
        Called { #[pin] fut: F },
    }
}

/// A call that waits for a remote decision, a slot or a pause, then for the inner service.
struct Slow<S, B> {
    remote: Option<BoxFuture<Result<Reserve, BoxError>>>,
    sleep: Option<Pin<Box<Sleep>>>,
    svc: S,
    req: Option<Request<B>>,
    /// When (ns since the origin) the call may go at the earliest.
    at: u64,
    /// The latest it may go before failing with `RateLimited`.
    deadline: u64,
}

impl<S, B, Rb> std::fmt::Debug for ResponseFuture<S, B, Rb>
where
    S: Service<Request<B>, Response = Response<Rb>>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
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
        }
    }

    pub(crate) fn called(fut: S::Future, local: Arc<Local<KeyState>>) -> Self {
        Self {
            state: State::Called { fut },
            limiter: Some(local),
        }
    }

    pub(crate) fn sleeping(
        until: tokio::time::Instant,
        svc: S,
        req: Request<B>,
        local: Arc<Local<KeyState>>,
        deadline: u64,
    ) -> Self {
        let slow = Slow {
            remote: None,
            sleep: Some(Box::pin(tokio::time::sleep_until(until))),
            svc,
            req: Some(req),
            at: 0,
            deadline,
        };
        Self {
            state: State::Waiting {
                slow: Box::new(slow),
            },
            limiter: Some(local),
        }
    }

    pub(crate) fn remote(
        fut: BoxFuture<Result<Reserve, BoxError>>,
        svc: S,
        req: Request<B>,
        local: Arc<Local<KeyState>>,
        deadline: u64,
        at: u64,
    ) -> Self {
        let slow = Slow {
            remote: Some(fut),
            sleep: None,
            svc,
            req: Some(req),
            at,
            deadline,
        };
        Self {
            state: State::Waiting {
                slow: Box::new(slow),
            },
            limiter: Some(local),
        }
    }
}

/// Reads a response for pauses the server asked for, and applies them to every caller of the key.
fn observe<Rb>(local: &Local<KeyState>, res: &Response<Rb>) {
    let shared = &local.value().policy;
    if !may_pause(res.status(), res.headers()) {
        return;
    }
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
                StateProj::Waiting { slow } => {
                    let local = this.limiter.as_ref().expect("a waiting call has a limiter");
                    let fut = ready!(poll_slow(slow, local, cx))?;
                    this.state.set(State::Called { fut });
                }
                StateProj::Called { fut } => {
                    let result = ready!(fut.poll(cx)).map_err(Into::into);
                    if let (Ok(res), Some(local)) = (&result, this.limiter.as_ref()) {
                        observe(local, res);
                    }
                    return Poll::Ready(result);
                }
            }
        }
    }
}

/// Drives the slow path to the point where the inner service has been called.
fn poll_slow<S, B, Rb>(
    slow: &mut Slow<S, B>,
    local: &Local<KeyState>,
    cx: &mut Context<'_>,
) -> Poll<Result<S::Future, BoxError>>
where
    S: Service<Request<B>, Response = Response<Rb>>,
    S::Error: Into<BoxError>,
{
    let policy = &local.value().policy;
    if let Some(fut) = slow.remote.as_mut() {
        let decided = ready!(fut.as_mut().poll(cx));
        slow.remote = None;
        let wait = match decided {
            Ok(Reserve::Granted { wait }) => wait,
            Ok(Reserve::Denied { retry_after }) => {
                return Poll::Ready(Err(Box::new(
                    RateLimited::new(retry_after).with_scope(local.key()),
                )));
            }
            Err(e) => match policy.on_store_error {
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
        let until = policy.instant(slow.at.saturating_add(nanos(wait)));
        slow.sleep = Some(Box::pin(tokio::time::sleep_until(until)));
    }
    while let Some(sleep) = slow.sleep.as_mut() {
        ready!(sleep.as_mut().poll(cx));
        // A server may have asked for a pause while we waited.
        let now = policy.now();
        let paused = local.value().paused_until.load(Ordering::Acquire);
        if paused > now {
            if paused > slow.deadline {
                let err =
                    RateLimited::new(Duration::from_nanos(paused - now)).with_scope(local.key());
                return Poll::Ready(Err(Box::new(err)));
            }
            sleep.as_mut().reset(policy.instant(paused));
            continue;
        }
        slow.sleep = None;
    }
    ready!(slow.svc.poll_ready(cx)).map_err(Into::into)?;
    let req = slow.req.take().expect("polled after completion");
    Poll::Ready(Ok(slow.svc.call(req)))
}
