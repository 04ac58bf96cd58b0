//! An axum app receiving Standard Webhooks, Stripe and GitHub deliveries, verified, deduplicated,
//! acknowledged as soon as they are queued, and processed by a worker that prints one JSON line
//! per event on stdout: `{"route":"stripe","id":"evt_..."}` (GitHub events also say their
//! `X-GitHub-Event`: `{"route":"github","id":"sha256:...","event":"push"}`).
//!
//! ```sh
//! STURDY_ADDR=127.0.0.1:3000 \
//! STANDARD_WEBHOOK_SECRET=whsec_... STRIPE_WEBHOOK_SECRET=whsec_... GITHUB_WEBHOOK_SECRET=... \
//! cargo run --example webhook_receiver --features webhook
//! ```
//!
//! Routes: `POST /webhooks/standard`, `/webhooks/stripe`, `/webhooks/github` (each mounted when
//! its secret is set).
//!
//! Optional: `WEBHOOK_ALLOWED_SOURCES` (comma-separated networks, such as the sender's published
//! ranges) accepts deliveries only from those networks, and `WEBHOOK_TRUSTED_PROXIES`
//! (comma-separated networks) names the proxies whose `X-Forwarded-For` is read. A bad network
//! stops the app at start, with the reason.

use std::net::SocketAddr;

use axum::routing::post_service;
use axum::Router;
use sturdy::webhook::{
    GitHub, MemoryQueue, SourceAllowlist, StandardWebhooks, Stripe, WebhookReceiver,
};

fn networks(name: &str) -> Option<Vec<String>> {
    let v = std::env::var(name).ok().filter(|s| !s.trim().is_empty())?;
    Some(v.split(',').map(|s| s.trim().to_owned()).collect())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::var("STURDY_ADDR").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let secret = |name: &str| std::env::var(name).ok().filter(|s| !s.is_empty());
    let allowlist = match networks("WEBHOOK_ALLOWED_SOURCES") {
        Some(allowed) => {
            let proxies = networks("WEBHOOK_TRUSTED_PROXIES").unwrap_or_default();
            Some(SourceAllowlist::new(allowed)?.with_trusted_proxies(proxies)?)
        }
        None => None,
    };

    let (queue, mut events) = MemoryQueue::new(10_000);
    let guard = |r: WebhookReceiver<MemoryQueue>| match &allowlist {
        Some(list) => r.with_source_allowlist(list.clone()),
        None => r,
    };
    let mut app = Router::new();
    let mut routes = Vec::new();
    if let Some(s) = secret("STANDARD_WEBHOOK_SECRET") {
        let receiver = WebhookReceiver::new(StandardWebhooks::new(&s)?, queue.clone());
        app = app.route("/webhooks/standard", post_service(guard(receiver)));
        routes.push("/webhooks/standard");
    }
    if let Some(s) = secret("STRIPE_WEBHOOK_SECRET") {
        let receiver = WebhookReceiver::new(Stripe::new(&s)?, queue.clone());
        app = app.route("/webhooks/stripe", post_service(guard(receiver)));
        routes.push("/webhooks/stripe");
    }
    if let Some(s) = secret("GITHUB_WEBHOOK_SECRET") {
        let receiver = WebhookReceiver::new(GitHub::new(&s)?, queue.clone());
        app = app.route("/webhooks/github", post_service(guard(receiver)));
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
            let kind = e
                .headers
                .get("x-github-event")
                .and_then(|v| v.to_str().ok())
                .map(|k| format!(",\"event\":{}", serde_json::Value::from(k)))
                .unwrap_or_default();
            println!(
                "{{\"route\":{},\"id\":{}{kind}}}",
                serde_json::Value::from(e.route),
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
    // The peer address is what a source allowlist checks.
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await?;
    Ok(())
}
