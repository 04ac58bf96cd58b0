use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use futures_util::future::Shared;
use http::{Request, Response};
use pin_project_lite::pin_project;
use sturdy_core::{BoxError, Error, ErrorKind};
use tower::Service;

use crate::body::ResponseBody;
use crate::error::{for_caller, stranded};
use crate::flight::{BoxFuture, Counters, Handoff, Outcome};

pin_project! {
    /// The response future of [`Coalesce`](crate::Coalesce).
    ///
    /// Dropping it leaves the shared call to the other callers; the last caller to leave drops
    /// (cancels) the upstream call.
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S::Future>,
        join: Option<Box<Join<S, B>>>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Direct { #[pin] fut: F },
        Joined,
        Fallback,
    }
}

/// A caller's share of a call in flight.
struct Join<S, B> {
    shared: Shared<BoxFuture>,
    handoff: Arc<Handoff>,
    leader: bool,
    /// A clone of the inner service (not yet ready) and the request, for a caller that must send
    /// its own call.
    fallback: Option<(S, Option<Request<B>>)>,
    counters: Arc<Counters>,
}

impl<S, B> Drop for Join<S, B> {
    fn drop(&mut self) {
        if self.leader {
            self.handoff.leader_here.store(false, Ordering::Release);
        }
    }
}

impl<S, B> fmt::Debug for ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("shared", &self.join.is_some())
            .finish_non_exhaustive()
    }
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    pub(crate) fn direct(fut: S::Future) -> Self {
        Self {
            state: State::Direct { fut },
            join: None,
        }
    }

    pub(crate) fn joined(
        shared: Shared<BoxFuture>,
        handoff: Arc<Handoff>,
        leader: bool,
        fallback: Option<(S, Request<B>)>,
        counters: Arc<Counters>,
    ) -> Self {
        Self {
            state: State::Joined,
            join: Some(Box::new(Join {
                shared,
                handoff,
                leader,
                fallback: fallback.map(|(s, r)| (s, Some(r))),
                counters,
            })),
        }
    }
}

fn gone() -> BoxError {
    Box::new(Error::new(
        ErrorKind::Other,
        "the coalesced call's response future was polled after it completed",
    ))
}

impl<S, B, Rb> Future for ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<Rb>>,
    S::Error: Into<BoxError>,
    Rb: Send + 'static,
{
    type Output = Result<Response<ResponseBody<Rb>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Direct { fut } => {
                    let res = ready!(fut.poll(cx)).map_err(Into::into)?;
                    return Poll::Ready(Ok(res.map(ResponseBody::inner)));
                }
                StateProj::Joined => {
                    let Some(join) = this.join.as_mut() else {
                        return Poll::Ready(Err(gone()));
                    };
                    match ready!(Pin::new(&mut join.shared).poll(cx)) {
                        Outcome::Full(b) => {
                            *this.join = None;
                            let body = ResponseBody::shared(b.body.clone(), b.trailers.clone());
                            let res = Response::from_parts(b.parts.clone(), body);
                            return Poll::Ready(Ok(res));
                        }
                        Outcome::Failed(e) => {
                            // The caller that was sending the shared call went away and took
                            // its sending with it (a reqwest-middleware chain, a runtime that
                            // shut down): the request did not fail, so a caller who joined
                            // sends its own.
                            if !stranded(&**e) || join.fallback.is_none() {
                                let shared = join.handoff.joined.load(Ordering::Acquire);
                                *this.join = None;
                                return Poll::Ready(Err(for_caller(&e, shared)));
                            }
                            join.counters.fallbacks.fetch_add(1, Ordering::Relaxed);
                            this.state.set(State::Fallback);
                        }
                        Outcome::TooLarge => {
                            if let Some(any) = join.handoff.take(join.leader) {
                                if let Ok(res) = any.downcast::<Response<ResponseBody<Rb>>>() {
                                    *this.join = None;
                                    return Poll::Ready(Ok(*res));
                                }
                            }
                            if join.fallback.is_none() {
                                *this.join = None;
                                return Poll::Ready(Err(Box::new(Error::new(
                                    ErrorKind::Body,
                                    "the response was too large to share and another caller took it",
                                ))));
                            }
                            join.counters.fallbacks.fetch_add(1, Ordering::Relaxed);
                            this.state.set(State::Fallback);
                        }
                    }
                }
                StateProj::Fallback => {
                    let Some((svc, req)) = this.join.as_mut().and_then(|j| j.fallback.as_mut())
                    else {
                        return Poll::Ready(Err(gone()));
                    };
                    ready!(svc.poll_ready(cx)).map_err(Into::into)?;
                    let Some(req) = req.take() else {
                        return Poll::Ready(Err(gone()));
                    };
                    let fut = svc.call(req);
                    *this.join = None;
                    this.state.set(State::Direct { fut });
                }
            }
        }
    }
}
