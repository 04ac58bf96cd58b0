//! The pieces the in-process stack benches share: the bare service, the request, and the
//! reference stack of tower's own layers.

// Each bench that includes this module uses a part of it.
#![allow(dead_code)]

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body_util::Full;
use tower::{service_fn, Service};

pub(crate) fn bare() -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<()>,
    Error = std::convert::Infallible,
    Future = impl std::future::Future<Output = Result<Response<()>, std::convert::Infallible>> + Send,
> + Clone
       + Send
       + Sync
       + 'static {
    service_fn(|_r: Request<Full<Bytes>>| {
        std::future::ready(Ok::<_, std::convert::Infallible>(Response::new(())))
    })
}

/// A service whose answer is not ready at the first poll (it wakes its task and answers at the
/// second), as a call over a network is never ready at once: every attempt timer is made and
/// registered with tokio's timer, then cancelled.
pub(crate) fn pending_once() -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<()>,
    Error = std::convert::Infallible,
    Future = impl std::future::Future<Output = Result<Response<()>, std::convert::Infallible>> + Send,
> + Clone
       + Send
       + Sync
       + 'static {
    service_fn(|_r: Request<Full<Bytes>>| async {
        tokio::task::yield_now().await;
        Ok::<_, std::convert::Infallible>(Response::new(()))
    })
}

pub(crate) fn request(uri: &Uri, method: &http::Method) -> Request<Full<Bytes>> {
    let mut r = Request::new(Full::new(Bytes::from_static(b"{\"item\":\"book\"}")));
    *r.uri_mut() = uri.clone();
    *r.method_mut() = method.clone();
    r
}

/// A retry policy that never retries but, like a real one, copies each request for a replay.
#[derive(Clone)]
struct NeverRetry;

impl tower::retry::Policy<Request<Full<Bytes>>, Response<()>, sturdy::core::BoxError>
    for NeverRetry
{
    type Future = std::future::Ready<()>;

    fn retry(
        &mut self,
        _req: &mut Request<Full<Bytes>>,
        _result: &mut Result<Response<()>, sturdy::core::BoxError>,
    ) -> Option<Self::Future> {
        None
    }

    fn clone_request(&mut self, req: &Request<Full<Bytes>>) -> Option<Request<Full<Bytes>>> {
        let mut r = Request::new(req.body().clone());
        *r.method_mut() = req.method().clone();
        *r.uri_mut() = req.uri().clone();
        *r.version_mut() = req.version();
        *r.headers_mut() = req.headers().clone();
        *r.extensions_mut() = req.extensions().clone();
        Some(r)
    }
}

/// tower's own layers doing about what the default stack does, boxed once like `ClientBuilder`.
/// tower's rate limit cannot be cloned, and its retry clones what is under it: the rate limit
/// goes above the retry.
pub(crate) fn reference(
) -> tower::util::BoxService<Request<Full<Bytes>>, Response<()>, sturdy::core::BoxError> {
    let svc = tower::ServiceBuilder::new()
        .layer(
            tower_http::set_header::SetRequestHeaderLayer::if_not_present(
                http::HeaderName::from_static("idempotency-key"),
                http::HeaderValue::from_static("7f0c2b6e-5d1a-4c7e-9b1e-2f4a6d8c0e13"),
            ),
        )
        .layer(tower::limit::RateLimitLayer::new(
            1_000_000_000,
            std::time::Duration::from_secs(1),
        ))
        .layer(tower::limit::ConcurrencyLimitLayer::new(1_000))
        .layer(tower::retry::RetryLayer::new(NeverRetry))
        .layer(tower::timeout::TimeoutLayer::new(
            std::time::Duration::from_secs(30),
        ))
        .service(bare());
    tower::util::BoxService::new(svc)
}

/// The same reference stack, but with a fresh random key (UUID v4, formatted on the stack) on
/// each request whose method is not idempotent, as sturdy's idempotency layer sets one: the
/// comparable work for a POST.
pub(crate) fn reference_with_fresh_keys(
) -> tower::util::BoxService<Request<Full<Bytes>>, Response<()>, sturdy::core::BoxError> {
    let svc = tower::ServiceBuilder::new()
        .layer(
            tower_http::set_header::SetRequestHeaderLayer::if_not_present(
                http::HeaderName::from_static("idempotency-key"),
                |req: &Request<Full<Bytes>>| {
                    if req.method() != http::Method::POST && req.method() != http::Method::PATCH {
                        return None;
                    }
                    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
                    let key = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
                    http::HeaderValue::from_str(key).ok()
                },
            ),
        )
        .layer(tower::limit::RateLimitLayer::new(
            1_000_000_000,
            std::time::Duration::from_secs(1),
        ))
        .layer(tower::limit::ConcurrencyLimitLayer::new(1_000))
        .layer(tower::retry::RetryLayer::new(NeverRetry))
        .layer(tower::timeout::TimeoutLayer::new(
            std::time::Duration::from_secs(30),
        ))
        .service(bare());
    tower::util::BoxService::new(svc)
}
