use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use axum::extract::ConnectInfo;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::Full;
use sha2::{Digest, Sha256};
use sturdy_core::body::BodyError;
use sturdy_core::events::{Event, EventHook, WebhookOutcome};
use sturdy_core::{BoxError, SystemClock, WallClock};
use tower::Service;

use crate::queue::{EventQueue, Push, WebhookEvent};
use crate::source::SourceAllowlist;
use crate::verify::{hex_encode, Rejection, Verified, Verifier};

/// How much longer than its timestamp window a delivery's dedup key is kept: longer than a copy
/// takes from its timestamp check to the queue (its body's verification and the queue's round
/// trip), however short the dedup TTL.
const QUEUE_MARGIN: Duration = Duration::from_secs(60);

/// Receives webhooks: checks the source (when an allowlist is set; else 403), checks the
/// signature headers before reading the body (400 or 401), reads the body (up to the limit,
/// else 413), verifies it before anything parses it (400 or 401), deduplicates it, queues it,
/// and only then answers 200; a full queue answers 503 with `Retry-After` so the sender
/// redelivers. Every rejection answers a short generic text (`forbidden`, `invalid signature`,
/// `payload too large`, `unreadable body` with 400 for a body stream that failed); the reason
/// goes to `tracing`.
///
/// It is an endpoint (a `Service`), mounted with `axum::routing::post_service`. Its error type is
/// `Infallible`: every outcome is a response.
///
/// # Clone
///
/// Clones share one configuration, verifier and queue (behind one `Arc`). A `with_*` setter
/// called on a clone changes that clone only.
pub struct WebhookReceiver<Q> {
    inner: Arc<Inner<Q>>,
}

struct Inner<Q> {
    verifier: Arc<dyn Verifier>,
    queue: Arc<Q>,
    route: String,
    body_limit: usize,
    dedup_ttl: Duration,
    retry_after: u64,
    clock: Arc<dyn WallClock>,
    offload_above: usize,
    sources: Option<Arc<SourceAllowlist>>,
    events: EventHook,
}

// Not derived: `Q` itself need not be `Clone`.
impl<Q> Clone for Inner<Q> {
    fn clone(&self) -> Self {
        Self {
            verifier: self.verifier.clone(),
            queue: self.queue.clone(),
            route: self.route.clone(),
            body_limit: self.body_limit,
            dedup_ttl: self.dedup_ttl,
            retry_after: self.retry_after,
            clock: self.clock.clone(),
            offload_above: self.offload_above,
            sources: self.sources.clone(),
            events: self.events.clone(),
        }
    }
}

impl<Q> Clone for WebhookReceiver<Q> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<Q: fmt::Debug> fmt::Debug for WebhookReceiver<Q> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.inner;
        f.debug_struct("WebhookReceiver")
            .field("verifier", &i.verifier)
            .field("queue", &i.queue)
            .field("route", &i.route)
            .field("body_limit", &i.body_limit)
            .field("dedup_ttl", &i.dedup_ttl)
            .field("offload_above", &i.offload_above)
            .field("sources", &i.sources)
            .finish_non_exhaustive()
    }
}

/// Bodies larger than this are verified on tokio's blocking pool by default: 64 KiB.
pub const DEFAULT_OFFLOAD_ABOVE: usize = 64 * 1024;

impl<Q: EventQueue> WebhookReceiver<Q> {
    /// Verifies with `verifier` and queues on `queue`; the route is named after the scheme, body
    /// limit 1 MiB, ids remembered 24 h, bodies over 64 KiB verified off the async threads, no
    /// source allowlist.
    pub fn new(verifier: impl Verifier, queue: Q) -> Self {
        let route = verifier.scheme().to_owned();
        Self {
            inner: Arc::new(Inner {
                verifier: Arc::new(verifier),
                queue: Arc::new(queue),
                route,
                body_limit: 1024 * 1024,
                dedup_ttl: Duration::from_secs(24 * 3_600),
                retry_after: 5,
                clock: Arc::new(SystemClock),
                offload_above: DEFAULT_OFFLOAD_ABOVE,
                sources: None,
                events: EventHook::none(),
            }),
        }
    }

    fn edit(mut self, f: impl FnOnce(&mut Inner<Q>)) -> Self {
        f(Arc::make_mut(&mut self.inner));
        self
    }

    /// The route's name \[the scheme's name\], carried by each event
    /// ([`WebhookEvent::route`]). Events are deduplicated per scheme and route: give each
    /// receiver that shares a queue with another receiver of the same scheme its own name, or
    /// their event ids share one space. Receivers of one route in several processes (sharing a
    /// Redis queue) must use the same name.
    #[must_use]
    pub fn with_route(self, name: impl Into<String>) -> Self {
        let name = name.into();
        self.edit(|i| i.route = name)
    }

    /// The largest body accepted \[1 MiB\]; a larger one gets 413 without being read further.
    #[must_use]
    pub fn with_body_limit(self, bytes: usize) -> Self {
        self.edit(|i| i.body_limit = bytes)
    }

    /// How long dedup keys are remembered \[24 h\]. For schemes with a signed timestamp a key
    /// is kept at least until the delivery would be refused as stale (timestamp plus
    /// tolerance) and a minute more (a copy is checked against the clock before it reaches the
    /// queue, and may reach it after the window ends), so a copy is never accepted twice while
    /// the queue remembers the key; for
    /// schemes without one (GitHub, a generic scheme without a timestamp header) this TTL is the
    /// whole replay protection. [`MemoryQueue`](crate::MemoryQueue) also bounds how many keys
    /// it remembers (100,000, the oldest forgotten first): past that many deliveries within the
    /// tolerance, a copy of the oldest could be accepted again. The Redis queue forgets keys by
    /// time only.
    #[must_use]
    pub fn with_dedup_ttl(self, ttl: Duration) -> Self {
        self.edit(|i| i.dedup_ttl = ttl)
    }

    /// Bodies larger than `bytes` are verified with `tokio::task::spawn_blocking`, so that
    /// hashing a large body never holds up the runtime's worker threads \[64 KiB\]. Outside a
    /// tokio runtime every body is verified in place.
    #[must_use]
    pub fn with_offload_above(self, bytes: usize) -> Self {
        self.edit(|i| i.offload_above = bytes)
    }

    /// Accepts deliveries only from the allowlist's networks \[any source\]; any other source
    /// gets 403 and nothing is queued or even read.
    ///
    /// The peer address comes from the request extension
    /// `axum::extract::ConnectInfo<SocketAddr>`, which axum adds when the app is served with
    /// `into_make_service_with_connect_info::<SocketAddr>()` (outside axum, insert it yourself).
    /// Without it the source is unknown and, an allowlist being set, every delivery is refused
    /// (403, and an error in `tracing` saying why).
    #[must_use]
    pub fn with_source_allowlist(self, allowlist: SourceAllowlist) -> Self {
        let list = Arc::new(allowlist);
        self.edit(|i| i.sources = Some(list))
    }

    /// Calls `f` with an [`Event`](sturdy_core::events::Event) for every delivery answered
    /// (`WebhookReceived`: accepted, duplicate, rejected, queue full or queue failed, with the
    /// status sent) \[none\]; replaces an earlier callback. With the `metrics` feature the same
    /// events are counted through the `metrics` facade either way.
    #[must_use]
    pub fn on_event(self, f: impl Fn(&Event<'_>) + Send + Sync + 'static) -> Self {
        let hook = EventHook::new(f);
        self.edit(|i| i.events = hook)
    }

    /// The wall clock timestamps are checked against \[the system clock\].
    #[must_use]
    pub fn with_clock(self, clock: Arc<dyn WallClock>) -> Self {
        self.edit(|i| i.clock = clock)
    }
}

fn respond(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::from(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

fn reject(route: &str, scheme: &str, r: &Rejection) -> Response<Full<Bytes>> {
    tracing::warn!(
        route,
        scheme,
        status = r.status.as_u16(),
        reason = %r.reason,
        "webhook rejected"
    );
    respond(r.status, "invalid signature")
}

/// `f`'s result, or `None` (logged) if it panicked: a verifier run in place answers a 500, as
/// one run on the blocking pool does, rather than unwinding out of the response future (which
/// would leave the sender with a dropped connection and no `WebhookReceived` event).
fn unwound<T>(route: &str, f: impl FnOnce() -> T) -> Option<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(v) => Some(v),
        Err(_) => {
            tracing::error!(
                route,
                "webhook verification failed to run: the verifier panicked"
            );
            None
        }
    }
}

/// The answer to a delivery whose verifier failed to run.
fn failed_to_run() -> Response<Full<Bytes>> {
    respond(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
}

/// Verifies, and gives a body digest as the id when the verifier gave none.
fn verify(
    verifier: &dyn Verifier,
    headers: &HeaderMap,
    body: &[u8],
    now: SystemTime,
) -> Result<Verified, Rejection> {
    let mut v = verifier.verify(headers, body, now)?;
    if v.id.is_none() {
        v.id = Some(format!("sha256:{}", hex_encode(&Sha256::digest(body))));
    }
    Ok(v)
}

async fn receive<Q: EventQueue, B>(inner: Arc<Inner<Q>>, req: Request<B>) -> Response<Full<Bytes>>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    let (res, outcome) = answer(&inner, req).await;
    inner.events.emit(&Event::WebhookReceived {
        route: &inner.route,
        scheme: inner.verifier.scheme(),
        outcome,
        status: res.status(),
    });
    res
}

/// Answers a delivery, and says what became of it.
async fn answer<Q: EventQueue, B>(
    inner: &Inner<Q>,
    req: Request<B>,
) -> (Response<Full<Bytes>>, WebhookOutcome)
where
    B: Body,
    B::Error: Into<BoxError>,
{
    use WebhookOutcome::{Accepted, Duplicate, QueueFailed, QueueFull, Rejected};
    let route = inner.route.as_str();
    let scheme = inner.verifier.scheme();
    let (parts, body) = req.into_parts();
    if let Some(list) = &inner.sources {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip());
        let Some(peer) = peer else {
            tracing::error!(
                route,
                "webhook refused: a source allowlist is set but the peer address is unknown; serve the app with into_make_service_with_connect_info::<SocketAddr>()"
            );
            return (respond(StatusCode::FORBIDDEN, "forbidden"), Rejected);
        };
        if !list.allows(peer, &parts.headers) {
            let source = list.source(peer, &parts.headers);
            tracing::warn!(route, %peer, ?source, "webhook refused: the source is not in the allowlist");
            return (respond(StatusCode::FORBIDDEN, "forbidden"), Rejected);
        }
    }
    // The signature headers first: a delivery that cannot be valid costs no body read.
    let checked = unwound(route, || {
        inner
            .verifier
            .check_headers(&parts.headers, inner.clock.now())
    });
    match checked {
        Some(Ok(())) => {}
        Some(Err(r)) => return (reject(route, scheme, &r), Rejected),
        None => return (failed_to_run(), Rejected),
    }
    let body = match sturdy_core::body::buffer(body, inner.body_limit).await {
        Ok(b) => b,
        Err(BodyError::TooLarge { limit }) => {
            tracing::info!(route, limit, "webhook rejected: body too large");
            return (
                respond(StatusCode::PAYLOAD_TOO_LARGE, "payload too large"),
                Rejected,
            );
        }
        Err(e) if e.is_too_large() => {
            tracing::info!(route, error = %e, "webhook rejected: body too large for a layer outside");
            return (
                respond(StatusCode::PAYLOAD_TOO_LARGE, "payload too large"),
                Rejected,
            );
        }
        Err(e) => {
            // Said as what it is: no signature was checked against a body never read whole.
            tracing::info!(route, error = %e, "webhook rejected: body could not be read");
            return (
                respond(StatusCode::BAD_REQUEST, "unreadable body"),
                Rejected,
            );
        }
    };
    let now = inner.clock.now();
    let verified =
        if body.len() > inner.offload_above && tokio::runtime::Handle::try_current().is_ok() {
            let verifier = inner.verifier.clone();
            let b = body.clone();
            let headers = parts.headers;
            let job = tokio::task::spawn_blocking(move || verify(&*verifier, &headers, &b, now));
            match job.await {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(route, error = %e, "webhook verification failed to run");
                    return (failed_to_run(), Rejected);
                }
            }
        } else {
            match unwound(route, || {
                verify(&*inner.verifier, &parts.headers, &body, now)
            }) {
                Some(r) => r,
                None => return (failed_to_run(), Rejected),
            }
        };
    let verified = match verified {
        Ok(v) => v,
        Err(r) => return (reject(route, scheme, &r), Rejected),
    };
    // Remember the key at least as long as a copy would pass the timestamp check, and then
    // a while longer: a copy is checked against the clock before it reaches the queue (after
    // its body is verified, perhaps on the blocking pool, and a round trip to Redis), so a copy
    // checked just before the end of the window reaches the queue after it; were the key gone
    // by then, the copy would be queued again.
    let fresh = verified
        .fresh_until
        .and_then(|t| t.duration_since(now).ok())
        .map(|d| d.saturating_add(QUEUE_MARGIN))
        .unwrap_or_default();
    let ttl = inner.dedup_ttl.max(fresh);
    let event = WebhookEvent::new(scheme, verified.id.unwrap_or_default(), body)
        .with_route(route)
        .with_timestamp(verified.timestamp)
        .with_headers(verified.headers);
    let id = event.id.clone();
    match inner.queue.push(event, ttl).await {
        Ok(Push::Enqueued) => {
            tracing::debug!(route, scheme, id = %id, "webhook queued");
            (respond(StatusCode::OK, "ok"), Accepted)
        }
        Ok(Push::Duplicate) => {
            tracing::info!(route, scheme, id = %id, "duplicate webhook acknowledged, not processed again");
            (respond(StatusCode::OK, "duplicate"), Duplicate)
        }
        Ok(Push::Full) => {
            tracing::warn!(route, scheme, id = %id, "webhook queue full: asking the sender to redeliver");
            let mut r = respond(StatusCode::SERVICE_UNAVAILABLE, "busy, retry later");
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(inner.retry_after));
            (r, QueueFull)
        }
        Err(e) => {
            tracing::error!(route, scheme, id = %id, error = %e, "webhook could not be queued: asking the sender to redeliver");
            let mut r = respond(StatusCode::SERVICE_UNAVAILABLE, "unavailable, retry later");
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(inner.retry_after));
            (r, QueueFailed)
        }
    }
}

/// The response future of [`WebhookReceiver`] (boxed: the queue is async).
pub struct ResponseFuture(Pin<Box<dyn Future<Output = Response<Full<Bytes>>> + Send>>);

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ResponseFuture")
    }
}

impl Future for ResponseFuture {
    type Output = Result<Response<Full<Bytes>>, std::convert::Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.0.as_mut().poll(cx).map(Ok)
    }
}

impl<Q, B> Service<Request<B>> for WebhookReceiver<Q>
where
    Q: EventQueue,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<Full<Bytes>>;
    type Error = std::convert::Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        ResponseFuture(Box::pin(receive(self.inner.clone(), req)))
    }
}
