//! Outside tests of the hedging layer against docs/guides/hedge.md and the crate docs.
use crate::outsider_common;
use std::time::Duration;

use outsider_common::*;
use sturdy::circuit::{CircuitBreakerLayer, CircuitState};
use sturdy::hedge::HedgeLayer;
use sturdy::retry::RetryLayer;
use tokio::time::Instant;
use tower::{Layer, ServiceBuilder, ServiceExt};

const U: &str = "http://api.example.com/x";
const H: &str = "api.example.com";

async fn warm(
    api: &Api,
    svc: &(impl tower::Service<
        http::Request<http_body_util::Full<bytes::Bytes>>,
        Response = http::Response<http_body_util::Full<bytes::Bytes>>,
        Error = impl std::fmt::Debug,
    > + Clone),
    n: usize,
) {
    api.set_fallback(Answer::Slow(Duration::from_millis(10)));
    for _ in 0..n {
        svc.clone().oneshot(get(U)).await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn a_slow_get_is_hedged_and_a_post_never() {
    let api = Api::new(vec![], ok());
    let (layer, handle) = HedgeLayer::new().with_min_samples(20).pair();
    let svc = layer.layer(api.service());
    warm(&api, &svc, 30).await;
    api.push(Answer::Slow(Duration::from_secs(5)));
    let start = Instant::now();
    svc.clone().oneshot(get(U)).await.unwrap();
    assert!(
        start.elapsed() < Duration::from_millis(50),
        "{:?}",
        start.elapsed()
    );
    let s = handle.stats(H).unwrap();
    assert_eq!((s.hedges(), s.hedge_wins()), (1, 1));
    let before = api.calls();
    api.push(Answer::Slow(Duration::from_secs(5)));
    let start = Instant::now();
    svc.clone().oneshot(post(U, "{}")).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(5));
    assert_eq!(api.calls(), before + 1);
    // A POST with a key, keyed requests off (default): not hedged.
    api.push(Answer::Slow(Duration::from_secs(5)));
    let mut req = post(U, "{}");
    req.headers_mut()
        .insert("idempotency-key", "k1".parse().unwrap());
    let start = Instant::now();
    svc.clone().oneshot(req).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(5));
}

#[tokio::test(start_paused = true)]
async fn one_copy_fails_the_other_wins_and_both_fail() {
    let api = Api::new(vec![], ok());
    let (layer, _handle) = HedgeLayer::new().with_min_samples(20).pair();
    let svc = layer.layer(api.service());
    warm(&api, &svc, 30).await;
    // First copy slow then error; the hedge answers: the call succeeds.
    api.push(after(
        Duration::from_millis(50),
        Answer::Io(std::io::ErrorKind::ConnectionReset),
    ));
    api.push(Answer::Slow(Duration::from_millis(100)));
    let r = svc.clone().oneshot(get(U)).await;
    assert!(r.is_ok(), "{:?}", r.err());
    // Both fail: the last error.
    api.push(after(
        Duration::from_millis(50),
        Answer::Io(std::io::ErrorKind::ConnectionReset),
    ));
    api.push(after(
        Duration::from_millis(80),
        Answer::Io(std::io::ErrorKind::ConnectionAborted),
    ));
    let e = svc.clone().oneshot(get(U)).await.unwrap_err();
    eprintln!("both failed: {e:?}");
    // First copy fails before the hedge is due: the call fails at once.
    api.push(Answer::Io(std::io::ErrorKind::ConnectionReset));
    let before = api.calls();
    assert!(svc.clone().oneshot(get(U)).await.is_err());
    assert_eq!(api.calls(), before + 1);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_call_drops_both_copies() {
    let api = Api::new(vec![], ok());
    let (layer, _h) = HedgeLayer::new().with_min_samples(20).pair();
    let svc = layer.layer(
        ServiceBuilder::new()
            .concurrency_limit(2)
            .service(api.service()),
    );
    warm(&api, &svc, 30).await;
    api.push(Answer::Hang);
    api.push(Answer::Hang);
    let r = tokio::time::timeout(Duration::from_millis(500), svc.clone().oneshot(get(U))).await;
    assert!(r.is_err());
    // Both permits must be back: two calls can run at once.
    api.set_fallback(Answer::Slow(Duration::from_millis(100)));
    let start = Instant::now();
    let a = tokio::spawn(svc.clone().oneshot(get(U)));
    let b = tokio::spawn(svc.clone().oneshot(get(U)));
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
    assert!(
        start.elapsed() < Duration::from_millis(150),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn the_budget_bounds_hedges() {
    let api = Api::new(vec![], ok());
    let (layer, handle) = HedgeLayer::new().with_min_samples(20).pair();
    let svc = layer.layer(api.service());
    warm(&api, &svc, 30).await;
    // Every call now slow: at most burst 10 + 5 % of calls hedged.
    api.set_fallback(Answer::Slow(Duration::from_millis(200)));
    for _ in 0..200 {
        svc.clone().oneshot(get(U)).await.unwrap();
    }
    let s = handle.stats(H).unwrap();
    eprintln!("calls {} hedges {}", s.calls(), s.hedges());
    assert!(
        s.hedges() as f64 <= 10.0 + 0.05 * s.calls() as f64 + 1.0,
        "{} hedges",
        s.hedges()
    );
}

#[tokio::test(start_paused = true)]
async fn a_hedged_loser_is_not_a_breaker_failure_and_a_half_open_probe_is_not_doubled() {
    let api = Api::new(vec![], ok());
    let (hedge, _h) = HedgeLayer::new().with_min_samples(20).pair();
    let (breaker, bh) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .pair();
    let svc = ServiceBuilder::new()
        .layer(RetryLayer::new().with_seed(1))
        .layer(hedge)
        .layer(breaker)
        .service(api.service());
    warm(&api, &svc, 30).await;
    api.push(Answer::Slow(Duration::from_secs(5)));
    svc.clone().oneshot(get(U)).await.unwrap();
    assert_eq!(bh.state(H), Some(CircuitState::Closed));
    // Open it, then a slow probe: the hedge copy must not become a second probe.
    api.push(status(502));
    let mut req = get(U);
    req.extensions_mut()
        .insert(sturdy::core::CallOptions::new().without_retries());
    svc.clone().oneshot(req).await.unwrap();
    assert!(matches!(bh.state(H), Some(CircuitState::Open { .. })));
    tokio::time::advance(Duration::from_secs(30)).await;
    let before = api.calls();
    api.push(Answer::Slow(Duration::from_secs(1)));
    let mut req = get(U);
    req.extensions_mut()
        .insert(sturdy::core::CallOptions::new().without_retries());
    let r = svc.clone().oneshot(req).await;
    assert!(r.is_ok(), "{:?}", r.err().map(|e| e.to_string()));
    assert_eq!(
        api.calls(),
        before + 1,
        "a hedge went through a half-open breaker's single probe slot"
    );
    assert_eq!(bh.state(H), Some(CircuitState::Closed));
}

#[tokio::test(start_paused = true)]
async fn config_validation() {
    assert!(HedgeLayer::new().with_percentile(0.0).is_err());
    assert!(HedgeLayer::new().with_percentile(1.0).is_err());
    assert!(HedgeLayer::new().with_percentile(f64::NAN).is_err());
    assert!(HedgeLayer::new().with_budget(1.5, 1).is_err());
    assert!(HedgeLayer::new().with_budget(f64::NAN, 1).is_err());
    assert!(HedgeLayer::new().with_budget(-0.1, 1).is_err());
    // Extreme but accepted settings must not panic on a call.
    let api = Api::new(vec![], Answer::Slow(Duration::from_millis(5)));
    for layer in [
        HedgeLayer::new().with_min_samples(0),
        HedgeLayer::new()
            .with_min_samples(1)
            .with_window(Duration::ZERO),
        HedgeLayer::new()
            .with_min_samples(1)
            .with_window(Duration::MAX),
        HedgeLayer::new()
            .with_min_samples(1)
            .with_delay_bounds(Duration::MAX, Duration::ZERO),
        HedgeLayer::new()
            .with_min_samples(1)
            .with_delay_bounds(Duration::ZERO, Duration::ZERO),
        HedgeLayer::new().with_min_samples(1).with_max_hosts(0),
        HedgeLayer::new()
            .with_min_samples(1)
            .with_budget(1.0, u32::MAX)
            .unwrap(),
    ] {
        let svc = layer.layer(api.service());
        let r = tokio::spawn(async move {
            for i in 0..30 {
                let _ = svc
                    .clone()
                    .oneshot(get(&format!("http://h{}.example.com/", i % 3)))
                    .await;
            }
        })
        .await;
        assert!(r.is_ok(), "a call panicked");
    }
}
