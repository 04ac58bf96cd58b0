//! Deeper edges of the server idempotency layer (docs/guides/idempotency.md, the
//! `sturdy_idempotency::server` rustdoc): lease renewal under a slow handler, response bodies
//! that fail or sit exactly at the limit, request bodies that cannot be read, repeated response
//! headers on replay, structured-field keys, and a concurrency limit inside the layer.
#![cfg(feature = "full")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use sturdy::idempotency::server::{problem, ByCredentials, IdempotencyLayer, MemoryStore};
use tower::ServiceExt;

type Hits = Arc<AtomicUsize>;

fn layer() -> IdempotencyLayer<MemoryStore> {
    IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default())
}

fn order(key: &str, body: &'static str) -> Request<Body> {
    Request::post("/orders")
        .header("idempotency-key", key)
        .body(Body::from(body))
        .unwrap()
}

async fn send(app: &Router, r: Request<Body>) -> (StatusCode, http::HeaderMap, Vec<u8>) {
    let res = app.clone().oneshot(r).await.unwrap();
    let (p, b) = res.into_parts();
    let b = axum::body::to_bytes(b, usize::MAX)
        .await
        .map(|b| b.to_vec())
        .unwrap_or_else(|e| format!("<body error: {e}>").into_bytes());
    (p.status, p.headers, b)
}

fn problem_type(got: &(StatusCode, http::HeaderMap, Vec<u8>)) -> String {
    let v: serde_json::Value = serde_json::from_slice(&got.2)
        .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&got.2)));
    v["type"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn a_handler_slower_than_its_lease_keeps_its_key() {
    let hits = Hits::default();
    let h = hits.clone();
    let app = Router::new()
        .route(
            "/orders",
            post(move || {
                let h = h.clone();
                async move {
                    h.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(900)).await;
                    (StatusCode::CREATED, "slow")
                }
            }),
        )
        .layer(layer().with_lease(Duration::from_millis(150)).unwrap());
    let a = app.clone();
    let first = tokio::spawn(async move { send(&a, order("slow", "{}")).await });
    // Well past several leases, the first still runs: a repeat gets 409, never a second run.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(120)).await;
        let got = send(&app, order("slow", "{}")).await;
        assert_eq!(got.0, 409, "{}", String::from_utf8_lossy(&got.2));
    }
    assert_eq!(first.await.unwrap().0, 201);
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_response_body_that_fails_releases_the_key() {
    let hits = Hits::default();
    let h = hits.clone();
    let app = Router::new()
        .route(
            "/orders",
            post(move || {
                let h = h.clone();
                async move {
                    let n = h.fetch_add(1, Ordering::SeqCst);
                    if n == 0 {
                        let stream = futures_util::stream::iter(vec![
                            Ok::<_, std::io::Error>(Bytes::from_static(b"part")),
                            Err(std::io::Error::other("db cursor died")),
                        ]);
                        Response::builder()
                            .status(201)
                            .body(Body::from_stream(stream))
                            .unwrap()
                    } else {
                        Response::builder()
                            .status(201)
                            .body(Body::from("whole"))
                            .unwrap()
                    }
                }
            }),
        )
        .layer(layer());
    let first = send(&app, order("bodyfail", "{}")).await;
    assert_eq!(first.0, 500, "{}", String::from_utf8_lossy(&first.2));
    assert_eq!(problem_type(&first), problem::RESPONSE_FAILED);
    let again = send(&app, order("bodyfail", "{}")).await;
    assert_eq!(again.0, 201);
    assert_eq!(again.2, b"whole");
    assert_eq!(hits.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_response_exactly_at_the_limit_is_stored() {
    let hits = Hits::default();
    let h = hits.clone();
    let app = Router::new()
        .route(
            "/orders",
            post(move || {
                let h = h.clone();
                async move {
                    h.fetch_add(1, Ordering::SeqCst);
                    (StatusCode::CREATED, "0123456789")
                }
            }),
        )
        .layer(layer().with_response_limit(10));
    assert_eq!(send(&app, order("ten", "{}")).await.0, 201);
    let again = send(&app, order("ten", "{}")).await;
    assert_eq!(again.0, 201);
    assert_eq!(again.2, b"0123456789");
    assert_eq!(again.1["idempotent-replayed"], "true");
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_unreadable_request_body_is_400_and_the_handler_does_not_run() {
    let hits = Hits::default();
    let h = hits.clone();
    let app = Router::new()
        .route(
            "/orders",
            post(move || {
                let h = h.clone();
                async move {
                    h.fetch_add(1, Ordering::SeqCst);
                    StatusCode::CREATED
                }
            }),
        )
        .layer(layer());
    let stream = futures_util::stream::iter(vec![
        Ok::<_, std::io::Error>(Bytes::from_static(b"{")),
        Err(std::io::Error::other("client went away")),
    ]);
    let r = Request::post("/orders")
        .header("idempotency-key", "unreadable")
        .body(Body::from_stream(stream))
        .unwrap();
    let got = send(&app, r).await;
    assert_eq!(got.0, 400);
    assert_eq!(problem_type(&got), problem::UNREADABLE_BODY);
    assert_eq!(hits.load(Ordering::SeqCst), 0);
    // The key was not consumed.
    assert_eq!(send(&app, order("unreadable", "{}")).await.0, 201);
}

#[tokio::test]
async fn repeated_response_headers_are_replayed_in_order() {
    let app = Router::new()
        .route(
            "/orders",
            post(|| async {
                Response::builder()
                    .status(201)
                    .header("set-cookie", "a=1")
                    .header("set-cookie", "b=2")
                    .header("x-bin", http::HeaderValue::from_bytes(b"\xff\xfe").unwrap())
                    .body(Body::from("ok"))
                    .unwrap()
            }),
        )
        .layer(layer());
    send(&app, order("hdrs", "{}")).await;
    let again = send(&app, order("hdrs", "{}")).await;
    let cookies: Vec<_> = again.1.get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["a=1", "b=2"]);
    assert_eq!(again.1["x-bin"].as_bytes(), b"\xff\xfe");
}

#[tokio::test]
async fn structured_field_keys_at_the_edges() {
    let hits = Hits::default();
    let h = hits.clone();
    let app = Router::new()
        .route(
            "/orders",
            post(move || {
                let h = h.clone();
                async move {
                    h.fetch_add(1, Ordering::SeqCst);
                    StatusCode::CREATED
                }
            }),
        )
        .layer(layer());
    // An empty string is no key.
    assert_eq!(send(&app, order("\"\"", "{}")).await.0, 400);
    // 255 characters inside the quotes is a valid key.
    let k255: &'static str = Box::leak(format!("\"{}\"", "q".repeat(255)).into_boxed_str());
    assert_eq!(send(&app, order(k255, "{}")).await.0, 201);
    // A quote that opens no string is part of a bare key (visible ASCII).
    assert_eq!(send(&app, order("\"abc", "{}")).await.0, 201);
    assert_eq!(hits.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn control_a_limit_inside_the_layer_bounds_running_handlers() {
    let started = Hits::default();
    let s = started.clone();
    let gate = Arc::new(tokio::sync::Notify::new());
    let g = gate.clone();
    let app = Router::new()
        .route(
            "/orders",
            post(move || {
                let (s, g) = (s.clone(), g.clone());
                async move {
                    s.fetch_add(1, Ordering::SeqCst);
                    g.notified().await;
                    StatusCode::CREATED
                }
            }),
        )
        .layer(tower::limit::ConcurrencyLimitLayer::new(1))
        .layer(layer())
        // Routes made once, as `axum::serve` makes them (else each call makes its own limit).
        .with_state(());
    let a = app.clone();
    let first = tokio::spawn(async move { send(&a, order("ctl-1", "{}")).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let b = app.clone();
    let second = tokio::spawn(async move { send(&b, order("ctl-2", "{}")).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let during = started.load(Ordering::SeqCst);
    gate.notify_one();
    tokio::time::sleep(Duration::from_millis(50)).await;
    gate.notify_one();
    let _ = (first.await, second.await);
    assert_eq!(
        during, 1,
        "two handlers ran at once under ConcurrencyLimit(1)"
    );
}

#[tokio::test]
async fn control_without_the_layer_the_limit_bounds_handlers() {
    let started = Hits::default();
    let s = started.clone();
    let gate = Arc::new(tokio::sync::Notify::new());
    let g = gate.clone();
    let app = Router::new()
        .route(
            "/orders",
            post(move || {
                let (s, g) = (s.clone(), g.clone());
                async move {
                    s.fetch_add(1, Ordering::SeqCst);
                    g.notified().await;
                    StatusCode::CREATED
                }
            }),
        )
        .layer(tower::limit::ConcurrencyLimitLayer::new(1))
        .with_state(());
    let a = app.clone();
    let first = tokio::spawn(async move { send(&a, order("ctl-1", "{}")).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let b = app.clone();
    let second = tokio::spawn(async move { send(&b, order("ctl-2", "{}")).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let during = started.load(Ordering::SeqCst);
    gate.notify_one();
    tokio::time::sleep(Duration::from_millis(50)).await;
    gate.notify_one();
    let _ = (first.await, second.await);
    assert_eq!(
        during, 1,
        "two handlers ran at once under ConcurrencyLimit(1)"
    );
}

#[tokio::test]
async fn a_limit_inside_the_layer_counts_handlers_whose_client_left() {
    let started = Hits::default();
    let s = started.clone();
    let gate = Arc::new(tokio::sync::Notify::new());
    let g = gate.clone();
    let app = Router::new()
        .route(
            "/orders",
            post(move || {
                let (s, g) = (s.clone(), g.clone());
                async move {
                    s.fetch_add(1, Ordering::SeqCst);
                    g.notified().await;
                    StatusCode::CREATED
                }
            }),
        )
        .layer(tower::limit::ConcurrencyLimitLayer::new(1))
        .layer(layer())
        // Routes made once, as `axum::serve` makes them (else each call makes its own limit).
        .with_state(());
    let a = app.clone();
    let first = tokio::spawn(async move { send(&a, order("lim-1", "{}")).await });
    for _ in 0..200 {
        if started.load(Ordering::SeqCst) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    first.abort();
    let _ = first.await;
    // The first handler still runs and holds the only permit: a second key waits.
    let b = app.clone();
    let second = tokio::spawn(async move { send(&b, order("lim-2", "{}")).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        started.load(Ordering::SeqCst),
        1,
        "the limit let a second handler in"
    );
    gate.notify_one();
    for _ in 0..200 {
        if started.load(Ordering::SeqCst) == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    gate.notify_one();
    assert_eq!(second.await.unwrap().0, 201);
}
