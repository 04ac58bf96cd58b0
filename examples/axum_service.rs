//! An axum service with both of sturdy's server-side pieces side by side, each where it must sit:
//!
//! - `POST /orders`: sturdy's idempotency layer as a *route layer* on the routes that change
//!   state. A client's retry with the same `Idempotency-Key` gets the stored response, a retry
//!   while the first request still runs gets 409 + `Retry-After`, another payload under the same
//!   key gets 422. Inside it (closer to the handler) go the layers that should count a request
//!   only while it really runs, such as a concurrency limit; outside it, authentication, so the
//!   scope (who owns a key) is known.
//! - `POST /webhooks/stripe`: a `WebhookReceiver` route, *not* behind the idempotency layer:
//!   webhook senders do not send idempotency keys, the receiver deduplicates on the signed event
//!   id itself and acknowledges as soon as the event is queued; a worker processes the queue.
//!
//! ```sh
//! STURDY_ADDR=127.0.0.1:3000 STRIPE_WEBHOOK_SECRET=whsec_test cargo run --example axum_service --features full
//! ```

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{post, post_service};
use axum::{Json, Router};
use serde_json::{json, Value};
use sturdy::idempotency::server::{ByCredentials, IdempotencyLayer, MemoryStore};
use sturdy::webhook::{MemoryQueue, MemoryReceiver, Stripe, WebhookReceiver};
use tower::limit::GlobalConcurrencyLimitLayer;
use tower::ServiceBuilder;

/// What the handlers did: orders created, webhook events processed.
#[derive(Default)]
struct Ledger {
    orders: AtomicU64,
    events: AtomicU64,
}

async fn create_order(
    State(ledger): State<Arc<Ledger>>,
    Json(order): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let n = ledger.orders.fetch_add(1, Ordering::SeqCst) + 1;
    (
        StatusCode::CREATED,
        Json(json!({ "id": format!("o_{n}"), "order": order })),
    )
}

/// The app, and the queue the webhook worker reads.
fn app(stripe_secret: &str) -> Result<(Router, MemoryReceiver, Arc<Ledger>), sturdy::core::Error> {
    let ledger = Arc::new(Ledger::default());
    let (queue, events) = MemoryQueue::new(10_000);
    let orders = Router::new()
        .route("/orders", post(create_order))
        .with_state(ledger.clone())
        .route_layer(
            ServiceBuilder::new()
                // Outside the concurrency limit: a request waiting for a slot is not "running".
                .layer(
                    IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default())
                        .with_require_key(true),
                )
                .layer(GlobalConcurrencyLimitLayer::new(64)),
        );
    let webhooks = Router::new().route(
        "/webhooks/stripe",
        post_service(WebhookReceiver::new(Stripe::new(stripe_secret)?, queue)),
    );
    Ok((orders.merge(webhooks), events, ledger))
}

/// The worker: the webhook's real work happens here, never in the request path.
fn work(mut events: MemoryReceiver, ledger: Arc<Ledger>) {
    tokio::spawn(async move {
        while let Some(e) = events.recv().await {
            ledger.events.fetch_add(1, Ordering::SeqCst);
            println!(
                "{{\"route\":{},\"id\":{}}}",
                Value::from(e.route),
                Value::from(e.id)
            );
        }
    });
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let addr = std::env::var("STURDY_ADDR").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let secret = std::env::var("STRIPE_WEBHOOK_SECRET").unwrap_or_else(|_| "whsec_test".into());
    let (app, events, ledger) = app(&secret)?;
    work(events, ledger);
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!("listening on http://{}", listener.local_addr()?);
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::Request;
    use http_body_util::{BodyExt, Full};
    use sturdy::ClientBuilder;
    use sturdy_chaos::{http_client, serve, Faults};
    use tower::ServiceExt;

    #[tokio::test]
    async fn orders_are_created_once_and_webhooks_are_processed_once_over_a_faulty_network() {
        let (app, events, ledger) = app("whsec_test").unwrap();
        work(events, ledger.clone());
        // Connections closed after the app answered, and injected 503s: a client's retries.
        let served = serve(
            app,
            Faults {
                seed: 3,
                error_rate: 0.1,
                reset_after_rate: 0.2,
                ..Faults::default()
            },
        )
        .await
        .unwrap();
        let backoff = sturdy::retry::Backoff::decorrelated_jitter(
            std::time::Duration::from_millis(2),
            std::time::Duration::from_millis(20),
        )
        .unwrap();
        let client = ClientBuilder::new()
            .with_retry(
                sturdy::retry::RetryLayer::new()
                    .with_backoff(backoff)
                    .with_max_attempts(8),
            )
            .build(http_client());
        for n in 0..30 {
            let req = Request::post(served.url("/orders"))
                .header("content-type", "application/json")
                .body(Full::<Bytes>::from(format!("{{\"n\":{n}}}")))
                .unwrap();
            let res = client.clone().oneshot(req).await.unwrap();
            assert_eq!(res.status(), StatusCode::CREATED);
            let body = res.into_body().collect().await.unwrap().to_bytes();
            assert!(body.starts_with(b"{\"id\":\"o_"));
        }
        assert_eq!(
            ledger.orders.load(Ordering::SeqCst),
            30,
            "one order per call"
        );

        // A Stripe delivery, signed, sent twice (a redelivery): processed once.
        let body = r#"{"id":"evt_1","type":"payment_intent.succeeded"}"#;
        let now = sturdy::core::WallClock::now(&sturdy::core::SystemClock);
        let t = now.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        let signature = sturdy::webhook::sign_stripe("whsec_test", t, body.as_bytes());
        for _ in 0..2 {
            let mut status = StatusCode::SERVICE_UNAVAILABLE;
            // The sender redelivers until it gets a 2xx (the fault layer drops some answers).
            for _ in 0..10 {
                let req = Request::post(served.url("/webhooks/stripe"))
                    .header("stripe-signature", signature.as_str())
                    .body(Full::<Bytes>::from(body))
                    .unwrap();
                match http_client().request(req).await {
                    Ok(res) if res.status().is_success() => {
                        status = res.status();
                        break;
                    }
                    _ => continue,
                }
            }
            assert!(status.is_success());
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(
            ledger.events.load(Ordering::SeqCst),
            1,
            "one event, processed once"
        );

        // Without a key the orders route refuses (it requires one); the webhook route does not
        // want one.
        let res = http_client()
            .request(
                Request::post(served.url("/orders"))
                    .header("content-type", "application/json")
                    .body(Full::<Bytes>::from("{}"))
                    .unwrap(),
            )
            .await;
        if let Ok(res) = res {
            assert!(
                matches!(res.status().as_u16(), 400 | 503),
                "{}",
                res.status()
            );
        }
    }
}
