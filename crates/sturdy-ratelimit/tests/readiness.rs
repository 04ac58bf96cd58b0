//! tower's readiness contract on every waiting path: the call goes to the service that
//! `poll_ready` made ready, so RateLimit works over ConcurrencyLimit(1) and with Buffer(1),
//! driven by `oneshot` or by a kept service (`ready().await?.call(req)`). Paused time; every call
//! is bounded, so a deadlock fails the test instead of hanging it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use sturdy_core::BoxError;
use sturdy_ratelimit::{BoxFuture, DirectLimiter, Quota, RateLimitLayer, RemoteQuota, Reserve};
use tokio::time::{timeout, Instant};
use tower::buffer::Buffer;
use tower::limit::{ConcurrencyLimitLayer, GlobalConcurrencyLimitLayer};
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

use crate::support;
use support::{get, ms, status_with, Api};

/// Far longer than any wait in these tests; a call that takes longer is stuck.
const BOUND: Duration = Duration::from_secs(600);

async fn bounded<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match timeout(BOUND, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: no answer within {BOUND:?} (deadlock)"),
    }
}

/// `n` calls, one after the other, on one kept service.
async fn kept<S>(mut svc: S, n: usize)
where
    S: Service<Request<()>, Response = Response<()>>,
    S::Error: std::fmt::Debug,
{
    for i in 0..n {
        bounded(&format!("kept call {i}"), async {
            svc.ready().await.unwrap().call(get("a")).await.unwrap()
        })
        .await;
    }
}

/// `n` calls, one after the other, each with `oneshot` on a clone.
async fn oneshots<S>(svc: S, n: usize)
where
    S: Service<Request<()>, Response = Response<()>> + Clone,
    S::Error: std::fmt::Debug,
{
    for i in 0..n {
        bounded(&format!("oneshot call {i}"), svc.clone().oneshot(get("a")))
            .await
            .unwrap();
    }
}

/// `tasks` tasks, each making `n` calls on its own kept clone.
async fn concurrent_kept<S>(svc: S, tasks: usize, n: usize)
where
    S: Service<Request<()>, Response = Response<()>> + Clone + Send + 'static,
    S::Error: std::fmt::Debug + Send,
    S::Future: Send,
{
    let handles: Vec<_> = (0..tasks)
        .map(|_| tokio::spawn(kept(svc.clone(), n)))
        .collect();
    for h in handles {
        h.await.unwrap();
    }
}

fn every_100ms(n: usize) -> Vec<Duration> {
    (0..n as u64).map(|i| ms(100 * i)).collect()
}

/// Quota 10/s, burst 1: every call after the first waits for its slot.
fn paced() -> RateLimitLayer {
    RateLimitLayer::new(Quota::per_second(10).unwrap())
}

#[tokio::test(start_paused = true)]
async fn slot_wait_over_concurrency_limit_1_with_a_kept_service() {
    let api = Api::default();
    let svc = ServiceBuilder::new()
        .layer(paced())
        .layer(ConcurrencyLimitLayer::new(1))
        .service(api.service());
    let start = Instant::now();
    kept(svc, 20).await;
    assert_eq!(api.since(start), every_100ms(20));
}

#[tokio::test(start_paused = true)]
async fn slot_wait_over_global_concurrency_limit_1_kept_and_oneshot_and_concurrent() {
    let api = Api::default();
    let svc = ServiceBuilder::new()
        .layer(paced())
        .layer(GlobalConcurrencyLimitLayer::new(1))
        .service(api.service());
    let start = Instant::now();
    kept(svc.clone(), 10).await;
    oneshots(svc.clone(), 10).await;
    concurrent_kept(svc, 8, 5).await;
    assert_eq!(api.since(start), every_100ms(60));
}

#[tokio::test(start_paused = true)]
async fn slot_wait_under_buffer_1_kept_and_concurrent() {
    // Buffer(1) in front of RateLimit over ConcurrencyLimit(1): the buffer's worker drives the
    // limiter to readiness and calls it; the waiting call must use the permit it holds.
    let api = Api::default();
    let inner = ServiceBuilder::new()
        .layer(paced())
        .layer(ConcurrencyLimitLayer::new(1))
        .service(api.service());
    let svc = Buffer::new(inner, 1);
    let start = Instant::now();
    kept(svc.clone(), 10).await;
    oneshots(svc.clone(), 5).await;
    concurrent_kept(svc, 8, 5).await;
    assert_eq!(api.since(start), every_100ms(55));
}

#[tokio::test(start_paused = true)]
async fn slot_wait_over_buffer_1_kept_and_concurrent() {
    // RateLimit over Buffer(1): the buffer's slot, reserved by poll_ready, is used by the call.
    let api = Api::default();
    let svc = paced().layer(Buffer::new(api.service(), 1));
    let start = Instant::now();
    kept(svc.clone(), 10).await;
    oneshots(svc.clone(), 5).await;
    concurrent_kept(svc, 8, 5).await;
    assert_eq!(api.since(start), every_100ms(55));
}

#[tokio::test(start_paused = true)]
async fn pause_wait_over_concurrency_limit_1_with_kept_services() {
    // Every fifth answer asks for a 1 s pause; the calls after it wait for the pause with the
    // ready service in hand.
    let mut script = Vec::new();
    for _ in 0..4 {
        script.push(status_with(429, &[("retry-after", "1")]));
        script.extend((0..4).map(|_| Response::new(())));
    }
    let api = Api::with(script);
    let svc = ServiceBuilder::new()
        .layer(RateLimitLayer::adaptive_only())
        .layer(ConcurrencyLimitLayer::new(1))
        .service(api.service());
    let start = Instant::now();
    kept(svc.clone(), 10).await;
    concurrent_kept(svc, 5, 2).await;
    // Each 429 holds the next calls back one second.
    let secs = |s: u64, n: usize| std::iter::repeat_n(Duration::from_secs(s), n);
    let want: Vec<Duration> = secs(0, 1)
        .chain(secs(1, 5))
        .chain(secs(2, 5))
        .chain(secs(3, 5))
        .chain(secs(4, 4))
        .collect();
    assert_eq!(api.since(start), want);
}

#[tokio::test(start_paused = true)]
async fn pause_wait_under_buffer_1_with_kept_services() {
    let api = Api::with(vec![status_with(429, &[("retry-after", "2")])]);
    let inner = ServiceBuilder::new()
        .layer(RateLimitLayer::adaptive_only())
        .layer(ConcurrencyLimitLayer::new(1))
        .service(api.service());
    let svc = Buffer::new(inner, 1);
    let start = Instant::now();
    kept(svc.clone(), 3).await;
    concurrent_kept(svc, 4, 3).await;
    let t = api.since(start);
    assert_eq!(t.len(), 15);
    assert_eq!(t[0], Duration::ZERO);
    assert!(t[1..].iter().all(|d| *d == Duration::from_secs(2)), "{t:?}");
}

/// A store that answers after 1 ms with a slot from an in-process GCRA.
#[derive(Debug)]
struct SlowStore(DirectLimiter);

impl RemoteQuota for SlowStore {
    fn reserve(&self, _key: &str, max_wait: Duration) -> BoxFuture<Result<Reserve, BoxError>> {
        let decided = match self.0.reserve(max_wait) {
            Ok(wait) => Reserve::Granted { wait },
            Err(e) => Reserve::Denied {
                retry_after: e.retry_after(),
            },
        };
        Box::pin(async move {
            tokio::time::sleep(ms(1)).await;
            Ok(decided)
        })
    }
}

#[tokio::test(start_paused = true)]
async fn remote_decision_over_concurrency_limit_1_and_buffer_1() {
    let store = Arc::new(SlowStore(DirectLimiter::new(
        Quota::per_second(10).unwrap(),
    )));
    let layer = RateLimitLayer::new(Quota::per_second(10).unwrap()).with_remote(store);
    let api = Api::default();
    let svc = ServiceBuilder::new()
        .layer(layer.clone())
        .layer(ConcurrencyLimitLayer::new(1))
        .service(api.service());
    let start = Instant::now();
    kept(svc.clone(), 5).await;
    oneshots(svc.clone(), 5).await;
    concurrent_kept(svc, 4, 5).await;
    let buffered = Buffer::new(
        ServiceBuilder::new()
            .layer(layer)
            .layer(ConcurrencyLimitLayer::new(1))
            .service(api.service()),
        1,
    );
    kept(buffered.clone(), 5).await;
    concurrent_kept(buffered, 4, 5).await;
    let t = api.since(start);
    assert_eq!(t.len(), 55);
    // One per 100 ms, each 1 ms (the store's answer) after its slot.
    for (i, d) in t.iter().enumerate() {
        assert_eq!(*d, ms(100 * i as u64 + 1), "call {i}: {t:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn the_waiting_call_goes_to_the_mock_poll_ready_made_ready() {
    use tokio_test::{assert_pending, assert_ready, assert_ready_ok};
    let (mut svc, mut handle) = tower_test::mock::spawn_layer::<Request<()>, Response<()>, _>(
        RateLimitLayer::new(Quota::per_second(10).unwrap()),
    );
    handle.allow(2);
    // A free slot: called at once.
    assert_ready_ok!(svc.poll_ready());
    let mut first = tokio_test::task::spawn(svc.call(get("a")));
    let (_, send) = assert_ready!(handle.poll_request()).unwrap();
    send.send_response(Response::new(()));
    assert_ready_ok!(first.poll());

    // Made ready, then the mock admits nobody else: the waiting call must use this readiness.
    assert_ready_ok!(svc.poll_ready());
    handle.allow(0);
    let mut second = tokio_test::task::spawn(svc.call(get("a")));
    assert_pending!(second.poll());
    tokio::time::advance(ms(99)).await;
    assert_pending!(second.poll());
    assert_pending!(handle.poll_request());
    tokio::time::advance(ms(1)).await;
    assert!(second.is_woken());
    assert_pending!(second.poll());
    let (req, send) = assert_ready!(handle.poll_request()).unwrap();
    assert_eq!(req.uri(), "http://a/orders");
    send.send_response(Response::new(()));
    assert_ready_ok!(second.poll());

    // The service kept a clone that poll_ready has not made ready: it waits for capacity.
    assert_pending!(svc.poll_ready());
    handle.allow(1);
    assert_ready_ok!(svc.poll_ready());
}
