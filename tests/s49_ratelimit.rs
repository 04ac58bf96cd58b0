//! Round s49, outside tests of `sturdy::ratelimit` against docs/guides/ratelimit.md and the
//! rustdoc of `sturdy_ratelimit`, on paused time: `DirectLimiter`'s line (`check` does not
//! overtake a waiter, `reserve` is taken ahead of them, a dropped `until_ready` leaves),
//! `Quota` at its extremes ("enforced as 30 years", "one nanosecond", "about 146 years of
//! calls"), zero `max_wait`, zero `max_pause` ("zero turns pauses off"), the events' names and
//! fields, reset values a vendor or an attacker may send (the public vectors of
//! /work/shared/vectors/STANDARDS.md §5 and §6 among them), thousands of list members, waiters
//! dropped at every await point under `Timeout`, `LoadShed` and `ConcurrencyLimit(1)`, and the
//! limiter inside `ClientBuilder` (a refusal longer than `max_retry_after`, a deadline).
#![cfg(feature = "full")]

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use sturdy::core::classify::delivery;
use sturdy::core::clock::ManualClock;
use sturdy::core::events::Event;
use sturdy::core::{find, CallOptions, Delivery, RateLimited};
use sturdy::ratelimit::{
    DirectLimiter, PauseCapped, PauseSource, Quota, RateLimitLayer, DEFAULT_MAX_PAUSE,
};
use tokio::time::Instant;
use tokio_test::{assert_pending, assert_ready};
use tower::{service_fn, Layer, Service, ServiceBuilder, ServiceExt};

type Req = Request<()>;
type Res = Response<()>;

const HOST: &str = "api.example.com";
/// 2019-06-03T11:00:00Z, the urllib3 vector's `now`.
const NOW: u64 = 1_559_559_600;
const YEAR: Duration = Duration::from_secs(365 * 86_400);

fn get(host: &str) -> Req {
    Request::get(format!("http://{host}/x")).body(()).unwrap()
}

async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

/// A service answering `status` with `headers` (changeable), counting calls.
#[derive(Clone, Default)]
struct Script(Arc<Mutex<(u16, Vec<(String, Vec<u8>)>)>>, Arc<AtomicUsize>);

impl Script {
    fn set(&self, status: u16, headers: &[(&str, &str)]) {
        *self.0.lock().unwrap() = (
            status,
            headers
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.as_bytes().to_vec()))
                .collect(),
        );
    }
    fn calls(&self) -> usize {
        self.1.load(Ordering::SeqCst)
    }
    fn service(
        &self,
    ) -> impl Service<Req, Response = Res, Error = Infallible, Future = impl Send> + Clone + Send + Sync
    {
        let script = self.clone();
        service_fn(move |_req: Req| {
            script.1.fetch_add(1, Ordering::SeqCst);
            let (status, headers) = script.0.lock().unwrap().clone();
            let mut b = Response::builder().status(if status == 0 { 200 } else { status });
            for (k, v) in headers {
                b = b.header(k, v);
            }
            let res = b.body(()).unwrap();
            async move { Ok::<_, Infallible>(res) }
        })
    }
}

fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::at(UNIX_EPOCH + Duration::from_secs(NOW)))
}

/// The pause one response leaves on the key of a fresh adaptive-only layer (clock at `NOW`).
async fn pause_after(status: u16, headers: &[(&str, &str)]) -> Option<Duration> {
    let script = Script::default();
    script.set(status, headers);
    let (layer, handle) = RateLimitLayer::adaptive_only().with_clock(clock()).pair();
    let mut svc = layer.layer(script.service());
    let res = svc.ready().await.unwrap().call(get(HOST)).await.unwrap();
    assert_eq!(res.status().as_u16(), status);
    handle.pause(HOST)
}

/// `DirectLimiter`: `check` "Takes a slot now if one is free and no `until_ready` caller waits
/// for one"; `reserve` "is taken ahead of the callers waiting in `until_ready`"; `until_ready`
/// "dropping the future gives its place back and the callers behind it move up"; `reserve`'s
/// error: "nothing is reserved".
#[tokio::test(start_paused = true)]
async fn s49_rl_direct_limiter_line() {
    let limiter = Arc::new(DirectLimiter::new(Quota::per_second(1).unwrap()));
    limiter.check().unwrap();
    let l = limiter.clone();
    let mut a =
        tokio_test::task::spawn(async move { l.until_ready(Duration::from_secs(10)).await });
    assert_pending!(a.poll());
    tokio::time::advance(Duration::from_millis(999)).await;
    assert_pending!(a.poll());
    tokio::time::advance(Duration::from_millis(1)).await;
    // A slot is free now, but `a` waits for it: `check` must not take it.
    assert!(limiter.check().is_err(), "check overtook a waiter");
    assert_ready!(a.poll()).unwrap();

    // 100 waiters dropped in line cost the next one nothing.
    let mut dropped = Vec::new();
    for _ in 0..100 {
        let l = limiter.clone();
        let mut t =
            tokio_test::task::spawn(async move { l.until_ready(Duration::from_secs(1000)).await });
        assert_pending!(t.poll());
        dropped.push(t);
    }
    drop(dropped);
    let start = Instant::now();
    limiter.until_ready(Duration::from_secs(2)).await.unwrap();
    assert_eq!(
        start.elapsed(),
        Duration::from_secs(1),
        "one interval, not 101"
    );

    // reserve with too short a wait reserves nothing.
    let err = limiter.reserve(Duration::from_millis(10)).unwrap_err();
    assert_eq!(err.retry_after(), Duration::from_secs(1));
    let wait = limiter.reserve(Duration::from_secs(5)).unwrap();
    assert_eq!(
        wait,
        Duration::from_secs(1),
        "the refused reserve kept nothing"
    );
    // A reserve is taken ahead of a waiter.
    let l = limiter.clone();
    let mut w =
        tokio_test::task::spawn(async move { l.until_ready(Duration::from_secs(10)).await });
    assert_pending!(w.poll());
    let ahead = limiter.reserve(Duration::from_secs(10)).unwrap();
    assert_eq!(ahead, Duration::from_secs(2));
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_pending!(w.poll());
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_ready!(w.poll()).unwrap();
}

/// `until_ready`: "`RateLimited` with the wait, at once, when the slot would be further away
/// than `max_wait` (counting the callers already in line)".
#[tokio::test(start_paused = true)]
async fn s49_rl_direct_until_ready_counts_the_line() {
    let limiter = Arc::new(DirectLimiter::new(Quota::per_second(10).unwrap()));
    limiter.check().unwrap();
    let mut line = Vec::new();
    for _ in 0..5 {
        let l = limiter.clone();
        line.push(tokio::spawn(async move {
            l.until_ready(Duration::from_secs(10)).await
        }));
        settle().await;
    }
    // Sixth in line: its slot is 600 ms away.
    let err = limiter
        .until_ready(Duration::from_millis(550))
        .await
        .unwrap_err();
    assert_eq!(err.retry_after(), Duration::from_millis(600));
    let start = Instant::now();
    limiter
        .until_ready(Duration::from_millis(600))
        .await
        .unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(600));
    for t in line {
        t.await.unwrap().unwrap();
    }
}

/// `Quota::new`: "A spacing longer than 30 years is enforced as 30 years ..., a spacing under
/// one nanosecond as one nanosecond ..., and a burst's whole allowance is capped at about 146
/// years of calls"; "# Errors When `calls` is 0 or `period` is zero"; `with_burst` "When `burst`
/// is 0". None panics, and the limiter works with each.
#[tokio::test(start_paused = true)]
async fn s49_rl_quota_extremes() {
    let e = Quota::new(0, Duration::from_secs(1)).unwrap_err();
    assert!(!e.to_string().is_empty());
    assert!(Quota::new(1, Duration::ZERO).is_err());
    assert!(Quota::per_second(0).is_err());
    assert!(Quota::per_minute(0).is_err());
    assert!(Quota::per_second(1).unwrap().with_burst(0).is_err());

    let slow = Quota::new(1, Duration::MAX).unwrap();
    let fast = Quota::per_second(u32::MAX).unwrap();
    assert_eq!(fast.interval(), Duration::from_nanos(1));
    let odd = Quota::new(u32::MAX, Duration::MAX).unwrap();
    assert!(odd.interval() > Duration::ZERO);

    let huge_burst = Quota::new(1, Duration::MAX)
        .unwrap()
        .with_burst(u32::MAX)
        .unwrap();
    assert_eq!(huge_burst.burst(), u32::MAX);
    // "a burst's whole allowance is capped at about 146 years of calls": at 30 years a call,
    // four or five at once.
    let l = DirectLimiter::new(huge_burst);
    let mut at_once = 0;
    while l.check().is_ok() && at_once < 1000 {
        at_once += 1;
    }
    assert!((4..=5).contains(&at_once), "{at_once}");

    let l = DirectLimiter::new(slow);
    l.check().unwrap();
    let err = l.check().unwrap_err();
    assert!(err.retry_after() >= 29 * YEAR, "{:?}", err.retry_after());
    assert!(l.reserve(Duration::MAX).unwrap() >= 29 * YEAR);

    let l = DirectLimiter::new(fast.with_burst(u32::MAX).unwrap());
    for _ in 0..10_000 {
        l.check().unwrap();
    }

    // Through the layer, with `max_wait` of `Duration::MAX`.
    let script = Script::default();
    let svc = RateLimitLayer::new(Quota::new(1, Duration::MAX).unwrap())
        .with_max_wait(Duration::MAX)
        .layer(script.service());
    svc.clone().oneshot(get(HOST)).await.unwrap();
    let mut second = tokio_test::task::spawn(svc.clone().oneshot(get(HOST)));
    assert_pending!(second.poll());
    tokio::time::advance(YEAR).await;
    assert_pending!(second.poll());
    drop(second);
    assert_eq!(script.calls(), 1);
}

/// Found a fault in round s49 (fixed): `Quota::new`: "A spacing longer than 30 years is enforced as 30 years
/// (`Quota::new(1, Duration::MAX)` lets one call through per 30 years ...)"; `Quota::interval`:
/// "The time between two calls at the sustained rate." The limiter does enforce 30 years (see
/// `s49_rl_quota_extremes`), but `interval()` reports the unenforced spacing.
#[test]
fn s49_rl_fault_interval_of_a_capped_quota_is_not_what_is_enforced() {
    let slow = Quota::new(1, Duration::MAX).unwrap();
    let enforced = {
        let l = DirectLimiter::new(slow);
        l.check().unwrap();
        l.check().unwrap_err().retry_after()
    };
    assert!(
        slow.interval() <= 31 * YEAR,
        "Quota::new(1, Duration::MAX).interval() = {:?}, enforced spacing {enforced:?}",
        slow.interval()
    );
}

/// "Zero `max_wait`: the layer never waits": the refusal is at once, `RateLimited` carrying the
/// wait, not sent, with a `RateLimitRefused` event; a call that waits gives `RateLimitWaited`.
#[tokio::test(start_paused = true)]
async fn s49_rl_zero_max_wait_and_the_events() {
    let events = Arc::new(Mutex::new(Vec::new()));
    let seen = events.clone();
    let script = Script::default();
    let layer = RateLimitLayer::new(Quota::per_second(1).unwrap()).on_event(move |e| {
        let line = match e {
            Event::RateLimitWaited { key, host, wait } => format!("waited {key} {host:?} {wait:?}"),
            Event::RateLimitRefused { key, host, wait } => {
                format!("refused {key} {host:?} {wait:?}")
            }
            Event::RateLimitPaused {
                key,
                status,
                source,
                pause,
                capped,
                ..
            } => format!("paused {key} {status} {source:?} {pause:?} {capped}"),
            _ => return,
        };
        seen.lock().unwrap().push(line);
    });
    let never_waits = layer
        .clone()
        .with_max_wait(Duration::ZERO)
        .layer(script.service());
    let waits = layer.layer(script.service());
    never_waits.clone().oneshot(get(HOST)).await.unwrap();
    let start = Instant::now();
    let err = never_waits.clone().oneshot(get(HOST)).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::ZERO);
    let limited = find::<RateLimited>(&*err).expect("RateLimited");
    assert_eq!(limited.retry_after(), Duration::from_secs(1));
    assert_eq!(delivery(&*err), Delivery::NotSent);
    assert!(err.to_string().contains(HOST), "{err}");
    waits.clone().oneshot(get(HOST)).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(1));
    assert_eq!(script.calls(), 2);
    let log = events.lock().unwrap().clone();
    assert_eq!(
        log,
        vec![
            format!("refused {HOST} Some(\"{HOST}\") 1s"),
            format!("waited {HOST} Some(\"{HOST}\") 1s"),
        ]
    );
}

/// "Every pause learned from a response is at most `max_pause` ... zero turns pauses off":
/// `Retry-After`, `RateLimit`, `X-RateLimit-*` and a bare 429 leave no pause, and the next call
/// goes at once.
#[tokio::test(start_paused = true)]
async fn s49_rl_zero_max_pause_turns_pauses_off() {
    let script = Script::default();
    let (layer, handle) = RateLimitLayer::adaptive_only()
        .with_max_pause(Duration::ZERO)
        .with_clock(clock())
        .pair();
    let svc = layer.layer(script.service());
    let answers: [(u16, &[(&str, &str)]); 5] = [
        (429, &[("retry-after", "10")]),
        (503, &[("retry-after", "10")]),
        (200, &[("ratelimit", "\"default\";r=0;t=50")]),
        (
            200,
            &[("x-ratelimit-remaining", "0"), ("x-ratelimit-reset", "30")],
        ),
        (429, &[]),
    ];
    for (status, headers) in answers {
        script.set(status, headers);
        let res = svc.clone().oneshot(get(HOST)).await.unwrap();
        assert!(res.extensions().get::<PauseCapped>().is_none());
        assert_eq!(handle.pause(HOST), None, "{status} {headers:?}");
        assert!(handle.paused().is_empty());
        script.set(200, &[]);
        let start = Instant::now();
        svc.clone().oneshot(get(HOST)).await.unwrap();
        assert_eq!(start.elapsed(), Duration::ZERO, "{status} {headers:?}");
    }
}

/// Reset values as vendors write them and as an attacker may: "seconds to wait (whole or
/// decimal), a Unix time in seconds (from 10^9, whole or decimal) or milliseconds (from 10^12),
/// an HTTP date, or an RFC 3339 date-time"; "a bogus value ... costs at most five minutes";
/// malformed ones are ignored. The clock reads `NOW`.
#[tokio::test(start_paused = true)]
async fn s49_rl_x_ratelimit_reset_values() {
    let epoch_in = |s: u64| (NOW + s).to_string();
    let cases: Vec<(String, Option<Duration>)> = vec![
        ("30".into(), Some(Duration::from_secs(30))),
        ("1.5".into(), Some(Duration::from_millis(1500))),
        ("0.25".into(), Some(Duration::from_millis(250))),
        (epoch_in(60), Some(Duration::from_secs(60))),
        (
            format!("{}.5", NOW + 60),
            Some(Duration::from_millis(60_500)),
        ),
        (
            ((NOW + 90) * 1000).to_string(),
            Some(Duration::from_secs(90)),
        ),
        (
            "Mon, 03 Jun 2019 11:02:00 GMT".into(),
            Some(Duration::from_secs(120)),
        ),
        (
            "2019-06-03T11:03:00Z".into(),
            Some(Duration::from_secs(180)),
        ),
        (
            "2019-06-03T13:03:00+02:00".into(),
            Some(Duration::from_secs(180)),
        ),
        // Absurd: capped at five minutes.
        ("999999999".into(), Some(DEFAULT_MAX_PAUSE)),
        ("99999999999".into(), Some(DEFAULT_MAX_PAUSE)),
        ("9".repeat(40), Some(DEFAULT_MAX_PAUSE)),
        (
            "Fri, 31 Dec 9999 23:59:59 GMT".into(),
            Some(DEFAULT_MAX_PAUSE),
        ),
        ("9999-12-31T23:59:59Z".into(), Some(DEFAULT_MAX_PAUSE)),
        // In the past or meaningless: no pause.
        ("Mon, 01 Jan 1900 00:00:00 GMT".into(), None),
        ("Thu, 01 Jan 1970 00:00:00 GMT".into(), None),
        ("1970-01-01T00:00:00Z".into(), None),
        (epoch_in(0), None),
        ("1000000000".into(), None),
        ("1000000000000".into(), None),
        ("-5".into(), None),
        ("abc".into(), None),
        ("".into(), None),
        ("NaN".into(), None),
        ("-0".into(), None),
    ];
    for (value, want) in cases {
        let got = pause_after(
            200,
            &[
                ("x-ratelimit-remaining", "0"),
                ("x-ratelimit-reset", value.as_str()),
            ],
        )
        .await;
        assert_eq!(got, want, "X-RateLimit-Reset: {value:?}");
    }
    // The other spellings.
    for (rem, reset) in [
        ("x-rate-limit-remaining", "x-rate-limit-reset"),
        ("ratelimit-remaining", "ratelimit-reset"),
    ] {
        let got = pause_after(200, &[(rem, "0"), (reset, "12")]).await;
        assert_eq!(got, Some(Duration::from_secs(12)), "{rem}");
    }
    // Remaining not zero: no pause.
    let got = pause_after(
        200,
        &[("x-ratelimit-remaining", "1"), ("x-ratelimit-reset", "12")],
    )
    .await;
    assert_eq!(got, None);
}

/// `Retry-After` (RFC 9110 and the urllib3 vectors of STANDARDS.md §6.1, clock at their `now`):
/// "a 429 or 503 with `Retry-After` (seconds or an HTTP date)"; absurd values capped.
#[tokio::test(start_paused = true)]
async fn s49_rl_retry_after_vectors_and_hostile_values() {
    let cases: Vec<(&str, Option<Duration>)> = vec![
        ("3600", Some(DEFAULT_MAX_PAUSE)),
        ("120", Some(Duration::from_secs(120))),
        ("\t42 ", Some(Duration::from_secs(42))),
        ("Mon, 03 Jun 2019 11:30:12 GMT", Some(DEFAULT_MAX_PAUSE)),
        (
            "Mon, 03 Jun 2019 11:01:52 GMT",
            Some(Duration::from_secs(112)),
        ),
        (
            "Monday, 03-Jun-19 11:01:52 GMT",
            Some(Duration::from_secs(112)),
        ),
        ("Mon Jun  3 11:01:52 2019", Some(Duration::from_secs(112))),
        ("Fri, 31 Dec 9999 23:59:59 GMT", Some(DEFAULT_MAX_PAUSE)),
        ("999999999999999999999999999999", Some(DEFAULT_MAX_PAUSE)),
    ];
    for (value, want) in cases {
        for status in [429, 503] {
            let got = pause_after(status, &[("retry-after", value)]).await;
            assert_eq!(got, want, "{status} Retry-After: {value:?}");
        }
    }
    // Not a wait: "-1", "+1", "1.0", garbage, dates in the past. A 429 then pauses the default
    // 1 s at most (a bare 429); a 503 (bare 503s off) not at all.
    for value in [
        "-1",
        "+1",
        "1.0",
        "soon",
        "\u{b2}",
        "Mon, 01 Jan 1900 00:00:00 GMT",
        "Thu, 01 Jan 1970 00:00:00 GMT",
    ] {
        let got = pause_after(503, &[("retry-after", value)]).await;
        assert_eq!(got, None, "503 Retry-After: {value:?}");
        let got = pause_after(429, &[("retry-after", value)]).await;
        assert!(
            got.is_none_or(|d| d <= Duration::from_secs(1)),
            "429 Retry-After: {value:?}: {got:?}"
        );
    }
}

/// `RateLimit` and `RateLimit-Policy` with thousands of list members (the draft vectors among
/// them): no panic, and the one with `r=0` pauses.
#[tokio::test(start_paused = true)]
async fn s49_rl_ratelimit_fields_with_thousands_of_members() {
    let mut policy = String::from("\"burst\";q=100;w=60,\"daily\";q=1000;w=86400");
    let mut limit = String::from("\"default\";r=50;t=30");
    for i in 0..5000 {
        policy.push_str(&format!(",\"p{i}\";q={i};w=60;pk=:cHsdsRa894==:"));
        limit.push_str(&format!(",\"p{i}\";r={};t=60", i + 1));
        if i == 1000 {
            // Within the first `MAX_LIST_MEMBERS` (4,096) members, which are read.
            limit.push_str(",\"default\";r=0;t=7");
        }
    }
    let got = pause_after(
        200,
        &[
            ("ratelimit-policy", policy.as_str()),
            ("ratelimit", limit.as_str()),
        ],
    )
    .await;
    assert_eq!(got, Some(Duration::from_secs(7)));
    // The draft's own vectors: r > 0 pauses nothing; r=0 pauses t.
    assert_eq!(
        pause_after(
            200,
            &[(
                "ratelimit",
                "\"default\";r=300000000;t=60;pk=:QXBwLTk5OQ==:"
            )]
        )
        .await,
        None
    );
    assert_eq!(
        pause_after(301, &[("ratelimit", "\"problemPolicy\";r=0;t=10")]).await,
        Some(Duration::from_secs(10))
    );
    assert_eq!(
        pause_after(200, &[("ratelimit", "\"x\";r=0;t=99999999999")]).await,
        Some(DEFAULT_MAX_PAUSE)
    );
    assert_eq!(
        pause_after(200, &[("ratelimit", "\"x\";r=0;t=-5")]).await,
        None
    );
}

/// The capped response carries `PauseCapped` with what was asked, what was applied and which
/// header, and `RateLimitPaused` says `capped` with the applied pause.
#[tokio::test(start_paused = true)]
async fn s49_rl_pause_capped_and_its_event() {
    let events = Arc::new(Mutex::new(Vec::new()));
    let seen = events.clone();
    let script = Script::default();
    script.set(429, &[("retry-after", "999999999999999999999999999999")]);
    let (layer, handle) = RateLimitLayer::adaptive_only()
        .on_event(move |e| {
            if let Event::RateLimitPaused {
                status,
                source,
                pause,
                capped,
                ..
            } = e
            {
                seen.lock()
                    .unwrap()
                    .push((*status, *source, *pause, *capped));
            }
        })
        .pair();
    let svc = layer.layer(script.service());
    let res = svc.clone().oneshot(get(HOST)).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    let capped = *res.extensions().get::<PauseCapped>().unwrap();
    assert_eq!(capped.applied(), DEFAULT_MAX_PAUSE);
    assert!(capped.asked() > 1000 * YEAR);
    assert_eq!(capped.source(), PauseSource::RetryAfter);
    assert_eq!(
        *events.lock().unwrap(),
        vec![(
            StatusCode::TOO_MANY_REQUESTS,
            Some(PauseSource::RetryAfter),
            DEFAULT_MAX_PAUSE,
            true
        )]
    );
    assert_eq!(handle.paused(), vec![(HOST.to_string(), DEFAULT_MAX_PAUSE)]);
}

/// Waiters dropped at every await point: a `Timeout` above cutting calls waiting for a quota
/// slot while each holds a `ConcurrencyLimit(1)` permit; `LoadShed` above refuses while the
/// permit is held and is ready again once the waiter is gone; afterwards the next caller waits
/// one interval at most.
#[tokio::test(start_paused = true)]
async fn s49_rl_dropped_waiters_under_timeout_loadshed_and_limit_1() {
    let script = Script::default();
    let (layer, handle) = RateLimitLayer::new(Quota::per_second(10).unwrap()).pair();
    let inner = ServiceBuilder::new()
        .layer(layer)
        .concurrency_limit(1)
        .service(script.service());
    let timed = ServiceBuilder::new()
        .buffer(64)
        .timeout(Duration::from_millis(30))
        .service(inner.clone());
    timed.clone().oneshot(get(HOST)).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let mut t = timed.clone();
        tasks.push(tokio::spawn(async move {
            t.ready().await?.call(get(HOST)).await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        if t.await.unwrap().is_ok() {
            ok += 1;
        }
    }
    assert!(ok >= 1, "{ok}");
    assert_eq!(
        script.calls(),
        1 + ok,
        "only the calls that answered were sent"
    );
    assert_eq!(handle.waiting(HOST), 0, "nobody left in line");
    tokio::time::advance(Duration::from_secs(1)).await;
    let start = Instant::now();
    inner.clone().oneshot(get(HOST)).await.unwrap();
    inner.clone().oneshot(get(HOST)).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(100));

    // LoadShed above: a call waiting for its slot holds the only permit.
    let mut shed = ServiceBuilder::new().load_shed().service(inner.clone());
    let mut waiter = tokio_test::task::spawn(inner.clone().oneshot(get(HOST)));
    assert_pending!(waiter.poll());
    assert_eq!(handle.waiting(HOST), 1);
    let err = shed
        .ready()
        .await
        .unwrap()
        .call(get(HOST))
        .await
        .unwrap_err();
    assert!(err.is::<tower::load_shed::error::Overloaded>(), "{err}");
    drop(waiter);
    assert_eq!(handle.waiting(HOST), 0);
    settle().await;
    let res = shed.ready().await.unwrap().call(get(HOST)).await;
    assert!(res.is_ok(), "the permit came back: {res:?}");
}

/// A pause with calls in line, all dropped: the line empties, `clear_pause` ends the pause, and
/// the next call goes at once (adaptive only: nothing left to release first).
#[tokio::test(start_paused = true)]
async fn s49_rl_dropped_waiters_in_a_pause_leave_nothing() {
    let script = Script::default();
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    let svc = layer.layer(script.service());
    script.set(429, &[("retry-after", "20")]);
    svc.clone().oneshot(get(HOST)).await.unwrap();
    script.set(200, &[]);
    let mut line = Vec::new();
    for _ in 0..100 {
        let mut t = tokio_test::task::spawn(svc.clone().oneshot(get(HOST)));
        assert_pending!(t.poll());
        line.push(t);
    }
    assert_eq!(handle.waiting(HOST), 100);
    drop(line);
    assert_eq!(handle.waiting(HOST), 0);
    assert_eq!(handle.clear_pause(HOST), Some(Duration::from_secs(20)));
    let start = Instant::now();
    for _ in 0..5 {
        svc.clone().oneshot(get(HOST)).await.unwrap();
    }
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(script.calls(), 6);
}

fn full_get() -> Request<Full<Bytes>> {
    Request::get(format!("http://{HOST}/"))
        .body(Full::default())
        .unwrap()
}

fn http_script(
    script: Script,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
       + Send
       + Sync
       + 'static {
    service_fn(move |_req: Request<Full<Bytes>>| {
        script.1.fetch_add(1, Ordering::SeqCst);
        let (status, headers) = script.0.lock().unwrap().clone();
        let mut b = Response::builder().status(if status == 0 { 200 } else { status });
        for (k, v) in headers {
            b = b.header(k, v);
        }
        let res = b.body(Full::default()).unwrap();
        async move { Ok::<_, Infallible>(res) }
    })
}

/// In `ClientBuilder`: "a refused call is retried after the wait the refusal carries (within ...
/// `max_retry_after`, 60 s by default: a longer wait fails the call at once with the
/// `RateLimited` ...), so with zero `max_wait` the *call* may still wait, in the retry layer's
/// sleep"; "whose turn would come after that deadline ... is refused at once with `RateLimited`
/// carrying the wait, and it was not sent".
#[tokio::test(start_paused = true)]
async fn s49_rl_client_refusals_retry_or_fail_at_once() {
    // A 2 s wait with zero max_wait: the call waits in the retry sleep and goes.
    let script = Script::default();
    let client = sturdy::ClientBuilder::new()
        .with_rate_limit(
            RateLimitLayer::new(Quota::new(1, Duration::from_secs(2)).unwrap())
                .with_max_wait(Duration::ZERO),
        )
        .build(http_script(script.clone()));
    client.clone().oneshot(full_get()).await.unwrap();
    let start = Instant::now();
    client.clone().oneshot(full_get()).await.unwrap();
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    assert_eq!(script.calls(), 2);

    // A 120 s wait: longer than max_retry_after, fails at once, not sent.
    let script = Script::default();
    let client = sturdy::ClientBuilder::new()
        .with_rate_limit(
            RateLimitLayer::new(Quota::new(1, Duration::from_secs(120)).unwrap())
                .with_max_wait(Duration::ZERO),
        )
        .build(http_script(script.clone()));
    client.clone().oneshot(full_get()).await.unwrap();
    let start = Instant::now();
    let err = client.clone().oneshot(full_get()).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::ZERO);
    let limited = find::<RateLimited>(&*err).expect("RateLimited");
    assert_eq!(limited.retry_after(), Duration::from_secs(120));
    assert_eq!(delivery(&*err), Delivery::NotSent);
    assert!(err.to_string().contains(HOST), "{err}");
    assert_eq!(script.calls(), 1);

    // A 10 s wait against a 3 s deadline: refused at once, not sent.
    let script = Script::default();
    let client = sturdy::ClientBuilder::new()
        .with_rate_limit(RateLimitLayer::new(
            Quota::new(1, Duration::from_secs(10)).unwrap(),
        ))
        .build(http_script(script.clone()));
    client.clone().oneshot(full_get()).await.unwrap();
    let mut req = full_get();
    req.extensions_mut()
        .insert(CallOptions::new().with_deadline(Duration::from_secs(3)));
    let start = Instant::now();
    let err = client.clone().oneshot(req).await.unwrap_err();
    assert!(
        start.elapsed() < Duration::from_millis(10),
        "{:?}",
        start.elapsed()
    );
    let limited = find::<RateLimited>(&*err).expect("RateLimited");
    assert_eq!(limited.retry_after(), Duration::from_secs(10));
    assert_eq!(delivery(&*err), Delivery::NotSent);
    assert_eq!(script.calls(), 1);
}

/// A hostile `Retry-After` through the default `ClientBuilder`: the call that received it fails
/// at once (the wait is past `max_retry_after`), and the later callers are held at most the
/// five-minute cap: refused at once (the cap is past their `max_wait`), not sent, and after the
/// cap the host is reached again.
#[tokio::test(start_paused = true)]
async fn s49_rl_client_hostile_retry_after_storm() {
    let script = Script::default();
    script.set(429, &[("retry-after", "999999999999999999999999999999")]);
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    let client = sturdy::ClientBuilder::new()
        .with_rate_limit(layer)
        .build(http_script(script.clone()));
    let start = Instant::now();
    let first = client.clone().oneshot(full_get()).await;
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    match first {
        Ok(res) => assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS),
        Err(err) => assert!(find::<RateLimited>(&*err).is_some(), "{err}"),
    }
    assert_eq!(script.calls(), 1);
    assert_eq!(handle.pause(HOST), Some(DEFAULT_MAX_PAUSE));
    script.set(200, &[]);
    for _ in 0..50 {
        let err = client.clone().oneshot(full_get()).await.unwrap_err();
        assert_eq!(delivery(&*err), Delivery::NotSent);
        let limited = find::<RateLimited>(&*err).expect("RateLimited");
        assert!(limited.retry_after() <= DEFAULT_MAX_PAUSE);
    }
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(script.calls(), 1);
    tokio::time::advance(DEFAULT_MAX_PAUSE).await;
    client.clone().oneshot(full_get()).await.unwrap();
    assert_eq!(script.calls(), 2);
}

/// The composed services are `Send + Sync + Clone` where the docs say so.
#[test]
fn s49_rl_composed_types_are_send_sync_clone() {
    fn assert_traits<T: Send + Sync + Clone + 'static>(_: &T) {}
    let script = Script::default();
    let svc = ServiceBuilder::new()
        .layer(RateLimitLayer::new(Quota::per_second(1).unwrap()))
        .concurrency_limit(1)
        .service(script.service());
    assert_traits(&svc);
    let client = sturdy::ClientBuilder::new().build(http_script(script));
    assert_traits(&client);
    fn send_sync<T: Send + Sync>() {}
    send_sync::<DirectLimiter>();
    send_sync::<sturdy::ratelimit::RateLimitHandle>();
}

/// "Past `with_max_keys` (1,024 by default, idle keys forgotten first), the keys beyond the
/// bound share one overflow limiter, listed by `paused()` as `*`": 5,000 hosts each asking for
/// a pause keep at most 1,025 paused keys; `with_max_keys(0)` does not panic.
#[tokio::test(start_paused = true)]
async fn s49_rl_thousands_of_paused_hosts_stay_bounded() {
    let script = Script::default();
    script.set(429, &[("retry-after", "10")]);
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    let svc = layer.layer(script.service());
    for i in 0..5000 {
        let _ = svc.clone().oneshot(get(&format!("h{i}.example"))).await;
    }
    let paused = handle.paused();
    assert!(paused.len() <= 1025, "{} paused keys", paused.len());
    assert!(paused.iter().any(|(k, _)| k == "*"));

    let (layer, handle) = RateLimitLayer::new(Quota::per_second(1).unwrap())
        .with_max_keys(1)
        .with_max_wait(Duration::ZERO)
        .pair();
    let svc = layer.layer(Script::default().service());
    let hold = tokio::spawn(svc.clone().oneshot(get("a.example")));
    settle().await;
    svc.clone().oneshot(get("b.example")).await.unwrap();
    let err = svc.clone().oneshot(get("c.example")).await.unwrap_err();
    drop(hold);
    assert!(
        err.to_string()
            .contains("overflow limiter shared by the keys past the most limiters kept"),
        "{err}"
    );
    let _ = handle.paused();
}

/// A quota is per key: "`RateLimitLayer::new`: A limiter with `quota` per host". Past
/// `with_max_keys`, "idle keys are forgotten" — but a key whose slot was just taken is not
/// idle: forgetting it would let its host past its quota. Quota 1/s, one key kept: a, b, a at
/// the same instant; the second call to a must not go at once.
#[tokio::test(start_paused = true)]
async fn s49_rl_forgotten_key_does_not_reset_its_quota() {
    let script = Script::default();
    let svc = RateLimitLayer::new(Quota::per_second(1).unwrap())
        .with_max_keys(1)
        .with_max_wait(Duration::ZERO)
        .layer(script.service());
    svc.clone().oneshot(get("a.example")).await.unwrap();
    let _ = svc.clone().oneshot(get("b.example")).await;
    let again = svc.clone().oneshot(get("a.example")).await;
    assert!(
        again.is_err(),
        "a.example was called twice in the same instant under a quota of 1/s"
    );
}

/// A 429 with both `Retry-After: 5` and `RateLimit: r=0;t=50`. The draft (STANDARDS.md §5.1):
/// "If a response contains both the RateLimit and Retry-After fields, the Retry-After field
/// MUST take precedence"; the guide is silent on a response carrying both.
#[tokio::test(start_paused = true)]
async fn s49_rl_retry_after_takes_precedence_over_ratelimit() {
    let got = pause_after(
        429,
        &[("retry-after", "5"), ("ratelimit", "\"default\";r=0;t=50")],
    )
    .await;
    assert_eq!(got, Some(Duration::from_secs(5)));
}
