use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::Full;
use sha2::{Digest, Sha256};
use sturdy_core::body::BodyError;
use sturdy_core::{BoxError, SystemClock, WallClock};
use tower::Service;

use crate::queue::{EventQueue, Push, WebhookEvent};
use crate::verify::{hex_encode, Verifier};

/// Receives webhooks: reads the body (up to the limit, else 413), verifies it before anything
/// parses it (400 or 401, body `invalid signature`, the reason in `tracing`), deduplicates on the
/// event id, queues it, and only then answers 200; a full queue answers 503 with `Retry-After`
/// so the sender redelivers.
///
/// It is an endpoint (a `Service`), mounted with `axum::routing::post_service`. Its error type is
/// `Infallible`: every outcome is a response.
pub struct WebhookReceiver<Q> {
    inner: Arc<Inner<Q>>,
}

struct Inner<Q> {
    verifier: Box<dyn Verifier>,
    queue: Q,
    body_limit: usize,
    dedup_ttl: Duration,
    retry_after: u64,
    clock: Arc<dyn WallClock>,
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
        f.debug_struct("WebhookReceiver")
            .field("verifier", &self.inner.verifier)
            .field("queue", &self.inner.queue)
            .field("body_limit", &self.inner.body_limit)
            .field("dedup_ttl", &self.inner.dedup_ttl)
            .finish_non_exhaustive()
    }
}

impl<Q: EventQueue> WebhookReceiver<Q> {
    /// Verifies with `verifier` and queues on `queue`; body limit 1 MiB, ids remembered 24 h.
    pub fn new(verifier: impl Verifier, queue: Q) -> Self {
        Self {
            inner: Arc::new(Inner {
                verifier: Box::new(verifier),
                queue,
                body_limit: 1024 * 1024,
                dedup_ttl: Duration::from_secs(24 * 3_600),
                retry_after: 5,
                clock: Arc::new(SystemClock),
            }),
        }
    }

    fn edit(self, f: impl FnOnce(&mut Inner<Q>)) -> Self {
        match Arc::try_unwrap(self.inner) {
            Ok(mut inner) => {
                f(&mut inner);
                Self {
                    inner: Arc::new(inner),
                }
            }
            Err(_) => panic!("configure the receiver before cloning it"),
        }
    }

    /// The largest body accepted \[1 MiB\]; a larger one gets 413 without being read further.
    ///
    /// # Panics
    /// When called on a receiver that was already cloned.
    #[must_use]
    pub fn with_body_limit(self, bytes: usize) -> Self {
        self.edit(|i| i.body_limit = bytes)
    }

    /// How long event ids are remembered for deduplication \[24 h\].
    ///
    /// # Panics
    /// When called on a receiver that was already cloned.
    #[must_use]
    pub fn with_dedup_ttl(self, ttl: Duration) -> Self {
        self.edit(|i| i.dedup_ttl = ttl)
    }

    /// The wall clock timestamps are checked against \[the system clock\].
    ///
    /// # Panics
    /// When called on a receiver that was already cloned.
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

async fn receive<Q: EventQueue, B>(inner: Arc<Inner<Q>>, req: Request<B>) -> Response<Full<Bytes>>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    let (parts, body) = req.into_parts();
    let body = match sturdy_core::body::buffer(body, inner.body_limit).await {
        Ok(b) => b,
        Err(BodyError::TooLarge { limit }) => {
            tracing::info!(limit, "webhook rejected: body too large");
            return respond(StatusCode::PAYLOAD_TOO_LARGE, "payload too large");
        }
        Err(e) => {
            tracing::info!(error = %e, "webhook rejected: body could not be read");
            return respond(StatusCode::BAD_REQUEST, "invalid signature");
        }
    };
    let verified = match inner
        .verifier
        .verify(&parts.headers, &body, inner.clock.now())
    {
        Ok(v) => v,
        Err(r) => {
            tracing::warn!(status = r.status.as_u16(), reason = %r.reason, "webhook rejected");
            return respond(r.status, "invalid signature");
        }
    };
    let id = verified
        .id
        .unwrap_or_else(|| format!("sha256:{}", hex_encode(&Sha256::digest(&body))));
    let event = WebhookEvent {
        scheme: verified.scheme.to_owned(),
        id: id.clone(),
        body,
    };
    match inner.queue.push(event, inner.dedup_ttl).await {
        Ok(Push::Enqueued) => {
            tracing::debug!(scheme = verified.scheme, id = %id, "webhook queued");
            respond(StatusCode::OK, "ok")
        }
        Ok(Push::Duplicate) => {
            tracing::info!(scheme = verified.scheme, id = %id, "duplicate webhook acknowledged, not processed again");
            respond(StatusCode::OK, "duplicate")
        }
        Ok(Push::Full) => {
            tracing::warn!(scheme = verified.scheme, id = %id, "webhook queue full: asking the sender to redeliver");
            let mut r = respond(StatusCode::SERVICE_UNAVAILABLE, "busy, retry later");
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(inner.retry_after));
            r
        }
        Err(e) => {
            tracing::error!(scheme = verified.scheme, id = %id, error = %e, "webhook could not be queued: asking the sender to redeliver");
            let mut r = respond(StatusCode::SERVICE_UNAVAILABLE, "unavailable, retry later");
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(inner.retry_after));
            r
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
