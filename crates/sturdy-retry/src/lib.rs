//! Retries for HTTP clients that do not turn one failure into a storm or a duplicate payment.
//!
//! `async fn(Request) -> Result<Response, BoxError>`, retried:
//!
//! - **What**: the outcomes the classifier calls retryable ([`RetryLayer::with_classifier`];
//!   by default [`sturdy_core::classify`]): 408, 425, 429, 500, 502, 503, 504, connect and
//!   transport errors, timeouts. Never 400, 401, 403, 404, 422 or any other permanent outcome
//!   (401 belongs to the auth layer). Also a 409 with `Retry-After` to a request that carries an
//!   idempotency key (the first request with that key is still running on the server), and an
//!   open circuit breaker whose `retry_in` fits the call's deadline (a half-open one, whose probe
//!   is out, is looked at again after each backoff base, plus up to the `Retry-After` jitter,
//!   until the deadline; such refusals sent
//!   nothing and use up neither attempts nor the retry budget).
//! - **Only when safe**: GET, HEAD, PUT, DELETE, OPTIONS and TRACE retry freely; POST and PATCH only
//!   when they carry an `Idempotency-Key` header, or when the failure proves the request never left
//!   (a refused connection, an open breaker, a local rate limit).
//! - **When**: decorrelated jitter by default ([`Backoff`]); a `Retry-After` on a 429, a 503 or an
//!   in-flight 409 overrides it, never shortened and with up to +20 % jitter so clients do not
//!   come back in lock-step. A `Retry-After` longer than 60 s, or past the overall deadline, or
//!   with no attempt left, is not slept: on a 429 or a 503 the call fails at once with a
//!   [`RateLimited`](sturdy_core::RateLimited) carrying the wait in its error chain, so the caller
//!   decides (a 409 is returned as it is).
//! - **How much**: 4 attempts in all; an optional overall deadline over attempts and sleeps (a
//!   deadline that ends while a layer below holds the attempt back, for a rate-limit turn, a
//!   token or a concurrency place, says the attempt was never sent and what it waited for, with
//!   [`RetryLayer::with_hold_marks`] on, as `sturdy::ClientBuilder` sets it: see
//!   [`sturdy_core::hold`]); a
//!   retry budget per host (tower's `TpsBudget` arithmetic: 20 % of the calls of the last 10 s,
//!   plus a reserve of 10 per second over those 10 s, which a burst may spend at once) shared by
//!   every clone, so an outage does not multiply traffic.
//! - **Bodies**: a body whose size hint proves it fits the limit \[1 MiB\] is buffered and every
//!   attempt sends the same bytes; a larger or unbounded streaming body is sent once, not retried.
//!   Attempts are rebuilt from those bytes (`B: From<Bytes>`), which cannot carry trailers: a
//!   buffered body that ends with trailers is refused with a `Body` error before it is sent
//!   (not sent without them); to keep them, send it with `CallOptions::without_retries()` or
//!   as a body of unknown size (no upper bound within the limit in its size hint: sent once, as
//!   it is).
//! - **Per request**: a [`sturdy_core::CallOptions`] in the request's extensions overrides the
//!   attempts and the deadline for that request.
//! - **Reporting**: each attempt and sleep is a `tracing` event and, when the request carries a
//!   [`sturdy_core::Trace`], a trace entry. A final error *response* (say a 503) is returned as
//!   it is. A final *error* is one [`sturdy_core::Error`] that speaks for the whole call: the
//!   root cause in plain words ("gave up after 4 attempts: connection reset by peer"), a
//!   [`CallReport`](sturdy_core::CallReport) with the attempts, whether any of them may have been
//!   processed, and the idempotency key; for a POST or PATCH, what to do next ("retry with the
//!   same idempotency key ..."). The last attempt's error is its `source()`; find a type in the
//!   chain with [`sturdy_core::find`].
//!
//! The decisions follow the shape of tower's retry `Policy`, and the per-host budget counts as
//! tower's `TpsBudget` does (any tower `Budget` can be given with
//! [`RetryLayer::with_shared_budget`]); it is kept here so that the first call after a long idle
//! costs what any call does (`TpsBudget` moves its windows on one by one under a lock: a
//! month idle is millions of turns). The loop is the crate's own: the first attempt goes to the service `poll_ready`
//! made ready, a retry polls that same service again (tower's loop clones the whole inner stack
//! into each call's future, which cost more than everything else the layer does), a body is read
//! once and replayed without a copy, and the deadline bounds the whole.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use std::sync::Arc;
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use sturdy_retry::RetryLayer;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! // A flaky API: two 503s, then 200.
//! let calls = Arc::new(AtomicU32::new(0));
//! let counter = calls.clone();
//! let api = service_fn(move |_req: Request<Full<Bytes>>| {
//!     let n = counter.fetch_add(1, Ordering::SeqCst);
//!     async move {
//!         let status = if n < 2 { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
//!         Ok::<_, std::convert::Infallible>(Response::builder().status(status).body(()).unwrap())
//!     }
//! });
//!
//! let client = ServiceBuilder::new().layer(RetryLayer::new().with_seed(1)).service(api);
//! let res = client.oneshot(Request::get("http://api.example.com/orders").body(Full::default()).unwrap()).await.unwrap();
//! assert_eq!(res.status(), StatusCode::OK);
//! assert_eq!(calls.load(Ordering::SeqCst), 3);
//! # }
//! ```
#![forbid(unsafe_code)]

mod backoff;
mod budget;
mod future;
mod head;
mod layer;
mod policy;
mod service;
mod timeout;

pub use backoff::{Backoff, InvalidBackoff};
pub use future::ResponseFuture;
pub use layer::RetryLayer;
pub use service::Retry;
pub use timeout::{AttemptTimeout, AttemptTimeoutLayer, TimeoutFuture};

/// The longest wait a [`RateLimited`](sturdy_core::RateLimited) error from this layer reports
/// when a server asked for more than the client sleeps (see
/// [`RetryLayer::with_max_retry_after`]): 5 minutes, the longest pause the rate limiter takes
/// from a server by default. A longer `max_retry_after` raises it to that setting.
pub const MAX_REPORTED_WAIT: std::time::Duration = std::time::Duration::from_secs(300);
