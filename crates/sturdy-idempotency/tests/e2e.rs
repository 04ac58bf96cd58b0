//! Client keys + retries against an axum app with the server layer, over loopback, with faults
//! injected around the app: 503s before it, and connections closed after it committed.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use sturdy_chaos::{http_client, serve, Faults};
use sturdy_idempotency::{client, server};
use sturdy_retry::{Backoff, RetryLayer};
use tower::{ServiceBuilder, ServiceExt};

/// The app's "database": every order it committed.
type Db = Arc<Mutex<Vec<String>>>;

fn orders_app(db: Db) -> Router {
    Router::new()
        .route(
            "/orders",
            post(move |body: String| {
                let db = db.clone();
                async move {
                    let mut db = db.lock().unwrap();
                    db.push(body);
                    (StatusCode::CREATED, format!("{{\"id\":{}}}", db.len()))
                }
            }),
        )
        .layer(
            server::IdempotencyLayer::new(
                server::MemoryStore::default(),
                server::ByCredentials::default(),
            )
            .with_require_key(true),
        )
}

fn order(url: &str, n: usize) -> Request<Full<Bytes>> {
    Request::post(url)
        .header("content-type", "application/json")
        .body(Full::from(format!("{{\"customer\":{n}}}")))
        .unwrap()
}

#[tokio::test]
async fn a_thousand_posts_through_faults_make_a_thousand_orders() {
    let db = Db::default();
    let served = serve(
        orders_app(db.clone()),
        Faults {
            seed: 7,
            error_rate: 0.1,
            reset_after_rate: 0.1,
            ..Faults::default()
        },
    )
    .await
    .unwrap();
    let backoff =
        Backoff::decorrelated_jitter(Duration::from_millis(1), Duration::from_millis(20)).unwrap();
    let client = ServiceBuilder::new()
        .layer(client::IdempotencyKeyLayer::new())
        .layer(
            RetryLayer::new()
                .with_backoff(backoff)
                .with_max_attempts(10)
                .without_budget()
                .with_seed(11),
        )
        .service(http_client());
    let url = served.url("/orders");
    for n in 0..1_000 {
        let res = client
            .clone()
            .oneshot(order(&url, n))
            .await
            .unwrap_or_else(|e| panic!("order {n}: {e}"));
        assert_eq!(res.status(), StatusCode::CREATED, "order {n}");
    }
    let db = db.lock().unwrap();
    assert_eq!(db.len(), 1_000);
    let mut unique = db.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 1_000, "no duplicates");
    let st = served.stats();
    assert!(
        st.resets > 50 && st.errors > 50,
        "faults were injected: {st:?}"
    );
}

#[tokio::test]
async fn two_deliberate_identical_orders_are_two_orders() {
    let db = Db::default();
    let served = serve(orders_app(db.clone()), Faults::default())
        .await
        .unwrap();
    let client = ServiceBuilder::new()
        .layer(client::IdempotencyKeyLayer::new())
        .layer(RetryLayer::new())
        .service(http_client());
    for _ in 0..2 {
        let res = client
            .clone()
            .oneshot(order(&served.url("/orders"), 1))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::CREATED);
        assert!(res.headers().get("idempotent-replayed").is_none());
    }
    assert_eq!(db.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn without_keys_lost_responses_become_failures_not_duplicates() {
    // The control experiment: retries without idempotency keys on a POST are refused by the
    // retry layer, so lost responses become failures instead of duplicates.
    let db = Db::default();
    let app = Router::new().route(
        "/orders",
        post({
            let db = db.clone();
            move |body: String| {
                let db = db.clone();
                async move {
                    db.lock().unwrap().push(body);
                    StatusCode::CREATED
                }
            }
        }),
    );
    let served = serve(
        app,
        Faults {
            seed: 7,
            error_rate: 0.0,
            reset_after_rate: 0.2,
            ..Faults::default()
        },
    )
    .await
    .unwrap();
    let client = ServiceBuilder::new()
        .layer(RetryLayer::new())
        .service(http_client());
    let mut failed = 0;
    for n in 0..100 {
        if client
            .clone()
            .oneshot(order(&served.url("/orders"), n))
            .await
            .is_err()
        {
            failed += 1;
        }
    }
    assert!(failed > 0);
    assert_eq!(
        db.lock().unwrap().len(),
        100,
        "every order committed once, but {failed} callers were told it failed"
    );
}
