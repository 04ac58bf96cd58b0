//! Outside round s72: client-side rate limiting (`sturdy-ratelimit` alone and inside
//! `ClientBuilder`), judged from docs/guides/ratelimit.md, docs/RELIABILITY.md, README.md and the
//! crate's rustdoc, with the public header vectors of /work/shared/vectors/STANDARDS.md (sections
//! 5 and 6).

#![cfg(feature = "full")]

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use sturdy::core::clock::{ManualClock, FAR};
use sturdy::core::{find, BoxError, CallOptions, RateLimited};
use sturdy::ratelimit::{
    DirectLimiter, PauseCapped, PauseSource, Quota, RateLimitHandle, RateLimitLayer,
    DEFAULT_MAX_PAUSE,
};
use sturdy::ClientBuilder;
use tokio::time::{advance, timeout, Instant};
use tower::{service_fn, Layer, Service, ServiceBuilder, ServiceExt};

type Body = Full<Bytes>;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A small seeded PRNG (splitmix64): the package has no `rand` among its dev-dependencies.
struct Rng(u64);

impl Rng {
    fn seed_from_u64(seed: u64) -> Self {
        Self(seed)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

fn get(uri: &str) -> Request<()> {
    Request::get(uri).body(()).unwrap()
}

/// One response with `status` and `headers` (each pair one field line).
fn response(status: u16, headers: &[(&str, &str)]) -> Response<()> {
    let mut res = Response::new(());
    *res.status_mut() = StatusCode::from_u16(status).unwrap();
    for (k, v) in headers {
        res.headers_mut().append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_bytes(v.as_bytes()).unwrap(),
        );
    }
    res
}

/// Sends one call through an `adaptive_only` layer (with `clock` for dates) whose server answers
/// `res`; returns the handle and the response as the caller got it.
async fn one_answer(
    clock: Option<ManualClock>,
    host: &str,
    res: Response<()>,
) -> (RateLimitHandle, Response<()>) {
    let mut layer = RateLimitLayer::adaptive_only();
    if let Some(clock) = clock {
        layer = layer.with_clock(Arc::new(clock));
    }
    let (layer, handle) = layer.pair();
    let slot = Arc::new(Mutex::new(Some(res)));
    let api = service_fn(move |_req: Request<()>| {
        let res = slot
            .lock()
            .unwrap()
            .take()
            .unwrap_or_else(|| response(200, &[]));
        async move { Ok::<_, Infallible>(res) }
    });
    let svc = layer.layer(api);
    let got = timeout(
        Duration::from_secs(5),
        svc.oneshot(get(&format!("http://{host}/"))),
    )
    .await
    .expect("the call answers")
    .unwrap();
    (handle, got)
}

/// The pause a single response asks for, as the handle reads it right after.
async fn pause_of(status: u16, headers: &[(&str, &str)]) -> Option<Duration> {
    let (handle, _) = one_answer(None, "api.example.com", response(status, headers)).await;
    handle.pause("api.example.com")
}

/// The same with a wall clock reading `now` (for dates and epoch resets).
async fn pause_at(
    now: SystemTime,
    status: u16,
    headers: &[(&str, &str)],
) -> (Option<Duration>, Option<PauseCapped>) {
    let (handle, res) = one_answer(
        Some(ManualClock::at(now)),
        "api.example.com",
        response(status, headers),
    )
    .await;
    (
        handle.pause("api.example.com"),
        res.extensions().get::<PauseCapped>().copied(),
    )
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn ms(m: u64) -> Duration {
    Duration::from_millis(m)
}

/// 2019-06-03T11:00:00Z, the urllib3 vectors' "now" (STANDARDS.md 6.1).
fn urllib3_now() -> SystemTime {
    UNIX_EPOCH + secs(1_559_559_600)
}

/// 2026-12-05T02:59:30Z: 30 s before the guide's RFC 3339 example.
fn rfc3339_now() -> SystemTime {
    UNIX_EPOCH + secs(1_796_439_570)
}

// ---------------------------------------------------------------------------------------------
// Retry-After values (guide "Pauses the server asks for", "Pauses are capped"; STANDARDS.md 6)
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn retry_after_seconds_pause_exactly_that_long() {
    assert_eq!(
        pause_of(429, &[("retry-after", "120")]).await,
        Some(secs(120))
    );
    assert_eq!(pause_of(503, &[("retry-after", "7")]).await, Some(secs(7)));
    // Whitespace around the value (urllib3 vector "\t42 " -> 42).
    assert_eq!(
        pause_of(429, &[("retry-after", "\t42 ")]).await,
        Some(secs(42))
    );
}

#[tokio::test(start_paused = true)]
async fn retry_after_zero_does_not_hold_callers() {
    // "pause every caller of the host ... until then": 0 s means now.
    let p = pause_of(429, &[("retry-after", "0")]).await;
    assert!(
        p.is_none() || p <= Some(DEFAULT_MAX_PAUSE.min(secs(1))),
        "Retry-After: 0 paused {p:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn retry_after_absurd_numbers_are_capped_at_five_minutes() {
    for v in [
        "18446744073709551615",
        "18446744073709551616",
        "99999999999999999999",
        "99999999999999999999999999999999999999999999999999",
        "301",
    ] {
        let (handle, res) = one_answer(
            None,
            "api.example.com",
            response(429, &[("retry-after", v)]),
        )
        .await;
        assert_eq!(
            handle.pause("api.example.com"),
            Some(DEFAULT_MAX_PAUSE),
            "{v}"
        );
        let capped = res
            .extensions()
            .get::<PauseCapped>()
            .unwrap_or_else(|| panic!("no PauseCapped for {v}"));
        assert_eq!(capped.applied(), DEFAULT_MAX_PAUSE);
        assert_eq!(capped.source(), PauseSource::RetryAfter);
        assert!(capped.asked() > DEFAULT_MAX_PAUSE, "{v}: {capped:?}");
        assert_eq!(res.status(), 429, "the response is returned as it came");
    }
    // 300 s exactly is not capped.
    let (handle, res) = one_answer(
        None,
        "api.example.com",
        response(429, &[("retry-after", "300")]),
    )
    .await;
    assert_eq!(handle.pause("api.example.com"), Some(secs(300)));
    assert!(res.extensions().get::<PauseCapped>().is_none());
}

#[tokio::test(start_paused = true)]
async fn retry_after_junk_is_a_bare_429() {
    // Not seconds and not a date: the 429 says nothing about how long, so it is a bare 429
    // (1 s). Never a lockout, never a panic.
    let junk_64k = "9".repeat(10) + &"x".repeat(64 * 1024);
    for v in [
        "soon",
        "-1",
        "+1",
        "",
        "1e3",
        "0x10",
        "NaN",
        junk_64k.as_str(),
        "1,000",
    ] {
        let p = pause_of(429, &[("retry-after", v)]).await;
        assert!(p.is_some(), "{v:.20}: a 429 pauses");
        assert!(
            p.unwrap() <= secs(1),
            "{v:.20}: paused {p:?}, more than a bare 429's 1 s"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn retry_after_http_dates_in_all_three_formats() {
    // STANDARDS.md 6.1: now = 2019-06-03T11:00:00Z; each of these is 1812 s later. 1812 s is
    // past the 5 minute cap, so the pause is the cap and PauseCapped says what was asked.
    for v in [
        "Mon, 03 Jun 2019 11:30:12 GMT",
        "Monday, 03-Jun-19 11:30:12 GMT",
        "Mon Jun  3 11:30:12 2019",
    ] {
        let (pause, capped) = pause_at(urllib3_now(), 429, &[("retry-after", v)]).await;
        assert_eq!(pause, Some(DEFAULT_MAX_PAUSE), "{v}");
        let capped = capped.unwrap_or_else(|| panic!("{v}: no PauseCapped"));
        assert_eq!(capped.asked(), secs(1812), "{v}");
    }
    // Within the cap: 120 s later.
    let (pause, capped) = pause_at(
        urllib3_now(),
        503,
        &[("retry-after", "Mon, 03 Jun 2019 11:02:00 GMT")],
    )
    .await;
    assert_eq!(pause, Some(secs(120)));
    assert!(capped.is_none());
}

#[tokio::test(start_paused = true)]
async fn retry_after_rfc850_two_digit_year_reads_as_the_past() {
    // RFC 9110 5.6.7 (STANDARDS.md 6): a two-digit year that appears more than 50 years in the
    // future is the most recent past year with those digits: "94" in 2019 is 1994, a date in
    // the past, not 2094 (75 years ahead, a five-minute lockout).
    let (pause, capped) = pause_at(
        urllib3_now(),
        429,
        &[("retry-after", "Sunday, 06-Nov-94 08:49:37 GMT")],
    )
    .await;
    assert!(capped.is_none(), "read as a far future date: {capped:?}");
    assert!(pause.unwrap_or_default() <= secs(1), "paused {pause:?}");
}

#[tokio::test(start_paused = true)]
async fn retry_after_date_in_year_9999_and_past_dates() {
    let (pause, capped) = pause_at(
        urllib3_now(),
        429,
        &[("retry-after", "Fri, 31 Dec 9999 23:59:59 GMT")],
    )
    .await;
    assert_eq!(pause, Some(DEFAULT_MAX_PAUSE));
    assert!(capped.is_some());
    // The RFC's own example date, long past: no long pause.
    let (pause, capped) = pause_at(
        urllib3_now(),
        429,
        &[("retry-after", "Fri, 31 Dec 1999 23:59:59 GMT")],
    )
    .await;
    assert!(capped.is_none());
    assert!(pause.unwrap_or_default() <= secs(1), "{pause:?}");
}

// ---------------------------------------------------------------------------------------------
// RateLimit (IETF draft -10 vectors, STANDARDS.md 5.1)
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn ratelimit_draft_vectors() {
    assert_eq!(
        pause_of(200, &[("ratelimit", r#""default";r=0;t=50"#)]).await,
        Some(secs(50))
    );
    // "on any status": the draft's example on a 301.
    assert_eq!(
        pause_of(301, &[("ratelimit", r#""problemPolicy";r=0;t=10"#)]).await,
        Some(secs(10))
    );
    assert_eq!(
        pause_of(200, &[("ratelimit", r#""default";r=50;t=30"#)]).await,
        None
    );
    assert_eq!(
        pause_of(
            200,
            &[("ratelimit", r#""default";r=999;pk=:dHJpYWwxMjEzMjM=:"#)]
        )
        .await,
        None
    );
    assert_eq!(
        pause_of(200, &[("ratelimit", r#""somepolicy";r=10000;t=10"#)]).await,
        None
    );
    // An unknown parameter (the appendix's q on RateLimit) is ignored.
    assert_eq!(
        pause_of(200, &[("ratelimit", r#""sliding";q=12;r=0;t=7"#)]).await,
        Some(secs(7))
    );
    // Split across field lines (RFC 9651 3.1).
    assert_eq!(
        pause_of(
            200,
            &[
                ("ratelimit", r#""a";r=5;t=1"#),
                ("ratelimit", r#""b";r=0;t=20"#)
            ]
        )
        .await,
        Some(secs(20))
    );
    // With RateLimit-Policy alongside (draft vectors).
    assert_eq!(
        pause_of(
            200,
            &[
                (
                    "ratelimit-policy",
                    r#""burst";q=100;w=60,"daily";q=1000;w=86400"#
                ),
                ("ratelimit", r#""burst";r=0;t=12"#),
            ]
        )
        .await,
        Some(secs(12))
    );
}

#[tokio::test(start_paused = true)]
async fn ratelimit_with_non_canonical_pk_bytes_still_pauses() {
    // STANDARDS.md 5.1: the draft's own pk values cHsdsRa894== and sdfjLJUOUH== have non-zero
    // pad bits; RFC 9651 4.2.7 says parsers SHOULD NOT fail on them, and they are the
    // regression test for that. A field that is not malformed is not ignored.
    assert_eq!(
        pause_of(
            200,
            &[("ratelimit", r#""peruser";r=0;t=40;pk=:cHsdsRa894==:"#)]
        )
        .await,
        Some(secs(40))
    );
    assert_eq!(
        pause_of(
            429,
            &[("ratelimit", r#""peruser";r=0;t=20;pk=:sdfjLJUOUH==:"#)]
        )
        .await,
        Some(secs(20))
    );
    // Padding left out (SHOULD NOT fail either).
    assert_eq!(
        pause_of(
            200,
            &[("ratelimit", r#""default";r=0;t=9;pk=:QXBwLTk5OQ:"#)]
        )
        .await,
        Some(secs(9))
    );
}

#[tokio::test(start_paused = true)]
async fn retry_after_takes_precedence_over_ratelimit_in_one_response() {
    assert_eq!(
        pause_of(
            429,
            &[("retry-after", "5"), ("ratelimit", r#""default";r=0;t=50"#)]
        )
        .await,
        Some(secs(5))
    );
}

#[tokio::test(start_paused = true)]
async fn ratelimit_malformed_or_hostile_fields() {
    // Malformed fields MUST be ignored; hostile numbers are capped; nothing panics.
    for v in [
        r#""default";r=0;t=-5"#,
        r#""default";r=-1;t=5"#,
        r#""default";r=0;t=5.5.5"#,
        r#""default";r=0;t="#,
        r#""default;r=0;t=5"#,
        "\"default\";r=0;t=99999999999999999999999999999",
    ] {
        let p = pause_of(200, &[("ratelimit", v)]).await;
        assert!(p.unwrap_or_default() <= DEFAULT_MAX_PAUSE, "{v}: {p:?}");
    }
    // The guide's own example of a bogus value: t=99999999999 costs at most five minutes.
    assert_eq!(
        pause_of(200, &[("ratelimit", r#""default";r=0;t=99999999999"#)]).await,
        Some(DEFAULT_MAX_PAUSE)
    );
    // 64 KiB of members with r=0 past the first 4,096: bounded work, no pause from them.
    let mut v = String::new();
    for i in 0..5000 {
        if i > 0 {
            v.push(',');
        }
        if i >= 4096 {
            v.push_str(&format!("\"p{i}\";r=0;t=60"));
        } else {
            v.push_str(&format!("\"p{i}\";r=1"));
        }
    }
    let started = Instant::now();
    assert_eq!(pause_of(200, &[("ratelimit", &v)]).await, None);
    assert!(started.elapsed() < secs(1));
}

// ---------------------------------------------------------------------------------------------
// X-RateLimit-* resets as vendors write them
// ---------------------------------------------------------------------------------------------

async fn x_pause(
    now: SystemTime,
    remaining: &str,
    reset: &str,
) -> (Option<Duration>, Option<PauseCapped>) {
    pause_at(
        now,
        200,
        &[
            ("x-ratelimit-remaining", remaining),
            ("x-ratelimit-reset", reset),
        ],
    )
    .await
}

#[tokio::test(start_paused = true)]
async fn x_ratelimit_reset_forms() {
    let now = rfc3339_now();
    let unix = now.duration_since(UNIX_EPOCH).unwrap().as_secs();
    // Seconds to wait, whole or decimal.
    assert_eq!(x_pause(now, "0", "30").await.0, Some(secs(30)));
    assert_eq!(x_pause(now, "0", "0.5").await.0, Some(ms(500)));
    // A Unix time in seconds, whole or decimal.
    assert_eq!(
        x_pause(now, "0", &(unix + 30).to_string()).await.0,
        Some(secs(30))
    );
    assert_eq!(
        x_pause(now, "0", &format!("{}.5", unix + 30)).await.0,
        Some(ms(30_500))
    );
    // A Unix time in milliseconds.
    assert_eq!(
        x_pause(now, "0", &((unix + 30) * 1000).to_string()).await.0,
        Some(secs(30))
    );
    // An HTTP date.
    assert_eq!(
        x_pause(now, "0", "Sat, 05 Dec 2026 03:00:00 GMT").await.0,
        Some(secs(30))
    );
    // The guide's RFC 3339 example.
    assert_eq!(
        x_pause(now, "0", "2026-12-05T03:00:00Z").await.0,
        Some(secs(30))
    );
    // Remaining not 0: no pause.
    assert_eq!(x_pause(now, "1", "30").await.0, None);
}

#[tokio::test(start_paused = true)]
async fn x_ratelimit_reset_rfc3339_offsets_and_fractions() {
    // RFC 3339 date-times carry an offset or Z, may use lower case t and z (section 5.6 note),
    // and may have fractional seconds: the guide says "an RFC 3339 date-time".
    let now = rfc3339_now();
    for v in [
        "2026-12-05T04:00:00+01:00",
        "2026-12-04T22:00:00-05:00",
        "2026-12-05t03:00:00z",
        "2026-12-05T03:00:00.000Z",
    ] {
        assert_eq!(x_pause(now, "0", v).await.0, Some(secs(30)), "{v}");
    }
}

#[tokio::test(start_paused = true)]
async fn x_ratelimit_reset_boundaries_between_the_forms() {
    let now = rfc3339_now();
    // Under 10^9: seconds to wait. 999,999,999 s is about 31.7 years: the cap.
    let (p, capped) = x_pause(now, "0", "999999999").await;
    assert_eq!(p, Some(DEFAULT_MAX_PAUSE));
    assert_eq!(capped.unwrap().source(), PauseSource::XRateLimit);
    // 10^9 is a Unix time (2001): in the past, no five-minute pause.
    let (p, capped) = x_pause(now, "0", "1000000000").await;
    assert!(capped.is_none(), "{capped:?}");
    assert!(p.unwrap_or_default() < secs(1), "{p:?}");
    // Under 10^12: Unix seconds; 99999999999 is the guide's "epoch reset in year 5138": capped.
    let (p, capped) = x_pause(now, "0", "99999999999").await;
    assert_eq!(p, Some(DEFAULT_MAX_PAUSE));
    assert!(capped.is_some());
    // 10^12 is a Unix time in milliseconds (2001): in the past.
    let (p, capped) = x_pause(now, "0", "1000000000000").await;
    assert!(capped.is_none(), "{capped:?}");
    assert!(p.unwrap_or_default() < secs(1), "{p:?}");
}

#[tokio::test(start_paused = true)]
async fn x_ratelimit_hostile_values_never_lock_out_or_panic() {
    let now = rfc3339_now();
    let big = "9".repeat(64 * 1024);
    let ten_30 = format!("1{}", "0".repeat(30));
    for reset in [
        "-1",
        "-99999999999",
        ten_30.as_str(),
        "1e30",
        "NaN",
        "inf",
        "-0.5",
        "0.0000000001",
        big.as_str(),
        "18446744073709551616",
        "",
    ] {
        let (p, _) = x_pause(now, "0", reset).await;
        assert!(
            p.unwrap_or_default() <= DEFAULT_MAX_PAUSE,
            "{reset:.20}: {p:?}"
        );
    }
    for remaining in ["-1", "1e30", ten_30.as_str(), big.as_str(), "", "zero"] {
        let (p, _) = x_pause(now, remaining, "30").await;
        assert!(p.unwrap_or_default() <= secs(30), "{remaining:.20}: {p:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn x_ratelimit_spellings() {
    let now = rfc3339_now();
    for (rem, reset) in [
        ("x-rate-limit-remaining", "x-rate-limit-reset"),
        ("ratelimit-remaining", "ratelimit-reset"),
        ("X-RateLimit-Remaining", "X-RateLimit-Reset"),
    ] {
        let (p, _) = pause_at(now, 200, &[(rem, "0"), (reset, "12")]).await;
        assert_eq!(p, Some(secs(12)), "{rem}");
    }
}

// ---------------------------------------------------------------------------------------------
// Quota values
// ---------------------------------------------------------------------------------------------

#[test]
fn invalid_quotas_are_errors_that_name_the_cause() {
    let zero_calls = Quota::new(0, secs(1)).unwrap_err();
    let zero_period = Quota::new(1, Duration::ZERO).unwrap_err();
    let zero_burst = Quota::per_second(1).unwrap().with_burst(0).unwrap_err();
    assert!(Quota::per_second(0).is_err());
    assert!(Quota::per_minute(0).is_err());
    let texts = [
        zero_calls.to_string(),
        zero_period.to_string(),
        zero_burst.to_string(),
    ];
    assert!(
        texts[0].contains("call") || texts[0].contains('0'),
        "{}",
        texts[0]
    );
    assert!(
        texts[1].contains("period") || texts[1].contains("zero"),
        "{}",
        texts[1]
    );
    assert!(texts[2].contains("burst"), "{}", texts[2]);
    // Three different causes, three different messages.
    assert_ne!(texts[0], texts[1]);
    assert_ne!(texts[1], texts[2]);
}

#[test]
fn extreme_quotas_are_clamped_as_documented() {
    assert_eq!(Quota::new(1, Duration::MAX).unwrap().interval(), FAR);
    assert_eq!(
        Quota::per_second(u32::MAX).unwrap().interval(),
        Duration::from_nanos(1)
    );
    assert_eq!(
        Quota::new(u32::MAX, Duration::from_nanos(1))
            .unwrap()
            .interval(),
        Duration::from_nanos(1)
    );
    assert_eq!(
        Quota::new(u32::MAX, Duration::MAX).unwrap().interval(),
        // Duration::MAX / u32::MAX is about 136 years per call: clamped to 30 years.
        FAR
    );
    let q = Quota::new(1, Duration::MAX)
        .unwrap()
        .with_burst(u32::MAX)
        .unwrap();
    assert_eq!(q.burst(), u32::MAX, "the burst as given");
    assert_eq!(Quota::per_second(10).unwrap().burst(), 1);
}

#[tokio::test(start_paused = true)]
async fn burst_at_and_one_past_the_bound() {
    let limiter = DirectLimiter::new(Quota::per_second(10).unwrap().with_burst(5).unwrap());
    for i in 0..5 {
        assert!(limiter.check().is_ok(), "call {i} of the burst");
    }
    let err = limiter.check().unwrap_err();
    assert_eq!(err.retry_after(), ms(100));
    advance(ms(99)).await;
    assert_eq!(limiter.check().unwrap_err().retry_after(), ms(1));
    advance(ms(1)).await;
    assert!(limiter.check().is_ok());
    assert!(limiter.check().is_err());
    // After a long idle time the burst is back, never more than it.
    advance(secs(3600)).await;
    for _ in 0..5 {
        assert!(limiter.check().is_ok());
    }
    assert!(limiter.check().is_err());
}

#[tokio::test(start_paused = true)]
async fn a_thirty_year_quota_with_the_largest_burst() {
    // "a burst's whole allowance is capped at about 146 years of calls": with 30-year intervals
    // that is a handful of calls, not u32::MAX, and no overflow.
    let limiter = DirectLimiter::new(
        Quota::new(1, Duration::MAX)
            .unwrap()
            .with_burst(u32::MAX)
            .unwrap(),
    );
    let mut passed = 0;
    while limiter.check().is_ok() {
        passed += 1;
        assert!(
            passed < 100,
            "more than 100 calls through a one-per-30-years quota"
        );
    }
    assert!((1..=6).contains(&passed), "{passed} calls at once");
    let err = limiter.check().unwrap_err();
    assert!(err.retry_after() <= FAR, "{:?}", err.retry_after());
    assert!(
        err.retry_after() > Duration::from_secs(86_400 * 365),
        "{:?}",
        err.retry_after()
    );
    // A wait of Duration::MAX neither panics nor overflows: the call waits (30 years away).
    let wait = timeout(secs(1), limiter.until_ready(Duration::MAX)).await;
    assert!(
        wait.is_err(),
        "a 30-year slot came within a second: {wait:?}"
    );
    // The dropped waiter left the line: check still answers (not blocked by a phantom waiter
    // forever, and not granted either).
    assert!(limiter.check().is_err());
    assert_eq!(
        limiter.reserve(Duration::ZERO).unwrap_err().retry_after(),
        limiter.check().unwrap_err().retry_after()
    );
}

#[tokio::test(start_paused = true)]
async fn a_billion_calls_a_second_never_refuses_a_loop() {
    let limiter = DirectLimiter::new(
        Quota::per_second(u32::MAX)
            .unwrap()
            .with_burst(u32::MAX)
            .unwrap(),
    );
    for _ in 0..100_000 {
        limiter.check().unwrap();
    }
    limiter.until_ready(Duration::ZERO).await.unwrap();
    assert_eq!(limiter.reserve(Duration::ZERO).unwrap(), Duration::ZERO);
}

// ---------------------------------------------------------------------------------------------
// DirectLimiter: the line
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn direct_until_ready_a_thousand_waiters_first_come_first_served() {
    let limiter = Arc::new(DirectLimiter::new(Quota::per_second(1000).unwrap()));
    limiter.check().unwrap();
    let start = Instant::now();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..1000usize {
        let (limiter, order) = (limiter.clone(), order.clone());
        tasks.push(tokio::spawn(async move {
            limiter.until_ready(secs(5)).await.unwrap();
            order.lock().unwrap().push((i, start.elapsed()));
        }));
        // Each joins the line in this order.
        tokio::task::yield_now().await;
    }
    for t in tasks {
        timeout(secs(10), t).await.unwrap().unwrap();
    }
    let order = order.lock().unwrap().clone();
    let ids: Vec<usize> = order.iter().map(|(i, _)| *i).collect();
    assert_eq!(
        ids,
        (0..1000).collect::<Vec<_>>(),
        "not first come, first served"
    );
    for (i, at) in &order {
        assert_eq!(*at, ms(*i as u64 + 1), "waiter {i}");
    }
}

#[tokio::test(start_paused = true)]
async fn direct_waiters_dropped_at_seeded_points_leave_no_trace() {
    for seed in [1u64, 7, 42, 2026] {
        let mut rng = Rng::seed_from_u64(seed);
        let limiter = Arc::new(DirectLimiter::new(Quota::per_second(100).unwrap()));
        limiter.check().unwrap();
        let start = Instant::now();
        let done = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..200usize {
            let (limiter, done) = (limiter.clone(), done.clone());
            let cancel_after = match rng.below(3) {
                0 => None,
                1 => Some(ms(rng.below(2000))),
                _ => Some(Duration::ZERO),
            };
            tasks.push((
                i,
                cancel_after,
                tokio::spawn(async move {
                    match cancel_after {
                        Some(t) => {
                            if timeout(t, limiter.until_ready(secs(60))).await.is_ok() {
                                done.lock().unwrap().push(i);
                            }
                        }
                        None => {
                            limiter.until_ready(secs(60)).await.unwrap();
                            done.lock().unwrap().push(i);
                        }
                    }
                }),
            ));
            tokio::task::yield_now().await;
        }
        // Abort a few more at random times through JoinHandle::abort.
        let mut aborted = Vec::new();
        for (i, cancel, t) in &tasks {
            if cancel.is_none() && rng.below(5) == 0 {
                advance(ms(rng.below(20))).await;
                t.abort();
                aborted.push(*i);
            }
        }
        for (_, _, t) in tasks {
            let _ = timeout(secs(30), t).await.expect("every waiter ends");
        }
        let done = done.lock().unwrap().clone();
        // Those that went, went in the order they came.
        let mut sorted = done.clone();
        sorted.sort_unstable();
        assert_eq!(done, sorted, "seed {seed}: out of order");
        // The line is empty; the next caller waits at most one interval.
        let before = Instant::now();
        timeout(secs(1), limiter.until_ready(secs(60)))
            .await
            .expect("the next caller is not stuck behind dropped ones")
            .unwrap();
        assert!(
            before.elapsed() <= ms(10),
            "seed {seed}: the next caller waited {:?} ({} went, started {:?} ago)",
            before.elapsed(),
            done.len(),
            start.elapsed()
        );
    }
}

#[tokio::test(start_paused = true)]
async fn direct_reserve_goes_ahead_of_the_line_and_check_does_not_jump_it() {
    let limiter = Arc::new(DirectLimiter::new(Quota::per_second(10).unwrap()));
    limiter.check().unwrap();
    let start = Instant::now();
    let l = limiter.clone();
    let waiter = tokio::spawn(async move {
        l.until_ready(secs(5)).await.unwrap();
        start.elapsed()
    });
    tokio::task::yield_now().await;
    // The slot at 100 ms is booked by reserve, ahead of the waiter.
    assert_eq!(limiter.reserve(secs(1)).unwrap(), ms(100));
    advance(ms(150)).await;
    // A slot is not free for check while the waiter waits for its own (at 200 ms).
    assert!(limiter.check().is_err());
    let went = timeout(secs(1), waiter).await.unwrap().unwrap();
    assert_eq!(went, ms(200));
    // max_wait zero never waits; a reserve past max_wait reserves nothing.
    assert!(limiter.until_ready(Duration::ZERO).await.is_err());
    let err = limiter.reserve(ms(50)).unwrap_err();
    assert_eq!(err.retry_after(), ms(100));
    assert_eq!(limiter.reserve(ms(100)).unwrap(), ms(100));
}

// ---------------------------------------------------------------------------------------------
// The layer: line, cancellation, composition
// ---------------------------------------------------------------------------------------------

/// An inner service that records when each call (by its `x-id` header) arrived.
fn recording() -> (
    impl Service<Request<()>, Response = Response<()>, Error = Infallible, Future = impl Send>
        + Clone
        + Send,
    Arc<Mutex<Vec<(usize, Duration)>>>,
) {
    let start = Instant::now();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let svc = service_fn(move |req: Request<()>| {
        let id: usize = req
            .headers()
            .get("x-id")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(usize::MAX);
        s.lock().unwrap().push((id, start.elapsed()));
        async { Ok::<_, Infallible>(Response::new(())) }
    });
    (svc, seen)
}

fn get_id(uri: &str, id: usize) -> Request<()> {
    Request::get(uri)
        .header("x-id", id.to_string())
        .body(())
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn layer_a_thousand_waiters_with_seeded_drops_keep_order_and_pace() {
    let (api, seen) = recording();
    let (layer, handle) = RateLimitLayer::new(Quota::per_second(100).unwrap())
        .with_max_wait(secs(60))
        .pair();
    let svc = layer.layer(api);
    let mut rng = Rng::seed_from_u64(72);
    svc.clone()
        .oneshot(get_id("http://api.example.com/", 0))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 1..=1000usize {
        let s = svc.clone();
        let drop_after = if rng.below(4) == 0 {
            Some(ms(rng.below(5000)))
        } else {
            None
        };
        tasks.push((
            drop_after,
            tokio::spawn(async move {
                let call = s.oneshot(get_id("http://api.example.com/", i));
                match drop_after {
                    Some(t) => {
                        let _ = timeout(t, call).await;
                    }
                    None => {
                        call.await.unwrap();
                    }
                }
            }),
        ));
        tokio::task::yield_now().await;
    }
    assert!(handle.waiting("api.example.com") >= 700);
    for (drop_after, t) in &tasks {
        if drop_after.is_none() && rng.below(10) == 0 {
            t.abort();
        }
    }
    for (_, t) in tasks {
        let _ = timeout(secs(60), t).await.expect("every call ends");
    }
    assert_eq!(handle.waiting("api.example.com"), 0);
    let seen = seen.lock().unwrap().clone();
    let ids: Vec<usize> = seen.iter().map(|(i, _)| *i).collect();
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    assert_eq!(ids, sorted, "calls reached the API out of order");
    // Never faster than the quota.
    for w in seen.windows(2) {
        assert!(w[1].1 - w[0].1 >= ms(10), "{w:?}");
    }
    // The next caller waits at most one interval.
    let before = Instant::now();
    timeout(
        secs(1),
        svc.clone().oneshot(get_id("http://api.example.com/", 5000)),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(before.elapsed() <= ms(10), "waited {:?}", before.elapsed());
}

#[tokio::test(start_paused = true)]
async fn kept_service_over_concurrency_limit_one_poll_ready_is_honest() {
    use tokio_test::{assert_pending, assert_ready, assert_ready_ok};
    let (mock, mut upstream) = tower_test::mock::pair::<Request<()>, Response<()>>();
    let svc = ServiceBuilder::new()
        .layer(RateLimitLayer::new(Quota::per_second(10).unwrap()))
        .concurrency_limit(1)
        .service(mock);
    let mut kept = tokio_test::task::spawn(svc);
    upstream.allow(10);
    // First call: the quota's slot is free.
    assert_ready_ok!(kept.enter(|cx, mut s| s.poll_ready(cx)));
    let mut first = tokio_test::task::spawn(kept.call(get("http://api.example.com/")));
    assert_pending!(first.poll());
    let (_req, send) = upstream.next_request().await.unwrap();
    send.send_response(Response::new(()));
    assert_ready!(first.poll()).unwrap();
    // tower's ConcurrencyLimit frees its permit when the response future is dropped.
    drop(first);
    // Second: ready (a permit), then waits in line for the slot at 100 ms holding the permit.
    assert_ready_ok!(kept.enter(|cx, mut s| s.poll_ready(cx)));
    let mut second = tokio_test::task::spawn(kept.call(get("http://api.example.com/")));
    assert_pending!(second.poll());
    // Third: no permit while the second holds it.
    assert_pending!(kept.enter(|cx, mut s| s.poll_ready(cx)));
    advance(ms(100)).await;
    assert_pending!(second.poll());
    let (_req, send) = timeout(secs(1), upstream.next_request())
        .await
        .unwrap()
        .unwrap();
    send.send_response(Response::new(()));
    assert_ready!(second.poll()).unwrap();
    drop(second);
    assert!(kept.is_woken());
    assert_ready_ok!(kept.enter(|cx, mut s| s.poll_ready(cx)));
}

#[tokio::test(start_paused = true)]
async fn a_refused_kept_call_gives_the_permit_back_at_once() {
    use tokio_test::{assert_ready, assert_ready_ok};
    let (mock, mut upstream) = tower_test::mock::pair::<Request<()>, Response<()>>();
    upstream.allow(10);
    let svc = ServiceBuilder::new()
        .layer(RateLimitLayer::new(Quota::per_second(1).unwrap()).with_max_wait(Duration::ZERO))
        .concurrency_limit(1)
        .service(mock);
    let mut kept = tokio_test::task::spawn(svc);
    assert_ready_ok!(kept.enter(|cx, mut s| s.poll_ready(cx)));
    let first = kept.call(get("http://api.example.com/"));
    let h = tokio::spawn(first);
    let (_r, send) = upstream.next_request().await.unwrap();
    send.send_response(Response::new(()));
    h.await.unwrap().unwrap();
    // The second is refused at once and the permit is free again for the third.
    assert_ready_ok!(kept.enter(|cx, mut s| s.poll_ready(cx)));
    let mut refused = tokio_test::task::spawn(kept.call(get("http://api.example.com/")));
    let err = assert_ready!(refused.poll()).unwrap_err();
    let rl = find::<RateLimited>(&*err).expect("RateLimited");
    assert_eq!(rl.retry_after(), secs(1));
    assert_ready_ok!(kept.enter(|cx, mut s| s.poll_ready(cx)));
}

#[tokio::test(start_paused = true)]
async fn kept_clones_under_buffer_with_exhausted_quota_do_not_deadlock() {
    let (api, seen) = recording();
    let svc = ServiceBuilder::new()
        .buffer(4)
        .layer(RateLimitLayer::new(Quota::per_second(20).unwrap()).with_max_wait(secs(10)))
        .concurrency_limit(1)
        .service(api);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..5usize {
        let mut s = svc.clone();
        tasks.push(tokio::spawn(async move {
            for j in 0..8usize {
                let id = w * 100 + j;
                s.ready()
                    .await
                    .unwrap()
                    .call(get_id("http://api.example.com/", id))
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        timeout(secs(10), t).await.expect("no deadlock").unwrap();
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 40);
    // 40 calls at 20/s: the last one 1.95 s after the first.
    assert_eq!(start.elapsed(), ms(1950));
}

// ---------------------------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn keys_for_ipv6_ports_case_and_host_header() {
    let api = service_fn(|_req: Request<()>| async {
        Ok::<_, Infallible>(response(429, &[("retry-after", "10")]))
    });
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    let svc = layer.layer(api);
    for uri in [
        "http://[::1]:8080/",
        "http://[FE80::ABCD]/",
        "https://User:pw@API.Example.com:8443/v1",
        "http://api.example.com:443/",
    ] {
        svc.clone().oneshot(get(uri)).await.unwrap();
    }
    // Origin-form request: the Host header's name.
    let req = Request::get("/x")
        .header("host", "Other.Example.COM:9000")
        .body(())
        .unwrap();
    svc.clone().oneshot(req).await.unwrap();
    assert_eq!(handle.pause("[::1]:8080"), Some(secs(10)));
    assert_eq!(handle.pause("[fe80::abcd]"), Some(secs(10)));
    assert_eq!(handle.pause("[FE80::abcd]"), Some(secs(10)));
    assert_eq!(handle.pause("api.example.com:8443"), Some(secs(10)));
    assert_eq!(handle.pause("API.EXAMPLE.COM:8443"), Some(secs(10)));
    assert_eq!(handle.pause("api.example.com:443"), Some(secs(10)));
    // The port is as written: no default port folding, and no port is another key.
    assert_eq!(handle.pause("api.example.com"), None);
    assert_eq!(handle.pause("other.example.com:9000"), Some(secs(10)));
    let mut keys: Vec<String> = handle.paused().into_iter().map(|(k, _)| k).collect();
    keys.sort();
    assert!(
        keys.iter().all(|k| !k.contains("pw") && !k.contains('@')),
        "{keys:?}"
    );
    assert_eq!(keys.len(), 5, "{keys:?}");
}

// ---------------------------------------------------------------------------------------------
// Inside ClientBuilder
// ---------------------------------------------------------------------------------------------

fn full_get(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::default()).unwrap()
}

#[test]
fn the_composed_client_is_send_sync_clone() {
    fn check<T: Send + Sync + Clone + 'static>(_: &T) {}
    let http = service_fn(|_req: Request<Body>| async { Ok::<_, Infallible>(Response::new(())) });
    let layer = RateLimitLayer::new(Quota::per_second(5).unwrap())
        .with_max_wait(Duration::ZERO)
        .with_key(|req: &Request<Body>| {
            req.headers()
                .get("x-tenant")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string()
        });
    let client = ClientBuilder::new().with_rate_limit(layer).build(http);
    check(&client);
    let client = ClientBuilder::new().build(http);
    check(&client);
}

#[tokio::test(start_paused = true)]
async fn client_zero_max_wait_waits_in_the_retry_sleep_or_refuses_without_retries() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let http = service_fn(move |_req: Request<Body>| {
        c.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, Infallible>(Response::new(())) }
    });
    let client = ClientBuilder::new()
        .with_rate_limit(
            RateLimitLayer::new(Quota::per_second(1).unwrap()).with_max_wait(Duration::ZERO),
        )
        .build(http);
    let start = Instant::now();
    client
        .clone()
        .oneshot(full_get("http://api.example.com/"))
        .await
        .unwrap();
    // Refused by the limiter, retried after the wait the refusal carried.
    timeout(
        secs(5),
        client.clone().oneshot(full_get("http://api.example.com/")),
    )
    .await
    .unwrap()
    .unwrap();
    // "retried after the wait the refusal carries" (the retry guide: up to +20 % jitter).
    let took = start.elapsed();
    assert!(took >= secs(1) && took <= ms(1200), "{took:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    // Without retries: refused at once, not sent, the message names the host and the wait.
    let mut req = full_get("http://API.example.com/");
    req.extensions_mut()
        .insert(CallOptions::new().without_retries());
    let before = Instant::now();
    let err = client.clone().oneshot(req).await.unwrap_err();
    assert_eq!(before.elapsed(), Duration::ZERO);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let rl = find::<RateLimited>(&*err).expect("a RateLimited in the chain");
    assert_eq!(rl.retry_after(), secs(1));
    let text = format!("{err}");
    assert!(text.contains("rate limited by api.example.com"), "{text}");
    assert!(text.contains("retry after 1s"), "{text}");
}

#[tokio::test(start_paused = true)]
async fn client_a_pause_past_the_deadline_is_refused_at_once_and_not_sent() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let http = service_fn(move |_req: Request<Body>| {
        let n = c.fetch_add(1, Ordering::SeqCst);
        async move {
            let res = if n == 0 {
                response(429, &[("retry-after", "20")])
            } else {
                response(200, &[])
            };
            Ok::<_, Infallible>(res)
        }
    });
    let client = ClientBuilder::new().build(http);
    // The first call meets the 429 (Retry-After 20 s, within max_retry_after 60 s): it waits.
    let first = tokio::spawn(client.clone().oneshot(full_get("http://api.example.com/a")));
    tokio::task::yield_now().await;
    advance(ms(10)).await;
    let mut req = full_get("http://api.example.com/b");
    req.extensions_mut()
        .insert(CallOptions::new().with_deadline(secs(2)));
    let before = Instant::now();
    let err = timeout(secs(3), client.clone().oneshot(req))
        .await
        .expect("refused at once, not at the deadline")
        .unwrap_err();
    assert!(before.elapsed() < secs(1), "waited {:?}", before.elapsed());
    let rl = find::<RateLimited>(&*err).expect("RateLimited");
    assert!(
        rl.retry_after() > secs(19) && rl.retry_after() <= secs(20),
        "{:?}",
        rl.retry_after()
    );
    assert_eq!(
        sturdy::core::classify::delivery(&*err),
        sturdy::core::Delivery::NotSent,
        "{err}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the refused call was sent");
    timeout(secs(60), first).await.unwrap().unwrap().unwrap();
}

// ---------------------------------------------------------------------------------------------
// The Redis quota (real Redis at STURDY_REDIS_URL; each test its own prefix)
// ---------------------------------------------------------------------------------------------

use sturdy::ratelimit::OnStoreError;
use sturdy::redis::RedisQuota;

fn redis_url() -> Option<String> {
    std::env::var("STURDY_REDIS_URL")
        .ok()
        .filter(|u| !u.is_empty())
}

fn unique_prefix(name: &str) -> String {
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    format!(
        "s72:{name}:{}:{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::SeqCst)
    )
}

/// A TCP proxy in front of Redis that can stop forwarding requests (a hung Redis: the
/// connection stays open, no answer comes).
struct StallProxy {
    addr: std::net::SocketAddr,
    stalled: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for StallProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn stall_proxy(target: std::net::SocketAddr) -> StallProxy {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stalled = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let st = stalled.clone();
    let task = tokio::spawn(async move {
        let mut conns = Vec::new();
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let Ok(server) = tokio::net::TcpStream::connect(target).await else {
                continue;
            };
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            let st = st.clone();
            conns.push(tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    let n = match cr.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    // A hung Redis: the request is held (not lost) until the stall ends.
                    while st.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    if sw.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }));
            conns.push(tokio::spawn(async move {
                let _ = tokio::io::copy(&mut sr, &mut cw).await;
            }));
        }
    });
    StallProxy {
        addr,
        stalled,
        task,
    }
}

fn redis_addr(url: &str) -> std::net::SocketAddr {
    let rest = url.trim_start_matches("redis://");
    let hostport = rest.split('/').next().unwrap();
    let hostport = hostport.rsplit('@').next().unwrap();
    use std::net::ToSocketAddrs;
    hostport.to_socket_addrs().unwrap().next().unwrap()
}

fn counting_api() -> (
    impl Service<Request<()>, Response = Response<()>, Error = Infallible, Future = impl Send>
        + Clone
        + Send
        + 'static,
    Arc<AtomicUsize>,
) {
    let n = Arc::new(AtomicUsize::new(0));
    let c = n.clone();
    let svc = service_fn(move |_req: Request<()>| {
        c.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, Infallible>(Response::new(())) }
    });
    (svc, n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_two_limiters_never_pass_the_shared_quota_together() {
    let Some(url) = redis_url() else {
        eprintln!("no STURDY_REDIS_URL: skipped");
        return;
    };
    let quota = Quota::per_second(40).unwrap();
    let prefix = unique_prefix("shared");
    let mut services = Vec::new();
    let mut counters = Vec::new();
    for _ in 0..2 {
        let remote = RedisQuota::connect(&url, quota)
            .await
            .unwrap()
            .with_prefix(prefix.clone());
        let layer = RateLimitLayer::new(quota)
            .with_remote(Arc::new(remote))
            .with_max_wait(Duration::ZERO);
        let (api, n) = counting_api();
        services.push(layer.layer(api));
        counters.push(n);
    }
    let start = Instant::now();
    let run_for = ms(1000);
    let mut tasks = Vec::new();
    for svc in services {
        for _ in 0..3 {
            let svc = svc.clone();
            tasks.push(tokio::spawn(async move {
                let mut ok = 0usize;
                while start.elapsed() < run_for {
                    if svc
                        .clone()
                        .oneshot(get("http://api.example.com/"))
                        .await
                        .is_ok()
                    {
                        ok += 1;
                    } else {
                        tokio::time::sleep(ms(2)).await;
                    }
                }
                ok
            }));
        }
    }
    let mut ok = 0;
    for t in tasks {
        ok += timeout(secs(10), t).await.unwrap().unwrap();
    }
    let elapsed = start.elapsed();
    let a = counters[0].load(Ordering::SeqCst);
    let b = counters[1].load(Ordering::SeqCst);
    assert_eq!(ok, a + b);
    // 40/s with a burst of 1 over the elapsed time: at most one more than the time allows.
    let allowed = (elapsed.as_secs_f64() * 40.0).floor() as usize + 1;
    assert!(
        a + b <= allowed,
        "{a} + {b} calls in {elapsed:?} through a 40/s quota"
    );
    assert!(a + b >= 30, "only {a} + {b} calls in {elapsed:?}");
    assert!(a > 0 && b > 0, "one process starved: {a} / {b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_64k_key_with_braces_is_shared_and_kept_apart() {
    let Some(url) = redis_url() else {
        return;
    };
    let quota = Quota::per_minute(1).unwrap();
    let prefix = unique_prefix("bigkey");
    let a = RedisQuota::connect(&url, quota)
        .await
        .unwrap()
        .with_prefix(prefix.clone());
    let b = RedisQuota::connect(&url, quota)
        .await
        .unwrap()
        .with_prefix(prefix.clone());
    let big = format!("t}}:{{c{}", "k".repeat(64 * 1024));
    assert!(matches!(
        a.try_reserve(&big, Duration::ZERO).await.unwrap(),
        sturdy::ratelimit::Reserve::Granted { .. }
    ));
    // The other process sees the same key as taken.
    assert!(matches!(
        b.try_reserve(&big, Duration::ZERO).await.unwrap(),
        sturdy::ratelimit::Reserve::Denied { .. }
    ));
    // A different key that a naive tag would confuse with it is its own.
    let other = RedisQuota::connect(&url, quota)
        .await
        .unwrap()
        .with_prefix(format!("{prefix}:{{t}}"));
    assert!(matches!(
        other
            .try_reserve(&format!("c{}", "k".repeat(64 * 1024)), Duration::ZERO)
            .await
            .unwrap(),
        sturdy::ratelimit::Reserve::Granted { .. }
    ));
    // Pauses on it: capped, readable, clearable.
    a.try_pause(&big, Duration::MAX).await.unwrap();
    let p = b.try_paused(&big).await.unwrap().unwrap();
    assert!(p <= DEFAULT_MAX_PAUSE && p > secs(290), "{p:?}");
    assert!(b.try_clear_pause(&big).await.unwrap().is_some());
    assert_eq!(a.try_paused(&big).await.unwrap(), None);
    // An empty key works too.
    assert!(matches!(
        a.try_reserve("", Duration::ZERO).await.unwrap(),
        sturdy::ratelimit::Reserve::Granted { .. }
    ));
    assert!(a.try_release("").await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_at_connect_is_a_clear_error_quickly() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let before = Instant::now();
    let err = timeout(
        secs(6),
        RedisQuota::connect(
            &format!("redis://127.0.0.1:{port}/"),
            Quota::per_second(1).unwrap(),
        ),
    )
    .await
    .expect("connect is bounded")
    .unwrap_err();
    assert!(before.elapsed() < secs(5), "{:?}", before.elapsed());
    let text = format!("{err}");
    let chain = {
        let mut s = text;
        let mut src = std::error::Error::source(&*err);
        while let Some(e) = src {
            s.push_str(" / ");
            s.push_str(&e.to_string());
            src = e.source();
        }
        s
    };
    assert!(
        chain.to_lowercase().contains("refused") || chain.to_lowercase().contains("connect"),
        "the error does not name the cause: {chain}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_hung_fails_open_by_default_and_closed_when_asked() {
    let Some(url) = redis_url() else {
        return;
    };
    let proxy = stall_proxy(redis_addr(&url)).await;
    let quota = Quota::per_second(1000).unwrap();
    let prefix = unique_prefix("hung");
    let remote = Arc::new(
        RedisQuota::connect(&format!("redis://{}/", proxy.addr), quota)
            .await
            .unwrap()
            .with_prefix(prefix)
            .with_timeout(ms(200)),
    );
    let (api, n) = counting_api();
    let open = RateLimitLayer::new(quota)
        .with_remote(remote.clone())
        .layer(api.clone());
    let closed = RateLimitLayer::new(quota)
        .with_remote(remote.clone())
        .with_on_store_error(OnStoreError::Fail)
        .layer(api);
    open.clone()
        .oneshot(get("http://api.example.com/"))
        .await
        .unwrap();
    assert_eq!(n.load(Ordering::SeqCst), 1);
    proxy.stalled.store(true, Ordering::SeqCst);
    // Fail open: through after the operation's timeout.
    let before = Instant::now();
    timeout(
        secs(3),
        open.clone().oneshot(get("http://api.example.com/")),
    )
    .await
    .expect("a hung store does not hang the call")
    .unwrap();
    assert!(before.elapsed() < secs(2), "{:?}", before.elapsed());
    assert_eq!(n.load(Ordering::SeqCst), 2);
    // Fail closed: an error that says the call was not sent, with the store's error inside.
    let before = Instant::now();
    let err = timeout(
        secs(3),
        closed.clone().oneshot(get("http://api.example.com/")),
    )
    .await
    .expect("a hung store does not hang the call")
    .unwrap_err();
    assert!(before.elapsed() < secs(2), "{:?}", before.elapsed());
    assert_eq!(
        n.load(Ordering::SeqCst),
        2,
        "sent although the store failed"
    );
    let text = err.to_string();
    assert!(
        text.contains("the rate-limit store failed, so the call was not sent"),
        "{text}"
    );
    assert_eq!(
        sturdy::core::classify::delivery(&*err),
        sturdy::core::Delivery::NotSent
    );
    // Redis back: calls pass again (the connection was not given up).
    proxy.stalled.store(false, Ordering::SeqCst);
    let mut ok = false;
    for _ in 0..20 {
        if closed
            .clone()
            .oneshot(get("http://api.example.com/"))
            .await
            .is_ok()
        {
            ok = true;
            break;
        }
        tokio::time::sleep(ms(100)).await;
    }
    assert!(ok, "the store never recovered after the stall ended");
}

// ---------------------------------------------------------------------------------------------
// A real peer: nginx limit_req (rate=10r/s, burst=0 nodelay, status 429)
// ---------------------------------------------------------------------------------------------

use hyper::body::Incoming;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;

const NGINX: &str = "/usr/sbin/nginx";

struct Nginx {
    child: std::process::Child,
    dir: std::path::PathBuf,
    port: u16,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn port_in_range(rng: &mut Rng) -> u16 {
    loop {
        let p = 30000 + rng.below(10000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
}

async fn start_nginx(seed: u64) -> Option<Nginx> {
    if !std::path::Path::new(NGINX).exists() {
        eprintln!("nginx not installed: skipped");
        return None;
    }
    let mut rng = Rng::seed_from_u64(seed ^ u64::from(std::process::id()));
    for attempt in 0..5 {
        let dir = std::env::temp_dir().join(format!(
            "sturdy-s72-nginx-{}-{seed}-{attempt}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (port, upstream) = (port_in_range(&mut rng), port_in_range(&mut rng));
        if port == upstream {
            continue;
        }
        let d = dir.display();
        let conf = format!(
            r#"
worker_processes 1;
daemon off;
master_process off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    limit_req_zone $server_port zone=s72:1m rate=10r/s;
    upstream answer {{ server 127.0.0.1:{upstream}; keepalive 16; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            limit_req zone=s72 nodelay;
            limit_req_status 429;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass http://answer;
        }}
    }}
    server {{
        listen 127.0.0.1:{upstream};
        location / {{ return 200 'ok'; }}
    }}
}}
"#
        );
        std::fs::write(dir.join("nginx.conf"), conf).unwrap();
        let child = std::process::Command::new(NGINX)
            .arg("-p")
            .arg(&dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nginx starts");
        let mut nginx = Nginx { child, dir, port };
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                && std::net::TcpStream::connect(("127.0.0.1", upstream)).is_ok()
            {
                // Let the zone's first admission time pass.
                tokio::time::sleep(ms(150)).await;
                return Some(nginx);
            }
            if nginx.child.try_wait().unwrap().is_some() {
                break;
            }
            tokio::time::sleep(ms(20)).await;
        }
        let log = std::fs::read_to_string(nginx.dir.join("error.log")).unwrap_or_default();
        eprintln!("nginx did not start on {port}: {log}");
    }
    panic!("nginx could not be started");
}

/// A hyper-util client that records each status with the time it came back.
#[allow(clippy::type_complexity)]
fn counted_http() -> (
    impl Service<Request<Body>, Response = Response<Incoming>, Error = BoxError, Future = impl Send>
        + Clone
        + Send
        + Sync
        + 'static,
    Arc<Mutex<Vec<(u16, Duration)>>>,
) {
    let client = HyperClient::builder(TokioExecutor::new()).build_http::<Body>();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let start = Instant::now();
    let svc = service_fn(move |req: Request<Body>| {
        let client = client.clone();
        let s = s.clone();
        async move {
            let res = client.request(req).await.map_err(BoxError::from)?;
            s.lock()
                .unwrap()
                .push((res.status().as_u16(), start.elapsed()));
            Ok::<_, BoxError>(res)
        }
    });
    (svc, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_default_client_at_full_demand_learns_the_pace() {
    let Some(nginx) = start_nginx(1).await else {
        return;
    };
    let (http, seen) = counted_http();
    let client = ClientBuilder::new().build(http);
    let uri = format!("http://127.0.0.1:{}/", nginx.port);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let c = client.clone();
        let u = uri.clone();
        tasks.push(tokio::spawn(async move { c.oneshot(full_get(&u)).await }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        let r = timeout(secs(20), t).await.expect("a call hung").unwrap();
        statuses.push(r.map(|r| r.status().as_u16()).map_err(|e| e.to_string()));
    }
    let elapsed = start.elapsed();
    let seen = seen.lock().unwrap().clone();
    let refused: Vec<Duration> = seen
        .iter()
        .filter(|(s, _)| *s == 429)
        .map(|(_, t)| *t)
        .collect();
    let ok: Vec<Duration> = seen
        .iter()
        .filter(|(s, _)| *s == 200)
        .map(|(_, t)| *t)
        .collect();
    eprintln!(
        "nginx 20 at once: {elapsed:?}, {} 429s, {} 200s; client results {statuses:?}",
        refused.len(),
        ok.len()
    );
    // The guide: all 20 succeed, with the 19 429s of the first wave and two more.
    assert!(statuses.iter().all(|s| s == &Ok(200)), "{statuses:?}");
    assert!(
        refused.len() <= 19 + 4,
        "{} 429s: the first wave's 19 and {} more",
        refused.len(),
        refused.len().saturating_sub(19)
    );
    // nginx admits one call per 100 ms: 20 successes span at least 1.9 s.
    assert!(elapsed >= ms(1800), "{elapsed:?}");
    assert!(elapsed < secs(10), "{elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_a_quota_just_under_the_servers_meets_almost_no_429() {
    let Some(nginx) = start_nginx(2).await else {
        return;
    };
    let (http, seen) = counted_http();
    let client = ClientBuilder::new()
        .with_rate_limit(RateLimitLayer::new(Quota::new(19, secs(2)).unwrap()))
        .build(http);
    let uri = format!("http://127.0.0.1:{}/", nginx.port);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..15 {
        let c = client.clone();
        let u = uri.clone();
        tasks.push(tokio::spawn(async move { c.oneshot(full_get(&u)).await }));
    }
    for t in tasks {
        let r = timeout(secs(20), t).await.expect("a call hung").unwrap();
        assert_eq!(r.unwrap().status(), 200);
    }
    let elapsed = start.elapsed();
    let seen = seen.lock().unwrap().clone();
    let refused = seen.iter().filter(|(s, _)| *s == 429).count();
    eprintln!("nginx quota 9.5/s, 15 at once: {elapsed:?}, {refused} 429s");
    assert!(
        refused <= 2,
        "{refused} 429s with a quota under the server's"
    );
    // 15 calls at 9.5/s: 14 intervals of ~105 ms.
    assert!(elapsed >= ms(1400), "{elapsed:?}");
}

// ---------------------------------------------------------------------------------------------
// Far-future bookings: sums of 30-year intervals
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn direct_reserve_of_many_thirty_year_slots_never_wraps_around() {
    // Each reserve books the next slot "used or not"; with one call per 30 years, 20 bookings
    // reach 600 years, past what a u64 of nanoseconds holds (584 years). The limiter must go on
    // refusing (or booking further away), never grant a slot now.
    let limiter = DirectLimiter::new(Quota::new(1, Duration::MAX).unwrap());
    limiter.check().unwrap();
    let mut last = Duration::ZERO;
    for i in 0..64 {
        match limiter.reserve(Duration::MAX) {
            Ok(wait) => {
                assert!(wait >= last, "booking {i}: {wait:?} after {last:?}");
                assert!(wait > Duration::ZERO, "booking {i} granted now");
                last = wait;
            }
            Err(e) => assert!(e.retry_after() > Duration::ZERO),
        }
        assert!(
            limiter.check().is_err(),
            "booking {i}: check granted a slot now"
        );
    }
    advance(secs(3600)).await;
    assert!(limiter.check().is_err());
    assert!(limiter.until_ready(secs(1)).await.is_err());
}

#[tokio::test(start_paused = true)]
async fn layer_thirty_year_quota_with_unbounded_wait_and_many_waiters() {
    let (api, n) = counting_api();
    let (layer, handle) = RateLimitLayer::new(Quota::new(1, Duration::MAX).unwrap())
        .with_max_wait(Duration::MAX)
        .pair();
    let svc = layer.layer(api);
    svc.clone()
        .oneshot(get("http://api.example.com/"))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let s = svc.clone();
        tasks.push(tokio::spawn(async move {
            s.oneshot(get("http://api.example.com/")).await
        }));
        tokio::task::yield_now().await;
    }
    advance(secs(10)).await;
    // 40 callers 30..1200 years away: still waiting (or refused), none sent, nothing panicked.
    for t in &tasks {
        assert!(!t.is_finished() || n.load(Ordering::SeqCst) == 1);
    }
    assert_eq!(
        n.load(Ordering::SeqCst),
        1,
        "a call 30+ years away was sent"
    );
    for t in tasks {
        t.abort();
        let r = t.await;
        if let Err(e) = &r {
            assert!(e.is_cancelled(), "a waiter panicked: {e}");
        }
    }
    assert_eq!(handle.waiting("api.example.com"), 0);
    // A new caller with a bounded wait is refused at once with a wait of at most 30 years.
    let err = RateLimitLayer::new(Quota::new(1, Duration::MAX).unwrap())
        .with_max_wait(Duration::ZERO)
        .layer(service_fn(|_r: Request<()>| async {
            Ok::<_, Infallible>(Response::new(()))
        }))
        .oneshot(get("http://x.example.com/"))
        .await;
    assert!(err.is_ok(), "the first call of a fresh limiter goes");
}

// ---------------------------------------------------------------------------------------------
// Pause settings at their extremes
// ---------------------------------------------------------------------------------------------

async fn bare_429s_then_count_holds(layer: RateLimitLayer) -> (RateLimitHandle, Duration, usize) {
    let (layer, handle) = layer.pair();
    let n = Arc::new(AtomicUsize::new(0));
    let c = n.clone();
    let api = service_fn(move |_req: Request<()>| {
        let k = c.fetch_add(1, Ordering::SeqCst);
        async move {
            Ok::<_, Infallible>(if k < 10 {
                response(429, &[])
            } else {
                response(200, &[])
            })
        }
    });
    let svc = layer.layer(api);
    let start = Instant::now();
    for _ in 0..20 {
        let _ = timeout(
            secs(60),
            svc.clone().oneshot(get("http://api.example.com/")),
        )
        .await
        .expect("a call hung");
    }
    (handle, start.elapsed(), n.load(Ordering::SeqCst))
}

#[tokio::test(start_paused = true)]
async fn max_pause_zero_turns_every_pause_off() {
    // "zero turns pauses off": neither a Retry-After nor a bare 429 holds anyone, and no pace.
    let (handle, took, sent) =
        bare_429s_then_count_holds(RateLimitLayer::adaptive_only().with_max_pause(Duration::ZERO))
            .await;
    assert_eq!(sent, 20);
    assert_eq!(handle.pause("api.example.com"), None);
    assert_eq!(
        took,
        Duration::ZERO,
        "calls were held {took:?} with pauses off"
    );
    assert_eq!(handle.learned_pace("api.example.com"), None);
    let p = {
        let (handle, _) = one_answer(
            None,
            "h.example.com",
            response(429, &[("retry-after", "30")]),
        )
        .await;
        handle.pause("h.example.com")
    };
    assert_eq!(p, Some(secs(30)), "sanity: default layer pauses");
    let (layer, handle) = RateLimitLayer::adaptive_only()
        .with_max_pause(Duration::ZERO)
        .pair();
    let svc = layer.layer(service_fn(|_r: Request<()>| async {
        Ok::<_, Infallible>(response(429, &[("retry-after", "30")]))
    }));
    let res = svc.oneshot(get("http://api.example.com/")).await.unwrap();
    assert_eq!(handle.pause("api.example.com"), None);
    let _ = res;
}

#[tokio::test(start_paused = true)]
async fn default_pause_zero_or_huge_is_bounded() {
    // Zero: a bare 429 holds nobody for long and nothing panics.
    let (handle, took, sent) = bare_429s_then_count_holds(
        RateLimitLayer::adaptive_only().with_default_pause(Duration::ZERO),
    )
    .await;
    assert_eq!(sent, 20);
    assert!(took <= secs(1), "held {took:?} with a zero default pause");
    let _ = handle;
    // Huge: at most max_pause ("[1 s] (at most max_pause)").
    let (handle, _) = {
        let (layer, handle) = RateLimitLayer::adaptive_only()
            .with_default_pause(Duration::MAX)
            .pair();
        let svc = layer.layer(service_fn(|_r: Request<()>| async {
            Ok::<_, Infallible>(response(429, &[]))
        }));
        let res = svc.oneshot(get("http://api.example.com/")).await.unwrap();
        (handle, res)
    };
    assert_eq!(handle.pause("api.example.com"), Some(DEFAULT_MAX_PAUSE));
}

#[tokio::test(start_paused = true)]
async fn max_pause_duration_max_reads_as_thirty_years() {
    let (layer, handle) = RateLimitLayer::adaptive_only()
        .with_max_pause(Duration::MAX)
        .pair();
    let svc = layer.layer(service_fn(|_r: Request<()>| async {
        Ok::<_, Infallible>(response(429, &[("retry-after", "99999999999999999999")]))
    }));
    let res = svc
        .clone()
        .oneshot(get("http://api.example.com/"))
        .await
        .unwrap();
    assert_eq!(handle.pause("api.example.com"), Some(FAR));
    assert_eq!(
        res.extensions().get::<PauseCapped>().unwrap().applied(),
        FAR
    );
    // The next call is refused at once (its 30-year wait is past max_wait), no panic.
    let err = svc
        .clone()
        .oneshot(get("http://api.example.com/"))
        .await
        .unwrap_err();
    let rl = find::<RateLimited>(&*err).unwrap();
    assert!(
        rl.retry_after() <= FAR && rl.retry_after() > secs(86_400),
        "{:?}",
        rl.retry_after()
    );
    assert_eq!(handle.clear_pause("api.example.com"), Some(FAR));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_pause_reaches_the_other_process_and_a_dropped_waiter_gives_its_slot_back() {
    let Some(url) = redis_url() else {
        return;
    };
    let quota = Quota::per_second(10).unwrap();
    let prefix = unique_prefix("pause");
    let ra = Arc::new(
        RedisQuota::connect(&url, quota)
            .await
            .unwrap()
            .with_prefix(prefix.clone()),
    );
    let rb = Arc::new(
        RedisQuota::connect(&url, quota)
            .await
            .unwrap()
            .with_prefix(prefix.clone()),
    );
    // Process A's server answers 429 Retry-After: 2 to its first call.
    let k = Arc::new(AtomicUsize::new(0));
    let kc = k.clone();
    let api_a = service_fn(move |_r: Request<()>| {
        let n = kc.fetch_add(1, Ordering::SeqCst);
        async move {
            Ok::<_, Infallible>(if n == 0 {
                response(429, &[("retry-after", "2")])
            } else {
                response(200, &[])
            })
        }
    });
    let a = RateLimitLayer::new(quota)
        .with_remote(ra.clone())
        .layer(api_a);
    let (api_b, nb) = counting_api();
    let b = RateLimitLayer::new(quota)
        .with_remote(rb.clone())
        .with_max_wait(Duration::ZERO)
        .layer(api_b);
    let res = a
        .clone()
        .oneshot(get("http://API.example.com/"))
        .await
        .unwrap();
    assert_eq!(res.status(), 429);
    // Published in the background, one round trip later.
    let mut seen = None;
    for _ in 0..50 {
        seen = rb.try_paused("api.example.com").await.unwrap();
        if seen.is_some() {
            break;
        }
        tokio::time::sleep(ms(10)).await;
    }
    let left = seen.expect("the pause never reached Redis");
    assert!(left > ms(1500) && left <= secs(2), "{left:?}");
    let err = b
        .clone()
        .oneshot(get("http://api.example.com/"))
        .await
        .unwrap_err();
    let rl = find::<RateLimited>(&*err).expect("RateLimited");
    assert!(rl.retry_after() > ms(1000), "{:?}", rl.retry_after());
    assert_eq!(nb.load(Ordering::SeqCst), 0);
    assert!(rb
        .try_clear_pause("api.example.com")
        .await
        .unwrap()
        .is_some());

    // Release: a fresh key; B takes the slot now, A's caller is granted the next (100 ms away)
    // and dropped after 20 ms; B's next caller is then granted about 100 ms from the start, not
    // 200 ms.
    let key_host = "rel.example.com";
    let (api, _) = counting_api();
    let a2 = RateLimitLayer::new(quota)
        .with_remote(ra.clone())
        .with_max_wait(secs(5))
        .layer(api.clone());
    let b2 = RateLimitLayer::new(quota)
        .with_remote(rb.clone())
        .with_max_wait(secs(5))
        .layer(api);
    let uri = format!("http://{key_host}/");
    let start = Instant::now();
    b2.clone().oneshot(get(&uri)).await.unwrap();
    let dropped = timeout(ms(20), a2.clone().oneshot(get(&uri))).await;
    assert!(dropped.is_err(), "the second call should wait ~100 ms");
    tokio::time::sleep(ms(30)).await;
    b2.clone().oneshot(get(&uri)).await.unwrap();
    let took = start.elapsed();
    assert!(
        took < ms(170),
        "the dropped call's slot was not given back: {took:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Events and handle words
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn events_for_waits_refusals_and_pauses() {
    use sturdy::core::events::Event;
    let log: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let l = log.clone();
    let layer = RateLimitLayer::new(Quota::per_second(10).unwrap())
        .with_max_wait(ms(150))
        .on_event(move |e| {
            let line = match e {
                Event::RateLimitWaited { key, host, wait } => {
                    format!("waited {key} {host:?} {wait:?}")
                }
                Event::RateLimitRefused { key, host, wait } => {
                    format!("refused {key} {host:?} {wait:?}")
                }
                Event::RateLimitPaused {
                    key,
                    host,
                    status,
                    source,
                    pause,
                    capped,
                } => {
                    format!(
                        "paused {key} {host:?} {} {source:?} {pause:?} {capped}",
                        status.as_u16()
                    )
                }
                _ => return,
            };
            l.lock().unwrap().push(line);
        });
    let n = Arc::new(AtomicUsize::new(0));
    let c = n.clone();
    let api = service_fn(move |_r: Request<()>| {
        let k = c.fetch_add(1, Ordering::SeqCst);
        async move {
            Ok::<_, Infallible>(match k {
                3 => response(429, &[("retry-after", "junk")]),
                _ => response(200, &[]),
            })
        }
    });
    let svc = layer.layer(api);
    let u = "http://API.example.com/";
    svc.clone().oneshot(get(u)).await.unwrap(); // 0: now
    svc.clone().oneshot(get(u)).await.unwrap(); // 1: waits 100 ms
    let a = tokio::spawn(svc.clone().oneshot(get(u))); // 2: waits 100 ms
    tokio::task::yield_now().await;
    let refused = svc.clone().oneshot(get(u)).await; // would wait 200 ms > 150 ms
    assert!(refused.is_err());
    a.await.unwrap().unwrap();
    advance(ms(100)).await;
    svc.clone().oneshot(get(u)).await.unwrap(); // 3: the bare-ish 429
    let log = log.lock().unwrap().clone();
    assert_eq!(
        log,
        vec![
            "waited api.example.com Some(\"api.example.com\") 100ms".to_string(),
            "waited api.example.com Some(\"api.example.com\") 100ms".to_string(),
            "refused api.example.com Some(\"api.example.com\") 200ms".to_string(),
            "paused api.example.com Some(\"api.example.com\") 429 None 1s false".to_string(),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_long_pause_tells_the_waiting_calls_at_once() {
    // Quota 1/s, max_wait 5 s: a call waits for its slot; the answer to the call in flight asks
    // for 60 s. "calls already waiting in line are told as soon as such a pause arrives".
    let api = service_fn(|_r: Request<()>| async {
        tokio::time::sleep(ms(200)).await;
        Ok::<_, Infallible>(response(429, &[("retry-after", "60")]))
    });
    let svc = RateLimitLayer::new(Quota::per_second(1).unwrap())
        .with_max_wait(secs(5))
        .layer(api);
    let start = Instant::now();
    let first = tokio::spawn(svc.clone().oneshot(get("http://api.example.com/")));
    tokio::task::yield_now().await;
    let waiting = tokio::spawn(svc.clone().oneshot(get("http://api.example.com/")));
    first.await.unwrap().unwrap();
    let err = timeout(secs(10), waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(
        start.elapsed(),
        ms(200),
        "told when the pause arrived, not later"
    );
    let rl = find::<RateLimited>(&*err).unwrap();
    assert_eq!(rl.retry_after(), secs(60));
}

#[tokio::test(start_paused = true)]
async fn a_handle_taken_before_with_key_looks_keys_up_as_given() {
    let base = RateLimitLayer::adaptive_only();
    let handle = base.handle();
    let layer = base.with_key(|req: &Request<()>| {
        req.headers()
            .get("x-tenant")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    });
    let svc = layer.layer(service_fn(|_r: Request<()>| async {
        Ok::<_, Infallible>(response(429, &[("retry-after", "9")]))
    }));
    let req = Request::get("http://api.example.com/")
        .header("x-tenant", "Tenant-A")
        .body(())
        .unwrap();
    svc.oneshot(req).await.unwrap();
    assert_eq!(handle.pause("Tenant-A"), Some(secs(9)));
    assert_eq!(handle.pause("tenant-a"), None);
    assert_eq!(handle.pause("api.example.com"), None);
}

// ---------------------------------------------------------------------------------------------
// Pauses: overlap, slow start's max_wait, Redis caps
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_bare_429_answering_a_call_sent_before_the_pause_changes_nothing() {
    // Two calls in flight; the first answer asks for 10 s, the second is a bare 429 (sent
    // before the pause): "changes nothing (neither the pace nor the pause's end)".
    let n = Arc::new(AtomicUsize::new(0));
    let c = n.clone();
    let api = service_fn(move |_r: Request<()>| {
        let k = c.fetch_add(1, Ordering::SeqCst);
        async move {
            if k == 0 {
                tokio::time::sleep(ms(10)).await;
                Ok::<_, Infallible>(response(429, &[("retry-after", "10")]))
            } else {
                tokio::time::sleep(ms(50)).await;
                Ok(response(429, &[]))
            }
        }
    });
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    let svc = layer.layer(api);
    let a = tokio::spawn(svc.clone().oneshot(get("http://api.example.com/")));
    let b = tokio::spawn(svc.clone().oneshot(get("http://api.example.com/")));
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
    // 50 ms in: 9.96 s left of the 10 s pause, no pace learned.
    assert_eq!(handle.pause("api.example.com"), Some(ms(9960)));
    assert_eq!(handle.learned_pace("api.example.com"), None);
}

#[tokio::test(start_paused = true)]
async fn a_later_shorter_reset_never_cuts_a_pause_short() {
    let n = Arc::new(AtomicUsize::new(0));
    let c = n.clone();
    let api = service_fn(move |_r: Request<()>| {
        let k = c.fetch_add(1, Ordering::SeqCst);
        async move {
            if k == 0 {
                tokio::time::sleep(ms(10)).await;
                Ok::<_, Infallible>(response(429, &[("retry-after", "10")]))
            } else {
                tokio::time::sleep(ms(50)).await;
                Ok(response(200, &[("ratelimit", r#""d";r=0;t=2"#)]))
            }
        }
    });
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    let svc = layer.layer(api);
    let a = tokio::spawn(svc.clone().oneshot(get("http://api.example.com/")));
    let b = tokio::spawn(svc.clone().oneshot(get("http://api.example.com/")));
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
    assert_eq!(handle.pause("api.example.com"), Some(ms(9960)));
}

#[tokio::test(start_paused = true)]
async fn slow_start_waiters_fail_at_max_wait_when_the_released_call_never_answers() {
    // adaptive_only: after a pause, one call is let out; if it never answers, the others wait
    // until their max_wait and then fail with RateLimited suggesting the default pause (1 s).
    let n = Arc::new(AtomicUsize::new(0));
    let c = n.clone();
    let api = service_fn(move |_r: Request<()>| {
        let k = c.fetch_add(1, Ordering::SeqCst);
        async move {
            match k {
                0 => Ok::<_, Infallible>(response(429, &[("retry-after", "1")])),
                1 => {
                    std::future::pending::<()>().await;
                    unreachable!()
                }
                _ => Ok(response(200, &[])),
            }
        }
    });
    let (layer, handle) = RateLimitLayer::adaptive_only()
        .with_max_wait(secs(3))
        .pair();
    let svc = layer.layer(api);
    svc.clone()
        .oneshot(get("http://api.example.com/"))
        .await
        .unwrap();
    let start = Instant::now();
    let hung = tokio::spawn(svc.clone().oneshot(get("http://api.example.com/")));
    tokio::task::yield_now().await;
    let mut others = Vec::new();
    for _ in 0..4 {
        others.push(tokio::spawn(
            svc.clone().oneshot(get("http://api.example.com/")),
        ));
        tokio::task::yield_now().await;
    }
    for o in others {
        let err = timeout(secs(10), o).await.unwrap().unwrap().unwrap_err();
        let rl = find::<RateLimited>(&*err).expect("RateLimited");
        assert_eq!(rl.retry_after(), secs(1), "the default pause is suggested");
    }
    assert_eq!(start.elapsed(), secs(3), "failed at max_wait");
    assert_eq!(n.load(Ordering::SeqCst), 2);
    assert_eq!(handle.waiting("api.example.com"), 0);
    // The hung call is dropped: its place is given back, the next call goes at once.
    hung.abort();
    let _ = hung.await;
    let before = Instant::now();
    timeout(secs(5), svc.clone().oneshot(get("http://api.example.com/")))
        .await
        .expect("the place of the dropped call was not given back")
        .unwrap();
    assert_eq!(before.elapsed(), Duration::ZERO);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_longer_pause_from_another_process_is_cut_to_the_cap() {
    let Some(url) = redis_url() else {
        return;
    };
    let quota = Quota::per_second(10).unwrap();
    let prefix = unique_prefix("cap");
    let long = RedisQuota::connect(&url, quota)
        .await
        .unwrap()
        .with_prefix(prefix.clone())
        .with_max_pause(secs(3600));
    let short = RedisQuota::connect(&url, quota)
        .await
        .unwrap()
        .with_prefix(prefix.clone());
    long.try_pause("k", secs(3600)).await.unwrap();
    let p = long.try_paused("k").await.unwrap().unwrap();
    assert!(p > secs(3000), "{p:?}");
    // "a longer one written by another process is cut to it by the next decision"
    let r = short.try_reserve("k", Duration::ZERO).await.unwrap();
    assert!(
        matches!(r, sturdy::ratelimit::Reserve::Denied { .. }),
        "{r:?}"
    );
    if let sturdy::ratelimit::Reserve::Denied { retry_after } = r {
        assert!(retry_after <= DEFAULT_MAX_PAUSE, "{retry_after:?}");
    }
    let p = short.try_paused("k").await.unwrap().unwrap();
    assert!(p <= DEFAULT_MAX_PAUSE, "the pause key still lives {p:?}");
    // Tiny and zero pauses.
    short.try_pause("z", Duration::ZERO).await.unwrap();
    assert_eq!(
        short.try_paused("z").await.unwrap(),
        None,
        "a zero pause wrote something"
    );
    short.try_pause("t", Duration::from_nanos(1)).await.unwrap();
    let t = short.try_paused("t").await.unwrap();
    assert!(t.is_none_or(|t| t <= ms(1)), "{t:?}");
}

// ---------------------------------------------------------------------------------------------
// A hostile remote store (RemoteQuota's contract from the layer's side)
// ---------------------------------------------------------------------------------------------

use sturdy::ratelimit::{BoxFuture, RemoteQuota, Reserve};

#[derive(Debug, Default)]
struct FakeStore {
    answer: Mutex<Option<Result<Reserve, String>>>,
    hang: std::sync::atomic::AtomicBool,
    reserves: AtomicUsize,
    releases: AtomicUsize,
    pauses: Mutex<Vec<(String, Duration)>>,
}

impl RemoteQuota for FakeStore {
    fn reserve(&self, _key: &str, _max_wait: Duration) -> BoxFuture<Result<Reserve, BoxError>> {
        self.reserves.fetch_add(1, Ordering::SeqCst);
        let hang = self.hang.load(Ordering::SeqCst);
        let answer = self
            .answer
            .lock()
            .unwrap()
            .clone()
            .unwrap_or(Ok(Reserve::Granted {
                wait: Duration::ZERO,
            }));
        Box::pin(async move {
            if hang {
                std::future::pending::<()>().await;
            }
            answer.map_err(BoxError::from)
        })
    }
    fn pause(&self, key: &str, duration: Duration) -> BoxFuture<Result<(), BoxError>> {
        self.pauses
            .lock()
            .unwrap()
            .push((key.to_string(), duration));
        Box::pin(async { Ok(()) })
    }
    fn release(&self, _key: &str) -> BoxFuture<Result<(), BoxError>> {
        self.releases.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Ok(()) })
    }
}

fn with_store(
    store: &Arc<FakeStore>,
    layer: RateLimitLayer,
) -> (
    impl Service<Request<()>, Response = Response<()>, Error = BoxError, Future = impl Send> + Clone,
    Arc<AtomicUsize>,
) {
    let (api, n) = counting_api();
    let remote: Arc<dyn RemoteQuota> = store.clone();
    (layer.with_remote(remote).layer(api), n)
}

#[tokio::test(start_paused = true)]
async fn a_store_granting_past_max_wait_is_released_and_refused() {
    let store = Arc::new(FakeStore::default());
    *store.answer.lock().unwrap() = Some(Ok(Reserve::Granted {
        wait: Duration::MAX,
    }));
    let (svc, n) = with_store(&store, RateLimitLayer::new(Quota::per_second(10).unwrap()));
    let err = timeout(secs(5), svc.clone().oneshot(get("http://api.example.com/")))
        .await
        .expect("refused at once, not held")
        .unwrap_err();
    let rl = find::<RateLimited>(&*err).expect("RateLimited");
    assert!(
        rl.retry_after() <= DEFAULT_MAX_PAUSE,
        "{:?}",
        rl.retry_after()
    );
    assert_eq!(n.load(Ordering::SeqCst), 0);
    tokio::task::yield_now().await;
    assert_eq!(
        store.releases.load(Ordering::SeqCst),
        1,
        "the grant was not released once"
    );
}

#[tokio::test(start_paused = true)]
async fn a_store_denying_for_ever_is_capped_at_max_pause() {
    let store = Arc::new(FakeStore::default());
    *store.answer.lock().unwrap() = Some(Ok(Reserve::Denied {
        retry_after: Duration::MAX,
    }));
    let (svc, n) = with_store(&store, RateLimitLayer::new(Quota::per_second(10).unwrap()));
    let err = svc
        .clone()
        .oneshot(get("http://api.example.com/"))
        .await
        .unwrap_err();
    let rl = find::<RateLimited>(&*err).expect("RateLimited");
    assert!(
        rl.retry_after() <= DEFAULT_MAX_PAUSE,
        "{:?}",
        rl.retry_after()
    );
    assert!(err.to_string().contains("api.example.com"), "{err}");
    assert_eq!(n.load(Ordering::SeqCst), 0);
    assert_eq!(store.releases.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn a_granted_waiter_dropped_releases_once_and_a_pause_is_published_capped() {
    let store = Arc::new(FakeStore::default());
    *store.answer.lock().unwrap() = Some(Ok(Reserve::Granted { wait: secs(2) }));
    let (svc, n) = with_store(&store, RateLimitLayer::new(Quota::per_second(10).unwrap()));
    let r = timeout(ms(500), svc.clone().oneshot(get("http://api.example.com/"))).await;
    assert!(r.is_err());
    tokio::task::yield_now().await;
    advance(ms(1)).await;
    assert_eq!(store.releases.load(Ordering::SeqCst), 1);
    assert_eq!(n.load(Ordering::SeqCst), 0);
    // A store that never answers: the call is dropped by a timeout; nothing released (nothing
    // granted), nothing sent, no panic.
    store.hang.store(true, Ordering::SeqCst);
    let r = timeout(ms(500), svc.clone().oneshot(get("http://api.example.com/"))).await;
    assert!(r.is_err());
    advance(secs(5)).await;
    assert_eq!(store.releases.load(Ordering::SeqCst), 1);
    // Pauses go to the store capped, under the key as kept.
    store.hang.store(false, Ordering::SeqCst);
    *store.answer.lock().unwrap() = Some(Ok(Reserve::Granted {
        wait: Duration::ZERO,
    }));
    let api = service_fn(|_r: Request<()>| async {
        Ok::<_, Infallible>(response(429, &[("retry-after", "99999999999")]))
    });
    let remote: Arc<dyn RemoteQuota> = store.clone();
    let svc = RateLimitLayer::new(Quota::per_second(10).unwrap())
        .with_remote(remote)
        .layer(api);
    svc.oneshot(get("http://API.Example.com/")).await.unwrap();
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    let pauses = store.pauses.lock().unwrap().clone();
    assert_eq!(
        pauses,
        vec![("api.example.com".to_string(), DEFAULT_MAX_PAUSE)]
    );
}

#[tokio::test(start_paused = true)]
async fn a_failing_store_allows_by_default_and_fails_with_its_cause_when_asked() {
    let store = Arc::new(FakeStore::default());
    *store.answer.lock().unwrap() = Some(Err("redis exploded: ECONNREFUSED".to_string()));
    let (open, n) = with_store(&store, RateLimitLayer::new(Quota::per_second(10).unwrap()));
    open.clone()
        .oneshot(get("http://api.example.com/"))
        .await
        .unwrap();
    assert_eq!(n.load(Ordering::SeqCst), 1);
    let (closed, n) = with_store(
        &store,
        RateLimitLayer::new(Quota::per_second(10).unwrap()).with_on_store_error(OnStoreError::Fail),
    );
    let err = closed
        .oneshot(get("http://api.example.com/"))
        .await
        .unwrap_err();
    assert_eq!(n.load(Ordering::SeqCst), 0);
    let mut chain = err.to_string();
    let mut src = std::error::Error::source(&*err);
    while let Some(e) = src {
        chain.push_str(" / ");
        chain.push_str(&e.to_string());
        src = e.source();
    }
    assert!(
        chain.contains("the rate-limit store failed, so the call was not sent"),
        "{chain}"
    );
    assert!(
        chain.contains("redis exploded: ECONNREFUSED"),
        "the store's error is not its source: {chain}"
    );
}

#[tokio::test(start_paused = true)]
async fn no_pace_is_learned_with_a_release_pace_or_a_remote_store() {
    for variant in 0..2 {
        let mut layer = RateLimitLayer::adaptive_only();
        if variant == 0 {
            layer = layer.with_release_pace(ms(10));
        } else {
            let remote: Arc<dyn RemoteQuota> = Arc::new(FakeStore::default());
            layer = layer.with_remote(remote);
        }
        let (layer, handle) = layer.pair();
        let svc = layer.layer(service_fn(|_r: Request<()>| async {
            Ok::<_, Infallible>(response(429, &[]))
        }));
        for _ in 0..3 {
            let _ = svc.clone().oneshot(get("http://api.example.com/")).await;
            advance(secs(2)).await;
        }
        assert_eq!(
            handle.learned_pace("api.example.com"),
            None,
            "variant {variant}"
        );
    }
    // Sanity: the default learns one.
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    let svc = layer.layer(service_fn(|_r: Request<()>| async {
        Ok::<_, Infallible>(response(429, &[]))
    }));
    svc.oneshot(get("http://api.example.com/")).await.unwrap();
    assert_eq!(handle.learned_pace("api.example.com"), Some(ms(125)));
}

// ---------------------------------------------------------------------------------------------
// Which statuses and headers pause
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn which_answers_pause_and_which_do_not() {
    // Retry-After pauses on a 429 or a 503 only.
    assert_eq!(pause_of(200, &[("retry-after", "30")]).await, None);
    assert_eq!(pause_of(301, &[("retry-after", "30")]).await, None);
    assert_eq!(pause_of(500, &[("retry-after", "30")]).await, None);
    assert_eq!(
        pause_of(503, &[("retry-after", "30")]).await,
        Some(secs(30))
    );
    // A bare 503 pauses only with with_bare_503_pauses(true).
    assert_eq!(pause_of(503, &[]).await, None);
    let (layer, handle) = RateLimitLayer::adaptive_only()
        .with_bare_503_pauses(true)
        .pair();
    let svc = layer.layer(service_fn(|_r: Request<()>| async {
        Ok::<_, Infallible>(response(503, &[]))
    }));
    svc.oneshot(get("http://api.example.com/")).await.unwrap();
    assert_eq!(handle.pause("api.example.com"), Some(secs(1)));
    // A bare 429: 1 s.
    assert_eq!(pause_of(429, &[]).await, Some(secs(1)));
    // X-RateLimit-Remaining: 0 without a reset on a 200: nothing says how long.
    assert_eq!(pause_of(200, &[("x-ratelimit-remaining", "0")]).await, None);
    // Several policies exhausted: the longest wait.
    assert_eq!(
        pause_of(200, &[("ratelimit", r#""a";r=0;t=5, "b";r=0;t=50"#)]).await,
        Some(secs(50))
    );
}

#[tokio::test(start_paused = true)]
async fn clear_pause_releases_the_waiters_at_the_quotas_pace() {
    let start = Instant::now();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let api = service_fn(move |req: Request<()>| {
        let id: usize = req.headers()["x-id"].to_str().unwrap().parse().unwrap();
        s2.lock().unwrap().push((id, start.elapsed()));
        async move {
            Ok::<_, Infallible>(if id == 0 {
                response(429, &[("retry-after", "60")])
            } else {
                response(200, &[])
            })
        }
    });
    let (layer, handle) = RateLimitLayer::new(Quota::per_second(10).unwrap())
        .with_max_wait(secs(120))
        .pair();
    let svc = layer.layer(api);
    svc.clone()
        .oneshot(get_id("http://api.example.com/", 0))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 1..=5 {
        tasks.push(tokio::spawn(
            svc.clone().oneshot(get_id("http://api.example.com/", i)),
        ));
        tokio::task::yield_now().await;
    }
    advance(secs(1)).await;
    assert_eq!(handle.waiting("api.example.com"), 5);
    assert_eq!(handle.clear_pause("API.example.com"), Some(secs(59)));
    for t in tasks {
        timeout(secs(5), t).await.unwrap().unwrap().unwrap();
    }
    let seen = seen.lock().unwrap().clone();
    let times: Vec<(usize, Duration)> = seen.into_iter().skip(1).collect();
    assert_eq!(
        times,
        vec![
            (1, ms(1000)),
            (2, ms(1100)),
            (3, ms(1200)),
            (4, ms(1300)),
            (5, ms(1400))
        ]
    );
}
