//! reqwest for sturdy: keep reqwest's `RequestBuilder`, get every sturdy mechanic.
//!
//! Two ways in:
//!
//! - [`ReqwestService`]: `reqwest::Client` as the HTTP client at the bottom of any sturdy stack,
//!   a `tower::Service<http::Request<B>>`, so `sturdy::ClientBuilder::new().build(ReqwestService::new(client))`
//!   is a `Clone + Send + Sync` sturdy client (idempotency keys, retries, circuit breakers, rate
//!   limits, and auth and version pins when configured) that sends with reqwest.
//! - `SturdyMiddleware` (feature `middleware`, on by default): a
//!   `reqwest_middleware::Middleware` that runs a sturdy stack, so code built on
//!   `reqwest_middleware::ClientWithMiddleware` adopts sturdy by adding one `.with(..)` and
//!   keeps `.json()`, `.query()`, `.bearer_auth()` and `.timeout()`.
//!
//! Either way, reqwest's errors are converted at the boundary into [`sturdy_core::Error`]s with
//! the kind sturdy's classification gives the same failure from hyper-util
//! ([`from_reqwest_error`]): a reqwest timeout is `Timeout` and is retried, a connect error is
//! `Connect`, a body error is `Body`. One difference: reqwest follows redirects out of sturdy's
//! sight, so a connect error may be on a redirect's target after the server got the request; it
//! is reported as "may have been processed", not as never sent. The retry layer's final message
//! names the root cause: `gave up after 4 attempts: connection refused`.
//!
//! reqwest carries every header but `Authorization`, `Cookie`, `Cookie2`,
//! `Proxy-Authorization` and `WWW-Authenticate` to another origin when it follows a redirect there; with an API key in a header of its own
//! (`x-api-key`), build the client with [`same_origin_redirects`].
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use std::time::Duration;
//! use sturdy::retry::{Backoff, RetryLayer};
//! use sturdy::ClientBuilder;
//! use sturdy_chaos::{ChaosServer, Knobs};
//! use sturdy_reqwest::SturdyMiddleware;
//!
//! // Every request waits 200 ms before the server answers.
//! let server = ChaosServer::start(Knobs { latency: Duration::from_millis(200), ..Knobs::default() })
//!     .await
//!     .unwrap();
//! let retry = RetryLayer::new()
//!     .with_backoff(Backoff::decorrelated_jitter(Duration::from_millis(5), Duration::from_millis(20)).unwrap());
//! let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
//!     .with(SturdyMiddleware::new(|next| ClientBuilder::new().with_retry(retry).build(next)))
//!     .build();
//! let err = client
//!     .get(server.url("/orders/o_1"))
//!     .timeout(Duration::from_millis(20))
//!     .send()
//!     .await
//!     .unwrap_err();
//! // reqwest's timeout is a timeout to sturdy: retried, then reported for the whole call.
//! assert_eq!(err.to_string(), "gave up after 4 attempts: timed out (reqwest's timeout)");
//! let report = sturdy_reqwest::find::<sturdy_core::Error>(&err).unwrap().report().unwrap();
//! assert_eq!(report.attempts(), 4);
//! # }
//! ```
//!
//! # Feature flags
//!
//! - `middleware` (default): `SturdyMiddleware`, `NextAttempt`, `find` and `delivery`,
//!   with a dependency on reqwest-middleware.
//!
//! reqwest is used with its default features off; enable the ones you need (`json`, `query`,
//! a TLS backend) on your own `reqwest` dependency, and cargo unifies them. The versions sturdy
//! builds with are re-exported: [`reqwest`] and `reqwest_middleware`.
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod body;
mod error;
#[cfg(feature = "middleware")]
mod middleware;
mod redirect;
mod service;

pub use body::ResponseBody;
pub use error::from_reqwest_error;
#[cfg(feature = "middleware")]
pub use middleware::{NextAttempt, NextAttemptFuture, SturdyMiddleware};
pub use redirect::same_origin_redirects;
pub use service::{ReqwestService, ResponseFuture};

pub use reqwest;
#[cfg(feature = "middleware")]
pub use reqwest_middleware;

/// The first error of type `T` in a reqwest-middleware error's chain.
///
/// A failed call through a [`SturdyMiddleware`] is `reqwest_middleware::Error::Middleware`;
/// sturdy's error is in its `source()` chain (so `sturdy_core::find` and
/// `sturdy_core::summary::ErrorSummary::of` read it too), and this looks in either variant,
/// reqwest's own errors included, as `sturdy_core::find` does: the chain first, then what is
/// attached beside a cause (`sturdy_core::Error::related`, where the retry layer keeps a refusal
/// that came after a sent attempt): `find::<sturdy_core::Error>(&err)` (the retry layer's report,
/// kind, idempotency key), `find::<sturdy_core::RateLimited>(&err)`,
/// `find::<sturdy_core::CircuitOpen>(&err)`, `find::<reqwest::Error>(&err)`.
#[cfg(feature = "middleware")]
pub fn find<T: std::error::Error + 'static>(err: &reqwest_middleware::Error) -> Option<&T> {
    match err {
        // `sturdy_core::find`, not anyhow's own chain: it also looks in what the retry layer
        // attached beside the cause (`Error::related`), e.g. a breaker's refusal after a sent
        // attempt.
        reqwest_middleware::Error::Middleware(e) => sturdy_core::find::<T>(&**e),
        reqwest_middleware::Error::Reqwest(e) => sturdy_core::find::<T>(e),
    }
}

/// Whether a failed call may have reached the server: sturdy's
/// [`delivery`](sturdy_core::classify::delivery) for a reqwest-middleware error.
///
/// After `Delivery::NotSent` the request may be sent again; after `Delivery::MaybeProcessed` only
/// with the same idempotency key.
///
/// A reqwest error that did not go through `SturdyMiddleware` (the `Reqwest` variant) is read
/// with what it says alone: a builder error as not sent, every other as may have been
/// processed. reqwest raises builder errors before sending, except one for a redirect's
/// `Location` it cannot use (an `ftp:` target), raised after the server answered; through
/// `SturdyMiddleware` (the `Middleware` variant) that case reads as may have been processed,
/// from the variant alone it cannot be told apart.
#[cfg(feature = "middleware")]
pub fn delivery(err: &reqwest_middleware::Error) -> sturdy_core::Delivery {
    match err {
        reqwest_middleware::Error::Middleware(e) => {
            let e: &(dyn std::error::Error + 'static) = &**e;
            sturdy_core::classify::delivery(e)
        }
        // As `from_reqwest_error` says: a builder error is read as never sent (see the docs for
        // the redirect case it cannot tell apart); a connect error may be on a redirect's
        // target, after the server got it.
        reqwest_middleware::Error::Reqwest(e) if e.is_builder() => sturdy_core::Delivery::NotSent,
        reqwest_middleware::Error::Reqwest(_) => sturdy_core::Delivery::MaybeProcessed,
    }
}

// The guide's examples are compiled and run as doc tests.
#[cfg(all(doctest, feature = "middleware"))]
#[doc = include_str!("../../../docs/guides/reqwest.md")]
struct GuideDoctests;
