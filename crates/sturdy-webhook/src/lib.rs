//! Webhooks for axum: verified before anything else, deduplicated, and acknowledged fast but
//! only once queued. What outlives the process depends on the queue: the default
//! [`MemoryQueue`] lives in it (its events are lost if the process dies); a durable queue such as
//! the Redis one keeps them (see docs/RELIABILITY.md for what a Redis failover can lose).
//!
//! A [`WebhookReceiver`] is the endpoint. For each delivery it:
//!
//! 1. checks the source against an optional [`SourceAllowlist`] of networks (403 otherwise);
//! 2. checks the signature headers before reading the body: present, well-formed, timestamp
//!    within 5 minutes both ways (400 or 401);
//! 3. reads the raw body (413 past the limit \[1 MiB\]);
//! 4. verifies it with a [`Verifier`] before anything parses it: constant-time MAC comparison,
//!    several secrets at once for rotation (400 or 401). A body over 64 KiB is verified on
//!    tokio's blocking pool, not on the async worker threads;
//! 5. deduplicates it per scheme and route on an id the signature covers \[remembered 24 h\],
//!    queues it, and answers 2xx only once it is queued. A duplicate gets 200 and is not queued
//!    again; a full queue answers 503 with `Retry-After`, so the sender redelivers.
//!
//! A handler works off the queue at its own pace: a slow handler never slows the
//! acknowledgement. Each [`WebhookEvent`] carries the scheme, the route, the dedup id, the signed
//! timestamp (when the scheme has one), the headers the scheme defines and the raw body.
//!
//! Every rejection answers a short generic text (`forbidden`, `invalid signature`, `payload too
//! large`, `unreadable body` for a body stream that failed); the reason goes to `tracing`. No `Debug` output or log line shows a secret.
//!
//! # Schemes
//!
//! | scheme | signed | deduplicated on | carried headers |
//! |---|---|---|---|
//! | [`StandardWebhooks`] | id, timestamp, body | `webhook-id` | `webhook-id`, `webhook-timestamp` |
//! | [`Stripe`] | timestamp, body | the body's `id` (else a digest of `t.body`) | `Stripe-Signature` |
//! | [`GitHub`] | body | a digest of the body | `X-GitHub-Event`, `X-GitHub-Delivery`, `X-GitHub-Hook-ID`, `X-GitHub-Hook-Installation-Target-*` |
//! | [`GenericHmac`] | body, or timestamp and body | a digest of the signed content | those you name |
//!
//! Only what a scheme signs is trusted: an unsigned header (GitHub's `X-GitHub-Delivery`, a
//! generic scheme's event id header) is carried for the handler but never used to
//! deduplicate, so a copy of a delivery sent again under a new id is still a duplicate. A
//! delivery whose scheme signs a timestamp stays refused as a duplicate for as long as its
//! timestamp would pass; one whose scheme signs none (GitHub) is refused as a copy while its
//! digest is remembered (the dedup TTL).
//!
//! # Cost of hostile input
//!
//! Checking a delivery costs one MAC per configured secret (one SHA-256 pass over the body
//! each), however many signature entries the header lists: each secret's MAC is computed once
//! and compared with every entry, and at most [`MAX_SIGNATURES`] entries are considered. Headers
//! are checked before the body is read, so a delivery without a well-formed, fresh signature
//! costs no body read. Event ids are at most [`MAX_ID_LEN`] bytes; the in-memory dedup set is
//! bounded.
//!
//! # Queues
//!
//! [`MemoryQueue`] (bounded, the default) here; Redis Streams in `sturdy-redis` (durable, shared
//! by several instances through consumer groups, an event acknowledged only after its handler
//! succeeded, a dead-letter stream for events that keep failing).
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use axum::{routing::post_service, Router};
//! use http::{Request, StatusCode};
//! use sturdy_webhook::{sign_github, GitHub, MemoryQueue, WebhookReceiver};
//! use tower::ServiceExt;
//!
//! let (queue, mut events) = MemoryQueue::new(1_000);
//! let receiver = WebhookReceiver::new(GitHub::new("It's a Secret to Everybody")?, queue);
//! let app = Router::new().route("/webhooks/github", post_service(receiver));
//!
//! let body = "Hello, World!";
//! let req = Request::post("/webhooks/github")
//!     .header("x-hub-signature-256", sign_github("It's a Secret to Everybody", body.as_bytes()))
//!     .header("x-github-event", "ping")
//!     .header("x-github-delivery", "d-1")
//!     .body(axum::body::Body::from(body))?;
//! assert_eq!(app.oneshot(req).await?.status(), StatusCode::OK);
//!
//! let event = events.recv().await.unwrap();
//! assert_eq!((event.scheme.as_str(), event.route.as_str()), ("github", "github"));
//! assert!(event.id.starts_with("sha256:"), "GitHub signs no id: a digest of the body");
//! assert_eq!(event.headers["x-github-event"], "ping");
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]

/// The `http` crate, whose types ([`http::HeaderMap`]) appear in this crate's API.
pub use http;

mod queue;
mod receiver;
mod source;
mod verify;

pub use queue::{BoxFuture, EventQueue, MemoryQueue, MemoryReceiver, Push, WebhookEvent};
pub use receiver::{ResponseFuture, WebhookReceiver, DEFAULT_OFFLOAD_ABOVE};
pub use source::{Cidr, ForwardedHeader, SourceAllowlist, MAX_FORWARDED_HOPS};
pub use verify::{
    decode_standard_secret, sign_github, sign_standard, sign_stripe, Encoding, GenericHmac, GitHub,
    Rejection, StandardWebhooks, Stripe, Verified, Verifier, DEFAULT_TOLERANCE, MAX_ID_LEN,
    MAX_SIGNATURES,
};
