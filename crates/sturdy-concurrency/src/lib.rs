//! An adaptive concurrency limit per host: it finds how many calls a server can take at once.
//!
//! `async fn(Request) -> Result<Response, BoxError>`, with at most `limit` calls in flight per
//! host, where `limit` moves with what the server says:
//!
//! - **[`Algorithm::Aimd`]** (the default): on an overload signal (429, 503, 504, a timeout) the
//!   limit is multiplied by 0.9, at most once per round trip (signals from calls admitted before
//!   the last decrease are not acted on again); each successful call adds `1 / limit` while at
//!   least half the limit is in use, so the limit grows by about one per round trip. It finds a
//!   capacity by exceeding it, so it suits servers that shed load.
//! - **[`Algorithm::Vegas`]**: latency-based, after TCP Vegas (the design of Netflix's
//!   concurrency-limits library). Once per window of calls it compares the window's average
//!   latency with the lowest recent one and estimates how many calls wait at the server; it grows
//!   the limit while that queue is short and shrinks it while it is long, so it settles a few
//!   calls above the server's capacity before the server fails anything. Overload signals back
//!   off as in AIMD.
//! - **Bounds**: the limit starts at 20 and stays between 1 and 1,000 (configurable).
//! - **Waiting**: a call that finds its host's limit full waits in line for a place, up to 30 s,
//!   then fails with [`LimitReached`] (inside a [`sturdy_core::Error`] of kind `RateLimited`,
//!   not sent); a maximum wait of zero sheds load instead.
//! - **Per host**: every host has its own limit (at most 1,024 hosts); the permit is taken when
//!   the call is made and held until its response arrives or the call is dropped.
//! - **Visible**: a [`ConcurrencyHandle`] reads each host's limit, calls in flight and waiting.
//!
//! In a stack, put it below the rate limiter, so a call waiting for a rate slot does not hold a
//! place, and below a hedging layer, so each hedged copy takes a place of its own.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use std::sync::Arc;
//! use std::time::Duration;
//! use http::{Request, Response, StatusCode};
//! use sturdy_concurrency::AdaptiveConcurrencyLayer;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! // A server that takes 10 calls at once and answers 503 beyond.
//! let in_flight = Arc::new(AtomicUsize::new(0));
//! let api = service_fn(move |_req: Request<()>| {
//!     let in_flight = in_flight.clone();
//!     async move {
//!         let n = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
//!         tokio::time::sleep(Duration::from_millis(10)).await;
//!         in_flight.fetch_sub(1, Ordering::SeqCst);
//!         let status = if n > 10 { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
//!         Ok::<_, std::convert::Infallible>(Response::builder().status(status).body(()).unwrap())
//!     }
//! });
//! let (layer, handle) = AdaptiveConcurrencyLayer::new().pair();
//! let client = ServiceBuilder::new().layer(layer).service(api);
//!
//! // 40 callers, 50 calls each.
//! let mut callers = Vec::new();
//! for _ in 0..40 {
//!     let client = client.clone();
//!     callers.push(tokio::spawn(async move {
//!         for _ in 0..50 {
//!             let req = Request::get("http://api.example.com/").body(()).unwrap();
//!             let _ = client.clone().oneshot(req).await;
//!         }
//!     }));
//! }
//! for c in callers {
//!     c.await.unwrap();
//! }
//! // The limit started at 20 and came down to the server's capacity.
//! let limit = handle.limit("api.example.com").unwrap();
//! assert!((8..=11).contains(&limit), "{limit}");
//! # }
//! ```
#![forbid(unsafe_code)]

mod algorithm;
mod error;
mod future;
mod handle;
mod layer;
mod limiter;
mod service;

pub use algorithm::Algorithm;
pub use error::LimitReached;
pub use future::ResponseFuture;
pub use handle::{ConcurrencyHandle, LimitState};
pub use layer::AdaptiveConcurrencyLayer;
pub use service::AdaptiveConcurrency;
pub use sturdy_core::classify::{Classify, DefaultClassify, Outcome};
pub use sturdy_core::key::{ByHost, KeyExtractor};
