//! The server layer in process: the conformance suite on the memory store, axum integration,
//! paused-time leases, panics, bounds.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::routing::post;
use axum::Router;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use sturdy_idempotency::server::{
    conformance, Begin, IdempotencyLayer, IdempotencyStore, MemoryStore,
};
use tower::ServiceExt;

#[tokio::test]
async fn memory_store_passes_the_conformance_suite() {
    let store = MemoryStore::default();
    conformance::run(store.clone(), store).await;
}

fn app(store: MemoryStore, runs: Arc<AtomicU32>) -> Router {
    Router::new()
        .route(
            "/orders",
            post(move |body: String| {
                let runs = runs.clone();
                async move {
                    let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                    if body == "panic" {
                        panic!("handler bug");
                    }
                    (StatusCode::CREATED, format!("order {n}"))
                }
            }),
        )
        .layer(IdempotencyLayer::new(store).require_key())
}

fn order(key: Option<&str>, body: &'static str) -> Request<Body> {
    let mut b = Request::post("/orders");
    if let Some(k) = key {
        b = b.header("idempotency-key", k);
    }
    b.body(Body::from(body)).unwrap()
}

#[tokio::test]
async fn axum_router_replays_and_rejects() {
    let runs = Arc::new(AtomicU32::new(0));
    let app = app(MemoryStore::default(), runs.clone());
    let first = app.clone().oneshot(order(Some("k1"), "{}")).await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let again = app
        .clone()
        .oneshot(order(Some("\"k1\""), "{}"))
        .await
        .unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(
        again.into_body().collect().await.unwrap().to_bytes(),
        "order 1"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    let missing = app.clone().oneshot(order(None, "{}")).await.unwrap();
    assert_eq!(missing.status(), StatusCode::BAD_REQUEST);
    let body = missing.into_body().collect().await.unwrap().to_bytes();
    let problem: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(problem["title"], "Idempotency-Key is missing");
    assert_eq!(problem["status"], 400);

    let bad = app
        .clone()
        .oneshot(order(Some("has space"), "{}"))
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    // GET passes through untouched.
    let get = app
        .oneshot(Request::get("/orders").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(get.status(), StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn a_panicking_handler_does_not_lock_its_key() {
    let runs = Arc::new(AtomicU32::new(0));
    let app = app(MemoryStore::default(), runs.clone());
    let crashed = tokio::spawn(app.clone().oneshot(order(Some("k-panic"), "panic"))).await;
    assert!(crashed.is_err(), "the handler panicked");
    tokio::task::yield_now().await;
    // The lock was released when the request's future was dropped: the retry runs.
    let retry = tokio::spawn(app.clone().oneshot(order(Some("k-panic"), "panic"))).await;
    assert!(retry.is_err());
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn a_crashed_worker_frees_its_key_after_the_lease() {
    let store = MemoryStore::default();
    // A worker locked the key and died without a word.
    assert_eq!(
        store
            .begin("anonymous:k", [7; 32], Duration::from_secs(60))
            .await
            .unwrap(),
        Begin::Started
    );
    assert_eq!(
        store
            .begin("anonymous:k", [7; 32], Duration::from_secs(60))
            .await
            .unwrap(),
        Begin::InFlight
    );
    tokio::time::advance(Duration::from_secs(59)).await;
    assert_eq!(
        store
            .begin("anonymous:k", [7; 32], Duration::from_secs(60))
            .await
            .unwrap(),
        Begin::InFlight
    );
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(
        store
            .begin("anonymous:k", [7; 32], Duration::from_secs(60))
            .await
            .unwrap(),
        Begin::Started
    );
}

#[tokio::test(start_paused = true)]
async fn the_memory_store_stays_bounded() {
    let store = MemoryStore::new(100);
    let resp = sturdy_idempotency::server::StoredResponse {
        status: 201,
        headers: vec![],
        body: "x".into(),
    };
    for i in 0..1_000 {
        let k = format!("k{i}");
        assert_eq!(
            store
                .begin(&k, [1; 32], Duration::from_secs(60))
                .await
                .unwrap(),
            Begin::Started
        );
        store
            .complete(&k, [1; 32], resp.clone(), Duration::from_secs(3_600))
            .await
            .unwrap();
    }
    assert_eq!(store.len(), 100);
    // The newest are kept, the oldest completed ones went first.
    assert!(matches!(
        store
            .begin("k999", [1; 32], Duration::from_secs(60))
            .await
            .unwrap(),
        Begin::Completed(_)
    ));
    assert_eq!(
        store
            .begin("k0", [1; 32], Duration::from_secs(60))
            .await
            .unwrap(),
        Begin::Started
    );

    // Full of running requests: a new key is refused, not a lock evicted.
    let full = MemoryStore::new(3);
    for k in ["a", "b", "c"] {
        full.begin(k, [1; 32], Duration::from_secs(60))
            .await
            .unwrap();
    }
    assert!(full
        .begin("d", [1; 32], Duration::from_secs(60))
        .await
        .is_err());
    tokio::time::advance(Duration::from_secs(61)).await;
    assert_eq!(
        full.begin("d", [1; 32], Duration::from_secs(60))
            .await
            .unwrap(),
        Begin::Started
    );
}

#[tokio::test]
async fn a_body_over_the_limit_gets_413() {
    let app = Router::new()
        .route("/orders", post(|| async { "ok" }))
        .layer(IdempotencyLayer::new(MemoryStore::default()).with_body_limit(8));
    let res = app.oneshot(order(Some("k"), "0123456789")).await.unwrap();
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn a_custom_scope_separates_tenants() {
    let runs = Arc::new(AtomicU32::new(0));
    let r = runs.clone();
    let app = Router::new()
        .route(
            "/orders",
            post(move || {
                let r = r.clone();
                async move {
                    r.fetch_add(1, Ordering::SeqCst);
                    StatusCode::CREATED
                }
            }),
        )
        .layer(IdempotencyLayer::new(MemoryStore::default()).with_scope(
            |head: &http::request::Parts| {
                head.headers
                    .get("x-tenant")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("none")
                    .to_owned()
            },
        ));
    let order = |tenant: &str| {
        Request::post("/orders")
            .header("idempotency-key", "k")
            .header("x-tenant", tenant)
            .body(Body::from("{}"))
            .unwrap()
    };
    for tenant in ["a", "b", "a"] {
        assert_eq!(
            app.clone().oneshot(order(tenant)).await.unwrap().status(),
            StatusCode::CREATED
        );
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "tenant a's repeat was a replay, tenant b ran"
    );
}
