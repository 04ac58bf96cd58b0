//! Round s70, an outsider's tests of retries (`sturdy-retry`, through the facade `sturdy`):
//! `Retry-After` values a peer controls (delay-seconds and every HTTP-date form, the public
//! vectors of /work/shared/vectors/STANDARDS.md §6), the decorrelated-jitter backoff, the retry
//! budget against tower's `TpsBudget` arithmetic, settings at their edges (NaN, infinities),
//! body replay, events, cancellation under `Buffer` + `ConcurrencyLimit(1)`, and the wire.
//! Timing runs on paused time against in-process services; the wire runs in real time on
//! 127.0.0.1 port 0.
#![cfg(feature = "full")]

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use sturdy::core::events::{Event, RetryStop};
use sturdy::core::headers::{parse_http_date, RetryAfter};
use sturdy::core::trace::DelaySource;
use sturdy::core::{find, BoxError, CallOptions, Delivery, Error as SturdyError, RateLimited};
use sturdy::core::{SystemClock, WallClock};
use sturdy::retry::{Backoff, RetryLayer};
use tokio::time::Instant;
use tower::retry::budget::{Budget, TpsBudget};
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// A seeded random source (splitmix64): `rand` is not a dependency of the root package.
struct Rng(u64);

impl Rng {
    fn seed_from_u64(seed: u64) -> Self {
        Self(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

fn at(unix: u64) -> SystemTime {
    UNIX_EPOCH + secs(unix)
}

/// The retry layer's final error, as a `sturdy::core::Error`.
fn sturdy_err(err: &BoxError) -> &SturdyError {
    err.downcast_ref::<SturdyError>()
        .unwrap_or_else(|| panic!("not a sturdy error: {err:?}"))
}

/// A wall clock stuck at one time.
#[derive(Debug)]
struct Fixed(SystemTime);

impl WallClock for Fixed {
    fn now(&self) -> SystemTime {
        self.0
    }
}

// ===== an in-process API that records every attempt =====

/// One attempt as the API saw it: when, which method, the body bytes and its trailers.
#[derive(Clone, Debug)]
struct Seen {
    when: Instant,
    body: Bytes,
    trailers: Option<HeaderMap>,
}

type Script = Arc<dyn Fn(usize) -> Response<Full<Bytes>> + Send + Sync>;

/// An API that answers attempt `n` (0-based) with `script(n)`, after reading the whole body.
#[derive(Clone)]
struct Api {
    seen: Arc<Mutex<Vec<Seen>>>,
    script: Script,
}

impl Api {
    fn new(script: impl Fn(usize) -> Response<Full<Bytes>> + Send + Sync + 'static) -> Self {
        Self {
            seen: Arc::new(Mutex::new(Vec::new())),
            script: Arc::new(script),
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    fn times(&self) -> Vec<Instant> {
        self.seen().into_iter().map(|s| s.when).collect()
    }
}

impl<B> Service<Request<B>> for Api
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: std::fmt::Debug,
{
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let seen = self.seen.clone();
        let script = self.script.clone();
        let when = Instant::now();
        Box::pin(async move {
            let (body, trailers) = match req.into_body().collect().await {
                Ok(c) => {
                    let t = c.trailers().cloned();
                    (c.to_bytes(), t)
                }
                Err(_) => (Bytes::new(), None),
            };
            let n = {
                let mut g = seen.lock().unwrap();
                g.push(Seen {
                    when,
                    body,
                    trailers,
                });
                g.len() - 1
            };
            Ok(script(n))
        })
    }
}

fn resp(status: u16, retry_after: Option<&[u8]>) -> Response<Full<Bytes>> {
    let mut r = Response::builder()
        .status(status)
        .body(Full::new(Bytes::new()))
        .unwrap();
    if let Some(v) = retry_after {
        r.headers_mut()
            .insert("retry-after", HeaderValue::from_bytes(v).unwrap());
    }
    r
}

fn get(url: &str) -> Request<Full<Bytes>> {
    Request::get(url).body(Full::new(Bytes::new())).unwrap()
}

/// What the layer's `on_event` callback saw.
#[derive(Clone, Debug, PartialEq)]
enum Ev {
    Scheduled {
        host: String,
        attempt: u32,
        delay: Duration,
        source: DelaySource,
    },
    Stopped {
        attempt: u32,
        stop: String,
    },
}

fn recorder() -> (
    Arc<Mutex<Vec<Ev>>>,
    impl Fn(&Event<'_>) + Send + Sync + 'static,
) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let l = log.clone();
    let f = move |e: &Event<'_>| match e {
        Event::RetryScheduled {
            host,
            attempt,
            delay,
            source,
            ..
        } => l.lock().unwrap().push(Ev::Scheduled {
            host: host.to_string(),
            attempt: *attempt,
            delay: *delay,
            source: *source,
        }),
        Event::RetryStopped { attempt, stop, .. } => l.lock().unwrap().push(Ev::Stopped {
            attempt: *attempt,
            stop: format!("{stop:?}"),
        }),
        _ => {}
    };
    (log, f)
}

// ===== Retry-After: the parser against the public vectors =====

/// STANDARDS.md §6 (RFC 9110 §5.6.7): "For rfc850 two-digit years, a date that 'appears to be
/// more than 50 years in the future' is read as the most recent past year with the same two
/// last digits". In December 2026, `70` is 2070 (43 years ahead) and `99` is 1999 (2099 would
/// be 72 years ahead).
#[test]
fn s70_rfc850_two_digit_years_follow_the_fifty_year_rule() {
    // 2070-01-01T00:00:00Z and 2075-01-01T00:00:00Z.
    let y2070 = at(3_155_760_000);
    let y2075 = at(3_313_526_400);
    let got = parse_http_date(b"Wednesday, 01-Jan-70 00:00:00 GMT", "retry-after").unwrap();
    assert_eq!(got, y2070, "`70` in an RFC 850 date, read in 2026");
    let got = parse_http_date(b"Tuesday, 01-Jan-75 00:00:00 GMT", "retry-after").unwrap();
    assert_eq!(got, y2075, "`75` in an RFC 850 date, read in 2026");
}

#[test]
fn s70_rfc850_two_digit_years_in_the_past_stay_in_the_past() {
    // 1999-01-01T00:00:00Z, 2019-06-03T11:30:12Z, 1994-11-06T08:49:37Z.
    let got = parse_http_date(b"Friday, 01-Jan-99 00:00:00 GMT", "retry-after").unwrap();
    assert_eq!(got, at(915_148_800));
    let got = parse_http_date(b"Monday, 03-Jun-19 11:30:12 GMT", "retry-after").unwrap();
    assert_eq!(got, at(1_559_561_412));
    let got = parse_http_date(b"Sunday, 06-Nov-94 08:49:37 GMT", "retry-after").unwrap();
    assert_eq!(got, at(784_111_777));
}

/// STANDARDS.md §6.1, urllib3's `parse_retry_after` vectors and its sleep vectors against
/// `now = 2019-06-03T11:00:00Z`.
#[test]
fn s70_urllib3_retry_after_vectors() {
    for (v, want) in [("0", 0), ("1000", 1000), ("\t42 ", 42)] {
        let got = RetryAfter::parse(v.as_bytes()).unwrap_or_else(|e| panic!("{v:?}: {e}"));
        assert_eq!(got, RetryAfter::Delay(secs(want)), "{v:?}");
    }
    for v in [&b"-1"[..], b"+1", b"1.0", "\u{b2}".as_bytes(), b"\xb2"] {
        assert!(RetryAfter::parse(v).is_err(), "{v:?} must be refused");
    }
    let now = at(1_559_559_600);
    for (v, want) in [
        ("3600", 3600),
        ("Mon, 3 Jun 2019 12:00:00 UTC", 3600),
        ("Mon, 3 Jun 2019 11:00:00 UTC", 0),
        ("Mon, 03 Jun 2019 11:30:12 GMT", 1812),
        ("Monday, 03-Jun-19 11:30:12 GMT", 1812),
        ("Mon Jun  3 11:30:12 2019", 1812),
    ] {
        let got = RetryAfter::parse(v.as_bytes()).unwrap_or_else(|e| panic!("{v:?}: {e}"));
        assert_eq!(got.delay_from(now), secs(want), "{v:?}");
    }
}

/// delay-seconds is `1*DIGIT`: leading zeros do not make a number large. 64 KiB of zeros and a
/// final `1` is one second, not a saturated "forever".
#[test]
fn s70_leading_zeros_do_not_make_a_large_delay() {
    let mut v = vec![b'0'; 64 * 1024];
    v.push(b'1');
    assert_eq!(RetryAfter::parse(&v).unwrap(), RetryAfter::Delay(secs(1)));
    let mut v = vec![b'0'; 64 * 1024];
    v.extend_from_slice(b"18446744073709551615");
    assert_eq!(
        RetryAfter::parse(&v).unwrap(),
        RetryAfter::Delay(secs(u64::MAX))
    );
    assert_eq!(
        RetryAfter::parse(b"000").unwrap(),
        RetryAfter::Delay(Duration::ZERO)
    );
}

/// The module docs list what the date reader tolerates: `UTC`, `Z` or `+0000` in place of
/// `GMT`. Another offset is not in that list; read as GMT, it would be an hour off.
#[test]
fn s70_a_date_with_another_offset_is_not_read_as_gmt() {
    let gmt = at(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT
    for z in ["GMT", "UTC", "Z", "+0000"] {
        let v = format!("Sun, 06 Nov 1994 08:49:37 {z}");
        assert_eq!(
            parse_http_date(v.as_bytes(), "retry-after").unwrap(),
            gmt,
            "{v}"
        );
    }
    for z in ["+0100", "-0500", "PST", "CET"] {
        let v = format!("Sun, 06 Nov 1994 08:49:37 {z}");
        if let Ok(t) = parse_http_date(v.as_bytes(), "retry-after") {
            assert_ne!(t, gmt, "{v} read as if it were GMT");
        }
    }
}

// ===== Retry-After through the layer =====

/// 64 KiB of leading zeros then `1` on a 503: slept one second (plus up to 20 %), not a
/// `RateLimited` "retry after 5m".
#[tokio::test(start_paused = true)]
async fn s70_a_one_second_retry_after_padded_with_zeros_is_slept() {
    let mut v = vec![b'0'; 64 * 1024];
    v.push(b'1');
    let api = Api::new(move |n| {
        if n == 0 {
            resp(503, Some(&v))
        } else {
            resp(200, None)
        }
    });
    let svc = RetryLayer::new().with_seed(7).layer(api.clone());
    let res = tokio::time::timeout(secs(30), svc.oneshot(get("http://api.example.com/")))
        .await
        .expect("bounded")
        .expect("answered");
    assert_eq!(res.status(), StatusCode::OK);
    let t = api.times();
    let gap = t[1] - t[0];
    assert!(gap >= secs(1) && gap <= ms(1201), "slept {gap:?}");
}

/// `with_retry_after_jitter`: "clamped to 0..=1". NaN is not a fraction; whatever it is read as,
/// the sleep stays within [wait, 2 × wait] and nothing panics.
#[tokio::test(start_paused = true)]
async fn s70_retry_after_jitter_nan_and_infinities_do_not_panic() {
    for j in [
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
        -0.0,
        f64::MIN_POSITIVE,
    ] {
        let api = Api::new(|n| {
            if n == 0 {
                resp(503, Some(b"2"))
            } else {
                resp(200, None)
            }
        });
        let svc = RetryLayer::new()
            .with_seed(3)
            .with_retry_after_jitter(j)
            .layer(api.clone());
        let fut = tokio::spawn(svc.oneshot(get("http://api.example.com/")));
        let res = tokio::time::timeout(secs(30), fut)
            .await
            .expect("bounded")
            .unwrap_or_else(|e| panic!("jitter {j}: the call panicked: {e}"))
            .expect("answered");
        assert_eq!(res.status(), StatusCode::OK);
        let t = api.times();
        let gap = t[1] - t[0];
        assert!(
            gap >= secs(2) && gap <= secs(4),
            "jitter {j}: slept {gap:?}"
        );
    }
}

/// "A date already past ... asks for no wait at all, so the retry follows just as soon":
/// within the 50 ms a `Retry-After: 0` is spread over, and the event names the server's wait.
#[tokio::test(start_paused = true)]
async fn s70_a_past_date_is_followed_within_fifty_ms() {
    let clock = Arc::new(Fixed(at(1_559_559_600))); // 2019-06-03T11:00:00Z
    for v in [
        &b"Mon, 03 Jun 2019 10:59:59 GMT"[..],
        b"Thu, 01 Jan 1970 00:00:00 GMT",
        b"Sunday, 06-Nov-94 08:49:37 GMT",
        b"Sun Nov  6 08:49:37 1994",
    ] {
        let vv = v.to_vec();
        let api = Api::new(move |n| {
            if n == 0 {
                resp(429, Some(&vv))
            } else {
                resp(200, None)
            }
        });
        let (log, f) = recorder();
        let svc = RetryLayer::new()
            .with_seed(11)
            .with_clock(clock.clone())
            .on_event(f)
            .layer(api.clone());
        let res = tokio::time::timeout(secs(30), svc.oneshot(get("http://api.example.com/")))
            .await
            .expect("bounded")
            .expect("answered");
        assert_eq!(res.status(), StatusCode::OK);
        let t = api.times();
        let gap = t[1] - t[0];
        let v = String::from_utf8_lossy(v);
        assert!(gap <= ms(51), "{v}: slept {gap:?}");
        let log = log.lock().unwrap().clone();
        match &log[..] {
            [Ev::Scheduled { delay, source, .. }] => {
                assert!(*delay <= ms(50), "{v}: {delay:?}");
                assert_eq!(*source, DelaySource::RetryAfter, "{v}");
            }
            other => panic!("{v}: events {other:?}"),
        }
    }
}

/// A 2070 date written the RFC 850 way: 43 years away, so not slept: the call ends as
/// `RateLimited` (the wait capped at 5 min), not retried at once as if the date were past.
#[tokio::test(start_paused = true)]
async fn s70_an_rfc850_date_decades_ahead_is_not_read_as_past() {
    let clock = Arc::new(SystemClock);
    let api = Api::new(|_| resp(503, Some(b"Wednesday, 01-Jan-70 00:00:00 GMT")));
    let svc = RetryLayer::new()
        .with_seed(1)
        .with_clock(clock)
        .layer(api.clone());
    let err = tokio::time::timeout(secs(30), svc.oneshot(get("http://api.example.com/")))
        .await
        .expect("bounded")
        .expect_err("a 43-year wait is not slept");
    let rl = find::<RateLimited>(&*err).expect("RateLimited in the chain");
    assert_eq!(rl.retry_after(), sturdy::retry::MAX_REPORTED_WAIT);
    assert_eq!(api.count(), 1);
}

// ===== the backoff =====

/// "The smallest sleep" (base) and "The largest sleep" (cap): every draw, whatever previous
/// sleep it is given (a `Retry-After` sleep may have been shorter than the base), and whatever
/// the random number.
#[test]
fn s70_decorrelated_jitter_stays_within_base_and_cap_for_any_previous_sleep() {
    let base = ms(250);
    let cap = secs(20);
    let b = Backoff::decorrelated_jitter(base, cap).unwrap();
    let mut rng = Rng::seed_from_u64(70);
    let prevs = [
        None,
        Some(Duration::ZERO),
        Some(Duration::from_nanos(1)),
        Some(ms(10)),
        Some(ms(83)),
        Some(ms(84)),
        Some(base),
        Some(cap),
        Some(secs(3600)),
        Some(Duration::MAX),
    ];
    for prev in prevs {
        let mut randoms = vec![0, 1, u64::MAX / 2, u64::MAX - 1, u64::MAX];
        randoms.extend((0..200).map(|_| rng.next_u64()));
        for r in randoms {
            for retry in [1, 2, 3, 10, u32::MAX] {
                let d = std::panic::catch_unwind(|| b.delay(retry, prev, r))
                    .unwrap_or_else(|_| panic!("delay({retry}, {prev:?}, {r}) panicked"));
                assert!(
                    d >= base && d <= cap,
                    "delay({retry}, {prev:?}, {r}) = {d:?}"
                );
            }
        }
    }
}

/// `Backoff`'s variants are public: one built by hand with a zero base or a base above its cap
/// ("All three are capped") must not panic the call, nor sleep past its cap.
#[test]
fn s70_hand_built_backoffs_never_panic_and_stay_capped() {
    let odd = [
        (Duration::ZERO, Duration::ZERO),
        (Duration::ZERO, secs(1)),
        (secs(10), secs(1)),
        (Duration::MAX, Duration::MAX),
        (Duration::MAX, secs(1)),
        (Duration::from_nanos(1), Duration::MAX),
    ];
    for (base, cap) in odd {
        for b in [
            Backoff::DecorrelatedJitter { base, cap },
            Backoff::Exponential { base, cap },
            Backoff::FullJitter { base, cap },
        ] {
            for prev in [None, Some(Duration::ZERO), Some(cap), Some(Duration::MAX)] {
                for r in [0, 1, u64::MAX / 3, u64::MAX] {
                    for retry in [0, 1, 2, 64, 65, u32::MAX] {
                        let d = std::panic::catch_unwind(|| b.delay(retry, prev, r))
                            .unwrap_or_else(|_| {
                                panic!("{b:?}.delay({retry}, {prev:?}, {r}) panicked")
                            });
                        assert!(d <= cap, "{b:?}.delay({retry}, {prev:?}, {r}) = {d:?}");
                    }
                }
            }
        }
    }
}

/// After a short `Retry-After` sleep (a `Retry-After: 0` is followed within 50 ms), the next
/// backoff sleep is still a decorrelated-jitter draw: at least the base, at most the cap and at
/// most 3 × the previous backoff sleep when that was one.
#[tokio::test(start_paused = true)]
async fn s70_a_backoff_after_a_short_retry_after_is_never_below_the_base() {
    for seed in 0..40u64 {
        let api = Api::new(|n| match n {
            0 | 3 => resp(503, Some(b"0")),
            1 | 2 | 4 | 5 => resp(503, None),
            _ => resp(200, None),
        });
        let (log, f) = recorder();
        let svc = RetryLayer::new()
            .with_seed(seed)
            .with_max_attempts(8)
            .without_budget()
            .on_event(f)
            .layer(api.clone());
        let res = tokio::time::timeout(secs(300), svc.oneshot(get("http://api.example.com/")))
            .await
            .expect("bounded")
            .expect("answered");
        assert_eq!(res.status(), StatusCode::OK, "seed {seed}");
        let t = api.times();
        assert_eq!(t.len(), 7, "seed {seed}");
        let log = log.lock().unwrap().clone();
        let mut prev_backoff: Option<Duration> = None;
        for (i, e) in log.iter().enumerate() {
            let Ev::Scheduled {
                attempt,
                delay,
                source,
                ..
            } = e
            else {
                panic!("seed {seed}: {e:?}");
            };
            assert_eq!(*attempt as usize, i + 1, "seed {seed}");
            let gap = t[i + 1] - t[i];
            assert!(
                gap >= *delay && gap <= *delay + ms(1),
                "seed {seed}: the event said {delay:?}, the layer slept {gap:?}"
            );
            match i {
                0 | 3 => {
                    assert_eq!(*source, DelaySource::RetryAfter, "seed {seed} #{i}");
                    assert!(*delay <= ms(50), "seed {seed} #{i}: {delay:?}");
                }
                _ => {
                    assert_eq!(*source, DelaySource::Backoff, "seed {seed} #{i}");
                    assert!(
                        *delay >= ms(250) && *delay <= secs(20),
                        "seed {seed} #{i}: backoff sleep {delay:?} after {log:?}"
                    );
                    if let Some(p) = prev_backoff {
                        if i == 2 || i == 5 {
                            assert!(*delay <= p * 3, "seed {seed} #{i}: {delay:?} after {p:?}");
                        }
                    }
                    prev_backoff = Some(*delay);
                }
            }
        }
    }
}

// ===== the budget: tower's TpsBudget arithmetic =====

/// "with tower's `TpsBudget` arithmetic (a reserve of `min_per_sec × ttl` retries plus
/// `percent` of the calls made in the last `ttl`)": `k` calls that fail once each (one attempt
/// allowed), then one call allowed thousands of attempts against an API that always fails. The
/// retries it gets must be what tower's `TpsBudget` allows after `k + 1` deposits.
#[tokio::test(start_paused = true)]
async fn s70_the_budget_allows_what_towers_tps_budget_allows() {
    let cases: &[(Duration, u32, f32, usize)] = &[
        (secs(10), 10, 0.2, 0),
        (secs(10), 10, 0.2, 37),
        (secs(1), 1, 0.3, 20),
        (secs(1), 0, 0.7, 20),
        (secs(2), 0, 1.0, 13),
        (secs(1), 0, 1.5, 9),
        (secs(1), 0, 3.3, 10),
        (secs(1), 2, 0.0, 50),
        (ms(1900), 3, 0.25, 4),
        (secs(60), 0, 0.01, 150),
        (secs(1), 0, 0.001, 999),
    ];
    for &(ttl, min_per_sec, percent, k) in cases {
        let tower_budget = TpsBudget::new(ttl, min_per_sec, percent);
        for _ in 0..=k {
            tower_budget.deposit();
        }
        let mut want = 0usize;
        while tower_budget.withdraw() {
            want += 1;
            assert!(want < 5000, "case too large");
        }

        let api = Api::new(|_| resp(503, None));
        let layer = RetryLayer::new()
            .with_seed(5)
            .with_backoff(Backoff::exponential(ms(1), ms(1)).unwrap())
            .with_budget(ttl, min_per_sec, percent)
            .unwrap()
            .with_max_attempts(6000);
        let svc = layer.layer(api.clone());
        for _ in 0..k {
            let mut req = get("http://api.example.com/");
            req.extensions_mut()
                .insert(CallOptions::new().with_max_attempts(1));
            let res = svc.clone().oneshot(req).await.unwrap();
            assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        }
        assert_eq!(api.count(), k);
        let res = tokio::time::timeout(
            secs(100),
            svc.clone().oneshot(get("http://api.example.com/")),
        )
        .await
        .expect("bounded")
        .unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        let got = api.count() - k - 1;
        assert_eq!(
            got, want,
            "ttl {ttl:?}, min_per_sec {min_per_sec}, percent {percent}, {k} calls before: \
             sturdy allowed {got} retries, tower's TpsBudget {want}"
        );
    }
}

/// "validated when you call it: ... `percent` 0.0 to 1000.0": NaN and infinities are not in
/// that range, and must be refused there (not read as "unlimited retries").
#[test]
fn s70_budget_percent_nan_and_infinity_are_refused() {
    for p in [
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        -f32::MIN_POSITIVE,
        1000.001,
    ] {
        let r = RetryLayer::new().with_budget(secs(10), 10, p);
        assert!(r.is_err(), "percent {p} accepted");
    }
    for p in [0.0, -0.0, f32::MIN_POSITIVE, 1000.0] {
        assert!(
            RetryLayer::new().with_budget(secs(10), 10, p).is_ok(),
            "percent {p} refused"
        );
    }
}

// ===== events =====

/// Four 503s: three `RetryScheduled` (tries 1 to 3, from the backoff) and one `RetryStopped`
/// (try 4, attempts exhausted); the host carries no user info; each event's delay is the sleep.
#[tokio::test(start_paused = true)]
async fn s70_events_name_each_retry_and_the_stop() {
    let api = Api::new(|_| resp(503, None));
    let (log, f) = recorder();
    let svc = RetryLayer::new()
        .with_seed(9)
        .on_event(f)
        .layer(api.clone());
    let res = tokio::time::timeout(
        secs(300),
        svc.oneshot(get(
            "http://user:hunter2@api.example.com:8443/x?api_key=s3cret",
        )),
    )
    .await
    .expect("bounded")
    .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    let t = api.times();
    assert_eq!(t.len(), 4);
    let log = log.lock().unwrap().clone();
    assert_eq!(log.len(), 4, "{log:?}");
    for (i, e) in log.iter().take(3).enumerate() {
        match e {
            Ev::Scheduled {
                host,
                attempt,
                delay,
                source,
            } => {
                assert_eq!(host, "api.example.com:8443");
                assert_eq!(*attempt as usize, i + 1);
                assert_eq!(*source, DelaySource::Backoff);
                let gap = t[i + 1] - t[i];
                assert!(
                    gap >= *delay && gap <= *delay + ms(1),
                    "{delay:?} vs {gap:?}"
                );
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        log[3],
        Ev::Stopped {
            attempt: 4,
            stop: format!("{:?}", RetryStop::AttemptsExhausted)
        }
    );
}

// ===== bodies =====

/// A request body with trailers and an exact size hint.
struct WithTrailers {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl From<Bytes> for WithTrailers {
    fn from(b: Bytes) -> Self {
        Self {
            data: Some(b),
            trailers: None,
        }
    }
}

impl Body for WithTrailers {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let me = self.get_mut();
        if let Some(d) = me.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        Poll::Ready(me.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

/// "Attempts are rebuilt from those bytes, which cannot carry trailers: a buffered body that ends
/// with trailers is refused with a `Body` error before it is sent (not sent without them); to
/// keep them, send it with `CallOptions::without_retries()`". (Found by this round: the trailers
/// were dropped silently, on the first attempt too.)
#[tokio::test(start_paused = true)]
async fn s70_request_trailers_are_never_dropped_silently() {
    let api = Api::new(|n| {
        if n == 0 {
            resp(503, None)
        } else {
            resp(200, None)
        }
    });
    let svc = RetryLayer::new().with_seed(1).layer(api.clone());
    let req = || {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-checksum", HeaderValue::from_static("abc123"));
        Request::put("http://api.example.com/blob")
            .body(WithTrailers {
                data: Some(Bytes::from_static(b"payload")),
                trailers: Some(trailers),
            })
            .unwrap()
    };
    let err = tokio::time::timeout(secs(30), svc.clone().oneshot(req()))
        .await
        .expect("bounded")
        .unwrap_err();
    assert_eq!(
        sturdy::core::classify::delivery(&*err),
        sturdy::core::Delivery::NotSent
    );
    assert!(err.to_string().contains("trailers"), "{err}");
    assert!(api.seen().is_empty(), "nothing sent without its trailers");
    // Retries off: sent once, as built, trailers and all.
    let mut once = req();
    once.extensions_mut()
        .insert(CallOptions::new().without_retries());
    let res = tokio::time::timeout(secs(30), svc.oneshot(once))
        .await
        .expect("bounded")
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    let seen = api.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body, "payload");
    let t = seen[0]
        .trailers
        .as_ref()
        .map(|t| t.get("x-checksum").cloned());
    assert_eq!(t, Some(Some(HeaderValue::from_static("abc123"))));
}

/// A body with no size hint's exactness but an upper bound within the limit ("a body whose size
/// hint proves it fits the limit is buffered"), and an empty body under a limit of 0, are
/// replayed byte for byte.
#[tokio::test(start_paused = true)]
async fn s70_bodies_proven_to_fit_are_replayed_byte_for_byte() {
    struct Bounded(Option<Bytes>);
    impl From<Bytes> for Bounded {
        fn from(b: Bytes) -> Self {
            Self(Some(b))
        }
    }
    impl Body for Bounded {
        type Data = Bytes;
        type Error = Infallible;
        fn poll_frame(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            Poll::Ready(self.get_mut().0.take().map(|b| Ok(Frame::data(b))))
        }
        fn size_hint(&self) -> SizeHint {
            let mut h = SizeHint::new();
            h.set_upper(100);
            h
        }
    }
    let payload: Bytes = (0..=255u8).cycle().take(100).collect::<Vec<u8>>().into();
    let api = Api::new(|n| {
        if n < 2 {
            resp(502, None)
        } else {
            resp(200, None)
        }
    });
    let svc = RetryLayer::new()
        .with_seed(2)
        .with_body_limit(100)
        .layer(api.clone());
    let req = Request::put("http://api.example.com/")
        .body(Bounded(Some(payload.clone())))
        .unwrap();
    let res = tokio::time::timeout(secs(30), svc.oneshot(req))
        .await
        .expect("bounded")
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let seen = api.seen();
    assert_eq!(seen.len(), 3);
    assert!(seen.iter().all(|s| s.body == payload));

    let api = Api::new(|n| {
        if n < 3 {
            resp(503, None)
        } else {
            resp(200, None)
        }
    });
    let svc = RetryLayer::new()
        .with_seed(2)
        .with_body_limit(0)
        .layer(api.clone());
    let res = tokio::time::timeout(secs(60), svc.oneshot(get("http://api.example.com/")))
        .await
        .expect("bounded")
        .unwrap();
    assert_eq!(
        res.status(),
        StatusCode::OK,
        "an empty body fits a limit of 0"
    );
    assert_eq!(api.count(), 4);
}

// ===== cancellation under Buffer + ConcurrencyLimit(1) =====

/// A kept client `Buffer(ConcurrencyLimit(1, Retry(api)))`-style stack (retry above the limit,
/// under a buffer), driven by `ready().await?.call(req)`: calls dropped at seeded points (during
/// an attempt, during a backoff) send nothing after the drop, and the next call goes through.
#[tokio::test(start_paused = true)]
async fn s70_calls_dropped_at_seeded_points_send_nothing_more_and_leave_the_limit_free() {
    let mut rng = Rng::seed_from_u64(0x570);
    let slow = Arc::new(AtomicUsize::new(0));
    let s = slow.clone();
    // Each attempt takes 100 ms; 503 for the first two attempts of every call, then 200.
    let seen = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let sn = seen.clone();
    let inner = tower::service_fn(move |_req: Request<Full<Bytes>>| {
        let n = s.fetch_add(1, Ordering::SeqCst);
        let sn = sn.clone();
        async move {
            sn.lock().unwrap().push(Instant::now());
            tokio::time::sleep(ms(100)).await;
            let status = if n % 3 == 2 { 200 } else { 503 };
            Ok::<_, Infallible>(resp(status, None))
        }
    });
    let mut client = ServiceBuilder::new()
        .buffer(8)
        .layer(RetryLayer::new().with_seed(4).without_budget())
        .concurrency_limit(1)
        .service(inner);
    for round in 0..30 {
        slow.store(0, Ordering::SeqCst);
        seen.lock().unwrap().clear();
        let drop_after = ms(rng.below(2000));
        let fut = client
            .ready()
            .await
            .unwrap()
            .call(get("http://api.example.com/"));
        let r = tokio::time::timeout(drop_after, fut).await;
        let dropped_at = Instant::now();
        if r.is_ok() {
            continue;
        }
        let before = seen.lock().unwrap().len();
        tokio::time::sleep(secs(30)).await;
        let after: Vec<Instant> = seen.lock().unwrap().clone();
        assert_eq!(
            after.len(),
            before,
            "round {round}: dropped at {drop_after:?}, attempts sent after: {:?}",
            after.iter().map(|t| *t - dropped_at).collect::<Vec<_>>()
        );
        // The limit is free: a fresh call through the same kept client ends.
        slow.store(2, Ordering::SeqCst);
        let res = tokio::time::timeout(
            secs(5),
            client
                .ready()
                .await
                .unwrap()
                .call(get("http://api.example.com/")),
        )
        .await
        .unwrap_or_else(|_| panic!("round {round}: the next call hung"))
        .unwrap();
        assert_eq!(res.status(), StatusCode::OK, "round {round}");
    }
}

// ===== over the wire =====

/// A server on 127.0.0.1:0 that reads each request whole, counts it, then resets the
/// connection (the response is lost).
async fn resetting_server() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let h = h.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(n) = s.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map_or(0, |v| v.trim().parse().unwrap_or(0));
                        if buf.len() >= end + 4 + len {
                            break;
                        }
                    }
                }
                h.fetch_add(1, Ordering::SeqCst);
                let _ = s.set_zero_linger();
                drop(s);
            });
        }
    });
    (addr, hits)
}

/// A POST with a key whose every response is lost after the server read it: 4 attempts, the
/// error says it may have been processed and names the key to retry with; without a key: one
/// attempt, never called "not sent" nor "safe to send again".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s70_wire_lost_responses_are_reported_as_maybe_processed() {
    let (addr, hits) = resetting_server().await;
    let hyper = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let svc = ServiceBuilder::new()
        .layer(
            RetryLayer::new()
                .with_seed(1)
                .with_backoff(Backoff::exponential(ms(5), ms(5)).unwrap()),
        )
        .service(hyper);
    let url = format!("http://{addr}/orders");

    let req = Request::post(&url)
        .header("idempotency-key", "order-70")
        .body(Full::from("{\"n\":1}"))
        .unwrap();
    let err = tokio::time::timeout(secs(10), svc.clone().oneshot(req))
        .await
        .expect("bounded")
        .expect_err("every response lost");
    let e = sturdy_err(&err);
    assert_eq!(hits.load(Ordering::SeqCst), 4, "{e}");
    let report = e.report().expect("a report");
    assert_eq!(report.attempts(), 4);
    assert_eq!(report.delivery(), Delivery::MaybeProcessed);
    assert_eq!(report.idempotency_key(), Some("order-70"));
    let msg = e.to_string();
    assert!(msg.contains("gave up after 4 attempts"), "{msg}");
    assert!(msg.contains("may have been processed"), "{msg}");
    assert!(msg.contains("order-70"), "{msg}");

    hits.store(0, Ordering::SeqCst);
    let req = Request::post(&url).body(Full::from("{\"n\":2}")).unwrap();
    let err = tokio::time::timeout(secs(10), svc.oneshot(req))
        .await
        .expect("bounded")
        .expect_err("the response lost");
    let e = sturdy_err(&err);
    assert_eq!(hits.load(Ordering::SeqCst), 1, "{e}");
    assert_eq!(
        sturdy::core::classify::delivery(&*err),
        Delivery::MaybeProcessed
    );
    let msg = e.to_string();
    assert!(!msg.contains("not sent"), "{msg}");
    assert!(!msg.contains("safe to send again"), "{msg}");
    assert!(msg.contains("may have been processed"), "{msg}");
    let _ = Method::POST;
}

// ===== batch 2 =====

/// "a parsed date reads back the same" (RELIABILITY.md, fuzzing): a date that does not exist
/// (30 February, 31 April, hour 24, minute 60, day 0) is not silently moved to another day.
#[test]
fn s70_impossible_dates_are_refused_or_read_back_the_same() {
    for v in [
        "Sun, 30 Feb 2025 00:00:00 GMT",
        "Sat, 29 Feb 2025 00:00:00 GMT",
        "Thu, 31 Apr 2026 00:00:00 GMT",
        "Mon, 00 Jan 2026 00:00:00 GMT",
        "Mon, 32 Jan 2026 00:00:00 GMT",
        "Mon, 05 Jan 2026 24:00:00 GMT",
        "Mon, 05 Jan 2026 23:60:00 GMT",
        "Mon, 05 Jan 2026 23:59:61 GMT",
        "Mon, 05 Jan 2026 99:99:99 GMT",
        "Sunday, 30-Feb-25 00:00:00 GMT",
        "Sun Feb 30 00:00:00 2025",
    ] {
        if let Ok(t) = parse_http_date(v.as_bytes(), "retry-after") {
            let back = sturdy::core::headers::format_http_date(t);
            panic!("{v:?} was read as {back:?}");
        }
    }
    // A leap second reads as the second before it; 29 February of a leap year exists.
    assert_eq!(
        parse_http_date(b"Wed, 31 Dec 2025 23:59:60 GMT", "retry-after").unwrap(),
        at(1_767_225_599)
    );
    assert_eq!(
        parse_http_date(b"Thu, 29 Feb 2024 00:00:00 GMT", "retry-after").unwrap(),
        at(1_709_164_800)
    );
}

/// The budget's key is the host as `sturdy_core::ByHost` keys it: "in lower case", and "The port
/// is part of the key as written (`api.example.com` and `api.example.com:443` are two keys)".
/// A reserve of one retry (ttl 1 s, 1 per second, 0 %) spent on `https://api.example.com/` leaves
/// none for `https://API.example.com/`, while `:443` written out is a budget of its own.
#[tokio::test(start_paused = true)]
async fn s70_the_budget_key_is_the_host_in_lower_case_with_its_port_as_written() {
    let api = Api::new(|_| resp(503, None));
    let svc = RetryLayer::new()
        .with_seed(1)
        .with_backoff(Backoff::exponential(ms(1), ms(1)).unwrap())
        .with_budget(secs(1), 1, 0.0)
        .unwrap()
        .layer(api.clone());
    let res = svc
        .clone()
        .oneshot(get("https://api.example.com/"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(api.count(), 2, "the reserve's one retry");
    let _ = svc
        .clone()
        .oneshot(get("https://API.example.com/"))
        .await
        .unwrap();
    assert_eq!(api.count(), 3, "the budget is spent for api.example.com");
    let _ = svc
        .clone()
        .oneshot(get("https://api.example.com:443/"))
        .await
        .unwrap();
    assert_eq!(api.count(), 5, "api.example.com:443 is a key of its own");
}

/// `RetryStopped` says why for each reason the docs list: the server's wait too long, a POST
/// without a key, a body not kept, a deadline, a spent budget.
#[tokio::test(start_paused = true)]
async fn s70_retry_stopped_names_each_reason() {
    async fn run(
        layer: RetryLayer,
        req: Request<Full<Bytes>>,
        status: u16,
        ra: Option<&'static [u8]>,
    ) -> Vec<Ev> {
        let api = Api::new(move |_| resp(status, ra));
        let (log, f) = recorder();
        let svc = layer.on_event(f).layer(api);
        let _ = tokio::time::timeout(secs(600), svc.oneshot(req))
            .await
            .expect("bounded");
        let v = log.lock().unwrap().clone();
        v
    }
    let stop = |s: RetryStop| format!("{s:?}");
    let ev = run(
        RetryLayer::new().with_seed(1),
        get("http://a.example/"),
        503,
        Some(b"61"),
    )
    .await;
    assert_eq!(
        ev,
        [Ev::Stopped {
            attempt: 1,
            stop: stop(RetryStop::WaitTooLong)
        }]
    );
    let post = Request::post("http://a.example/")
        .body(Full::from("x"))
        .unwrap();
    let ev = run(RetryLayer::new().with_seed(1), post, 503, None).await;
    assert_eq!(
        ev,
        [Ev::Stopped {
            attempt: 1,
            stop: stop(RetryStop::NotIdempotent)
        }]
    );
    let big = Request::put("http://a.example/")
        .body(Full::from(vec![7u8; 11]))
        .unwrap();
    let ev = run(
        RetryLayer::new().with_seed(1).with_body_limit(10),
        big,
        503,
        None,
    )
    .await;
    assert_eq!(
        ev,
        [Ev::Stopped {
            attempt: 1,
            stop: stop(RetryStop::NotReplayable)
        }]
    );
    let ev = run(
        RetryLayer::new().with_seed(1).with_deadline(ms(200)),
        get("http://a.example/"),
        503,
        None,
    )
    .await;
    assert_eq!(
        ev,
        [Ev::Stopped {
            attempt: 1,
            stop: stop(RetryStop::PastDeadline)
        }],
        "the first backoff sleep is at least 250 ms"
    );
    let ev = run(
        RetryLayer::new()
            .with_seed(1)
            .with_budget(secs(1), 0, 0.0)
            .unwrap(),
        get("http://a.example/"),
        503,
        None,
    )
    .await;
    assert_eq!(
        ev,
        [Ev::Stopped {
            attempt: 1,
            stop: stop(RetryStop::BudgetExhausted)
        }]
    );
}

/// "on a call that is not retried ... on a 429 or a 503 the call fails at once with a
/// `RateLimited { retry_after }`": a request's own `without_retries()` is such a call.
#[tokio::test(start_paused = true)]
async fn s70_without_retries_a_503_with_retry_after_is_rate_limited() {
    let api = Api::new(|_| resp(503, Some(b"5")));
    let svc = RetryLayer::new().with_seed(1).layer(api.clone());
    let mut req = get("http://api.example.com/");
    req.extensions_mut()
        .insert(CallOptions::new().without_retries());
    let err = svc.oneshot(req).await.expect_err("told to wait");
    let rl = find::<RateLimited>(&*err).expect("RateLimited");
    assert_eq!(rl.retry_after(), secs(5));
    assert_eq!(api.count(), 1);
    let e = sturdy_err(&err);
    assert_eq!(e.report().map(|r| r.attempts()), Some(1));
}

/// `with_max_retry_after(0)`: a `Retry-After: 0` is not longer than that, so it is slept (within
/// 50 ms); `Retry-After: 1` is longer and fails at once, reporting the server's 1 s.
#[tokio::test(start_paused = true)]
async fn s70_max_retry_after_zero_still_follows_a_zero_wait() {
    let api = Api::new(|n| {
        if n == 0 {
            resp(503, Some(b"0"))
        } else {
            resp(200, None)
        }
    });
    let svc = RetryLayer::new()
        .with_seed(1)
        .with_max_retry_after(Duration::ZERO)
        .layer(api.clone());
    let res = svc.oneshot(get("http://api.example.com/")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let t = api.times();
    assert!(t[1] - t[0] <= ms(50));

    let api = Api::new(|_| resp(429, Some(b"1")));
    let svc = RetryLayer::new()
        .with_seed(1)
        .with_max_retry_after(Duration::ZERO)
        .layer(api.clone());
    let err = svc
        .oneshot(get("http://api.example.com/"))
        .await
        .expect_err("1 s is longer than 0");
    assert_eq!(find::<RateLimited>(&*err).unwrap().retry_after(), secs(1));
    assert_eq!(api.count(), 1);
}

/// Junk a peer can put in `Retry-After` on a 503 (non-UTF-8, signs, fractions, exponents, hex,
/// full-width digits, two values folded into one line): ignored, so the backoff decides (at least
/// 250 ms, at most 750 ms for the first retry), never a panic nor an immediate retry.
#[tokio::test(start_paused = true)]
async fn s70_junk_retry_after_values_fall_back_to_the_first_backoff_draw() {
    let junk: &[&[u8]] = &[
        b"\xff\xfe",
        b"+5",
        b"-5",
        b"1.5",
        b"1e3",
        b"0x10",
        "\u{ff15}".as_bytes(),
        b"5, 10",
        b"5 5",
        b"Mon, 01 Jan 0001 00:00:00 GMT",
        b"Wed, 31 Dec 1969 23:59:59 GMT",
        b"Sat, 01 Jan 10000 00:00:00 GMT",
        b"tomorrow",
    ];
    for v in junk {
        let vv = v.to_vec();
        let api = Api::new(move |n| {
            if n == 0 {
                resp(503, Some(&vv))
            } else {
                resp(200, None)
            }
        });
        let svc = RetryLayer::new().with_seed(21).layer(api.clone());
        let res = tokio::time::timeout(secs(30), svc.oneshot(get("http://api.example.com/")))
            .await
            .expect("bounded");
        let shown = String::from_utf8_lossy(v);
        let res = res.unwrap_or_else(|e| panic!("{shown:?}: {e}"));
        assert_eq!(res.status(), StatusCode::OK, "{shown:?}");
        let t = api.times();
        let gap = t[1] - t[0];
        assert!(gap >= ms(250) && gap <= ms(751), "{shown:?}: slept {gap:?}");
    }
}

/// "plus up to 20 % so clients do not return in lock-step": 50 callers told `Retry-After: 1` at
/// the same instant come back within [1 s, 1.2 s], and not together.
#[tokio::test(start_paused = true)]
async fn s70_callers_told_the_same_wait_do_not_return_in_lock_step() {
    let api = Api::new(|n| {
        if n < 50 {
            resp(503, Some(b"1"))
        } else {
            resp(200, None)
        }
    });
    let svc = RetryLayer::new().with_seed(70).layer(api.clone());
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..50 {
        tasks.push(tokio::spawn(
            svc.clone().oneshot(get("http://api.example.com/")),
        ));
    }
    for t in tasks {
        let res = tokio::time::timeout(secs(30), t)
            .await
            .expect("bounded")
            .unwrap()
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
    let times = api.times();
    assert_eq!(times.len(), 100);
    let mut back: Vec<Duration> = times[50..].iter().map(|t| *t - start).collect();
    assert!(
        back.iter().all(|d| *d >= secs(1) && *d <= ms(1201)),
        "{back:?}"
    );
    back.sort();
    back.dedup();
    assert!(
        back.len() >= 40,
        "only {} distinct return times",
        back.len()
    );
}

/// "20 % of the wait, or of the backoff's base ... when the wait is shorter": with a backoff
/// whose base is 2 s, a `Retry-After: 1` is slept 1 s plus up to 400 ms, and the spread does use
/// that room.
#[tokio::test(start_paused = true)]
async fn s70_retry_after_jitter_follows_a_custom_backoff_base() {
    let mut longest = Duration::ZERO;
    for seed in 0..40 {
        let api = Api::new(|n| {
            if n == 0 {
                resp(429, Some(b"1"))
            } else {
                resp(200, None)
            }
        });
        let svc = RetryLayer::new()
            .with_seed(seed)
            .with_backoff(Backoff::decorrelated_jitter(secs(2), secs(20)).unwrap())
            .layer(api.clone());
        let res = tokio::time::timeout(secs(30), svc.oneshot(get("http://api.example.com/")))
            .await
            .expect("bounded")
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let t = api.times();
        let gap = t[1] - t[0];
        assert!(gap >= secs(1) && gap <= ms(1401), "seed {seed}: {gap:?}");
        longest = longest.max(gap);
    }
    assert!(longest > ms(1250), "the spread never passed {longest:?}");
}

/// Per request, on the layer alone: `CallOptions::with_attempt_timeout` replaces the layer's
/// attempt timeout, and `without_attempt_timeout` removes it ("A request's own attempt timeout
/// (`CallOptions`)").
#[tokio::test(start_paused = true)]
async fn s70_a_requests_attempt_timeout_overrides_the_layers() {
    let slow = tower::service_fn(|_req: Request<Full<Bytes>>| async {
        tokio::time::sleep(ms(500)).await;
        Ok::<_, Infallible>(resp(200, None))
    });
    let svc = RetryLayer::new()
        .with_seed(1)
        .with_attempt_timeout(ms(100))
        .with_max_attempts(2)
        .layer(slow);
    let err = svc
        .clone()
        .oneshot(get("http://api.example.com/"))
        .await
        .expect_err("cut at 100 ms per attempt");
    assert!(err.to_string().contains("timed out"), "{err}");
    let mut req = get("http://api.example.com/");
    req.extensions_mut()
        .insert(CallOptions::new().with_attempt_timeout(secs(1)));
    let res = svc.clone().oneshot(req).await.expect("1 s is enough");
    assert_eq!(res.status(), StatusCode::OK);
    let mut req = get("http://api.example.com/");
    req.extensions_mut()
        .insert(CallOptions::new().without_attempt_timeout());
    let res = svc.oneshot(req).await.expect("no timeout");
    assert_eq!(res.status(), StatusCode::OK);
}

/// poll_ready is the inner service's: pending while the mock is not ready, ready once it is; a
/// retry waits for the same service's readiness again (tower-test mock, tokio-test task).
#[tokio::test(start_paused = true)]
async fn s70_poll_ready_is_honest_and_a_retry_waits_for_readiness() {
    let (mock, mut handle) =
        tower_test::mock::pair::<Request<Full<Bytes>>, Response<Full<Bytes>>>();
    let mut svc = RetryLayer::new().with_seed(1).layer(mock);
    handle.allow(0);
    let mut ready = tokio_test::task::spawn(std::future::poll_fn(|cx| {
        Service::<Request<Full<Bytes>>>::poll_ready(&mut svc, cx)
    }));
    tokio_test::assert_pending!(ready.poll());
    handle.allow(1);
    assert!(ready.is_woken());
    tokio_test::assert_ready_ok!(ready.poll());
    drop(ready);
    let call = tokio::spawn(svc.call(get("http://api.example.com/")));
    let (_req, send) = tokio::time::timeout(secs(1), handle.next_request())
        .await
        .expect("the first attempt")
        .expect("a request");
    send.send_response(resp(503, None));
    // The backoff ends within 750 ms; the mock allows nothing, so no second request yet.
    tokio::time::sleep(secs(5)).await;
    assert!(
        tokio::time::timeout(ms(10), handle.next_request())
            .await
            .is_err(),
        "a retry was sent past a service that was not ready"
    );
    handle.allow(1);
    let (_req, send) = tokio::time::timeout(secs(1), handle.next_request())
        .await
        .expect("the retry once ready")
        .expect("a request");
    send.send_response(resp(200, None));
    let res = call.await.unwrap().unwrap();
    assert_eq!(res.status(), StatusCode::OK);
}

/// A 503 storm: 200 callers at once against an API that always fails, default budget: each
/// call deposits once, so tower's arithmetic allows (500 + 200) / 5 = 140 retries in all.
#[tokio::test(start_paused = true)]
async fn s70_a_storm_of_200_callers_gets_140_retries() {
    let api = Api::new(|_| resp(503, None));
    let svc = RetryLayer::new().with_seed(8).layer(api.clone());
    let mut tasks = Vec::new();
    for _ in 0..200 {
        tasks.push(tokio::spawn(
            svc.clone().oneshot(get("http://api.example.com/")),
        ));
    }
    for t in tasks {
        let res = tokio::time::timeout(secs(120), t)
            .await
            .expect("bounded")
            .unwrap()
            .unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
    assert_eq!(api.count(), 340);
}

/// RELIABILITY.md: "keys (hosts) remembered by ... retry budgets | 1,024 each; ... (retry
/// budgets are never forgotten: past 1,024 hosts, new hosts share one budget)". With a reserve
/// of 10 retries per budget: 1,024 hosts get one retry each and keep the rest of their own;
/// the 1,025th host spends the shared reserve, and the 1,026th finds it spent.
#[tokio::test(start_paused = true)]
async fn s70_past_1024_hosts_new_hosts_share_one_budget() {
    let api = Api::new(|_| resp(503, None));
    let svc = RetryLayer::new()
        .with_seed(1)
        .with_max_attempts(2)
        .with_backoff(Backoff::exponential(ms(1), ms(1)).unwrap())
        .with_budget(secs(10), 1, 0.0)
        .unwrap()
        .layer(api.clone());
    for h in 0..1024 {
        let _ = svc
            .clone()
            .oneshot(get(&format!("http://h{h}.example/")))
            .await
            .unwrap();
    }
    assert_eq!(api.count(), 2048, "each of 1,024 hosts retried once");
    for i in 0..10 {
        let before = api.count();
        let _ = svc
            .clone()
            .oneshot(get("http://x0.example/"))
            .await
            .unwrap();
        assert_eq!(api.count() - before, 2, "x0, call {i}: the shared reserve");
    }
    let before = api.count();
    let _ = svc
        .clone()
        .oneshot(get("http://x0.example/"))
        .await
        .unwrap();
    assert_eq!(api.count() - before, 1, "x0: the reserve is spent");
    let before = api.count();
    let _ = svc
        .clone()
        .oneshot(get("http://x1.example/"))
        .await
        .unwrap();
    assert_eq!(api.count() - before, 1, "x1 shares x0's budget");
    let before = api.count();
    let _ = svc
        .clone()
        .oneshot(get("http://h5.example/"))
        .await
        .unwrap();
    assert_eq!(api.count() - before, 2, "h5 keeps a budget of its own");
}

/// delay-seconds allows "optional white space around it": space and tab only (RFC 9110 OWS).
/// A no-break space, a form feed or a vertical tab is not white space there.
#[test]
fn s70_only_space_and_tab_are_white_space_around_delay_seconds() {
    for v in [&b" 7"[..], b"7 ", b"\t7\t", b" \t 7 \t "] {
        assert_eq!(
            RetryAfter::parse(v).unwrap(),
            RetryAfter::Delay(secs(7)),
            "{v:?}"
        );
    }
    for v in [
        &b"7\xa0"[..],
        "\u{a0}7".as_bytes(),
        b"\x0c7",
        b"7\x0b",
        b"7\r",
        b"7 8",
        b"",
    ] {
        assert!(RetryAfter::parse(v).is_err(), "{v:?} read as a delay");
    }
}

/// In `ClientBuilder`'s stack (an in-process API, paused time): a POST gets one key for every
/// attempt, a 503 on all four is returned as the response, and that response carries a
/// `CallReport` ("with a `CallReport` in its extensions when it is a 4xx or 5xx") naming the key
/// the server saw.
#[tokio::test(start_paused = true)]
async fn s70_client_builder_final_503_response_carries_the_report_and_key() {
    let keys = Arc::new(Mutex::new(Vec::<Option<String>>::new()));
    let k = keys.clone();
    let api = tower::service_fn(move |req: Request<Full<Bytes>>| {
        let key = req
            .headers()
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        k.lock().unwrap().push(key);
        async { Ok::<_, Infallible>(resp(503, None)) }
    });
    let client = sturdy::ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(3))
        .without_circuit_breaker()
        .build(api);
    let req = Request::post("http://api.example.com/orders")
        .body(Full::from("{}"))
        .unwrap();
    let res = tokio::time::timeout(secs(120), client.oneshot(req))
        .await
        .expect("bounded")
        .expect("a response");
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    let keys = keys.lock().unwrap().clone();
    assert_eq!(keys.len(), 4, "{keys:?}");
    let key = keys[0].clone().expect("a key");
    assert!(
        keys.iter().all(|k| k.as_deref() == Some(key.as_str())),
        "{keys:?}"
    );
    let report = res
        .extensions()
        .get::<sturdy::core::CallReport>()
        .expect("a CallReport on the final 503");
    assert_eq!(report.attempts(), 4);
    assert_eq!(report.delivery(), Delivery::MaybeProcessed);
    assert_eq!(report.idempotency_key(), Some(key.as_str()));
}

/// What a 127.0.0.1 server does with each TLS connection, before any TLS byte.
#[derive(Clone, Copy, Debug)]
enum Hs {
    /// Closes at once (FIN) after reading the ClientHello.
    Close,
    /// Resets at once after reading the ClientHello.
    Reset,
}

async fn handshake_breaker(act: Hs) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let c = conns.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            c.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = tokio::time::timeout(ms(500), s.read(&mut buf)).await;
                if let Hs::Reset = act {
                    let _ = s.set_zero_linger();
                }
                drop(s);
            });
        }
    });
    (addr, conns)
}

/// `classify`: "Other handshake failures (an alert, a connection closed mid-handshake) may pass
/// and stay `ErrorKind::Connect`" ("The connection could not be made; the request never left"):
/// a TLS handshake cut by the server is retried, even for a POST without a key, and the error
/// says the request was not sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s70_wire_a_handshake_cut_by_the_server_is_retried_and_not_sent() {
    for act in [Hs::Close, Hs::Reset] {
        let (addr, conns) = handshake_breaker(act).await;
        let svc = ServiceBuilder::new()
            .layer(
                RetryLayer::new()
                    .with_seed(1)
                    .with_backoff(Backoff::exponential(ms(5), ms(5)).unwrap()),
            )
            .service(sturdy::tls::https_client());
        let url = format!("https://127.0.0.1:{}/orders", addr.port());
        let err = tokio::time::timeout(secs(10), svc.clone().oneshot(get(&url)))
            .await
            .expect("bounded")
            .expect_err("no handshake");
        let e = sturdy_err(&err);
        assert_eq!(conns.load(Ordering::SeqCst), 4, "{act:?}: GET: {e}");
        assert_eq!(
            sturdy::core::classify::delivery(&*err),
            Delivery::NotSent,
            "{act:?}: {e}"
        );

        conns.store(0, Ordering::SeqCst);
        let req = Request::post(&url).body(Full::from("{}")).unwrap();
        let err = tokio::time::timeout(secs(10), svc.oneshot(req))
            .await
            .expect("bounded")
            .expect_err("no handshake");
        let e = sturdy_err(&err);
        let msg = e.to_string();
        assert_eq!(conns.load(Ordering::SeqCst), 4, "{act:?}: POST: {msg}");
        assert!(
            msg.contains("not sent") && msg.contains("safe to send again"),
            "{act:?}: {msg}"
        );
        assert!(!msg.contains("may have been processed"), "{act:?}: {msg}");
    }
}

/// The crate docs: "a deadline that ends while a layer below holds the attempt back, for a
/// rate-limit turn, a token or a concurrency place, says the attempt was never sent and what it
/// waited for, with `with_hold_marks` on, as `sturdy::ClientBuilder` sets it". A POST without a
/// key waiting for the only concurrency place of its host when its deadline ends: not sent,
/// safe to send again, and the message names the concurrency limit.
#[tokio::test(start_paused = true)]
async fn s70_client_builder_deadline_while_waiting_for_a_place_is_not_sent() {
    let sent = Arc::new(AtomicUsize::new(0));
    let s = sent.clone();
    let api = tower::service_fn(move |req: Request<Full<Bytes>>| {
        s.fetch_add(1, Ordering::SeqCst);
        let stall = req.uri().path() == "/stall";
        async move {
            if stall {
                std::future::pending::<()>().await;
            }
            Ok::<_, Infallible>(resp(200, None))
        }
    });
    let client = sturdy::ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(2))
        .with_adaptive_concurrency(
            sturdy::concurrency::AdaptiveConcurrencyLayer::new()
                .with_limits(1, 1)
                .with_initial_limit(1)
                .with_max_wait(secs(60)),
        )
        .without_attempt_timeout()
        .build(api);
    let holder = tokio::spawn(client.clone().oneshot(get("http://api.example.com/stall")));
    tokio::time::sleep(ms(10)).await;
    assert_eq!(sent.load(Ordering::SeqCst), 1);
    let mut req = Request::post("http://api.example.com/orders")
        .body(Full::from("{}"))
        .unwrap();
    req.extensions_mut()
        .insert(CallOptions::new().with_deadline(ms(300)));
    let started = Instant::now();
    let err = tokio::time::timeout(secs(5), client.oneshot(req))
        .await
        .expect("bounded by its deadline")
        .expect_err("no place within the deadline");
    assert!(started.elapsed() <= ms(310), "{:?}", started.elapsed());
    assert_eq!(
        sent.load(Ordering::SeqCst),
        1,
        "the POST never reached the API"
    );
    let e = sturdy_err(&err);
    let msg = e.to_string();
    assert_eq!(
        sturdy::core::classify::delivery(&*err),
        Delivery::NotSent,
        "{msg}"
    );
    assert!(msg.contains("safe to send again"), "{msg}");
    assert!(msg.contains("concurrency"), "{msg}");
    assert_eq!(e.report().map(|r| r.attempts()), Some(0), "{msg}");
    holder.abort();
}

/// Method names are case-sensitive (RFC 9110 §9.1): `get`, `Put` and `delete` are extension
/// methods, which the guide retries "only when they carry an `Idempotency-Key` header", not the
/// safe GET, PUT and DELETE.
#[tokio::test(start_paused = true)]
async fn s70_lower_case_method_names_are_extension_methods() {
    for m in [&b"get"[..], b"Put", b"delete", b"head", b"Options"] {
        let method = Method::from_bytes(m).unwrap();
        let api = Api::new(|_| resp(503, None));
        let svc = RetryLayer::new().with_seed(1).layer(api.clone());
        let req = Request::builder()
            .method(method.clone())
            .uri("http://api.example.com/")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let res = tokio::time::timeout(secs(60), svc.oneshot(req))
            .await
            .expect("bounded")
            .unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(api.count(), 1, "{method} was retried without a key");

        let api = Api::new(|_| resp(503, None));
        let svc = RetryLayer::new().with_seed(1).layer(api.clone());
        let req = Request::builder()
            .method(method.clone())
            .uri("http://api.example.com/")
            .header("idempotency-key", "k-1")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let _ = tokio::time::timeout(secs(60), svc.oneshot(req))
            .await
            .expect("bounded")
            .unwrap();
        assert_eq!(api.count(), 4, "{method} with a key");
    }
}

/// `ClientBuilder`'s client behind tower's `Buffer`, driven as a kept service, with calls
/// aborted (`JoinHandle::abort`) at seeded points while they wait out a backoff or an attempt:
/// the adaptive concurrency place (limit 1) is never leaked, and nothing is sent after an abort.
#[tokio::test(start_paused = true)]
async fn s70_client_builder_calls_aborted_at_seeded_points_leak_no_place() {
    let seen = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let sn = seen.clone();
    let n = Arc::new(AtomicUsize::new(0));
    let nn = n.clone();
    let api = tower::service_fn(move |_req: Request<Full<Bytes>>| {
        sn.lock().unwrap().push(Instant::now());
        let k = nn.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(ms(80)).await;
            Ok::<_, Infallible>(resp(if k % 4 == 3 { 200 } else { 503 }, None))
        }
    });
    let (conc, handle) = sturdy::concurrency::AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .with_initial_limit(1)
        .pair();
    let client = sturdy::ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(5).without_budget())
        .without_circuit_breaker()
        .with_adaptive_concurrency(conc)
        .build(api);
    let mut kept = ServiceBuilder::new().buffer(4).service(client);
    let mut rng = Rng::seed_from_u64(0x70);
    for round in 0..25 {
        n.store(0, Ordering::SeqCst);
        let fut = kept
            .ready()
            .await
            .unwrap()
            .call(get("http://api.example.com/"));
        let task = tokio::spawn(fut);
        tokio::time::sleep(ms(rng.below(1500))).await;
        if task.is_finished() {
            continue;
        }
        task.abort();
        let _ = task.await;
        let before = seen.lock().unwrap().len();
        tokio::time::sleep(secs(30)).await;
        assert_eq!(
            seen.lock().unwrap().len(),
            before,
            "round {round}: an attempt was sent after the abort"
        );
        assert_eq!(
            handle.state("api.example.com").map(|s| s.in_flight()),
            Some(0),
            "round {round}: a place is still taken"
        );
        n.store(3, Ordering::SeqCst);
        let res = tokio::time::timeout(
            secs(5),
            kept.ready()
                .await
                .unwrap()
                .call(get("http://api.example.com/")),
        )
        .await
        .unwrap_or_else(|_| panic!("round {round}: the next call hung"))
        .unwrap();
        assert_eq!(res.status(), StatusCode::OK, "round {round}");
    }
}

/// "never sooner than asked": a `Retry-After` date is whole seconds, the wall clock is not. At
/// `T + 900 ms`, a date of `T + 2 s` asks for 1.1 s; at `T + 999 ms`, `T + 1 s` asks for 1 ms.
#[tokio::test(start_paused = true)]
async fn s70_a_date_is_never_followed_sooner_than_it_asks_at_sub_second_clocks() {
    // T = 2019-06-03T11:00:00Z.
    let t = 1_559_559_600;
    for (clock_ms, date, want) in [
        (900, "Mon, 03 Jun 2019 11:00:02 GMT", ms(1100)),
        (999, "Mon, 03 Jun 2019 11:00:01 GMT", ms(1)),
        (1, "Mon, 03 Jun 2019 11:00:10 GMT", ms(9999)),
    ] {
        let clock = Arc::new(Fixed(at(t) + ms(clock_ms)));
        let api = Api::new(move |n| {
            if n == 0 {
                resp(503, Some(date.as_bytes()))
            } else {
                resp(200, None)
            }
        });
        let svc = RetryLayer::new()
            .with_seed(4)
            .with_clock(clock)
            .layer(api.clone());
        let res = tokio::time::timeout(secs(30), svc.oneshot(get("http://api.example.com/")))
            .await
            .expect("bounded")
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let ts = api.times();
        let gap = ts[1] - ts[0];
        let most = want + want.max(ms(250)).mul_f64(0.2) + ms(1);
        assert!(
            gap >= want && gap <= most,
            "clock +{clock_ms}ms, {date}: slept {gap:?}, asked {want:?}"
        );
    }
}

/// Over the wire (axum on 127.0.0.1:0): a handler that never answers. With the retry layer's own
/// attempt timeout of 50 ms, a GET is tried 4 times, and the error names the timeout and says
/// the request may have been processed (each attempt reached the handler).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s70_wire_a_stalled_handler_is_cut_per_attempt_and_maybe_processed() {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let app = axum::Router::new().route(
        "/slow",
        axum::routing::get(move || {
            let h = h.clone();
            async move {
                h.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(secs(30)).await;
                "late"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let hyper = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let svc = RetryLayer::new()
        .with_seed(1)
        .with_backoff(Backoff::exponential(ms(5), ms(5)).unwrap())
        .with_attempt_timeout(ms(50))
        .layer(hyper);
    let started = Instant::now();
    let err = tokio::time::timeout(secs(5), svc.oneshot(get(&format!("http://{addr}/slow"))))
        .await
        .expect("bounded")
        .expect_err("every attempt timed out");
    assert!(started.elapsed() < secs(2), "{:?}", started.elapsed());
    let e = sturdy_err(&err);
    let msg = e.to_string();
    assert_eq!(hits.load(Ordering::SeqCst), 4, "{msg}");
    assert_eq!(*e.kind(), sturdy::core::ErrorKind::Timeout, "{msg}");
    assert!(msg.contains("gave up after 4 attempts"), "{msg}");
    assert!(msg.contains("timed out after 50ms"), "{msg}");
    assert_eq!(
        sturdy::core::classify::delivery(&*err),
        Delivery::MaybeProcessed,
        "{msg}"
    );
    server.abort();
}

/// "deposits live `ttl`": with ttl 10 s, no reserve and 100 % (one retry per call), five calls
/// made at once leave five retries 9.5 s later (plus the caller's own), none 10.5 s later.
#[tokio::test(start_paused = true)]
async fn s70_deposits_live_one_ttl_on_tokios_clock() {
    for (host, wait, want) in [("a.example", ms(9500), 6), ("b.example", ms(10_500), 1)] {
        let api = Api::new(|_| resp(503, None));
        let svc = RetryLayer::new()
            .with_seed(1)
            .with_max_attempts(100)
            .with_backoff(Backoff::exponential(ms(1), ms(1)).unwrap())
            .with_budget(secs(10), 0, 1.0)
            .unwrap()
            .layer(api.clone());
        let url = format!("http://{host}/");
        for _ in 0..5 {
            let mut req = get(&url);
            req.extensions_mut()
                .insert(CallOptions::new().with_max_attempts(1));
            let _ = svc.clone().oneshot(req).await.unwrap();
        }
        tokio::time::advance(wait).await;
        let before = api.count();
        let _ = svc.clone().oneshot(get(&url)).await.unwrap();
        assert_eq!(
            api.count() - before - 1,
            want,
            "{host}: retries {wait:?} after five calls"
        );
    }
}

/// "The wait that error reports is the server's": a date 120.1 s ahead of the layer's clock is
/// not slept (over 60 s) and is reported as 120.1 s, for the host called (no user info); one 2 h
/// ahead is reported capped at 5 min.
#[tokio::test(start_paused = true)]
async fn s70_a_date_not_slept_is_reported_as_the_servers_wait() {
    let t = 1_559_559_600; // 2019-06-03T11:00:00Z
    let clock = Arc::new(Fixed(at(t) + ms(900)));
    for (date, want) in [
        ("Mon, 03 Jun 2019 11:02:01 GMT", ms(120_100)),
        ("Mon, 03 Jun 2019 13:00:00 GMT", secs(300)),
    ] {
        let api = Api::new(move |_| resp(429, Some(date.as_bytes())));
        let svc = RetryLayer::new()
            .with_seed(4)
            .with_clock(clock.clone())
            .layer(api.clone());
        let err = svc
            .oneshot(get("http://user:pw@api.example.com:8080/x?token=s3cret"))
            .await
            .expect_err("not slept");
        let rl = find::<RateLimited>(&*err).expect("RateLimited");
        assert_eq!(rl.retry_after(), want, "{date}");
        assert_eq!(rl.scope(), Some("api.example.com:8080"), "{date}");
        let msg = err.to_string();
        assert!(!msg.contains("pw") && !msg.contains("s3cret"), "{msg}");
        assert_eq!(api.count(), 1);
    }
}

/// A body not kept for a replay (over the limit) is passed through as it is: its trailers
/// reach the server (it is sent once).
#[tokio::test(start_paused = true)]
async fn s70_a_body_sent_once_keeps_its_trailers() {
    let api = Api::new(|_| resp(200, None));
    let svc = RetryLayer::new()
        .with_seed(1)
        .with_body_limit(3)
        .layer(api.clone());
    let mut trailers = HeaderMap::new();
    trailers.insert("x-checksum", HeaderValue::from_static("abc123"));
    let req = Request::put("http://api.example.com/blob")
        .body(WithTrailers {
            data: Some(Bytes::from_static(b"payload")),
            trailers: Some(trailers),
        })
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let seen = api.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body, "payload");
    assert_eq!(
        seen[0]
            .trailers
            .as_ref()
            .and_then(|t| t.get("x-checksum").cloned()),
        Some(HeaderValue::from_static("abc123"))
    );
}
