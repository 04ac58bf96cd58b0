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

/// Bounds each attempt, up to the response's head, by a timeout \[none unless configured\]; a
/// request's [`CallOptions`] may set its own (or none). Reading the body, after the response is
/// returned, is not bounded by it. An attempt that runs out of time fails with a
/// [`sturdy_core::Error`] of kind [`Timeout`](ErrorKind::Timeout) that the retry layer above
/// retries (the request may have been processed, so a POST is retried only with an idempotency
/// key).
///
/// tower's `TimeoutLayer` does the same without the per-request override; this one exists for
/// that override and for its error, which says how long the attempt was given.
///
/// The timer is made only if the attempt is still pending after its first poll. On a
/// multi-thread runtime, an attempt of at least 100 ms that waits may also spawn one small task
/// that sleeps up to 15 s and ends (at most one per thread at a time): while it sleeps, attempt
/// timers registered from that thread do not wake the runtime's driver thread, which costs
/// microseconds per call. It holds nothing else and is dropped with the runtime. A
/// current-thread runtime gets none (its clock may be paused; tokio would advance a paused clock
/// to it). The same holds for
/// [`RetryLayer::with_attempt_timeout`](crate::RetryLayer::with_attempt_timeout).
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

    #[inline(always)]
    fn call(&mut self, req: Request<B>) -> Self::Future {
        let timeout = attempt_timeout(&req, self.timeout);
        // The attempt's start is read now, so the deadline is fixed now; the deadline itself
        // (an addition that saturates) and the timer are made only if the attempt is still
        // pending after its first poll (see `TimeoutFuture`).
        let sent = timeout.map(|_| tokio::time::Instant::now());
        TimeoutFuture {
            fut: self.inner.call(req),
            sleep: None,
            sent,
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
        // When the attempt was sent, if it has a timeout: its deadline is `len` after.
        sent: Option<tokio::time::Instant>,
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
        let Some(sent) = *this.sent else {
            return Poll::Pending;
        };
        let sleep = this
            .sleep
            .get_or_insert_with(|| attempt_timer(sent, *this.len));
        ready!(sleep.as_mut().poll(cx));
        Poll::Ready(Err(timed_out(*this.len)))
    }
}

/// The error of an attempt that ran out of its `len` while a layer below held it back for
/// `held` (a hold mark set): it was never sent. Without a mark, [`timed_out`].
pub(crate) fn timed_out_held(len: Duration, held: Option<sturdy_core::hold::HeldFor>) -> BoxError {
    match held {
        Some(what) => Box::new(
            Error::new(
                ErrorKind::Timeout,
                format!(
                    "the attempt timed out after {} while it waited for {what}, before it was sent",
                    human_duration(len)
                ),
            )
            .with_delivery(Delivery::NotSent)
            // Never sent: a try refused below, not an attempt of the destination's (the
            // report counts it apart, and no breaker counts it).
            .with_cause_elsewhere(),
        ),
        None => timed_out(len),
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

/// The timer of an attempt sent at `sent` that waits, `len` long, made so that registering it
/// does not wake the runtime's driver thread.
///
/// Why this exists: tokio's timer wakes the thread parked on its driver (a write to an eventfd,
/// then that thread's wake-up and new park) whenever a timer is registered earlier than the
/// earliest one the driver is already waiting for. With no other timer pending, that is every
/// attempt: on loopback a caller making one call after another from `block_on` (as
/// `#[tokio::main]` does) paid about 10 µs per call for it, a fifth of the call. So a "floor"
/// timer is kept registered, half an attempt's timeout ahead: every attempt timer after it ends
/// later than the floor, and none of them wakes the driver. (At most 15 s ahead, so that one
/// attempt with a very long timeout does not leave a floor later than the next ones' ends.)
///
/// The floor is a task of its own on the runtime, which sleeps until then and ends: the runtime
/// owns it, so dropping the runtime drops it, and nothing of a runtime outlives it. The thread
/// keeps only a weak count of that task's life, and arms another floor, at most once per half
/// timeout, when it is over or its runtime is gone. It is kept on multi-thread runtimes only:
/// their clock cannot be paused, so it never makes a paused clock auto-advance to it (a
/// current-thread runtime's can, and a test would see the jump).
pub(crate) fn attempt_timer(sent: tokio::time::Instant, len: Duration) -> Pin<Box<Sleep>> {
    let deadline = sturdy_core::clock::after(sent, len);
    let sleep = Box::pin(tokio::time::sleep_until(deadline));
    if len >= FLOOR_MIN {
        keep_floor(sent, len);
    }
    sleep
}

/// Attempts shorter than this arm no floor: it would be re-armed too often to pay.
const FLOOR_MIN: Duration = Duration::from_millis(100);

/// How far ahead a floor is armed, at most.
const FLOOR_MAX: Duration = Duration::from_secs(15);

/// What a thread knows of its floor.
enum Floor {
    /// None armed yet.
    None,
    /// Armed: alive while its task is (until it is over, or its runtime is dropped). A weak
    /// count only: it keeps nothing of the runtime.
    Armed(std::sync::Weak<()>),
    /// The thread ran a current-thread runtime when it last looked: it looks again (a handle
    /// lookup) only after this, not for every waiting attempt.
    NotHere(tokio::time::Instant),
}

thread_local! {
    static FLOOR: std::cell::RefCell<Floor> = const { std::cell::RefCell::new(Floor::None) };
}

fn keep_floor(sent: tokio::time::Instant, len: Duration) {
    // The floor is counted from when the attempt was sent: no clock read.
    let now = sent;
    // A floor still pending serves this attempt too: it ends at most half a timeout after its
    // arming, and an attempt with a shorter timeout than the one that armed it only wakes the
    // driver as it would without a floor. (A thread that runs on two live runtimes in turn goes
    // without on one of them until the floor is over: never wrong, only slower.) Inaccessible
    // while the thread exits, or borrowed: then this attempt goes without.
    let Ok(wanted) = FLOOR.try_with(|f| {
        f.try_borrow().is_ok_and(|f| match &*f {
            Floor::None => true,
            Floor::Armed(w) => w.strong_count() == 0,
            Floor::NotHere(until) => now >= *until,
        })
    }) else {
        return;
    };
    if !wanted {
        return;
    }
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    // At most 15 s ahead: one attempt with a very long timeout must not leave a floor that later
    // attempts with ordinary timeouts end before.
    let until = sturdy_core::clock::after(now, (len / 2).min(FLOOR_MAX));
    let next = if rt.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread {
        let alive = std::sync::Arc::new(());
        let weak = std::sync::Arc::downgrade(&alive);
        drop(rt.spawn(async move {
            tokio::time::sleep_until(until).await;
            drop(alive);
        }));
        Floor::Armed(weak)
    } else {
        Floor::NotHere(until)
    };
    let _ = FLOOR.try_with(|f| {
        if let Ok(mut f) = f.try_borrow_mut() {
            *f = next;
        }
    });
}
