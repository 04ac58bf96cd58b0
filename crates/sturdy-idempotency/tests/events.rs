//! The server layer's events: replays and refusals reach the `on_event` callback and, with the
//! `metrics` feature, a `metrics` recorder.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::routing::post;
use axum::Router;
use http::{Method, Request, StatusCode};
use sturdy_core::events::{Event, IdempotencyRefusal};
use sturdy_idempotency::server::{ByCredentials, IdempotencyLayer, MemoryStore};
use tower::ServiceExt;

#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Replayed(Method, StatusCode),
    Refused(Method, IdempotencyRefusal, StatusCode),
}

fn order(key: Option<&str>, body: &'static str) -> Request<Body> {
    let mut b = Request::post("/orders");
    if let Some(k) = key {
        b = b.header("idempotency-key", k);
    }
    b.body(Body::from(body)).unwrap()
}

#[tokio::test(start_paused = true)]
async fn replays_and_refusals_are_events_and_counts() {
    #[cfg(feature = "metrics")]
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    #[cfg(feature = "metrics")]
    let snap = recorder.snapshotter();
    #[cfg(feature = "metrics")]
    let _guard = metrics::set_default_local_recorder(&recorder);

    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let layer = IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default())
        .with_require_key(true)
        .on_event(move |e| {
            let mut s = s.lock().unwrap();
            match *e {
                Event::IdempotentReplayed { method, status } => {
                    s.push(Seen::Replayed(method.clone(), status));
                }
                Event::IdempotencyRefused {
                    method,
                    refusal,
                    status,
                } => s.push(Seen::Refused(method.clone(), refusal, status)),
                _ => {}
            }
        });
    let app = Router::new()
        .route(
            "/orders",
            post(|| async {
                tokio::time::sleep(Duration::from_secs(1)).await;
                (StatusCode::CREATED, "order 1")
            }),
        )
        .layer(layer);

    // The first request runs for a second; a copy sent meanwhile gets 409.
    let first = tokio::spawn(app.clone().oneshot(order(Some("k1"), "{}")));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let during = app.clone().oneshot(order(Some("k1"), "{}")).await.unwrap();
    assert_eq!(during.status(), StatusCode::CONFLICT);
    assert_eq!(first.await.unwrap().unwrap().status(), StatusCode::CREATED);
    // A copy after it is a replay; another payload under the key is 422.
    let again = app.clone().oneshot(order(Some("k1"), "{}")).await.unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let other = app
        .clone()
        .oneshot(order(Some("k1"), "{\"n\":2}"))
        .await
        .unwrap();
    assert_eq!(other.status(), StatusCode::UNPROCESSABLE_ENTITY);
    // No key, and a key that is not one: 400.
    let missing = app.clone().oneshot(order(None, "{}")).await.unwrap();
    assert_eq!(missing.status(), StatusCode::BAD_REQUEST);
    let bad = app.oneshot(order(Some("has space"), "{}")).await.unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);

    use IdempotencyRefusal::{InFlight, InvalidKey, KeyReused, MissingKey};
    assert_eq!(
        *seen.lock().unwrap(),
        [
            Seen::Refused(Method::POST, InFlight, StatusCode::CONFLICT),
            Seen::Replayed(Method::POST, StatusCode::CREATED),
            Seen::Refused(Method::POST, KeyReused, StatusCode::UNPROCESSABLE_ENTITY),
            Seen::Refused(Method::POST, MissingKey, StatusCode::BAD_REQUEST),
            Seen::Refused(Method::POST, InvalidKey, StatusCode::BAD_REQUEST),
        ]
    );

    #[cfg(feature = "metrics")]
    {
        use metrics_util::debugging::DebugValue;
        let all = snap.snapshot().into_vec();
        let count = |name: &str, label: (&str, &str)| -> u64 {
            all.iter()
                .filter(|(k, ..)| {
                    k.key().name() == name
                        && k.key()
                            .labels()
                            .any(|l| l.key() == label.0 && l.value() == label.1)
                })
                .map(|(.., v)| match v {
                    DebugValue::Counter(n) => *n,
                    other => panic!("{other:?}"),
                })
                .sum()
        };
        let replays = "sturdy.idempotency.replays";
        let refusals = "sturdy.idempotency.refusals";
        assert_eq!(count(replays, ("http.request.method", "POST")), 1);
        assert_eq!(count(refusals, ("error.type", "in_flight")), 1);
        assert_eq!(count(refusals, ("http.response.status_code", "409")), 1);
        assert_eq!(count(refusals, ("error.type", "key_reused")), 1);
        assert_eq!(count(refusals, ("error.type", "missing_key")), 1);
        assert_eq!(count(refusals, ("error.type", "invalid_key")), 1);
        assert_eq!(count(refusals, ("http.request.method", "POST")), 4);
    }
}
