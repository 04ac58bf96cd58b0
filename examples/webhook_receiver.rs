//! An axum app receiving Standard Webhooks, Stripe and GitHub deliveries, verified, deduplicated,
//! acknowledged as soon as they are queued, and processed by a worker that prints one JSON line
//! per event on stdout: `{"scheme":"stripe","id":"evt_..."}`.
//!
//! ```sh
//! STURDY_ADDR=127.0.0.1:3000 \
//! STANDARD_WEBHOOK_SECRET=whsec_... STRIPE_WEBHOOK_SECRET=whsec_... GITHUB_WEBHOOK_SECRET=... \
//! cargo run --example webhook_receiver --features webhook
//! ```
//!
//! Routes: `POST /webhooks/standard`, `/webhooks/stripe`, `/webhooks/github` (each mounted when
//! its secret is set).

use axum::routing::post_service;
use axum::Router;
use sturdy::webhook::{GitHub, MemoryQueue, StandardWebhooks, Stripe, WebhookReceiver};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::var("STURDY_ADDR").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let secret = |name: &str| std::env::var(name).ok().filter(|s| !s.is_empty());

    let (queue, mut events) = MemoryQueue::new(10_000);
    let mut app = Router::new();
    let mut routes = Vec::new();
    if let Some(s) = secret("STANDARD_WEBHOOK_SECRET") {
        app = app.route(
            "/webhooks/standard",
            post_service(WebhookReceiver::new(
                StandardWebhooks::new(&s)?,
                queue.clone(),
            )),
        );
        routes.push("/webhooks/standard");
    }
    if let Some(s) = secret("STRIPE_WEBHOOK_SECRET") {
        app = app.route(
            "/webhooks/stripe",
            post_service(WebhookReceiver::new(Stripe::new(&s), queue.clone())),
        );
        routes.push("/webhooks/stripe");
    }
    if let Some(s) = secret("GITHUB_WEBHOOK_SECRET") {
        app = app.route(
            "/webhooks/github",
            post_service(WebhookReceiver::new(GitHub::new(&s), queue.clone())),
        );
        routes.push("/webhooks/github");
    }
    if routes.is_empty() {
        return Err("set at least one of STANDARD_WEBHOOK_SECRET, STRIPE_WEBHOOK_SECRET, GITHUB_WEBHOOK_SECRET".into());
    }
    drop(queue);

    // The worker: the handler's real work happens here, never in the request path.
    tokio::spawn(async move {
        while let Some(e) = events.recv().await {
            // Written by hand so the keys keep this order; the values are JSON-escaped.
            println!(
                "{{\"scheme\":{},\"id\":{}}}",
                serde_json::Value::from(e.scheme),
                serde_json::Value::from(e.id)
            );
        }
    });

    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!(
        "listening on http://{} for {}",
        listener.local_addr()?,
        routes.join(", ")
    );
    axum::serve(listener, app).await?;
    Ok(())
}
