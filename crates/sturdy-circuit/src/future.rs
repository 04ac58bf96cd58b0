use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::Response;
use pin_project_lite::pin_project;
use sturdy_core::{BoxError, CircuitOpen};

use crate::registry::Permit;
use sturdy_core::classify::Classify;

pin_project! {
    /// The response future of [`CircuitBreaker`](crate::CircuitBreaker).
    pub struct ResponseFuture<F, C> {
        #[pin]
        kind: Kind<F, C>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, C> {
        Rejected { error: Option<CircuitOpen> },
        Called { #[pin] fut: F, permit: Permit, classify: C },
    }
}

impl<F, C> ResponseFuture<F, C> {
    pub(crate) fn rejected(error: CircuitOpen) -> Self {
        Self {
            kind: Kind::Rejected { error: Some(error) },
        }
    }

    pub(crate) fn called(fut: F, permit: Permit, classify: C) -> Self {
        Self {
            kind: Kind::Called {
                fut,
                permit,
                classify,
            },
        }
    }
}

impl<F, C> std::fmt::Debug for ResponseFuture<F, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResponseFuture")
    }
}

impl<F, C, Rb, E> Future for ResponseFuture<F, C>
where
    F: Future<Output = Result<Response<Rb>, E>>,
    E: Into<BoxError>,
    C: Classify<Rb, E>,
{
    type Output = Result<Response<Rb>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Rejected { error } => Poll::Ready(Err(Box::new(
                error.take().expect("polled after completion"),
            ))),
            KindProj::Called {
                fut,
                permit,
                classify,
            } => {
                let result = ready!(fut.poll(cx));
                let failed = classify.classify(&result).is_failure();
                let result = result.map_err(Into::into);
                match &result {
                    // Stopped before it reached the dependency (a local limit, a token that
                    // could not be had): neither a success nor a failure of the dependency, and
                    // a probe's slot goes back.
                    Err(e) if !sturdy_core::classify::concerns_destination(&**e) => {
                        permit.finish(None);
                    }
                    _ => permit.finish(Some(failed)),
                }
                Poll::Ready(result)
            }
        }
    }
}
