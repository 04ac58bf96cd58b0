//! Authentication for HTTP clients, with secrets kept secret.
//!
//! `async fn(Request) -> Result<Response, BoxError>`, with credentials:
//!
//! - **Static**: [`AuthLayer::bearer`], [`AuthLayer::api_key`] (a named header),
//!   [`AuthLayer::api_key_query`] and [`AuthLayer::basic`]. Secrets are held in [`secrecy`] types,
//!   inserted headers are marked sensitive (`HeaderValue::set_sensitive`), and no `Debug` output
//!   or `tracing` event shows a secret.
//! - **Tokens**: any [`TokenSource`], such as [`ClientCredentials`] (OAuth2 client credentials,
//!   RFC 6749 §4.4, `client_secret_basic` or `client_secret_post`, scopes, audience). Its cache
//!   reuses a token until `expiry - skew` (60 s, at most half the lifetime), makes one token
//!   request however many callers arrive at expiry, keeps a still-valid token when a refresh
//!   fails (and backs off before the next try), and turns token-endpoint errors
//!   (`invalid_client`, `invalid_scope`, non-JSON bodies, 5xx...) into errors that say what to
//!   fix; a 5xx from the token endpoint is retryable, `invalid_client` is not.
//! - **401**: with a token source, a 401 from the API invalidates the token, fetches a new one and
//!   replays the request once (the body is buffered up to 1 MiB for this); a second 401 is
//!   returned as is. 403 is never retried.
//! - **Bounded waits**: a call waits for a token at most [`AuthLayer::with_token_timeout`]
//!   \[30 s\], then fails with a retryable [`ErrorKind::Timeout`](sturdy_core::ErrorKind) error
//!   that names the token endpoint; the token request itself goes on for later callers. Each
//!   OAuth2 token request is bounded by [`ClientCredentials::with_request_timeout`] \[30 s\], so
//!   a token endpoint that never answers cannot hold the cache up.
//!
//! # Errors
//!
//! Every failure this crate explains itself (a token endpoint's refusal, a malformed token
//! response, an unreachable or silent endpoint, a token wait that ran out of time, an unreadable
//! request body) is a [`sturdy_core::Error`], found with
//! `err.downcast_ref::<sturdy_core::Error>()` on the error the service returns; its
//! [`kind`](sturdy_core::Error::kind) says whether trying again may help. Errors of a custom
//! [`TokenSource`] are wrapped in one too (kept as they are when they already are one). Errors of
//! the inner service are passed through unchanged.
//!
//! # Where it sits: `Buffer`, concurrency limits, kept services
//!
//! The request goes to the service that `poll_ready` made ready. A call that waits for a token
//! holds that ready service (and whatever it reserved: a `ConcurrencyLimit` permit, a `Buffer`
//! slot) in its response future, calls it once the token is there, and gives it back when the
//! future completes or is dropped. So `Auth` works over or under `tower::buffer::Buffer` and
//! concurrency limits, driven by `oneshot` or by a service kept across calls
//! (`svc.ready().await?.call(req)`). Wherever a concurrency limit sits, a call that waits for a
//! token holds its permit during the wait (bounded by the token timeout); the token request
//! itself does not go through the limit unless the token client does.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use sturdy_auth::AuthLayer;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! let api = service_fn(|req: Request<Full<Bytes>>| async move {
//!     let auth = req.headers()["authorization"].clone();
//!     assert!(auth.is_sensitive());
//!     let status = if auth == "Bearer s3cr3t" { StatusCode::OK } else { StatusCode::UNAUTHORIZED };
//!     Ok::<_, std::convert::Infallible>(Response::builder().status(status).body(()).unwrap())
//! });
//! let layer = AuthLayer::bearer("s3cr3t").unwrap();
//! assert!(!format!("{layer:?}").contains("s3cr3t"));
//! let client = ServiceBuilder::new().layer(layer).service(api);
//! let res = client.oneshot(Request::get("http://api.example.com/").body(Full::default()).unwrap()).await.unwrap();
//! assert_eq!(res.status(), StatusCode::OK);
//! # }
//! ```
//!
//! # Public dependencies
//!
//! Signatures use `http` 1, `http-body` 1, `bytes` 1, `tokio` 1 (`tokio::time::Instant` in
//! [`Token`]) and tower's `Service`/`Layer`. The two pre-1.0 crates that appear in them are
//! re-exported, so you need not depend on the same version yourself: [`secrecy`] (with
//! [`SecretString`] and [`ExposeSecret`] at the root) and [`http_body_util`] (the token client
//! takes `Request<http_body_util::Full<Bytes>>`).
#![forbid(unsafe_code)]

mod future;
mod layer;
mod oauth;
mod service;
mod token;

pub use future::ResponseFuture;
pub use layer::AuthLayer;
pub use oauth::{ClientAuth, ClientCredentials};
pub use service::Auth;
pub use token::{BoxFuture, Token, TokenSource};

pub use http_body_util;
pub use secrecy;
pub use secrecy::{ExposeSecret, SecretString};
