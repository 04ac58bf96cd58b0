//! Pauses learned from a peer are capped: one hostile header cannot lock a host out. Paused time.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::Response;
use sturdy_core::clock::ManualClock;
use sturdy_core::RateLimited;
use sturdy_ratelimit::{PauseCapped, PauseSource, Quota, RateLimitLayer, DEFAULT_MAX_PAUSE};
use tokio::time::Instant;
use tower::{Layer, ServiceExt};

use crate::support;
use support::{get, ms, status_with, Api};

const FIVE_MINUTES: Duration = Duration::from_secs(300);

/// The hostile answers, each with the header that asked for the pause.
fn hostile() -> Vec<(&'static str, Response<()>, PauseSource)> {
    vec![
        (
            "Retry-After: 99999999999999999999 on a 429",
            status_with(429, &[("retry-after", "99999999999999999999")]),
            PauseSource::RetryAfter,
        ),
        (
            "Retry-After in year 9999 on a 503",
            status_with(503, &[("retry-after", "Fri, 31 Dec 9999 23:59:59 GMT")]),
            PauseSource::RetryAfter,
        ),
        (
            "RateLimit r=0 t=99999999999 on a 200",
            status_with(200, &[("ratelimit", "\"default\";r=0;t=99999999999")]),
            PauseSource::RateLimit,
        ),
        (
            "X-RateLimit-Remaining: 0 + X-RateLimit-Reset: 99999999999 on a 200",
            status_with(
                200,
                &[
                    ("x-ratelimit-remaining", "0"),
                    ("x-ratelimit-reset", "99999999999"),
                ],
            ),
            PauseSource::XRateLimit,
        ),
    ]
}

fn clock() -> Arc<ManualClock> {
    // 2023-11-14T22:13:20Z
    Arc::new(ManualClock::at(
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
    ))
}

#[tokio::test(start_paused = true)]
async fn each_hostile_pause_is_capped_at_five_minutes() {
    assert_eq!(DEFAULT_MAX_PAUSE, FIVE_MINUTES);
    for (what, answer, source) in hostile() {
        let status = answer.status();
        let api = Api::with(vec![answer]);
        let (layer, handle) = RateLimitLayer::adaptive_only().with_clock(clock()).pair();
        let svc = layer.clone().layer(api.service());
        let patient = layer
            .with_max_wait(Duration::from_secs(3_600))
            .layer(api.service());
        let start = Instant::now();

        // The caller that got the hostile answer gets it as it is, and is told once.
        let res = svc.clone().oneshot(get("a")).await.unwrap();
        assert_eq!(res.status(), status, "{what}");
        let capped = res.extensions().get::<PauseCapped>().copied();
        let capped = capped.unwrap_or_else(|| panic!("{what}: no PauseCapped"));
        assert_eq!(capped.applied(), FIVE_MINUTES, "{what}");
        assert!(
            capped.asked() > Duration::from_secs(86_400 * 365 * 1_000),
            "{what}"
        );
        assert_eq!(capped.source(), source, "{what}");
        assert_eq!(handle.pause("a"), Some(FIVE_MINUTES), "{what}");

        // A caller that waits at most 30 s is told the capped wait, not centuries.
        let err = svc.clone().oneshot(get("a")).await.unwrap_err();
        let rl = err.downcast_ref::<RateLimited>().unwrap();
        assert_eq!(rl.retry_after(), FIVE_MINUTES, "{what}");
        assert_eq!(
            err.to_string(),
            "rate limited by a; retry after 5m",
            "{what}"
        );

        // A patient caller goes exactly when the cap ends; the answer is healthy and unmarked.
        let res = patient.oneshot(get("a")).await.unwrap();
        assert_eq!(start.elapsed(), FIVE_MINUTES, "{what}");
        assert!(res.extensions().get::<PauseCapped>().is_none(), "{what}");
        assert_eq!(handle.pause("a"), None, "{what}");
        assert_eq!(api.since(start), [Duration::ZERO, FIVE_MINUTES], "{what}");
    }
}

#[tokio::test(start_paused = true)]
async fn the_cap_is_configurable_and_zero_turns_pauses_off() {
    let (what, answer, _) = hostile().remove(0);
    let api = Api::with(vec![answer]);
    let (layer, handle) = RateLimitLayer::adaptive_only()
        .with_max_pause(Duration::from_secs(10))
        .pair();
    let svc = layer.layer(api.service());
    let start = Instant::now();
    let res = svc.clone().oneshot(get("a")).await.unwrap();
    assert_eq!(
        res.extensions().get::<PauseCapped>().unwrap().applied(),
        Duration::from_secs(10),
        "{what}"
    );
    assert_eq!(handle.pause("a"), Some(Duration::from_secs(10)));
    svc.oneshot(get("a")).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(10));

    // Zero: the answers are read, nothing is paused.
    let api = Api::with(vec![
        status_with(429, &[("retry-after", "30")]),
        status_with(429, &[]),
    ]);
    let (layer, handle) = RateLimitLayer::new(Quota::per_second(100).unwrap())
        .with_max_pause(Duration::ZERO)
        .pair();
    let svc = layer.layer(api.service());
    let start = Instant::now();
    for _ in 0..3 {
        svc.clone().oneshot(get("a")).await.unwrap();
    }
    assert_eq!(handle.pause("a"), None);
    assert_eq!(api.since(start), [ms(0), ms(10), ms(20)]);
}

#[tokio::test(start_paused = true)]
async fn a_pause_under_the_cap_is_kept_as_asked_and_unmarked() {
    let api = Api::with(vec![status_with(429, &[("retry-after", "299")])]);
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    let res = layer.layer(api.service()).oneshot(get("a")).await.unwrap();
    assert!(res.extensions().get::<PauseCapped>().is_none());
    assert_eq!(handle.pause("a"), Some(Duration::from_secs(299)));
}

#[tokio::test(start_paused = true)]
async fn clearing_a_pause_releases_the_waiting_calls() {
    let (_, answer, _) = hostile().remove(0);
    let api = Api::with(vec![answer]);
    let (layer, handle) = RateLimitLayer::adaptive_only()
        .with_max_wait(Duration::from_secs(600))
        .pair();
    let svc = layer.layer(api.service());
    let start = Instant::now();
    svc.clone().oneshot(get("a")).await.unwrap();
    let waiting: Vec<_> = (0..3)
        .map(|_| tokio::spawn(svc.clone().oneshot(get("a"))))
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(handle.waiting("a"), 3);
    assert_eq!(
        handle.paused(),
        [("a".to_owned(), Duration::from_secs(299))]
    );

    assert_eq!(handle.clear_pause("a"), Some(Duration::from_secs(299)));
    assert_eq!(handle.clear_pause("a"), None);
    assert_eq!(handle.pause("a"), None);
    assert!(handle.paused().is_empty());
    for w in waiting {
        w.await.unwrap().unwrap();
    }
    // Slow start: one at once (the in-process API answers at once), then the other two.
    let one = Duration::from_secs(1);
    assert_eq!(api.since(start), [Duration::ZERO, one, one, one]);
    // Unknown keys: nothing to read or clear.
    assert_eq!(handle.pause("nobody"), None);
    assert_eq!(handle.clear_pause("nobody"), None);
    assert_eq!(handle.waiting("nobody"), 0);
}
