//! Webhooks for axum: verified before anything else, deduplicated, acknowledged fast, never lost.
//!
//! A [`WebhookReceiver`] is the endpoint: it reads the raw body (413 past the limit \[1 MiB\]),
//! verifies it with a [`Verifier`] before anything parses it (constant-time MAC comparison,
//! several secrets at once for rotation, timestamps within 5 minutes both ways), deduplicates on
//! the event id \[24 h\], queues the event, and answers 2xx only once it is queued. A full queue
//! answers 503 with `Retry-After`, so the sender redelivers. A handler works off the queue at its
//! own pace: a slow handler never slows the acknowledgement.
//!
//! Schemes: [`StandardWebhooks`], [`Stripe`], [`GitHub`] and a configurable [`GenericHmac`].
//! Rejections are 400 (missing or malformed headers) or 401 (bad signature, stale or future
//! timestamp), with the body `invalid signature` and the reason in `tracing`.
//!
//! Queues: [`MemoryQueue`] (bounded, the default) here; Redis Streams in `sturdy-redis` (durable,
//! shared by several instances through a consumer group, an event acknowledged only after its
//! handler succeeded).
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use axum::{routing::post_service, Router};
//! use http::{Request, StatusCode};
//! use sturdy_webhook::{sign_github, GitHub, MemoryQueue, WebhookReceiver};
//! use tower::ServiceExt;
//!
//! let (queue, mut events) = MemoryQueue::new(1_000);
//! let app = Router::new().route("/webhooks/github", post_service(WebhookReceiver::new(GitHub::new("It's a Secret to Everybody"), queue)));
//!
//! let body = "Hello, World!";
//! let req = Request::post("/webhooks/github")
//!     .header("x-hub-signature-256", sign_github("It's a Secret to Everybody", body.as_bytes()))
//!     .header("x-github-delivery", "d-1")
//!     .body(axum::body::Body::from(body))
//!     .unwrap();
//! assert_eq!(app.oneshot(req).await.unwrap().status(), StatusCode::OK);
//! let event = events.recv().await.unwrap();
//! assert_eq!((event.scheme.as_str(), event.id.as_str()), ("github", "d-1"));
//! # }
//! ```
#![forbid(unsafe_code)]

mod queue;
mod receiver;
mod verify;

pub use queue::{BoxFuture, EventQueue, MemoryQueue, MemoryReceiver, Push, WebhookEvent};
pub use receiver::{ResponseFuture, WebhookReceiver};
pub use verify::{
    decode_standard_secret, sign_github, sign_standard, sign_stripe, Encoding, GenericHmac, GitHub,
    Rejection, StandardWebhooks, Stripe, Verified, Verifier, DEFAULT_TOLERANCE,
};
