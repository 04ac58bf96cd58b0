//! Round s50a, outside tests of the retry layer against docs/guides/retry.md, the README's
//! error section and the rustdoc of `sturdy_retry::RetryLayer`, on paused time against
//! in-process services: hostile `Retry-After` values on 429, 503 and other statuses, setters at
//! their extremes (attempts, deadline, attempt timeout, budgets, jitter), the POST rule, a call
//! dropped mid-sleep, and the layer under `Buffer`, `ConcurrencyLimit(1)` and `Timeout`.
#![cfg(feature = "full")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use sturdy::core::classify::delivery;
use sturdy::core::{find, BoxError, CallOptions, Delivery, Error as SturdyError, RateLimited};
use sturdy::retry::{Backoff, RetryLayer};
use tokio::time::Instant;
use tower::util::BoxCloneSyncService;
use tower::{service_fn, Layer, Service, ServiceBuilder, ServiceExt};

const URL: &str = "http://api.example.com/orders";

type Req = Request<Full<Bytes>>;
type Res = Response<()>;
type Api = BoxCloneSyncService<Req, Res, BoxError>;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// One answer of the scripted API.
#[derive(Clone, Debug)]
enum A {
    /// A status with these `Retry-After` header values (any number, in order).
    S(u16, Vec<&'static str>),
    /// A connect error (never sent).
    Refused,
    /// Never answers.
    Hang,
}

fn st(code: u16) -> A {
    A::S(code, vec![])
}

fn ra(code: u16, v: &'static str) -> A {
    A::S(code, vec![v])
}

/// What the API saw: when, and the idempotency key.
type Seen = Arc<Mutex<Vec<(Instant, Option<String>)>>>;

/// An API answering from a script (the last answer repeats).
fn api(script: Vec<A>) -> (Api, Seen) {
    let seen: Seen = Arc::default();
    let s2 = seen.clone();
    let svc = service_fn(move |req: Req| {
        let n = {
            let mut s = s2.lock().unwrap();
            s.push((
                Instant::now(),
                req.headers()
                    .get("idempotency-key")
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
            ));
            s.len() - 1
        };
        let a = script[n.min(script.len() - 1)].clone();
        async move {
            match a {
                A::S(code, vals) => {
                    let mut b = Response::builder().status(code);
                    for v in vals {
                        b = b.header("retry-after", v);
                    }
                    Ok(b.body(()).unwrap())
                }
                A::Refused => Err::<Res, BoxError>(Box::new(std::io::Error::from(
                    std::io::ErrorKind::ConnectionRefused,
                ))),
                A::Hang => std::future::pending().await,
            }
        }
    });
    (BoxCloneSyncService::new(svc), seen)
}

fn get() -> Req {
    Request::get(URL).body(Full::default()).unwrap()
}

fn post() -> Req {
    Request::post(URL).body(Full::from("{}")).unwrap()
}

fn post_keyed(key: &'static str) -> Req {
    Request::post(URL)
        .header("idempotency-key", key)
        .body(Full::from("{}"))
        .unwrap()
}

async fn run(layer: &RetryLayer, svc: Api, req: Req) -> (Result<Res, BoxError>, Duration) {
    let t0 = Instant::now();
    let r = layer.layer(svc).oneshot(req).await;
    (r, t0.elapsed())
}

fn gaps(seen: &Seen) -> Vec<Duration> {
    let s = seen.lock().unwrap();
    s.windows(2).map(|w| w[1].0 - w[0].0).collect()
}

fn rate_limited(err: &BoxError) -> Duration {
    find::<RateLimited>(&**err)
        .unwrap_or_else(|| panic!("no RateLimited in the chain: {err:?} / {err}"))
        .retry_after()
}

// ---------------------------------------------------------------------------------------------
// Retry-After: hostile values
// ---------------------------------------------------------------------------------------------

/// "One longer than 60 s ... is not slept: on a 429 or a 503 the call fails at once with a
/// `RateLimited { retry_after }`"; "The wait that error reports is the server's, capped at
/// MAX_REPORTED_WAIT (5 min)"; "a value too large for a Duration saturates".
#[tokio::test(start_paused = true)]
async fn huge_retry_after_values_fail_at_once_with_a_capped_wait() {
    for code in [429u16, 503] {
        for v in [
            "999999999999999999999999999999",
            "18446744073709551616",
            "61",
            "3600",
            "Fri, 31 Dec 9999 23:59:59 GMT",
        ] {
            let (svc, seen) = api(vec![ra(code, v), st(200)]);
            let (r, took) = run(&RetryLayer::new().with_seed(7), svc, get()).await;
            let err = r.expect_err(&format!("{code} Retry-After {v}: expected RateLimited"));
            assert_eq!(took, Duration::ZERO, "{code} {v}: slept {took:?}");
            assert_eq!(seen.lock().unwrap().len(), 1, "{code} {v}");
            let wait = rate_limited(&err);
            assert!(wait > secs(60), "{code} {v}: {wait:?}");
            assert!(
                wait <= secs(300),
                "{code} {v}: reported {wait:?} past 5 min"
            );
            if v.len() > 10 {
                let msg = err.to_string();
                assert!(msg.contains("retry after 5m"), "{code} {v}: {msg}");
            }
        }
    }
}

/// "never sooner than asked, plus up to 20 % ... (20 % of the wait, or of the backoff's base of
/// 250 ms when the wait is shorter: a `Retry-After: 0` is followed within 50 ms). A date already
/// past ... asks for no wait at all, so the retry follows just as soon, not after the backoff."
#[tokio::test(start_paused = true)]
async fn small_and_past_retry_after_values_are_followed_within_their_window() {
    let cases: [(&str, Duration, Duration); 7] = [
        ("0", ms(0), ms(50)),
        ("00000000000000000000000000000", ms(0), ms(50)),
        ("Thu, 01 Jan 1970 00:00:00 GMT", ms(0), ms(50)),
        ("Sun, 06 Nov 1994 08:49:37 GMT", ms(0), ms(50)),
        ("1", secs(1), ms(1200)),
        (" 2 ", secs(2), ms(2400)),
        ("60", secs(60), secs(72)),
    ];
    for code in [429u16, 503] {
        for (v, lo, hi) in cases {
            for seed in 0..4 {
                let (svc, seen) = api(vec![ra(code, v), st(200)]);
                let (r, _) = run(&RetryLayer::new().with_seed(seed), svc, get()).await;
                assert_eq!(r.unwrap().status(), 200, "{code} {v}");
                let g = gaps(&seen)[0];
                assert!(g >= lo && g <= hi, "{code} Retry-After {v:?}: waited {g:?}");
            }
        }
    }
}

/// Unparseable values (negative, signed, fractional, garbage) are ignored: the backoff applies,
/// first sleep in `[250 ms, 750 ms]`.
#[tokio::test(start_paused = true)]
async fn unparseable_retry_after_values_fall_back_to_the_backoff() {
    for code in [429u16, 503] {
        for v in [
            "-1",
            "+1",
            "1.5",
            "garbage",
            "1e3",
            "",
            "Fri, 32 Foo 2024",
            "0x10",
        ] {
            let (svc, seen) = api(vec![ra(code, v), st(200)]);
            let (r, _) = run(&RetryLayer::new().with_seed(3), svc, get()).await;
            assert_eq!(r.unwrap().status(), 200, "{code} {v:?}");
            let g = gaps(&seen)[0];
            assert!(g >= ms(250) && g <= ms(750), "{code} {v:?}: waited {g:?}");
        }
    }
}

/// "A `Retry-After` ... on a 429, a 503 or an in-flight 409 overrides the backoff": on the other
/// retried statuses it does not, so a huge one neither fails the call nor is slept.
#[tokio::test(start_paused = true)]
async fn retry_after_on_other_retried_statuses_does_not_override_the_backoff() {
    for code in [408u16, 425, 500, 502, 504] {
        for v in ["3600", "Fri, 31 Dec 9999 23:59:59 GMT", "0"] {
            let (svc, seen) = api(vec![ra(code, v), st(200)]);
            let (r, _) = run(&RetryLayer::new().with_seed(11), svc, get()).await;
            let res = r.unwrap_or_else(|e| panic!("{code} {v}: {e}"));
            assert_eq!(res.status(), 200, "{code} {v}");
            let g = gaps(&seen)[0];
            assert!(g >= ms(250) && g <= ms(750), "{code} {v}: waited {g:?}");
        }
    }
}

/// `RetryAfter::from_headers`: "Reads the first `Retry-After` header of a response; an
/// unparseable value is ignored".
#[tokio::test(start_paused = true)]
async fn repeated_retry_after_headers_are_read_by_the_first() {
    // First 3600: not slept, RateLimited.
    let (svc, _) = api(vec![A::S(429, vec!["3600", "1"]), st(200)]);
    let (r, took) = run(&RetryLayer::new(), svc, get()).await;
    assert_eq!(rate_limited(&r.unwrap_err()), secs(300).min(secs(3600)));
    assert_eq!(took, Duration::ZERO);
    // First 1: slept about 1 s.
    let (svc, seen) = api(vec![A::S(503, vec!["1", "3600"]), st(200)]);
    let (r, _) = run(&RetryLayer::new(), svc, get()).await;
    assert_eq!(r.unwrap().status(), 200);
    let g = gaps(&seen)[0];
    assert!(g >= secs(1) && g <= ms(1200), "{g:?}");
}

/// "or past the deadline ... is not slept: on a 429 or a 503 the call fails at once".
#[tokio::test(start_paused = true)]
async fn a_retry_after_past_the_deadline_fails_at_once() {
    for code in [429u16, 503] {
        let (svc, seen) = api(vec![ra(code, "10"), st(200)]);
        let layer = RetryLayer::new().with_deadline(secs(5));
        let (r, took) = run(&layer, svc, get()).await;
        let err = r.unwrap_err();
        assert_eq!(rate_limited(&err), secs(10), "{err}");
        assert_eq!(took, Duration::ZERO);
        assert_eq!(seen.lock().unwrap().len(), 1);
    }
}

/// "with no attempt left ... or on a call that is not retried (a POST without a key ...) is not
/// slept: on a 429 or a 503 the call fails at once with a RateLimited".
#[tokio::test(start_paused = true)]
async fn a_retry_after_with_no_retry_possible_fails_at_once_as_rate_limited() {
    for code in [429u16, 503] {
        let (svc, seen) = api(vec![ra(code, "2"), st(200)]);
        let (r, took) = run(&RetryLayer::new().with_max_attempts(1), svc, get()).await;
        assert_eq!(rate_limited(&r.unwrap_err()), secs(2));
        assert_eq!((took, seen.lock().unwrap().len()), (Duration::ZERO, 1));

        let (svc, seen) = api(vec![ra(code, "2"), st(200)]);
        let (r, took) = run(&RetryLayer::new(), svc, post()).await;
        let err = r.unwrap_err();
        assert_eq!(rate_limited(&err), secs(2), "{err}");
        assert_eq!((took, seen.lock().unwrap().len()), (Duration::ZERO, 1));

        // A blank key is no key.
        let (svc, seen) = api(vec![ra(code, "2"), st(200)]);
        let (r, _) = run(&RetryLayer::new(), svc, post_keyed(" \t ")).await;
        assert_eq!(rate_limited(&r.unwrap_err()), secs(2));
        assert_eq!(seen.lock().unwrap().len(), 1);
    }
}

/// "Extra random wait added to a Retry-After, as a fraction of it [0.2]; clamped to 0..=1."
/// A NaN or infinite fraction must not panic and must stay inside the clamp.
#[tokio::test(start_paused = true)]
async fn retry_after_jitter_fraction_extremes_are_clamped() {
    for (f, hi) in [
        (f64::NAN, ms(2000)),
        (f64::INFINITY, ms(2000)),
        (f64::NEG_INFINITY, ms(1000)),
        (-5.0, ms(1000)),
        (1e300, ms(2000)),
    ] {
        let (svc, seen) = api(vec![ra(503, "1"), st(200)]);
        let layer = RetryLayer::new().with_seed(5).with_retry_after_jitter(f);
        let (r, _) = run(&layer, svc, get()).await;
        assert_eq!(r.unwrap().status(), 200, "fraction {f}");
        let g = gaps(&seen)[0];
        assert!(g >= secs(1) && g <= hi, "fraction {f}: waited {g:?}");
    }
}

/// `with_max_retry_after(Duration::MAX)` with a saturated `Retry-After`: no panic, no overflow;
/// the call either sleeps or fails, but nothing panics.
#[tokio::test(start_paused = true)]
async fn max_retry_after_at_duration_max_does_not_panic() {
    let (svc, _) = api(vec![ra(429, "999999999999999999999999999999"), st(200)]);
    let layer = RetryLayer::new()
        .with_max_retry_after(Duration::MAX)
        .with_deadline(secs(10));
    let (r, took) = run(&layer, svc, get()).await;
    // Past the deadline: fails at once.
    assert!(find::<RateLimited>(&*r.unwrap_err()).is_some());
    assert_eq!(took, Duration::ZERO);
}

// ---------------------------------------------------------------------------------------------
// Settings at their extremes
// ---------------------------------------------------------------------------------------------

/// "Attempts: .with_max_attempts(n) [4] (0 is taken as 1)."
#[tokio::test(start_paused = true)]
async fn zero_attempts_is_one_and_the_default_is_four() {
    let (svc, seen) = api(vec![st(503)]);
    let (r, _) = run(&RetryLayer::new().with_max_attempts(0), svc, get()).await;
    assert_eq!(r.unwrap().status(), 503);
    assert_eq!(seen.lock().unwrap().len(), 1);

    let (svc, seen) = api(vec![st(503)]);
    let (r, _) = run(&RetryLayer::new(), svc, get()).await;
    assert_eq!(r.unwrap().status(), 503);
    assert_eq!(seen.lock().unwrap().len(), 4);

    // Per request: CallOptions::with_max_attempts(0) is one attempt too.
    let (svc, seen) = api(vec![st(503)]);
    let mut req = get();
    req.extensions_mut()
        .insert(CallOptions::new().with_max_attempts(0));
    let (r, _) = run(&RetryLayer::new(), svc, req).await;
    assert_eq!(r.unwrap().status(), 503);
    assert_eq!(seen.lock().unwrap().len(), 1);
}

/// `u32::MAX` attempts under a deadline: bounded by the deadline, no busy loop.
#[tokio::test(start_paused = true)]
async fn unbounded_attempts_end_at_the_deadline() {
    let (svc, seen) = api(vec![A::Refused]);
    let layer = RetryLayer::new()
        .with_max_attempts(u32::MAX)
        .without_budget()
        .with_deadline(secs(30));
    let (r, took) = run(&layer, svc, get()).await;
    let err = r.unwrap_err();
    assert!(took <= secs(30), "{took:?}");
    let n = seen.lock().unwrap().len();
    // Sleeps of at least the base (250 ms): at most 121 attempts in 30 s.
    assert!(n > 4 && n <= 121, "{n} attempts");
    let e = find::<SturdyError>(&*err).expect("a sturdy Error");
    assert_eq!(e.report().unwrap().attempts() as usize, n, "{e}");
    assert_eq!(delivery(&*err), Delivery::NotSent, "{e}");
}

/// Deadline and attempt timeout at `Duration::MAX`: no overflow panic, the call proceeds.
#[tokio::test(start_paused = true)]
async fn duration_max_deadline_and_attempt_timeout_do_not_overflow() {
    let layers = [
        RetryLayer::new().with_seed(1).with_deadline(Duration::MAX),
        RetryLayer::new()
            .with_seed(1)
            .with_attempt_timeout(Duration::MAX),
        RetryLayer::new()
            .with_seed(1)
            .with_deadline(Duration::MAX)
            .with_attempt_timeout(Duration::MAX),
        RetryLayer::new()
            .with_seed(1)
            .with_backoff(Backoff::decorrelated_jitter(Duration::MAX, Duration::MAX).unwrap()),
    ];
    for (i, layer) in layers.iter().enumerate() {
        let (svc, seen) = api(vec![st(503), ra(503, "1"), st(200)]);
        let layer = if i == 3 {
            layer.clone().with_max_attempts(1)
        } else {
            layer.clone()
        };
        let (r, _) = run(&layer, svc, get()).await;
        let status = r.unwrap().status();
        if i == 3 {
            assert_eq!(status, 503);
        } else {
            assert_eq!(status, 200, "layer {i}");
            assert_eq!(seen.lock().unwrap().len(), 3);
        }
    }
    // Per request: CallOptions with Duration::MAX.
    let (svc, _) = api(vec![st(503), st(200)]);
    let mut req = get();
    req.extensions_mut().insert(
        CallOptions::new()
            .with_deadline(Duration::MAX)
            .with_attempt_timeout(Duration::MAX),
    );
    let (r, _) = run(&RetryLayer::new().with_seed(1), svc, req).await;
    assert_eq!(r.unwrap().status(), 200);
}

/// `Backoff::delay` at extremes: "without overflow"; the draw never passes the cap.
#[test]
fn backoff_delay_at_extremes_does_not_overflow() {
    let big = Duration::MAX;
    for b in [
        Backoff::decorrelated_jitter(ms(1), big).unwrap(),
        Backoff::decorrelated_jitter(big, big).unwrap(),
        Backoff::exponential(ms(1), big).unwrap(),
        Backoff::full_jitter(ms(1), big).unwrap(),
        Backoff::exponential(big, big).unwrap(),
    ] {
        for retry in [0u32, 1, 2, 63, 64, 65, 1000, u32::MAX] {
            for prev in [None, Some(Duration::ZERO), Some(big / 2), Some(big)] {
                for rnd in [0u64, 1, u64::MAX / 2, u64::MAX] {
                    let d = b.delay(retry, prev, rnd);
                    assert!(d <= big);
                }
            }
        }
    }
    assert!(Backoff::decorrelated_jitter(Duration::ZERO, secs(1)).is_err());
    assert!(Backoff::decorrelated_jitter(secs(2), secs(1)).is_err());
}

/// A zero deadline or zero attempt timeout: no panic, no busy loop, the call ends at once with
/// a truthful error.
#[tokio::test(start_paused = true)]
async fn zero_deadline_and_zero_attempt_timeout_end_at_once() {
    for layer in [
        RetryLayer::new().with_deadline(Duration::ZERO),
        RetryLayer::new().with_attempt_timeout(Duration::ZERO),
    ] {
        let (svc, seen) = api(vec![A::Hang]);
        let (r, took) = run(&layer, svc, get()).await;
        // Four attempts cut at once and three backoff sleeps at most (0.75 + 2.25 + 6.75 s).
        assert!(took <= secs(10), "{took:?}");
        let err = r.unwrap_err();
        assert!(
            seen.lock().unwrap().len() <= 4,
            "{}",
            seen.lock().unwrap().len()
        );
        let _ = find::<SturdyError>(&*err).expect("a sturdy Error");
    }
}

/// "validated when you call it: ttl 1 s to 60 s, percent 0.0 to 1000.0", "min_per_sec is
/// i32::MAX or more".
#[test]
fn budget_parameters_are_validated() {
    assert!(RetryLayer::new().with_budget(ms(999), 10, 0.2).is_err());
    assert!(RetryLayer::new().with_budget(ms(60_001), 10, 0.2).is_err());
    assert!(RetryLayer::new().with_budget(secs(1), 10, -0.1).is_err());
    assert!(RetryLayer::new().with_budget(secs(1), 10, 1000.1).is_err());
    assert!(RetryLayer::new()
        .with_budget(secs(1), 10, f32::NAN)
        .is_err());
    assert!(RetryLayer::new()
        .with_budget(secs(1), 10, f32::INFINITY)
        .is_err());
    assert!(RetryLayer::new()
        .with_budget(secs(1), i32::MAX as u32, 0.2)
        .is_err());
    assert!(RetryLayer::new()
        .with_budget(secs(1), u32::MAX, 0.2)
        .is_err());
    assert!(RetryLayer::new().with_budget(secs(1), 0, 0.0).is_ok());
    assert!(RetryLayer::new().with_budget(secs(60), 10, 1000.0).is_ok());
}

/// A budget of nothing (no reserve, no percent) allows no retry; the 503 is returned as it is.
#[tokio::test(start_paused = true)]
async fn an_empty_budget_allows_no_retry() {
    let layer = RetryLayer::new().with_budget(secs(1), 0, 0.0).unwrap();
    let (svc, seen) = api(vec![st(503)]);
    let (r, _) = run(&layer, svc, get()).await;
    assert_eq!(r.unwrap().status(), 503);
    assert_eq!(seen.lock().unwrap().len(), 1);
    // A 503 with Retry-After on a spent budget: "a spent retry budget ... is not slept: ...
    // RateLimited".
    let (svc, seen) = api(vec![ra(503, "1")]);
    let (r, took) = run(&layer, svc, get()).await;
    assert_eq!(rate_limited(&r.unwrap_err()), secs(1));
    assert_eq!((took, seen.lock().unwrap().len()), (Duration::ZERO, 1));
}

/// Huge budget parameters (just under the validated bound, smallest percent, longest ttl) do not
/// overflow when used.
#[tokio::test(start_paused = true)]
async fn a_huge_budget_does_not_overflow() {
    for pct in [0.0f32, 0.000_001, 0.2, 1000.0] {
        let layer = RetryLayer::new()
            .with_seed(2)
            .with_budget(secs(60), i32::MAX as u32 - 1, pct)
            .unwrap();
        for _ in 0..3 {
            let (svc, seen) = api(vec![st(503), st(503), st(200)]);
            let (r, _) = run(&layer, svc, get()).await;
            assert_eq!(r.unwrap().status(), 200, "percent {pct}");
            assert_eq!(seen.lock().unwrap().len(), 3);
        }
        tokio::time::advance(secs(3600 * 24 * 365)).await;
        let (svc, _) = api(vec![st(503), st(200)]);
        let (r, _) = run(&layer, svc, get()).await;
        assert_eq!(r.unwrap().status(), 200);
    }
}

// ---------------------------------------------------------------------------------------------
// The POST rule and the report
// ---------------------------------------------------------------------------------------------

/// A keyed POST is retried with the same key on every attempt; the final error carries it and
/// says "may have been processed: retry with the same idempotency key <key>".
#[tokio::test(start_paused = true)]
async fn a_keyed_post_is_retried_with_its_key_and_the_error_names_it() {
    let (svc, seen) = api(vec![A::Hang]);
    let layer = RetryLayer::new().with_seed(9).with_attempt_timeout(ms(100));
    let (r, _) = run(&layer, svc, post_keyed("k-123")).await;
    let err = r.unwrap_err();
    let s = seen.lock().unwrap().clone();
    assert_eq!(s.len(), 4);
    assert!(s.iter().all(|(_, k)| k.as_deref() == Some("k-123")));
    let e = find::<SturdyError>(&*err).unwrap();
    let rep = e.report().expect("a report");
    assert_eq!(rep.attempts(), 4);
    assert_eq!(rep.delivery(), Delivery::MaybeProcessed);
    assert_eq!(rep.idempotency_key(), Some("k-123"));
    let msg = err.to_string();
    assert!(msg.contains("gave up after 4 attempts"), "{msg}");
    assert!(msg.contains("timed out after 100ms"), "{msg}");
    assert!(
        msg.contains("retry with the same idempotency key k-123"),
        "{msg}"
    );
    assert!(!msg.contains("not sent"), "{msg}");
}

/// An unkeyed POST whose attempt timed out (the server may have it) is not retried; one refused
/// before connecting is.
#[tokio::test(start_paused = true)]
async fn an_unkeyed_post_is_retried_only_when_never_sent() {
    let (svc, seen) = api(vec![A::Hang]);
    let layer = RetryLayer::new().with_attempt_timeout(ms(100));
    let (r, _) = run(&layer, svc, post()).await;
    let err = r.unwrap_err();
    assert_eq!(seen.lock().unwrap().len(), 1);
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed);
    let msg = err.to_string();
    assert!(msg.contains("may have been processed"), "{msg}");

    let (svc, seen) = api(vec![A::Refused]);
    let (r, _) = run(&RetryLayer::new().with_seed(4), svc, post()).await;
    let err = r.unwrap_err();
    assert_eq!(seen.lock().unwrap().len(), 4);
    assert_eq!(delivery(&*err), Delivery::NotSent);
    let msg = err.to_string();
    assert!(msg.contains("connection refused"), "{msg}");
    assert!(
        msg.contains("the request was not sent, so it is safe to send again"),
        "{msg}"
    );
    let e = find::<SturdyError>(&*err).unwrap();
    assert_eq!(e.report().unwrap().attempts(), 4, "{msg}");

    // Refused, then a timeout: the later attempt may have been processed.
    let (svc, seen) = api(vec![A::Refused, A::Hang]);
    let (r, _) = run(&layer, svc, post()).await;
    let err = r.unwrap_err();
    assert_eq!(seen.lock().unwrap().len(), 2);
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed, "{err}");
    assert!(!err.to_string().contains("not sent"), "{err}");

    // Timeout (no key, GET: retried), then refused: an earlier attempt may have been processed.
    let (svc, _) = api(vec![A::Hang, A::Refused]);
    let (r, _) = run(&layer.clone().with_max_attempts(2), svc, get()).await;
    let err = r.unwrap_err();
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed, "{err}");
}

// ---------------------------------------------------------------------------------------------
// Cancellation
// ---------------------------------------------------------------------------------------------

/// A call dropped during its backoff sleep sends nothing more; one dropped during an attempt
/// drops that attempt's future.
#[tokio::test(start_paused = true)]
async fn a_dropped_call_sends_nothing_more() {
    let (svc, seen) = api(vec![st(503)]);
    let call = tokio::spawn(RetryLayer::new().layer(svc).oneshot(get()));
    tokio::time::sleep(ms(100)).await; // inside the first sleep (>= 250 ms)
    assert_eq!(seen.lock().unwrap().len(), 1);
    call.abort();
    let _ = call.await;
    tokio::time::sleep(secs(120)).await;
    assert_eq!(seen.lock().unwrap().len(), 1);

    // During an attempt: the attempt's future is dropped.
    let live = Arc::new(AtomicUsize::new(0));
    struct Guard(Arc<AtomicUsize>);
    impl Drop for Guard {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let l2 = live.clone();
    let svc = service_fn(move |_req: Req| {
        l2.fetch_add(1, Ordering::SeqCst);
        let g = Guard(l2.clone());
        async move {
            let _g = g;
            std::future::pending::<Result<Res, BoxError>>().await
        }
    });
    let call = tokio::spawn(
        RetryLayer::new()
            .with_deadline(secs(60))
            .layer(svc)
            .oneshot(get()),
    );
    tokio::time::sleep(ms(10)).await;
    assert_eq!(live.load(Ordering::SeqCst), 1);
    call.abort();
    let _ = call.await;
    assert_eq!(live.load(Ordering::SeqCst), 0);
}

// ---------------------------------------------------------------------------------------------
// Composition
// ---------------------------------------------------------------------------------------------

/// "It works over ConcurrencyLimit, GlobalConcurrencyLimit and Buffer, driven by oneshot or by a
/// kept service"; also under tower's `Timeout`, and from clones on many tasks.
#[tokio::test(start_paused = true)]
async fn under_buffer_concurrency_limit_and_timeout_a_kept_service_retries() {
    let (inner, seen) = api(vec![st(503), st(200)]);
    let svc = ServiceBuilder::new()
        .buffer(8)
        .timeout(secs(30))
        .layer(RetryLayer::new().with_seed(1))
        .concurrency_limit(1)
        .service(inner);
    let mut kept = svc.clone();
    let res = kept.ready().await.unwrap().call(get()).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(seen.lock().unwrap().len(), 2);

    let mut tasks = Vec::new();
    for _ in 0..6 {
        let mut c = svc.clone();
        tasks.push(tokio::spawn(
            async move { c.ready().await?.call(get()).await },
        ));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap().status(), 200);
    }

    // A Timeout outside that fires mid-sleep ends the call: nothing more is sent.
    let (inner, seen) = api(vec![st(503)]);
    let mut svc = ServiceBuilder::new()
        .timeout(ms(100))
        .layer(RetryLayer::new())
        .service(inner);
    let r = svc.ready().await.unwrap().call(get()).await;
    assert!(r.is_err());
    tokio::time::sleep(secs(60)).await;
    assert_eq!(seen.lock().unwrap().len(), 1);
}

#[test]
fn the_retry_service_and_client_are_clone_send_sync() {
    fn check<T: Clone + Send + Sync + 'static>(_: &T) {}
    let (svc, _) = api(vec![st(200)]);
    check(&RetryLayer::new());
    check(&RetryLayer::new().layer(svc.clone()));
    check(&sturdy::ClientBuilder::new().build(svc));
}
