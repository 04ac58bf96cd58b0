//! Outside tests of the server idempotency layer against docs/guides/idempotency.md, in process
//! on paused time (the layer and an axum router driven with `oneshot`), plus the composed client
//! against it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use sturdy::idempotency::server::{problem, ByCredentials, IdempotencyLayer, MemoryStore};
use tower::ServiceExt;

#[derive(Clone, Default)]
struct Runs {
    slow: Arc<AtomicUsize>,
    fast: Arc<AtomicUsize>,
    fail: Arc<AtomicUsize>,
    big: Arc<AtomicUsize>,
    boom: Arc<AtomicUsize>,
    busy: Arc<AtomicUsize>,
}

fn app(runs: &Runs, layer: IdempotencyLayer<MemoryStore>) -> Router {
    let r = runs.clone();
    let slow = {
        let r = r.clone();
        move |body: Bytes| {
            let r = r.clone();
            async move {
                r.slow.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(2)).await;
                (
                    StatusCode::CREATED,
                    [("x-order", "1")],
                    format!("created {}", body.len()),
                )
            }
        }
    };
    let fast = {
        let r = r.clone();
        move || {
            let r = r.clone();
            async move {
                let n = r.fast.fetch_add(1, Ordering::SeqCst);
                (StatusCode::CREATED, format!("order {n}"))
            }
        }
    };
    let fail = {
        let r = r.clone();
        move || {
            let r = r.clone();
            async move {
                r.fail.fetch_add(1, Ordering::SeqCst);
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    };
    let busy = {
        let r = r.clone();
        move || {
            let r = r.clone();
            async move {
                r.busy.fetch_add(1, Ordering::SeqCst);
                StatusCode::TOO_MANY_REQUESTS
            }
        }
    };
    let big = {
        let r = r.clone();
        move || {
            let r = r.clone();
            async move {
                r.big.fetch_add(1, Ordering::SeqCst);
                "z".repeat(2 * 1024 * 1024)
            }
        }
    };
    let boom = {
        move || {
            let r = r.clone();
            async move {
                if r.boom.fetch_add(1, Ordering::SeqCst) == 0 {
                    panic!("handler panicked on purpose");
                }
                "fine"
            }
        }
    };
    Router::new()
        .route("/slow", post(slow))
        .route("/orders", post(fast.clone()).get(fast))
        .route("/fail", post(fail))
        .route("/busy", post(busy))
        .route("/big", post(big))
        .route("/boom", post(boom))
        .route("/read", get(|| async { "read" }))
        .layer(layer)
}

fn layer() -> IdempotencyLayer<MemoryStore> {
    IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default())
}

fn req(method: &str, uri: &str, key: Option<&str>, body: &'static str) -> Request<Body> {
    let mut b = Request::builder()
        .method(method)
        .uri(uri)
        .header("authorization", "Bearer a");
    if let Some(k) = key {
        b = b.header("idempotency-key", k);
    }
    b.body(Body::from(body)).unwrap()
}

async fn send(app: &Router, r: Request<Body>) -> (StatusCode, http::HeaderMap, String) {
    let res = app.clone().oneshot(r).await.unwrap();
    let (p, b) = res.into_parts();
    let b = b.collect().await.unwrap().to_bytes();
    (
        p.status,
        p.headers,
        String::from_utf8_lossy(&b).into_owned(),
    )
}

fn problem_type(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["type"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

#[tokio::test(start_paused = true)]
async fn replay_conflict_reuse_and_scope() {
    let runs = Runs::default();
    let app = app(&runs, layer());
    let (s, h, b) = send(&app, req("POST", "/orders", Some("k1"), "{}")).await;
    assert_eq!((s, b.as_str()), (StatusCode::CREATED, "order 0"));
    assert!(!h.contains_key("idempotent-replayed"));
    let (s, h, b) = send(&app, req("POST", "/orders", Some("k1"), "{}")).await;
    assert_eq!((s, b.as_str()), (StatusCode::CREATED, "order 0"));
    assert_eq!(h.get("idempotent-replayed").unwrap(), "true");
    assert_eq!(runs.fast.load(Ordering::SeqCst), 1);
    for (m, u, body) in [
        ("POST", "/orders?x=1", "{}"),
        ("POST", "/orders", "{\"a\":1}"),
        ("PATCH", "/orders", "{}"),
    ] {
        let (s, h, b) = send(&app, req(m, u, Some("k1"), body)).await;
        if m == "PATCH" && s == StatusCode::METHOD_NOT_ALLOWED {
            continue;
        }
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{m} {u} {body}: {b}");
        assert_eq!(problem_type(&b), problem::KEY_REUSED);
        assert_eq!(h.get("content-type").unwrap(), "application/problem+json");
    }
    // Another client, same key: its own run.
    let mut r = req("POST", "/orders", Some("k1"), "{}");
    r.headers_mut()
        .insert("authorization", "Bearer b".parse().unwrap());
    let (s, _, b) = send(&app, r).await;
    assert_eq!((s, b.as_str()), (StatusCode::CREATED, "order 1"));
    // GET passes through.
    let (s, _, _) = send(&app, req("GET", "/orders", Some("k1"), "")).await;
    assert_eq!(s, StatusCode::CREATED);
}

#[tokio::test(start_paused = true)]
async fn invalid_keys_are_400() {
    let runs = Runs::default();
    let app = app(&runs, layer());
    let k255 = "k".repeat(255);
    let (s, _, _) = send(&app, req("POST", "/orders", Some(&k255), "{}")).await;
    assert_eq!(s, StatusCode::CREATED);
    let k256 = "k".repeat(256);
    for bad in [k256.as_str(), "", "has space", "tab\there"] {
        let (s, _, b) = send(&app, req("POST", "/orders", Some(bad), "{}")).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad:?}: {b}");
        assert_eq!(problem_type(&b), problem::INVALID_KEY, "{bad:?}");
    }
    // A non-ASCII byte in the key.
    let mut r = req("POST", "/orders", None, "{}");
    r.headers_mut().insert(
        "idempotency-key",
        http::HeaderValue::from_bytes(b"k\xe9y").unwrap(),
    );
    let (s, _, _) = send(&app, r).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    // Two key headers that disagree: which one is used must not be a guess.
    let mut r = req("POST", "/orders", Some("k-a"), "{}");
    r.headers_mut()
        .append("idempotency-key", "k-b".parse().unwrap());
    let (s, _, b) = send(&app, r).await;
    eprintln!("two different keys: {s} {b}");
    assert!(s == StatusCode::BAD_REQUEST || s == StatusCode::CREATED);
}

/// Hostile key: a request carrying two different `Idempotency-Key` headers is refused with 400.
/// Run under one of them, a proxy or client library that appends a header instead of replacing
/// it would make the key depend on which line each party reads, and a retry carrying the other
/// key order would run the handler twice.
#[tokio::test(start_paused = true)]
async fn two_different_key_headers_are_refused() {
    let runs = Runs::default();
    let app = app(&runs, layer());
    let mut r = req("POST", "/orders", Some("k-a"), "{}");
    r.headers_mut()
        .append("idempotency-key", "k-b".parse().unwrap());
    let (s1, _, _) = send(&app, r).await;
    let mut r = req("POST", "/orders", Some("k-b"), "{}");
    r.headers_mut()
        .append("idempotency-key", "k-a".parse().unwrap());
    let (s2, h2, _) = send(&app, r).await;
    eprintln!(
        "first {s1}, second (keys swapped) {s2}, replayed {:?}",
        h2.get("idempotent-replayed")
    );
    assert!(
        s1 == StatusCode::BAD_REQUEST || runs.fast.load(Ordering::SeqCst) <= 1,
        "the same two keys in another order ran the handler {} times",
        runs.fast.load(Ordering::SeqCst)
    );
}

#[tokio::test(start_paused = true)]
async fn required_key_and_body_limit() {
    let runs = Runs::default();
    let app = app(&runs, layer().with_require_key(true).with_body_limit(10));
    let (s, _, b) = send(&app, req("POST", "/orders", None, "{}")).await;
    assert_eq!(
        (s, problem_type(&b)),
        (StatusCode::BAD_REQUEST, problem::MISSING_KEY.to_owned())
    );
    let (s, _, b) = send(&app, req("POST", "/orders", Some("k"), "01234567890123")).await;
    assert_eq!(
        (s, problem_type(&b)),
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            problem::BODY_TOO_LARGE.to_owned()
        )
    );
    assert_eq!(runs.fast.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn a_client_that_goes_away_does_not_stop_the_handler() {
    let runs = Runs::default();
    let app = app(&runs, layer());
    let r = tokio::time::timeout(
        Duration::from_millis(500),
        app.clone().oneshot(req("POST", "/slow", Some("s1"), "abc")),
    )
    .await;
    assert!(r.is_err());
    let (s, h, b) = send(&app, req("POST", "/slow", Some("s1"), "abc")).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(h.get("retry-after").unwrap(), "1");
    assert_eq!(problem_type(&b), problem::IN_FLIGHT);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (s, h, b) = send(&app, req("POST", "/slow", Some("s1"), "abc")).await;
    assert_eq!((s, b.as_str()), (StatusCode::CREATED, "created 3"));
    assert_eq!(h.get("x-order").unwrap(), "1");
    assert_eq!(h.get("idempotent-replayed").unwrap(), "true");
    assert_eq!(runs.slow.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn five_xx_and_429_are_not_stored_and_big_responses_are_not_rerun() {
    let runs = Runs::default();
    let app = app(&runs, layer());
    for _ in 0..2 {
        let (s, _, _) = send(&app, req("POST", "/fail", Some("f"), "{}")).await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
        let (s, _, _) = send(&app, req("POST", "/busy", Some("b"), "{}")).await;
        assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    }
    assert_eq!(runs.fail.load(Ordering::SeqCst), 2);
    assert_eq!(runs.busy.load(Ordering::SeqCst), 2);
    let (s, _, b) = send(&app, req("POST", "/big", Some("g"), "{}")).await;
    eprintln!("big first: {s} {}", b.len());
    let (s, _, b) = send(&app, req("POST", "/big", Some("g"), "{}")).await;
    assert_eq!(
        (s, problem_type(&b)),
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            problem::RESPONSE_TOO_LARGE.to_owned()
        )
    );
    assert_eq!(runs.big.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_panicking_handler_releases_its_key() {
    let runs = Runs::default();
    let app = app(&runs, layer());
    let r = tokio::spawn({
        let app = app.clone();
        async move { app.oneshot(req("POST", "/boom", Some("p"), "{}")).await }
    })
    .await;
    assert!(r.is_err(), "the panic resumes in the request's future");
    let (s, _, b) = send(&app, req("POST", "/boom", Some("p"), "{}")).await;
    assert_eq!((s, b.as_str()), (StatusCode::OK, "fine"));
}

#[tokio::test(start_paused = true)]
async fn invalid_settings_are_errors() {
    assert!(layer().with_ttl(Duration::ZERO).is_err());
    assert!(layer().with_lease(Duration::from_micros(999)).is_err());
    assert!(MemoryStore::new(0).is_err());
    assert!(layer().with_ttl(Duration::MAX).is_ok());
}

/// Huge but accepted TTL and lease must not panic on a request.
#[tokio::test(start_paused = true)]
async fn huge_ttl_and_lease_do_not_panic() {
    for l in [
        layer().with_ttl(Duration::MAX).unwrap(),
        layer().with_lease(Duration::MAX).unwrap(),
        layer()
            .with_ttl(Duration::from_secs(u64::MAX / 2))
            .unwrap()
            .with_lease(Duration::from_secs(u64::MAX / 2))
            .unwrap(),
    ] {
        let runs = Runs::default();
        let app = app(&runs, l);
        let r = tokio::spawn(async move {
            let a = send(&app, req("POST", "/orders", Some("t"), "{}")).await;
            let b = send(&app, req("POST", "/orders", Some("t"), "{}")).await;
            (a.0, b.0)
        })
        .await;
        assert!(r.is_ok(), "a request panicked with a huge ttl or lease");
    }
}

/// The composed client (keys, retries, attempt timeout) against the layer: a POST whose first
/// attempt times out while the handler runs gets the stored response; the handler ran once.
#[tokio::test(start_paused = true)]
async fn composed_client_timeout_mid_handler_runs_once() {
    let runs = Runs::default();
    let router = app(&runs, layer());
    let http = tower::service_fn(move |r: Request<Full<Bytes>>| {
        let router = router.clone();
        async move {
            let (p, b) = r.into_parts();
            let res = router
                .oneshot(Request::from_parts(p, Body::new(b)))
                .await
                .unwrap();
            let (p, b) = res.into_parts();
            let b = b
                .collect()
                .await
                .map_err(|e| Box::new(e) as sturdy::core::BoxError)?
                .to_bytes();
            Ok::<_, sturdy::core::BoxError>(Response::from_parts(p, Full::new(b)))
        }
    });
    let client = sturdy::ClientBuilder::new()
        .with_retry(
            sturdy::retry::RetryLayer::new()
                .with_seed(4)
                .with_deadline(Duration::from_secs(30)),
        )
        .with_attempt_timeout(Duration::from_millis(500))
        .build(http);
    let res = client
        .oneshot(
            Request::post("http://api.example.com/slow")
                .header("authorization", "Bearer a")
                .body(Full::from("abc"))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(res.headers().get("idempotent-replayed").unwrap(), "true");
    assert_eq!(runs.slow.load(Ordering::SeqCst), 1);
}
