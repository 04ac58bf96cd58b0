//! Per-host circuit breakers with honest half-open probing.
//!
//! `async fn(Request) -> Result<Response, BoxError>`, failing fast while a dependency is down:
//!
//! - **One breaker per key**: the host by default (its name in any case), or any function of
//!   the request; created
//!   lazily, at most 1,024 kept.
//! - **Opens** when at least 50 % of the calls of the last 30 s failed, once there were at least
//!   100: a flaky API that still mostly works is ridden out, a dead one is cut off. A streak
//!   trigger (`n` failures in a row) is an option. A failure is what
//!   [`Outcome::is_failure`] says of the shared classification ([`DefaultClassify`]): a 5xx, a
//!   timeout, a connect, TLS or transport error, an error nobody recognises, and a 408 (it reads as a timeout); other 4xx and 429 are not,
//!   since they say nothing about the dependency's health. Override it with [`CircuitBreakerLayer::with_classifier`], with the
//!   same [`Classify`] type the retry layer takes.
//! - **Open**: calls fail at once with [`CircuitOpen`](sturdy_core::CircuitOpen) (`retry_in` says
//!   when a probe is next admitted) and the inner service is not called. The open period is 30 s,
//!   doubles on each re-opening up to 5 min, and starts again at 30 s after a close.
//! - **Half-open**: at most 1 probe at a time (configurable); everyone else fails fast, nobody
//!   queues. A failed probe reopens at once; a successful one closes. A probe whose future is
//!   dropped gives its slot back.
//! - **Observable**: state changes are `tracing` events and an optional callback; a
//!   [`CircuitHandle`] reads states and forces a breaker open (isolate) or closed (reset).
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! use http::{Request, Response, StatusCode};
//! use sturdy_circuit::{CircuitBreakerLayer, CircuitState};
//! use sturdy_core::CircuitOpen;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! let down = service_fn(|_req: Request<()>| async {
//!     Ok::<_, std::convert::Infallible>(Response::builder().status(StatusCode::BAD_GATEWAY).body(()).unwrap())
//! });
//! let (layer, handle) = CircuitBreakerLayer::new().pair();
//! let client = ServiceBuilder::new().layer(layer).service(down);
//!
//! // 100 calls, all failing: past the minimum volume, the failure rate opens the breaker.
//! for _ in 0..100 {
//!     let res = client.clone().oneshot(Request::get("http://api.example.com/").body(()).unwrap()).await.unwrap();
//!     assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
//! }
//! let err = client.oneshot(Request::get("http://api.example.com/").body(()).unwrap()).await.unwrap_err();
//! assert!(err.is::<CircuitOpen>());
//! assert!(matches!(handle.state("api.example.com"), Some(CircuitState::Open { .. })));
//! # }
//! ```
#![forbid(unsafe_code)]

mod breaker;
mod config;
mod future;
mod handle;
mod layer;
mod registry;
mod service;

pub use breaker::CircuitState;
pub use future::ResponseFuture;
pub use handle::CircuitHandle;
pub use layer::CircuitBreakerLayer;
pub use service::CircuitBreaker;
pub use sturdy_core::classify::{Classify, DefaultClassify, Outcome};
pub use sturdy_core::key::{ByHost, KeyExtractor};
