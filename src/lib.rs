//! sturdy: tower middleware that makes integrations with real HTTP APIs survive production.
//!
//! Each mechanic is an independent `tower::Layer` in a crate of its own, re-exported here as a
//! module behind a cargo feature of the same name (`full` enables them all; `tls-native-roots`,
//! the system's roots for HTTPS, is separate). [`core`] is always there.
//! With `full`, `ClientBuilder` composes the client layers in the recommended order.
//!
//! | feature | module | crate |
//! |---|---|---|
//! | (always) | [`core`] | `sturdy-core`: error kinds, classification, header parsers, body buffering |
//! | `auth` | `auth` | `sturdy-auth`: `AuthLayer`, OAuth2 `ClientCredentials` |
//! | `retry` | `retry` | `sturdy-retry`: `RetryLayer` |
//! | `circuit` | `circuit` | `sturdy-circuit`: `CircuitBreakerLayer` |
//! | `ratelimit` | `ratelimit` | `sturdy-ratelimit`: `RateLimitLayer` |
//! | `idempotency` | `idempotency` | `sturdy-idempotency`: client and server `IdempotencyLayer` |
//! | `paginate` | `paginate` | `sturdy-paginate`: `Paginate` streams and bounded pages |
//! | `webhook` | `webhook` | `sturdy-webhook`: `WebhookReceiver`, verifiers, queues |
//! | `version` | `version` | `sturdy-version`: `VersionLayer` |
//! | `redis` | `redis` | `sturdy-redis`: Redis quota and idempotency store |
//! | `reqwest` | `reqwest` | `sturdy-reqwest`: `reqwest::Client` under a sturdy stack, `SturdyMiddleware` for reqwest-middleware |
//! | `tls` | `tls` (in this crate) | `https_client()`: an HTTPS hyper-util client (rustls, Mozilla roots); `tls-native-roots` adds `https_client_with_native_roots()` (the system's roots) |
//! | `hedge` | `hedge` | `sturdy-hedge`: `HedgeLayer`, hedged requests after a latency percentile |
//! | `concurrency` | `concurrency` | `sturdy-concurrency`: `AdaptiveConcurrencyLayer`, a per-host limit that adapts |
//! | `coalesce` | `coalesce` | `sturdy-coalesce`: `CoalesceLayer`, identical calls in flight share one |
//! | `metrics` | (in [`core::events`]) | the layers' events counted through the `metrics` facade; every layer that makes a decision (auth, retry, rate limit, circuit breaker, server idempotency, webhooks, hedge, concurrency, coalesce) also takes an `on_event` callback without it; the version layer has `on_notice` |
//!
//! # Example
//!
//! ```
//! # #[cfg(feature = "retry")]
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! let api = service_fn(|_req: Request<Full<Bytes>>| async {
//!     Ok::<_, std::convert::Infallible>(Response::builder().status(StatusCode::TOO_MANY_REQUESTS).header("retry-after", "120").body(()).unwrap())
//! });
//! let client = ServiceBuilder::new().layer(sturdy::retry::RetryLayer::new()).service(api);
//! let err = client.oneshot(Request::get("http://api.example.com/").body(Full::default()).unwrap()).await.unwrap_err();
//! // Two minutes are not slept (the client sleeps at most 60 s): the caller is told, and decides.
//! assert_eq!(err.to_string(), "rate limited by api.example.com; retry after 2m");
//! # }
//! # #[cfg(not(feature = "retry"))]
//! # fn main() {}
//! ```
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub use sturdy_core as core;

mod builder;
pub use builder::ServiceBuilderExt;

#[cfg(feature = "full")]
mod client;
#[cfg(feature = "full")]
pub use client::{Client, ClientBuilder};

/// Authentication: static secrets, OAuth2 client credentials with a token cache ([`sturdy_auth`]).
#[cfg(feature = "auth")]
pub use sturdy_auth as auth;

/// Retries: decorrelated jitter, Retry-After, budgets, an overall deadline ([`sturdy_retry`]).
#[cfg(feature = "retry")]
pub use sturdy_retry as retry;

/// Per-host circuit breakers with honest half-open probing ([`sturdy_circuit`]).
#[cfg(feature = "circuit")]
pub use sturdy_circuit as circuit;

/// Client-side rate limiting that reacts to 429 and quota headers ([`sturdy_ratelimit`]).
#[cfg(feature = "ratelimit")]
pub use sturdy_ratelimit as ratelimit;

/// Idempotency keys: client keys that survive retries, a server store for axum ([`sturdy_idempotency`]).
#[cfg(feature = "idempotency")]
pub use sturdy_idempotency as idempotency;

/// Pagination: page and item streams, bounded pages for agent tools ([`sturdy_paginate`]).
#[cfg(feature = "paginate")]
pub use sturdy_paginate as paginate;

/// Webhooks: verified, deduplicated, acknowledged fast ([`sturdy_webhook`]).
#[cfg(feature = "webhook")]
pub use sturdy_webhook as webhook;

/// API version pinning with Deprecation and Sunset notices ([`sturdy_version`]).
#[cfg(feature = "version")]
pub use sturdy_version as version;

/// Redis backends: a shared rate-limit quota and an idempotency store ([`sturdy_redis`]).
#[cfg(feature = "redis")]
pub use sturdy_redis as redis;

/// reqwest as the HTTP client of sturdy stacks, and sturdy inside reqwest-middleware ([`sturdy_reqwest`]).
#[cfg(feature = "reqwest")]
pub use sturdy_reqwest as reqwest;

#[cfg(feature = "tls")]
pub mod tls;
/// Hedged requests: a second copy of a slow safe call, within a budget ([`sturdy_hedge`]).
#[cfg(feature = "hedge")]
pub use sturdy_hedge as hedge;

/// An adaptive concurrency limit per host: AIMD or latency-based ([`sturdy_concurrency`]).
#[cfg(feature = "concurrency")]
pub use sturdy_concurrency as concurrency;

/// Request coalescing: identical safe calls in flight share one upstream call ([`sturdy_coalesce`]).
#[cfg(feature = "coalesce")]
pub use sturdy_coalesce as coalesce;

// The README's examples are compiled as doc tests.
#[cfg(all(doctest, feature = "full"))]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

// So are the metrics guide's.
#[cfg(all(doctest, feature = "full"))]
#[doc = include_str!("../docs/guides/metrics.md")]
struct MetricsGuideDoctests;
