//! Client-side rate limiting that reacts to the server, so one 429 does not become fifty.
//!
//! `async fn(Request) -> Result<Response, BoxError>`, paced:
//!
//! - **Quota**: a rate and a burst ([`Quota`]), enforced with GCRA on one `AtomicU64` per key:
//!   no lock and no allocation per decision, shared by every clone and thread.
//! - **Waiting**: a call without a slot reserves the next one and waits for it (a timer in its
//!   response future), up to `max_wait` \[30 s\]; a call that would wait longer fails at once with
//!   [`RateLimited`](sturdy_core::RateLimited) carrying the wait.
//! - **Adaptive**: a 429 or 503 with `Retry-After`, a `RateLimit` field with `r=0` and a reset, or
//!   `X-RateLimit-Remaining: 0` with a reset, pauses every caller of that key until then; a bare
//!   429 pauses 1 s. The pause ends by itself, and a later, shorter reset never cuts it short.
//! - **Keys**: per host by default, or any function of the request (per API token, per tenant).
//! - **Shared across processes**: [`RateLimitLayer::with_remote`] keeps the quota in a store such
//!   as Redis (`sturdy-redis`), one round trip per decision.
//! - **Concurrency**: cap calls in flight with tower's `GlobalConcurrencyLimitLayer` next to this
//!   layer; see the example.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! use std::time::Duration;
//! use http::{Request, Response};
//! use sturdy_ratelimit::{Quota, RateLimitLayer};
//! use tokio::time::Instant;
//! use tower::limit::GlobalConcurrencyLimitLayer;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! let api = service_fn(|_req: Request<()>| async { Ok::<_, std::convert::Infallible>(Response::new(())) });
//! let client = ServiceBuilder::new()
//!     .layer(RateLimitLayer::new(Quota::per_second(10).unwrap().with_burst(5).unwrap()))
//!     .layer(GlobalConcurrencyLimitLayer::new(8))
//!     .service(api);
//!
//! let start = Instant::now();
//! for _ in 0..15 {
//!     client.clone().oneshot(Request::get("http://api.example.com/").body(()).unwrap()).await.unwrap();
//! }
//! // 5 at once, then one every 100 ms.
//! assert_eq!(start.elapsed(), Duration::from_secs(1));
//! # }
//! ```
#![forbid(unsafe_code)]

mod direct;
mod future;
mod gate;
mod gcra;
mod handle;
mod layer;
mod remote;
mod service;
mod state;

pub use direct::DirectLimiter;
pub use future::{PauseCapped, ResponseFuture};
pub use gcra::{InvalidQuota, Quota};
pub use handle::RateLimitHandle;
pub use layer::{RateLimitLayer, DEFAULT_MAX_PAUSE, DEFAULT_RELEASE_PACE};
pub use remote::{BoxFuture, OnStoreError, RemoteQuota, Reserve};
pub use service::RateLimit;
pub use sturdy_core::headers::PauseSource;
pub use sturdy_core::key::{ByHost, KeyExtractor};
