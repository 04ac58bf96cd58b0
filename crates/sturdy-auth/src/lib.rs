//! Authentication for HTTP clients, with secrets kept secret.
//!
//! `async fn(Request) -> Result<Response, BoxError>`, with credentials:
//!
//! - **Static**: [`AuthLayer::bearer`], [`AuthLayer::api_key`] (a named header),
//!   [`AuthLayer::api_key_query`] and [`AuthLayer::basic`]. Secrets are held in `secrecy` types,
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
