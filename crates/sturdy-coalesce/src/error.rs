//! The error every caller of a failed shared call gets.

use std::fmt;
use std::sync::Arc;

use sturdy_core::classify::{classify_error, delivery, own_text};
use sturdy_core::{BoxError, Error};

/// The failure of a call that several identical requests shared: one error, seen by each of
/// them.
///
/// Errors are not `Clone`, so each caller gets a [`sturdy_core::Error`] of the shared error's
/// kind (as [`classify_error`] reads it) and delivery, whose source is this `SharedError`, whose
/// source in turn is the shared error itself: [`sturdy_core::find`] reaches every type in the
/// chain, and [`classify_error`] and [`delivery`] answer as they would for the original. When
/// the shared error carries a [`CallReport`](sturdy_core::CallReport) (a retry layer under the
/// coalescing one gave up), the caller's error carries a copy of it:
/// [`Error::report`](sturdy_core::Error::report) on the top-level error answers as it would
/// without coalescing.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use std::io;
/// use bytes::Bytes;
/// use http::{Request, Response};
/// use http_body_util::Full;
/// use sturdy_coalesce::{CoalesceLayer, SharedError};
/// use tower::{service_fn, Layer, ServiceExt};
///
/// let api = service_fn(|_req: Request<Full<Bytes>>| async {
///     Err::<Response<Full<Bytes>>, _>(io::Error::new(io::ErrorKind::ConnectionRefused, "refused"))
/// });
/// let client = CoalesceLayer::new().layer(api);
/// let req = Request::get("http://api.example.com/").body(Full::default()).unwrap();
/// let err = client.oneshot(req).await.unwrap_err();
/// assert!(sturdy_core::find::<SharedError>(&*err).is_some());
/// let cause = sturdy_core::find::<io::Error>(&*err).unwrap();
/// assert_eq!(cause.kind(), io::ErrorKind::ConnectionRefused);
/// assert_eq!(sturdy_core::classify::delivery(&*err), sturdy_core::Delivery::NotSent);
/// # }
/// ```
#[derive(Clone)]
pub struct SharedError {
    inner: Arc<BoxError>,
}

impl SharedError {
    pub(crate) fn new(inner: Arc<BoxError>) -> Self {
        Self { inner }
    }

    /// The shared error.
    pub fn inner(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &**self.inner
    }
}

impl fmt::Debug for SharedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SharedError").field(&self.inner).finish()
    }
}

impl fmt::Display for SharedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.inner, f)
    }
}

impl std::error::Error for SharedError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&**self.inner)
    }
}

/// Whether a shared call failed only because whoever was running it went away, so a caller who
/// joined it sends its own: the caller sending it left ([`sturdy_core::DriverGone`]), or a
/// hyper client's connection task was dropped with the runtime the call was started on (hyper
/// says so only in these words: "runtime dropped the dispatch task").
pub(crate) fn stranded(e: &(dyn std::error::Error + 'static)) -> bool {
    sturdy_core::find::<sturdy_core::DriverGone>(e).is_some()
        || sturdy_core::chain(e).any(|e| e.to_string() == "runtime dropped the dispatch task")
}

/// The error one caller of a failed shared call gets; `joined`: whether any request joined the
/// call (one nobody joined keeps its own words).
pub(crate) fn for_caller(shared: &Arc<BoxError>, joined: bool) -> BoxError {
    let e: &(dyn std::error::Error + 'static) = &***shared;
    let kind = classify_error(e);
    let delivery = delivery(e);
    // The shared error's own text, or its cause's when that text names none (a hyper-util
    // client's "client error (SendRequest)"); the error itself is the source.
    let message = if joined {
        format!(
            "the call shared by identical requests in flight failed: {}",
            own_text(e)
        )
    } else {
        own_text(e)
    };
    let mut err = Error::new(kind, message)
        .with_hidden_source(SharedError::new(shared.clone()))
        .with_delivery(delivery);
    // The report of the whole call (a retry layer's, below), on top as well: the error a
    // caller gets speaks for the attempts the shared call made, as the retry layer's own does.
    if let Some(report) = sturdy_core::find::<Error>(e).and_then(Error::report) {
        err = err.with_report(report.clone());
    }
    Box::new(err)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use sturdy_core::{BoxError, CallReport, Delivery, Error, ErrorKind};

    #[test]
    fn a_caller_gets_the_shared_calls_report_on_top() {
        let report = CallReport::new(4, Delivery::MaybeProcessed, Some("key-1".to_owned()));
        let shared: Arc<BoxError> = Arc::new(Box::new(
            Error::new(
                ErrorKind::Transport,
                "gave up after 4 attempts: connection reset by peer",
            )
            .with_report(report.clone()),
        ));
        let err = super::for_caller(&shared, true);
        let top = err.downcast_ref::<Error>().expect("a sturdy error on top");
        assert_eq!(top.report(), Some(&report));
        assert_eq!(*top.kind(), ErrorKind::Transport);
        // Without a report below, none on top.
        let bare: Arc<BoxError> = Arc::new(Box::new(std::io::Error::other("refused")));
        let err = super::for_caller(&bare, true);
        assert_eq!(err.downcast_ref::<Error>().unwrap().report(), None);
    }

    #[test]
    fn a_call_nobody_joined_keeps_its_words() {
        let shared: Arc<BoxError> = Arc::new(Box::new(Error::new(
            ErrorKind::Connect,
            "gave up after 4 attempts: connection refused",
        )));
        assert_eq!(
            super::for_caller(&shared, false).to_string(),
            "gave up after 4 attempts: connection refused"
        );
        assert_eq!(
            super::for_caller(&shared, true).to_string(),
            "the call shared by identical requests in flight failed: gave up after 4 attempts: connection refused"
        );
    }
}
