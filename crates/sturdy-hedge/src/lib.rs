//! Hedged requests: a second copy of a slow safe call, after a percentile of the host's latency.
//!
//! `async fn(Request) -> Result<Response, BoxError>`, with a shorter tail:
//!
//! - **What is hedged**: GET, HEAD and OPTIONS requests, which are safe to send twice; requests
//!   of any method that carry an `Idempotency-Key` only when you allow it
//!   ([`HedgeLayer::with_keyed_requests`]). Everything else passes through untouched. The body
//!   type must be `Clone` (`Full<Bytes>`, `()`, ...): the second copy is a clone of the request.
//! - **When**: once the first copy has been outstanding longer than the host's 95th-percentile
//!   latency (configurable), read from a lock-free histogram of that host's recent calls (the
//!   last 10 to 20 s, 12.5 % resolution). Until the host has 100 samples, nothing is hedged.
//! - **How much**: a budget caps the second copies at 5 % of calls plus a burst of 10 per host;
//!   a hedge that finds the budget spent is not sent.
//! - **Which answer**: the first response wins and the other copy is dropped, which cancels it
//!   (hyper closes that connection). When one copy fails while the other is still running, the
//!   call waits for the other. When both fail, the call fails with the later error, unless that
//!   one says the request was never sent (a refused connection) while the earlier one may have
//!   been processed (a reset after the request was written): then with the earlier one, so
//!   [`classify::delivery`](sturdy_core::classify::delivery) never claims "not sent" for a call
//!   one of whose copies may have reached the server.
//! - **Per host**: every host has its own histogram, delay and budget (at most 1,024 hosts).
//! - **Observable**: a [`HedgeHandle`] reads calls, hedges, wins and the current delay per host.
//!
//! This is "The Tail at Scale" (Dean and Barroso, 2013) technique of hedged requests deferred to
//! the 95th-percentile latency. In a stack, put it inside the retry layer and above the breaker,
//! the rate limiter and a concurrency limit, so each copy is an attempt they admit and count.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use std::sync::Arc;
//! use std::time::Duration;
//! use http::{Request, Response};
//! use sturdy_hedge::HedgeLayer;
//! use tokio::time::Instant;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! // Every call takes 10 ms, except the 150th, which takes 1 s.
//! let n = Arc::new(AtomicU32::new(0));
//! let api = service_fn(move |_req: Request<()>| {
//!     let i = n.fetch_add(1, Ordering::SeqCst);
//!     async move {
//!         let ms = if i == 149 { 1_000 } else { 10 };
//!         tokio::time::sleep(Duration::from_millis(ms)).await;
//!         Ok::<_, std::convert::Infallible>(Response::new(()))
//!     }
//! });
//! let (layer, handle) = HedgeLayer::new().pair();
//! let client = ServiceBuilder::new().layer(layer).service(api);
//! let get = || Request::get("http://api.example.com/orders/1").body(()).unwrap();
//!
//! for _ in 0..149 {
//!     client.clone().oneshot(get()).await.unwrap();
//! }
//! let start = Instant::now();
//! client.clone().oneshot(get()).await.unwrap();
//! // Hedged after the p95 (10 ms), the copy answered 10 ms later; the slow first copy was dropped.
//! assert!(start.elapsed() < Duration::from_millis(25));
//! let stats = handle.stats("api.example.com").unwrap();
//! assert_eq!((stats.calls(), stats.hedges(), stats.hedge_wins()), (150, 1, 1));
//! # }
//! ```
#![forbid(unsafe_code)]

mod budget;
mod future;
mod handle;
mod histogram;
mod layer;
mod service;
mod state;

pub use future::ResponseFuture;
pub use handle::{HedgeHandle, HedgeStats};
pub use layer::HedgeLayer;
pub use service::Hedge;
pub use sturdy_core::key::{ByHost, KeyExtractor};
