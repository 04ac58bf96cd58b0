use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use pin_project_lite::pin_project;
use sturdy_core::classify::{Classify, Outcome};
use sturdy_core::hold::{AttemptHold, HeldFor};
use sturdy_core::keyed::Local;
use sturdy_core::{BoxError, ErrorKind};
use tokio::sync::{AcquireError, OwnedSemaphorePermit};
use tokio::time::{Instant, Sleep};
use tower::Service;

use crate::algorithm::Signal;
use crate::error::limit_reached;
use crate::limiter::{rejected, Limiter, Permit};

type Acquire = Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>;

pin_project! {
    /// The response future of [`AdaptiveConcurrency`](crate::AdaptiveConcurrency).
    pub struct ResponseFuture<S, B, C>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S::Future>,
        // Waiting is the slow path: boxed, so the common future stays small.
        slow: Option<Box<Slow<S, B>>>,
        permit: Option<Permit>,
        classify: C,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Rejected { error: Option<BoxError> },
        Waiting,
        Called { #[pin] fut: F },
    }
}

impl<S, B, C> fmt::Debug for ResponseFuture<S, B, C>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("waiting", &self.slow.is_some())
            .field("permit", &self.permit)
            .finish_non_exhaustive()
    }
}

/// A call waiting for a place: its place in line, a timer, and the ready service with the
/// request. Dropping it leaves the line.
struct Slow<S, B> {
    local: Arc<Local<Limiter>>,
    /// The call's own key when it is not the limit's (past the bound on hosts).
    own: Option<Box<str>>,
    acquire: Acquire,
    /// When the wait ends, read at `call`; the timer itself is made at the first poll that has
    /// to wait, inside the runtime that polls (a timer made in `call` would panic on a thread
    /// outside a runtime, after the count of waiting calls had gone up).
    until: Instant,
    sleep: Option<Pin<Box<Sleep>>>,
    max_wait: Duration,
    svc: S,
    req: Option<Request<B>>,
}

impl<S, B> Drop for Slow<S, B> {
    fn drop(&mut self) {
        self.local.value().waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<S, B, C> ResponseFuture<S, B, C>
where
    S: Service<Request<B>>,
{
    pub(crate) fn called(fut: S::Future, permit: Permit, classify: C) -> Self {
        Self {
            state: State::Called { fut },
            slow: None,
            permit: Some(permit),
            classify,
        }
    }

    pub(crate) fn rejected(error: BoxError, classify: C) -> Self {
        Self {
            state: State::Rejected { error: Some(error) },
            slow: None,
            permit: None,
            classify,
        }
    }

    pub(crate) fn waiting(
        local: Arc<Local<Limiter>>,
        own: Option<Box<str>>,
        svc: S,
        req: Request<B>,
        max_wait: Duration,
        classify: C,
    ) -> Self {
        // Counted as waiting by the caller, before it checked that the limiter is kept.
        let limiter = local.value();
        // Held back for a place: a deadline ending meanwhile can say it was never sent.
        if let Some(hold) = req.extensions().get::<AttemptHold>() {
            hold.hold(HeldFor::Concurrency);
        }
        let acquire: Acquire = Box::pin(limiter.sem.clone().acquire_owned());
        // A wait too long to add to the clock (`Duration::MAX`) ends in about thirty years.
        let until = sturdy_core::clock::after(Instant::now(), max_wait);
        let slow = Slow {
            until,
            sleep: None,
            local,
            own,
            acquire,
            max_wait,
            svc,
            req: Some(req),
        };
        Self {
            state: State::Waiting,
            slow: Some(Box::new(slow)),
            permit: None,
            classify,
        }
    }
}

/// What an outcome says about the server's capacity.
fn signal(outcome: &Outcome, rtt: Option<Duration>) -> Signal {
    match outcome {
        Outcome::Success => Signal::Success(rtt),
        Outcome::Retryable(k) | Outcome::Permanent(k) => match k {
            ErrorKind::RateLimited { .. } | ErrorKind::Timeout => Signal::Overload,
            ErrorKind::Server(s) if s.as_u16() == 503 || s.as_u16() == 504 => Signal::Overload,
            _ => Signal::Ignore,
        },
        Outcome::Unauthorized => Signal::Ignore,
    }
}

impl<S, B, C, Rb> Future for ResponseFuture<S, B, C>
where
    S: Service<Request<B>, Response = Response<Rb>>,
    S::Error: Into<BoxError>,
    C: Classify<Rb, S::Error>,
{
    type Output = Result<Response<Rb>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Rejected { error } => {
                    let err = error
                        .take()
                        .unwrap_or_else(|| "the call was already answered".into());
                    return Poll::Ready(Err(err));
                }
                StateProj::Waiting => {
                    let Some(slow) = this.slow.as_mut() else {
                        return Poll::Ready(Err("the call was already answered".into()));
                    };
                    match slow.acquire.as_mut().poll(cx) {
                        Poll::Ready(Ok(p)) => {
                            let permit = Permit::new(slow.local.clone(), p);
                            let Some(req) = slow.req.take() else {
                                return Poll::Ready(Err("the call was already answered".into()));
                            };
                            if let Some(hold) = req.extensions().get::<AttemptHold>() {
                                hold.release();
                            }
                            // The service poll_ready made ready, called after the wait.
                            let fut = slow.svc.call(req);
                            *this.permit = Some(permit);
                            *this.slow = None;
                            this.state.set(State::Called { fut });
                        }
                        Poll::Ready(Err(_)) => {
                            // The semaphore is never closed; say so plainly if it ever is.
                            *this.slow = None;
                            return Poll::Ready(Err("the concurrency limiter was closed".into()));
                        }
                        Poll::Pending => {
                            let until = slow.until;
                            let sleep = slow
                                .sleep
                                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
                            ready!(sleep.as_mut().poll(cx));
                            let l = slow.local.value();
                            let own = slow.own.as_deref().unwrap_or(slow.local.key());
                            rejected(&slow.local, own);
                            let err =
                                limit_reached(own, slow.local.key(), l.limit(), slow.max_wait);
                            tracing::debug!(key = slow.local.key(), "{err}");
                            *this.slow = None;
                            return Poll::Ready(Err(Box::new(err)));
                        }
                    }
                }
                StateProj::Called { fut } => {
                    let polled = fut.poll(cx);
                    let Poll::Ready(result) = polled else {
                        if let Some(p) = this.permit.as_mut() {
                            if p.start.is_none() && p.wants_latency() {
                                p.start = Some(Instant::now());
                            }
                        }
                        return Poll::Pending;
                    };
                    let Some(mut p) = this.permit.take() else {
                        return Poll::Ready(result.map_err(Into::into));
                    };
                    let rtt = p.start.map(|s| Instant::now().saturating_duration_since(s));
                    let outcome = this.classify.classify(&result);
                    let result = result.map_err(Into::into);
                    // A failure whose cause is not the server (a token endpoint that failed or
                    // did not answer in time, a local limit) says nothing about its capacity,
                    // as the breaker reads it too.
                    let signal = match &result {
                        Err(e) if !sturdy_core::classify::concerns_destination(&**e) => {
                            Signal::Ignore
                        }
                        _ => signal(&outcome, rtt),
                    };
                    p.finish(signal);
                    return Poll::Ready(result);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    #[test]
    fn overload_signals() {
        let s = |status: u16| {
            let o = sturdy_core::classify::classify_status(StatusCode::from_u16(status).unwrap());
            signal(&o, None)
        };
        assert_eq!(s(200), Signal::Success(None));
        assert_eq!(s(429), Signal::Overload);
        assert_eq!(s(503), Signal::Overload);
        assert_eq!(s(504), Signal::Overload);
        assert_eq!(s(408), Signal::Overload);
        assert_eq!(s(500), Signal::Ignore);
        assert_eq!(s(404), Signal::Ignore);
        assert_eq!(s(401), Signal::Ignore);
    }
}
