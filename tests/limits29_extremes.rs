//! Settings at their extremes for the rate limiter, hedging and the adaptive concurrency limit:
//! `Duration::MAX`, zero, `usize::MAX`, instant answers, centuries of idle time. The docs say none
//! of the setters panics and every value is taken into its bounds.

#![cfg(feature = "full")]

use std::time::Duration;

use http::{Request, Response};
use sturdy::concurrency::{AdaptiveConcurrencyLayer, Algorithm};
use sturdy::core::BoxError;
use sturdy::hedge::HedgeLayer;
use sturdy::ratelimit::{DirectLimiter, Quota, RateLimitLayer};
use tokio::time::Instant;
use tower::{service_fn, Layer, Service, ServiceExt};

fn get(host: &str) -> Request<()> {
    Request::get(format!("http://{host}/x")).body(()).unwrap()
}

fn api(
    ms: u64,
) -> impl Service<Request<()>, Response = Response<()>, Error = BoxError, Future = impl Send>
       + Clone
       + Send
       + 'static {
    service_fn(move |_r: Request<()>| async move {
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        Ok::<_, BoxError>(Response::new(()))
    })
}

#[tokio::test(start_paused = true)]
async fn concurrency_max_wait_duration_max_waits_for_a_place() {
    let svc = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .with_max_wait(Duration::MAX)
        .layer(api(100));
    let first = tokio::spawn(svc.clone().oneshot(get("a.test")));
    tokio::task::yield_now().await;
    let start = Instant::now();
    svc.clone().oneshot(get("a.test")).await.unwrap();
    // 100 ms for the first call's place, then its own 100 ms.
    assert_eq!(start.elapsed(), Duration::from_millis(200));
    first.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn concurrency_initial_limit_usize_max_is_taken_into_the_bounds() {
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_initial_limit(usize::MAX)
        .pair();
    layer.layer(api(1)).oneshot(get("a.test")).await.unwrap();
    assert_eq!(handle.limit("a.test"), Some(1_000));
}

#[tokio::test(start_paused = true)]
async fn concurrency_max_hosts_zero_still_serves_calls() {
    let (layer, handle) = AdaptiveConcurrencyLayer::new().with_max_hosts(0).pair();
    let svc = layer.layer(api(1));
    for i in 0..20 {
        svc.clone()
            .oneshot(get(&format!("h{i}.test")))
            .await
            .unwrap();
    }
    assert!(handle.states().len() <= 1, "{:?}", handle.states().len());
}

#[tokio::test(start_paused = true)]
async fn aimd_never_grows_past_the_maximum() {
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 3)
        .with_initial_limit(3)
        .pair();
    let svc = layer.layer(api(10));
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let s = svc.clone();
            tokio::spawn(async move {
                for _ in 0..20 {
                    s.clone().oneshot(get("a.test")).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(handle.limit("a.test"), Some(3));
}

#[tokio::test(start_paused = true)]
async fn vegas_with_instant_answers_keeps_a_sane_limit() {
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_algorithm(Algorithm::Vegas)
        .pair();
    let svc = layer.layer(api(0));
    let tasks: Vec<_> = (0..30)
        .map(|_| {
            let s = svc.clone();
            tokio::spawn(async move {
                for _ in 0..50 {
                    s.clone().oneshot(get("a.test")).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let limit = handle.limit("a.test").unwrap();
    assert!((1..=1_000).contains(&limit), "{limit}");
}

#[tokio::test(start_paused = true)]
async fn vegas_with_a_latency_that_jumps_stays_in_bounds() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let n = Arc::new(AtomicUsize::new(0));
    let svc_fn = service_fn(move |_r: Request<()>| {
        let i = n.fetch_add(1, Ordering::SeqCst);
        async move {
            let ms = if i % 100 < 50 { 0 } else { 5_000 };
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok::<_, std::convert::Infallible>(Response::new(()))
        }
    });
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_algorithm(Algorithm::Vegas)
        .with_limits(2, 50)
        .pair();
    let svc = layer.layer(svc_fn);
    let tasks: Vec<_> = (0..60)
        .map(|_| {
            let s = svc.clone();
            tokio::spawn(async move {
                for _ in 0..10 {
                    let _ = s.clone().oneshot(get("a.test")).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let st = handle.state("a.test").unwrap();
    assert!((2..=50).contains(&st.limit()), "{}", st.limit());
    assert_eq!((st.in_flight(), st.waiting()), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn hedge_min_samples_zero_does_not_panic() {
    let (layer, handle) = HedgeLayer::new().with_min_samples(0).pair();
    let svc = layer.layer(api(5));
    for _ in 0..5 {
        svc.clone().oneshot(get("a.test")).await.unwrap();
    }
    assert!(handle.stats("a.test").is_some());
}

#[tokio::test(start_paused = true)]
async fn hedge_window_duration_max_does_not_panic() {
    let (layer, handle) = HedgeLayer::new()
        .with_min_samples(5)
        .with_window(Duration::MAX)
        .pair();
    let svc = layer.layer(api(5));
    for _ in 0..10 {
        svc.clone().oneshot(get("a.test")).await.unwrap();
    }
    tokio::time::advance(Duration::from_secs(3_600)).await;
    svc.clone().oneshot(get("a.test")).await.unwrap();
    assert!(handle.stats("a.test").unwrap().delay().is_some());
}

/// `with_max_hosts`: "at least 1 ... past it, hosts with no call in the last two windows are
/// forgotten, then new hosts share one overflow state": 0 keeps one host (the first, called
/// lately) and every other host shares `*`.
#[tokio::test(start_paused = true)]
async fn hedge_max_hosts_zero_keeps_one_host_and_one_overflow_state() {
    let (layer, handle) = HedgeLayer::new().with_max_hosts(0).pair();
    let svc = layer.layer(api(1));
    for i in 0..20 {
        svc.clone()
            .oneshot(get(&format!("h{i}.test")))
            .await
            .unwrap();
    }
    let mut all: Vec<_> = handle.all().into_iter().map(|(k, _)| k).collect();
    all.sort();
    assert_eq!(all, ["*", "h0.test"]);
}

#[tokio::test(start_paused = true)]
async fn hedge_extreme_percentiles_are_accepted() {
    for p in [1e-300, 0.999_999_999] {
        let (layer, handle) = HedgeLayer::new()
            .with_percentile(p)
            .unwrap()
            .with_min_samples(10)
            .pair();
        let svc = layer.layer(api(5));
        for _ in 0..12 {
            svc.clone().oneshot(get("a.test")).await.unwrap();
        }
        assert!(handle.stats("a.test").unwrap().delay().is_some(), "{p}");
    }
}

#[tokio::test(start_paused = true)]
async fn hedge_after_the_slowest_bucket_latency() {
    // A call slower than the histogram's top (about 4.7 h) lands in the last bucket.
    let (layer, handle) = HedgeLayer::new()
        .with_min_samples(1)
        .with_window(Duration::from_secs(100_000))
        .pair();
    let svc = layer.layer(api(6 * 3_600 * 1_000));
    svc.clone().oneshot(get("a.test")).await.unwrap();
    let p = handle.latency_percentile("a.test", 0.5).unwrap();
    assert!(p >= Duration::from_secs(4 * 3_600), "{p:?}");
}

#[tokio::test(start_paused = true)]
async fn ratelimit_release_pace_duration_max_does_not_hang_or_panic() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let n = Arc::new(AtomicUsize::new(0));
    let svc_fn = service_fn(move |_r: Request<()>| {
        let i = n.fetch_add(1, Ordering::SeqCst);
        async move {
            let status = if i == 0 { 429 } else { 200 };
            Ok::<_, std::convert::Infallible>(
                Response::builder()
                    .status(status)
                    .header("retry-after", "1")
                    .body(())
                    .unwrap(),
            )
        }
    });
    let svc = RateLimitLayer::adaptive_only()
        .with_release_pace(Duration::MAX)
        .layer(svc_fn);
    svc.clone().oneshot(get("a.test")).await.unwrap();
    let a = tokio::spawn(svc.clone().oneshot(get("a.test")));
    let b = tokio::spawn(svc.clone().oneshot(get("a.test")));
    let a = tokio::time::timeout(Duration::from_secs(120), a)
        .await
        .expect("the first leaves when the pause ends")
        .unwrap();
    assert!(a.is_ok());
    let b = tokio::time::timeout(Duration::from_secs(120), b)
        .await
        .expect("the second is told within max_wait")
        .unwrap();
    assert!(b.is_err(), "its turn is centuries away");
}

#[tokio::test(start_paused = true)]
async fn direct_limiter_with_duration_max_waits() {
    let l = DirectLimiter::new(Quota::per_second(1).unwrap());
    l.check().unwrap();
    assert_eq!(l.reserve(Duration::MAX).unwrap(), Duration::from_secs(1));
    let start = Instant::now();
    l.until_ready(Duration::MAX).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(2));
}

#[tokio::test(start_paused = true)]
async fn a_limiter_idle_for_three_centuries_still_decides() {
    let l = DirectLimiter::new(Quota::per_second(1).unwrap());
    l.check().unwrap();
    tokio::time::advance(Duration::from_secs(300 * 365 * 86_400)).await;
    l.check().unwrap();
    assert!(l.check().is_err(), "one per second still");
    let svc = RateLimitLayer::new(Quota::per_second(1).unwrap())
        .with_max_wait(Duration::ZERO)
        .layer(api(0));
    svc.clone().oneshot(get("a.test")).await.unwrap();
    tokio::time::advance(Duration::from_secs(300 * 365 * 86_400)).await;
    svc.clone().oneshot(get("a.test")).await.unwrap();
    assert!(svc.clone().oneshot(get("a.test")).await.is_err());
}

#[tokio::test(start_paused = true)]
async fn retry_after_two_to_the_32_is_capped() {
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    layer
        .layer(service_fn(|_r: Request<()>| async {
            Ok::<_, BoxError>(
                Response::builder()
                    .status(429)
                    .header("retry-after", "4294967296")
                    .body(())
                    .unwrap(),
            )
        }))
        .oneshot(get("a.test"))
        .await
        .unwrap();
    assert_eq!(handle.pause("a.test"), Some(Duration::from_secs(300)));
}

#[tokio::test(start_paused = true)]
async fn retry_after_zero_does_not_pause_for_the_default() {
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    layer
        .layer(service_fn(|_r: Request<()>| async {
            Ok::<_, BoxError>(
                Response::builder()
                    .status(429)
                    .header("retry-after", "0")
                    .body(())
                    .unwrap(),
            )
        }))
        .oneshot(get("a.test"))
        .await
        .unwrap();
    assert!(
        handle.pause("a.test").is_none_or(|p| p.is_zero()),
        "the server said now: {:?}",
        handle.pause("a.test")
    );
}
