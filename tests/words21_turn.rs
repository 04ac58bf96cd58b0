//! The rate limit's deadline refusal (a call whose turn comes after its deadline is refused at
//! once, with the retry layer reading the deadline), `max_retry_after` on local refusals, and the
//! open breaker's `retry_in` exempt from it, composed with tower's layers and cancelled mid-way.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use sturdy::circuit::CircuitBreakerLayer;
use sturdy::core::classify::delivery;
use sturdy::core::{find, BoxError, CallOptions, CircuitOpen, Delivery, Error, RateLimited};
use sturdy::ratelimit::{Quota, RateLimitLayer};
use sturdy::retry::RetryLayer;
use sturdy::ClientBuilder;
use tokio::time::Instant;
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};

type Req = Request<Full<Bytes>>;
type Res = Response<Full<Bytes>>;

fn ok_api(
    calls: Arc<AtomicU32>,
) -> impl Service<Req, Response = Res, Error = BoxError, Future = impl Send>
       + Clone
       + Send
       + Sync
       + 'static {
    service_fn(move |_req: Req| {
        calls.fetch_add(1, Ordering::SeqCst);
        async move { Ok::<_, BoxError>(Response::new(Full::<Bytes>::default())) }
    })
}

fn get() -> Req {
    Request::get("http://api.example.com/v1/things")
        .body(Full::default())
        .unwrap()
}

fn get_with(opts: CallOptions) -> Req {
    let mut r = get();
    r.extensions_mut().insert(opts);
    r
}

fn quota_every(period: Duration) -> RateLimitLayer {
    RateLimitLayer::new(Quota::new(1, period).unwrap())
}

/// The ratelimit guide: in a `ClientBuilder` stack, a call with a `CallOptions` deadline whose
/// turn would come after it is refused at once with `RateLimited` carrying the wait, not sent.
#[tokio::test(start_paused = true)]
async fn words21_builder_turn_after_deadline_refused_at_once() {
    let calls = Arc::new(AtomicU32::new(0));
    let mut client = ClientBuilder::new()
        .with_rate_limit(quota_every(Duration::from_secs(10)))
        .build(ok_api(calls.clone()));
    client.ready().await.unwrap().call(get()).await.unwrap();
    let start = Instant::now();
    let err = client
        .ready()
        .await
        .unwrap()
        .call(get_with(
            CallOptions::new().with_deadline(Duration::from_secs(2)),
        ))
        .await
        .unwrap_err();
    assert!(
        start.elapsed() < Duration::from_millis(50),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let rl = find::<RateLimited>(&*err).expect("RateLimited in the chain");
    assert!(
        rl.retry_after() > Duration::from_secs(9) && rl.retry_after() <= Duration::from_secs(10),
        "{:?}",
        rl.retry_after()
    );
    assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");
    if let Some(r) = find::<Error>(&*err).and_then(Error::report) {
        assert_eq!(r.attempts(), 0, "{err}");
    }
}

/// A turn that comes before the deadline is waited for, and the call goes.
#[tokio::test(start_paused = true)]
async fn words21_builder_turn_before_deadline_waits_and_goes() {
    let calls = Arc::new(AtomicU32::new(0));
    let mut client = ClientBuilder::new()
        .with_rate_limit(quota_every(Duration::from_secs(2)))
        .build(ok_api(calls.clone()));
    client.ready().await.unwrap().call(get()).await.unwrap();
    let start = Instant::now();
    let res = client
        .ready()
        .await
        .unwrap()
        .call(get_with(
            CallOptions::new().with_deadline(Duration::from_millis(2500)),
        ))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(1900) && waited <= Duration::from_millis(2500),
        "{waited:?}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// The guide: "a stack built `without_retry()` has none": the deadline is not read, and the call
/// waits its turn.
#[tokio::test(start_paused = true)]
async fn words21_builder_without_retry_waits_its_turn() {
    let calls = Arc::new(AtomicU32::new(0));
    let mut client = ClientBuilder::new()
        .without_retry()
        .with_rate_limit(quota_every(Duration::from_secs(3)))
        .build(ok_api(calls.clone()));
    client.ready().await.unwrap().call(get()).await.unwrap();
    let start = Instant::now();
    let res = client
        .ready()
        .await
        .unwrap()
        .call(get_with(
            CallOptions::new().with_deadline(Duration::from_secs(1)),
        ))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(start.elapsed() >= Duration::from_millis(2900));
}

/// A `RetryLayer` used alone with `with_hold_marks(true)` and its own deadline: the rate limit
/// refuses at once (the layer's rustdoc).
#[tokio::test(start_paused = true)]
async fn words21_retry_alone_with_hold_marks_and_layer_deadline_refuses_at_once() {
    let calls = Arc::new(AtomicU32::new(0));
    let mut svc = ServiceBuilder::new()
        .layer(
            RetryLayer::new()
                .with_hold_marks(true)
                .with_deadline(Duration::from_secs(3)),
        )
        .layer(quota_every(Duration::from_secs(20)))
        .service(ok_api(calls.clone()));
    svc.ready().await.unwrap().call(get()).await.unwrap();
    let start = Instant::now();
    let err = svc.ready().await.unwrap().call(get()).await.unwrap_err();
    assert!(
        start.elapsed() < Duration::from_millis(50),
        "{:?}",
        start.elapsed()
    );
    assert!(find::<RateLimited>(&*err).is_some(), "{err}");
    assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// A server pause (429 with `Retry-After: 30`) known to end after the deadline: refused at once.
#[tokio::test(start_paused = true)]
async fn words21_server_pause_past_deadline_refused_at_once() {
    let calls = Arc::new(AtomicU32::new(0));
    let c2 = calls.clone();
    let api = service_fn(move |_req: Req| {
        let n = c2.fetch_add(1, Ordering::SeqCst);
        async move {
            let res = if n == 0 {
                Response::builder()
                    .status(StatusCode::TOO_MANY_REQUESTS)
                    .header("retry-after", "30")
                    .body(Full::<Bytes>::default())
                    .unwrap()
            } else {
                Response::new(Full::<Bytes>::default())
            };
            Ok::<_, BoxError>(res)
        }
    });
    let mut client = ClientBuilder::new().build(api);
    let first = client
        .ready()
        .await
        .unwrap()
        .call(get_with(CallOptions::new().without_retries()))
        .await;
    assert!(
        first.is_err(),
        "a 429 with Retry-After on the last attempt is RateLimited"
    );
    let start = Instant::now();
    let err = client
        .ready()
        .await
        .unwrap()
        .call(get_with(
            CallOptions::new().with_deadline(Duration::from_secs(5)),
        ))
        .await
        .unwrap_err();
    assert!(
        start.elapsed() < Duration::from_millis(50),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let rl = find::<RateLimited>(&*err).expect("RateLimited");
    assert!(
        rl.retry_after() > Duration::from_secs(5),
        "{:?}",
        rl.retry_after()
    );
    assert_eq!(delivery(&*err), Delivery::NotSent);
}

/// `CallOptions::with_deadline(Duration::MAX)`: read as about 30 years, never a panic; the turn
/// fits and the call goes.
#[tokio::test(start_paused = true)]
async fn words21_duration_max_deadline_waits_turn() {
    let calls = Arc::new(AtomicU32::new(0));
    let mut client = ClientBuilder::new()
        .with_rate_limit(quota_every(Duration::from_secs(5)))
        .build(ok_api(calls.clone()));
    client.ready().await.unwrap().call(get()).await.unwrap();
    let res = client
        .ready()
        .await
        .unwrap()
        .call(get_with(CallOptions::new().with_deadline(Duration::MAX)))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// A zero deadline: ends at once, sends nothing, no panic.
#[tokio::test(start_paused = true)]
async fn words21_zero_deadline_ends_at_once_unsent() {
    let calls = Arc::new(AtomicU32::new(0));
    let mut client = ClientBuilder::new()
        .with_rate_limit(quota_every(Duration::from_secs(5)))
        .build(ok_api(calls.clone()));
    client.ready().await.unwrap().call(get()).await.unwrap();
    let start = Instant::now();
    let out = client
        .ready()
        .await
        .unwrap()
        .call(get_with(CallOptions::new().with_deadline(Duration::ZERO)))
        .await;
    assert!(start.elapsed() < Duration::from_millis(50));
    let err = out.expect_err("its turn is 5 s away");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");
}

/// Under a `Buffer` over `ConcurrencyLimit(1)`, driven by a kept service: the refused call ends
/// at once and gives back the permit; the next call (deadline fitting) gets through in its turn.
#[tokio::test(start_paused = true)]
async fn words21_buffered_kept_service_refusal_then_next_call_goes() {
    let calls = Arc::new(AtomicU32::new(0));
    let client = ClientBuilder::new()
        .with_rate_limit(quota_every(Duration::from_secs(4)))
        .build(ok_api(calls.clone()));
    let mut svc = ServiceBuilder::new()
        .buffer(2)
        .concurrency_limit(1)
        .service(client);
    svc.ready().await.unwrap().call(get()).await.unwrap();
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(get_with(
            CallOptions::new().with_deadline(Duration::from_secs(1)),
        ))
        .await
        .unwrap_err();
    assert!(find::<RateLimited>(&*err).is_some(), "{err}");
    let start = Instant::now();
    let res = tokio::time::timeout(Duration::from_secs(30), async {
        svc.ready()
            .await
            .unwrap()
            .call(get_with(
                CallOptions::new().with_deadline(Duration::from_secs(10)),
            ))
            .await
    })
    .await
    .expect("no hang")
    .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(
        start.elapsed() <= Duration::from_secs(4),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// A waiting call dropped by a tower `Timeout` above it leaves the line: the caller behind it
/// does not wait an extra interval.
#[tokio::test(start_paused = true)]
async fn words21_dropped_waiter_under_tower_timeout_leaves_line() {
    let calls = Arc::new(AtomicU32::new(0));
    let client = ClientBuilder::new()
        .with_rate_limit(quota_every(Duration::from_secs(1)))
        .build(ok_api(calls.clone()));
    let mut c0 = client.clone();
    c0.ready().await.unwrap().call(get()).await.unwrap();
    // Five callers give up after 100 ms each while in line.
    let mut dropped = Vec::new();
    for _ in 0..5 {
        let mut t = ServiceBuilder::new()
            .timeout(Duration::from_millis(100))
            .service(client.clone());
        dropped.push(tokio::spawn(async move {
            let r = get_with(CallOptions::new().with_deadline(Duration::from_secs(60)));
            t.ready().await.unwrap().call(r).await.is_err()
        }));
    }
    for d in dropped {
        assert!(d.await.unwrap());
    }
    let start = Instant::now();
    let mut c = client.clone();
    c.ready()
        .await
        .unwrap()
        .call(get_with(
            CallOptions::new().with_deadline(Duration::from_secs(60)),
        ))
        .await
        .unwrap();
    assert!(
        start.elapsed() <= Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// Concurrent callers with deadlines: those whose turns fit go (in order, one interval apart),
/// those whose turns do not are refused at once; nothing is sent twice, nothing hangs.
#[tokio::test(start_paused = true)]
async fn words21_line_of_deadlines_refuses_only_late_turns() {
    let calls = Arc::new(AtomicU32::new(0));
    let client = ClientBuilder::new()
        .with_rate_limit(quota_every(Duration::from_secs(1)))
        .build(ok_api(calls.clone()));
    let mut handles = Vec::new();
    for i in 0..8u64 {
        let mut c = client.clone();
        handles.push(tokio::spawn(async move {
            let start = Instant::now();
            let r = get_with(CallOptions::new().with_deadline(Duration::from_millis(3500)));
            let out = c.ready().await.unwrap().call(r).await;
            (i, out.is_ok(), start.elapsed())
        }));
        tokio::task::yield_now().await;
    }
    let mut ok = 0;
    for h in handles {
        let (_i, good, took) = h.await.unwrap();
        if good {
            ok += 1;
            assert!(took <= Duration::from_millis(3500), "{took:?}");
        } else {
            assert!(took < Duration::from_millis(3500), "refused late: {took:?}");
        }
    }
    assert!((3..=4).contains(&ok), "{ok} calls went");
    assert_eq!(calls.load(Ordering::SeqCst), ok);
}

/// `max_retry_after` clamps: a local refusal whose wait is longer than it fails the call at
/// once; `Duration::ZERO` makes every refusal final; `Duration::MAX` waits it out.
#[tokio::test(start_paused = true)]
async fn words21_max_retry_after_zero_and_max_on_local_refusal() {
    for (max, expect_wait) in [(Duration::ZERO, false), (Duration::MAX, true)] {
        let calls = Arc::new(AtomicU32::new(0));
        let mut svc = ServiceBuilder::new()
            .layer(RetryLayer::new().with_max_retry_after(max).with_seed(1))
            .layer(quota_every(Duration::from_secs(90)).with_max_wait(Duration::ZERO))
            .service(ok_api(calls.clone()));
        svc.ready().await.unwrap().call(get()).await.unwrap();
        let start = Instant::now();
        let out = svc.ready().await.unwrap().call(get()).await;
        if expect_wait {
            assert!(out.is_ok(), "{:?}", out.err().map(|e| e.to_string()));
            assert!(start.elapsed() >= Duration::from_secs(89));
            assert_eq!(calls.load(Ordering::SeqCst), 2);
        } else {
            let err = out.unwrap_err();
            assert!(start.elapsed() < Duration::from_millis(50));
            let rl = find::<RateLimited>(&*err).expect("RateLimited");
            assert!(
                rl.retry_after() > Duration::from_secs(80),
                "{:?}",
                rl.retry_after()
            );
            assert_eq!(delivery(&*err), Delivery::NotSent);
            assert_eq!(calls.load(Ordering::SeqCst), 1);
        }
    }
}

/// An open breaker's `retry_in` (2 min) longer than `max_retry_after` (60 s) is waited out by a
/// call whose deadline (10 min) it fits, under a kept `Buffer`.
#[tokio::test(start_paused = true)]
async fn words21_breaker_retry_in_exempt_from_max_retry_after_under_buffer() {
    let calls = Arc::new(AtomicU32::new(0));
    let c2 = calls.clone();
    let api = service_fn(move |_req: Req| {
        let n = c2.fetch_add(1, Ordering::SeqCst);
        async move {
            let status = if n == 0 {
                StatusCode::INTERNAL_SERVER_ERROR
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
    let client = ClientBuilder::new()
        .with_circuit_breaker(
            CircuitBreakerLayer::new()
                .with_consecutive_failures(1)
                .with_open_duration(Duration::from_secs(120), Duration::from_secs(600)),
        )
        .build(api);
    let mut svc = ServiceBuilder::new().buffer(4).service(client);
    let first = svc
        .ready()
        .await
        .unwrap()
        .call(get_with(CallOptions::new().without_retries()))
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let start = Instant::now();
    let res = svc
        .ready()
        .await
        .unwrap()
        .call(get_with(
            CallOptions::new().with_deadline(Duration::from_secs(600)),
        ))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(
        start.elapsed() >= Duration::from_secs(119),
        "{:?}",
        start.elapsed()
    );
    assert!(
        start.elapsed() <= Duration::from_secs(150),
        "{:?}",
        start.elapsed()
    );
    // Without a deadline it fails at once.
    let mut svc2 = svc.clone();
    let _ = svc2
        .ready()
        .await
        .unwrap()
        .call(get_with(CallOptions::new().without_retries()))
        .await;
}

/// The same open breaker with a deadline its `retry_in` does not fit: fails at once, with the
/// `CircuitOpen` found and the call not sent.
#[tokio::test(start_paused = true)]
async fn words21_breaker_retry_in_past_deadline_fails_at_once() {
    let calls = Arc::new(AtomicU32::new(0));
    let (breaker, handle) = CircuitBreakerLayer::new()
        .with_open_duration(Duration::from_secs(120), Duration::from_secs(120))
        .pair();
    let mut client = ClientBuilder::new()
        .with_circuit_breaker(breaker)
        .build(ok_api(calls.clone()));
    handle.force_open("api.example.com");
    let start = Instant::now();
    let err = client
        .ready()
        .await
        .unwrap()
        .call(get_with(
            CallOptions::new().with_deadline(Duration::from_secs(60)),
        ))
        .await
        .unwrap_err();
    assert!(
        start.elapsed() < Duration::from_millis(50),
        "{:?}",
        start.elapsed()
    );
    assert!(find::<CircuitOpen>(&*err).is_some(), "{err}");
    assert_eq!(delivery(&*err), Delivery::NotSent);
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

/// "Counting the calls ahead of it": with three calls already in line (10 s apart), a call with
/// a 25 s deadline has its turn at about 40 s and is refused at once with that wait; one with a
/// 45 s deadline waits and goes.
#[tokio::test(start_paused = true)]
async fn words21_deadline_refusal_counts_calls_ahead() {
    let calls = Arc::new(AtomicU32::new(0));
    let client = ClientBuilder::new()
        .with_rate_limit(
            quota_every(Duration::from_secs(10)).with_max_wait(Duration::from_secs(120)),
        )
        .build(ok_api(calls.clone()));
    let mut c = client.clone();
    c.ready().await.unwrap().call(get()).await.unwrap();
    let mut ahead = Vec::new();
    for _ in 0..3 {
        let mut c = client.clone();
        ahead.push(tokio::spawn(async move {
            c.ready().await.unwrap().call(get()).await.is_ok()
        }));
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(1)).await;
    let start = Instant::now();
    let mut c = client.clone();
    let err = c
        .ready()
        .await
        .unwrap()
        .call(get_with(
            CallOptions::new().with_deadline(Duration::from_secs(25)),
        ))
        .await
        .unwrap_err();
    assert!(
        start.elapsed() < Duration::from_millis(50),
        "{:?}",
        start.elapsed()
    );
    let wait = find::<RateLimited>(&*err)
        .expect("RateLimited")
        .retry_after();
    assert!(
        wait >= Duration::from_secs(35) && wait <= Duration::from_secs(40),
        "{wait:?}"
    );
    let mut c = client.clone();
    let res = c
        .ready()
        .await
        .unwrap()
        .call(get_with(
            CallOptions::new().with_deadline(Duration::from_secs(45)),
        ))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    for a in ahead {
        assert!(a.await.unwrap());
    }
    assert_eq!(calls.load(Ordering::SeqCst), 5);
}

/// A local refusal whose wait (an hour: the quota's own, not a peer's claim) is past
/// `max_retry_after`: the call fails at once, and the `RateLimited` it carries says when the
/// limiter will in fact let a call through.
#[tokio::test(start_paused = true)]
async fn words21_local_refusal_wait_reported_as_the_limiters() {
    let calls = Arc::new(AtomicU32::new(0));
    let mut svc = ServiceBuilder::new()
        .layer(RetryLayer::new().with_seed(2))
        .layer(quota_every(Duration::from_secs(3600)).with_max_wait(Duration::ZERO))
        .service(ok_api(calls.clone()));
    svc.ready().await.unwrap().call(get()).await.unwrap();
    let err = svc.ready().await.unwrap().call(get()).await.unwrap_err();
    let wait = find::<RateLimited>(&*err)
        .expect("RateLimited")
        .retry_after();
    // Come back when told: the call must go through then.
    tokio::time::sleep(wait + Duration::from_millis(1)).await;
    let out = svc
        .ready()
        .await
        .unwrap()
        .call(get_with(CallOptions::new().without_retries()))
        .await;
    assert!(
        out.is_ok(),
        "told to wait {wait:?}, then refused again: {:?}",
        out.err().map(|e| e.to_string())
    );
}
