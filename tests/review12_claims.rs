//! Claims about behaviour in docs/ARCHITECTURE.md and docs/PERFORMANCE.md, checked from outside:
//! sizes with `size_of`, allocations with `dhat` (one profiler, so one test measures them all),
//! readiness with a service that is not ready, deprecation notices with an in-process API.
#![cfg(feature = "full")]

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::Full;
use sturdy::circuit::CircuitBreakerLayer;
use sturdy::idempotency::client::IdempotencyKeyLayer;
use sturdy::ratelimit::RateLimitLayer;
use sturdy::retry::{AttemptTimeoutLayer, RetryLayer};
use sturdy::version::{Notice, VersionLayer};
use sturdy::ClientBuilder;
use tower::util::BoxCloneSyncService;
use tower::{service_fn, Layer, Service, ServiceBuilder, ServiceExt};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

type Req = Request<Full<Bytes>>;

fn bare() -> impl Service<
    Req,
    Response = Response<()>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<()>, Infallible>> + Send,
> + Clone
       + Send
       + Sync
       + 'static {
    service_fn(|_r: Req| async { Ok(Response::new(())) })
}

/// Answers after one `Pending` (the attempt waits once), with no timer of its own.
fn waits_once() -> impl Service<
    Req,
    Response = Response<()>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<()>, Infallible>> + Send,
> + Clone
       + Send
       + Sync
       + 'static {
    service_fn(|_r: Req| async {
        tokio::task::yield_now().await;
        Ok(Response::new(()))
    })
}

/// Requests made before the measurement, their header maps already allocated with room, so
/// what is counted is the layers' work only.
fn requests(method: &Method, n: usize) -> Vec<Req> {
    let plain = PLAIN.load(Ordering::SeqCst);
    (0..n)
        .map(|_| {
            let mut r = Request::new(Full::new(Bytes::from_static(b"{\"item\":\"book\"}")));
            *r.uri_mut() = http::Uri::from_static("http://api.example.com/orders");
            *r.method_mut() = method.clone();
            if !plain {
                r.headers_mut().reserve(16);
                r.headers_mut()
                    .insert("x-pre", http::HeaderValue::from_static("1"));
            }
            r
        })
        .collect()
}

/// Requests without any header (as tests/footprint.rs sends them).
static PLAIN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// (bytes, allocations) per call through `svc`, the request built beforehand. The heap counts
/// are the process's: the test harness's own thread may grow a buffer while a round runs (once
/// it added 44 B per call in no allocation), so the least of three rounds is taken; a cost of
/// the calls shows in every round.
fn per_call<S>(svc: &S, method: &Method) -> (u64, u64)
where
    S: Service<Req> + Clone,
    S::Error: std::fmt::Debug,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    const N: u64 = 500;
    rt.block_on(async {
        for r in requests(method, 10) {
            svc.clone().oneshot(r).await.unwrap();
        }
        let mut least = (u64::MAX, u64::MAX);
        for _ in 0..3 {
            let reqs = requests(method, N as usize);
            let before = dhat::HeapStats::get();
            for r in reqs {
                svc.clone().oneshot(r).await.unwrap();
            }
            let after = dhat::HeapStats::get();
            least.0 = least.0.min((after.total_bytes - before.total_bytes) / N);
            least.1 = least.1.min((after.total_blocks - before.total_blocks) / N);
        }
        least
    })
}

fn future_size<S: Service<Req>>(_: &S) -> usize {
    std::mem::size_of::<S::Future>()
}

/// dhat allows one profiler at a time, and its counts are the whole process's: every test of
/// this file takes its turn, so none allocates while another measures.
static PROFILER: Mutex<()> = Mutex::new(());

#[test]
fn documented_footprints() {
    let _turn = PROFILER
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let _profiler = dhat::Profiler::builder().testing().build();
    PLAIN.store(false, Ordering::SeqCst);
    let mut wrong: Vec<String> = Vec::new();

    // "the stack's future 440 → 136 bytes" (PERFORMANCE.md), the default stack unboxed.
    let stack = ServiceBuilder::new()
        .layer(IdempotencyKeyLayer::new())
        .layer(RetryLayer::new())
        .layer(CircuitBreakerLayer::new())
        .layer(RateLimitLayer::adaptive_only())
        .layer(AttemptTimeoutLayer::new(Some(Duration::from_secs(30))))
        .service(bare());
    let size = future_size(&stack);
    eprintln!("default stack future: {size} bytes");
    if size != 136 {
        wrong.push(format!(
            "the default stack's future is {size} bytes, not 136"
        ));
    }

    // "no timer unless an attempt waits": the attempt timeout alone, over a service that
    // answers at once, allocates what the service alone does; over one that waits, it makes
    // (and boxes) its timer.
    let timed = AttemptTimeoutLayer::new(Some(Duration::from_secs(30))).layer(bare());
    let (tb, ta) = per_call(&timed, &Method::GET);
    let (bb, ba) = per_call(&bare(), &Method::GET);
    eprintln!("attempt timeout, answered at once: {tb} B in {ta}; bare {bb} B in {ba}");
    if (tb, ta) != (bb, ba) {
        wrong.push(format!(
            "an attempt answered at once allocates {tb} B in {ta} through the attempt timeout, {bb} B in {ba} without"
        ));
    }
    let timed_wait = AttemptTimeoutLayer::new(Some(Duration::from_secs(30))).layer(waits_once());
    let (wb, wa) = per_call(&timed_wait, &Method::GET);
    let (ub, ua) = per_call(&waits_once(), &Method::GET);
    eprintln!("attempt timeout, waiting: {wb} B in {wa}; without {ub} B in {ua}");
    if wa <= ua {
        wrong.push(format!(
            "an attempt that waits makes no timer allocation ({wa} vs {ua})"
        ));
    }

    // "one allocation per idempotency key": the key layer alone, POST (a key) against GET
    // (none), on requests whose header map has room.
    let keyed = IdempotencyKeyLayer::new().layer(bare());
    let (pb, pa) = per_call(&keyed, &Method::POST);
    let (gb, ga) = per_call(&keyed, &Method::GET);
    eprintln!("idempotency key layer: POST {pb} B in {pa}, GET {gb} B in {ga}");
    if pa != ga + 1 {
        wrong.push(format!(
            "a POST through the key layer makes {pa} allocations, a GET {ga}: not one per key"
        ));
    }

    // "a layer left out is not in the stack at all (Identity)": every layer left out costs
    // what boxing the bare service costs. The attempt timeout stays, unset (a request may set
    // its own: `without_attempt_timeout`'s docs), so it is part of the reference.
    let off = ClientBuilder::new()
        .without_idempotency()
        .without_retry()
        .without_circuit_breaker()
        .without_rate_limit()
        .without_attempt_timeout()
        .build(bare());
    let boxed = BoxCloneSyncService::new(
        AttemptTimeoutLayer::new(None)
            .layer(bare())
            .map_err(Into::<sturdy::core::BoxError>::into),
    );
    let (ob, oa) = per_call(&off, &Method::POST);
    let (xb, xa) = per_call(&boxed, &Method::POST);
    eprintln!("every layer off: {ob} B in {oa}; boxed bare {xb} B in {xa}");
    if (ob, oa) != (xb, xa) {
        wrong.push(format!(
            "with every layer left out a call allocates {ob} B in {oa}, the boxed service alone {xb} B in {xa}"
        ));
    }

    // "GET 880 B in 3 allocations, POST 1,584 B in 6" (the default client), for requests
    // without headers (as tests/footprint.rs measures, the request's own allocations there
    // included) and for requests that already carry one header.
    let client = ClientBuilder::new().build(bare());
    let (hgb, hga) = per_call(&client, &Method::GET);
    let (hpb, hpa) = per_call(&client, &Method::POST);
    eprintln!("default client, one header: GET {hgb} B in {hga}, POST {hpb} B in {hpa}");
    PLAIN.store(true, Ordering::SeqCst);
    let (cgb, cga) = per_call(&client, &Method::GET);
    let (cpb, cpa) = per_call(&client, &Method::POST);
    eprintln!("default client, no header: GET {cgb} B in {cga}, POST {cpb} B in {cpa}");
    if cgb > 880 || cga > 3 {
        wrong.push(format!(
            "a GET through the default client allocates {cgb} B in {cga}"
        ));
    }
    if cpb > 1_584 || cpa > 6 {
        wrong.push(format!(
            "a POST through the default client allocates {cpb} B in {cpa}"
        ));
    }
    let (ob, oa) = per_call(&off, &Method::POST);
    let (xb, xa) = per_call(&boxed, &Method::POST);
    let untimed = AttemptTimeoutLayer::new(None).layer(bare());
    let (nb, na) = per_call(&untimed, &Method::POST);
    eprintln!("no header: every layer off {ob} B in {oa}; boxed bare {xb} B in {xa}; attempt timeout None alone {nb} B in {na}");
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// PERFORMANCE.md: "a GET with one header makes 4 allocations, about 900 bytes" (its header
/// value kept in place for a possible replay).
#[test]
fn a_get_with_a_header_allocates_what_the_docs_say() {
    let _turn = PROFILER
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let _profiler = dhat::Profiler::builder().testing().build();
    PLAIN.store(false, Ordering::SeqCst);
    let client = ClientBuilder::new().build(bare());
    let (b, a) = per_call(&client, &Method::GET);
    assert!(
        a <= 4 && b <= 930,
        "a GET with one header: {b} B in {a} allocations"
    );
}

// ---------------------------------------------------------------- readiness passes through

/// Not ready for its first `polls` polls, then ready; counts calls.
#[derive(Clone)]
struct Slow {
    polls: Arc<AtomicUsize>,
    calls: Arc<AtomicUsize>,
    ready_after: usize,
}

impl Service<Req> for Slow {
    type Response = Response<()>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<()>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        let n = self.polls.fetch_add(1, Ordering::SeqCst) + 1;
        if n > self.ready_after {
            Poll::Ready(Ok(()))
        } else {
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    fn call(&mut self, _r: Req) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Ok(Response::new(())) })
    }
}

fn slow() -> Slow {
    Slow {
        polls: Arc::new(AtomicUsize::new(0)),
        calls: Arc::new(AtomicUsize::new(0)),
        ready_after: 3,
    }
}

/// "`poll_ready` passes through": a layer over a service that is not ready is not ready, and
/// is ready once it is.
async fn passes_through<L, S>(name: &str, layer: L)
where
    L: Layer<Slow, Service = S>,
    S: Service<Req>,
{
    let inner = slow();
    let mut svc = layer.layer(inner.clone());
    let waker = futures_util::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    for i in 0..3 {
        assert!(
            svc.poll_ready(&mut cx).is_pending(),
            "{name}: ready while the inner service is not (poll {i})"
        );
    }
    assert!(
        matches!(svc.poll_ready(&mut cx), Poll::Ready(Ok(()))),
        "{name}: not ready once the inner service is"
    );
    assert!(inner.polls.load(Ordering::SeqCst) >= 4, "{name}");
}

// The guard only keeps other tests of this file (other threads) from running meanwhile.
#[allow(clippy::await_holding_lock)]
#[tokio::test]
async fn every_client_layer_passes_readiness_through() {
    // Heap counts are the process's: no test allocates while another measures.
    let _turn = PROFILER
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    passes_through("idempotency key", IdempotencyKeyLayer::new()).await;
    passes_through("retry", RetryLayer::new()).await;
    passes_through("circuit breaker", CircuitBreakerLayer::new()).await;
    passes_through("rate limit", RateLimitLayer::adaptive_only()).await;
    passes_through(
        "attempt timeout",
        AttemptTimeoutLayer::new(Some(Duration::from_secs(1))),
    )
    .await;
    passes_through(
        "version",
        VersionLayer::header("api-version", "2024-06-01").unwrap(),
    )
    .await;
}

// ---------------------------------------------------------------- deprecation, once per endpoint

/// "Version: the pinned API version; Deprecation/Sunset reported once per endpoint".
// The guard only keeps other tests of this file (other threads) from running meanwhile.
#[allow(clippy::await_holding_lock)]
#[tokio::test]
async fn deprecation_is_reported_once_per_endpoint() {
    // Heap counts are the process's: no test allocates while another measures.
    let _turn = PROFILER
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let api = service_fn(|_r: Req| async {
        Ok::<_, Infallible>(
            Response::builder()
                .header("deprecation", "@1688169599")
                .header("sunset", "Sun, 30 Jun 2030 23:59:59 GMT")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
    });
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let client = VersionLayer::header("api-version", "2024-06-01")
        .unwrap()
        .on_notice(move |n: &Notice| log.lock().unwrap().push(n.endpoint.clone()))
        .layer(api);
    for path in ["/v1/a", "/v1/a", "/v1/b", "/v1/a", "/v1/b"] {
        for m in [Method::GET, Method::GET, Method::POST] {
            let mut r = Request::new(Full::new(Bytes::new()));
            *r.uri_mut() = format!("http://api.example.com{path}").parse().unwrap();
            *r.method_mut() = m;
            let res = client.clone().oneshot(r).await.unwrap();
            assert_eq!(res.status(), 200);
        }
    }
    let mut got = seen.lock().unwrap().clone();
    got.sort();
    assert_eq!(
        got,
        vec!["GET /v1/a", "GET /v1/b", "POST /v1/a", "POST /v1/b"]
    );
}
