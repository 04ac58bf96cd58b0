//! The server side, for axum (or any tower HTTP server), following the IETF Idempotency-Key
//! draft and Stripe's practice.
//!
//! | request | answer |
//! |---|---|
//! | first with a key | runs to its end, even if its client goes away; its response is stored \[24 h\] |
//! | repeat, same fingerprint, first completed | the stored response, with `Idempotent-Replayed: true`; the handler does not run |
//! | repeat while the first is running | 409, `Retry-After: 1`, problem type [`problem::IN_FLIGHT`] |
//! | same key, other payload (or method, path or query) | 422, [`problem::KEY_REUSED`] |
//! | no key, on a route that requires one | 400, [`problem::MISSING_KEY`] |
//! | a key that is not 1 to 255 visible ASCII characters | 400, [`problem::INVALID_KEY`] |
//! | body larger than the limit \[1 MiB\] | 413, [`problem::BODY_TOO_LARGE`] |
//! | store unavailable or full | 503, `Retry-After: 1`, [`problem::STORE_UNAVAILABLE`]; the handler does not run |
//!
//! The fingerprint is SHA-256 over the method, the path and query (byte for byte) and the body.
//! Keys are 1 to 255 visible ASCII characters, sent bare or as a structured-field string (`k`
//! and `"k"` name the same key), and scoped per client: the [`Scope`] given to
//! [`IdempotencyLayer::new`] decides who shares a key space ([`ByCredentials`], the usual choice, hashes the credential headers; a closure can read
//! anything in the request head). Errors are RFC 9457 problem JSON ([`problem`]).
//!
//! Once a handler has started under a key, the key is held until that execution's outcome is
//! known. The handler runs in a task of its own: if its client goes away (hyper drops the
//! request's future when the connection closes), the handler still runs to its end and its
//! response is stored, so the client's retry gets it. While it runs, its lock is renewed every
//! third of its lease \[30 s\]; a worker that crashes stops renewing, and its key is free again
//! when the lease ends. A handler that panics, fails (`Err`), or answers a status that is not
//! stored releases its key before its answer goes out, so a retry that follows at once runs (a
//! release the store fails is tried again in the background until the lease ends, counted by
//! [`IdempotencyLayer::wait_idle`], on a tokio runtime; a retry meanwhile gets 409).
//!
//! Not stored: 5xx \[configurable\], and 408, 425 and 429, which say the request was not
//! processed. Stored responses are bounded \[1 MiB\]: a handler whose response is larger is
//! not run again; its key replays a 500 [`problem::RESPONSE_TOO_LARGE`]. So does the key of a
//! response the store could not keep (one larger than a [`MemoryStore`]'s byte bound).
//!
//! A panic in a handler is caught in its task, the key is released, and the panic resumes in
//! the request's future, as it would without the layer. The handler's own task and the lease
//! renewal need a tokio runtime with timers (axum's `serve` has one); without a tokio runtime,
//! the handler runs in the request's future without renewal, and a request dropped there keeps
//! its key until its lease ends. A concurrency limit placed inside this layer (between it and
//! the handlers) also counts the handlers whose client went away; one placed outside does not.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use axum::{routing::post, Router};
//! use http::{Request, StatusCode};
//! use sturdy_idempotency::server::{ByCredentials, IdempotencyLayer, MemoryStore};
//! use tower::ServiceExt;
//!
//! let layer = IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default())
//!     .with_require_key(true);
//! let app = Router::new()
//!     .route("/orders", post(|| async { (StatusCode::CREATED, "order o_1") }))
//!     .layer(layer);
//!
//! let order = || {
//!     Request::post("/orders")
//!         .header("authorization", "Bearer client-1")
//!         .header("idempotency-key", "k-1")
//!         .body(axum::body::Body::from("{}"))
//!         .unwrap()
//! };
//! let first = app.clone().oneshot(order()).await.unwrap();
//! assert_eq!(first.status(), StatusCode::CREATED);
//! let again = app.clone().oneshot(order()).await.unwrap();
//! assert_eq!(again.headers()["idempotent-replayed"], "true");
//! let missing = app.oneshot(Request::post("/orders").body(axum::body::Body::empty()).unwrap()).await.unwrap();
//! assert_eq!(missing.status(), StatusCode::BAD_REQUEST);
//! # }
//! ```

pub mod conformance;
mod execute;
mod memory;
pub mod problem;
mod scope;
mod store;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{Either, Full};
use sha2::{Digest, Sha256};
use sturdy_core::events::{Event, EventHook, IdempotencyRefusal};
use sturdy_core::ready::{release_ready, take_ready};
use sturdy_core::BoxError;
use tower::{Layer, Service};
use tracing::Instrument as _;

use execute::{Execution, Outcome};

pub use memory::{MemoryStore, StoreFull};
pub use scope::{ByCredentials, Scope};
pub use store::{Begin, BoxFuture, Fingerprint, IdempotencyStore, LockToken, StoredResponse};

/// The body of responses from the server layer: a stored or generated response (left), or the
/// handler's own body (right).
pub type ResponseBody<B> = Either<Full<Bytes>, B>;

/// A setting of the layer or of the memory store is invalid; reported when it is built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidConfig {
    reason: &'static str,
}

impl InvalidConfig {
    pub(crate) fn new(reason: &'static str) -> Self {
        Self { reason }
    }
}

impl fmt::Display for InvalidConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid idempotency configuration: {}", self.reason)
    }
}

impl std::error::Error for InvalidConfig {}

#[derive(Debug, Clone)]
struct Config {
    header: HeaderName,
    methods: Vec<Method>,
    require_key: bool,
    ttl: Duration,
    lease: Duration,
    store_server_errors: bool,
    body_limit: usize,
    response_limit: usize,
    events: EventHook,
}

impl Config {
    /// Whether a response with this status is stored.
    fn stores(&self, status: StatusCode) -> bool {
        match status.as_u16() {
            // The request was not processed; the client is meant to send it again.
            408 | 425 | 429 => false,
            // A status past 599 is the handler's own choice, stored like any other.
            500..=599 => self.store_server_errors,
            _ => true,
        }
    }
}

/// Makes handlers idempotent per `Idempotency-Key`; see the [module docs](self).
#[must_use]
pub struct IdempotencyLayer<St> {
    store: Arc<St>,
    scope: Arc<dyn Scope>,
    config: Arc<Config>,
    running: Arc<Running>,
}

/// The executions running in tasks of their own, which a graceful shutdown does not wait for
/// (their clients may have gone away); see [`IdempotencyLayer::wait_idle`].
#[derive(Debug, Default)]
pub(crate) struct Running {
    count: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
}

/// One running execution: counted while it lives, also when its task is dropped unrun.
pub(crate) struct RunningGuard(Arc<Running>);

impl RunningGuard {
    pub(crate) fn new(running: &Arc<Running>) -> Self {
        running
            .count
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Self(running.clone())
    }
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        if self
            .0
            .count
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst)
            == 1
        {
            self.0.idle.notify_waiters();
        }
    }
}

impl<St> Clone for IdempotencyLayer<St> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            scope: self.scope.clone(),
            config: self.config.clone(),
            running: self.running.clone(),
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
    /// Keys kept in `store`, scoped per client by `scope` (usually
    /// [`ByCredentials::default()`]).
    ///
    /// Defaults: POST and PATCH with a key are made idempotent, a missing key is allowed (see
    /// [`with_require_key`](Self::with_require_key)); responses kept 24 h, locks leased 30 s
    /// (renewed while the handler runs); 5xx not stored; request bodies up to 1 MiB, stored
    /// responses up to 1 MiB.
    pub fn new(store: St, scope: impl Scope) -> Self {
        Self {
            store: Arc::new(store),
            scope: Arc::new(scope),
            config: Arc::new(Config {
                header: HeaderName::from_static("idempotency-key"),
                methods: vec![Method::POST, Method::PATCH],
                require_key: false,
                ttl: Duration::from_secs(24 * 3_600),
                lease: Duration::from_secs(30),
                store_server_errors: false,
                body_limit: 1024 * 1024,
                response_limit: 1024 * 1024,
                events: EventHook::none(),
            }),
            running: Arc::default(),
        }
    }

    /// How many keyed requests are running in tasks of their own right now (each request with
    /// a key runs its handler in a task of its own, so that it ends and settles its key even
    /// when its client goes away), with the background releases of keys whose request went
    /// away before its handler ran, or whose release after an unstored outcome the store failed.
    /// Shared by the layer's clones and the services it made.
    pub fn running(&self) -> usize {
        self.running.count.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Resolves once no keyed request is running. A graceful shutdown (axum's
    /// `with_graceful_shutdown`) waits for connections, not for the handlers of clients that
    /// went away; await this after it, before the runtime is dropped, so that those handlers
    /// finish and store their outcome (a handler cut off by the runtime's end holds its key
    /// until its lease ends, and the client's retry then runs it again). Bound it with a
    /// timeout of your own.
    ///
    /// ```no_run
    /// # async fn f(
    /// #     listener: tokio::net::TcpListener,
    /// #     app: axum::Router,
    /// #     shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    /// # ) -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    /// use sturdy_idempotency::server::{ByCredentials, IdempotencyLayer, MemoryStore};
    ///
    /// let idempotency = IdempotencyLayer::new(MemoryStore::new(100_000)?, ByCredentials::default());
    /// let app = app.layer(idempotency.clone());
    /// axum::serve(listener, app)
    ///     .with_graceful_shutdown(shutdown)
    ///     .await?;
    /// // Handlers whose clients left are still running: let them end and store their outcome.
    /// let _ = tokio::time::timeout(Duration::from_secs(30), idempotency.wait_idle()).await;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.running.idle.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if self.running() == 0 {
                return;
            }
            notified.await;
        }
    }

    fn edit(mut self, f: impl FnOnce(&mut Config)) -> Self {
        f(Arc::make_mut(&mut self.config));
        self
    }

    /// Whether a request with one of the methods and no key gets 400 \[false: it runs without
    /// idempotency\].
    pub fn with_require_key(self, require: bool) -> Self {
        self.edit(|c| c.require_key = require)
    }

    /// The methods made idempotent \[POST, PATCH\]; other requests pass through untouched.
    pub fn with_methods(self, methods: impl IntoIterator<Item = Method>) -> Self {
        let m: Vec<Method> = methods.into_iter().collect();
        self.edit(|c| c.methods = m)
    }

    /// How long responses are kept \[24 h\].
    ///
    /// # Errors
    /// When `ttl` is zero.
    pub fn with_ttl(self, ttl: Duration) -> Result<Self, InvalidConfig> {
        if ttl.is_zero() {
            return Err(InvalidConfig::new(
                "the TTL of stored responses must be longer than zero",
            ));
        }
        Ok(self.edit(|c| c.ttl = ttl))
    }

    /// How long a lock outlives its last renewal \[30 s\]. While a handler runs, its lock is
    /// renewed every third of the lease; the lease is how long a crashed worker's key stays
    /// blocked. A lease of 1 ms or 2 ms is read as 3 ms: tokio's timer counts whole
    /// milliseconds, so a renewal every third of a shorter lease would come when the lock had
    /// already ended, and another request with the key could start the handler again.
    ///
    /// # Errors
    /// When `lease` is shorter than 1 ms.
    pub fn with_lease(self, lease: Duration) -> Result<Self, InvalidConfig> {
        if lease < Duration::from_millis(1) {
            return Err(InvalidConfig::new("the lease must be at least 1 ms"));
        }
        // Renewed every third of the lease, in whole milliseconds at the least (the timer's
        // step): under 3 ms the renewal would come at or after the lock's end.
        Ok(self.edit(|c| c.lease = lease.max(MIN_LEASE)))
    }

    /// Whether 5xx responses are stored (and replayed like any other) \[false: a 5xx releases
    /// the key, so a retry runs the handler again\]; a status past 599, which no standard
    /// defines, is not a 5xx here: a handler that answers one is stored and replayed. 408, 425
    /// and 429 are never stored.
    pub fn with_store_server_errors(self, store: bool) -> Self {
        self.edit(|c| c.store_server_errors = store)
    }

    /// The largest request body fingerprinted \[1 MiB\]; larger gets 413.
    pub fn with_body_limit(self, bytes: usize) -> Self {
        self.edit(|c| c.body_limit = bytes)
    }

    /// The largest response body stored \[1 MiB\]. A handler whose response is larger has run,
    /// so it is not run again: its key keeps a 500 [`problem::RESPONSE_TOO_LARGE`] instead.
    pub fn with_response_limit(self, bytes: usize) -> Self {
        self.edit(|c| c.response_limit = bytes)
    }

    /// The key header \[`Idempotency-Key`\].
    pub fn with_header(self, header: HeaderName) -> Self {
        self.edit(|c| c.header = header)
    }

    /// Calls `f` with an [`Event`] for every request answered with
    /// a stored response (`IdempotentReplayed`) and every request refused for its key: 409 in
    /// flight, 422 reused, 400 missing or invalid (`IdempotencyRefused`) \[none\]; replaces an
    /// earlier callback. With the `metrics` feature the same events are counted through the
    /// `metrics` facade either way.
    pub fn on_event(self, f: impl Fn(&Event<'_>) + Send + Sync + 'static) -> Self {
        let hook = EventHook::new(f);
        self.edit(|c| c.events = hook)
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
            running: self.running.clone(),
        }
    }
}

/// The service made by the server [`IdempotencyLayer`].
///
/// Rejections are responses (`Error = S::Error`), so it fits `axum::Router::layer`.
///
/// # Backpressure
/// `poll_ready` is the inner service's. The service it made ready is the one that runs the
/// request (moved into the request's execution), also after the body was read and the store
/// asked. A request refused at once for its key (missing, invalid, ambiguous) gives back what
/// the inner service reserved in `poll_ready` (a concurrency permit, a `Buffer` slot) at once.
pub struct Idempotency<S, St> {
    inner: S,
    store: Arc<St>,
    scope: Arc<dyn Scope>,
    config: Arc<Config>,
    running: Arc<Running>,
}

sturdy_core::define_inner_service_accessors!(Idempotency<S, St>);

impl<S: Clone, St> Clone for Idempotency<S, St> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            store: self.store.clone(),
            scope: self.scope.clone(),
            config: self.config.clone(),
            running: self.running.clone(),
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

/// Reads the key: a bare token or a structured-field string, 1 to 255 visible ASCII characters.
/// The key header's name as a refusal's detail shows it: `Idempotency-Key` for the default,
/// else the name `with_header` set (a client told to send the default would still be refused).
fn shown_header(header: &HeaderName) -> &str {
    if header == "idempotency-key" {
        "Idempotency-Key"
    } else {
        header.as_str()
    }
}

fn read_key(v: &HeaderValue) -> Option<String> {
    let raw = v.to_str().ok()?.trim();
    let key = match sturdy_core::headers::sf::parse_item(raw.as_bytes()) {
        Ok((sturdy_core::headers::sf::BareItem::String(s), _)) => s,
        _ => raw.to_owned(),
    };
    let ok = !key.is_empty() && key.len() <= 255 && key.bytes().all(|b| (0x21..=0x7e).contains(&b));
    ok.then_some(key)
}

/// SHA-256 over the method, the path and query, and the body.
fn fingerprint(method: &Method, path_and_query: &str, body: &[u8]) -> Fingerprint {
    let mut h = Sha256::new();
    h.update(method.as_str().as_bytes());
    h.update([0]);
    h.update(path_and_query.as_bytes());
    h.update([0]);
    h.update(body);
    h.finalize().into()
}

fn replay<B>(mut stored: StoredResponse) -> Response<ResponseBody<B>> {
    // This layer never stores them; a store another writer filled may hold them, and a stale
    // `Content-Length` or `Transfer-Encoding` would make the replayed body unreadable.
    stored.headers.retain(|(k, _)| {
        !execute::HOP_BY_HOP
            .iter()
            .any(|h| h.eq_ignore_ascii_case(k.trim()))
    });
    let mut r = problem::to_response(stored);
    r.headers_mut()
        .insert("idempotent-replayed", HeaderValue::from_static("true"));
    r
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

/// The shortest lease kept: three of the timer's 1 ms steps, one per renewal.
const MIN_LEASE: Duration = Duration::from_millis(3);

fn ready<T: Send + 'static, E: Send + 'static>(r: T) -> ResponseFuture<T, E> {
    ResponseFuture(Box::pin(std::future::ready(Ok(r))))
}

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
        // Two different keys on one request make it ambiguous which operation it is: refused,
        // rather than keyed by whichever comes first (the same request with the keys in the
        // other order would run the handler again).
        let mut values = req.headers().get_all(&config.header).iter();
        let first = values.next();
        if let Some(v) = first {
            if values.any(|other| other != v) {
                refused(&config, req.method(), IdempotencyRefusal::InvalidKey);
                release_ready(&mut self.inner);
                return ready(problem::response(
                    StatusCode::BAD_REQUEST,
                    problem::INVALID_KEY,
                    "Idempotency-Key is ambiguous",
                    &format!(
                        "send one {} header; this request has several different ones",
                        shown_header(&config.header)
                    ),
                ));
            }
        }
        let key = match first {
            None if config.require_key => {
                refused(&config, req.method(), IdempotencyRefusal::MissingKey);
                release_ready(&mut self.inner);
                return ready(problem::response(
                    StatusCode::BAD_REQUEST,
                    problem::MISSING_KEY,
                    "Idempotency-Key is missing",
                    &format!(
                        "this operation requires an {} header",
                        shown_header(&config.header)
                    ),
                ));
            }
            None => {
                let fut = self.inner.call(req);
                return ResponseFuture(Box::pin(async move { Ok(fut.await?.map(Either::Right)) }));
            }
            Some(v) => match read_key(v) {
                Some(k) => k,
                None => {
                    refused(&config, req.method(), IdempotencyRefusal::InvalidKey);
                    release_ready(&mut self.inner);
                    return ready(problem::response(
                        StatusCode::BAD_REQUEST,
                        problem::INVALID_KEY,
                        "Idempotency-Key is invalid",
                        &format!(
                            "the {} header must be 1 to 255 visible ASCII characters, such as a UUID",
                            shown_header(&config.header)
                        ),
                    ));
                }
            },
        };
        let (parts, body) = req.into_parts();
        let key = scope::store_key(&self.scope.scope(&parts), &key);
        // Take the service that was driven to readiness; leave a fresh clone behind.
        let svc = take_ready(&mut self.inner);
        let store = self.store.clone();
        let running = self.running.clone();
        ResponseFuture(Box::pin(keyed(
            svc, store, config, running, key, parts, body,
        )))
    }
}

/// Tells the event hook that a request was refused for its key.
fn refused(config: &Config, method: &Method, refusal: IdempotencyRefusal) {
    let status = match refusal {
        IdempotencyRefusal::InFlight => StatusCode::CONFLICT,
        IdempotencyRefusal::KeyReused => StatusCode::UNPROCESSABLE_ENTITY,
        _ => StatusCode::BAD_REQUEST,
    };
    config.events.emit(&Event::IdempotencyRefused {
        method,
        refusal,
        status,
    });
}

async fn keyed<S, St, B, Rb>(
    svc: S,
    store: Arc<St>,
    config: Arc<Config>,
    running: Arc<Running>,
    key: String,
    parts: Parts,
    body: B,
) -> Result<Response<ResponseBody<Rb>>, S::Error>
where
    S: Service<Request<B>, Response = Response<Rb>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    St: IdempotencyStore,
    B: Body + From<Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    Rb: Body + Send + 'static,
    Rb::Data: Send,
    Rb::Error: Into<BoxError>,
{
    let body = match sturdy_core::body::buffer(body, config.body_limit).await {
        Ok(b) => b,
        Err(sturdy_core::body::BodyError::TooLarge { limit }) => {
            return Ok(problem::response(
                StatusCode::PAYLOAD_TOO_LARGE,
                problem::BODY_TOO_LARGE,
                "Request body too large",
                &format!("idempotent requests are limited to {limit} bytes"),
            ));
        }
        Err(e) if e.is_too_large() => {
            return Ok(problem::response(
                StatusCode::PAYLOAD_TOO_LARGE,
                problem::BODY_TOO_LARGE,
                "Request body too large",
                "the request body is larger than a limit in front of this service",
            ));
        }
        Err(e) => {
            return Ok(problem::response(
                StatusCode::BAD_REQUEST,
                problem::UNREADABLE_BODY,
                "Unreadable request body",
                &e.to_string(),
            ))
        }
    };
    // Under axum's `Router::nest` the URI a layer sees has the prefix taken off (`/us/orders`
    // arrives as `/orders`); the one the client sent is kept in `OriginalUri`. The fingerprint
    // takes that one, so one key sent to two nested routes is two requests, not one.
    let uri = parts
        .extensions
        .get::<axum::extract::OriginalUri>()
        .map_or(&parts.uri, |o| &o.0);
    let target = uri
        .path_and_query()
        .map_or_else(|| uri.path(), |pq| pq.as_str());
    let fp = fingerprint(&parts.method, target, &body);
    let token = LockToken::random();
    match execute::Beginning::new(&store, &key, fp, token, config.lease, &running).await {
        Ok(Begin::Started) => {}
        Ok(Begin::Completed(stored)) => {
            let res = replay(stored);
            config.events.emit(&Event::IdempotentReplayed {
                method: &parts.method,
                status: res.status(),
            });
            return Ok(res);
        }
        Ok(Begin::InFlight) => {
            refused(&config, &parts.method, IdempotencyRefusal::InFlight);
            return Ok(problem::response(
                StatusCode::CONFLICT,
                problem::IN_FLIGHT,
                "A request is outstanding for this Idempotency-Key",
                "the first request with this key is still running; retry after a while with the same key",
            ));
        }
        Ok(Begin::Mismatch) => {
            refused(&config, &parts.method, IdempotencyRefusal::KeyReused);
            return Ok(problem::response(
                StatusCode::UNPROCESSABLE_ENTITY,
                problem::KEY_REUSED,
                "Idempotency-Key is already used",
                "this key was used with a different request; use a new key for a new request",
            ));
        }
        Err(e) => {
            tracing::warn!(error = %e, "idempotency store failed");
            if execute::may_have_locked(&*e) {
                // The store may have locked the key before its answer was lost; a retry would
                // get 409 for the whole lease.
                execute::release_in_background(&store, &key, token, config.lease, &running);
            }
            return Ok(problem::response(
                StatusCode::SERVICE_UNAVAILABLE,
                problem::STORE_UNAVAILABLE,
                "Idempotency store unavailable",
                "the request was not processed; retry it with the same key",
            ));
        }
    }
    let req = Request::from_parts(parts, B::from(body));
    let execution = Execution {
        store,
        config,
        key,
        fp,
        token,
        running: running.clone(),
    };
    let outcome = match tokio::runtime::Handle::try_current() {
        // Detached from the request: if the client goes away and this future is dropped, the
        // execution still runs to its end and settles its key.
        Ok(rt) => {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let counted = RunningGuard::new(&running);
            rt.spawn(
                async move {
                    let _counted = counted;
                    let _ = tx.send(execution.run(svc, req, true).await);
                }
                .in_current_span(),
            );
            match rx.await {
                Ok(outcome) => outcome,
                // The task was dropped before its end: the runtime is shutting down.
                Err(_) => {
                    return Ok(problem::response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        problem::INTERRUPTED,
                        "Request interrupted",
                        "the server stopped before the request's outcome was known; retry later with the same key",
                    ))
                }
            }
        }
        // No tokio runtime: run in this future (without lease renewal).
        Err(_) => execution.run(svc, req, false).await,
    };
    match outcome {
        Outcome::Response(r) => Ok(r),
        Outcome::Error(e) => Err(e),
        Outcome::Panicked(panic) => std::panic::resume_unwind(panic),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replay_leaves_out_connection_headers_a_store_holds() {
        let stored = StoredResponse {
            status: 201,
            headers: vec![
                ("Content-Length".into(), b"999999".to_vec()),
                ("transfer-encoding".into(), b"chunked".to_vec()),
                ("date".into(), b"Sun, 06 Nov 1994 08:49:37 GMT".to_vec()),
                ("x-order".into(), b"7".to_vec()),
                ("idempotent-replayed".into(), b"false".to_vec()),
            ],
            body: Bytes::from_static(b"done!"),
        };
        let r = replay::<Full<Bytes>>(stored);
        assert_eq!(r.status(), 201);
        let names: Vec<&str> = r.headers().keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["x-order", "idempotent-replayed"]);
        assert_eq!(r.headers()["idempotent-replayed"], "true");
        assert_eq!(http_body::Body::size_hint(r.body()).exact(), Some(5));
    }

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
        // A quoted key of 255 with a parameter fits: parameters are not part of the key.
        assert!(k(&format!("\"{}\";p=1", "x".repeat(255))).is_some());
    }

    #[test]
    fn fingerprints_cover_method_path_query_and_body() {
        let a = fingerprint(&Method::POST, "/orders?currency=EUR", b"{}");
        assert_ne!(
            a,
            fingerprint(&Method::PATCH, "/orders?currency=EUR", b"{}")
        );
        assert_ne!(
            a,
            fingerprint(&Method::POST, "/orders/1?currency=EUR", b"{}")
        );
        assert_ne!(a, fingerprint(&Method::POST, "/orders?currency=USD", b"{}"));
        assert_ne!(a, fingerprint(&Method::POST, "/orders", b"{}"));
        assert_ne!(
            a,
            fingerprint(&Method::POST, "/orders?currency=EUR", b"{ }")
        );
        assert_eq!(a, fingerprint(&Method::POST, "/orders?currency=EUR", b"{}"));
    }

    #[test]
    fn only_processed_outcomes_are_stored() {
        let c = |store_server_errors| Config {
            store_server_errors,
            ..(*IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default()).config)
                .clone()
        };
        for s in [200, 201, 204, 400, 404, 409, 422] {
            assert!(c(false).stores(StatusCode::from_u16(s).unwrap()), "{s}");
        }
        for s in [408, 425, 429, 500, 502, 503] {
            assert!(!c(false).stores(StatusCode::from_u16(s).unwrap()), "{s}");
        }
        // Past 599: the handler's own choice, stored.
        assert!(c(false).stores(StatusCode::from_u16(999).unwrap()));
        assert!(c(true).stores(StatusCode::INTERNAL_SERVER_ERROR));
        assert!(!c(true).stores(StatusCode::TOO_MANY_REQUESTS));
    }

    #[test]
    fn invalid_settings_are_reported_when_built() {
        let layer = || IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default());
        assert!(layer().with_ttl(Duration::ZERO).is_err());
        assert!(layer().with_lease(Duration::from_micros(999)).is_err());
        let e = layer().with_lease(Duration::ZERO).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid idempotency configuration: the lease must be at least 1 ms"
        );
        assert!(layer().with_lease(Duration::from_millis(1)).is_ok());
    }
}
