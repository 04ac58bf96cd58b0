//! Refused tries against the retry layer's public claims: they are not attempts, the messages
//! count them apart, and the final error keeps the sent attempt's kind and source with the
//! refusal attached (`Error::related`, `find`), composed with tower's own layers.

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use sturdy::circuit::CircuitBreakerLayer;
use sturdy::core::classify::delivery;
use sturdy::core::{
    find, BoxError, CallOptions, CircuitOpen, Delivery, Error, ErrorKind, RateLimited,
};
use sturdy::ratelimit::{Quota, RateLimitLayer};
use sturdy::retry::RetryLayer;
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};

type Req = Request<Full<Bytes>>;
type Res = Response<Full<Bytes>>;

/// An API that answers `status` to every call and counts them.
fn api_status(
    status: StatusCode,
    calls: Arc<AtomicU32>,
) -> impl Service<
    Req,
    Response = Res,
    Error = BoxError,
    Future = impl std::future::Future<Output = Result<Res, BoxError>> + Send,
> + Clone
       + Send
       + Sync
       + 'static {
    service_fn(move |_req: Req| {
        calls.fetch_add(1, Ordering::SeqCst);
        async move {
            Ok::<_, BoxError>(
                Response::builder()
                    .status(status)
                    .body(Full::<Bytes>::default())
                    .unwrap(),
            )
        }
    })
}

/// An API whose every call ends in a connection reset.
fn api_reset(
    calls: Arc<AtomicU32>,
) -> impl Service<
    Req,
    Response = Res,
    Error = BoxError,
    Future = impl std::future::Future<Output = Result<Res, BoxError>> + Send,
> + Clone
       + Send
       + Sync
       + 'static {
    service_fn(move |_req: Req| {
        calls.fetch_add(1, Ordering::SeqCst);
        async move {
            Err::<Res, BoxError>(Box::new(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "connection reset by peer",
            )))
        }
    })
}

fn post_keyed(key: &str) -> Req {
    Request::post("http://api.example.com/orders")
        .header("idempotency-key", key)
        .body(Full::from("{}"))
        .unwrap()
}

fn get() -> Req {
    Request::get("http://api.example.com/items")
        .body(Full::<Bytes>::default())
        .unwrap()
}

fn sturdy_err(err: &BoxError) -> &Error {
    find::<Error>(&**err).expect("a sturdy_core::Error in the chain")
}

/// The retry guide's own example: a keyed POST answered 503, whose retry an open breaker
/// refused: "gave up after 1 attempt and 1 refused try: 503 Service Unavailable; the try after
/// it was refused before it was sent: ...; it may have been processed: retry with the same
/// idempotency key <key>".
#[tokio::test(start_paused = true)]
async fn words21_keyed_post_503_then_open_breaker_message_counts_refusal_apart() {
    let calls = Arc::new(AtomicU32::new(0));
    let mut svc = ServiceBuilder::new()
        .layer(RetryLayer::new().with_max_attempts(2).with_seed(21))
        .layer(CircuitBreakerLayer::new().with_consecutive_failures(1))
        .service(api_status(StatusCode::SERVICE_UNAVAILABLE, calls.clone()));
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(post_keyed("order-21-a"))
        .await
        .unwrap_err();
    let e = sturdy_err(&err);
    let msg = err.to_string();
    assert_eq!(calls.load(Ordering::SeqCst), 1, "{msg}");
    assert!(
        msg.starts_with(
            "gave up after 1 attempt and 1 refused try: 503 Service Unavailable; the try after it was refused before it was sent"
        ),
        "{msg}"
    );
    assert!(
        msg.contains("it may have been processed: retry with the same idempotency key order-21-a"),
        "{msg}"
    );
    assert!(!msg.contains("not sent"), "{msg}");
    assert!(!msg.contains("was not made"), "{msg}");
    assert_eq!(
        e.kind(),
        &ErrorKind::Server(StatusCode::SERVICE_UNAVAILABLE),
        "{msg}"
    );
    let report = e.report().expect("a CallReport");
    assert_eq!(report.attempts(), 1);
    assert_eq!(report.delivery(), Delivery::MaybeProcessed);
    assert_eq!(report.idempotency_key(), Some("order-21-a"));
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed);
    assert!(find::<CircuitOpen>(&*err).is_some(), "{err:?}");
}

/// The retry guide: "When the last try was refused after an attempt that was sent, the kind and
/// the root cause are that attempt's (its error, if it ended in one, is the source), and the
/// refusal is attached beside it (`Error::related()`)". A sent attempt answered 503 (no error
/// of its own): the refusal must be `related()`, not the error's `source()` (the root cause).
#[tokio::test(start_paused = true)]
async fn words21_refusal_after_sent_503_is_related_not_source() {
    let calls = Arc::new(AtomicU32::new(0));
    let mut svc = ServiceBuilder::new()
        .layer(RetryLayer::new().with_max_attempts(2).with_seed(21))
        .layer(CircuitBreakerLayer::new().with_consecutive_failures(1))
        .service(api_status(StatusCode::SERVICE_UNAVAILABLE, calls.clone()));
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(post_keyed("order-21-b"))
        .await
        .unwrap_err();
    let e = sturdy_err(&err);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(
        e.related()
            .is_some_and(|r| find::<CircuitOpen>(r).is_some()),
        "{err:?}"
    );
    let mut cur = std::error::Error::source(e);
    while let Some(c) = cur {
        assert!(!c.is::<CircuitOpen>(), "the refusal is a source: {err:?}");
        cur = c.source();
    }
}

/// A sent attempt that ended in an io error, then a refused try: the io error is the source
/// (reached by `source()`), the refusal is related (found by `find`, not by `source()`), and the
/// kind is the io error's.
#[tokio::test(start_paused = true)]
async fn words21_io_error_then_refusal_keeps_io_source_and_related_breaker() {
    let calls = Arc::new(AtomicU32::new(0));
    let mut svc = ServiceBuilder::new()
        .layer(RetryLayer::new().with_max_attempts(2).with_seed(3))
        .layer(CircuitBreakerLayer::new().with_consecutive_failures(1))
        .service(api_reset(calls.clone()));
    let err = svc.ready().await.unwrap().call(get()).await.unwrap_err();
    let e = sturdy_err(&err);
    let msg = err.to_string();
    assert_eq!(calls.load(Ordering::SeqCst), 1, "{msg}");
    assert_eq!(e.kind(), &ErrorKind::Transport, "{msg}");
    assert!(
        msg.starts_with("gave up after 1 attempt and 1 refused try: "),
        "{msg}"
    );
    // The io error through the source chain alone.
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&*err);
    let mut io_by_source = false;
    let mut open_by_source = false;
    while let Some(c) = cur {
        io_by_source |= c.is::<io::Error>();
        open_by_source |= c.is::<CircuitOpen>();
        cur = c.source();
    }
    assert!(io_by_source, "{err:?}");
    assert!(
        !open_by_source,
        "the refusal is related, not a source: {err:?}"
    );
    assert_eq!(
        find::<io::Error>(&*err).unwrap().kind(),
        io::ErrorKind::ConnectionReset
    );
    let open = find::<CircuitOpen>(&*err).expect("the refusal is found");
    assert!(open.retry_in() > Duration::ZERO);
    assert!(e.related().is_some());
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed);
}

/// The same, under a `Buffer`: `find` still reaches the related refusal through the buffer's
/// own error wrapper.
#[tokio::test(start_paused = true)]
async fn words21_related_refusal_found_through_buffer_wrapper() {
    let calls = Arc::new(AtomicU32::new(0));
    let inner = ServiceBuilder::new()
        .layer(RetryLayer::new().with_max_attempts(2).with_seed(4))
        .layer(CircuitBreakerLayer::new().with_consecutive_failures(1))
        .service(api_reset(calls.clone()));
    let mut svc = ServiceBuilder::new()
        .buffer(4)
        .concurrency_limit(1)
        .service(inner);
    let err = svc.ready().await.unwrap().call(get()).await.unwrap_err();
    assert!(find::<io::Error>(&*err).is_some(), "{err:?}");
    assert!(find::<CircuitOpen>(&*err).is_some(), "{err:?}");
    assert!(find::<Error>(&*err).is_some(), "{err:?}");
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed);
}

/// Plural forms: two sent attempts and two refused tries.
#[tokio::test(start_paused = true)]
async fn words21_two_attempts_two_refused_tries_plural_message() {
    let calls = Arc::new(AtomicU32::new(0));
    let mut svc = ServiceBuilder::new()
        .layer(
            RetryLayer::new()
                .with_max_attempts(4)
                .with_seed(9)
                .with_deadline(Duration::from_secs(600)),
        )
        .layer(
            CircuitBreakerLayer::new()
                .with_consecutive_failures(1)
                .with_open_duration(Duration::from_secs(1), Duration::from_secs(10)),
        )
        .service(api_status(StatusCode::SERVICE_UNAVAILABLE, calls.clone()));
    let out = svc
        .ready()
        .await
        .unwrap()
        .call(post_keyed("k-plural"))
        .await;
    let sent = calls.load(Ordering::SeqCst);
    match out {
        Ok(res) => {
            // Four tries all sent: the breaker never refused one. Then the 503 is the answer.
            assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
            panic!("no try was refused ({sent} sent)");
        }
        Err(err) => {
            let msg = err.to_string();
            let e = sturdy_err(&err);
            let attempts = e.report().unwrap().attempts();
            assert_eq!(attempts, sent, "{msg}");
            let refused = 4 - sent;
            let a = if sent == 1 { "attempt" } else { "attempts" };
            let t = if refused == 1 { "try" } else { "tries" };
            assert!(
                msg.starts_with(&format!(
                    "gave up after {sent} {a} and {refused} refused {t}: 503 Service Unavailable"
                )),
                "{msg}"
            );
            assert_eq!(
                e.kind(),
                &ErrorKind::Server(StatusCode::SERVICE_UNAVAILABLE)
            );
        }
    }
}

/// Every try refused (a breaker forced open): no attempt was sent, so the report says 0, the
/// delivery is `NotSent`, and a POST is said to be safe to send again.
#[tokio::test(start_paused = true)]
async fn words21_every_try_refused_reports_zero_attempts_and_safe_to_resend() {
    let calls = Arc::new(AtomicU32::new(0));
    let (breaker, handle) = CircuitBreakerLayer::new().pair();
    handle.force_open("api.example.com");
    let mut svc = ServiceBuilder::new()
        .layer(RetryLayer::new().with_seed(1))
        .layer(breaker)
        .service(api_status(StatusCode::OK, calls.clone()));
    let req = Request::post("http://api.example.com/orders")
        .body(Full::from("{}"))
        .unwrap();
    let err = svc.ready().await.unwrap().call(req).await.unwrap_err();
    let msg = err.to_string();
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert_eq!(delivery(&*err), Delivery::NotSent, "{msg}");
    if let Some(report) = find::<Error>(&*err).and_then(Error::report) {
        assert_eq!(report.attempts(), 0, "{msg}");
    }
    assert!(
        msg.contains("the request was not sent, so it is safe to send again"),
        "{msg}"
    );
    assert!(!msg.contains("may have been processed"), "{msg}");
    assert!(find::<CircuitOpen>(&*err).is_some());
}

/// Refused tries count against `max_attempts`: a breaker held open past a deadline that its
/// `retry_in` fits cannot keep a call going; the call ends after its tries, none sent.
#[tokio::test(start_paused = true)]
async fn words21_refused_tries_bounded_by_max_attempts() {
    let calls = Arc::new(AtomicU32::new(0));
    let (breaker, handle) = CircuitBreakerLayer::new()
        .with_open_duration(Duration::from_secs(1), Duration::from_secs(2))
        .pair();
    handle.force_open("api.example.com");
    let mut svc = ServiceBuilder::new()
        .layer(
            RetryLayer::new()
                .with_max_attempts(3)
                .with_seed(5)
                .with_deadline(Duration::from_secs(3600)),
        )
        .layer(breaker)
        .service(api_status(StatusCode::OK, calls.clone()));
    let start = tokio::time::Instant::now();
    let out = tokio::time::timeout(
        Duration::from_secs(3000),
        svc.ready().await.unwrap().call(get()),
    )
    .await
    .expect("a forced-open breaker must not hold the call to its deadline");
    let err = out.unwrap_err();
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");
    if let Some(report) = find::<Error>(&*err).and_then(Error::report) {
        assert_eq!(report.attempts(), 0, "{err}");
    }
}

/// A keyed POST answered 503 whose retry the local rate limit refuses with a wait longer than
/// `max_retry_after`: the call ends at once, its kind the 503's, the `RateLimited` still found.
#[tokio::test(start_paused = true)]
async fn words21_503_then_local_refusal_past_max_retry_after() {
    let calls = Arc::new(AtomicU32::new(0));
    let limit = RateLimitLayer::new(Quota::new(1, Duration::from_secs(100)).unwrap())
        .with_max_wait(Duration::ZERO);
    let mut svc = ServiceBuilder::new()
        .layer(
            RetryLayer::new()
                .with_max_attempts(4)
                .with_seed(11)
                .with_max_retry_after(Duration::from_secs(30)),
        )
        .layer(limit)
        .service(api_status(StatusCode::SERVICE_UNAVAILABLE, calls.clone()));
    let start = tokio::time::Instant::now();
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(post_keyed("k-rl"))
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert_eq!(calls.load(Ordering::SeqCst), 1, "{msg}");
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "{:?}",
        start.elapsed()
    );
    let e = sturdy_err(&err);
    assert_eq!(
        e.kind(),
        &ErrorKind::Server(StatusCode::SERVICE_UNAVAILABLE),
        "{msg}"
    );
    assert_eq!(e.report().unwrap().attempts(), 1, "{msg}");
    assert!(
        msg.starts_with("gave up after 1 attempt and 1 refused try: 503 Service Unavailable"),
        "{msg}"
    );
    let rl = find::<RateLimited>(&*err).expect("the refusal's wait");
    assert!(
        rl.retry_after() > Duration::from_secs(90) && rl.retry_after() <= Duration::from_secs(100),
        "{:?}",
        rl.retry_after()
    );
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed);
    assert!(msg.contains("k-rl"), "{msg}");
}

/// The same shape with an io error as the sent attempt's end: both the io error and the
/// refusal's wait are found, and `Display` shows the io cause, not the refusal's own text twice.
#[tokio::test(start_paused = true)]
async fn words21_io_then_local_refusal_both_found() {
    let calls = Arc::new(AtomicU32::new(0));
    let limit = RateLimitLayer::new(Quota::new(1, Duration::from_secs(100)).unwrap())
        .with_max_wait(Duration::ZERO);
    let mut svc = ServiceBuilder::new()
        .layer(RetryLayer::new().with_max_attempts(3).with_seed(12))
        .layer(limit)
        .service(api_reset(calls.clone()));
    let err = svc.ready().await.unwrap().call(get()).await.unwrap_err();
    let e = sturdy_err(&err);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(e.kind(), &ErrorKind::Transport, "{err}");
    assert!(find::<io::Error>(&*err).is_some(), "{err:?}");
    assert!(find::<RateLimited>(&*err).is_some(), "{err:?}");
    assert_eq!(e.report().unwrap().attempts(), 1);
}

/// A half-open breaker whose probe is out: a call with a deadline looks again until the
/// deadline and then says the deadline ended it; the refusals were not attempts.
#[tokio::test(start_paused = true)]
async fn words21_waiting_on_probe_until_deadline_names_deadline() {
    let calls = Arc::new(AtomicU32::new(0));
    let c2 = calls.clone();
    // First call fails (opens the breaker), the probe hangs forever.
    let api = service_fn(move |_req: Req| {
        let n = c2.fetch_add(1, Ordering::SeqCst);
        async move {
            if n == 0 {
                Ok::<_, BoxError>(
                    Response::builder()
                        .status(StatusCode::SERVICE_UNAVAILABLE)
                        .body(Full::<Bytes>::default())
                        .unwrap(),
                )
            } else {
                std::future::pending::<()>().await;
                unreachable!()
            }
        }
    });
    let breaker = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::from_secs(1), Duration::from_secs(1));
    let svc = ServiceBuilder::new()
        .layer(RetryLayer::new().with_seed(2))
        .layer(breaker)
        .service(api);
    let mut first = svc.clone();
    let mut r = get();
    r.extensions_mut()
        .insert(CallOptions::new().without_retries());
    let res = first.ready().await.unwrap().call(r).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // The probe: hangs.
    let mut probe_svc = svc.clone();
    let mut r = get();
    r.extensions_mut()
        .insert(CallOptions::new().without_retries());
    let mut probe = Box::pin(probe_svc.ready().await.unwrap().call(r));
    assert!(tokio::time::timeout(Duration::from_millis(10), &mut probe)
        .await
        .is_err());
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let mut waiting = svc.clone();
    let mut r = get();
    r.extensions_mut()
        .insert(CallOptions::new().with_deadline(Duration::from_secs(2)));
    let start = tokio::time::Instant::now();
    let err = waiting.ready().await.unwrap().call(r).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        start.elapsed() <= Duration::from_millis(2100),
        "{:?}",
        start.elapsed()
    );
    assert!(
        start.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2, "{msg}");
    assert!(msg.contains("deadline"), "{msg}");
    assert!(!msg.contains("last attempt"), "{msg}");
    assert_eq!(delivery(&*err), Delivery::NotSent, "{msg}");
    if let Some(report) = find::<Error>(&*err).and_then(Error::report) {
        assert_eq!(report.attempts(), 0, "{msg}");
    }
    drop(probe);
}

/// A probe whose future is dropped gives its slot back: the next call is admitted as a probe
/// instead of being refused as `Probing`.
#[tokio::test(start_paused = true)]
async fn words21_dropped_probe_under_timeout_gives_slot_back() {
    let calls = Arc::new(AtomicU32::new(0));
    let c2 = calls.clone();
    let api = service_fn(move |_req: Req| {
        let n = c2.fetch_add(1, Ordering::SeqCst);
        async move {
            match n {
                0 => Ok::<_, BoxError>(
                    Response::builder()
                        .status(StatusCode::SERVICE_UNAVAILABLE)
                        .body(Full::<Bytes>::default())
                        .unwrap(),
                ),
                1 => {
                    std::future::pending::<()>().await;
                    unreachable!()
                }
                _ => Ok(Response::new(Full::<Bytes>::default())),
            }
        }
    });
    let svc = ServiceBuilder::new()
        .layer(RetryLayer::new().with_max_attempts(1))
        .layer(
            CircuitBreakerLayer::new()
                .with_consecutive_failures(1)
                .with_open_duration(Duration::from_secs(1), Duration::from_secs(1)),
        )
        .service(api);
    let mut s = svc.clone();
    let _ = s.ready().await.unwrap().call(get()).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut s = tower::timeout::Timeout::new(svc.clone(), Duration::from_millis(200));
    let cut = s.ready().await.unwrap().call(get()).await;
    assert!(cut.is_err());
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let mut s = svc.clone();
    let res = s.ready().await.unwrap().call(get()).await;
    assert!(res.is_ok(), "{:?}", res.err().map(|e| e.to_string()));
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

/// Many callers through a kept `Buffer` over `ConcurrencyLimit(1)` over the retry layer over a
/// breaker that opens: every call ends, none hangs, and each error's report counts only what
/// was sent.
#[tokio::test(start_paused = true)]
async fn words21_many_callers_buffer_concurrency_limit_refusals_end() {
    let calls = Arc::new(AtomicU32::new(0));
    let inner = ServiceBuilder::new()
        .layer(RetryLayer::new().with_seed(77).with_max_attempts(3))
        .layer(CircuitBreakerLayer::new().with_consecutive_failures(2))
        .service(api_status(StatusCode::SERVICE_UNAVAILABLE, calls.clone()));
    let svc = ServiceBuilder::new()
        .buffer(8)
        .concurrency_limit(1)
        .service(inner);
    let mut tasks = Vec::new();
    for i in 0..12 {
        let mut s = svc.clone();
        tasks.push(tokio::spawn(async move {
            let req = post_keyed(&format!("key-{i}"));
            tokio::time::timeout(Duration::from_secs(600), async {
                s.ready().await?.call(req).await
            })
            .await
        }));
    }
    let mut total_attempts = 0;
    for t in tasks {
        let out = t.await.unwrap().expect("no call hangs");
        match out {
            Ok(res) => {
                assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
                total_attempts += 3;
            }
            Err(err) => {
                let e = find::<Error>(&*err).expect("sturdy error");
                if let Some(r) = e.report() {
                    total_attempts += r.attempts();
                    assert!(r.attempts() <= 3);
                }
            }
        }
    }
    assert_eq!(total_attempts, calls.load(Ordering::SeqCst));
}

/// A retry future dropped while it sleeps between tries (a caller's timeout) leaves no trace:
/// a fresh call through the same kept service goes through.
#[tokio::test(start_paused = true)]
async fn words21_cancel_during_backoff_then_fresh_call_works() {
    let calls = Arc::new(AtomicU32::new(0));
    let c2 = calls.clone();
    let api = service_fn(move |_req: Req| {
        let n = c2.fetch_add(1, Ordering::SeqCst);
        async move {
            let status = if n == 0 {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::OK
            };
            Ok::<_, BoxError>(
                Response::builder()
                    .status(status)
                    .body(Full::<Bytes>::default())
                    .unwrap(),
            )
        }
    });
    let mut svc = ServiceBuilder::new()
        .concurrency_limit(1)
        .layer(RetryLayer::new().with_seed(8))
        .layer(CircuitBreakerLayer::new())
        .service(api);
    let fut = svc.ready().await.unwrap().call(get());
    let cut = tokio::time::timeout(Duration::from_millis(100), fut).await;
    assert!(cut.is_err(), "the backoff is at least 250 ms");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let res = tokio::time::timeout(Duration::from_secs(5), async {
        svc.ready().await.unwrap().call(get()).await
    })
    .await
    .expect("the permit went with the dropped call")
    .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
}

/// `with_related` on a hand-made error: `Display` does not show it, `source()` does not return
/// it, `related()` does, and `find` prefers the source chain when both hold the type.
#[test]
fn words21_with_related_doc_claims() {
    let src = RateLimited::new(Duration::from_secs(1));
    let rel = RateLimited::new(Duration::from_secs(2));
    let err: BoxError = Box::new(
        Error::new(ErrorKind::RateLimited { retry_after: None }, "outer")
            .with_source(src)
            .with_related(rel),
    );
    assert_eq!(
        err.to_string(),
        format!("outer: {}", RateLimited::new(Duration::from_secs(1)))
    );
    assert_eq!(
        find::<RateLimited>(&*err).unwrap().retry_after(),
        Duration::from_secs(1)
    );
    let e = err.downcast_ref::<Error>().unwrap();
    let related = e.related().unwrap();
    assert_eq!(
        related.downcast_ref::<RateLimited>().unwrap().retry_after(),
        Duration::from_secs(2)
    );
    // A related error that is itself an Error with a related one: found two levels down.
    let inner = Error::new(ErrorKind::Transport, "inner")
        .with_related(CircuitOpen::new("h", Duration::from_secs(7)));
    let outer: BoxError = Box::new(Error::new(ErrorKind::Transport, "outer").with_related(inner));
    assert_eq!(
        find::<CircuitOpen>(&*outer).unwrap().retry_in(),
        Duration::from_secs(7)
    );
    // A related error inside the source chain of a wrapper is found as well.
    let wrapped: BoxError = Box::new(
        Error::new(ErrorKind::Other, "wrapper").with_source(
            Error::new(ErrorKind::Transport, "mid")
                .with_related(RateLimited::new(Duration::from_secs(9))),
        ),
    );
    assert_eq!(
        find::<RateLimited>(&*wrapped).unwrap().retry_after(),
        Duration::from_secs(9)
    );
    // Debug shows it (for logs), Display does not.
    let shown = format!("{outer}");
    assert!(!shown.contains("inner"), "{shown}");
}

/// Answers in turn: `Err(reset)` for `'r'`, a 503 for `'5'`, 200 otherwise.
fn scripted(
    script: &'static str,
    calls: Arc<AtomicU32>,
) -> impl Service<
    Req,
    Response = Res,
    Error = BoxError,
    Future = impl std::future::Future<Output = Result<Res, BoxError>> + Send,
> + Clone
       + Send
       + Sync
       + 'static {
    service_fn(move |_req: Req| {
        let n = calls.fetch_add(1, Ordering::SeqCst) as usize;
        let step = script.as_bytes().get(n).copied().unwrap_or(b'o');
        async move {
            match step {
                b'r' => Err::<Res, BoxError>(Box::new(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "connection reset by peer",
                ))),
                b'5' => Ok(Response::builder()
                    .status(StatusCode::SERVICE_UNAVAILABLE)
                    .body(Full::<Bytes>::default())
                    .unwrap()),
                _ => Ok(Response::new(Full::<Bytes>::default())),
            }
        }
    })
}

/// A reset, then a 503, then a refused try: the kind is the last sent attempt's (the 503) and
/// the earlier attempt's io error is not presented as the cause.
#[tokio::test(start_paused = true)]
async fn words21_reset_then_503_then_refused_is_the_503s() {
    let calls = Arc::new(AtomicU32::new(0));
    let mut svc = ServiceBuilder::new()
        .layer(RetryLayer::new().with_max_attempts(3).with_seed(31))
        .layer(CircuitBreakerLayer::new().with_consecutive_failures(2))
        .service(scripted("r5", calls.clone()));
    let err = svc.ready().await.unwrap().call(get()).await.unwrap_err();
    let msg = err.to_string();
    let e = sturdy_err(&err);
    assert_eq!(calls.load(Ordering::SeqCst), 2, "{msg}");
    assert_eq!(
        e.kind(),
        &ErrorKind::Server(StatusCode::SERVICE_UNAVAILABLE),
        "{msg}"
    );
    assert!(
        msg.starts_with("gave up after 2 attempts and 1 refused try: 503 Service Unavailable"),
        "{msg}"
    );
    assert!(!msg.contains("reset"), "{msg}");
    assert!(find::<io::Error>(&*err).is_none(), "{err:?}");
    assert!(find::<CircuitOpen>(&*err).is_some(), "{err:?}");
}

/// A 503, then a reset, then a refused try: the kind is the reset's and the io error is the
/// source.
#[tokio::test(start_paused = true)]
async fn words21_503_then_reset_then_refused_is_the_resets() {
    let calls = Arc::new(AtomicU32::new(0));
    let mut svc = ServiceBuilder::new()
        .layer(RetryLayer::new().with_max_attempts(3).with_seed(32))
        .layer(CircuitBreakerLayer::new().with_consecutive_failures(2))
        .service(scripted("5r", calls.clone()));
    let err = svc.ready().await.unwrap().call(get()).await.unwrap_err();
    let msg = err.to_string();
    let e = sturdy_err(&err);
    assert_eq!(calls.load(Ordering::SeqCst), 2, "{msg}");
    assert_eq!(e.kind(), &ErrorKind::Transport, "{msg}");
    assert!(
        msg.starts_with("gave up after 2 attempts and 1 refused try: "),
        "{msg}"
    );
    assert!(!msg.contains("503"), "{msg}");
    let src = std::error::Error::source(e).expect("a source");
    let mut cur = Some(src);
    let mut io_found = false;
    while let Some(c) = cur {
        io_found |= c.is::<io::Error>();
        cur = c.source();
    }
    assert!(io_found, "{err:?}");
    assert!(find::<CircuitOpen>(&*err).is_some(), "{err:?}");
}

/// The retry layer over a `Buffer` over the breaker (the retry guide: "It works over ...
/// `Buffer`"): a refusal that comes back wrapped in the buffer's error is still a refused try:
/// nothing sent, `NotSent`, 0 attempts, and a POST is safe to send again.
#[tokio::test(start_paused = true)]
async fn words21_refusal_through_buffer_below_retry_is_still_refused_try() {
    let calls = Arc::new(AtomicU32::new(0));
    let (breaker, handle) = CircuitBreakerLayer::new().pair();
    handle.force_open("api.example.com");
    let mut svc = ServiceBuilder::new()
        .layer(RetryLayer::new().with_seed(41))
        .buffer(4)
        .layer(breaker)
        .service(api_status(StatusCode::OK, calls.clone()));
    let req = Request::post("http://api.example.com/orders")
        .body(Full::from("{}"))
        .unwrap();
    let err = svc.ready().await.unwrap().call(req).await.unwrap_err();
    let msg = err.to_string();
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert_eq!(delivery(&*err), Delivery::NotSent, "{msg}");
    assert!(!msg.contains("may have been processed"), "{msg}");
    assert!(
        msg.contains("the request was not sent, so it is safe to send again"),
        "{msg}"
    );
    if let Some(r) = find::<Error>(&*err).and_then(Error::report) {
        assert_eq!(r.attempts(), 0, "{msg}");
    }
}

/// The same with a sent 503 first and the local rate limit refusing the retry, the limiter
/// under a `Buffer` under the retry layer: one attempt and one refused try.
#[tokio::test(start_paused = true)]
async fn words21_503_then_refusal_through_buffer_counts_one_attempt() {
    let calls = Arc::new(AtomicU32::new(0));
    let mut svc = ServiceBuilder::new()
        .layer(
            RetryLayer::new()
                .with_seed(42)
                .with_max_retry_after(Duration::from_secs(10)),
        )
        .buffer(4)
        .layer(
            RateLimitLayer::new(Quota::new(1, Duration::from_secs(100)).unwrap())
                .with_max_wait(Duration::ZERO),
        )
        .service(api_status(StatusCode::SERVICE_UNAVAILABLE, calls.clone()));
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(post_keyed("buf-1"))
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert_eq!(calls.load(Ordering::SeqCst), 1, "{msg}");
    let e = sturdy_err(&err);
    assert_eq!(e.report().unwrap().attempts(), 1, "{msg}");
    assert!(
        msg.starts_with("gave up after 1 attempt and 1 refused try: 503 Service Unavailable"),
        "{msg}"
    );
    assert!(find::<RateLimited>(&*err).is_some());
}
