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
//! (comma-separated networks) names the proxies whose `X-Forwarded-For` is read for that check
//! (so it needs `WEBHOOK_ALLOWED_SOURCES`). A bad network, or proxies without allowed sources,
//! stops the app at start, with the reason.

use std::net::SocketAddr;

use axum::routing::post_service;
use axum::Router;
use sturdy::webhook::{
    GitHub, MemoryQueue, MemoryReceiver, SourceAllowlist, StandardWebhooks, Stripe, WebhookEvent,
    WebhookReceiver,
};

type Error = Box<dyn std::error::Error + Send + Sync>;

fn networks(name: &str) -> Option<Vec<String>> {
    let v = std::env::var(name).ok().filter(|s| !s.trim().is_empty())?;
    Some(v.split(',').map(|s| s.trim().to_owned()).collect())
}

/// An error of the setting `var`, naming it: a refused start says what to fix.
fn named<E: std::fmt::Display>(var: &'static str) -> impl Fn(E) -> Error {
    move |e| format!("{var}: {e}").into()
}

/// The secrets and the optional source allowlist the app is built from.
struct Config {
    standard: Option<String>,
    stripe: Option<String>,
    github: Option<String>,
    allowlist: Option<SourceAllowlist>,
}

/// The routes for the schemes whose secret is set, and the queue their events go to.
fn app(config: &Config) -> Result<(Router, MemoryReceiver, Vec<&'static str>), Error> {
    let (queue, events) = MemoryQueue::new(10_000);
    let guard = |r: WebhookReceiver<MemoryQueue>| match &config.allowlist {
        Some(list) => r.with_source_allowlist(list.clone()),
        None => r,
    };
    let mut app = Router::new();
    let mut routes = Vec::new();
    if let Some(s) = &config.standard {
        let receiver = WebhookReceiver::new(
            StandardWebhooks::new(s).map_err(named("STANDARD_WEBHOOK_SECRET"))?,
            queue.clone(),
        );
        app = app.route("/webhooks/standard", post_service(guard(receiver)));
        routes.push("/webhooks/standard");
    }
    if let Some(s) = &config.stripe {
        let receiver = WebhookReceiver::new(
            Stripe::new(s).map_err(named("STRIPE_WEBHOOK_SECRET"))?,
            queue.clone(),
        );
        app = app.route("/webhooks/stripe", post_service(guard(receiver)));
        routes.push("/webhooks/stripe");
    }
    if let Some(s) = &config.github {
        let receiver = WebhookReceiver::new(
            GitHub::new(s).map_err(named("GITHUB_WEBHOOK_SECRET"))?,
            queue,
        );
        app = app.route("/webhooks/github", post_service(guard(receiver)));
        routes.push("/webhooks/github");
    }
    if routes.is_empty() {
        return Err("set at least one of STANDARD_WEBHOOK_SECRET, STRIPE_WEBHOOK_SECRET, GITHUB_WEBHOOK_SECRET".into());
    }
    Ok((app, events, routes))
}

/// One JSON line per event, written by hand so the keys keep this order; the values are
/// JSON-escaped.
fn line(e: &WebhookEvent) -> String {
    let kind = e
        .headers
        .get("x-github-event")
        .and_then(|v| v.to_str().ok())
        .map(|k| format!(",\"event\":{}", serde_json::Value::from(k)))
        .unwrap_or_default();
    format!(
        "{{\"route\":{},\"id\":{}{kind}}}",
        serde_json::Value::from(e.route.as_str()),
        serde_json::Value::from(e.id.as_str())
    )
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // The reason, as a sentence (a `Result` from `main` would print its `Debug` form).
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("webhook_receiver: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Error> {
    let addr = std::env::var("STURDY_ADDR").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let secret = |name: &str| std::env::var(name).ok().filter(|s| !s.is_empty());
    let allowlist = match (
        networks("WEBHOOK_ALLOWED_SOURCES"),
        networks("WEBHOOK_TRUSTED_PROXIES"),
    ) {
        (Some(allowed), proxies) => Some(
            SourceAllowlist::new(allowed)
                .map_err(named("WEBHOOK_ALLOWED_SOURCES"))?
                .with_trusted_proxies(proxies.unwrap_or_default())
                .map_err(named("WEBHOOK_TRUSTED_PROXIES"))?,
        ),
        // Proxies are only read to find the source an allowlist checks: alone they would do
        // nothing, which is never what was meant.
        (None, Some(proxies)) => {
            return Err(format!(
                "WEBHOOK_TRUSTED_PROXIES is set ({}) but WEBHOOK_ALLOWED_SOURCES is not: the \
                 proxies are only read to check a delivery's source against the allowed networks",
                proxies.join(", ")
            )
            .into())
        }
        (None, None) => None,
    };
    let (app, mut events, routes) = app(&Config {
        standard: secret("STANDARD_WEBHOOK_SECRET"),
        stripe: secret("STRIPE_WEBHOOK_SECRET"),
        github: secret("GITHUB_WEBHOOK_SECRET"),
        allowlist,
    })?;

    // The worker: the handler's real work happens here, never in the request path.
    tokio::spawn(async move {
        while let Some(e) = events.recv().await {
            println!("{}", line(&e));
        }
    });

    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|e| format!("STURDY_ADDR: cannot listen on {addr}: {e}"))?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;
    use tower::ServiceExt;

    #[tokio::test]
    async fn a_signed_github_delivery_is_queued_once_and_printed() {
        let (app, mut events, routes) = app(&Config {
            standard: None,
            stripe: None,
            github: Some("It's a Secret to Everybody".into()),
            allowlist: None,
        })
        .unwrap();
        assert_eq!(routes, ["/webhooks/github"]);
        let body = "Hello, World!";
        let signature = sturdy::webhook::sign_github("It's a Secret to Everybody", body.as_bytes());
        for _ in 0..2 {
            let res = app
                .clone()
                .oneshot(
                    Request::post("/webhooks/github")
                        .header("x-hub-signature-256", signature.as_str())
                        .header("x-github-event", "push")
                        .body(axum::body::Body::from(body))
                        .unwrap(),
                )
                .await
                .unwrap();
            assert!(res.status().is_success(), "{}", res.status());
        }
        let e = events.try_recv().expect("one event");
        assert!(events.try_recv().is_none(), "the redelivery is a duplicate");
        let out = line(&e);
        assert!(
            out.starts_with("{\"route\":\"github\",\"id\":\"sha256:"),
            "{out}"
        );
        assert!(out.ends_with(",\"event\":\"push\"}"), "{out}");
        // A forged one (well-formed, 64 hex digits) is refused and never queued.
        let forged = format!("sha256={}", "0".repeat(64));
        let res = app
            .oneshot(
                Request::post("/webhooks/github")
                    .header("x-hub-signature-256", forged.as_str())
                    .body(axum::body::Body::from(body))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(res.status(), http::StatusCode::UNAUTHORIZED);
        assert!(events.try_recv().is_none());
    }
}
