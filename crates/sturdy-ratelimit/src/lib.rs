//! Client-side rate limiting that reacts to the server, so one 429 does not become fifty.
//!
//! `async fn(Request) -> Result<Response, BoxError>`, paced:
//!
//! - **Quota**: a rate and a burst ([`Quota`]), enforced with GCRA on one `AtomicU64` per key,
//!   shared by every clone and thread. A call that can go now takes its slot with one
//!   compare-and-swap and no lock (each service caches the state of the last key it saw; another
//!   key costs a lookup under a read lock).
//! - **Waiting in line**: a call without a slot joins its key's line (first come, first served)
//!   and waits in its response future (a timer, no polling loop), up to `max_wait` \[30 s\]. A
//!   call whose turn would come later than that, counting the calls ahead of it, fails at once
//!   with [`RateLimited`](sturdy_core::RateLimited) carrying the wait. Nothing is reserved while
//!   a call waits: a call dropped in line leaves it, and the ones behind it move up.
//! - **Adaptive**: a 429 or 503 with `Retry-After`, a `RateLimit` field with `r=0` and a reset,
//!   or `X-RateLimit-Remaining: 0` with a reset (on any status), pauses every caller of that key
//!   until then; a bare 429 pauses 1 s. The pause ends by itself, and a later, shorter reset never
//!   cuts it short.
//! - **Bounded pauses**: a pause is at most `max_pause` \[5 min, [`DEFAULT_MAX_PAUSE`]\]. A
//!   longer one (a hostile or broken header, e.g. `Retry-After: 99999999999999999999`) is stored
//!   as the cap; the response that asked for it is returned as it came, with a [`PauseCapped`] in
//!   its extensions and a `tracing` warning. A [`RateLimitHandle`] reads and clears pauses.
//! - **Paced after a pause**: when a pause ends, the calls that waited for it leave in order, each
//!   in its own slot of the quota, not all at once. Without a quota of our own
//!   ([`RateLimitLayer::adaptive_only`]) they leave by slow start: one first, then one more for
//!   each released call that succeeds, so twice as many each round trip while the server copes,
//!   and a reply that asks for a new pause holds back the rest
//!   ([`RateLimitLayer::with_release_pace`] spaces them in time instead).
//! - **A pace learned from bare 429s**: without a quota, the first bare 429 (no header saying how
//!   long) of a pause sets a pace for every call of the key (one per eighth of the pause: 125 ms
//!   by default); a bare 429 at that pace halves the rate, down to one call per pause (and pauses
//!   one interval), every other answer (not a 429 or 503) raises it by a sixteenth, and once its interval is under a millisecond it is forgotten. This is
//!   what a limiter counting calls per second (nginx's `limit_req`) needs: slow start counts
//!   calls in flight, and on a fast network its ramp meets the limit again within a millisecond.
//! - **Keys**: per host by default (its name in any case: `API.example.com` and `api.example.com`
//!   share one quota), or any function of the request (per API token, per tenant).
//! - **Shared across processes**: [`RateLimitLayer::with_remote`] keeps the quota in a store such
//!   as Redis (`sturdy-redis`), one round trip per decision. A call that waited for a remote slot
//!   and is dropped, or that a pause overtakes, gives the slot back
//!   ([`RemoteQuota::release`]).
//! - **Where it sits**: the call goes to the inner service that `poll_ready` made ready, also
//!   after a wait, so `RateLimit` may sit over or under tower's `Buffer`, `ConcurrencyLimit` and
//!   `GlobalConcurrencyLimit`, driven by `oneshot` or by a kept service
//!   (`ready().await?.call(req)`). A waiting call holds what the inner service reserved in
//!   `poll_ready` (a concurrency permit, a buffer slot) until it goes: over a concurrency limit
//!   of `n`, at most `n` calls wait in the line and the others wait for a permit. A refused
//!   call gives it back at once.
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
pub use layer::{RateLimitLayer, DEFAULT_MAX_PAUSE};
pub use remote::{BoxFuture, OnStoreError, RemoteQuota, Reserve};
pub use service::RateLimit;
pub use sturdy_core::headers::PauseSource;
pub use sturdy_core::key::{ByHost, KeyExtractor};
