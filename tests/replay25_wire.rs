//! On loopback: a keyed POST that meets its own first request still running (409 with
//! `Retry-After`) is replayed with every header, so the server's idempotency layer sees the same
//! client scope (its cookies) and answers with the stored response. Real time.
#![cfg(feature = "full")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request};
use http_body_util::{BodyExt, Full};
use sturdy::idempotency::server::{ByCredentials, IdempotencyLayer, MemoryStore};
use sturdy::retry::RetryLayer;
use sturdy::ClientBuilder;
use tower::ServiceExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_flight_replay_keeps_the_clients_scope() {
    let cases: [&[(&str, &str)]; 4] = [
        &[("cookie", "sid=1")],
        &[("cookie", "sid=1"), ("cookie", "theme=dark")],
        &[("authorization", "Bearer t1")],
        &[
            ("x-api-key", "k1"),
            ("cookie", "sid=1"),
            ("accept", "application/json"),
        ],
    ];
    for (i, hs) in cases.iter().enumerate() {
        let runs = Arc::new(AtomicUsize::new(0));
        let counter = runs.clone();
        let app = axum::Router::new()
            .route(
                "/orders",
                axum::routing::post(move |body: String| {
                    let counter = counter.clone();
                    async move {
                        let n = counter.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        (http::StatusCode::CREATED, format!("order {n}: {body}"))
                    }
                }),
            )
            .layer(IdempotencyLayer::new(
                MemoryStore::default(),
                ByCredentials::default(),
            ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let client = ClientBuilder::new()
            .with_retry(RetryLayer::new().with_seed(i as u64))
            .build(sturdy_chaos::http_client());
        let make = || {
            let mut req = Request::post(format!("http://{addr}/orders"))
                .body(Full::from("{\"amount\":1}"))
                .unwrap();
            req.headers_mut()
                .insert("idempotency-key", HeaderValue::from_static("order-key-25"));
            for (n, v) in hs.iter() {
                req.headers_mut().append(
                    http::HeaderName::from_static(n),
                    HeaderValue::from_static(v),
                );
            }
            req
        };
        let first = client.clone().oneshot(make());
        let second = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            client.clone().oneshot(make()).await
        };
        let (a, b) = tokio::join!(first, second);
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a.status(), 201, "case {i}");
        assert_eq!(b.status(), 201, "case {i}");
        assert_eq!(
            b.headers()
                .get("idempotent-replayed")
                .map(|v| v.as_bytes().to_vec()),
            Some(b"true".to_vec()),
            "case {i}"
        );
        let ba = a.into_body().collect().await.unwrap().to_bytes();
        let bb = b.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(ba, bb, "case {i}");
        assert_eq!(ba, Bytes::from("order 0: {\"amount\":1}"), "case {i}");
        assert_eq!(runs.load(Ordering::SeqCst), 1, "case {i}");
    }
}
