//! Interop: the breaker, the adaptive concurrency limit and coalescing against HAProxy's 504
//! frontend and json-server.
use crate::interop_common;
use std::time::Duration;

use futures_util::future::join_all;
use futures_util::TryStreamExt;
use http_body_util::BodyExt;
use interop_common::*;
use sturdy::circuit::CircuitBreakerLayer;
use sturdy::concurrency::AdaptiveConcurrencyLayer;
use sturdy::core::classify::delivery;
use sturdy::core::Delivery;
use sturdy::paginate::{LinkHeader, Paginate};
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::ClientBuilder;
use tokio::time::Instant;
use tower::{Layer, ServiceExt};

const GATEWAY_TIMEOUT: &str = "STURDY_INTEROP_HAPROXY_GATEWAY_TIMEOUT_URL";
const JSON_SERVER: &str = "STURDY_INTEROP_JSON_SERVER_URL";

/// docs/guides/concurrency.md: "A call admitted before the last decrease cannot cause another
/// one, so fifty 503s from one burst lower the limit once." 50 GETs at once through the
/// adaptive limit (initial 60, so all are admitted together) to HAProxy's 504 frontend: the
/// limit is lowered once (to 54).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_burst_of_gateway_timeouts_lowers_the_limit_once() {
    let base = peer_or_skip!(GATEWAY_TIMEOUT);
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_initial_limit(60)
        .pair();
    let svc = layer.layer(http());
    let url = format!("{base}/aimd-burst");
    let results = bounded(
        Duration::from_secs(10),
        "50 GETs to the 504 frontend",
        join_all((0..50).map(|_| svc.clone().oneshot(get(&url)))),
    )
    .await;
    for r in &results {
        assert_eq!(r.as_ref().map(|r| r.status().as_u16()).ok(), Some(504));
    }
    let key = base.trim_start_matches("http://");
    let limit = handle.limit(key);
    eprintln!("limit after one burst of 504s: {limit:?}");
    assert_eq!(limit, Some(54), "lowered once from 60");
}

/// A breaker that opens after 3 failures, under the retry layer, against HAProxy's 504: the
/// GET's fourth try is refused by the open breaker and the call fails at once. The message
/// counts 3 attempts and 1 refused try, names the 504, and the delivery is "maybe".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_opening_mid_call_is_told_truthfully() {
    let base = peer_or_skip!(GATEWAY_TIMEOUT);
    let client = ClientBuilder::new()
        .with_retry(
            RetryLayer::new().with_backoff(
                Backoff::decorrelated_jitter(Duration::from_millis(5), Duration::from_millis(20))
                    .unwrap(),
            ),
        )
        .with_circuit_breaker(CircuitBreakerLayer::new().with_consecutive_failures(3))
        .build(http());
    let start = Instant::now();
    let out = bounded(
        Duration::from_secs(10),
        "a GET meeting an opening breaker",
        client
            .clone()
            .oneshot(post(&format!("{base}/breaker-mid"), "{}")),
    )
    .await;
    let took = start.elapsed();
    match out {
        Ok(res) => panic!("expected an error, got {}", res.status()),
        Err(err) => {
            let text = err.to_string();
            eprintln!("breaker mid call: {text} after {took:?}");
            assert_eq!(delivery(&*err), Delivery::MaybeProcessed, "{text}");
            assert!(
                text.starts_with("gave up after 3 attempts and 1 refused try: 504"),
                "{text}"
            );
            assert!(text.contains("may have been processed"), "{text}");
            assert!(
                sturdy::core::find::<sturdy::core::CircuitOpen>(&*err).is_some(),
                "{}",
                chain(&*err)
            );
        }
    }
    assert!(took < Duration::from_millis(1500), "{took:?}");
    // The breaker is open now: the next call fails at once, and its message says why and when
    // (docs/guides/circuit.md: `Failing` ("it has been failing ... try again in 12s")).
    let err = client
        .clone()
        .oneshot(get(&format!("{base}/breaker-mid")))
        .await
        .unwrap_err();
    let text = err.to_string();
    eprintln!("breaker open: {text}");
    assert!(text.contains("failing"), "{text}");
    assert!(text.contains("try again in"), "{text}");
    assert_eq!(delivery(&*err), Delivery::NotSent, "{text}");
}

/// `ClientBuilder::with_coalesce` as the service of a pager: 8 walks at once over json-server
/// all get the 100 items, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_walks_through_a_coalescing_client() {
    let base = peer_or_skip!(JSON_SERVER);
    let client = ClientBuilder::new()
        .with_coalesce(sturdy::coalesce::CoalesceLayer::new())
        .build(http());
    let walks = (0..8).map(|_| {
        let pager = Paginate::builder(
            client.clone(),
            &format!("{base}/items?_page=1"),
            LinkHeader::new("").with_limit_param("_limit"),
        )
        .with_page_size(10)
        .build()
        .unwrap();
        async move {
            let items: Vec<serde_json::Value> = pager.items().try_collect().await?;
            Ok::<_, sturdy::core::Error>(
                items
                    .iter()
                    .map(|v| v["id"].as_u64().unwrap())
                    .collect::<Vec<_>>(),
            )
        }
    });
    let all = bounded(Duration::from_secs(15), "8 walks", join_all(walks)).await;
    for ids in all {
        assert_eq!(
            ids.unwrap_or_else(|e| panic!("{e}")),
            (1..=100).collect::<Vec<u64>>()
        );
    }
}

const BACKEND: &str = "STURDY_INTEROP_BACKEND_URL";

async fn backend_hits(backend: &str, path: &str) -> u64 {
    get_json(&format!("{backend}/count?path={path}")).await["hits"]
        .as_u64()
        .unwrap()
}

/// docs/guides/coalesce.md: "When the last caller leaves, the upstream call is dropped ... The
/// next identical request starts afresh." Five identical GETs to the origin's 300 ms path, all
/// dropped after 50 ms; the next one starts its own call and is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalesced_call_left_by_everyone_starts_afresh() {
    let backend = peer_or_skip!(BACKEND);
    let (layer, handle) = sturdy::coalesce::CoalesceLayer::new().pair();
    let svc = layer.layer(http());
    let path = format!("/slow-300-i24-left-{}", std::process::id());
    let url = format!("{backend}{path}");
    let callers = (0..5).map(|_| {
        let svc = svc.clone();
        let url = url.clone();
        tokio::spawn(async move {
            tokio::time::timeout(Duration::from_millis(50), svc.oneshot(get(&url)))
                .await
                .is_err()
        })
    });
    for dropped in join_all(callers).await {
        assert!(dropped.unwrap());
    }
    let start = Instant::now();
    let res = bounded(
        Duration::from_secs(5),
        "the identical call after everyone left",
        svc.clone().oneshot(get(&url)),
    )
    .await
    .unwrap_or_else(|e| panic!("{}", chain(&*e)));
    assert_eq!(res.status(), 200);
    assert!(
        start.elapsed() >= Duration::from_millis(250),
        "a call of its own"
    );
    let stats = handle.stats();
    assert_eq!(stats.upstream(), 2, "{stats:?}");
    assert_eq!(backend_hits(&backend, &path).await, 2);
}

/// docs/guides/coalesce.md ("Above the bound"): "If the caller that started the call has gone,
/// the first other caller to look gets the response instead", and every other caller sends its
/// own request. A bound of 8 bytes (the origin's answer is longer); the caller that started the
/// call is dropped after 50 ms; the two who joined both get a 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_response_goes_to_a_joiner_when_the_starter_left() {
    let backend = peer_or_skip!(BACKEND);
    let (layer, handle) = sturdy::coalesce::CoalesceLayer::new()
        .with_max_body(8)
        .pair();
    let svc = layer.layer(http());
    let path = format!("/slow-300-i24-big-{}", std::process::id());
    let url = format!("{backend}{path}");
    let starter = {
        let svc = svc.clone();
        let url = url.clone();
        tokio::spawn(async move {
            tokio::time::timeout(Duration::from_millis(50), svc.oneshot(get(&url))).await
        })
    };
    tokio::time::sleep(Duration::from_millis(10)).await;
    let joiners = (0..2).map(|_| {
        let svc = svc.clone();
        let url = url.clone();
        tokio::spawn(async move {
            let res = svc.oneshot(get(&url)).await?;
            let status = res.status();
            let body = res.into_body().collect().await?.to_bytes();
            Ok::<_, sturdy::core::BoxError>((status, body))
        })
    });
    let results = bounded(Duration::from_secs(5), "two joiners", join_all(joiners)).await;
    assert!(starter.await.unwrap().is_err(), "the starter was dropped");
    for r in results {
        let (status, body) = r.unwrap().unwrap_or_else(|e| panic!("{}", chain(&*e)));
        assert_eq!(status, 200);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["path"], path.as_str());
    }
    let stats = handle.stats();
    eprintln!(
        "{stats:?}, origin hits {}",
        backend_hits(&backend, &path).await
    );
    assert!(backend_hits(&backend, &path).await <= 2);
}

/// docs/guides/concurrency.md: "A maximum wait of zero sheds load instead: a call that finds the
/// limit full fails at once", "without being sent", and docs/guides/retry.md: a POST is retried
/// "when the failure proves the request never left", and "report() gives the number of attempts
/// (sent on, so 0 when every try was refused)". A limit of 1 held by a 1.5 s GET to the origin:
/// an unkeyed POST meanwhile is refused on every try, never reaches the origin, and the error
/// says it was not sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shed_post_is_told_not_sent_with_no_attempts() {
    let backend = peer_or_skip!(BACKEND);
    let client = ClientBuilder::new()
        .without_idempotency()
        .with_retry(
            RetryLayer::new().with_backoff(
                Backoff::decorrelated_jitter(Duration::from_millis(5), Duration::from_millis(20))
                    .unwrap(),
            ),
        )
        .with_adaptive_concurrency(
            AdaptiveConcurrencyLayer::new()
                .with_limits(1, 1)
                .with_initial_limit(1)
                .with_max_wait(Duration::ZERO),
        )
        .build(http());
    let slow = format!("{backend}/slow-1500-i24-shed-{}", std::process::id());
    let holder = tokio::spawn(client.clone().oneshot(get(&slow)));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let path = format!("/i24-shed-post-{}", std::process::id());
    let start = Instant::now();
    let err = bounded(
        Duration::from_secs(5),
        "a POST meeting a full limit",
        client
            .clone()
            .oneshot(post(&format!("{backend}{path}"), "{}")),
    )
    .await
    .unwrap_err();
    let took = start.elapsed();
    let text = err.to_string();
    eprintln!("shed POST: {text} ({took:?})");
    assert!(took < Duration::from_millis(1000), "{took:?}");
    assert_eq!(backend_hits(&backend, &path).await, 0);
    assert_eq!(delivery(&*err), Delivery::NotSent, "{text}");
    assert!(!text.contains("may have been processed"), "{text}");
    assert!(text.contains("not sent"), "{text}");
    let e = err
        .downcast_ref::<sturdy::core::Error>()
        .expect("a sturdy error");
    assert_eq!(e.report().map(|r| r.attempts()), Some(0), "{text}");
    assert_eq!(holder.await.unwrap().unwrap().status(), 200);
}

/// docs/guides/paginate.md: "`with_page_timeout` ... one page, from the request to the last byte
/// of the body, retries of the inner stack included"; "A page that does not arrive within the
/// page timeout fails with kind `Timeout`". A pager over the default client (whose attempts may
/// each take 30 s) against HAProxy's stall: the walk fails at the 500 ms page timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_timeout_covers_the_inner_retries_against_a_stall() {
    let stall = peer_or_skip!("STURDY_INTEROP_HAPROXY_STALL_URL");
    let pager = Paginate::builder(
        ClientBuilder::new().build(http()),
        &format!("{stall}/items"),
        LinkHeader::new(""),
    )
    .with_page_timeout(Duration::from_millis(500))
    .build()
    .unwrap();
    let start = Instant::now();
    let err = bounded(
        Duration::from_secs(5),
        "a walk against a stall",
        pager.items().try_collect::<Vec<_>>(),
    )
    .await
    .unwrap_err();
    let took = start.elapsed();
    eprintln!("page timeout: {err} ({took:?})");
    assert_eq!(err.kind(), &sturdy::core::ErrorKind::Timeout, "{err}");
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_millis(1500),
        "{took:?}"
    );
}

/// docs/guides/circuit.md: "Open 30 s, doubling on each re-opening up to 5 min
/// (`.with_open_duration(base, max)`), back to 30 s after a close." Scaled down (200 ms, at most
/// 700 ms) against a server of the test's own that fails until told otherwise: the open periods
/// a caller is told are 200, 400, 700 ms; after a probe succeeds and the breaker closes, the next
/// opening is 200 ms again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_periods_double_to_the_cap_and_reset_after_a_close() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let healthy = Arc::new(AtomicBool::new(false));
    let flag = healthy.clone();
    let app = axum::Router::new().fallback(move || {
        let flag = flag.clone();
        async move {
            if flag.load(Ordering::SeqCst) {
                (axum::http::StatusCode::OK, "ok")
            } else {
                (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "down")
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let url = format!("http://{addr}/breaker");
    let svc = CircuitBreakerLayer::new()
        .with_consecutive_failures(2)
        .with_open_duration(Duration::from_millis(200), Duration::from_millis(700))
        .layer(http());
    let mut periods = vec![];
    let first = until_open(svc.clone(), &url).await;
    periods.push(first);
    for _ in 0..3 {
        tokio::time::sleep(*periods.last().unwrap() + Duration::from_millis(20)).await;
        // The probe fails: reopened, longer.
        periods.push(until_open(svc.clone(), &url).await);
    }
    eprintln!("open periods while failing: {periods:?}");
    let near = |d: Duration, ms: u64| d.as_millis().abs_diff(ms as u128) <= 60;
    assert!(near(periods[0], 200), "{periods:?}");
    assert!(near(periods[1], 400), "{periods:?}");
    assert!(near(periods[2], 700), "{periods:?}");
    assert!(near(periods[3], 700), "{periods:?}");
    healthy.store(true, Ordering::SeqCst);
    tokio::time::sleep(periods[3] + Duration::from_millis(20)).await;
    let res = svc.clone().oneshot(get(&url)).await.unwrap();
    assert_eq!(res.status(), 200, "the probe closes it");
    healthy.store(false, Ordering::SeqCst);
    let after_close = until_open(svc.clone(), &url).await;
    eprintln!("open period after a close: {after_close:?}");
    assert!(near(after_close, 200), "{after_close:?}");
}

/// Calls until one is refused by an open breaker; returns the refusal's `retry_in`.
async fn until_open<S, B>(svc: S, url: &str) -> Duration
where
    S: tower::Service<
            http::Request<http_body_util::Full<bytes::Bytes>>,
            Response = http::Response<B>,
        > + Clone,
    S::Error: Into<sturdy::core::BoxError>,
{
    for _ in 0..10 {
        match svc.clone().oneshot(get(url)).await {
            Ok(_) => continue,
            Err(e) => {
                let e: sturdy::core::BoxError = e.into();
                let open = sturdy::core::find::<sturdy::core::CircuitOpen>(&*e)
                    .unwrap_or_else(|| panic!("{}", chain(&*e)));
                return open.retry_in();
            }
        }
    }
    panic!("never opened");
}

/// docs/guides/hedge.md against the origin: "Nothing is hedged until the recent windows hold 100
/// samples"; then a GET slower than the host's p95 gets a second copy (both reach the origin);
/// a POST without a key is never hedged; the delay stays within its bounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedging_on_the_wire_after_enough_samples() {
    let backend = peer_or_skip!(BACKEND);
    let (layer, handle) = sturdy::hedge::HedgeLayer::new().pair();
    let svc = layer.layer(http());
    let key = backend.trim_start_matches("http://").to_string();
    let pid = std::process::id();
    // 50 samples: not enough; a slow call is not hedged.
    for i in 0..50 {
        let res = svc
            .clone()
            .oneshot(get(&format!("{backend}/i24-fast-{pid}-{i}")))
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
    assert_eq!(handle.stats(&key).and_then(|s| s.delay()), None);
    let early = format!("/slow-200-i24-early-{pid}");
    svc.clone()
        .oneshot(get(&format!("{backend}{early}")))
        .await
        .unwrap();
    assert_eq!(backend_hits(&backend, &early).await, 1, "not hedged yet");
    for i in 50..130 {
        svc.clone()
            .oneshot(get(&format!("{backend}/i24-fast-{pid}-{i}")))
            .await
            .unwrap();
    }
    let delay = handle.stats(&key).and_then(|s| s.delay());
    eprintln!("hedge delay after 130 samples: {delay:?}");
    let delay = delay.expect("a delay once 100 samples are in");
    assert!(delay >= Duration::from_millis(1) && delay <= Duration::from_secs(10));
    let slow = format!("/slow-300-i24-late-{pid}");
    let start = Instant::now();
    let res = svc
        .clone()
        .oneshot(get(&format!("{backend}{slow}")))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(start.elapsed() < Duration::from_millis(800));
    // Let the loser's request land at the origin before counting.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(backend_hits(&backend, &slow).await, 2, "hedged once");
    let post_path = format!("/slow-300-i24-post-{pid}");
    let res = svc
        .clone()
        .oneshot(post(&format!("{backend}{post_path}"), "{}"))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        backend_hits(&backend, &post_path).await,
        1,
        "POST not hedged"
    );
    let stats = handle.stats(&key).unwrap();
    // Fast calls slower than a 1 ms p95 may be hedged too; the budget bounds them.
    assert!(
        stats.hedges() >= 1 && stats.hedges() as f64 <= stats.calls() as f64 * 0.05 + 10.0,
        "{stats:?}"
    );
}

/// Coalescing across runtimes: a shared call started on a runtime that is then dropped (its
/// connection task goes with it) while a caller on another runtime has joined it. Nothing may
/// hang ("not a hang", docs/guides/coalesce.md): the joined caller gets an answer or an error
/// in bounded time, and the next identical call is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_call_whose_runtime_is_dropped() {
    let backend = peer_or_skip!(BACKEND);
    let svc = sturdy::coalesce::CoalesceLayer::new().layer(http());
    let path = format!("/slow-600-i24-rt-{}", std::process::id());
    let url = format!("{backend}{path}");
    let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
    let (drop_tx, drop_rx) = std::sync::mpsc::channel::<()>();
    let thread = {
        let svc = svc.clone();
        let url = url.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            rt.spawn(async move {
                let _ = svc.oneshot(get(&url)).await;
            });
            rt.block_on(async { tokio::time::sleep(Duration::from_millis(100)).await });
            started_tx.send(()).unwrap();
            drop_rx.recv().unwrap();
            drop(rt);
        })
    };
    started_rx.recv().unwrap();
    let joined = tokio::spawn({
        let svc = svc.clone();
        let url = url.clone();
        async move {
            let res = svc.oneshot(get(&url)).await?;
            let status = res.status();
            res.into_body().collect().await?;
            Ok::<_, sturdy::core::BoxError>(status)
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop_tx.send(()).unwrap();
    thread.join().unwrap();
    let out = bounded(
        Duration::from_secs(5),
        "the caller that joined a call whose runtime was dropped",
        joined,
    )
    .await
    .unwrap();
    match &out {
        Ok(status) => eprintln!("joined caller: {status}"),
        Err(e) => eprintln!(
            "joined caller: {} ({:?}, {:?}); origin hits {}",
            chain(&**e),
            sturdy::core::classify::classify_error(&**e),
            delivery(&**e),
            backend_hits(&backend, &path).await
        ),
    }
    let res = bounded(
        Duration::from_secs(5),
        "the next identical call",
        svc.clone().oneshot(get(&url)),
    )
    .await
    .unwrap_or_else(|e| panic!("{}", chain(&*e)));
    assert_eq!(res.status(), 200);
}
