//! Outside tests: a learned pace composed with tower's Timeout, GlobalConcurrencyLimit and Buffer,
//! cancelled mid-wait, on paused time (ratelimit.md "Where it sits among other layers").
#![cfg(feature = "full")]

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use sturdy::ratelimit::RateLimitLayer;
use tokio::time::Instant;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceBuilder, ServiceExt};

type Api = BoxCloneSyncService<Request<()>, Response<()>, Infallible>;

/// First call: a bare 429; then 200s. Records the time of each call (ms from `t0`).
fn api(t0: Instant) -> (Api, Arc<Mutex<Vec<u128>>>) {
    let log: Arc<Mutex<Vec<u128>>> = Arc::default();
    let l = log.clone();
    let n = Arc::new(AtomicUsize::new(0));
    let svc = tower::service_fn(move |_req: Request<()>| {
        let i = n.fetch_add(1, Ordering::SeqCst);
        l.lock().unwrap().push(t0.elapsed().as_millis());
        async move {
            Ok(Response::builder()
                .status(if i == 0 { 429 } else { 200 })
                .body(())
                .unwrap())
        }
    });
    (BoxCloneSyncService::new(svc), log)
}

fn get() -> Request<()> {
    Request::get("http://a.test/").body(()).unwrap()
}

/// tower's Timeout(150 ms) over the limiter, a kept service driven by `ready().await?.call()`:
/// the calls that time out waiting for the pace leave nothing behind ("A waiting call reserves
/// nothing. If it is dropped (a timeout above it, an aborted task), it leaves the line").
#[tokio::test(start_paused = true)]
async fn timeout_over_a_learned_pace_leaves_no_debt() {
    let t0 = Instant::now();
    let (api, log) = api(t0);
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    let mut svc = ServiceBuilder::new()
        .timeout(Duration::from_millis(150))
        .layer(layer)
        .service(api);
    svc.ready().await.unwrap().call(get()).await.unwrap(); // 429 at 0: pause 1 s
                                                           // Six calls in a row, each times out in line (the pause is 1 s).
    for _ in 0..6 {
        let e = svc.ready().await.unwrap().call(get()).await.unwrap_err();
        assert!(e.is::<tower::timeout::error::Elapsed>(), "{e}");
    }
    assert_eq!(handle.waiting("a.test"), 0);
    // At 900 ms: the next call leaves when the pause ends, at 1000 ms.
    svc.ready().await.unwrap().call(get()).await.unwrap();
    // The one after that: 125 ms later, within the timeout.
    svc.ready().await.unwrap().call(get()).await.unwrap();
    assert_eq!(*log.lock().unwrap(), vec![0, 1000, 1125]);
}

/// "over a concurrency limit of `n`, at most `n` calls wait in the line and the others wait for a
/// permit".
#[tokio::test(start_paused = true)]
async fn global_concurrency_limit_over_the_limiter_bounds_the_line() {
    let t0 = Instant::now();
    let (api, log) = api(t0);
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    let svc = ServiceBuilder::new()
        .layer(GlobalConcurrencyLimitLayer::new(2))
        .layer(layer)
        .service(api);
    svc.clone().oneshot(get()).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let s = svc.clone();
        tasks.push(tokio::spawn(async move { s.oneshot(get()).await }));
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(handle.waiting("a.test"), 2);
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .expect("no deadlock")
            .unwrap()
            .unwrap();
    }
    let t = log.lock().unwrap().clone();
    assert_eq!(t.len(), 11);
    assert_eq!(t[1], 1000, "{t:?}");
    assert_eq!(t[2], 1125, "{t:?}");
}

/// Buffer(2) over the limiter, 20 callers during the pause, half aborted mid-wait: the others all
/// get through at the pace, and the limiter's line empties.
#[tokio::test(start_paused = true)]
async fn buffer_with_aborted_callers_under_a_pace() {
    let t0 = Instant::now();
    let (api, log) = api(t0);
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    let svc = ServiceBuilder::new().buffer(2).layer(layer).service(api);
    svc.clone().oneshot(get()).await.unwrap();
    let mut keep = Vec::new();
    let mut abort = Vec::new();
    for i in 0..20 {
        let mut s = svc.clone();
        let t = tokio::spawn(async move {
            let r = s.ready().await?.call(get()).await?;
            Ok::<_, tower::BoxError>(r)
        });
        if i % 2 == 0 {
            abort.push(t);
        } else {
            keep.push(t);
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for t in &abort {
        t.abort();
    }
    for t in keep {
        tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .expect("no deadlock")
            .unwrap()
            .unwrap();
    }
    assert_eq!(handle.waiting("a.test"), 0);
    let t = log.lock().unwrap().clone();
    assert_eq!(
        t.len(),
        11,
        "the aborted calls never reached the API: {t:?}"
    );
    // The ten kept calls: from the end of the pause, one per (faster and faster) interval.
    assert_eq!(t[1], 1000, "{t:?}");
    assert!(t[10] - t[1] <= 9 * 125, "{t:?}");
}

/// A future polled once (it joined the line) and then dropped without being polled again, many
/// times over, with a kept service: the next caller waits no longer than the pace.
#[tokio::test(start_paused = true)]
async fn futures_polled_once_then_dropped_cost_nothing() {
    let t0 = Instant::now();
    let (api, log) = api(t0);
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    let mut svc = tower::Layer::layer(&layer, api);
    svc.ready().await.unwrap().call(get()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    svc.ready().await.unwrap().call(get()).await.unwrap(); // at 1000: next slot 1125
    for _ in 0..1000 {
        let mut f = Box::pin(svc.ready().await.unwrap().call(get()));
        assert!(futures_util::FutureExt::now_or_never(f.as_mut()).is_none());
    }
    assert_eq!(handle.waiting("a.test"), 0);
    let asked = Instant::now();
    svc.ready().await.unwrap().call(get()).await.unwrap();
    assert!(
        asked.elapsed() <= Duration::from_millis(125),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(log.lock().unwrap().len(), 3);
}
