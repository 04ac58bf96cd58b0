use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::error::{convert, Stage};

/// The body of a response from [`ReqwestService`](crate::ReqwestService): reqwest's body, whose
/// read errors are [`sturdy_core::Error`]s (a reset while reading is `Body`, reqwest's timeout
/// while reading is `Timeout`; see [`from_reqwest_error`](crate::from_reqwest_error)).
///
/// Read it with `http_body_util::BodyExt` (`collect().await?.to_bytes()`), or take reqwest's body
/// back with [`into_inner`](Self::into_inner).
pub struct ResponseBody {
    inner: reqwest::Body,
}

impl ResponseBody {
    pub(crate) fn new(inner: reqwest::Body) -> Self {
        Self { inner }
    }

    /// reqwest's body, whose errors are `reqwest::Error`s.
    pub fn into_inner(self) -> reqwest::Body {
        self.inner
    }
}

impl fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseBody").finish_non_exhaustive()
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = sturdy_core::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner)
            .poll_frame(cx)
            .map(|frame| frame.map(|r| r.map_err(|e| convert(e, Stage::ResponseBody))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
