//! Wire scenarios shared by the memory-store and Redis-store tests: a real axum app on loopback,
//! a real hyper-util client, real time.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use sturdy_chaos::{http_client, serve, Faults};
use sturdy_idempotency::server::{ByCredentials, IdempotencyLayer, IdempotencyStore};

fn order(url: &str, key: &str) -> Request<Full<Bytes>> {
    Request::post(url)
        .header("idempotency-key", key)
        .header("authorization", "Bearer wire-client")
        .header("content-type", "application/json")
        .body(Full::from(r#"{"item":"book"}"#))
        .unwrap()
}

/// A handler commits, then takes 1.5 s. The client gives up after 300 ms (its connection is
/// dropped, so hyper drops the request's future), asks again at once (409, in flight), and asks
/// again once the handler has finished: it gets the stored response, and the handler ran once.
pub(crate) async fn a_client_that_gives_up_mid_handler_gets_the_stored_response<
    St: IdempotencyStore,
>(
    store: St,
    key: &str,
) {
    let runs = Arc::new(AtomicU32::new(0));
    let finished = Arc::new(tokio::sync::Notify::new());
    let app = {
        let (runs, finished) = (runs.clone(), finished.clone());
        Router::new()
            .route(
                "/orders",
                post(move |body: String| {
                    let (runs, finished) = (runs.clone(), finished.clone());
                    async move {
                        // The commit: from here on the order exists.
                        let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                        tokio::time::sleep(Duration::from_millis(1_500)).await;
                        finished.notify_one();
                        (
                            StatusCode::CREATED,
                            format!("{{\"order\":{n},\"of\":{body}}}"),
                        )
                    }
                }),
            )
            .layer(IdempotencyLayer::new(store, ByCredentials::default()))
    };
    let served = serve(app, Faults::default()).await.unwrap();
    let url = served.url("/orders");
    let client = http_client();

    // Attempt 1: the per-attempt timeout fires mid-handler and the connection is dropped.
    let first = tokio::time::timeout(Duration::from_millis(300), client.request(order(&url, key)));
    assert!(first.await.is_err(), "the first attempt timed out");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler started");

    // Attempt 2, at once: the first execution is still running.
    let res = client.request(order(&url, key)).await.unwrap();
    assert_eq!(res.status(), StatusCode::CONFLICT);
    assert_eq!(res.headers()["retry-after"], "1");
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    let problem: serde_json::Value =
        serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(
        problem["type"],
        sturdy_idempotency::server::problem::IN_FLIGHT,
        "{problem}"
    );
    assert_eq!(problem["status"], 409);

    // Attempt 3, after the handler finished: the stored response.
    tokio::time::timeout(Duration::from_secs(5), finished.notified())
        .await
        .expect("the first execution ran to its end");
    let mut res = client.request(order(&url, key)).await.unwrap();
    // The response is stored right after the handler returns; if this attempt raced the store,
    // the server says so with 409 and Retry-After, and the client asks again.
    for _ in 0..3 {
        if res.status() != StatusCode::CONFLICT {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        res = client.request(order(&url, key)).await.unwrap();
    }
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(res.headers()["idempotent-replayed"], "true");
    assert_eq!(
        res.into_body().collect().await.unwrap().to_bytes(),
        r#"{"order":1,"of":{"item":"book"}}"#
    );
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the handler ran exactly once"
    );
}
