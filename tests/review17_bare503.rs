//! `RateLimitLayer::with_bare_503_pauses`, read literally: off by default ("an outage's bare
//! 503s keep failing fast through the breaker", "the retry layer retry on its own backoff"); on,
//! a bare 503 "pauses the key and teaches it a pace as a bare 429 does".
#![cfg(feature = "full")]

use crate::outsider_common;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::StatusCode;
use outsider_common::*;
use sturdy::core::events::Event;
use sturdy::core::headers::PauseSource;
use sturdy::ratelimit::{RateLimitHandle, RateLimitLayer};
use sturdy::retry::{Backoff, RetryLayer};
use tokio::time::{timeout, Instant};
use tower::{ServiceBuilder, ServiceExt};

const H: &str = "api.example.com";
const U: &str = "http://api.example.com/things";
const LIMIT: Duration = Duration::from_secs(60);

type Paused = Arc<Mutex<Vec<(StatusCode, Option<PauseSource>, Duration)>>>;

fn limiter(layer: RateLimitLayer) -> (RateLimitLayer, RateLimitHandle, Paused) {
    let paused: Paused = Arc::default();
    let p = paused.clone();
    let (layer, handle) = layer
        .on_event(move |e| {
            if let Event::RateLimitPaused {
                status,
                source,
                pause,
                ..
            } = e
            {
                p.lock().unwrap().push((*status, *source, *pause));
            }
        })
        .pair();
    (layer, handle, paused)
}

/// Off (the default): a bare 503 neither pauses nor teaches a pace, and no pause is reported.
#[tokio::test(start_paused = true)]
async fn off_by_default_a_bare_503_changes_nothing() {
    let (layer, handle, paused) = limiter(RateLimitLayer::adaptive_only());
    let api = Api::new(vec![status(503), status(503)], ok());
    let svc = ServiceBuilder::new().layer(layer).service(api.service());
    for _ in 0..2 {
        let res = svc.clone().oneshot(get(U)).await.unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
    assert_eq!(handle.pause(H), None);
    assert_eq!(handle.learned_pace(H), None);
    assert!(paused.lock().unwrap().is_empty());
    let start = Instant::now();
    let res = svc.oneshot(get(U)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(start.elapsed(), Duration::ZERO);
}

/// Off: "A 503 with `Retry-After` pauses either way."
#[tokio::test(start_paused = true)]
async fn off_a_503_with_retry_after_still_pauses() {
    let (layer, handle, paused) = limiter(RateLimitLayer::adaptive_only());
    let api = Api::new(vec![status_h(503, &[("retry-after", "4")])], ok());
    let svc = ServiceBuilder::new().layer(layer).service(api.service());
    let _ = svc.clone().oneshot(get(U)).await.unwrap();
    assert_eq!(handle.pause(H), Some(Duration::from_secs(4)));
    assert_eq!(handle.learned_pace(H), None);
    assert_eq!(
        paused.lock().unwrap().clone(),
        vec![(
            StatusCode::SERVICE_UNAVAILABLE,
            Some(PauseSource::RetryAfter),
            Duration::from_secs(4)
        )]
    );
}

/// Off, through the default client: the retry of a bare 503 goes on the retry layer's own
/// backoff (250 ms here), not after a pause.
#[tokio::test(start_paused = true)]
async fn off_the_default_client_retries_a_bare_503_on_its_backoff() {
    let api = Api::new(vec![status(503)], ok());
    let client = sturdy::ClientBuilder::new()
        .with_retry(RetryLayer::new().with_backoff(
            Backoff::exponential(Duration::from_millis(250), Duration::from_millis(250)).unwrap(),
        ))
        .build(api.service());
    let start = Instant::now();
    let res = timeout(LIMIT, client.oneshot(get(U)))
        .await
        .expect("no hang")
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(
        start.elapsed() < Duration::from_millis(400),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(api.calls(), 2);
}

/// On, with a default pause of 2 s: "as a bare 429 does", so the pause is the default pause and
/// the pace one eighth of it.
#[tokio::test(start_paused = true)]
async fn on_a_bare_503_follows_the_default_pause() {
    let (layer, handle, paused) = limiter(
        RateLimitLayer::adaptive_only()
            .with_bare_503_pauses(true)
            .with_default_pause(Duration::from_secs(2)),
    );
    let api = Api::new(vec![status(503)], ok());
    let svc = ServiceBuilder::new().layer(layer).service(api.service());
    let _ = svc.clone().oneshot(get(U)).await.unwrap();
    assert_eq!(handle.pause(H), Some(Duration::from_secs(2)));
    assert_eq!(handle.learned_pace(H), Some(Duration::from_millis(250)));
    assert_eq!(
        paused.lock().unwrap().clone(),
        vec![(
            StatusCode::SERVICE_UNAVAILABLE,
            None,
            Duration::from_secs(2)
        )]
    );
}

/// On: bare 503s at the pace halve it "down to one call per pause (one per second by
/// default)", each pausing one interval of the new pace.
#[tokio::test(start_paused = true)]
async fn on_halving_stops_at_one_call_per_pause() {
    let (layer, handle, paused) =
        limiter(RateLimitLayer::adaptive_only().with_bare_503_pauses(true));
    let api = Api::new(vec![], status(503));
    let svc = ServiceBuilder::new().layer(layer).service(api.service());
    let mut paces = Vec::new();
    for _ in 0..6 {
        let res = timeout(LIMIT, svc.clone().oneshot(get(U)))
            .await
            .expect("no hang")
            .unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        paces.push(handle.learned_pace(H).unwrap());
    }
    let ms = |n| Duration::from_millis(n);
    assert_eq!(
        paces,
        vec![ms(125), ms(250), ms(500), ms(1000), ms(1000), ms(1000)]
    );
    let pauses: Vec<_> = paused.lock().unwrap().iter().map(|p| p.2).collect();
    assert_eq!(
        &pauses[..4],
        &[ms(1000), ms(250), ms(500), ms(1000)],
        "{pauses:?}"
    );
}

/// On, with a quota of one's own: the bare 503 pauses, but teaches no pace (only "without a
/// quota" does a key learn one).
#[tokio::test(start_paused = true)]
async fn on_with_a_quota_a_bare_503_pauses_without_a_pace() {
    let (layer, handle, _paused) = limiter(
        RateLimitLayer::new(sturdy::ratelimit::Quota::new(100, Duration::from_secs(1)).unwrap())
            .with_bare_503_pauses(true),
    );
    let api = Api::new(vec![status(503)], ok());
    let svc = ServiceBuilder::new().layer(layer).service(api.service());
    let _ = svc.clone().oneshot(get(U)).await.unwrap();
    assert_eq!(handle.pause(H), Some(Duration::from_secs(1)));
    assert_eq!(handle.learned_pace(H), None);
}

/// Off, with a pace learned from a bare 429: the guide says "every other answer (not 429 or 503)
/// makes the pace a sixteenth faster", so a bare 503 leaves the pace as it is, and a 200 speeds
/// it up.
#[tokio::test(start_paused = true)]
async fn off_a_bare_503_neither_slows_nor_speeds_a_learned_pace() {
    let (layer, handle, _paused) = limiter(RateLimitLayer::adaptive_only());
    let api = Api::new(vec![status(429), status(503)], ok());
    let svc = ServiceBuilder::new().layer(layer).service(api.service());
    let _ = svc.clone().oneshot(get(U)).await.unwrap();
    assert_eq!(handle.learned_pace(H), Some(Duration::from_millis(125)));
    let res = svc.clone().oneshot(get(U)).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(handle.learned_pace(H), Some(Duration::from_millis(125)));
    assert_eq!(handle.pause(H), None);
    let res = svc.clone().oneshot(get(U)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(handle.learned_pace(H).unwrap() < Duration::from_millis(125));
}

/// A limiter like nginx's `limit_req rate=10r/s` without burst and with its default status: a
/// request less than 100 ms after the last one admitted gets a bare 503. The rate-limit guide:
/// "With nginx's default status, 503, and `.with_bare_503_pauses(true)`: the same, 20 GETs at
/// once all succeed in about 4 s". Here with a 5 ms round trip.
#[tokio::test(start_paused = true)]
async fn twenty_gets_at_once_against_a_bare_503_limiter_all_succeed() {
    let last: Arc<Mutex<Option<Instant>>> = Arc::default();
    let refused = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (l, r) = (last.clone(), refused.clone());
    let api = tower::service_fn(
        move |_req: http::Request<http_body_util::Full<bytes::Bytes>>| {
            let (l, r) = (l.clone(), r.clone());
            async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                let now = Instant::now();
                let mut last = l.lock().unwrap();
                let admit = last.is_none_or(|t| now - t >= Duration::from_millis(100));
                let status = if admit {
                    *last = Some(now);
                    StatusCode::OK
                } else {
                    r.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    StatusCode::SERVICE_UNAVAILABLE
                };
                Ok::<_, sturdy::core::BoxError>(
                    http::Response::builder()
                        .status(status)
                        .body(http_body_util::Full::<bytes::Bytes>::from("x"))
                        .unwrap(),
                )
            }
        },
    );
    let client = sturdy::ClientBuilder::new()
        .with_rate_limit(RateLimitLayer::adaptive_only().with_bare_503_pauses(true))
        .build(api);
    let start = Instant::now();
    let calls: Vec<_> = (0..20)
        .map(|_| tokio::spawn(client.clone().oneshot(get(U))))
        .collect();
    let mut failed = Vec::new();
    for c in calls {
        match timeout(LIMIT, c).await.expect("no hang").unwrap() {
            Ok(res) if res.status() == StatusCode::OK => {}
            Ok(res) => failed.push(res.status().to_string()),
            Err(e) => failed.push(e.to_string()),
        }
    }
    assert!(
        failed.is_empty(),
        "{} of 20 gave up ({} refusals, {:?}): {failed:?}",
        failed.len(),
        refused.load(std::sync::atomic::Ordering::SeqCst),
        start.elapsed()
    );
}
