use std::collections::VecDeque;
use std::fmt;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::{Request, Response};
use http_body::Body;
use sturdy_core::events::Event;
use sturdy_core::key::KeyExtractor;
use sturdy_core::keyed::SlotCache;
use sturdy_core::{BoxError, Error, ErrorKind};
use tower::Service;

use crate::body::ResponseBody;
use crate::flight::{
    coalescable, join_or_start, key_of, BoxFuture, Buffered, Counters, Flights, Handoff, Joined,
    Outcome, Registry,
};
use crate::future::ResponseFuture;

/// The service made by [`CoalesceLayer`](crate::CoalesceLayer).
///
/// # Clone
/// Clones share the tables of calls in flight.
///
/// # Backpressure
/// `poll_ready` is the inner service's. A request that starts a shared call goes to the service
/// `poll_ready` made ready. A request that joins a call in flight does not use it: that ready
/// service is dropped at once, which gives back what it reserved (a `ConcurrencyLimit` permit, a
/// `Buffer` slot), and if the request must send its own call later (a body too large to share),
/// it drives a clone of the inner service to readiness first.
pub struct Coalesce<S, K> {
    pub(crate) inner: S,
    pub(crate) registry: Arc<Registry>,
    pub(crate) key: K,
    pub(crate) cache: SlotCache<Flights>,
}

impl<S: Clone, K: Clone> Clone for Coalesce<S, K> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            registry: self.registry.clone(),
            key: self.key.clone(),
            cache: self.cache.clone(),
        }
    }
}

impl<S: fmt::Debug, K> fmt::Debug for Coalesce<S, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Coalesce")
            .field("inner", &self.inner)
            .field("registry", &self.registry)
            .finish_non_exhaustive()
    }
}

sturdy_core::define_inner_service_accessors!(Coalesce<S, K>);

// ===== impl Coalesce =====

impl<S, K, B, Rb> Service<Request<B>> for Coalesce<S, K>
where
    S: Service<Request<B>, Response = Response<Rb>> + Clone,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    K: KeyExtractor<B>,
    B: Body,
    Rb: Body<Data = Bytes> + Send + 'static,
    Rb::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<Rb>>;
    type Error = BoxError;
    type Future = ResponseFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        if !coalescable(&req) {
            return ResponseFuture::direct(self.inner.call(req));
        }
        let registry = &self.registry;
        let counters = &registry.counters;
        counters.calls.fetch_add(1, Ordering::Relaxed);
        let mut bytes = key_of(&req, &registry.config.headers);
        let host = self.key.key(&req);
        if !registry.config.keys_are_hosts {
            // A key of the caller's (a tenant, a credential) partitions the calls: past the
            // bound, keys share the overflow table, and two keys' identical requests must still
            // not share a response. A host key is in the request's identity already.
            bytes.extend_from_slice(&(host.len() as u64).to_le_bytes());
            bytes.extend_from_slice(host.as_bytes());
        }
        let (local, joined) = loop {
            let local = self.cache.get(&registry.map, &host, Flights::default);
            match join_or_start(&local, bytes) {
                Ok(joined) => break (local, joined),
                // Forgotten by a full map since the look-up: look again.
                Err(back) => bytes = back,
            }
        };
        match joined {
            Joined::Lead(start) => {
                counters.upstream.fetch_add(1, Ordering::Relaxed);
                // The shared call outlives the call that leads it (it goes on for those who
                // joined): its waits below say nothing about whether the leader's request left.
                if let Some(hold) = req.extensions().get::<sturdy_core::hold::AttemptHold>() {
                    hold.fan_out();
                }
                // The inner service was driven to readiness: the shared call goes to it now.
                let fut = self.inner.call(req);
                let handoff = start.handoff();
                let h = handoff.clone();
                let max = registry.config.max_body;
                let body_timeout = registry.config.body_timeout;
                let c = counters.clone();
                let call: BoxFuture = Box::pin(async move {
                    let res = match fut.await {
                        Ok(res) => res,
                        Err(e) => return Outcome::Failed(Arc::new(e.into())),
                    };
                    collect(res, max, body_timeout, &h, &c).await
                });
                let shared = start.launch(call);
                ResponseFuture::joined(shared, handoff, true, None, counters.clone())
            }
            Joined::Follow(shared, handoff) => {
                counters.joined.fetch_add(1, Ordering::Relaxed);
                // The host called, not the table's key: past the host bound, hosts share the
                // overflow table (`*`), but each joined call is still one host's.
                // In lower case, as every layer's events name a host.
                let host = registry
                    .config
                    .keys_are_hosts
                    .then(|| sturdy_core::key::host_key(sturdy_core::key::host(&req)));
                registry.config.events.emit(&Event::Coalesced {
                    key: local.key(),
                    host: host.as_deref(),
                    method: req.method(),
                });
                // Not called now: give back what poll_ready reserved, keep a clone in case this
                // request must send its own call.
                sturdy_core::ready::release_ready(&mut self.inner);
                let spare = self.inner.clone();
                ResponseFuture::joined(shared, handoff, false, Some((spare, req)), counters.clone())
            }
        }
    }
}

/// Reads a shared response's body, up to `max` bytes; past it, hands the response to one caller.
async fn collect<Rb>(
    res: Response<Rb>,
    max: usize,
    body_timeout: Option<std::time::Duration>,
    handoff: &Handoff,
    c: &Counters,
) -> Outcome
where
    Rb: Body<Data = Bytes> + Send + 'static,
    Rb::Error: Into<BoxError>,
{
    let (parts, body) = res.into_parts();
    let mut body = Box::pin(body);
    let mut chunks: VecDeque<Bytes> = VecDeque::new();
    let mut len = 0usize;
    let mut trailers = None;
    let too_large = |parts, chunks, body| {
        c.too_large.fetch_add(1, Ordering::Relaxed);
        let res = Response::from_parts(parts, ResponseBody::prefixed(chunks, body));
        handoff.put(Box::new(res));
        Outcome::TooLarge
    };
    if body.size_hint().lower() > max as u64 {
        return too_large(parts, chunks, body);
    }
    // Made only when a read has to wait: most bodies are there with their head.
    let mut timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
    loop {
        let next = poll_fn(|cx| {
            if let Poll::Ready(frame) = body.as_mut().poll_frame(cx) {
                return Poll::Ready(Some(frame));
            }
            let Some(d) = body_timeout else {
                return Poll::Pending;
            };
            let t = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(d)));
            std::task::ready!(t.as_mut().poll(cx));
            Poll::Ready(None)
        })
        .await;
        let Some(next) = next else {
            let d = body_timeout.unwrap_or_default();
            let err = Error::new(
                ErrorKind::Timeout,
                format!(
                    "the shared response's body did not arrive within {} of its head",
                    sturdy_core::human_duration(d)
                ),
            );
            return Outcome::Failed(Arc::new(Box::new(err)));
        };
        match next {
            None => break,
            Some(Err(e)) => {
                let err = Error::new(ErrorKind::Body, "could not read the shared response's body")
                    .with_source(e);
                return Outcome::Failed(Arc::new(Box::new(err)));
            }
            Some(Ok(frame)) => match frame.into_data() {
                // An empty frame adds nothing to keep: a peer sending empty DATA frames must
                // not grow the list while the byte count stays put.
                Ok(data) if data.is_empty() => {}
                Ok(data) => {
                    len = len.saturating_add(data.len());
                    chunks.push_back(data);
                    if len > max {
                        return too_large(parts, chunks, body);
                    }
                }
                Err(frame) => {
                    if let Ok(t) = frame.into_trailers() {
                        trailers = Some(t);
                    }
                }
            },
        }
    }
    let body = match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.pop_front().unwrap_or_default(),
        _ => {
            let mut b = BytesMut::with_capacity(len);
            for c in chunks {
                b.extend_from_slice(&c);
            }
            b.freeze()
        }
    };
    Outcome::Full(Arc::new(Buffered {
        parts,
        body,
        trailers,
    }))
}
