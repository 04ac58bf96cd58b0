//! The idempotency guide's server lease: "While the handler runs, the task renews the lock every
//! third of the lease (30 s by default, `with_lease`), so a handler slower than the lease keeps
//! its key", and "client timeout mid-handler: ... a retry with the same key gets 409 in flight
//! (`Retry-After: 1`) while the handler runs, then the stored response". A handler three times
//! slower than a 250 ms lease; clients that time out or are dropped at a seeded moment mid-handler;
//! the handler must run once. Real time on loopback.
#![cfg(feature = "full")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use sturdy::core::CallOptions;
use sturdy::idempotency::server::{ByCredentials, IdempotencyLayer, MemoryStore};
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::ClientBuilder;
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt};

use crate::s47_util::Rng;

async fn app(runs: Arc<AtomicUsize>) -> String {
    let layer = IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default())
        .with_lease(Duration::from_millis(250))
        .unwrap();
    let app: axum::Router = axum::Router::new()
        .route(
            "/orders",
            axum::routing::post(move |body: String| {
                let runs = runs.clone();
                async move {
                    let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                    tokio::time::sleep(Duration::from_millis(750)).await;
                    (http::StatusCode::CREATED, format!("run {n}: {body}"))
                }
            }),
        )
        .layer(layer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/orders")
}

fn order(url: &str, key: &str) -> Request<Full<Bytes>> {
    Request::post(url)
        .header("idempotency-key", key)
        .body(Full::from("book"))
        .unwrap()
}

#[tokio::test]
async fn a_handler_slower_than_its_lease_keeps_its_key() {
    let runs = Arc::new(AtomicUsize::new(0));
    let url = app(runs.clone()).await;
    let http = sturdy_chaos::http_client();
    let t0 = Instant::now();
    // The first client gives up mid-handler.
    let first = tokio::time::timeout(
        Duration::from_millis(100),
        http.clone().oneshot(order(&url, "k-lease")),
    )
    .await;
    assert!(first.is_err());
    // Past the lease (250 ms), the key must still be held: 409, not a second run.
    tokio::time::sleep(Duration::from_millis(400).saturating_sub(t0.elapsed())).await;
    let res = tokio::time::timeout(
        Duration::from_secs(1),
        http.clone().oneshot(order(&url, "k-lease")),
    )
    .await
    .expect("hung")
    .unwrap();
    assert_eq!(res.status(), 409, "a retry past the lease was not refused");
    assert_eq!(res.headers().get("retry-after").unwrap(), "1");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    // After the handler: the stored response.
    tokio::time::sleep(Duration::from_millis(950).saturating_sub(t0.elapsed())).await;
    let res = tokio::time::timeout(
        Duration::from_secs(1),
        http.clone().oneshot(order(&url, "k-lease")),
    )
    .await
    .expect("hung")
    .unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(res.headers().get("idempotent-replayed").unwrap(), "true");
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"run 1: book");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// The composed client times each attempt out mid-handler, meets 409 `Retry-After: 1`, waits and
/// gets the stored response; a call dropped at a seeded moment sends nothing more, and the next
/// call through the same kept service with the same key gets the one stored outcome.
#[tokio::test]
async fn a_client_that_times_out_or_is_dropped_mid_handler_runs_it_once() {
    let runs = Arc::new(AtomicUsize::new(0));
    let url = app(runs.clone()).await;
    let client = ClientBuilder::new()
        .with_retry(
            RetryLayer::new().with_backoff(
                Backoff::decorrelated_jitter(Duration::from_millis(10), Duration::from_millis(30))
                    .unwrap(),
            ),
        )
        .with_attempt_timeout(Duration::from_millis(100))
        .build(sturdy_chaos::http_client());
    let mut svc = ServiceBuilder::new()
        .layer(tower::buffer::BufferLayer::new(4))
        .layer(tower::limit::ConcurrencyLimitLayer::new(1))
        .service(client);
    let mut rng = Rng(0x47_1d);
    let at = Duration::from_millis(rng.between(20, 600));
    let mut req = Request::post(&url).body(Full::from("book")).unwrap();
    req.extensions_mut().insert(
        CallOptions::new()
            .with_idempotency_key("k-drop")
            .with_deadline(Duration::from_secs(3)),
    );
    let dropped = tokio::time::timeout(at, async { svc.ready().await?.call(req).await }).await;
    assert!(dropped.is_err(), "ended before the drop at {at:?}");
    let mut req = Request::post(&url).body(Full::from("book")).unwrap();
    req.extensions_mut().insert(
        CallOptions::new()
            .with_idempotency_key("k-drop")
            .with_deadline(Duration::from_millis(2500)),
    );
    let t = Instant::now();
    let res = tokio::time::timeout(Duration::from_secs(4), async {
        svc.ready().await?.call(req).await
    })
    .await
    .expect("hung")
    .expect("the stored response");
    assert_eq!(res.status(), 201, "after {:?}", t.elapsed());
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"run 1: book");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran twice");
}
