//! Memory per call: the size of the composed stack's response future and the bytes allocated per
//! call, GET and POST, with a ceiling each that this test enforces (so they cannot grow unnoticed).
//! Run with `--nocapture` to read the figures.
#![cfg(feature = "full")]

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::Full;
use sturdy::circuit::CircuitBreakerLayer;
use sturdy::idempotency::client::IdempotencyKeyLayer;
use sturdy::ratelimit::RateLimitLayer;
use sturdy::retry::{AttemptTimeoutLayer, RetryLayer};
use sturdy::ClientBuilder;
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

fn bare() -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<()>,
    Error = std::convert::Infallible,
    Future = impl std::future::Future<Output = Result<Response<()>, std::convert::Infallible>> + Send,
> + Clone
       + Send
       + Sync
       + 'static {
    service_fn(|_r: Request<Full<Bytes>>| async { Ok(Response::new(())) })
}

fn request(method: &Method) -> Request<Full<Bytes>> {
    let mut r = Request::new(Full::new(Bytes::from_static(b"{\"item\":\"book\"}")));
    *r.uri_mut() = http::Uri::from_static("http://api.example.com/orders");
    *r.method_mut() = method.clone();
    r
}

fn future_size<S: Service<Request<Full<Bytes>>>>(_: &S) -> usize {
    std::mem::size_of::<S::Future>()
}

/// (bytes, allocations) per call, the request's own included.
fn per_call<S>(svc: &S, method: &Method) -> (usize, usize)
where
    S: Service<Request<Full<Bytes>>> + Clone,
    S::Error: std::fmt::Debug,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    const N: usize = 1_000;
    rt.block_on(async {
        // Warm up: first-call state (per-host slots, budgets) is made once, not per call.
        for _ in 0..10 {
            svc.clone().oneshot(request(method)).await.unwrap();
        }
        let before = dhat::HeapStats::get();
        for _ in 0..N {
            svc.clone().oneshot(request(method)).await.unwrap();
        }
        let after = dhat::HeapStats::get();
        (
            usize::try_from(after.total_bytes - before.total_bytes).unwrap() / N,
            usize::try_from(after.total_blocks - before.total_blocks).unwrap() / N,
        )
    })
}

#[test]
fn the_footprint_of_a_call_stays_under_its_ceiling() {
    let _profiler = dhat::Profiler::builder().testing().build();
    // The stack `ClientBuilder::new()` builds, unboxed, to see its future's size.
    let stack = ServiceBuilder::new()
        .layer(IdempotencyKeyLayer::new())
        .layer(RetryLayer::new())
        .layer(CircuitBreakerLayer::new())
        .layer(RateLimitLayer::adaptive_only())
        .layer(AttemptTimeoutLayer::new(Some(
            std::time::Duration::from_secs(30),
        )))
        .service(bare());
    let size = future_size(&stack);
    let client = ClientBuilder::new().build(bare());
    let (get_bytes, get_allocs) = per_call(&client, &Method::GET);
    let (post_bytes, post_allocs) = per_call(&client, &Method::POST);
    let (bare_bytes, bare_allocs) = per_call(&bare(), &Method::GET);
    eprintln!(
        "response future of the default stack: {size} bytes\n\
         bare service: {bare_bytes} bytes in {bare_allocs} allocations per call\n\
         default stack, GET: {get_bytes} bytes in {get_allocs} allocations per call\n\
         default stack, POST: {post_bytes} bytes in {post_allocs} allocations per call"
    );
    // Ceilings recorded from the figures in docs/PERFORMANCE.md, with a little room.
    assert!(size <= 192, "the response future grew to {size} bytes");
    assert!(get_bytes <= 960, "a GET allocates {get_bytes} bytes");
    assert!(get_allocs <= 3, "a GET makes {get_allocs} allocations");
    assert!(post_bytes <= 1_700, "a POST allocates {post_bytes} bytes");
    assert!(post_allocs <= 6, "a POST makes {post_allocs} allocations");
}
