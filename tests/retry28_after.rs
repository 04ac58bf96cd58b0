//! `Retry-After` as the retry layer reads it (docs/guides/retry.md "When", RELIABILITY.md bounds):
//! zero, negative, huge, malformed, dates far ahead and before 1970, duplicated headers, jitter.
#![cfg(feature = "full")]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sturdy::core::clock::ManualClock;
use sturdy::core::{find, BoxError, RateLimited};
use sturdy::retry::RetryLayer;
use tower::{Layer, ServiceExt};

use crate::retry28_common::*;

const URL: &str = "http://api.example.com/orders";

async fn call(layer: RetryLayer, api: Api, r: Req) -> Result<Res, BoxError> {
    layer.layer(api).oneshot(r).await
}

/// 503 with `Retry-After: ra` once, then 200.
fn once_then_ok(code: u16, ra: &'static str) -> (Api, Seen) {
    api(move |n, _| {
        Ok(if n == 0 {
            with_retry_after(code, ra)
        } else {
            status(200)
        })
    })
}

#[tokio::test(start_paused = true)]
async fn retry_after_zero_retries_at_once() {
    let (svc, seen) = once_then_ok(503, "0");
    let res = call(RetryLayer::new().with_seed(1), svc, get(URL))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(seen.len(), 2);
    // "never sooner than asked, plus up to 20 %": 0 s asked, so not the 250 ms backoff.
    assert!(
        seen.gap(0) < Duration::from_millis(50),
        "gap {:?}",
        seen.gap(0)
    );
}

#[tokio::test(start_paused = true)]
async fn malformed_or_negative_retry_after_falls_back_to_backoff() {
    for ra in [
        "-5", "-1", "soon", "1.5", "0x10", "5, 6", "+3", "1e3", "\u{7f}",
    ] {
        if http::HeaderValue::from_str(ra).is_err() {
            continue;
        }
        let (svc, seen) = once_then_ok(503, ra);
        let res = call(RetryLayer::new().with_seed(3), svc, get(URL))
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{ra}");
        assert_eq!(seen.len(), 2, "{ra}");
        let gap = seen.gap(0);
        assert!(
            gap >= Duration::from_millis(250) && gap <= Duration::from_millis(751),
            "Retry-After {ra:?}: gap {gap:?} is not the first backoff sleep"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn malformed_retry_after_on_final_429_returns_the_response() {
    let (svc, seen) = api(|_, _| Ok(with_retry_after(429, "later please")));
    let res = call(RetryLayer::new().with_seed(3), svc, get(URL))
        .await
        .unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(seen.len(), 4);
}

#[tokio::test(start_paused = true)]
async fn huge_retry_after_fails_at_once_with_a_capped_wait() {
    for ra in [
        "99999999999999999999",
        "18446744073709551615",
        "18446744073709551616",
        "9223372036854775807",
        "Fri, 31 Dec 9999 23:59:59 GMT",
    ] {
        for code in [429, 503] {
            let (svc, seen) = api(move |_, _| Ok(with_retry_after(code, ra)));
            let start = tokio::time::Instant::now();
            let err = call(RetryLayer::new().with_seed(1), svc, get(URL))
                .await
                .unwrap_err();
            assert_eq!(start.elapsed(), Duration::ZERO, "{ra}");
            assert_eq!(seen.len(), 1, "{ra}");
            let rl = find::<RateLimited>(&*err).unwrap_or_else(|| panic!("{ra}: {err}"));
            assert_eq!(rl.retry_after(), Duration::from_secs(300), "{ra}");
            let text = err.to_string();
            assert!(text.contains("api.example.com"), "{text}");
            assert!(text.contains("retry after 5m"), "{ra}: {text}");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_date_in_1970_asks_for_no_wait() {
    let (svc, seen) = once_then_ok(503, "Thu, 01 Jan 1970 00:00:00 GMT");
    let res = call(RetryLayer::new().with_seed(2), svc, get(URL))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(
        seen.gap(0) < Duration::from_millis(50),
        "gap {:?}",
        seen.gap(0)
    );
}

#[tokio::test(start_paused = true)]
async fn a_date_before_1970_is_ignored_not_read_as_past() {
    for ra in [
        "Wed, 31 Dec 1969 23:59:59 GMT",
        "Mon, 01 Jan 0001 00:00:00 GMT",
        "Sat, 01 Jan 0000 00:00:00 GMT",
    ] {
        let (svc, seen) = once_then_ok(503, ra);
        let res = call(RetryLayer::new().with_seed(2), svc, get(URL))
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let gap = seen.gap(0);
        assert!(
            gap >= Duration::from_millis(250) && gap <= Duration::from_millis(751),
            "{ra}: gap {gap:?} is not the backoff"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_future_date_is_honoured_against_the_configured_clock() {
    // Sun, 06 Nov 1994 08:49:47 GMT is 784_111_787 s after the epoch.
    let clock = ManualClock::at(SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777));
    let (svc, seen) = once_then_ok(503, "Sun, 06 Nov 1994 08:49:47 GMT");
    let layer = RetryLayer::new()
        .with_seed(5)
        .with_clock(Arc::new(clock))
        .with_retry_after_jitter(0.0);
    let res = call(layer, svc, get(URL)).await.unwrap();
    assert_eq!(res.status(), 200);
    let gap = seen.gap(0);
    assert!(
        gap >= Duration::from_secs(10) && gap < Duration::from_millis(10_050),
        "gap {gap:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn retry_after_jitter_stays_within_plus_twenty_percent() {
    let mut gaps = Vec::new();
    for seed in 0..24 {
        let (svc, seen) = once_then_ok(429, "10");
        let res = call(RetryLayer::new().with_seed(seed), svc, get(URL))
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let gap = seen.gap(0);
        assert!(
            gap >= Duration::from_secs(10) && gap <= Duration::from_secs(12),
            "seed {seed}: {gap:?}"
        );
        gaps.push(gap);
    }
    gaps.sort();
    gaps.dedup();
    assert!(gaps.len() > 10, "no jitter: {gaps:?}");
}

#[tokio::test(start_paused = true)]
async fn retry_after_jitter_fraction_is_clamped() {
    // 0: exactly as asked.
    let (svc, seen) = once_then_ok(503, "10");
    call(
        RetryLayer::new().with_retry_after_jitter(0.0),
        svc,
        get(URL),
    )
    .await
    .unwrap();
    assert_eq!(seen.gap(0), Duration::from_secs(10));
    // Negative is clamped to 0.
    let (svc, seen) = once_then_ok(503, "10");
    call(
        RetryLayer::new().with_retry_after_jitter(-3.0),
        svc,
        get(URL),
    )
    .await
    .unwrap();
    assert_eq!(seen.gap(0), Duration::from_secs(10));
    // NaN must not panic nor shorten the wait.
    let (svc, seen) = once_then_ok(503, "10");
    call(
        RetryLayer::new().with_retry_after_jitter(f64::NAN),
        svc,
        get(URL),
    )
    .await
    .unwrap();
    assert!(seen.gap(0) >= Duration::from_secs(10));
    // Above 1 is clamped to 1: at most twice the wait.
    for seed in 0..8 {
        let (svc, seen) = once_then_ok(503, "10");
        call(
            RetryLayer::new()
                .with_seed(seed)
                .with_retry_after_jitter(7.0),
            svc,
            get(URL),
        )
        .await
        .unwrap();
        let gap = seen.gap(0);
        assert!(
            gap >= Duration::from_secs(10) && gap <= Duration::from_secs(20),
            "{gap:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn sixty_seconds_is_slept_sixty_one_is_not() {
    let (svc, seen) = once_then_ok(503, "60");
    let res = call(RetryLayer::new().with_seed(9), svc, get(URL))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(seen.gap(0) >= Duration::from_secs(60) && seen.gap(0) <= Duration::from_secs(72));

    let (svc, seen) = api(|_, _| Ok(with_retry_after(429, "61")));
    let err = call(RetryLayer::new(), svc, get(URL)).await.unwrap_err();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        find::<RateLimited>(&*err).unwrap().retry_after(),
        Duration::from_secs(61)
    );
    assert_eq!(
        err.to_string(),
        "rate limited by api.example.com; retry after 1m 1s"
    );
}

#[tokio::test(start_paused = true)]
async fn max_retry_after_raises_both_the_sleep_and_the_reported_cap() {
    let layer = RetryLayer::new().with_max_retry_after(Duration::from_secs(120));
    let (svc, seen) = once_then_ok(503, "120");
    call(layer.clone(), svc, get(URL)).await.unwrap();
    assert!(seen.gap(0) >= Duration::from_secs(120));

    // 400 s asked, 120 s slept at most: reported capped at 5 min (the cap is the larger one).
    let (svc, _) = api(|_, _| Ok(with_retry_after(503, "400")));
    let err = call(layer, svc, get(URL)).await.unwrap_err();
    assert_eq!(
        find::<RateLimited>(&*err).unwrap().retry_after(),
        Duration::from_secs(300)
    );

    // With max_retry_after 10 min, a hostile wait is reported capped at 10 min.
    let layer = RetryLayer::new().with_max_retry_after(Duration::from_secs(600));
    let (svc, _) = api(|_, _| Ok(with_retry_after(503, "99999999")));
    let err = call(layer, svc, get(URL)).await.unwrap_err();
    assert_eq!(
        find::<RateLimited>(&*err).unwrap().retry_after(),
        Duration::from_secs(600)
    );
}

#[tokio::test(start_paused = true)]
async fn retry_after_on_the_last_attempt_ends_as_rate_limited() {
    // "also on the last attempt, so the caller always learns how long the server asked it to wait"
    let (svc, seen) = api(|_, _| Ok(with_retry_after(503, "1")));
    let err = call(RetryLayer::new().with_max_attempts(2), svc, get(URL))
        .await
        .unwrap_err();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        find::<RateLimited>(&*err).unwrap().retry_after(),
        Duration::from_secs(1)
    );
    let report = top(&err).report().expect("a CallReport");
    assert_eq!(report.attempts(), 2);

    let (svc, seen) = api(|_, _| Ok(with_retry_after(429, "2")));
    let err = call(RetryLayer::new().with_max_attempts(1), svc, get(URL))
        .await
        .unwrap_err();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        find::<RateLimited>(&*err).unwrap().retry_after(),
        Duration::from_secs(2)
    );
}

#[tokio::test(start_paused = true)]
async fn retry_after_past_the_deadline_is_not_slept() {
    let (svc, seen) = api(|_, _| Ok(with_retry_after(503, "10")));
    let start = tokio::time::Instant::now();
    let err = call(
        RetryLayer::new().with_deadline(Duration::from_secs(5)),
        svc,
        get(URL),
    )
    .await
    .unwrap_err();
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(seen.len(), 1);
    assert_eq!(
        find::<RateLimited>(&*err).unwrap().retry_after(),
        Duration::from_secs(10)
    );
}

#[tokio::test(start_paused = true)]
async fn retry_after_on_a_500_does_not_override_the_backoff() {
    // The guide: "A Retry-After ... on a 429, a 503 or an in-flight 409 overrides the backoff".
    let (svc, seen) = once_then_ok(500, "30");
    let res = call(RetryLayer::new().with_seed(4), svc, get(URL))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(
        seen.gap(0) < Duration::from_secs(1),
        "gap {:?}",
        seen.gap(0)
    );
}

#[tokio::test(start_paused = true)]
async fn duplicated_retry_after_is_never_shorter_than_the_longest() {
    // Two headers. Repeated identical values are one value; differing ones must not make the
    // client come back sooner than one of them asked.
    let (svc, seen) = api(|n, _| {
        Ok(if n == 0 {
            http::Response::builder()
                .status(503)
                .header("retry-after", "3")
                .header("retry-after", "3")
                .body(http_body_util::Full::from(""))
                .unwrap()
        } else {
            status(200)
        })
    });
    call(RetryLayer::new().with_seed(1), svc, get(URL))
        .await
        .unwrap();
    let gap = seen.gap(0);
    assert!(
        gap >= Duration::from_secs(3) && gap <= Duration::from_millis(3600),
        "{gap:?}"
    );

    let (svc, seen) = api(|n, _| {
        Ok(if n == 0 {
            http::Response::builder()
                .status(503)
                .header("retry-after", "2")
                .header("retry-after", "8")
                .body(http_body_util::Full::from(""))
                .unwrap()
        } else {
            status(200)
        })
    });
    call(RetryLayer::new().with_seed(1), svc, get(URL))
        .await
        .unwrap();
    let gap = seen.gap(0);
    assert!(gap >= Duration::from_secs(2), "{gap:?}");
}

#[tokio::test(start_paused = true)]
async fn thousands_of_junk_headers_do_not_hurt() {
    let (svc, seen) = api(|n, _| {
        let mut b = http::Response::builder().status(if n == 0 { 503 } else { 200 });
        if n == 0 {
            for i in 0..5000 {
                b = b.header("retry-after", format!("junk{i}"));
            }
            b = b.header("x-long", "9".repeat(64 * 1024));
        }
        Ok(b.body(http_body_util::Full::from("")).unwrap())
    });
    let res = call(RetryLayer::new().with_seed(1), svc, get(URL))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(seen.len(), 2);
    assert!(seen.gap(0) <= Duration::from_millis(751));
}
