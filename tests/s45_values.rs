//! Largest, smallest, oldest, newest and malformed values fed to today's changes:
//! `clock::doubled`, `Backoff::exponential`/`full_jitter`, `X-RateLimit-Reset` (decimal Unix times,
//! RFC 3339), the 4,096-member structured-field list bound, `MemoryQueue::new(usize::MAX)` and
//! Redis's `Duration::MAX` timeouts.
#![cfg(feature = "full")]

use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderValue};
use sturdy::core::clock::doubled;
use sturdy::core::headers::sf::{parse_list, MAX_LIST_MEMBERS};
use sturdy::core::headers::XRateLimit;
use sturdy::retry::Backoff;

/// A reference model of `min(cap, base * 2^times)` in u128 nanoseconds, saturating.
fn model(base: Duration, times: u32, cap: Duration) -> Duration {
    let n = base.as_nanos();
    let scaled = if n == 0 {
        0
    } else if times >= 128 {
        u128::MAX
    } else {
        n.saturating_mul(1u128 << times)
    };
    let c = scaled.min(cap.as_nanos());
    Duration::new(
        u64::try_from(c / 1_000_000_000).unwrap(),
        u32::try_from(c % 1_000_000_000).unwrap(),
    )
}

/// A seeded xorshift, so the sweep is the same on every run.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn duration(&mut self) -> Duration {
        match self.next() % 6 {
            0 => Duration::ZERO,
            1 => Duration::MAX,
            2 => Duration::from_nanos(self.next() % 1_000),
            3 => Duration::new(self.next(), (self.next() % 1_000_000_000) as u32),
            4 => Duration::from_nanos(self.next()),
            _ => Duration::from_millis(self.next() % 10_000_000),
        }
    }
}

#[test]
fn doubled_is_exactly_min_cap_base_times_two_to_the_times() {
    let mut rng = Rng(0x5eed_0045);
    for _ in 0..50_000 {
        let base = rng.duration();
        let cap = rng.duration();
        let times = match rng.next() % 4 {
            0 => (rng.next() % 140) as u32,
            1 => u32::MAX - (rng.next() % 3) as u32,
            2 => (rng.next() % 70) as u32,
            _ => rng.next() as u32,
        };
        assert_eq!(
            doubled(base, times, cap),
            model(base, times, cap),
            "doubled({base:?}, {times}, {cap:?})"
        );
    }
    // The extremes, one by one.
    let max = Duration::MAX;
    assert_eq!(doubled(Duration::ZERO, u32::MAX, max), Duration::ZERO);
    assert_eq!(doubled(max, 0, max), max);
    assert_eq!(doubled(max, 1, max), max);
    assert_eq!(doubled(max, 0, Duration::ZERO), Duration::ZERO);
    assert_eq!(
        doubled(Duration::from_secs(10), 0, Duration::from_secs(1)),
        Duration::from_secs(1),
        "cap below base: min(cap, base)"
    );
    // One nanosecond doubled 63 and 64 times (u64 boundaries) and 95 times (past u64 seconds).
    let ns = Duration::from_nanos(1);
    assert_eq!(doubled(ns, 63, max), Duration::from_nanos(1 << 63));
    assert_eq!(doubled(ns, 64, max), model(ns, 64, max));
    assert_eq!(doubled(ns, 95, max), model(ns, 95, max));
    assert_eq!(doubled(ns, 127, max), max);
    assert_eq!(doubled(ns, 128, max), max);
}

#[test]
fn exponential_and_full_jitter_double_every_retry_to_their_cap() {
    let ns = Duration::from_nanos(1);
    for cap in [
        Duration::from_secs(3_600),
        Duration::from_secs(300),
        Duration::MAX,
        Duration::from_nanos(3),
    ] {
        let e = Backoff::exponential(ns, cap).unwrap();
        let j = Backoff::full_jitter(ns, cap).unwrap();
        let mut last = Duration::ZERO;
        for retry in (1..=200u32).chain([u32::MAX - 1, u32::MAX]) {
            let want = model(ns, retry - 1, cap);
            assert_eq!(e.delay(retry, None, 7), want, "exponential retry {retry}");
            assert!(want >= last, "never shrinks");
            last = want;
            // Full jitter draws on [0, want]: the largest draw is `want`, the smallest zero.
            // The largest draw is `want`, up to the rounding of a 64-bit draw over a span past
            // 2^64 ns (a few parts in 10^19).
            let hi = j.delay(retry, None, u64::MAX);
            let slack = Duration::from_nanos(u64::try_from(want.as_nanos() >> 62).unwrap() + 1);
            assert!(
                hi <= want && want - hi <= slack,
                "full_jitter hi {retry}: {hi:?} vs {want:?}"
            );
            assert_eq!(j.delay(retry, None, 0), Duration::ZERO);
            let mid = j.delay(retry, None, u64::MAX / 2);
            assert!(mid <= want);
        }
        // The cap is reached.
        assert_eq!(e.delay(u32::MAX, None, 0), cap);
    }
    // Doc: "1 ms never reached 5 min" before: it does now.
    let e = Backoff::exponential(Duration::from_millis(1), Duration::from_secs(300)).unwrap();
    assert_eq!(e.delay(20, None, 0), Duration::from_secs(300));
    assert_eq!(e.delay(19, None, 0), Duration::from_millis(1 << 18));
    // Validation stays: zero base and base over cap are refused.
    assert!(Backoff::exponential(Duration::ZERO, Duration::MAX).is_err());
    assert!(Backoff::full_jitter(Duration::MAX, Duration::from_secs(1)).is_err());
    assert!(Backoff::full_jitter(Duration::MAX, Duration::MAX).is_ok());
}

fn reset(value: &[u8], now: SystemTime) -> Option<Duration> {
    let mut h = HeaderMap::new();
    h.insert("x-ratelimit-reset", HeaderValue::from_bytes(value).unwrap());
    XRateLimit::from_headers(&h, now).and_then(|x| x.reset)
}

fn at(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

#[test]
fn x_ratelimit_reset_reads_decimal_unix_times_as_times() {
    let now = at(1_700_000_000);
    assert_eq!(
        reset(b"1700000042.5", now),
        Some(Duration::from_millis(42_500))
    );
    assert_eq!(reset(b"1700000042", now), Some(Duration::from_secs(42)));
    // Milliseconds, whole and decimal.
    assert_eq!(
        reset(b"1700000042500", now),
        Some(Duration::from_millis(42_500))
    );
    let ms = reset(b"1700000042500.5", now).unwrap();
    assert!(
        ms >= Duration::from_millis(42_500) && ms < Duration::from_millis(42_501),
        "{ms:?}"
    );
    // Exactly at the range boundary: 10^9 is a Unix time (in the past: zero).
    assert_eq!(reset(b"1000000000.0", now), Some(Duration::ZERO));
    assert_eq!(reset(b"1000000000", now), Some(Duration::ZERO));
    // Below it, seconds to wait, decimal too.
    assert_eq!(reset(b"1.5", now), Some(Duration::from_millis(1_500)));
    assert_eq!(reset(b"0.0", now), Some(Duration::ZERO));
    // A past decimal time reads as zero.
    assert_eq!(reset(b"1699999999.9", now), Some(Duration::ZERO));
    // Surrounding spaces are allowed as for whole numbers.
    assert_eq!(
        reset(b" 1700000042.5 ", now),
        Some(Duration::from_millis(42_500))
    );
}

#[test]
fn x_ratelimit_reset_decimal_malformed_and_huge_values_never_panic() {
    let now = at(1_700_000_000);
    for v in [
        &b"."[..],
        b"..",
        b"1..5",
        b"1.2.3",
        b"-1.5",
        b"+1.5",
        b"1e3",
        b"NaN",
        b"inf",
        b"1,5",
        b"",
    ] {
        assert_eq!(reset(v, now), None, "{:?}", String::from_utf8_lossy(v));
    }
    // Huge: a 400-digit decimal (f64 infinity) is as far as any, not a panic.
    let huge = format!("{}.0", "9".repeat(400));
    let d = reset(huge.as_bytes(), now);
    assert!(
        d.is_none_or(|d| d > Duration::from_secs(86_400 * 365)),
        "{d:?}"
    );
    let huge_whole = "9".repeat(400);
    let d = reset(huge_whole.as_bytes(), now).unwrap();
    assert!(d > Duration::from_secs(86_400 * 365));
    // Trailing and leading dots are numbers for Rust's f64 parser; whatever they read, no panic
    // and nothing negative.
    let _ = reset(b"1700000042.", now);
    let _ = reset(b".5", now);
}

#[test]
fn x_ratelimit_reset_reads_rfc3339_date_times() {
    let now = at(1_764_903_600); // 2025-12-05T03:00:00Z
    assert_eq!(
        reset(b"2025-12-05T03:00:42Z", now),
        Some(Duration::from_secs(42))
    );
    assert_eq!(
        reset(b"2025-12-05t03:00:42z", now),
        Some(Duration::from_secs(42))
    );
    // The rustdoc's own second example form: a space, a fraction, an offset.
    assert_eq!(
        reset(b"2025-12-05 04:00:42.250+01:00", now),
        Some(Duration::from_millis(42_250))
    );
    assert_eq!(
        reset(b"2025-12-05T02:00:42-01:00", now),
        Some(Duration::from_secs(42))
    );
    // In the past: zero.
    assert_eq!(reset(b"2025-12-05T02:59:00Z", now), Some(Duration::ZERO));
    assert_eq!(reset(b"1970-01-01T00:00:00Z", now), Some(Duration::ZERO));
    // Nine fraction digits and more.
    assert_eq!(
        reset(b"2025-12-05T03:00:00.123456789Z", now),
        Some(Duration::from_nanos(123_456_789))
    );
    assert_eq!(
        reset(b"2025-12-05T03:00:00.1234567891234Z", now),
        Some(Duration::from_nanos(123_456_789))
    );
    // Newest: year 9999.
    assert!(
        reset(b"9999-12-31T23:59:59Z", now).unwrap() > Duration::from_secs(86_400 * 365 * 7_000)
    );
    // Leap day, leap second.
    assert!(reset(b"2028-02-29T00:00:00Z", now).is_some());
    assert_eq!(reset(b"2027-02-29T00:00:00Z", now), None);
    assert_eq!(
        reset(b"2025-12-05T03:00:60Z", now),
        Some(Duration::from_secs(59))
    );
    // Malformed.
    for v in [
        &b"2025-12-05T03:00:42"[..],
        b"2025-12-05T03:00:42+0100",
        b"2025-13-05T03:00:42Z",
        b"2025-12-32T03:00:42Z",
        b"2025-12-05T24:00:00Z",
        b"2025-12-05T03:60:00Z",
        b"2025-12-05T03:00:42.Z",
        b"2025-12-05T03:00:42+24:00",
        b"2025-12-05X03:00:42Z",
        b"2025-12-05T03:00:42ZZ",
    ] {
        assert_eq!(reset(v, now), None, "{:?}", String::from_utf8_lossy(v));
    }
    let long = format!("2025-12-05T03:00:00.{}Z", "1".repeat(10_000));
    assert_eq!(reset(long.as_bytes(), now), None);
}

#[test]
fn structured_field_lists_read_exactly_4096_members_and_leave_the_rest() {
    assert_eq!(MAX_LIST_MEMBERS, 4_096);
    let n = |k: usize| vec!["a"; k].join(",");
    assert_eq!(parse_list([n(4_095).as_bytes()]).unwrap().len(), 4_095);
    assert_eq!(parse_list([n(4_096).as_bytes()]).unwrap().len(), 4_096);
    assert_eq!(parse_list([n(4_097).as_bytes()]).unwrap().len(), 4_096);
    assert_eq!(parse_list([n(100_000).as_bytes()]).unwrap().len(), 4_096);
    // The rest is "not read (nor checked)": garbage after the 4,096th is not an error.
    let tail = format!("{},,,!!!(((", n(4_096));
    assert_eq!(parse_list([tail.as_bytes()]).unwrap().len(), 4_096);
    // Garbage inside the first 4,096 still refuses the field.
    let bad = format!("{},!!,a", n(4_000));
    assert!(parse_list([bad.as_bytes()]).is_err());
    // Members across several lines count together.
    let half = n(3_000);
    assert_eq!(
        parse_list([half.as_bytes(), half.as_bytes()])
            .unwrap()
            .len(),
        4_096
    );
    // A trailing comma within the bound is still an error.
    let trailing = format!("{},", n(10));
    assert!(parse_list([trailing.as_bytes()]).is_err());
}

#[tokio::test]
async fn memory_queue_of_usize_max_and_zero_capacity_work() {
    use sturdy::webhook::{EventQueue, MemoryQueue, Push, WebhookEvent};
    for cap in [usize::MAX, usize::MAX >> 3, (usize::MAX >> 3) + 1, 0, 1] {
        let (q, mut rx) = MemoryQueue::new(cap);
        for i in 0..3 {
            let ev = WebhookEvent::new("test", format!("id-{i}"), bytes::Bytes::from("x"));
            let r = q.push(ev, Duration::MAX).await;
            if cap <= 1 && i > 0 {
                // A full one-slot queue: no panic, whatever it answers.
                let _ = r;
                continue;
            }
            assert!(matches!(r, Ok(Push::Enqueued)), "cap {cap}: {r:?}");
        }
        assert!(rx.try_recv().is_some(), "cap {cap}");
    }
}

fn redis_url() -> Option<String> {
    std::env::var("STURDY_REDIS_URL").ok()
}

#[tokio::test]
async fn redis_connect_and_replication_take_duration_max() {
    use sturdy::idempotency::server::{Begin, IdempotencyStore, LockToken};
    use sturdy::redis::RedisIdempotencyStore;
    let Some(url) = redis_url() else { return };
    let _conn = sturdy::redis::connect(&url, Duration::MAX)
        .await
        .expect("connect with Duration::MAX");

    let store = RedisIdempotencyStore::connect(&url)
        .await
        .unwrap()
        .with_timeout(Duration::MAX)
        .with_replication(0, Duration::MAX)
        .with_prefix(format!("s45:{}", std::process::id()));
    let key = format!(
        "k-{:?}",
        sturdy::core::WallClock::now(&sturdy::core::SystemClock)
    );
    let b = store
        .begin(&key, [7; 32], LockToken::random(), Duration::MAX)
        .await
        .expect("begin with Duration::MAX");
    assert_eq!(b, Begin::Started);
}

#[tokio::test]
async fn redis_connect_timeout_bounds_the_whole_connect_to_twice_and_hides_the_url() {
    // Nothing listens on port 1 of loopback: refused at once, or within 2 × the timeout.
    let t = Duration::from_millis(200);
    let started = tokio::time::Instant::now();
    let r = sturdy::redis::connect("redis://user:s3cr3t@127.0.0.1:1/", t).await;
    let Err(err) = r else {
        panic!("no Redis on port 1")
    };
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let text = format!("{err} {err:?}");
    assert!(!text.contains("s3cr3t"), "{text}");
}

/// A 400 KB `RateLimit` field: its pause among the first 4,096 members is honoured (refusing the
/// whole field ignored it before); one past the 4,096th is left unread.
#[test]
fn a_huge_ratelimit_field_keeps_the_pause_of_its_first_members() {
    use sturdy::core::headers::{pause_hint, PauseSource, RateLimitItem};
    let now = at(1_764_903_600);
    let many = vec![r#""p";r=5;t=1"#; 40_000].join(", ");
    let first = format!(r#""default";r=0;t=30, {many}"#);
    assert!(first.len() > 400_000);
    let mut h = HeaderMap::new();
    h.insert("ratelimit", HeaderValue::from_str(&first).unwrap());
    let items = RateLimitItem::from_headers(&h).unwrap();
    assert_eq!(items.len(), MAX_LIST_MEMBERS);
    let hint = pause_hint(http::StatusCode::TOO_MANY_REQUESTS, &h, now).expect("a pause");
    assert_eq!(hint.delay, Duration::from_secs(30));
    assert_eq!(hint.source, PauseSource::RateLimit);
    // At member 4,096 (the last read) it still counts; at 4,097 it is not read.
    for (at, read) in [(4_095usize, true), (4_096, false)] {
        let mut v = vec![r#""p";r=5;t=1"#.to_owned(); 6_000];
        v[at] = r#""default";r=0;t=30"#.to_owned();
        let mut h = HeaderMap::new();
        h.insert("ratelimit", HeaderValue::from_str(&v.join(",")).unwrap());
        let hint = pause_hint(http::StatusCode::TOO_MANY_REQUESTS, &h, now);
        assert_eq!(hint.is_some(), read, "r=0 at index {at}: {hint:?}");
    }
}
