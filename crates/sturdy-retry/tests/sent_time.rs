//! An attempt timeout below the retry loop counts from when its attempt is sent, whatever sits
//! between them: a layer that sends later, a call that panicked on the same thread, retries.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use sturdy_core::{BoxError, ErrorKind};
use sturdy_retry::{AttemptTimeoutLayer, RetryLayer};
use tokio::time::Instant;
use tower::{service_fn, Layer, Service, ServiceExt};

type Req = Request<Full<Bytes>>;
type Res = Response<Full<Bytes>>;

/// Answers after `after`.
fn answers_after(
    after: Duration,
) -> impl Service<Req, Response = Res, Error = Infallible, Future: Send> + Clone + Send {
    service_fn(move |_req: Req| async move {
        tokio::time::sleep(after).await;
        Ok::<_, Infallible>(Response::new(Full::default()))
    })
}

/// Sends each request to its inner service 5 s after its `call`, as a layer that makes a call
/// wait (a rate limiter, a queue) does.
#[derive(Clone)]
struct SendsLater<S>(S);

impl<S> Service<Req> for SendsLater<S>
where
    S: Service<Req, Response = Res, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Res;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Res, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            inner.oneshot(req).await
        })
    }
}

fn get() -> Req {
    Request::get("http://api.test/items")
        .body(Full::default())
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn an_attempt_sent_at_once_is_bounded_from_its_send() {
    let svc = RetryLayer::new().with_max_attempts(1).layer(
        AttemptTimeoutLayer::new(Some(Duration::from_secs(1)))
            .layer(answers_after(Duration::from_secs(60))),
    );
    let start = Instant::now();
    let err = svc.oneshot(get()).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_secs(1), "{err}");
    let err: &sturdy_core::Error = sturdy_core::find(&*err).expect("a sturdy error");
    assert_eq!(*err.kind(), ErrorKind::Timeout, "{err}");
}

#[tokio::test(start_paused = true)]
async fn an_attempt_sent_later_by_a_layer_between_counts_from_when_it_is_sent() {
    // Sent 5 s after the retry loop's `call`, answered 800 ms later, within its 1 s: counting
    // from the loop's `call` would have timed it out at once.
    let timeout = AttemptTimeoutLayer::new(Some(Duration::from_secs(1)));
    let svc = RetryLayer::new().with_max_attempts(1).layer(SendsLater(
        timeout.layer(answers_after(Duration::from_millis(800))),
    ));
    let start = Instant::now();
    svc.oneshot(get())
        .await
        .expect("answered within its timeout");
    assert_eq!(start.elapsed(), Duration::from_millis(5_800));

    // And one that never answers is cut 1 s after it is sent, not after the `call`.
    let svc = RetryLayer::new().with_max_attempts(1).layer(SendsLater(
        timeout.layer(answers_after(Duration::from_secs(60))),
    ));
    let start = Instant::now();
    let err = svc.oneshot(get()).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_secs(6), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_call_that_panicked_while_sending_leaves_no_send_time_behind() {
    // The service below the loop panics in its `call`, while the loop sends the attempt.
    let panics = service_fn(|_req: Req| -> std::future::Ready<Result<Res, Infallible>> {
        panic!("the service's call panicked")
    });
    let svc = RetryLayer::new().layer(panics);
    // On this thread (a current-thread runtime runs the task here).
    let joined = tokio::spawn(svc.oneshot(get())).await;
    assert!(joined.unwrap_err().is_panic());

    // Much later, on the same thread, an attempt timeout with no retry loop above it counts from
    // its own send: its attempt, answered in 800 ms, is within its 1 s.
    tokio::time::advance(Duration::from_secs(10)).await;
    let svc = AttemptTimeoutLayer::new(Some(Duration::from_secs(1)))
        .layer(answers_after(Duration::from_millis(800)));
    let start = Instant::now();
    svc.oneshot(get())
        .await
        .expect("answered within its timeout");
    assert_eq!(start.elapsed(), Duration::from_millis(800));
}

#[tokio::test(start_paused = true)]
async fn retries_below_a_loop_each_get_their_own_bound() {
    // Each attempt waits 1.5 s against a 1 s timeout and is retried (a GET): every attempt is cut
    // 1 s after it is sent, the second and third after the backoff too.
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = calls.clone();
    let slow = service_fn(move |_req: Req| {
        seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async {
            tokio::time::sleep(Duration::from_millis(1_500)).await;
            Ok::<Res, Infallible>(Response::new(Full::default()))
        }
    });
    let svc = RetryLayer::new()
        .with_max_attempts(3)
        .with_seed(7)
        .layer(AttemptTimeoutLayer::new(Some(Duration::from_secs(1))).layer(slow));
    let start = Instant::now();
    let err = svc.oneshot(get()).await.unwrap_err();
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 3, "{err}");
    // Three attempts of 1 s each, and two backoffs between them.
    assert!(start.elapsed() >= Duration::from_secs(3), "{err}");
}

/// Marks its attempt as held back for its turn under a rate limit and never lets it go, as a
/// rate limit that makes a call wait longer than the attempt timeout does.
fn held_forever(
) -> impl Service<Req, Response = Res, Error = Infallible, Future: Send> + Clone + Send {
    service_fn(move |req: Req| async move {
        if let Some(h) = sturdy_core::hold::AttemptHold::of(&req) {
            h.hold(sturdy_core::hold::HeldFor::RateLimit);
        }
        std::future::pending::<()>().await;
        Ok::<_, Infallible>(Response::new(Full::default()))
    })
}

#[tokio::test(start_paused = true)]
async fn the_retry_loops_attempt_timeout_says_not_sent_for_an_attempt_held_back_below() {
    let svc = RetryLayer::new()
        .with_max_attempts(1)
        .with_deadline(Duration::from_secs(60))
        .with_hold_marks(true)
        .with_attempt_timeout(Duration::from_millis(100))
        .layer(held_forever());
    let err = svc
        .oneshot(
            Request::post("http://api.example.com/pay")
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap_err();
    let e: &sturdy_core::Error = sturdy_core::find(&*err).expect("a sturdy error");
    assert_eq!(*e.kind(), ErrorKind::Timeout, "{e}");
    assert_eq!(e.delivery(), Some(sturdy_core::Delivery::NotSent), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("timed out after 100ms")
            && text.contains("its turn under the rate limit")
            && text.contains("before it was sent"),
        "{text}"
    );
}

#[tokio::test(start_paused = true)]
async fn without_a_hold_mark_the_retry_loops_attempt_timeout_says_it_may_have_been_processed() {
    let svc = RetryLayer::new()
        .with_max_attempts(1)
        .with_deadline(Duration::from_secs(60))
        .with_attempt_timeout(Duration::from_millis(100))
        .layer(held_forever());
    let err = svc
        .oneshot(
            Request::post("http://api.example.com/pay")
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap_err();
    let e: &sturdy_core::Error = sturdy_core::find(&*err).expect("a sturdy error");
    assert_eq!(
        e.delivery(),
        Some(sturdy_core::Delivery::MaybeProcessed),
        "{e}"
    );
}
