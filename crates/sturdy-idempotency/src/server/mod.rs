//! The server side, for axum (or any tower HTTP server), following the IETF Idempotency-Key
//! draft and Stripe's practice.
//!
//! | request | answer |
//! |---|---|
//! | first with a key | runs; its response is stored \[24 h\] |
//! | repeat, same fingerprint, first completed | the stored response, with `Idempotent-Replayed: true`; the handler does not run |
//! | repeat while the first is running | 409 |
//! | same key, other payload (or method, or path) | 422 |
//! | no key, on a route that requires one | 400 |
//! | store unavailable or full | 503 with `Retry-After: 1` |
//!
//! The fingerprint is SHA-256 over the method, the path and the body. Keys are scoped per client
//! (default: a hash of the `Authorization` header, so two clients may use the same key); keys
//! are 1 to 255 visible ASCII characters, sent bare or as a structured-field string. A running
//! request holds a lock with a lease \[60 s\], so a crashed worker does not block its key forever;
//! a handler that panics or is cancelled releases it at once. 5xx responses are not stored
//! \[configurable\], so the client can retry. Errors are RFC 9457 problem JSON.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use axum::{routing::post, Router};
//! use http::{Request, StatusCode};
//! use sturdy_idempotency::server::{IdempotencyLayer, MemoryStore};
//! use tower::ServiceExt;
//!
//! let app = Router::new()
//!     .route("/orders", post(|| async { (StatusCode::CREATED, "order o_1") }))
//!     .layer(IdempotencyLayer::new(MemoryStore::default()).require_key());
//!
//! let order = || Request::post("/orders").header("idempotency-key", "k-1").body(axum::body::Body::from("{}")).unwrap();
//! let first = app.clone().oneshot(order()).await.unwrap();
//! assert_eq!(first.status(), StatusCode::CREATED);
//! let again = app.clone().oneshot(order()).await.unwrap();
//! assert_eq!(again.headers()["idempotent-replayed"], "true");
//! let missing = app.oneshot(Request::post("/orders").body(axum::body::Body::empty()).unwrap()).await.unwrap();
//! assert_eq!(missing.status(), StatusCode::BAD_REQUEST);
//! # }
//! ```

pub mod conformance;
mod memory;
mod store;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{header, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Either, Full};
use sha2::{Digest, Sha256};
use sturdy_core::BoxError;
use tower::{Layer, Service, ServiceExt};

pub use memory::{MemoryStore, StoreFull};
pub use store::{Begin, BoxFuture, Fingerprint, IdempotencyStore, StoredResponse};

/// The body of responses from the server layer: a stored or generated response (left), or the
/// handler's own body (right).
pub type ResponseBody<B> = Either<Full<Bytes>, B>;

/// Chooses the client scope of a key from the request head.
pub trait Scope: Send + Sync + 'static {
    /// The scope of the request's client (a credential hash, a tenant id).
    fn scope(&self, head: &Parts) -> String;
}

impl<F> Scope for F
where
    F: Fn(&Parts) -> String + Send + Sync + 'static,
{
    fn scope(&self, head: &Parts) -> String {
        self(head)
    }
}

/// The default scope: a SHA-256 of the `Authorization` header (never the credential itself), or
/// `anonymous`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ByCredential;

impl Scope for ByCredential {
    fn scope(&self, head: &Parts) -> String {
        match head.headers.get(header::AUTHORIZATION) {
            Some(v) => hex(&Sha256::digest(v.as_bytes())[..16]),
            None => "anonymous".to_owned(),
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[derive(Debug, Clone)]
struct Config {
    header: HeaderName,
    methods: Vec<Method>,
    require_key: bool,
    ttl: Duration,
    lease: Duration,
    store_server_errors: bool,
    body_limit: usize,
}

/// Makes handlers idempotent per `Idempotency-Key`; see the [module docs](self).
#[must_use]
pub struct IdempotencyLayer<St> {
    store: Arc<St>,
    scope: Arc<dyn Scope>,
    config: Arc<Config>,
}

impl<St> Clone for IdempotencyLayer<St> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            scope: self.scope.clone(),
            config: self.config.clone(),
        }
    }
}

impl<St: fmt::Debug> fmt::Debug for IdempotencyLayer<St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("store", &self.store)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<St: IdempotencyStore> IdempotencyLayer<St> {
    /// POST and PATCH with a key are made idempotent; a missing key is allowed (see
    /// [`require_key`](Self::require_key)). Responses kept 24 h, locks leased 60 s, 5xx not
    /// stored, request bodies up to 1 MiB.
    pub fn new(store: St) -> Self {
        Self {
            store: Arc::new(store),
            scope: Arc::new(ByCredential),
            config: Arc::new(Config {
                header: HeaderName::from_static("idempotency-key"),
                methods: vec![Method::POST, Method::PATCH],
                require_key: false,
                ttl: Duration::from_secs(24 * 3_600),
                lease: Duration::from_secs(60),
                store_server_errors: false,
                body_limit: 1024 * 1024,
            }),
        }
    }

    fn edit(mut self, f: impl FnOnce(&mut Config)) -> Self {
        let mut c = (*self.config).clone();
        f(&mut c);
        self.config = Arc::new(c);
        self
    }

    /// Answers 400 when a request with one of the methods has no key.
    pub fn require_key(self) -> Self {
        self.edit(|c| c.require_key = true)
    }

    /// The methods made idempotent \[POST, PATCH\].
    pub fn with_methods(self, methods: impl IntoIterator<Item = Method>) -> Self {
        let m: Vec<Method> = methods.into_iter().collect();
        self.edit(|c| c.methods = m)
    }

    /// How long responses are kept \[24 h\].
    pub fn with_ttl(self, ttl: Duration) -> Self {
        self.edit(|c| c.ttl = ttl)
    }

    /// How long a running request holds its key \[60 s\]; set it above the slowest handler.
    pub fn with_lease(self, lease: Duration) -> Self {
        self.edit(|c| c.lease = lease)
    }

    /// Also store 5xx responses (replayed like any other) \[off\].
    pub fn store_server_errors(self, yes: bool) -> Self {
        self.edit(|c| c.store_server_errors = yes)
    }

    /// The largest request body fingerprinted \[1 MiB\]; larger gets 413.
    pub fn with_body_limit(self, bytes: usize) -> Self {
        self.edit(|c| c.body_limit = bytes)
    }

    /// The key header \[`Idempotency-Key`\].
    pub fn with_header(self, header: HeaderName) -> Self {
        self.edit(|c| c.header = header)
    }

    /// Scopes keys with `scope` (a function of the request head) instead of by credential.
    pub fn with_scope(mut self, scope: impl Scope) -> Self {
        self.scope = Arc::new(scope);
        self
    }
}

impl<S, St> Layer<S> for IdempotencyLayer<St> {
    type Service = Idempotency<S, St>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotency {
            inner,
            store: self.store.clone(),
            scope: self.scope.clone(),
            config: self.config.clone(),
        }
    }
}

/// The service made by the server [`IdempotencyLayer`].
///
/// Rejections are responses (`Error = S::Error`), so it fits `axum::Router::layer`.
pub struct Idempotency<S, St> {
    inner: S,
    store: Arc<St>,
    scope: Arc<dyn Scope>,
    config: Arc<Config>,
}

impl<S: Clone, St> Clone for Idempotency<S, St> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            store: self.store.clone(),
            scope: self.scope.clone(),
            config: self.config.clone(),
        }
    }
}

impl<S: fmt::Debug, St: fmt::Debug> fmt::Debug for Idempotency<S, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotency")
            .field("inner", &self.inner)
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

/// An RFC 9457 problem response.
fn problem<B>(status: StatusCode, title: &str, detail: &str) -> Response<ResponseBody<B>> {
    let body = serde_json::json!({ "type": "about:blank", "title": title, "status": status.as_u16(), "detail": detail });
    let mut r = Response::new(Either::Left(Full::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    if status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::CONFLICT {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

/// Reads the key: a bare token or a structured-field string, 1 to 255 visible ASCII characters.
fn read_key(v: &HeaderValue) -> Option<String> {
    let raw = v.to_str().ok()?.trim();
    let key = match sturdy_core::headers::sf::parse_item(raw.as_bytes()) {
        Ok((sturdy_core::headers::sf::BareItem::String(s), _)) => s,
        _ => raw.to_owned(),
    };
    let ok = !key.is_empty() && key.len() <= 255 && key.bytes().all(|b| (0x21..=0x7e).contains(&b));
    ok.then_some(key)
}

fn fingerprint(method: &Method, path: &str, body: &[u8]) -> Fingerprint {
    let mut h = Sha256::new();
    h.update(method.as_str().as_bytes());
    h.update([0]);
    h.update(path.as_bytes());
    h.update([0]);
    h.update(body);
    h.finalize().into()
}

fn replay<B>(stored: StoredResponse) -> Response<ResponseBody<B>> {
    let mut r = Response::new(Either::Left(Full::new(stored.body)));
    *r.status_mut() = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
    for (k, v) in stored.headers {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_bytes(&v),
        ) {
            r.headers_mut().append(k, v);
        }
    }
    r.headers_mut()
        .insert("idempotent-replayed", HeaderValue::from_static("true"));
    r
}

/// Releases a lock if the handler never finished (panic, cancellation).
struct LockGuard<St: IdempotencyStore> {
    store: Arc<St>,
    key: String,
    fp: Fingerprint,
    armed: bool,
}

impl<St: IdempotencyStore> LockGuard<St> {
    /// Releases the lock now, so a retry that follows at once finds the key free.
    async fn release(mut self) {
        self.armed = false;
        if let Err(e) = self.store.release(&self.key, self.fp).await {
            tracing::warn!(error = %e, "could not release an idempotency lock; it expires with its lease");
        }
    }
}

impl<St: IdempotencyStore> Drop for LockGuard<St> {
    fn drop(&mut self) {
        if self.armed {
            let fut = self.store.release(&self.key, self.fp);
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    if let Err(e) = fut.await {
                        tracing::warn!(error = %e, "could not release an idempotency lock; it expires with its lease");
                    }
                });
            }
        }
    }
}

/// The response future of the server [`Idempotency`] service (boxed: the store is async).
pub struct ResponseFuture<T, E>(BoxFuture<Result<T, E>>);

impl<T, E> fmt::Debug for ResponseFuture<T, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ResponseFuture")
    }
}

impl<T, E> Future for ResponseFuture<T, E> {
    type Output = Result<T, E>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.0.as_mut().poll(cx)
    }
}

const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "upgrade",
    "date",
];

// ===== impl Idempotency =====

impl<S, St, B, Rb> Service<Request<B>> for Idempotency<S, St>
where
    S: Service<Request<B>, Response = Response<Rb>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    St: IdempotencyStore,
    B: Body + From<Bytes> + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
    Rb: Body + Send + 'static,
    Rb::Data: Send,
    Rb::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<Rb>>;
    type Error = S::Error;
    type Future = ResponseFuture<Self::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let config = self.config.clone();
        if !config.methods.contains(req.method()) {
            let fut = self.inner.call(req);
            return ResponseFuture(Box::pin(async move { Ok(fut.await?.map(Either::Right)) }));
        }
        let key = match req.headers().get(&config.header) {
            None if config.require_key => {
                return ResponseFuture(Box::pin(std::future::ready(Ok(problem(
                    StatusCode::BAD_REQUEST,
                    "Idempotency-Key is missing",
                    "this operation requires an Idempotency-Key header",
                )))));
            }
            None => {
                let fut = self.inner.call(req);
                return ResponseFuture(Box::pin(async move { Ok(fut.await?.map(Either::Right)) }));
            }
            Some(v) => match read_key(v) {
                Some(k) => k,
                None => {
                    return ResponseFuture(Box::pin(std::future::ready(Ok(problem(
                        StatusCode::BAD_REQUEST,
                        "Idempotency-Key is invalid",
                        "use 1 to 255 visible ASCII characters, such as a UUID",
                    )))));
                }
            },
        };
        let (parts, body) = req.into_parts();
        let store_key = format!("{}:{key}", self.scope.scope(&parts));
        // Take the service that was driven to readiness; leave a fresh clone behind.
        let clone = self.inner.clone();
        let svc = std::mem::replace(&mut self.inner, clone);
        let store = self.store.clone();
        ResponseFuture(Box::pin(run(svc, store, config, store_key, parts, body)))
    }
}

async fn run<S, St, B, Rb>(
    svc: S,
    store: Arc<St>,
    config: Arc<Config>,
    key: String,
    parts: Parts,
    body: B,
) -> Result<Response<ResponseBody<Rb>>, S::Error>
where
    S: Service<Request<B>, Response = Response<Rb>>,
    St: IdempotencyStore,
    B: Body + From<Bytes>,
    B::Error: Into<BoxError>,
    Rb: Body,
    Rb::Error: Into<BoxError>,
{
    let body = match sturdy_core::body::buffer(body, config.body_limit).await {
        Ok(b) => b,
        Err(sturdy_core::body::BodyError::TooLarge { limit }) => {
            return Ok(problem(
                StatusCode::PAYLOAD_TOO_LARGE,
                "Request body too large",
                &format!("idempotent requests are limited to {limit} bytes"),
            ));
        }
        Err(e) => {
            return Ok(problem(
                StatusCode::BAD_REQUEST,
                "Unreadable request body",
                &e.to_string(),
            ))
        }
    };
    let fp = fingerprint(&parts.method, parts.uri.path(), &body);
    match store.begin(&key, fp, config.lease).await {
        Ok(Begin::Started) => {}
        Ok(Begin::Completed(stored)) => return Ok(replay(stored)),
        Ok(Begin::InFlight) => {
            return Ok(problem(
                StatusCode::CONFLICT,
                "A request is outstanding for this Idempotency-Key",
                "the first request with this key is still running; retry later",
            ));
        }
        Ok(Begin::Mismatch) => {
            return Ok(problem(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Idempotency-Key is already used",
                "this key was used with a different request; use a new key for a new request",
            ));
        }
        Err(e) => {
            tracing::warn!(error = %e, "idempotency store failed");
            return Ok(problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "Idempotency store unavailable",
                "the request was not processed; retry it with the same key",
            ));
        }
    }
    let mut guard = LockGuard {
        store: store.clone(),
        key,
        fp,
        armed: true,
    };
    let req = Request::from_parts(parts, B::from(body));
    let res = match svc.oneshot(req).await {
        Ok(res) => res,
        Err(e) => {
            guard.release().await;
            return Err(e);
        }
    };
    let status = res.status();
    if status.is_server_error() && !config.store_server_errors {
        guard.release().await;
        return Ok(res.map(Either::Right));
    }
    let (parts, body) = res.into_parts();
    let collected = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(Into::<BoxError>::into);
    let body = match collected {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "the handler's response body failed; the key is released");
            guard.release().await;
            return Ok(problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Response failed",
                "the response could not be read; retry with the same key",
            ));
        }
    };
    let stored = StoredResponse {
        status: status.as_u16(),
        headers: parts
            .headers
            .iter()
            .filter(|(k, _)| !HOP_BY_HOP.contains(&k.as_str()))
            .map(|(k, v)| (k.as_str().to_owned(), v.as_bytes().to_vec()))
            .collect(),
        body: body.clone(),
    };
    match store.complete(&guard.key, fp, stored, config.ttl).await {
        Ok(()) => guard.armed = false,
        Err(e) => {
            tracing::warn!(error = %e, "could not store the response; the key is released");
            guard.release().await;
        }
    }
    Ok(Response::from_parts(parts, Either::Left(Full::new(body))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        let k = |s: &str| read_key(&HeaderValue::from_str(s).unwrap());
        assert_eq!(k("abc-123"), Some("abc-123".into()));
        assert_eq!(
            k("\"8e03978e-40d5-43e8-bc93-6894a57f9324\""),
            Some("8e03978e-40d5-43e8-bc93-6894a57f9324".into())
        );
        assert_eq!(k(""), None);
        assert_eq!(k("a b"), None);
        assert_eq!(k(&"x".repeat(256)), None);
        assert!(k(&"x".repeat(255)).is_some());
    }

    #[test]
    fn fingerprints_cover_method_path_and_body() {
        let a = fingerprint(&Method::POST, "/orders", b"{}");
        assert_ne!(a, fingerprint(&Method::PATCH, "/orders", b"{}"));
        assert_ne!(a, fingerprint(&Method::POST, "/orders/1", b"{}"));
        assert_ne!(a, fingerprint(&Method::POST, "/orders", b"{ }"));
        assert_eq!(a, fingerprint(&Method::POST, "/orders", b"{}"));
    }
}
