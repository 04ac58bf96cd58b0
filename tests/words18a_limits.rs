//! The rate-limit guide's words on refusals, waiting lines and hostile pause headers, and the
//! retry guide's on waits past the deadline, each checked against the layers and the client.
#![cfg(feature = "full")]

use crate::outsider_common;
use std::time::Duration;

use http::StatusCode;
use outsider_common::*;
use sturdy::core::classify::delivery;
use sturdy::core::{BoxError, Delivery, RateLimited};
use sturdy::ratelimit::{Quota, RateLimitLayer};
use sturdy::retry::RetryLayer;
use sturdy::ClientBuilder;
use tokio::time::Instant;
use tower::{Layer, ServiceExt};

const HOST: &str = "api.example.com";
const U: &str = "http://api.example.com/items";

/// ratelimit.md: "A call whose wait for the pause would exceed its `max_wait` fails at once with
/// `RateLimited`, and calls already waiting in line are told as soon as such a pause arrives."
#[tokio::test(start_paused = true)]
async fn callers_in_line_are_told_when_a_pause_past_their_max_wait_arrives() {
    let api = Api::new(
        vec![after(
            Duration::from_millis(500),
            status_h(429, &[("retry-after", "120")]),
        )],
        ok(),
    );
    let svc = RateLimitLayer::new(Quota::per_second(1).unwrap())
        .with_max_wait(Duration::from_secs(30))
        .layer(api.service());
    let t0 = Instant::now();
    let first = tokio::spawn(svc.clone().oneshot(get(U)));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let waiting: Vec<_> = (0..3)
        .map(|_| {
            let s = svc.clone();
            tokio::spawn(async move {
                let r = s.oneshot(get(U)).await;
                (r, Instant::now())
            })
        })
        .collect();
    let res = first.await.unwrap().unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    for w in waiting {
        let (r, at) = w.await.unwrap();
        let err = r.unwrap_err();
        assert!(sturdy::core::find::<RateLimited>(&*err).is_some(), "{err}");
        assert_eq!(delivery(&*err), Delivery::NotSent);
        assert_eq!(
            at - t0,
            Duration::from_millis(500),
            "told when the pause came"
        );
    }
    assert_eq!(api.calls(), 1);
}

/// ratelimit.md: "Past the most limiters kept (`with_max_keys`), new keys share one overflow
/// limiter: a refusal then names it ('rate limited by the overflow limiter shared by the keys
/// past the most limiters kept')".
#[tokio::test(start_paused = true)]
async fn a_refusal_by_the_overflow_limiter_names_it() {
    let api = Api::new(vec![], ok());
    let svc = RateLimitLayer::new(Quota::per_minute(1).unwrap())
        .with_max_keys(1)
        .with_max_wait(Duration::ZERO)
        .layer(api.service());
    let mut texts = Vec::new();
    for host in ["a.example", "b.example", "c.example", "d.example"] {
        match svc.clone().oneshot(get(&format!("http://{host}/x"))).await {
            Ok(_) => {}
            Err(e) => texts.push(e.to_string()),
        }
    }
    assert!(!texts.is_empty(), "someone past the first key was refused");
    for t in &texts {
        assert!(
            t.starts_with(
                "rate limited by the overflow limiter shared by the keys past the most limiters kept"
            ),
            "{t}"
        );
        assert!(!t.contains("a.example"), "{t}");
    }
}

/// retry.md: a `Retry-After` "past the deadline ... is not slept: on a 429 or a 503 the call
/// fails at once with a `RateLimited { retry_after }` in its error chain".
#[tokio::test(start_paused = true)]
async fn a_retry_after_past_the_deadline_fails_at_once_with_the_wait() {
    for code in [429u16, 503] {
        let api = Api::new(vec![status_h(code, &[("retry-after", "30")])], ok());
        let svc = RetryLayer::new()
            .with_deadline(Duration::from_secs(10))
            .layer(api.service());
        let t0 = Instant::now();
        let err = svc.oneshot(get(U)).await.unwrap_err();
        assert_eq!(t0.elapsed(), Duration::ZERO);
        let rl = sturdy::core::find::<RateLimited>(&*err).expect("RateLimited");
        assert_eq!(rl.retry_after(), Duration::from_secs(30), "{code}");
        assert_eq!(
            err.to_string(),
            format!("rate limited by {HOST}; retry after 30s")
        );
        assert_eq!(api.calls(), 1);
    }
}

/// docs/RELIABILITY.md: "a pause asked by `Retry-After` (seconds or date), `RateLimit` `r=0;t=`,
/// `X-RateLimit-Remaining: 0` + reset, on any status: at most `max_pause` \[5 min\]". Hostile and
/// malformed values, repeated and huge headers, through the default client: no panic, no pause
/// past 5 minutes, and a call after the pause is sent.
#[tokio::test(start_paused = true)]
async fn hostile_pause_headers_through_the_client_never_lock_it_out() {
    let huge = "9".repeat(100_000);
    let cases: Vec<Vec<(&'static str, String)>> = vec![
        vec![("retry-after", "-5".into())],
        vec![("retry-after", "1e9".into())],
        vec![("retry-after", "".into())],
        vec![("retry-after", huge.clone())],
        vec![
            ("retry-after", "1".into()),
            ("retry-after", "99999999999".into()),
        ],
        vec![("retry-after", "Fri, 31 Dec 9999 23:59:59 GMT".into())],
        vec![("retry-after", "Mon, 01 Jan 0001 00:00:00 GMT".into())],
        vec![("retry-after", "Thu, 01 Jan 1970 00:00:00 GMT".into())],
        vec![("ratelimit", "\"d\";r=0;t=-5".into())],
        vec![("ratelimit", format!("\"d\";r=0;t={huge}"))],
        vec![("ratelimit", "\"d\";r=0;t=99999999999, \"e\";r=0;t=1".into())],
        vec![
            ("x-ratelimit-remaining", "0".into()),
            ("x-ratelimit-reset", "-1".into()),
        ],
        vec![
            ("x-ratelimit-remaining", "0".into()),
            ("x-ratelimit-reset", "99999999999999999999999".into()),
        ],
        vec![
            ("x-ratelimit-remaining", "-3".into()),
            ("x-ratelimit-reset", "30".into()),
        ],
    ];
    for headers in cases {
        let shown: Vec<String> = headers
            .iter()
            .map(|(k, v)| format!("{k}: {}", &v[..v.len().min(40)]))
            .collect();
        let api = Api::new(vec![Answer::Status(429, headers.clone(), "")], ok());
        let (limiter, handle) = RateLimitLayer::adaptive_only().pair();
        let client = ClientBuilder::new()
            .with_rate_limit(limiter)
            .build(api.service());
        let t0 = Instant::now();
        let first: Result<_, BoxError> =
            tokio::time::timeout(Duration::from_secs(400), client.clone().oneshot(get(U)))
                .await
                .unwrap_or_else(|_| panic!("{shown:?}: the first call did not end"));
        if let Err(e) = &first {
            let text = e.to_string();
            assert!(!text.contains("5124095"), "{shown:?}: {text}");
            assert!(text.len() < 400, "{shown:?}: {text}");
        }
        if let Some(p) = handle.pause(HOST) {
            assert!(p <= Duration::from_secs(300), "{shown:?}: {p:?}");
        }
        // A later call: sent within the cap, answered 200.
        let res = tokio::time::timeout(Duration::from_secs(400), async {
            loop {
                match client.clone().oneshot(get(U)).await {
                    Ok(r) => break r,
                    Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{shown:?}: locked out"));
        assert_eq!(res.status(), StatusCode::OK, "{shown:?}");
        assert!(
            t0.elapsed() <= Duration::from_secs(301 + 60),
            "{shown:?}: {:?}",
            t0.elapsed()
        );
    }
}

/// sturdy-retry, `RetryLayer::with_budget`: "A `Config` error when `ttl` or `percent` is out of
/// range, so a bad value is reported here and not on the first request"; retry.md: "validated
/// when you call it". A hostile `min_per_sec` is either refused here or taken; the first request
/// must not panic.
#[tokio::test(start_paused = true)]
async fn a_huge_min_per_sec_never_panics_on_the_first_request() {
    let Ok(layer) = RetryLayer::new().with_budget(Duration::from_secs(10), u32::MAX, 0.2) else {
        return;
    };
    let api = Api::new(vec![status(503)], ok());
    let call = tokio::spawn(layer.layer(api.service()).oneshot(get(U)));
    let res = call.await.expect("the call did not panic").unwrap();
    assert_eq!(res.status(), StatusCode::OK);
}

/// docs/RELIABILITY.md: "durations set to `Duration::MAX` (deadlines, timeouts, open periods,
/// hedge delays): read as about 30 years from now; never a panic"; circuit.md: "Setters never
/// panic". A failure-rate window of `Duration::MAX` and an open period of it.
#[tokio::test(start_paused = true)]
async fn a_breaker_window_of_duration_max_never_panics() {
    use sturdy::circuit::CircuitBreakerLayer;
    let api = Api::new(vec![status(503), status(503)], ok());
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_failure_rate(0.5, Duration::MAX, 2)
        .unwrap()
        .with_open_duration(Duration::from_secs(1), Duration::MAX)
        .pair();
    let svc = layer.layer(api.service());
    for _ in 0..2 {
        let _ = svc.clone().oneshot(get(U)).await;
    }
    let err = svc.clone().oneshot(get(U)).await.unwrap_err();
    assert!(
        sturdy::core::find::<sturdy::core::CircuitOpen>(&*err).is_some(),
        "{err}"
    );
    assert!(handle.state(HOST).is_some());
    tokio::time::advance(Duration::from_secs(3600)).await;
    let res = svc.oneshot(get(U)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
}

/// ratelimit.md: "Every pause learned from a response is at most `max_pause`" and "All setters
/// are `with_*`, and none panics"; docs/RELIABILITY.md: durations set to `Duration::MAX` "read as
/// about 30 years from now; never a panic". A default pause of `Duration::MAX` and a bare 429:
/// the pause is capped, and the pace it teaches does not lock the host out.
#[tokio::test(start_paused = true)]
async fn a_default_pause_of_duration_max_is_capped_and_locks_nobody_out() {
    let api = Api::new(vec![status(429)], ok());
    let (layer, handle) = RateLimitLayer::adaptive_only()
        .with_default_pause(Duration::MAX)
        .pair();
    let svc = layer.layer(api.service());
    let res = svc.clone().oneshot(get(U)).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    let pause = handle.pause(HOST).expect("a pause");
    assert!(pause <= Duration::from_secs(300), "{pause:?}");
    if let Some(pace) = handle.learned_pace(HOST) {
        assert!(pace <= Duration::from_secs(300), "{pace:?}");
    }
    tokio::time::advance(Duration::from_secs(301)).await;
    let t0 = Instant::now();
    for i in 0..3 {
        let out = tokio::time::timeout(Duration::from_secs(600), async {
            loop {
                match svc.clone().oneshot(get(U)).await {
                    Ok(r) => break r,
                    Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
                }
            }
        })
        .await;
        let res = out.unwrap_or_else(|_| panic!("call {i} locked out"));
        assert_eq!(res.status(), StatusCode::OK);
    }
    assert!(
        t0.elapsed() <= Duration::from_secs(301),
        "{:?}",
        t0.elapsed()
    );
}

/// ratelimit.md: "`with_max_keys(n)` ... new keys share one overflow limiter" and "none
/// panics": a bound of zero.
#[tokio::test(start_paused = true)]
async fn a_key_bound_of_zero_never_panics() {
    let api = Api::new(vec![], ok());
    let svc = RateLimitLayer::new(Quota::per_second(100).unwrap())
        .with_max_keys(0)
        .layer(api.service());
    for i in 0..20 {
        let res = svc
            .clone()
            .oneshot(get(&format!("http://h{i}.example/x")))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
}

/// ratelimit.md: "`handle.clear_pause(\"api.example.com\"); // ends it now; waiting calls leave at
/// the pace below`", and with a quota "each takes its own slot of the quota after the pause
/// (quota 10/s, burst 1: one every 100 ms from the end of the pause)".
#[tokio::test(start_paused = true)]
async fn clearing_a_pause_releases_the_line_at_the_quotas_pace() {
    let api = Api::new(vec![status_h(429, &[("retry-after", "30")])], ok());
    let (layer, handle) = RateLimitLayer::new(Quota::per_second(10).unwrap())
        .with_max_wait(Duration::from_secs(60))
        .pair();
    let svc = layer.layer(api.service());
    let res = svc.clone().oneshot(get(U)).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    let left = handle.pause(HOST).expect("paused");
    assert!(left > Duration::from_secs(29), "{left:?}");
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let s = svc.clone();
            tokio::spawn(async move {
                s.oneshot(get(U)).await.unwrap();
                Instant::now()
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(handle.waiting(HOST), 4);
    assert_eq!(api.calls(), 1);
    let cleared = handle.clear_pause(HOST).expect("a pause was cleared");
    assert!(cleared > Duration::from_secs(28), "{cleared:?}");
    assert_eq!(handle.pause(HOST), None);
    let mut at = Vec::new();
    for t in tasks {
        at.push(t.await.unwrap() - t0);
    }
    at.sort();
    assert!(at[0] >= Duration::from_secs(1), "{at:?}");
    assert!(at[3] < Duration::from_secs(2), "{at:?}");
    for w in at.windows(2) {
        assert!(w[1] - w[0] >= Duration::from_millis(99), "{at:?}");
    }
    assert_eq!(handle.waiting(HOST), 0);
}

/// ratelimit.md: "`RateLimit: \"policy\";r=0;t=N` (the IETF draft), on any status" pauses every
/// caller of the host; "A later, shorter reset never cuts a pause short". A header listing two
/// policies, the exhausted one first or second, and then a shorter one.
#[tokio::test(start_paused = true)]
async fn an_exhausted_policy_pauses_wherever_it_is_listed() {
    for value in [
        "\"burst\";r=0;t=10, \"day\";r=500;t=3600",
        "\"day\";r=500;t=3600, \"burst\";r=0;t=10",
    ] {
        let api = Api::new(
            vec![
                status_h(200, &[("ratelimit", value)]),
                status_h(200, &[("ratelimit", "\"burst\";r=0;t=2")]),
            ],
            ok(),
        );
        let (layer, handle) = RateLimitLayer::adaptive_only().pair();
        let svc = layer.layer(api.service());
        svc.clone().oneshot(get(U)).await.unwrap();
        let p = handle
            .pause(HOST)
            .unwrap_or_else(|| panic!("{value}: no pause"));
        assert!(
            p > Duration::from_secs(9) && p <= Duration::from_secs(10),
            "{value}: {p:?}"
        );
        // A call made now waits out the pause; its answer's shorter reset changes nothing.
        let t0 = Instant::now();
        svc.clone().oneshot(get(U)).await.unwrap();
        assert!(
            t0.elapsed() >= Duration::from_secs(9),
            "{value}: {:?}",
            t0.elapsed()
        );
        assert!(handle
            .pause(HOST)
            .is_none_or(|p| p <= Duration::from_secs(2)));
    }
}

/// The same sentence with the two policies in two `RateLimit` field lines (HTTP reads repeated
/// field lines of a list as one list).
#[tokio::test(start_paused = true)]
async fn an_exhausted_policy_in_a_second_field_line_pauses() {
    let api = Api::new(
        vec![Answer::Status(
            200,
            vec![
                ("ratelimit", "\"day\";r=500;t=3600".to_owned()),
                ("ratelimit", "\"burst\";r=0;t=10".to_owned()),
            ],
            "",
        )],
        ok(),
    );
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    let svc = layer.layer(api.service());
    svc.clone().oneshot(get(U)).await.unwrap();
    let p = handle.pause(HOST).expect("a pause");
    assert!(
        p > Duration::from_secs(9) && p <= Duration::from_secs(10),
        "{p:?}"
    );
}
