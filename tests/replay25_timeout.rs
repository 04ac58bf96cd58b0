//! Each attempt bounded by its timeout (`ClientBuilder`'s and `AttemptTimeoutLayer`'s) when the
//! caller keeps the service and polls its future late, under `Buffer` and `ConcurrencyLimit(1)`, with per-request `CallOptions`, and after
//! cancellation. Paused time, no sockets.
#![cfg(feature = "full")]

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use sturdy::core::{BoxError, CallOptions, ErrorKind};
use sturdy::retry::{AttemptTimeoutLayer, RetryLayer};
use sturdy::ClientBuilder;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

type BoxFut = Pin<Box<dyn Future<Output = Result<Response<Full<Bytes>>, BoxError>> + Send>>;

/// When each attempt reached the HTTP service (its `call`), and when it ended.
type Calls = Arc<Mutex<Vec<Instant>>>;

/// An HTTP service that starts its work when called (as a client that writes the request from
/// `call` would): it answers `took` after its `call`, whenever its future is first polled.
fn eager(
    calls: Calls,
    took: Duration,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = BoxError,
    Future = BoxFut,
> + Clone
       + Send
       + Sync
       + 'static {
    tower::service_fn(move |_req: Request<Full<Bytes>>| -> BoxFut {
        let at = Instant::now();
        calls.lock().unwrap().push(at);
        Box::pin(async move {
            tokio::time::sleep_until(at + took).await;
            Ok(Response::new(Full::from("late")))
        })
    })
}

/// An HTTP service whose work starts at its future's first poll.
fn lazy(
    calls: Calls,
    took: Duration,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = BoxError,
    Future = BoxFut,
> + Clone
       + Send
       + Sync
       + 'static {
    tower::service_fn(move |_req: Request<Full<Bytes>>| -> BoxFut {
        let calls = calls.clone();
        Box::pin(async move {
            calls.lock().unwrap().push(Instant::now());
            tokio::time::sleep(took).await;
            Ok(Response::new(Full::from("late")))
        })
    })
}

fn get() -> Request<Full<Bytes>> {
    Request::get("http://api.example.com/orders")
        .body(Full::default())
        .unwrap()
}

fn one_try(mut req: Request<Full<Bytes>>) -> Request<Full<Bytes>> {
    req.extensions_mut()
        .insert(CallOptions::new().without_retries());
    req
}

fn is_timeout(e: &BoxError) -> bool {
    e.downcast_ref::<sturdy::core::Error>()
        .is_some_and(|e| matches!(e.kind(), ErrorKind::Timeout))
        || sturdy::core::find::<sturdy::core::Error>(&**e)
            .is_some_and(|e| matches!(e.kind(), ErrorKind::Timeout))
}

/// `ClientBuilder` (its retry layer over its own layers, so attempts count from their first
/// poll), kept and called, its future first polled 600 ms later: the one attempt, which the
/// HTTP service began at `call`, must not run past its 1 s timeout.
#[tokio::test(start_paused = true)]
async fn client_builder_attempt_is_bounded_when_its_future_is_polled_late() {
    let calls: Calls = Arc::default();
    let mut client = ClientBuilder::new()
        .with_attempt_timeout(Duration::from_secs(1))
        .build(eager(calls.clone(), Duration::from_millis(1_500)));
    let fut = client.ready().await.unwrap().call(one_try(get()));
    tokio::time::sleep(Duration::from_millis(600)).await;
    let res = fut.await;
    let end = Instant::now();
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 1);
    let ran = end - calls[0];
    assert!(
        res.is_err(),
        "an attempt given 1 s answered after {ran:?} of work (its future was first polled 600 ms \
         after the call)"
    );
    assert!(ran <= Duration::from_millis(1_000), "ran {ran:?}");
}

/// The same under a `Buffer`: the worker calls the client, the caller polls late.
#[tokio::test(start_paused = true)]
async fn client_builder_under_buffer_bounds_an_attempt_polled_late() {
    let calls: Calls = Arc::default();
    let client = ClientBuilder::new()
        .with_attempt_timeout(Duration::from_secs(1))
        .build(eager(calls.clone(), Duration::from_millis(1_500)));
    let mut buf = tower::buffer::Buffer::new(client, 4);
    let fut = buf.ready().await.unwrap().call(one_try(get()));
    tokio::time::sleep(Duration::from_millis(600)).await;
    let res = fut.await;
    let end = Instant::now();
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 1);
    let ran = end - calls[0];
    assert!(res.is_err(), "answered after {ran:?} of a 1 s attempt");
    assert!(ran <= Duration::from_millis(1_000), "ran {ran:?}");
}

/// Kept, called, first polled 600 ms later; returns the outcome and how long the HTTP service's
/// only attempt ran (from its `call` to the end).
async fn polled_late(
    mut client: sturdy::Client<Full<Bytes>>,
    calls: &Calls,
    req: Request<Full<Bytes>>,
) -> (Result<Response<Full<Bytes>>, BoxError>, Duration) {
    let fut = client.ready().await.unwrap().call(req);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let res = fut.await;
    let end = Instant::now();
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 1);
    (res, end - calls[0])
}

/// One attempt in all, said three ways: the layer's `with_max_attempts(1)`, `CallOptions`'s
/// `with_max_attempts(1)`, and `without_retries()`. Each attempt is bounded by its 1 s.
#[tokio::test(start_paused = true)]
async fn client_builder_single_attempt_calls_polled_late_are_bounded() {
    let mut failures = Vec::new();
    for how in [
        "layer",
        "options max 1",
        "without_retries",
        "body over 1 MiB",
        "default",
    ] {
        let calls: Calls = Arc::default();
        let retry = RetryLayer::new().with_seed(3);
        let retry = if how == "layer" {
            retry.with_max_attempts(1)
        } else {
            retry
        };
        let client = ClientBuilder::new()
            .with_retry(retry)
            .with_attempt_timeout(Duration::from_secs(1))
            .build(eager(calls.clone(), Duration::from_millis(1_500)));
        let mut req = get();
        if how == "body over 1 MiB" {
            // Too large to buffer for a replay: sent once.
            req = Request::put("http://api.example.com/blob")
                .body(Full::from(vec![7u8; 2 << 20]))
                .unwrap();
        }
        match how {
            "options max 1" => {
                req.extensions_mut()
                    .insert(CallOptions::new().with_max_attempts(1));
            }
            "without_retries" => {
                req.extensions_mut()
                    .insert(CallOptions::new().without_retries());
            }
            _ => {}
        }
        if how == "default" {
            // Four attempts: the first is cut at 1 s, so the service is called again.
            let mut client = client;
            let fut = client.ready().await.unwrap().call(req);
            tokio::time::sleep(Duration::from_millis(600)).await;
            let _ = fut.await;
            assert!(
                calls.lock().unwrap().len() > 1,
                "default: the first attempt was not cut"
            );
            continue;
        }
        let (res, ran) = polled_late(client, &calls, req).await;
        if res.is_ok() || ran > Duration::from_secs(1) {
            failures.push(format!("{how}: ok={} after {ran:?}", res.is_ok()));
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
}

/// With every retry: the last attempt ends by its timeout too, and each attempt is cut at 1 s
/// from its `call`.
#[tokio::test(start_paused = true)]
async fn client_builder_every_attempt_of_a_late_polled_call_is_bounded() {
    let calls: Calls = Arc::default();
    let mut client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(3).with_max_attempts(3))
        .with_attempt_timeout(Duration::from_secs(1))
        .build(eager(calls.clone(), Duration::from_millis(1_500)));
    let fut = client.ready().await.unwrap().call(get());
    tokio::time::sleep(Duration::from_millis(600)).await;
    let res = fut.await;
    let err = res.expect_err("three attempts of 1.5 s each, every one given 1 s");
    assert!(is_timeout(&err), "{err}");
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 3);
}

/// `without_retry()`: the timeout counts from `call`, as the layer's default says.
#[tokio::test(start_paused = true)]
async fn without_retry_a_late_polled_attempt_is_bounded_from_call() {
    let calls: Calls = Arc::default();
    let mut client = ClientBuilder::new()
        .without_retry()
        .with_attempt_timeout(Duration::from_secs(1))
        .build(eager(calls.clone(), Duration::from_millis(1_500)));
    let start = Instant::now();
    let fut = client.ready().await.unwrap().call(get());
    tokio::time::sleep(Duration::from_millis(600)).await;
    let err = fut.await.unwrap_err();
    assert!(is_timeout(&err), "{err}");
    assert_eq!(start.elapsed(), Duration::from_millis(1_000));
}

/// Per-request timeouts, shorter and longer than the builder's, through retries.
#[tokio::test(start_paused = true)]
async fn per_request_attempt_timeouts_bound_each_attempt() {
    for (own, took, want_ok) in [
        (Some(200u64), 300u64, false),
        (Some(400), 300, true),
        (Some(5_000), 3_000, true),
        (None, 3_000, true),
    ] {
        let calls: Calls = Arc::default();
        let client = ClientBuilder::new()
            .with_retry(RetryLayer::new().with_seed(3).with_max_attempts(2))
            .with_attempt_timeout(Duration::from_secs(1))
            .build(lazy(calls.clone(), Duration::from_millis(took)));
        let mut req = get();
        let opts = match own {
            Some(ms) => CallOptions::new().with_attempt_timeout(Duration::from_millis(ms)),
            None => CallOptions::new().without_attempt_timeout(),
        };
        req.extensions_mut().insert(opts);
        let start = Instant::now();
        let res = client.oneshot(req).await;
        let case = format!("own {own:?}, took {took}");
        assert_eq!(res.is_ok(), want_ok, "{case}: {:?}", res.err());
        if !want_ok {
            let calls = calls.lock().unwrap().clone();
            assert_eq!(calls.len(), 2, "{case}");
            // Two attempts of 200 ms and one backoff between them.
            assert!(
                start.elapsed() < Duration::from_millis(400 + 20_000),
                "{case}"
            );
        }
    }
}

/// Under `ConcurrencyLimit(1)`: a call dropped at any point frees the one place, and the next
/// call's attempt is bounded.
#[tokio::test(start_paused = true)]
async fn under_a_concurrency_limit_of_one_a_dropped_call_frees_its_place() {
    for drop_after in [0u64, 1, 100, 999, 1_000, 1_001, 1_300] {
        let calls: Calls = Arc::default();
        let client = ClientBuilder::new()
            .with_retry(RetryLayer::new().with_seed(3).with_max_attempts(2))
            .with_attempt_timeout(Duration::from_secs(1))
            .build(lazy(calls.clone(), Duration::from_millis(5_000)));
        let mut limited = tower::limit::ConcurrencyLimit::new(client, 1);
        let fut = limited.ready().await.unwrap().call(get());
        let _ = tokio::time::timeout(Duration::from_millis(drop_after), fut).await;
        let start = Instant::now();
        let ready = tokio::time::timeout(Duration::from_millis(10), limited.ready()).await;
        assert!(ready.is_ok(), "drop after {drop_after} ms: place not freed");
        let mut req = get();
        req.extensions_mut()
            .insert(CallOptions::new().without_retries());
        let err = ready.unwrap().unwrap().call(req).await.unwrap_err();
        assert!(is_timeout(&err), "{err}");
        assert!(
            start.elapsed() <= Duration::from_millis(1_010),
            "drop after {drop_after}: {:?}",
            start.elapsed()
        );
    }
}

/// `AttemptTimeoutLayer` under `Buffer`, polled at once by the caller: the attempt is cut at its
/// timeout.
#[tokio::test(start_paused = true)]
async fn attempt_timer_under_buffer_polled_at_once() {
    let calls: Calls = Arc::default();
    let svc = AttemptTimeoutLayer::new(Some(Duration::from_secs(1)))
        .layer(lazy(calls.clone(), Duration::from_secs(3)));
    let svc = tower::buffer::Buffer::new(svc, 2);
    let start = Instant::now();
    let err = svc.oneshot(get()).await.unwrap_err();
    assert!(is_timeout(&err), "{err}");
    assert_eq!(start.elapsed(), Duration::from_secs(1));
}

/// With a quota of one call a second in `ClientBuilder`, an HTTP service that starts work at
/// `call` is called once per second: no layer calls it before the call's turn, and each
/// attempt, single or retried, is bounded from that `call`.
#[tokio::test(start_paused = true)]
async fn a_quota_holds_back_the_http_call_itself() {
    use sturdy::ratelimit::{Quota, RateLimitLayer};
    for single in [false, true] {
        let calls: Calls = Arc::default();
        let client = ClientBuilder::new()
            .with_rate_limit(RateLimitLayer::new(
                Quota::per_second(1).unwrap().with_burst(1).unwrap(),
            ))
            .with_attempt_timeout(Duration::from_secs(3))
            .build(eager(calls.clone(), Duration::from_millis(10)));
        let mut futs = Vec::new();
        for _ in 0..4 {
            let req = if single { one_try(get()) } else { get() };
            futs.push(client.clone().oneshot(req));
        }
        let res = futures_util::future::join_all(futs).await;
        assert!(res.iter().all(Result::is_ok), "single {single}");
        let calls = calls.lock().unwrap().clone();
        assert_eq!(calls.len(), 4, "single {single}");
        for w in calls.windows(2) {
            assert!(
                w[1] - w[0] >= Duration::from_millis(990),
                "single {single}: calls {:?}",
                calls.iter().map(|c| c.elapsed()).collect::<Vec<_>>()
            );
        }
    }
}

/// A kept client's future dropped before its first poll calls the HTTP service no more.
#[tokio::test(start_paused = true)]
async fn a_future_dropped_unpolled_sends_nothing_more() {
    let calls: Calls = Arc::default();
    let mut client = ClientBuilder::new()
        .with_attempt_timeout(Duration::from_secs(1))
        .build(eager(calls.clone(), Duration::from_millis(1_500)));
    let fut = client.ready().await.unwrap().call(get());
    drop(fut);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(calls.lock().unwrap().len() <= 1);
}

/// On the wire: the HTTP service is hyper's connection-level client (`http1::SendRequest`),
/// which queues the request on its connection at `call`. A loopback server answers after
/// 300 ms; the attempt timeout is 200 ms; the caller keeps the client and polls its one-attempt
/// future 150 ms after `call`. Returns the outcome's status and how long it took.
async fn on_the_wire(with_retry: bool) -> (Result<u16, String>, Duration) {
    use hyper_util::rt::TokioIo;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().route(
        "/slow",
        axum::routing::get(|| async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            "slow"
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let send = Arc::new(Mutex::new(send));
    let http = tower::service_fn(move |req: Request<Full<Bytes>>| {
        // The request goes on the connection now, as hyper's `send_request` does.
        let fut = send.lock().unwrap().send_request(req);
        async move {
            let res = fut.await?;
            Ok::<_, BoxError>(res)
        }
    });
    let builder = ClientBuilder::new().with_attempt_timeout(Duration::from_millis(200));
    let mut client = if with_retry {
        builder.build(http)
    } else {
        builder.without_retry().build(http)
    };
    let req = Request::get(format!("http://{addr}/slow"))
        .body(Full::default())
        .unwrap();
    #[allow(clippy::disallowed_methods)]
    let start = std::time::Instant::now();
    let fut = client.ready().await.unwrap().call(one_try(req));
    tokio::time::sleep(Duration::from_millis(150)).await;
    let res = fut.await;
    (
        res.map(|r| r.status().as_u16()).map_err(|e| e.to_string()),
        start.elapsed(),
    )
}

/// Without the retry layer the attempt's timer starts at `call`: the 200 ms bound holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_wire_without_retry_a_late_polled_attempt_is_bounded() {
    let (res, took) = on_the_wire(false).await;
    assert!(res.is_err(), "answered after {took:?}: {res:?}");
    assert!(took < Duration::from_millis(280), "{took:?}");
}

/// With the builder's retry layer and a single attempt, the same call must be bounded alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_wire_a_late_polled_single_attempt_is_bounded() {
    let (res, took) = on_the_wire(true).await;
    assert!(
        res.is_err(),
        "a 200 ms attempt answered after {took:?}: {res:?}"
    );
}

/// A call's deadline (`CallOptions::with_deadline`) with one attempt and no attempt timeout:
/// polled at once or 600 ms after `call`, an attempt the HTTP service began at `call` is
/// abandoned at the deadline.
#[tokio::test(start_paused = true)]
async fn a_single_attempt_is_abandoned_at_the_calls_deadline() {
    let mut failures = Vec::new();
    for (late, max1) in [(0u64, true), (600, true), (0, false), (600, false)] {
        let calls: Calls = Arc::default();
        let mut client = ClientBuilder::new()
            .without_attempt_timeout()
            .build(eager(calls.clone(), Duration::from_millis(1_500)));
        let mut req = get();
        let opts = CallOptions::new().with_deadline(Duration::from_secs(1));
        let opts = if max1 {
            opts.with_max_attempts(1)
        } else {
            opts
        };
        req.extensions_mut().insert(opts);
        let fut = client.ready().await.unwrap().call(req);
        tokio::time::sleep(Duration::from_millis(late)).await;
        let res = fut.await;
        let end = Instant::now();
        let first = calls.lock().unwrap()[0];
        if res.is_ok() || end - first > Duration::from_secs(1) {
            failures.push(format!(
                "late {late} ms, max 1 {max1}: ok={} after {:?}",
                res.is_ok(),
                end - first
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
}
