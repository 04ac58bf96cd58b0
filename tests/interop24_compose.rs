//! Interop tests of the composed client and single layers under tower's Buffer, ConcurrencyLimit
//! and Timeout, with cancellation, against the real peers.
use crate::interop_common;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Router;
use futures_util::future::join_all;
use interop_common::*;
use sturdy::core::classify::delivery;
use sturdy::core::Delivery;
use sturdy::ratelimit::RateLimitLayer;
use sturdy::ClientBuilder;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

const NGINX: &str = "STURDY_INTEROP_NGINX_URL";
const FLAKY_RESET: &str = "STURDY_INTEROP_HAPROXY_FLAKY_RESET_URL";
const BACKEND: &str = "STURDY_INTEROP_BACKEND_URL";

fn unique(name: &str) -> String {
    use std::sync::atomic::AtomicU64;
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn assert_send_sync_clone<T: Send + Sync + Clone + 'static>(_: &T) {}

/// docs/guides/ratelimit.md: a pace learned from nginx's bare 429s is "the same GCRA as a
/// quota", and "A waiting call reserves nothing. If it is dropped ..., it leaves the line and
/// the calls behind it move up". After learning a pace from nginx (`/strict/`, 10 r/s), 40
/// calls are dropped while they wait for their slot; the next call then waits about one
/// interval of the pace, not forty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_waiters_under_a_learned_pace_cost_the_next_call_nothing() {
    let base = peer_or_skip!(NGINX);
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    let client = ClientBuilder::new().with_rate_limit(layer).build(http());
    assert_send_sync_clone(&client);
    let url = format!("{base}/strict/{}", unique("pace-drop"));
    let key = base.trim_start_matches("http://").to_string();
    // Learn a pace: 12 calls at once.
    let first: Vec<_> = join_all((0..12).map(|_| client.clone().oneshot(get(&url)))).await;
    let ok = first.iter().filter(|r| r.is_ok()).count();
    let pace = handle.learned_pace(&key);
    eprintln!("learned pace {pace:?} after 12 calls ({ok} ok)");
    let Some(pace) = pace else {
        panic!("no pace learned from nginx's bare 429s");
    };
    // Let any pause end and the pace's slot free up.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let dropped = (0..40).map(|_| {
        let c = client.clone();
        let url = url.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_millis(30), c.oneshot(get(&url))).await;
        })
    });
    join_all(dropped).await;
    let pace_now = handle.learned_pace(&key).unwrap_or(pace);
    tokio::time::sleep(pace_now).await;
    let start = Instant::now();
    let res = bounded(
        Duration::from_secs(20),
        "the call after 40 dropped waiters",
        client.clone().oneshot(get(&url)),
    )
    .await;
    let took = start.elapsed();
    eprintln!("next call after 40 dropped: {took:?}, pace {pace_now:?}, {res:?}");
    assert!(
        took < pace_now * 3 + Duration::from_millis(300),
        "waited {took:?} with a pace of {pace_now:?}"
    );
}

/// docs/guides/ratelimit.md (slow start after a pause): "a released call gives its place back
/// when it finishes, fails, is dropped or panics". The first call released after a 1 s pause
/// never gets an answer and is dropped by a `tower::timeout` around it; the calls behind it
/// go on at once, not after their `max_wait`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_call_dropped_by_an_outer_timeout_lets_the_line_move() {
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let app = Router::new().fallback(move || {
        let counter = counter.clone();
        async move {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            if n == 0 {
                return (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "1")], "").into_response();
            }
            if n == 1 {
                // The first call released after the pause: no answer, ever.
                std::future::pending::<()>().await;
            }
            (StatusCode::OK, "ok").into_response()
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let url = format!("http://{addr}/released");
    let svc = RateLimitLayer::adaptive_only().layer(http());
    let first = svc.clone().oneshot(get(&url)).await.unwrap();
    assert_eq!(first.status(), 429);
    // The one that will be released first: dropped 300 ms after the pause ends.
    let hung = {
        let svc = ServiceBuilder::new()
            .timeout(Duration::from_millis(1300))
            .service(svc.clone());
        let url = url.clone();
        tokio::spawn(async move { svc.oneshot(get(&url)).await.map(|r| r.status()) })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let start = Instant::now();
    let others = (0..5).map(|_| {
        let svc = svc.clone();
        let url = url.clone();
        tokio::spawn(async move { svc.oneshot(get(&url)).await.map(|r| r.status()) })
    });
    let results = bounded(
        Duration::from_secs(10),
        "the calls behind a dropped released call",
        join_all(others),
    )
    .await;
    let took = start.elapsed();
    for r in results {
        assert_eq!(r.unwrap().unwrap(), 200);
    }
    assert!(hung.await.unwrap().is_err(), "the hung call timed out");
    assert!(took < Duration::from_millis(2500), "took {took:?}");
}

/// The composed client under `Buffer`, a `Timeout` and `ConcurrencyLimit(1)`, kept by each of 8
/// tasks and driven with `ready().await?.call(req)` in a loop: keyed POSTs through HAProxy's
/// flaky reset (every other request reset before it reaches the origin). Every call succeeds,
/// and each key reaches the origin exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_client_under_buffer_timeout_and_limit_one_through_flaky_resets() {
    let base = peer_or_skip!(FLAKY_RESET);
    let backend = peer_or_skip!(BACKEND);
    let _serial = crate::interop_haproxy::ALTERNATING.lock().await;
    let client = ClientBuilder::new()
        .with_retry(
            sturdy::retry::RetryLayer::new().with_backoff(
                sturdy::retry::Backoff::decorrelated_jitter(
                    Duration::from_millis(5),
                    Duration::from_millis(20),
                )
                .unwrap(),
            ),
        )
        .build(http());
    let svc = ServiceBuilder::new()
        .buffer(32)
        .timeout(Duration::from_secs(10))
        .concurrency_limit(1)
        .service(client);
    let path = format!("/{}", unique("kept-flaky"));
    let tasks = (0..8).map(|_| {
        let mut svc = svc.clone();
        let url = format!("{base}{path}");
        tokio::spawn(async move {
            let mut out = vec![];
            for _ in 0..4 {
                let r = async {
                    let res = svc.ready().await?.call(post(&url, "{}")).await?;
                    Ok::<_, sturdy::core::BoxError>(res.status().as_u16())
                }
                .await;
                out.push(r.map_err(|e| chain(&*e)));
            }
            out
        })
    });
    let results = bounded(
        Duration::from_secs(20),
        "8 kept services, 4 calls each",
        join_all(tasks),
    )
    .await;
    for r in results.into_iter().flat_map(|r| r.unwrap()) {
        assert_eq!(r, Ok(200));
    }
    let seen = get_json(&format!("{backend}/count?path={path}")).await;
    let keys = seen["keys"].as_object().unwrap();
    assert_eq!(keys.len(), 32, "{seen}");
    assert!(keys.values().all(|v| v == 1), "each key once: {seen}");
}

/// A call dropped at every moment of its life (timeouts from 0 to 40 ms) against nginx's
/// `/retry-after/` (429 with `Retry-After: 1` past a burst of 5): afterwards the client still
/// works, and a call made after the pause ends is not held longer than the pause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_dropped_at_every_await_leave_the_client_working() {
    let base = peer_or_skip!(NGINX);
    let client = ClientBuilder::new().build(http());
    let url = format!("{base}/retry-after/{}", unique("drops"));
    for round in 0..3u64 {
        let tasks = (0..20u64).map(|i| {
            let c = client.clone();
            let url = url.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(
                    Duration::from_millis((i * 2 + round) % 41),
                    c.oneshot(get(&url)),
                )
                .await;
            })
        });
        join_all(tasks).await;
        // Aborted tasks too.
        let t = {
            let c = client.clone();
            let url = url.clone();
            tokio::spawn(async move { c.oneshot(get(&url)).await })
        };
        tokio::time::sleep(Duration::from_millis(3)).await;
        t.abort();
    }
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let start = Instant::now();
    let res = bounded(
        Duration::from_secs(10),
        "a call after many dropped ones",
        client.clone().oneshot(get(&url)),
    )
    .await
    .unwrap_or_else(|e| panic!("{}", chain(&*e)));
    assert_eq!(res.status(), 200);
    assert!(
        start.elapsed() < Duration::from_millis(1500),
        "{:?}",
        start.elapsed()
    );
}

/// docs/guides/ratelimit.md: "Zero `max_wait`: the layer never waits" and, in a `ClientBuilder`
/// stack, a refused call "was not sent". Against nginx's `/retry-after/` after a pause: every
/// refusal says `RateLimited` and `NotSent`, and comes at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_max_wait_refusals_are_immediate_and_not_sent() {
    let base = peer_or_skip!(NGINX);
    let client = ClientBuilder::new()
        .without_retry()
        .with_rate_limit(RateLimitLayer::adaptive_only().with_max_wait(Duration::ZERO))
        .build(http());
    let url = format!("{base}/retry-after/{}", unique("zero-wait"));
    // Burst 5, then 429 with Retry-After: 1.
    let first: Vec<_> = join_all((0..10).map(|_| client.clone().oneshot(get(&url)))).await;
    assert!(
        first
            .iter()
            .any(|r| matches!(r, Ok(res) if res.status() == 429)),
        "nginx refused some"
    );
    let start = Instant::now();
    let err = client.clone().oneshot(post(&url, "{}")).await.unwrap_err();
    let took = start.elapsed();
    eprintln!("zero max_wait refusal: {err}");
    // At once: well under the 1 s the Retry-After asks for.
    assert!(took < Duration::from_millis(300), "{took:?}");
    assert_eq!(delivery(&*err), Delivery::NotSent, "{}", chain(&*err));
    assert!(
        sturdy::core::find::<sturdy::core::RateLimited>(&*err).is_some(),
        "{}",
        chain(&*err)
    );
    let text = err.to_string();
    assert!(text.contains("rate limited"), "{text}");
    assert!(!text.contains("may have been processed"), "{text}");
}

/// tower's own `Timeout` under the client (around the HTTP client given to `build`), against
/// HAProxy's stall: its `Elapsed` is a timeout as the shared classification reads it (docs/guides/
/// retry.md: "Retried: ... timeouts"), so a GET is retried to its last attempt and an unkeyed
/// POST is not retried and "may have been processed".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn towers_timeout_under_the_client_is_a_timeout() {
    let stall = peer_or_skip!("STURDY_INTEROP_HAPROXY_STALL_URL");
    let (wire_svc, wire) = recorded(http());
    let inner = ServiceBuilder::new()
        .timeout(Duration::from_millis(150))
        .service(wire_svc);
    let client = ClientBuilder::new()
        .without_idempotency()
        .without_attempt_timeout()
        .with_retry(
            sturdy::retry::RetryLayer::new().with_backoff(
                sturdy::retry::Backoff::decorrelated_jitter(
                    Duration::from_millis(5),
                    Duration::from_millis(20),
                )
                .unwrap(),
            ),
        )
        .build(inner);
    let err = bounded(
        Duration::from_secs(5),
        "a GET through tower's Timeout",
        client
            .clone()
            .oneshot(get(&format!("{stall}/tower-timeout"))),
    )
    .await
    .unwrap_err();
    eprintln!("tower timeout GET: {err}");
    assert_eq!(
        sturdy::core::classify::classify_error(&*err),
        sturdy::core::ErrorKind::Timeout,
        "{}",
        chain(&*err)
    );
    let e = err
        .downcast_ref::<sturdy::core::Error>()
        .expect("sturdy error");
    assert_eq!(e.report().map(|r| r.attempts()), Some(4), "{err}");
    let before = wire.len();
    let err = bounded(
        Duration::from_secs(5),
        "a POST through tower's Timeout",
        client
            .clone()
            .oneshot(post(&format!("{stall}/tower-timeout"), "{}")),
    )
    .await
    .unwrap_err();
    eprintln!("tower timeout POST: {err}");
    let e = err
        .downcast_ref::<sturdy::core::Error>()
        .expect("sturdy error");
    assert_eq!(e.report().map(|r| r.attempts()), Some(1), "{err}");
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed, "{err}");
    assert!(err.to_string().contains("may have been processed"), "{err}");
    let _ = before;
}
