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
//!   reuses a token until `expiry - skew` (60 s, at most half the lifetime), then refreshes it
//!   in the background while callers go on with the still-valid token (a caller waits only when
//!   there is no valid token), makes one token request however many callers arrive at once,
//!   keeps a still-valid token when a refresh
//!   fails (and backs off before the next try: 1 s, doubling, at most 60 s; a caller with no
//!   valid token during the backoff gets the last error at once, saying when the endpoint is
//!   asked again), and turns token-endpoint errors (`invalid_client`, `invalid_scope`, non-JSON
//!   bodies, 5xx...) into errors that say what to fix; a 500, 502, 503, 504, 429, 425 or 408
//!   from the token endpoint is retryable (the statuses the retry layer retries), another 5xx
//!   and `invalid_client` are not. A token request lost with its runtime (shut down
//!   mid-request) is started again by the next caller; one whose connection broke under it (a
//!   pooled connection the server had closed) is sent once more at once, the grant being safe
//!   to repeat.
//! - **401**: with a token source, a 401 from the API invalidates the token, fetches a new one and
//!   replays the request once (the body is buffered up to 1 MiB for this; one that ends with
//!   trailers, which a request rebuilt from its bytes cannot carry, fails unsent with a `Body`
//!   error); a second 401 is
//!   returned as is. 403 is never retried. An API that refuses every token does not cost a
//!   token request per call: with [`ClientCredentials`], a token the API refused before it
//!   accepted any request with it, after the token before it went the same way, is kept for 1 s
//!   from its fetch (doubling with each such token in a row, at most the token backoff's 60 s)
//!   and its 401s are returned as they are, without a replay; a token that worked and is then
//!   refused is replaced at once.
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
//! slot) in its response future and calls it, without polling readiness again, once the token
//! is there; if the future is dropped first, the reservation is dropped with it. The replay
//! after a 401 drives the same service to readiness again, after the first response released
//! what it held. So `Auth` works over or under `tower::buffer::Buffer` and concurrency limits,
//! driven by `oneshot` or by a service kept across calls (`svc.ready().await?.call(req)`).
//! Wherever a concurrency limit sits, a call that waits for a token holds its permit during the
//! wait (bounded by the token timeout); the token request itself does not go through the limit
//! unless the token client does.
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
//! OAuth2 client credentials, here with an in-process token endpoint, a concurrency limit of
//! one under the layer, and a service kept across calls:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), sturdy_core::BoxError> {
//! use std::time::Duration;
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use sturdy_auth::{AuthLayer, ClientCredentials};
//! use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
//!
//! let token_endpoint = service_fn(|_req: Request<Full<Bytes>>| async {
//!     let body = r#"{"access_token":"t-1","token_type":"Bearer","expires_in":3600}"#;
//!     Ok::<_, sturdy_core::BoxError>(Response::new(Full::<Bytes>::from(body)))
//! });
//! let tokens = ClientCredentials::new(token_endpoint, "https://auth.example.com/oauth/token", "my-client", "my-secret")?
//!     .with_scopes(["orders:read"])
//!     .with_request_timeout(Duration::from_secs(10));
//! let api = service_fn(|req: Request<Full<Bytes>>| async move {
//!     assert_eq!(req.headers()["authorization"], "Bearer t-1");
//!     Ok::<_, sturdy_core::BoxError>(Response::new(()))
//! });
//! let mut client = ServiceBuilder::new()
//!     .layer(AuthLayer::oauth2(tokens).with_token_timeout(Duration::from_secs(5)))
//!     .concurrency_limit(1)
//!     .service(api);
//! for _ in 0..3 {
//!     let req = Request::get("https://api.example.com/orders").body(Full::default())?;
//!     let res = client.ready().await?.call(req).await?;
//!     assert_eq!(res.status(), StatusCode::OK);
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # Public dependencies
//!
//! Signatures use `http` 1, `http-body` 1, `bytes` 1, `tokio` 1 (`tokio::time::Instant` in
//! [`Token`]) and the `Service`/`Layer` traits every tower middleware shares. Two more crates
//! appear in them and are re-exported, so you need not depend on the same version yourself:
//! [`secrecy`] (with [`SecretString`] and [`ExposeSecret`] at the root) and [`http_body_util`]
//! (the token client takes `Request<http_body_util::Full<Bytes>>`).
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
