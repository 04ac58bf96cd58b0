//! Limiter behaviour with paused time on in-process services.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http::{Request, Response, StatusCode};
use sturdy_core::clock::ManualClock;
use sturdy_core::{BoxError, RateLimited};
use sturdy_ratelimit::{Quota, RateLimitLayer};
use tokio::time::Instant;
use tower::{service_fn, Layer, ServiceExt};

use crate::support;
use support::{get, status_with, Api};

#[tokio::test(start_paused = true)]
async fn ten_per_second_burst_five_admits_exactly_the_quota_over_ten_seconds() {
    let api = Api::default();
    let quota = Quota::per_second(10).unwrap().with_burst(5).unwrap();
    let svc = RateLimitLayer::new(quota).layer(api.service());
    let start = Instant::now();
    let end = start + Duration::from_secs(10);
    let callers: Vec<_> = (0..50)
        .map(|_| {
            let svc = svc.clone();
            tokio::spawn(async move {
                while Instant::now() <= end {
                    let _ = svc.clone().oneshot(get("a")).await;
                }
            })
        })
        .collect();
    for c in callers {
        c.await.unwrap();
    }
    let times: Vec<Duration> = api.times().iter().map(|t| *t - start).collect();
    let within = times
        .iter()
        .filter(|t| **t <= Duration::from_secs(10))
        .count();
    // 5 at once, then one every 100 ms: t = 0.1 s .. 10.0 s.
    assert_eq!(within, 5 + 100);
    assert!(times[..5].iter().all(|t| t.is_zero()));
    let mut sorted = times;
    sorted.sort();
    for w in sorted[4..].windows(2) {
        assert_eq!(w[1] - w[0], Duration::from_millis(100), "spacing");
    }
}

#[tokio::test(start_paused = true)]
async fn a_call_that_would_wait_too_long_fails_at_once() {
    let api = Api::default();
    let svc = RateLimitLayer::new(Quota::per_second(1).unwrap())
        .with_max_wait(Duration::from_secs(2))
        .layer(api.service());
    let calls: Vec<_> = (0..4)
        .map(|_| tokio::spawn(svc.clone().oneshot(get("a"))))
        .collect();
    let mut results = Vec::new();
    for c in calls {
        results.push(c.await.unwrap());
    }
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 3);
    let err = results.into_iter().find_map(Result::err).unwrap();
    let rl = err.downcast_ref::<RateLimited>().unwrap();
    assert_eq!(rl.retry_after(), Duration::from_secs(3));
    assert_eq!(rl.scope(), Some("a"));
    assert_eq!(api.times().len(), 3);
}

#[tokio::test(start_paused = true)]
async fn one_429_with_retry_after_pauses_all_50_callers() {
    let api = Api::with(vec![status_with(429, &[("retry-after", "5")])]);
    let quota = Quota::per_second(100).unwrap();
    let svc = RateLimitLayer::new(quota).layer(api.service());
    let start = Instant::now();
    let calls: Vec<_> = (0..50)
        .map(|_| tokio::spawn(svc.clone().oneshot(get("a"))))
        .collect();
    let mut statuses = Vec::new();
    for c in calls {
        statuses.push(c.await.unwrap().unwrap().status());
    }
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
            .count(),
        1
    );
    let times = api.times();
    assert_eq!(times.len(), 50);
    assert_eq!(times[0], start);
    // No further call before the pause ends.
    assert!(
        times[1..]
            .iter()
            .all(|t| *t - start >= Duration::from_secs(5)),
        "{:?}",
        times.iter().map(|t| *t - start).collect::<Vec<_>>()
    );
}

#[tokio::test(start_paused = true)]
async fn ratelimit_and_x_ratelimit_headers_pause_until_reset() {
    // RateLimit (draft) on a 200: nothing left for 3 s.
    let api = Api::with(vec![status_with(
        200,
        &[("ratelimit", "\"default\";r=0;t=3")],
    )]);
    let svc = RateLimitLayer::adaptive_only().layer(api.service());
    let start = Instant::now();
    svc.clone().oneshot(get("a")).await.unwrap();
    svc.clone().oneshot(get("a")).await.unwrap();
    assert_eq!(api.times()[1] - start, Duration::from_secs(3));

    // X-RateLimit with an epoch reset, read against the wall clock.
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let api = Api::with(vec![status_with(
        403,
        &[
            ("x-ratelimit-remaining", "0"),
            ("x-ratelimit-reset", "1700000007"),
        ],
    )]);
    let svc = RateLimitLayer::adaptive_only()
        .with_clock(Arc::new(ManualClock::at(now)))
        .layer(api.service());
    let start = Instant::now();
    svc.clone().oneshot(get("a")).await.unwrap();
    svc.clone().oneshot(get("a")).await.unwrap();
    assert_eq!(api.times()[1] - start, Duration::from_secs(7));

    // Remaining above zero is no pause.
    let api = Api::with(vec![status_with(
        200,
        &[("x-ratelimit-remaining", "4"), ("x-ratelimit-reset", "60")],
    )]);
    let svc = RateLimitLayer::adaptive_only().layer(api.service());
    let start = Instant::now();
    svc.clone().oneshot(get("a")).await.unwrap();
    svc.clone().oneshot(get("a")).await.unwrap();
    assert_eq!(api.times()[1], start);
}

#[tokio::test(start_paused = true)]
async fn a_later_shorter_reset_does_not_cut_a_longer_pause() {
    // Two calls in flight at once; the first answer pauses 10 s, the second (slower) answer 2 s.
    let n = Arc::new(AtomicU32::new(0));
    let log = Arc::new(Mutex::new(Vec::new()));
    let (n2, log2) = (n.clone(), log.clone());
    let api = service_fn(move |_req: Request<()>| {
        let i = n2.fetch_add(1, Ordering::SeqCst);
        let log = log2.clone();
        async move {
            log.lock().unwrap().push(Instant::now());
            match i {
                0 => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    Ok::<_, BoxError>(status_with(429, &[("retry-after", "10")]))
                }
                1 => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok(status_with(429, &[("retry-after", "2")]))
                }
                _ => Ok(Response::new(())),
            }
        }
    });
    let svc = RateLimitLayer::adaptive_only().layer(api);
    let start = Instant::now();
    let (a, b) = tokio::join!(svc.clone().oneshot(get("a")), svc.clone().oneshot(get("a")));
    assert_eq!(
        (a.unwrap().status(), b.unwrap().status()),
        (StatusCode::TOO_MANY_REQUESTS, StatusCode::TOO_MANY_REQUESTS)
    );
    svc.clone().oneshot(get("a")).await.unwrap();
    let log = log.lock().unwrap();
    assert_eq!(log[1], start, "both calls were in flight together");
    assert_eq!(log[2] - start, Duration::from_millis(10_010));
}

#[tokio::test(start_paused = true)]
async fn a_pause_longer_than_max_wait_fails_fast_with_the_remaining_time() {
    let api = Api::with(vec![status_with(503, &[("retry-after", "120")])]);
    let svc = RateLimitLayer::adaptive_only().layer(api.service());
    svc.clone().oneshot(get("a")).await.unwrap();
    tokio::time::advance(Duration::from_secs(20)).await;
    let err = svc.clone().oneshot(get("a")).await.unwrap_err();
    assert_eq!(
        err.downcast_ref::<RateLimited>().unwrap().retry_after(),
        Duration::from_secs(100)
    );
    assert_eq!(api.times().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_bare_429_pauses_briefly() {
    let api = Api::with(vec![status_with(429, &[])]);
    let svc = RateLimitLayer::adaptive_only()
        .with_default_pause(Duration::from_millis(1_500))
        .layer(api.service());
    let start = Instant::now();
    svc.clone().oneshot(get("a")).await.unwrap();
    svc.clone().oneshot(get("a")).await.unwrap();
    assert_eq!(api.times()[1] - start, Duration::from_millis(1_500));
}

#[tokio::test(start_paused = true)]
async fn keys_are_per_host_or_per_function() {
    let api = Api::with(vec![status_with(429, &[("retry-after", "30")])]);
    let svc = RateLimitLayer::adaptive_only().layer(api.service());
    let start = Instant::now();
    svc.clone().oneshot(get("a.example")).await.unwrap();
    svc.clone().oneshot(get("b.example")).await.unwrap();
    assert_eq!(api.times()[1], start, "host B is not paused by host A");

    // Per API token.
    let api = Api::default();
    let by_token = |r: &Request<()>| {
        r.headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let svc = RateLimitLayer::new(Quota::per_second(1).unwrap())
        .with_key(by_token)
        .layer(api.service());
    let with = |t: &str| {
        Request::get("http://a/")
            .header("authorization", t)
            .body(())
            .unwrap()
    };
    let start = Instant::now();
    svc.clone().oneshot(with("one")).await.unwrap();
    svc.clone().oneshot(with("two")).await.unwrap();
    svc.clone().oneshot(with("one")).await.unwrap();
    let t: Vec<_> = api.times().iter().map(|t| *t - start).collect();
    assert_eq!(t, [Duration::ZERO, Duration::ZERO, Duration::from_secs(1)]);
}

#[tokio::test(start_paused = true)]
async fn the_concurrency_cap_composes_from_tower() {
    let in_flight = Arc::new(AtomicU32::new(0));
    let max = Arc::new(AtomicU32::new(0));
    let (f, m) = (in_flight.clone(), max.clone());
    let slow = service_fn(move |_req: Request<()>| {
        let (f, m) = (f.clone(), m.clone());
        async move {
            m.fetch_max(f.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(100)).await;
            f.fetch_sub(1, Ordering::SeqCst);
            Ok::<_, BoxError>(Response::new(()))
        }
    });
    let client = tower::ServiceBuilder::new()
        .layer(RateLimitLayer::new(
            Quota::per_second(1_000).unwrap().with_burst(100).unwrap(),
        ))
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(3))
        .service(slow);
    let calls: Vec<_> = (0..30)
        .map(|_| tokio::spawn(client.clone().oneshot(get("a"))))
        .collect();
    for c in calls {
        c.await.unwrap().unwrap();
    }
    assert_eq!(max.load(Ordering::SeqCst), 3);
}

#[test]
fn traits() {
    fn assert_send_sync_clone<T: Send + Sync + Clone>() {}
    fn assert_send<T: Send>() {}
    type Mock = tower_test::mock::Mock<Request<()>, Response<()>>;
    assert_send_sync_clone::<RateLimitLayer>();
    assert_send_sync_clone::<sturdy_ratelimit::RateLimit<Mock, sturdy_ratelimit::ByHost>>();
    assert_send::<sturdy_ratelimit::ResponseFuture<Mock, (), ()>>();
}

#[tokio::test(start_paused = true)]
async fn waits_and_refusals_go_to_the_trace() {
    use sturdy_core::trace::DelaySource;
    use sturdy_core::{Trace, TraceEvent};
    let api = Api::with(vec![status_with(429, &[("retry-after", "120")])]);
    let svc = RateLimitLayer::new(Quota::per_second(1).unwrap()).layer(api.service());
    let traced = || {
        let t = Trace::new();
        let mut r = get("a");
        r.extensions_mut().insert(t.clone());
        (t, r)
    };
    let (_, r) = traced();
    svc.clone().oneshot(r).await.unwrap();
    let (t, r) = traced();
    let _ = svc.clone().oneshot(r).await;
    assert!(
        matches!(&t.events()[..], [TraceEvent::Rejected { reason }] if reason.contains("rate limited by a")),
        "{:?}",
        t.events()
    );

    let api = Api::default();
    let svc = RateLimitLayer::new(Quota::per_second(1).unwrap()).layer(api.service());
    svc.clone().oneshot(get("a")).await.unwrap();
    let (t, r) = traced();
    svc.clone().oneshot(r).await.unwrap();
    assert_eq!(
        t.events(),
        [TraceEvent::Delay {
            duration: Duration::from_secs(1),
            source: DelaySource::RateLimit
        }]
    );
}

/// A hook of the user's that panics when a call starts to wait must not leave a place in line
/// that no one holds: the calls after it would wait behind it forever (no timer, no deadline).
#[tokio::test(start_paused = true)]
async fn a_panicking_wait_hook_leaves_no_dead_place_in_line() {
    use std::sync::atomic::AtomicBool;
    let api = Api::default();
    let panic_once = Arc::new(AtomicBool::new(true));
    let armed = panic_once.clone();
    let svc = RateLimitLayer::new(Quota::per_second(1).unwrap())
        .on_event(move |e| {
            if matches!(e, sturdy_core::events::Event::RateLimitWaited { .. })
                && armed.swap(false, Ordering::SeqCst)
            {
                panic!("a hook's bug");
            }
        })
        .layer(api.service());
    // The first call takes the quota's slot; the second waits, and its hook panics.
    svc.clone().oneshot(get("a")).await.unwrap();
    let panicked = tokio::spawn(svc.clone().oneshot(get("a"))).await;
    assert!(panicked.unwrap_err().is_panic());
    // The next caller waits its one interval and goes: nothing holds the head of the line.
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), svc.clone().oneshot(get("a")))
        .await
        .expect("the line is not stuck")
        .unwrap();
    assert!(
        started.elapsed() <= Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(api.times().len(), 2);
}
