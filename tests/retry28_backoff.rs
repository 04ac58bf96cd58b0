//! Backoff strategies, attempt limits and retry budgets as docs/guides/retry.md ("When", "How
//! much", "Per request") and the `sturdy-retry` rustdoc state them.
#![cfg(feature = "full")]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sturdy::core::{BoxError, CallOptions, ErrorKind};
use sturdy::retry::{Backoff, RetryLayer};
use tower::retry::budget::Budget;
use tower::{Layer, ServiceExt};

use crate::retry28_common::*;

const URL: &str = "http://api.example.com/orders";

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// splitmix64, seeded: uniformly random u64s for `Backoff::delay`.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[test]
fn decorrelated_jitter_averages_what_the_guide_says() {
    // "a client that keeps failing sleeps about 10.8 s on average (a third of its sleeps at the
    // 20 s cap)".
    let b = Backoff::decorrelated_jitter(ms(250), Duration::from_secs(20)).unwrap();
    let mut rng = Rng(2026);
    let (mut prev, mut sum, mut at_cap) = (None, 0.0, 0u32);
    let n = 400_000u32;
    for i in 1..=n {
        let d = b.delay(i, prev, rng.next());
        assert!(d >= ms(250) && d <= Duration::from_secs(20));
        if let Some(p) = prev {
            assert!(d <= (p * 3).max(ms(250)));
        }
        sum += d.as_secs_f64();
        at_cap += u32::from(d == Duration::from_secs(20));
        prev = Some(d);
    }
    let mean = sum / f64::from(n);
    let share = f64::from(at_cap) / f64::from(n);
    assert!((10.5..11.1).contains(&mean), "mean {mean}");
    assert!((0.30..0.36).contains(&share), "share at the cap {share}");
}

#[test]
fn backoff_delays_follow_their_formulas() {
    let e = Backoff::exponential(ms(100), Duration::from_secs(1)).unwrap();
    let got: Vec<_> = (1..=6).map(|r| e.delay(r, None, 12345)).collect();
    assert_eq!(
        got,
        [ms(100), ms(200), ms(400), ms(800), ms(1000), ms(1000)]
    );
    assert_eq!(e.delay(u32::MAX, None, 0), ms(1000));
    assert_eq!(e.base(), ms(100));

    let f = Backoff::full_jitter(ms(100), Duration::from_secs(1)).unwrap();
    assert_eq!(f.delay(3, None, 0), Duration::ZERO);
    assert_eq!(f.delay(3, None, u64::MAX), ms(400));
    assert_eq!(f.delay(u32::MAX, None, u64::MAX), ms(1000));

    let d = Backoff::decorrelated_jitter(ms(100), Duration::from_secs(1)).unwrap();
    assert_eq!(d.delay(1, None, 0), ms(100));
    assert_eq!(d.delay(1, None, u64::MAX), ms(300));
    assert_eq!(d.delay(5, Some(ms(900)), u64::MAX), Duration::from_secs(1));
    assert_eq!(
        d.delay(u32::MAX, Some(Duration::MAX), u64::MAX),
        Duration::from_secs(1)
    );
    // Same inputs, same sleep.
    assert_eq!(d.delay(2, Some(ms(250)), 77), d.delay(2, Some(ms(250)), 77));
}

#[test]
fn invalid_backoffs_are_refused() {
    assert!(Backoff::decorrelated_jitter(Duration::ZERO, ms(1)).is_err());
    assert!(Backoff::exponential(ms(2), ms(1)).is_err());
    assert!(Backoff::full_jitter(Duration::ZERO, Duration::ZERO).is_err());
    assert!(Backoff::decorrelated_jitter(ms(5), ms(5)).is_ok());
    let msg = Backoff::exponential(ms(2), ms(1)).unwrap_err().to_string();
    assert!(!msg.is_empty());
}

#[tokio::test(start_paused = true)]
async fn default_sleeps_are_decorrelated_jitter_from_250ms() {
    let (svc, seen) = api(|_, _| Ok(status(503)));
    RetryLayer::new()
        .with_seed(42)
        .layer(svc)
        .oneshot(get(URL))
        .await
        .unwrap();
    assert_eq!(seen.len(), 4);
    let g0 = seen.gap(0);
    assert!(g0 >= ms(250) && g0 <= ms(750), "{g0:?}");
    for i in 1..3 {
        let (prev, g) = (seen.gap(i - 1), seen.gap(i));
        assert!(
            g >= ms(250) && g <= prev * 3,
            "gap {i}: {g:?} after {prev:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn the_same_seed_gives_the_same_sleeps() {
    let mut runs = Vec::new();
    for _ in 0..2 {
        let (svc, seen) = api(|_, _| Ok(status(503)));
        RetryLayer::new()
            .with_seed(7)
            .layer(svc)
            .oneshot(get(URL))
            .await
            .unwrap();
        runs.push((0..3).map(|i| seen.gap(i)).collect::<Vec<_>>());
    }
    assert_eq!(runs[0], runs[1]);
}

#[tokio::test(start_paused = true)]
async fn exponential_backoff_sleeps_exactly() {
    let (svc, seen) = api(|_, _| Ok(status(503)));
    RetryLayer::new()
        .with_backoff(Backoff::exponential(ms(100), Duration::from_secs(1)).unwrap())
        .layer(svc)
        .oneshot(get(URL))
        .await
        .unwrap();
    assert_eq!(
        (seen.gap(0), seen.gap(1), seen.gap(2)),
        (ms(100), ms(200), ms(400))
    );
}

#[tokio::test(start_paused = true)]
async fn attempts_per_layer_and_per_request() {
    async fn count(layer: RetryLayer, opts: Option<CallOptions>) -> usize {
        let (svc, seen) = api(|_, _| Ok(status(503)));
        let mut r = get(URL);
        if let Some(o) = opts {
            r.extensions_mut().insert(o);
        }
        layer.layer(svc).oneshot(r).await.unwrap();
        seen.len()
    }
    assert_eq!(count(RetryLayer::new(), None).await, 4);
    assert_eq!(count(RetryLayer::new().with_max_attempts(0), None).await, 1);
    assert_eq!(count(RetryLayer::new().with_max_attempts(6), None).await, 6);
    assert_eq!(
        count(
            RetryLayer::new(),
            Some(CallOptions::new().without_retries())
        )
        .await,
        1
    );
    assert_eq!(
        count(
            RetryLayer::new(),
            Some(CallOptions::new().with_max_attempts(2))
        )
        .await,
        2
    );
    assert_eq!(
        count(
            RetryLayer::new(),
            Some(CallOptions::new().with_max_attempts(0))
        )
        .await,
        1
    );
    assert_eq!(
        count(
            RetryLayer::new(),
            Some(CallOptions::new().with_max_attempts(7))
        )
        .await,
        7
    );
}

#[test]
fn budget_parameters_are_validated_when_set() {
    let bad = [
        (ms(999), 10, 0.2),
        (Duration::from_millis(60_001), 10, 0.2),
        (Duration::ZERO, 10, 0.2),
        (Duration::MAX, 10, 0.2),
        (Duration::from_secs(10), 10, -0.01),
        (Duration::from_secs(10), 10, 1000.01),
        (Duration::from_secs(10), 10, f32::NAN),
        (Duration::from_secs(10), 10, f32::INFINITY),
        (Duration::from_secs(10), u32::MAX, 0.2),
        (Duration::from_secs(10), i32::MAX as u32, 0.2),
    ];
    for (ttl, min, pct) in bad {
        let err = RetryLayer::new()
            .with_budget(ttl, min, pct)
            .map(|_| ())
            .expect_err(&format!("{ttl:?} {min} {pct} accepted"));
        assert_eq!(*err.kind(), ErrorKind::Config);
    }
    for (ttl, min, pct) in [
        (Duration::from_secs(1), 0, 0.0),
        (Duration::from_secs(60), 10, 1000.0),
        (Duration::from_secs(10), (i32::MAX - 1) as u32, 0.2),
    ] {
        assert!(
            RetryLayer::new().with_budget(ttl, min, pct).is_ok(),
            "{ttl:?} {min} {pct}"
        );
    }
}

fn host(h: &str) -> Req {
    get(&format!("http://{h}/x"))
}

#[tokio::test(start_paused = true)]
async fn budgets_are_per_host_and_shared_by_clones_and_services() {
    let layer = RetryLayer::new()
        .with_backoff(Backoff::exponential(ms(1), ms(1)).unwrap())
        .with_budget(Duration::from_secs(1), 3, 0.0)
        .unwrap();
    let (svc, seen) = api(|_, _| Ok(status(503)));
    let s1 = layer.layer(svc.clone());
    // Burn host a's budget.
    for _ in 0..6 {
        s1.clone().oneshot(host("a.test")).await.unwrap();
    }
    let a_calls = seen.len();
    assert!(a_calls < 6 * 4, "no budget: {a_calls}");
    assert!(
        a_calls >= 6 + 3,
        "fewer retries than min_per_sec: {a_calls}"
    );
    // Another host has its own.
    let before = seen.len();
    s1.clone().oneshot(host("b.test")).await.unwrap();
    assert_eq!(seen.len() - before, 4, "host b was charged for host a");
    // A clone and another service from the same layer share a's.
    let before = seen.len();
    s1.clone().oneshot(host("a.test")).await.unwrap();
    assert_eq!(seen.len() - before, 1);
    let s2 = layer.layer(svc);
    let before = seen.len();
    s2.oneshot(host("a.test")).await.unwrap();
    assert_eq!(
        seen.len() - before,
        1,
        "a second service of the layer had its own budget"
    );
}

struct Tokens(AtomicU32);
impl Budget for Tokens {
    fn deposit(&self) {}
    fn withdraw(&self) -> bool {
        self.0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }
}

#[tokio::test(start_paused = true)]
async fn a_shared_budget_spans_hosts_and_without_budget_spans_nothing() {
    let (svc, seen) = api(|_, _| Ok(status(503)));
    let shared = Arc::new(Tokens(AtomicU32::new(2)));
    let s = RetryLayer::new().with_shared_budget(shared).layer(svc);
    s.clone().oneshot(host("a.test")).await.unwrap();
    s.clone().oneshot(host("b.test")).await.unwrap();
    s.oneshot(host("c.test")).await.unwrap();
    assert_eq!(seen.len(), 3 + 2);

    let (svc, seen) = api(|_, _| Ok(status(503)));
    let s = RetryLayer::new()
        .with_backoff(Backoff::exponential(ms(1), ms(1)).unwrap())
        .without_budget()
        .layer(svc);
    for _ in 0..30 {
        s.clone().oneshot(host("a.test")).await.unwrap();
    }
    assert_eq!(seen.len(), 120);
}

#[tokio::test(start_paused = true)]
async fn huge_durations_never_panic() {
    let (svc, seen) = api(|n, _| Ok(if n == 0 { status(503) } else { status(200) }));
    let layer = RetryLayer::new()
        .with_deadline(Duration::MAX)
        .with_attempt_timeout(Duration::MAX)
        .with_max_retry_after(Duration::MAX);
    let res = layer.layer(svc).oneshot(get(URL)).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(seen.len(), 2);
    let mut r = get(URL);
    r.extensions_mut().insert(
        CallOptions::new()
            .with_deadline(Duration::MAX)
            .with_attempt_timeout(Duration::MAX),
    );
    let (svc, _) = api(|_, _| Ok(status(200)));
    let res: Result<Res, BoxError> = RetryLayer::new().layer(svc).oneshot(r).await;
    assert_eq!(res.unwrap().status(), 200);
}

#[tokio::test(start_paused = true)]
async fn unbounded_attempts_are_bounded_by_the_deadline() {
    let (svc, seen) = api(|_, _| Ok(status(503)));
    let start = tokio::time::Instant::now();
    let res = RetryLayer::new()
        .with_max_attempts(u32::MAX)
        .without_budget()
        .with_deadline(Duration::from_secs(60))
        .layer(svc)
        .oneshot(get(URL))
        .await;
    assert!(start.elapsed() <= Duration::from_secs(60));
    assert!(seen.len() > 4 && seen.len() < 200, "{}", seen.len());
    assert_eq!(res.unwrap().status(), 503);
}

#[tokio::test(start_paused = true)]
async fn a_body_left_unread_by_a_failed_attempt_is_sent_whole_again() {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = seen.clone();
    let svc = tower::service_fn(move |req: Req| {
        let s = s.clone();
        async move {
            let n = s.lock().unwrap().len();
            if n == 0 {
                s.lock().unwrap().push(Bytes::new());
                drop(req);
                return Ok::<_, BoxError>(status(503));
            }
            let b = http_body_util::BodyExt::collect(req.into_body())
                .await
                .unwrap()
                .to_bytes();
            s.lock().unwrap().push(b);
            Ok(status(200))
        }
    });
    let r = http::Request::put(URL)
        .body(http_body_util::Full::from("the whole body"))
        .unwrap();
    RetryLayer::new().layer(svc).oneshot(r).await.unwrap();
    assert_eq!(seen.lock().unwrap()[1], "the whole body");
}

#[tokio::test(start_paused = true)]
async fn a_zero_retry_after_on_every_attempt_ends_rate_limited() {
    let (svc, seen) = api(|_, _| Ok(with_retry_after(429, "0")));
    let res = RetryLayer::new()
        .with_seed(1)
        .layer(svc)
        .oneshot(get(URL))
        .await;
    assert_eq!(seen.len(), 4);
    let err = res.map(|r| r.status()).unwrap_err();
    let rl = sturdy::core::find::<sturdy::core::RateLimited>(&*err).expect("RateLimited");
    assert_eq!(rl.retry_after(), Duration::ZERO);
    assert_eq!(top(&err).report().unwrap().attempts(), 4);
}

/// retry.md: the jitter on a `Retry-After` is "20 % of the wait, or of the backoff's base of
/// 250 ms when the wait is shorter: a `Retry-After: 0` is followed within 50 ms".
#[tokio::test(start_paused = true)]
async fn a_zero_retry_after_is_followed_within_fifty_ms() {
    let mut worst = Duration::ZERO;
    for seed in 0..40 {
        let (svc, seen) = api(|n, _| {
            Ok(if n == 0 {
                with_retry_after(429, "0")
            } else {
                status(200)
            })
        });
        RetryLayer::new()
            .with_seed(seed)
            .layer(svc)
            .oneshot(get(URL))
            .await
            .unwrap();
        worst = worst.max(seen.gap(0));
    }
    assert!(
        worst <= Duration::from_millis(50),
        "Retry-After: 0 waited up to {worst:?}"
    );
}
