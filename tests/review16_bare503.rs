//! A bare 503 (no header saying how long) is read as a bare 429: the default pause, and without a
//! quota a learned pace (rate-limit guide, "A pace learned from bare 429s and 503s").
#![cfg(feature = "full")]

use crate::outsider_common;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::StatusCode;
use outsider_common::*;
use sturdy::core::events::Event;
use sturdy::ratelimit::{PauseSource, RateLimitLayer};
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};

const H: &str = "api.example.com";
const U: &str = "http://api.example.com/things";

type Paused = Arc<Mutex<Vec<(StatusCode, Option<PauseSource>, Duration)>>>;

fn limiter() -> (RateLimitLayer, sturdy::ratelimit::RateLimitHandle, Paused) {
    let paused: Paused = Arc::default();
    let p = paused.clone();
    let (layer, handle) = RateLimitLayer::adaptive_only()
        .with_bare_503_pauses(true)
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

#[tokio::test(start_paused = true)]
async fn a_bare_503_pauses_one_second_and_teaches_an_eighth() {
    let (layer, handle, paused) = limiter();
    let api = Api::new(vec![status(503)], ok());
    let svc = ServiceBuilder::new().layer(layer).service(api.service());
    let res = svc.clone().oneshot(get(U)).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(handle.pause(H), Some(Duration::from_secs(1)));
    assert_eq!(handle.learned_pace(H), Some(Duration::from_millis(125)));
    assert_eq!(
        paused.lock().unwrap().clone(),
        vec![(
            StatusCode::SERVICE_UNAVAILABLE,
            None,
            Duration::from_secs(1)
        )]
    );
    // The next call waits for the pause.
    let start = Instant::now();
    let res = svc.oneshot(get(U)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(start.elapsed(), Duration::from_secs(1));
}

/// Bare 503s that answer calls in flight when the pause began change nothing (neither the pace
/// nor the pause's end).
#[tokio::test(start_paused = true)]
async fn bare_503s_to_calls_in_flight_change_nothing() {
    let (layer, handle, paused) = limiter();
    let api = Api::new(
        vec![
            after(Duration::from_millis(50), status(503)),
            after(Duration::from_millis(60), status(503)),
            after(Duration::from_millis(70), status(503)),
        ],
        ok(),
    );
    let svc = ServiceBuilder::new().layer(layer).service(api.service());
    let calls: Vec<_> = (0..3)
        .map(|_| tokio::spawn(svc.clone().oneshot(get(U))))
        .collect();
    for c in calls {
        assert_eq!(
            c.await.unwrap().unwrap().status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
    assert_eq!(handle.learned_pace(H), Some(Duration::from_millis(125)));
    // Paused at 50 ms for 1 s: 980 ms left at 70 ms.
    assert_eq!(handle.pause(H), Some(Duration::from_millis(980)));
    assert_eq!(paused.lock().unwrap().len(), 1);
}

/// A bare 503 to a call sent at the learned pace halves the rate and pauses one interval of the
/// new pace; a 200 then makes it a sixteenth faster.
#[tokio::test(start_paused = true)]
async fn a_bare_503_at_the_pace_halves_it_and_a_success_speeds_it_up() {
    let (layer, handle, paused) = limiter();
    let api = Api::new(vec![status(503), status(503)], ok());
    let svc = ServiceBuilder::new().layer(layer).service(api.service());
    let _ = svc.clone().oneshot(get(U)).await.unwrap();
    assert_eq!(handle.learned_pace(H), Some(Duration::from_millis(125)));
    // Sent when the pause ends, at the pace; answered with a bare 503.
    let res = svc.clone().oneshot(get(U)).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(handle.learned_pace(H), Some(Duration::from_millis(250)));
    assert_eq!(handle.pause(H), Some(Duration::from_millis(250)));
    let seen = paused.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[1].2, Duration::from_millis(250));
    let res = svc.clone().oneshot(get(U)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let pace = handle.learned_pace(H).unwrap();
    assert!(pace < Duration::from_millis(250), "{pace:?}");
}

/// A 503 that says how long (`Retry-After`) sets a pause, not a pace.
#[tokio::test(start_paused = true)]
async fn a_503_with_retry_after_sets_a_pause_not_a_pace() {
    let (layer, handle, paused) = limiter();
    let api = Api::new(vec![status_h(503, &[("retry-after", "3")])], ok());
    let svc = ServiceBuilder::new().layer(layer).service(api.service());
    let _ = svc.clone().oneshot(get(U)).await.unwrap();
    assert_eq!(handle.pause(H), Some(Duration::from_secs(3)));
    assert_eq!(handle.learned_pace(H), None);
    assert_eq!(paused.lock().unwrap()[0].1, Some(PauseSource::RetryAfter));
}

/// A bare 500 or 502 is not a refusal: no pause.
#[tokio::test(start_paused = true)]
async fn other_bare_5xx_do_not_pause() {
    let (layer, handle, paused) = limiter();
    let api = Api::new(vec![status(500), status(502), status(504)], ok());
    let svc = ServiceBuilder::new().layer(layer).service(api.service());
    for _ in 0..3 {
        let _ = svc.clone().oneshot(get(U)).await.unwrap();
    }
    assert_eq!(handle.pause(H), None);
    assert_eq!(handle.learned_pace(H), None);
    assert!(paused.lock().unwrap().is_empty());
}

/// Through the default client: a bare 503 is retried after the pause (the retry waits in it),
/// and the breaker still counts the 503.
#[tokio::test(start_paused = true)]
async fn the_default_client_retries_a_bare_503_after_the_pause() {
    let api = Api::new(vec![status(503)], ok());
    let client = sturdy::ClientBuilder::new()
        .without_hedge()
        .with_rate_limit(RateLimitLayer::adaptive_only().with_bare_503_pauses(true))
        .with_retry(
            sturdy::retry::RetryLayer::new().with_backoff(
                sturdy::retry::Backoff::exponential(
                    Duration::from_millis(250),
                    Duration::from_millis(250),
                )
                .unwrap(),
            ),
        )
        .build(api.service());
    let start = Instant::now();
    let res = client.oneshot(get(U)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(api.calls(), 2);
    let seen = api.seen();
    let gap = seen[1].at - seen[0].at;
    assert!(
        gap >= Duration::from_secs(1),
        "the retry left in the pause: {gap:?}"
    );
    assert!(
        start.elapsed() < Duration::from_millis(1_500),
        "{:?}",
        start.elapsed()
    );
}
