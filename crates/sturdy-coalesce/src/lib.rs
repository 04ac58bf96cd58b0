//! Request coalescing: identical safe calls in flight share one upstream call.
//!
//! `async fn(Request) -> Result<Response<ResponseBody>, BoxError>`, where a burst of identical
//! requests costs one call:
//!
//! - **What is coalesced**: GET and HEAD requests with an empty body and no
//!   [`CallOptions`](sturdy_core::CallOptions) of their own (a request with a deadline or its own
//!   retry settings goes on its own, under them). Two of them are identical
//!   when their method, URI and headers match; by default every header counts except a few
//!   per-request ids (`traceparent`, `tracestate`, `baggage`, `x-request-id`,
//!   `x-correlation-id`), so callers with different credentials (`Authorization`, `Cookie`, an
//!   API-key header) never share a response. Name the headers that matter instead with
//!   [`CoalesceLayer::with_key_headers`]. Everything else passes through untouched.
//! - **Sharing**: the first request calls the inner service; identical requests that arrive
//!   while it is in flight wait for it. The response body is read once into memory (up to 1 MiB)
//!   and every caller gets the status, headers and a [`ResponseBody`] over the same bytes: no
//!   caller reads the network again. A body larger than the bound is not shared: the caller that
//!   started the call gets the response streamed, and every other caller sends its own request.
//! - **Errors are shared too**: each caller gets a [`sturdy_core::Error`] of the shared error's
//!   kind and delivery, whose source chain holds a [`SharedError`] and then the shared error
//!   itself, so `sturdy_core::find` and the classification work as for the original.
//! - **Leaving**: a caller that goes away (its future dropped) does not cancel the call for the
//!   others; when the last caller leaves, the upstream call is dropped, which cancels it. Where
//!   the caller that started the call was also the one sending it (behind `SturdyMiddleware`,
//!   reqwest-middleware's chain lives in that caller's call) and it goes away, the call fails
//!   with [`sturdy_core::DriverGone`] in its chain, and each caller who joined it sends its own
//!   request instead (counted in `fallbacks`). So does a caller who joined, from another tokio
//!   runtime, a call started on a runtime that has shut down, when the call's timers belong to
//!   it or a hyper client's connection task died with it ("runtime dropped the dispatch task").
//! - **Per host**: the calls in flight are kept in a table per host (at most 1,024 hosts), from
//!   the moment the call is made until its response body is read; a request that arrives after
//!   that starts a new call (this is not a cache).
//!
//! In a stack, put it outermost: identical calls then share the whole outcome, retries
//! included, and the layers below see one call.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use std::sync::Arc;
//! use std::time::Duration;
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::{BodyExt, Full};
//! use sturdy_coalesce::CoalesceLayer;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! let calls = Arc::new(AtomicU32::new(0));
//! let counted = calls.clone();
//! let api = service_fn(move |_req: Request<Full<Bytes>>| {
//!     counted.fetch_add(1, Ordering::SeqCst);
//!     async {
//!         tokio::time::sleep(Duration::from_millis(50)).await;
//!         Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from("the report"))))
//!     }
//! });
//! let client = ServiceBuilder::new().layer(CoalesceLayer::new()).service(api);
//!
//! // 100 identical requests at once.
//! let mut callers = Vec::new();
//! for _ in 0..100 {
//!     let req = Request::get("http://api.example.com/report").body(Full::default()).unwrap();
//!     callers.push(tokio::spawn(client.clone().oneshot(req)));
//! }
//! for c in callers {
//!     let res = c.await.unwrap().unwrap();
//!     assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "the report");
//! }
//! assert_eq!(calls.load(Ordering::SeqCst), 1);
//! # }
//! ```
#![forbid(unsafe_code)]

mod body;
mod error;
mod flight;
mod future;
mod handle;
mod layer;
mod service;

pub use body::ResponseBody;
pub use error::SharedError;
pub use future::ResponseFuture;
pub use handle::{CoalesceHandle, CoalesceStats};
pub use layer::CoalesceLayer;
pub use service::Coalesce;
pub use sturdy_core::key::{ByHost, KeyExtractor};
