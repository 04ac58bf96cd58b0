#![cfg(feature = "full")]
//! s51a: every default and bound the docs state for retries, rate limits, breakers and the
//! adaptive concurrency limit, observed exactly at the boundary (the value, one below, one
//! above) through the public API, on paused time over in-process services.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use http_body_util::Full;
use sturdy::circuit::{CircuitBreakerLayer, CircuitState};
use sturdy::concurrency::{AdaptiveConcurrencyLayer, LimitReached};
use sturdy::core::headers::{RetryAfter, XRateLimit};
use sturdy::core::{find, CallOptions, ErrorKind, RateLimited};
use sturdy::ratelimit::{PauseCapped, RateLimitLayer};
use sturdy::retry::{Backoff, RetryLayer, MAX_REPORTED_WAIT};
use tokio::time::Instant;
use tower::{Layer, ServiceExt};

use crate::s51a_util::{get, resp, Api};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}
fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

// ---------------------------------------------------------------------------------------------
// Backoff (retry.md "When"; Backoff rustdoc)
// ---------------------------------------------------------------------------------------------

/// retry.md: "`sleep = min(cap, random_between(base, 3 * previous sleep))` with base 250 ms and
/// cap 20 s. The draw is made on `[base, 3 * previous]` and then capped".
#[test]
fn s51a_decorrelated_jitter_default_bounds_exactly() {
    let b = Backoff::decorrelated_jitter(ms(250), secs(20)).unwrap();
    assert_eq!(b.base(), ms(250));
    // First retry: prev = base, so [250 ms, 750 ms].
    assert_eq!(b.delay(1, None, 0), ms(250));
    assert_eq!(b.delay(1, None, u64::MAX), ms(750));
    // 3 * 6 s = 18 s stays under the cap; 3 * 7 s = 21 s is capped at 20 s.
    assert_eq!(b.delay(3, Some(secs(6)), u64::MAX), secs(18));
    assert_eq!(b.delay(3, Some(secs(7)), u64::MAX), secs(20));
    // The smallest draw is always the base, even after a capped sleep.
    assert_eq!(b.delay(9, Some(secs(20)), 0), ms(250));
    for r in [1u64, 7, 1 << 40, u64::MAX / 3, u64::MAX - 1] {
        let d = b.delay(2, Some(secs(1)), r);
        assert!(d >= ms(250) && d <= secs(3), "{d:?}");
    }
}

/// Backoff rustdoc: `Exponential`: "`sleep = min(cap, base * 2^(retry - 1))`".
#[test]
fn s51a_exponential_doubles_to_the_cap_exactly() {
    let b = Backoff::exponential(ms(250), secs(20)).unwrap();
    assert_eq!(b.delay(1, None, 0), ms(250));
    assert_eq!(b.delay(2, None, 0), ms(500));
    assert_eq!(b.delay(7, None, 0), secs(16));
    assert_eq!(b.delay(8, None, 0), secs(20), "250 ms * 128 = 32 s, capped");
    assert_eq!(b.delay(64, None, 0), secs(20));
    assert_eq!(b.delay(u32::MAX, None, u64::MAX), secs(20));
}

/// Backoff rustdoc: `FullJitter`: "`sleep = random_between(0, min(cap, base * 2^(retry - 1)))`".
#[test]
fn s51a_full_jitter_bounds_exactly() {
    let b = Backoff::full_jitter(ms(250), secs(20)).unwrap();
    assert_eq!(b.delay(1, None, 0), Duration::ZERO);
    assert!(b.delay(1, None, u64::MAX) <= ms(250));
    assert!(b.delay(1, None, u64::MAX) >= ms(249));
    assert!(b.delay(u32::MAX, None, u64::MAX) <= secs(20));
    assert!(b.delay(u32::MAX, None, u64::MAX) >= ms(19_999));
}

/// Backoff constructors: "When `base` is zero or larger than `cap`" an error; equal is fine.
#[test]
fn s51a_backoff_validation_boundaries() {
    type Ctor = fn(Duration, Duration) -> Result<Backoff, sturdy::retry::InvalidBackoff>;
    let ctors: [Ctor; 3] = [
        Backoff::decorrelated_jitter,
        Backoff::exponential,
        Backoff::full_jitter,
    ];
    for c in ctors {
        assert!(c(Duration::ZERO, secs(1)).is_err());
        assert!(c(Duration::from_nanos(1), secs(1)).is_ok());
        assert!(c(secs(1), secs(1)).is_ok());
        assert!(c(secs(1) + Duration::from_nanos(1), secs(1)).is_err());
        assert!(c(Duration::MAX, Duration::MAX).is_ok());
    }
    // base == cap: every sleep of decorrelated jitter is the cap.
    let b = Backoff::decorrelated_jitter(secs(1), secs(1)).unwrap();
    assert_eq!(b.delay(1, None, u64::MAX), secs(1));
    assert_eq!(b.delay(1, None, 0), secs(1));
}

/// Hostile: `Duration::MAX` caps and previous sleeps, `u32::MAX` retries: no panic, capped.
#[test]
fn s51a_backoff_hostile_values_do_not_panic() {
    let d = Backoff::decorrelated_jitter(Duration::from_nanos(1), Duration::MAX).unwrap();
    let x = d.delay(u32::MAX, Some(Duration::MAX), u64::MAX);
    assert!(x >= Duration::from_nanos(1));
    let e = Backoff::exponential(Duration::from_nanos(1), Duration::MAX).unwrap();
    assert_eq!(e.delay(u32::MAX, None, 0), Duration::MAX);
    assert_eq!(e.delay(41, None, 0), Duration::from_nanos(1 << 40));
    let f = Backoff::full_jitter(Duration::MAX, Duration::MAX).unwrap();
    let _ = f.delay(u32::MAX, Some(Duration::MAX), u64::MAX);
    // Retry 0 is not a retry the layer makes, but must not panic either.
    let _ = e.delay(0, None, 0);
    let _ = d.delay(0, None, 0);
}

// ---------------------------------------------------------------------------------------------
// Retry layer defaults (retry.md)
// ---------------------------------------------------------------------------------------------

/// retry.md: "`RetryLayer::new()`: 4 attempts in all"; "`.with_max_attempts(n)` \[4\] (0 is taken
/// as 1)"; CallOptions: "At most `n` attempts for this request ... (0 is taken as 1)".
#[tokio::test(start_paused = true)]
async fn s51a_retry_attempts_default_4_and_zero_is_one() {
    for (layer, opts, want) in [
        (RetryLayer::new(), None, 4),
        (RetryLayer::new().with_max_attempts(0), None, 1),
        (RetryLayer::new().with_max_attempts(1), None, 1),
        (RetryLayer::new().with_max_attempts(5), None, 5),
        (
            RetryLayer::new(),
            Some(CallOptions::new().with_max_attempts(0)),
            1,
        ),
        (
            RetryLayer::new(),
            Some(CallOptions::new().with_max_attempts(2)),
            2,
        ),
        (
            RetryLayer::new().with_max_attempts(u32::MAX),
            Some(CallOptions::new().with_max_attempts(6)),
            6,
        ),
    ] {
        let api = Api::always(503, &[]);
        let svc = layer.with_seed(1).layer(api.service::<Full<Bytes>>());
        let mut req = get("http://a.test/x");
        if let Some(o) = opts {
            req.extensions_mut().insert(o);
        }
        let res = svc.oneshot(req).await.unwrap();
        assert_eq!(res.status(), 503, "a final 503 is returned as it is");
        assert_eq!(api.count(), want);
    }
}

/// retry.md: base 250 ms, so the first retry follows within [250 ms, 750 ms], and the second
/// within [250 ms, 3 × the first sleep] (capped at 20 s).
#[tokio::test(start_paused = true)]
async fn s51a_retry_first_sleeps_within_the_jitter_bounds() {
    for seed in 0..24u64 {
        let api = Api::always(503, &[]);
        let svc = RetryLayer::new()
            .with_seed(seed)
            .layer(api.service::<Full<Bytes>>());
        let start = Instant::now();
        let _ = svc.oneshot(get("http://a.test/x")).await.unwrap();
        let t = api.offsets(start);
        assert_eq!(t.len(), 4);
        let s1 = t[1] - t[0];
        let s2 = t[2] - t[1];
        assert!(
            s1 >= ms(250) && s1 <= ms(750),
            "seed {seed}: first sleep {s1:?}"
        );
        assert!(
            s2 >= ms(250) && s2 <= (s1 * 3).min(secs(20)),
            "seed {seed}: second sleep {s2:?} after {s1:?}"
        );
    }
}

/// retry.md: "`Retry-After` honoured up to 60 s with up to +20 % jitter": 60 s is slept (between
/// 60 s and 72 s), 61 s fails at once with `RateLimited` carrying 61 s.
#[tokio::test(start_paused = true)]
async fn s51a_retry_after_60_slept_61_fails_at_once() {
    // 60: slept.
    let api = Api::new(|n, _| {
        Ok(if n == 0 {
            resp(503, &[("retry-after", "60")])
        } else {
            resp(200, &[])
        })
    });
    let svc = RetryLayer::new()
        .with_seed(3)
        .layer(api.service::<Full<Bytes>>());
    let start = Instant::now();
    let res = svc.oneshot(get("http://a.test/x")).await.unwrap();
    assert_eq!(res.status(), 200);
    let t = api.offsets(start);
    assert!(t[1] >= secs(60) && t[1] <= secs(72), "slept {:?}", t[1]);

    // 61: not slept.
    for status in [429u16, 503] {
        let api = Api::always(status, &[("retry-after", "61")]);
        let svc = RetryLayer::new()
            .with_seed(3)
            .layer(api.service::<Full<Bytes>>());
        let start = Instant::now();
        let err = svc.oneshot(get("http://a.test/x")).await.unwrap_err();
        assert_eq!(start.elapsed(), Duration::ZERO, "failed at once");
        assert_eq!(api.count(), 1);
        let rl = find::<RateLimited>(&*err).expect("RateLimited in the chain");
        assert_eq!(rl.retry_after(), secs(61));
    }
}

/// retry.md: "plus up to 20 % ... (20 % of the wait, or of the backoff's base of 250 ms when the
/// wait is shorter: a `Retry-After: 0` is followed within 50 ms)"; "A date already past ... asks
/// for no wait at all, so the retry follows just as soon".
#[tokio::test(start_paused = true)]
async fn s51a_retry_after_jitter_bounds() {
    for (value, lo, hi) in [
        ("0", Duration::ZERO, ms(50)),
        ("1", secs(1), ms(1200)),
        ("10", secs(10), secs(12)),
        ("Mon, 01 Jan 2001 00:00:00 GMT", Duration::ZERO, ms(50)),
    ] {
        for seed in 0..8u64 {
            let api = Api::new(move |n, _| {
                Ok(if n == 0 {
                    resp(429, &[("retry-after", value)])
                } else {
                    resp(200, &[])
                })
            });
            let svc = RetryLayer::new()
                .with_seed(seed)
                .layer(api.service::<Full<Bytes>>());
            let start = Instant::now();
            assert_eq!(
                svc.oneshot(get("http://a.test/x")).await.unwrap().status(),
                200
            );
            let t = api.offsets(start);
            assert!(
                t[1] >= lo && t[1] <= hi,
                "Retry-After {value}, seed {seed}: retried after {:?}, not in [{lo:?}, {hi:?}]",
                t[1]
            );
        }
    }
}

/// retry.md / RELIABILITY.md: the wait a `RateLimited` reports is "the server's capped at 5 min
/// (`sturdy_retry::MAX_REPORTED_WAIT`, or `max_retry_after` when longer)".
#[tokio::test(start_paused = true)]
async fn s51a_reported_wait_cap_boundaries() {
    assert_eq!(MAX_REPORTED_WAIT, secs(300));
    for (max_ra, value, want) in [
        (None, "300", secs(300)),
        (None, "301", secs(300)),
        (None, "299", secs(299)),
        (None, "99999999999999999999", secs(300)),
        (Some(secs(600)), "601", secs(600)),
        (Some(secs(600)), "99999999999999999999", secs(600)),
        (Some(secs(30)), "31", secs(31)),
        (Some(secs(30)), "400", secs(300)),
    ] {
        let api = Api::new(move |_, _| Ok(resp(429, &[("retry-after", value)])));
        let mut layer = RetryLayer::new();
        if let Some(m) = max_ra {
            layer = layer.with_max_retry_after(m);
        }
        let svc = layer.layer(api.service::<Full<Bytes>>());
        let err = svc.oneshot(get("http://a.test/x")).await.unwrap_err();
        let rl = find::<RateLimited>(&*err).expect("RateLimited");
        assert_eq!(
            rl.retry_after(),
            want,
            "max_retry_after {max_ra:?}, Retry-After {value}: {err}"
        );
    }
}

/// retry.md: "`.with_budget(ttl, min_per_sec, percent)` ... (validated when you call it: `ttl` 1 s
/// to 60 s, `percent` 0.0 to 1000.0)"; rustdoc: "or `min_per_sec` is `i32::MAX` or more".
#[test]
fn s51a_budget_validation_boundaries() {
    let ok = |ttl: Duration, min: u32, pct: f32| RetryLayer::new().with_budget(ttl, min, pct);
    assert!(ok(secs(1), 10, 0.2).is_ok());
    assert!(ok(secs(60), 10, 0.2).is_ok());
    assert!(ok(secs(10), 10, 0.0).is_ok());
    assert!(ok(secs(10), 10, 1000.0).is_ok());
    assert!(ok(secs(10), 0, 0.2).is_ok());
    assert!(ok(secs(10), (i32::MAX - 1) as u32, 0.2).is_ok());
    for (ttl, min, pct) in [
        (ms(999), 10, 0.2),
        (Duration::ZERO, 10, 0.2),
        (secs(60) + Duration::from_nanos(1), 10, 0.2),
        (Duration::MAX, 10, 0.2),
        (secs(10), 10, -0.001),
        (secs(10), 10, 1000.1),
        (secs(10), 10, f32::NAN),
        (secs(10), 10, f32::INFINITY),
        (secs(10), i32::MAX as u32, 0.2),
        (secs(10), u32::MAX, 0.2),
    ] {
        match ok(ttl, min, pct) {
            Ok(_) => panic!("with_budget({ttl:?}, {min}, {pct}) accepted"),
            Err(e) => assert_eq!(*e.kind(), ErrorKind::Config, "{e}"),
        }
    }
}

/// retry.md: the largest legal budget works on a call (no overflow in `min_per_sec × ttl`).
#[tokio::test(start_paused = true)]
async fn s51a_largest_budget_works() {
    let api = Api::always(503, &[]);
    let svc = RetryLayer::new()
        .with_budget(secs(60), (i32::MAX - 1) as u32, 1000.0)
        .unwrap()
        .with_seed(2)
        .layer(api.service::<Full<Bytes>>());
    assert_eq!(
        svc.oneshot(get("http://a.test/x")).await.unwrap().status(),
        503
    );
    assert_eq!(api.count(), 4);
}

/// retry.md: the default budget is "20 % of the calls of the last 10 s plus a reserve of 10 per
/// second over those 10 s (100 retries, which a burst may spend at once)", with tower's
/// `TpsBudget` arithmetic. 40 calls at once to an API that always fails want 120 retries; the
/// budget allows 100 + 20 % of 40 = 108.
#[tokio::test(start_paused = true)]
async fn s51a_default_budget_allows_100_plus_20_percent() {
    let api = Api::always(503, &[]);
    let svc = RetryLayer::new()
        .with_seed(9)
        .layer(api.service::<Full<Bytes>>());
    let calls: Vec<_> = (0..40)
        .map(|_| svc.clone().oneshot(get("http://a.test/x")))
        .collect();
    for r in futures_util::future::join_all(calls).await {
        assert_eq!(r.unwrap().status(), 503);
    }
    assert_eq!(api.count(), 40 + 108, "40 calls and 108 retries");
}

// ---------------------------------------------------------------------------------------------
// Rate limits (ratelimit.md, RELIABILITY.md)
// ---------------------------------------------------------------------------------------------

/// ratelimit.md: "Every pause learned from a response is at most `max_pause`: 5 minutes by
/// default"; "The call that received the long pause gets its response as it came, with a
/// `PauseCapped` in the response extensions (what was asked, what was applied, which header)".
#[tokio::test(start_paused = true)]
async fn s51a_max_pause_300_kept_301_capped() {
    for (value, want_pause, capped) in [
        ("299", secs(299), false),
        ("300", secs(300), false),
        ("301", secs(300), true),
    ] {
        let api = Api::new(move |_, _| Ok(resp(429, &[("retry-after", value)])));
        let (layer, handle) = RateLimitLayer::adaptive_only().pair();
        let svc = layer.layer(api.service::<Full<Bytes>>());
        let res = svc.oneshot(get("http://a.test/x")).await.unwrap();
        assert_eq!(res.status(), 429);
        assert_eq!(
            handle.pause("a.test"),
            Some(want_pause),
            "Retry-After {value}"
        );
        let pc = res.extensions().get::<PauseCapped>();
        assert_eq!(pc.is_some(), capped, "Retry-After {value}: PauseCapped");
        if let Some(pc) = pc {
            assert_eq!(pc.asked(), secs(301));
            assert_eq!(pc.applied(), secs(300));
        }
    }
}

/// ratelimit.md: "`.with_max_pause(..)`; zero turns pauses off".
#[tokio::test(start_paused = true)]
async fn s51a_max_pause_zero_never_pauses() {
    let api = Api::always(429, &[("retry-after", "30")]);
    let (layer, handle) = RateLimitLayer::adaptive_only()
        .with_max_pause(Duration::ZERO)
        .pair();
    let svc = layer.layer(api.service::<Full<Bytes>>());
    let start = Instant::now();
    for _ in 0..3 {
        let _ = svc.clone().oneshot(get("http://a.test/x")).await.unwrap();
    }
    assert_eq!(handle.pause("a.test"), None);
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(api.count(), 3);
}

/// ratelimit.md: "a bare 429: 1 s (`.with_default_pause(..)`)"; "the first bare 429 of a pause
/// sets a pace of one call per eighth of the pause (125 ms after the default 1 s pause)".
#[tokio::test(start_paused = true)]
async fn s51a_bare_429_pauses_1s_and_learns_125ms() {
    let api = Api::always(429, &[]);
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    let svc = layer.layer(api.service::<Full<Bytes>>());
    let _ = svc.oneshot(get("http://a.test/x")).await.unwrap();
    assert_eq!(handle.pause("a.test"), Some(secs(1)));
    assert_eq!(handle.learned_pace("a.test"), Some(ms(125)));
}

/// ratelimit.md: "if its turn would come later than `max_wait` (30 s, `.with_max_wait(..)`),
/// counting the calls ahead of it, it fails at once with `RateLimited` carrying the wait".
/// A pause of exactly 30 s is waited; 31 s fails at once.
#[tokio::test(start_paused = true)]
async fn s51a_max_wait_30s_boundary() {
    for (pause, waits) in [("30", true), ("31", false)] {
        let api = Api::new(move |n, _| {
            Ok(if n == 0 {
                resp(429, &[("retry-after", pause)])
            } else {
                resp(200, &[])
            })
        });
        let layer = RateLimitLayer::adaptive_only();
        let svc = layer.layer(api.service::<Full<Bytes>>());
        let _ = svc.clone().oneshot(get("http://a.test/x")).await.unwrap();
        let start = Instant::now();
        let r = svc.clone().oneshot(get("http://a.test/x")).await;
        if waits {
            assert_eq!(r.unwrap().status(), 200);
            assert_eq!(start.elapsed(), secs(30));
        } else {
            let err = r.unwrap_err();
            assert_eq!(start.elapsed(), Duration::ZERO, "refused at once");
            let rl = find::<RateLimited>(&*err).expect("RateLimited");
            assert_eq!(rl.retry_after(), secs(31));
            assert_eq!(api.count(), 1);
        }
    }
}

/// ratelimit.md: "the reset is read as vendors write it: seconds to wait (whole or decimal), a
/// Unix time in seconds (from 10^9, whole or decimal) or milliseconds (from 10^12)".
#[test]
fn s51a_x_ratelimit_reset_forms_at_their_boundaries() {
    // 2026-12-05T00:00:00Z
    let now = UNIX_EPOCH + secs(1_796_428_800);
    let reset = |v: &str| {
        let mut h = HeaderMap::new();
        h.insert("x-ratelimit-remaining", HeaderValue::from_static("0"));
        h.insert("x-ratelimit-reset", HeaderValue::from_str(v).unwrap());
        XRateLimit::from_headers(&h, now).and_then(|x| x.reset)
    };
    assert_eq!(reset("30"), Some(secs(30)));
    assert_eq!(reset("1.5"), Some(ms(1500)));
    // Just under 10^9: seconds to wait.
    assert_eq!(reset("999999999"), Some(secs(999_999_999)));
    // 10^9: a Unix time (2001), in the past: zero.
    assert_eq!(reset("1000000000"), Some(Duration::ZERO));
    // A Unix time 60 s ahead, whole and decimal.
    assert_eq!(reset("1796428860"), Some(secs(60)));
    assert_eq!(reset("1796428860.5"), Some(ms(60_500)));
    // Just under 10^12: still seconds since the epoch (far ahead).
    assert!(reset("999999999999").unwrap() > secs(86_400 * 365 * 1000));
    // 10^12: milliseconds (2001): past, zero.
    assert_eq!(reset("1000000000000"), Some(Duration::ZERO));
    // Milliseconds 1.5 s ahead.
    assert_eq!(reset("1796428801500"), Some(ms(1500)));
    // RFC 3339 and HTTP date, 3 h ahead.
    assert_eq!(reset("2026-12-05T03:00:00Z"), Some(secs(3 * 3600)));
    assert_eq!(reset("Sat, 05 Dec 2026 03:00:00 GMT"), Some(secs(3 * 3600)));
}

/// retry_after rustdoc: "delay-seconds is `1*DIGIT` with optional white space around it; a value
/// too large for a `Duration` saturates. Negative (`-1`), signed (`+1`), fractional (`1.0`) and
/// non-ASCII digits are errors."
#[test]
fn s51a_retry_after_parser_words() {
    let now = UNIX_EPOCH + secs(1_796_428_800);
    let d = |v: &[u8]| RetryAfter::parse(v).map(|r| r.delay_from(now));
    assert_eq!(d(b"0").unwrap(), Duration::ZERO);
    assert_eq!(d(b" 5 ").unwrap(), secs(5));
    assert_eq!(d(b"18446744073709551615").unwrap(), secs(u64::MAX));
    assert!(d(b"18446744073709551616").unwrap() >= secs(u64::MAX));
    assert!(d(b"99999999999999999999999999999999999999999").unwrap() >= secs(u64::MAX));
    for bad in [
        &b"-1"[..],
        b"+1",
        b"1.0",
        b"\xd9\xa1",
        b"",
        b" ",
        b"1 2",
        b"0x10",
    ] {
        assert!(RetryAfter::parse(bad).is_err(), "{bad:?} parsed");
    }
    // An HTTP date before 1970 is not a date (RELIABILITY.md).
    assert!(RetryAfter::parse(b"Mon, 01 Jan 0001 00:00:00 GMT").is_err());
    assert!(RetryAfter::parse(b"Wed, 31 Dec 1969 23:59:59 GMT").is_err());
    assert!(RetryAfter::parse(b"Thu, 01 Jan 1970 00:00:00 GMT").is_ok());
}

// ---------------------------------------------------------------------------------------------
// Circuit breaker (circuit.md)
// ---------------------------------------------------------------------------------------------

/// circuit.md: "Opens when at least 50 % of the calls of the last 30 s failed, once there were
/// at least 100". 99 failures: closed; the 100th: open. 49 of 100: closed; 50 of 100: open.
#[tokio::test(start_paused = true)]
async fn s51a_breaker_opens_at_100_calls_and_50_percent() {
    // All failing.
    let api = Api::always(503, &[]);
    let (layer, handle) = CircuitBreakerLayer::new().pair();
    let svc = layer.layer(api.service::<Full<Bytes>>());
    for _ in 0..99 {
        let _ = svc.clone().oneshot(get("http://a.test/x")).await.unwrap();
    }
    assert_eq!(
        handle.state("a.test"),
        Some(CircuitState::Closed),
        "99 calls"
    );
    let _ = svc.clone().oneshot(get("http://a.test/x")).await.unwrap();
    assert!(
        matches!(handle.state("a.test"), Some(CircuitState::Open { .. })),
        "100 calls: {:?}",
        handle.state("a.test")
    );

    // A mix: failures first, then successes.
    for (fails, open) in [(49usize, false), (50, true)] {
        let api = Api::new(move |n, _| Ok(resp(if n < fails { 500 } else { 200 }, &[])));
        let (layer, handle) = CircuitBreakerLayer::new().pair();
        let svc = layer.layer(api.service::<Full<Bytes>>());
        for _ in 0..100 {
            let _ = svc.clone().oneshot(get("http://a.test/x")).await.unwrap();
        }
        assert_eq!(
            matches!(handle.state("a.test"), Some(CircuitState::Open { .. })),
            open,
            "{fails} of 100 failed: {:?}",
            handle.state("a.test")
        );
    }
}

/// circuit.md: "Open 30 s, doubling on each re-opening up to 5 min"; "Half-open: 1 probe at a
/// time"; "A failed probe reopens at once".
#[tokio::test(start_paused = true)]
async fn s51a_breaker_open_periods_30_60_120_240_300() {
    let api = Api::always(503, &[]);
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .pair();
    let svc = layer.layer(api.service::<Full<Bytes>>());
    let _ = svc.clone().oneshot(get("http://a.test/x")).await.unwrap();
    for want in [30u64, 60, 120, 240, 300, 300] {
        assert_eq!(
            handle.state("a.test"),
            Some(CircuitState::Open {
                retry_in: secs(want)
            })
        );
        let err = svc
            .clone()
            .oneshot(get("http://a.test/x"))
            .await
            .unwrap_err();
        let open = find::<sturdy::core::CircuitOpen>(&*err).expect("CircuitOpen");
        assert_eq!(open.retry_in(), secs(want));
        tokio::time::advance(secs(want) - ms(1)).await;
        assert!(matches!(
            handle.state("a.test"),
            Some(CircuitState::Open { .. })
        ));
        tokio::time::advance(ms(1)).await;
        // The probe: fails, reopens at once with a doubled period.
        let n = api.count();
        let _ = svc.clone().oneshot(get("http://a.test/x")).await.unwrap();
        assert_eq!(api.count(), n + 1, "one probe went through");
    }
}

// ---------------------------------------------------------------------------------------------
// Adaptive concurrency (concurrency.md)
// ---------------------------------------------------------------------------------------------

/// concurrency.md: "the limit starts at 20"; "waits in line ... for up to 30 s"; "Past the wait,
/// the call fails without being sent: ... `RateLimited` (no wait given), delivery `NotSent`, whose
/// source is `LimitReached` (the key, the limit, how long it waited)".
#[tokio::test(start_paused = true)]
async fn s51a_concurrency_default_20_and_30s_wait() {
    let api = Api::new(|_, _| Ok(resp(200, &[])));
    let slow = {
        let inner = api.service::<Full<Bytes>>();
        tower::service_fn(move |r| {
            let inner = inner.clone();
            async move {
                tokio::time::sleep(secs(100)).await;
                inner.oneshot(r).await
            }
        })
    };
    let (layer, handle) = AdaptiveConcurrencyLayer::new().pair();
    let svc = layer.layer(slow);
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(tokio::spawn(svc.clone().oneshot(get("http://a.test/x"))));
    }
    tokio::task::yield_now().await;
    tokio::time::sleep(ms(1)).await;
    let st = handle.state("a.test").unwrap();
    assert_eq!((st.limit(), st.in_flight()), (20, 20));
    let start = Instant::now();
    let err = svc
        .clone()
        .oneshot(get("http://a.test/x"))
        .await
        .unwrap_err();
    assert_eq!(start.elapsed(), secs(30), "waited 30 s");
    let e = err
        .downcast_ref::<sturdy::core::Error>()
        .expect("sturdy Error");
    assert_eq!(*e.kind(), ErrorKind::RateLimited { retry_after: None });
    assert_eq!(
        sturdy::core::classify::delivery(&*err),
        sturdy::core::Delivery::NotSent
    );
    let lr = find::<LimitReached>(&*err).expect("LimitReached");
    assert_eq!(
        (lr.key(), lr.limit(), lr.waited()),
        ("a.test", 20, secs(30))
    );
    for h in held {
        h.abort();
    }
}

/// concurrency.md rustdoc: "A `min` of 0 is taken as 1 ..., a `max` below `min` as `min`, and
/// both are capped at 1,000,000"; "The limit a host starts with \[20\], taken into the bounds";
/// `set_limit` "taken into the bounds".
#[tokio::test(start_paused = true)]
async fn s51a_concurrency_limit_bounds_are_clamped() {
    let api = Api::new(|_, _| Ok(resp(200, &[])));
    for (layer, want) in [
        (AdaptiveConcurrencyLayer::new().with_limits(0, 0), 1usize),
        (AdaptiveConcurrencyLayer::new().with_limits(5, 2), 5),
        (AdaptiveConcurrencyLayer::new().with_limits(1, 10), 10),
        (
            AdaptiveConcurrencyLayer::new()
                .with_limits(1, usize::MAX)
                .with_initial_limit(usize::MAX),
            1_000_000,
        ),
        (
            AdaptiveConcurrencyLayer::new()
                .with_limits(usize::MAX, usize::MAX)
                .with_initial_limit(0),
            1_000_000,
        ),
        (AdaptiveConcurrencyLayer::new().with_initial_limit(0), 1),
        (
            AdaptiveConcurrencyLayer::new().with_initial_limit(5000),
            1000,
        ),
    ] {
        // The limit a host starts with, read while its first call is in flight (a success
        // may raise it afterwards).
        let (layer, handle) = layer.pair();
        let hang = tower::service_fn(|_r: http::Request<Full<Bytes>>| async {
            std::future::pending::<Result<crate::s51a_util::Resp, Infallible>>().await
        });
        let svc = layer.layer(hang);
        let call = tokio::spawn(svc.oneshot(get("http://a.test/x")));
        tokio::task::yield_now().await;
        tokio::time::sleep(ms(1)).await;
        assert_eq!(handle.limit("a.test"), Some(want));
        call.abort();
    }
    // A limit bounded to 1 stays 1 through successes.
    let (layer, handle) = AdaptiveConcurrencyLayer::new().with_limits(0, 0).pair();
    let svc = layer.layer(api.service::<Full<Bytes>>());
    for _ in 0..5 {
        svc.clone().oneshot(get("http://a.test/x")).await.unwrap();
    }
    assert_eq!(handle.limit("a.test"), Some(1), "max 0 is taken as min, 1");
    let (layer, handle) = AdaptiveConcurrencyLayer::new().pair();
    let svc = layer.layer(api.service::<Full<Bytes>>());
    svc.clone().oneshot(get("http://a.test/x")).await.unwrap();
    handle.set_limit("a.test", usize::MAX);
    assert_eq!(handle.limit("a.test"), Some(1000));
    handle.set_limit("a.test", 0);
    assert_eq!(handle.limit("a.test"), Some(1));
    svc.oneshot(get("http://a.test/x")).await.unwrap();
}

/// concurrency.md: "A maximum wait of zero sheds load instead: a call that finds the limit full
/// fails at once"; `Duration::MAX` is read as about 30 years (RELIABILITY.md), not a panic.
#[tokio::test(start_paused = true)]
async fn s51a_concurrency_wait_zero_and_max() {
    let api = Api::new(|_, _| Ok(resp(200, &[])));
    let slow = {
        let inner = api.service::<Full<Bytes>>();
        tower::service_fn(move |r| {
            let inner = inner.clone();
            async move {
                tokio::time::sleep(secs(5)).await;
                inner.oneshot(r).await
            }
        })
    };
    let zero = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .with_max_wait(Duration::ZERO)
        .layer(slow.clone());
    let first = tokio::spawn(zero.clone().oneshot(get("http://a.test/x")));
    tokio::task::yield_now().await;
    let start = Instant::now();
    assert!(zero.clone().oneshot(get("http://a.test/x")).await.is_err());
    assert_eq!(start.elapsed(), Duration::ZERO);
    first.await.unwrap().unwrap();

    let max = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .with_max_wait(Duration::MAX)
        .layer(slow);
    let first = tokio::spawn(max.clone().oneshot(get("http://a.test/x")));
    tokio::task::yield_now().await;
    let start = Instant::now();
    max.clone().oneshot(get("http://a.test/x")).await.unwrap();
    assert_eq!(
        start.elapsed(),
        secs(10),
        "waited 5 s for the place, then its own 5 s"
    );
    first.await.unwrap().unwrap();
}

/// Shared counters for a test.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<StatusCode>>>);
impl Seen {
    fn push(&self, s: StatusCode) {
        self.0.lock().unwrap().push(s);
    }
}

/// retry.md: "Retried: 408, 425, 429, 500, 502, 503, 504 ... Never retried: every other 4xx and
/// 5xx (501, 505 to 511, ...); 401". Each status, through the default retry layer.
#[tokio::test(start_paused = true)]
async fn s51a_retried_statuses_exactly() {
    let seen = Seen::default();
    for code in (400u16..=418)
        .chain(421..=426)
        .chain([428, 429, 431, 451])
        .chain(500..=511)
    {
        let api = Api::always(code, &[]);
        let svc = RetryLayer::new()
            .with_seed(1)
            .layer(api.service::<Full<Bytes>>());
        let r = svc.oneshot(get("http://a.test/x")).await;
        let retried = [408, 425, 429, 500, 502, 503, 504].contains(&code);
        let want = if retried { 4 } else { 1 };
        assert_eq!(api.count(), want, "status {code}: {r:?}");
        seen.push(StatusCode::from_u16(code).unwrap());
    }
    assert!(!seen.0.lock().unwrap().is_empty());
}

/// ratelimit.md: "`RateLimit: "policy";r=0;t=N` (the IETF draft), on any status (a field's first
/// 4,096 list members are read and the rest left unread ...: a member with `r=0` past them pauses
/// nothing)".
#[test]
fn s51a_ratelimit_field_reads_4096_members() {
    use sturdy::core::headers::pause_hint;
    let hint = |zero_at: usize, total: usize| {
        let members: Vec<String> = (0..total)
            .map(|i| {
                let r = if i + 1 == zero_at { 0 } else { 5 };
                format!("\"p{i}\";r={r};t=7")
            })
            .collect();
        let mut h = HeaderMap::new();
        h.insert(
            "ratelimit",
            HeaderValue::from_str(&members.join(", ")).unwrap(),
        );
        pause_hint(StatusCode::OK, &h, UNIX_EPOCH + secs(1_796_428_800)).map(|p| p.delay)
    };
    assert_eq!(hint(1, 1), Some(secs(7)));
    assert_eq!(
        hint(4096, 4096),
        Some(secs(7)),
        "the 4,096th member is read"
    );
    assert_eq!(hint(4096, 5000), Some(secs(7)));
    assert_eq!(hint(4097, 4097), None, "the 4,097th is left unread");
    assert_eq!(hint(4097, 5000), None);
}
