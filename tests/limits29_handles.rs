//! What the handles of the rate limiter and the adaptive concurrency limit do to calls already
//! waiting, and the hedging layer's own idempotency header, as their docs describe.

#![cfg(feature = "full")]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use sturdy::concurrency::AdaptiveConcurrencyLayer;
use sturdy::hedge::HedgeLayer;
use sturdy::ratelimit::{Quota, RateLimitLayer};
use tokio::time::Instant;
use tower::{service_fn, Layer, ServiceExt};

fn get(host: &str) -> Request<()> {
    Request::get(format!("http://{host}/x")).body(()).unwrap()
}

#[tokio::test(start_paused = true)]
async fn raising_a_limit_by_hand_admits_the_calls_waiting() {
    let (layer, handle) = AdaptiveConcurrencyLayer::new().with_limits(1, 10).pair();
    let svc = layer.layer(service_fn(|_r: Request<()>| async {
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        Ok::<_, std::convert::Infallible>(Response::new(()))
    }));
    handle.set_limit("a.test", 1);
    let tasks: Vec<_> = (0..4)
        .map(|_| tokio::spawn(svc.clone().oneshot(get("a.test"))))
        .collect();
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    let s = handle.state("a.test").unwrap();
    assert_eq!((s.in_flight(), s.waiting()), (1, 3));
    let start = Instant::now();
    handle.set_limit("a.test", 4);
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(
        start.elapsed(),
        Duration::from_secs(1),
        "all four went at once"
    );
}

#[tokio::test(start_paused = true)]
async fn clearing_a_pause_releases_the_line_at_the_quota_pace() {
    let (layer, handle) = RateLimitLayer::new(Quota::per_second(10).unwrap()).pair();
    let paused = layer.clone().layer(service_fn(|_r: Request<()>| async {
        Ok::<_, std::convert::Infallible>(
            Response::builder()
                .status(429)
                .header("retry-after", "20")
                .body(())
                .unwrap(),
        )
    }));
    paused.oneshot(get("a.test")).await.unwrap();
    let times = Arc::new(Mutex::new(Vec::new()));
    let origin = Instant::now();
    let t2 = times.clone();
    let svc = layer.layer(service_fn(move |_r: Request<()>| {
        t2.lock().unwrap().push(origin.elapsed());
        async { Ok::<_, std::convert::Infallible>(Response::new(())) }
    }));
    let tasks: Vec<_> = (0..4)
        .map(|_| tokio::spawn(svc.clone().oneshot(get("a.test"))))
        .collect();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(handle.waiting("a.test"), 4);
    assert_eq!(handle.clear_pause("a.test"), Some(Duration::from_secs(15)));
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let ms: Vec<_> = times
        .lock()
        .unwrap()
        .iter()
        .map(|d| d.as_millis())
        .collect();
    assert_eq!(ms, [5_000, 5_100, 5_200, 5_300]);
}

#[tokio::test(start_paused = true)]
async fn hedge_looks_for_keys_in_the_header_it_is_given() {
    let count = Arc::new(Mutex::new(0usize));
    let c = count.clone();
    let svc = HedgeLayer::new()
        .with_min_samples(10)
        .with_keyed_requests(true)
        .with_idempotency_header(http::HeaderName::from_static("x-request-key"))
        .layer(service_fn(move |_r: Request<()>| {
            let i = {
                let mut n = c.lock().unwrap();
                *n += 1;
                *n - 1
            };
            async move {
                let ms = if i == 10 { 500 } else { 10 };
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok::<_, std::convert::Infallible>(Response::new(()))
            }
        }));
    for _ in 0..10 {
        svc.clone().oneshot(get("a.test")).await.unwrap();
    }
    let post = Request::post("http://a.test/x")
        .header("x-request-key", "k-1")
        .body(())
        .unwrap();
    svc.clone().oneshot(post).await.unwrap();
    assert_eq!(*count.lock().unwrap(), 12, "the keyed POST was hedged");
}
