//! The response body: the inner body as it is, a shared buffered body, or a buffered prefix
//! followed by the rest of the inner body.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use sturdy_core::BoxError;

pin_project! {
    /// The body of a response from [`Coalesce`](crate::Coalesce): the inner service's body for
    /// a call that was not coalesced, or the shared, buffered body (and trailers) of a
    /// coalesced call.
    pub struct ResponseBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Inner { #[pin] body: B },
        Shared { data: Option<Bytes>, trailers: Option<HeaderMap> },
        Prefixed { prefix: VecDeque<Bytes>, rest: Pin<Box<B>> },
    }
}

impl<B> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Inner { .. } => "inner",
            Kind::Shared { .. } => "shared",
            Kind::Prefixed { .. } => "prefixed",
        };
        f.debug_struct("ResponseBody").field("kind", &kind).finish()
    }
}

impl<B> ResponseBody<B> {
    /// Wraps a body as it is: what a call that was not coalesced gets. For a stack that puts
    /// the layer in or leaves it out (`ServiceBuilder::option_layer`), map the responses of the
    /// branch without it with this, so both branches have one response type.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http_body_util::{BodyExt, Full};
    /// use sturdy_coalesce::ResponseBody;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let body = ResponseBody::new(Full::new(Bytes::from("as it was")));
    /// assert!(!body.is_shared());
    /// assert_eq!(body.collect().await.unwrap().to_bytes(), "as it was");
    /// # }
    /// ```
    pub fn new(body: B) -> Self {
        Self::inner(body)
    }

    pub(crate) fn inner(body: B) -> Self {
        Self {
            kind: Kind::Inner { body },
        }
    }

    pub(crate) fn shared(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        Self {
            kind: Kind::Shared {
                data: (!data.is_empty()).then_some(data),
                trailers,
            },
        }
    }

    pub(crate) fn prefixed(prefix: VecDeque<Bytes>, rest: Pin<Box<B>>) -> Self {
        Self {
            kind: Kind::Prefixed { prefix, rest },
        }
    }

    /// Whether this body is the shared, buffered body of a coalesced call.
    pub fn is_shared(&self) -> bool {
        matches!(self.kind, Kind::Shared { .. })
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            KindProj::Inner { body } => body.poll_frame(cx).map_err(Into::into),
            KindProj::Shared { data, trailers } => {
                if let Some(d) = data.take() {
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
            KindProj::Prefixed { prefix, rest } => {
                if let Some(d) = prefix.pop_front() {
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                rest.as_mut().poll_frame(cx).map_err(Into::into)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner { body } => body.is_end_stream(),
            Kind::Shared { data, trailers } => data.is_none() && trailers.is_none(),
            Kind::Prefixed { prefix, rest } => prefix.is_empty() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { body } => body.size_hint(),
            Kind::Shared { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Kind::Prefixed { prefix, rest } => {
                let buffered: u64 = prefix.iter().map(|b| b.len() as u64).sum();
                let r = rest.size_hint();
                let mut h = SizeHint::new();
                h.set_lower(r.lower().saturating_add(buffered));
                if let Some(u) = r.upper() {
                    h.set_upper(u.saturating_add(buffered));
                }
                h
            }
        }
    }
}
