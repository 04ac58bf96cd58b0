//! A timeout for each attempt, that a request can override.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::Request;
use pin_project_lite::pin_project;
use sturdy_core::{human_duration, BoxError, CallOptions, Delivery, Error, ErrorKind};
use tokio::time::Sleep;
use tower::{Layer, Service};

/// Bounds each attempt by a timeout \[none unless configured\]; a request's
/// [`CallOptions`] may set its own (or none). An attempt that runs out of time fails with a
/// [`sturdy_core::Error`] of kind [`Timeout`](ErrorKind::Timeout) that the retry layer above
/// retries (the request may have been processed, so a POST is retried only with an idempotency
/// key).
///
/// tower's `TimeoutLayer` does the same without the per-request override; this one exists for
/// that override and for its error, which says how long the attempt was given.
///
/// ```
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// use std::time::Duration;
/// use http::{Request, Response};
/// use sturdy_core::CallOptions;
/// use sturdy_retry::AttemptTimeoutLayer;
/// use tower::{service_fn, Layer, ServiceExt};
///
/// let slow = service_fn(|_req: Request<()>| async {
///     tokio::time::sleep(Duration::from_secs(5)).await;
///     Ok::<_, std::convert::Infallible>(Response::new(()))
/// });
/// let svc = AttemptTimeoutLayer::new(Some(Duration::from_secs(1))).layer(slow);
/// let err = svc.clone().oneshot(Request::new(())).await.unwrap_err();
/// assert_eq!(err.to_string(), "the attempt timed out after 1s");
///
/// // This request may take longer.
/// let mut req = Request::new(());
/// req.extensions_mut().insert(CallOptions::new().with_attempt_timeout(Duration::from_secs(10)));
/// assert!(svc.oneshot(req).await.is_ok());
/// # }
/// ```
#[derive(Debug, Clone, Copy)]
#[must_use]
pub struct AttemptTimeoutLayer {
    timeout: Option<Duration>,
}

impl AttemptTimeoutLayer {
    /// Attempts bounded by `timeout` (`None`: only requests that set one are bounded).
    pub const fn new(timeout: Option<Duration>) -> Self {
        Self { timeout }
    }
}

impl<S> Layer<S> for AttemptTimeoutLayer {
    type Service = AttemptTimeout<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AttemptTimeout {
            inner,
            timeout: self.timeout,
        }
    }
}

/// The service made by [`AttemptTimeoutLayer`]. `poll_ready` is the inner service's.
#[derive(Debug, Clone)]
pub struct AttemptTimeout<S> {
    inner: S,
    timeout: Option<Duration>,
}

sturdy_core::define_inner_service_accessors!(AttemptTimeout<S>);

impl<S, B> Service<Request<B>> for AttemptTimeout<S>
where
    S: Service<Request<B>>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = TimeoutFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Request<B>) -> Self::Future {
        let timeout = attempt_timeout(&req, self.timeout);
        // The deadline is fixed now; the timer itself is made only if the attempt is still
        // pending after its first poll (see `TimeoutFuture`).
        let deadline = timeout.map(|t| sturdy_core::clock::after(tokio::time::Instant::now(), t));
        TimeoutFuture {
            fut: self.inner.call(req),
            sleep: None,
            deadline,
            len: timeout.unwrap_or_default(),
        }
    }
}

pin_project! {
    /// The response future of [`AttemptTimeout`].
    #[derive(Debug)]
    pub struct TimeoutFuture<F> {
        #[pin]
        fut: F,
        // Boxed: it is made only for an attempt that waits, and every layer above moves this
        // future at least once.
        sleep: Option<Pin<Box<Sleep>>>,
        deadline: Option<tokio::time::Instant>,
        len: Duration,
    }
}

impl<F, T, E> Future for TimeoutFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(r) = this.fut.poll(cx) {
            return Poll::Ready(r.map_err(Into::into));
        }
        // An attempt answered at its first poll never makes a timer (making tokio's `Sleep`
        // looks up the runtime's timer and takes a reference to it); one still pending gets it
        // now, for the deadline fixed when the attempt was sent, so the bound is the same.
        let Some(deadline) = *this.deadline else {
            return Poll::Pending;
        };
        let sleep = this
            .sleep
            .get_or_insert_with(|| attempt_timer(deadline, *this.len));
        ready!(sleep.as_mut().poll(cx));
        Poll::Ready(Err(timed_out(*this.len)))
    }
}

/// The error of an attempt that ran out of its `len`.
pub(crate) fn timed_out(len: Duration) -> BoxError {
    Box::new(
        Error::new(
            ErrorKind::Timeout,
            format!("the attempt timed out after {}", human_duration(len)),
        )
        .with_delivery(Delivery::MaybeProcessed),
    )
}

/// The timeout of one attempt of `req`: its [`CallOptions`]' own (which may be none), else
/// `default`.
pub(crate) fn attempt_timeout<B>(req: &Request<B>, default: Option<Duration>) -> Option<Duration> {
    match CallOptions::of(req).and_then(CallOptions::attempt_timeout) {
        Some(t) => t,
        None => default,
    }
}

/// The timer of an attempt that waits, `len` long and ending at `deadline`, made so that
/// registering it does not wake the runtime's driver thread.
///
/// Why this exists: tokio's timer wakes the thread parked on its driver (a write to an eventfd,
/// then that thread's wake-up and new park) whenever a timer is registered earlier than the
/// earliest one the driver is already waiting for. With no other timer pending, that is every
/// attempt: on loopback a caller that makes one call after another from `block_on` (as in
/// `#[tokio::main]`) or on a current-thread runtime paid about 10 µs per call for it, a fifth of
/// the call. So each thread keeps one "floor" timer registered, half an attempt's timeout ahead,
/// that no task waits on: every attempt timer after it ends later than the floor, and none of them
/// wakes the driver. The floor is re-armed, at most once per half timeout, by the first attempt
/// that finds it over; when it fires nothing is woken (it holds no waker). It is armed only while
/// tokio's clock is the real one: on a paused clock a pending timer would make tokio auto-advance
/// to it, which a test would see.
pub(crate) fn attempt_timer(deadline: tokio::time::Instant, len: Duration) -> Pin<Box<Sleep>> {
    let sleep = Box::pin(tokio::time::sleep_until(deadline));
    if len >= FLOOR_MIN {
        keep_floor(len);
    }
    sleep
}

/// Attempts shorter than this arm no floor: it would be re-armed too often to pay.
const FLOOR_MIN: Duration = Duration::from_millis(100);

thread_local! {
    static FLOOR: std::cell::RefCell<Option<Pin<Box<Sleep>>>> =
        const { std::cell::RefCell::new(None) };
}

fn keep_floor(len: Duration) {
    // Inaccessible while the thread exits, or borrowed: then this attempt goes without.
    let _ = FLOOR.try_with(|floor| {
        let Ok(mut floor) = floor.try_borrow_mut() else {
            return;
        };
        // A floor still pending serves this attempt too: it ends within half a timeout of its
        // arming, and an attempt with a shorter timeout than the one that armed it only wakes
        // the driver as it would without a floor.
        if floor.as_ref().is_some_and(|f| !f.is_elapsed()) {
            return;
        }
        if !clock_is_real() {
            *floor = None;
            return;
        }
        let ends = sturdy_core::clock::after(tokio::time::Instant::now(), len / 2);
        // A new timer rather than a reset of the old one, so that the floor is always on the
        // runtime this thread runs now. `reset` registers it without a poll, so no waker is kept.
        let mut f = Box::pin(tokio::time::sleep_until(ends));
        f.as_mut().reset(ends);
        *floor = Some(f);
    });
}

/// Whether tokio's clock reads the system's monotonic clock (it does not while paused, with
/// tokio's `test-util`): read on re-arming only, at most once per half timeout per thread.
fn clock_is_real() -> bool {
    #[allow(clippy::disallowed_methods)]
    let before = std::time::Instant::now();
    let t = tokio::time::Instant::now().into_std();
    #[allow(clippy::disallowed_methods)]
    let after = std::time::Instant::now();
    before <= t && t <= after
}
