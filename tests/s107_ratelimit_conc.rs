//! Outside round s107: client-side rate limiting and adaptive concurrency (`sturdy::ratelimit`,
//! `sturdy::concurrency`, through `ClientBuilder` and tower's own layers), judged from README.md,
//! docs/guides/ratelimit.md, docs/guides/concurrency.md, docs/guides/metrics.md,
//! docs/RELIABILITY.md and the rustdoc of `sturdy-ratelimit` and `sturdy-concurrency`.
//!
//! Covers: the pace learned from bare 429s (halving with a custom default pause, growth by a
//! sixteenth per answer and its end under a millisecond, kept through a quiet hour, forgotten by
//! `clear_pause` of a key that is not paused, the overflow limiter's pace past `with_max_keys`,
//! waiters aborted in a paced line); the draft's `RateLimit`/`RateLimit-Policy` vectors as they
//! are, several exhausted members in one field, the 4,096-member bound; pauses at the cap, one
//! past it and the smallest a peer can send; adaptive concurrency (Vegas's half-limit first
//! window, following a queueing server's capacity down and up on paused time, errors caused
//! elsewhere, the exact wait of a full limit, hosts past `with_max_hosts` and the overflow `*`);
//! `set_limit` of a new host past the bound, a waiter dropped unpolled after its turn came, a
//! Vegas limit starting far above capacity, a baseline that moves up); zero `max_wait` and a
//! `ClientBuilder` deadline against a learned pace; a seeded kept stack under `Buffer`,
//! `Timeout` and `ConcurrencyLimit(1)` cancelled at every await; a `ClientBuilder` whose
//! concurrency place is not held during a pause; and a real nginx `limit_req` on 127.0.0.1.

#![cfg(feature = "full")]

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use sturdy::concurrency::{AdaptiveConcurrencyLayer, Algorithm, LimitReached};
use sturdy::core::classify::delivery;
use sturdy::core::events::Event;
use sturdy::core::{find, BoxError, Delivery, ErrorKind};
use sturdy::ratelimit::{PauseCapped, PauseSource, Quota, RateLimitHandle, RateLimitLayer};
use sturdy::ClientBuilder;
use tokio::time::{advance, Instant};
use tower::{service_fn, Layer, Service, ServiceBuilder, ServiceExt};

type Body = Full<Bytes>;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn get(uri: &str) -> Request<()> {
    Request::get(uri).body(()).unwrap()
}

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

/// Lets spawned tasks and woken futures run on the paused clock without moving it.
async fn settle() {
    for _ in 0..30 {
        tokio::task::yield_now().await;
    }
}

/// A small seeded generator (xorshift64*), so runs are the same every time.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

type Script = Arc<dyn Fn(usize, &Request<()>) -> Response<()> + Send + Sync>;

/// An API that answers the n-th call (from 0) with `script(n, req)` and records the path and
/// the time (since `start`) of each call sent.
#[allow(clippy::type_complexity)]
fn scripted(
    start: Instant,
    script: impl Fn(usize, &Request<()>) -> Response<()> + Send + Sync + 'static,
) -> (
    impl Service<Request<()>, Response = Response<()>, Error = Infallible, Future = impl Send>
        + Clone
        + Send
        + 'static,
    Arc<Mutex<Vec<(String, Duration)>>>,
) {
    let sent = Arc::new(Mutex::new(Vec::new()));
    let n = Arc::new(AtomicUsize::new(0));
    let script: Script = Arc::new(script);
    let s = sent.clone();
    let svc = service_fn(move |req: Request<()>| {
        s.lock()
            .unwrap()
            .push((req.uri().path().to_string(), start.elapsed()));
        let i = n.fetch_add(1, Ordering::SeqCst);
        let res = script(i, &req);
        async move { Ok::<_, Infallible>(res) }
    });
    (svc, sent)
}

fn near(a: Option<Duration>, b: Duration) -> bool {
    match a {
        Some(a) => a.abs_diff(b) <= ms(2),
        None => false,
    }
}

// ---------------------------------------------------------------------------------------------
// The pace learned from bare 429s
// ---------------------------------------------------------------------------------------------

/// ratelimit.md: "the first bare 429 of a pause sets a pace of one call per eighth of the pause";
/// "a bare 429 to a call sent at that pace halves the rate, down to one call per pause (one per
/// second by default), and pauses the key for one interval of the new pace only". With
/// `with_default_pause(4 s)`: 500 ms, then 1 s, 2 s, 4 s, and 4 s stays (one call per pause).
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s107_pace_halves_to_one_call_per_custom_default_pause() {
    let start = Instant::now();
    let (api, sent) = scripted(start, |_, _| response(429, &[]));
    let (layer, handle) = RateLimitLayer::adaptive_only()
        .with_default_pause(secs(4))
        .pair();
    let svc = layer.layer(api);
    let key = "api.test";
    let mut paces = Vec::new();
    let mut pauses = Vec::new();
    for i in 0..6 {
        let res = svc
            .clone()
            .oneshot(get(&format!("http://api.test/{i}")))
            .await
            .unwrap();
        assert_eq!(res.status(), 429);
        paces.push(handle.learned_pace(key));
        pauses.push(handle.pause(key));
    }
    let times: Vec<Duration> = sent.lock().unwrap().iter().map(|(_, t)| *t).collect();
    assert_eq!(
        paces,
        vec![
            Some(ms(500)),
            Some(secs(1)),
            Some(secs(2)),
            Some(secs(4)),
            Some(secs(4)),
            Some(secs(4))
        ],
        "sent at {times:?}"
    );
    let expected_pauses = [secs(4), secs(1), secs(2), secs(4), secs(4), secs(4)];
    for (p, e) in pauses.iter().zip(expected_pauses) {
        assert!(near(*p, e), "pauses {pauses:?}, sent at {times:?}");
    }
    let expected_sent = [0, 4, 5, 7, 11, 15].map(secs);
    for (t, e) in times.iter().zip(expected_sent) {
        assert!(t.abs_diff(e) <= ms(2), "sent at {times:?}");
    }
}

/// ratelimit.md: the pace is kept until successes bring it under a millisecond, and
/// handle.rs: `clear_pause` "Ends the pause of key now and returns the time it had left (None:
/// it was not paused) ... A pace the key learned from bare 429s is forgotten too." A key quiet
/// for an hour keeps its pace; `clear_pause` of it when it is no longer paused answers `None`
/// and still forgets the pace, after which calls run free and a bare 429 pauses the default 1 s.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s107_pace_kept_through_a_quiet_hour_and_forgotten_by_clear_pause_when_not_paused() {
    let start = Instant::now();
    let (api, sent) = scripted(start, |n, _| {
        if n == 0 || n == 6 {
            response(429, &[])
        } else {
            response(200, &[])
        }
    });
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    let svc = layer.layer(api);
    svc.clone().oneshot(get("http://api.test/a")).await.unwrap();
    assert_eq!(handle.learned_pace("api.test"), Some(ms(125)));
    advance(secs(3600)).await;
    assert_eq!(handle.pause("api.test"), None);
    assert!(handle.paused().is_empty(), "{:?}", handle.paused());
    assert_eq!(
        handle.learned_pace("API.test"),
        Some(ms(125)),
        "a quiet key keeps its pace"
    );
    assert_eq!(handle.clear_pause("api.test"), None, "it was not paused");
    assert_eq!(
        handle.learned_pace("api.test"),
        None,
        "clear_pause forgets the pace"
    );
    // Five calls at once now leave together.
    let t0 = start.elapsed();
    let mut calls = Vec::new();
    for i in 0..5 {
        calls.push(tokio::spawn(
            svc.clone()
                .oneshot(get(&format!("http://api.test/free{i}"))),
        ));
    }
    for c in calls {
        assert_eq!(c.await.unwrap().unwrap().status(), 200);
    }
    let times: Vec<Duration> = sent.lock().unwrap()[1..6].iter().map(|x| x.1).collect();
    assert!(times.iter().all(|t| *t == t0), "{times:?} vs {t0:?}");
    // A new bare 429 (call 6) pauses the default 1 s and teaches 125 ms again.
    svc.clone().oneshot(get("http://api.test/b")).await.unwrap();
    assert!(
        near(handle.pause("api.test"), secs(1)),
        "{:?}",
        handle.pause("api.test")
    );
    assert_eq!(handle.learned_pace("api.test"), Some(ms(125)));
}

/// ratelimit.md: "every other answer (not 429 or 503) makes the pace a sixteenth faster; once
/// its interval is under a millisecond (more than one call per millisecond) it is forgotten,
/// and the key runs free again". A 404 and a 500 are other answers; a bare 503 (bare 503 pauses
/// off) is not: it leaves the pace as it was. From 125 ms, between 70 and 90 answers end it.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s107_pace_grows_a_sixteenth_per_other_answer_and_ends_under_a_millisecond() {
    let start = Instant::now();
    let (api, sent) = scripted(start, |n, _| match n {
        0 => response(429, &[]),
        n if n % 10 == 3 => response(404, &[]),
        n if n % 10 == 7 => response(500, &[]),
        n if n % 10 == 5 => response(503, &[]),
        _ => response(200, &[]),
    });
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    let svc = layer.layer(api);
    svc.clone().oneshot(get("http://api.test/0")).await.unwrap();
    let mut pace = handle.learned_pace("api.test").unwrap();
    assert_eq!(pace, ms(125));
    let mut answers = 0;
    let mut n = 1;
    loop {
        let res = svc
            .clone()
            .oneshot(get(&format!("http://api.test/{n}")))
            .await
            .unwrap();
        let now = handle.learned_pace("api.test");
        if res.status() == 503 {
            assert_eq!(now, Some(pace), "a bare 503 (pauses off) moved the pace");
        } else {
            answers += 1;
            match now {
                None => break,
                Some(p) => {
                    let ratio = p.as_secs_f64() / pace.as_secs_f64();
                    assert!(
                        (0.93..=0.945).contains(&ratio),
                        "after answer {n} ({}): {pace:?} -> {p:?}",
                        res.status()
                    );
                    pace = p;
                }
            }
        }
        n += 1;
        assert!(n < 200, "the pace never ended: {pace:?}");
    }
    assert!(
        (70..=90).contains(&answers),
        "{answers} answers ended the pace"
    );
    assert!(pace >= ms(1) && pace < ms(2), "last pace {pace:?}");
    assert!(
        handle.pause("api.test").is_none(),
        "no pause left: {:?}",
        handle.pause("api.test")
    );
    // Free again: ten calls at once leave at the same instant.
    let before = sent.lock().unwrap().len();
    let t0 = start.elapsed();
    let mut calls = Vec::new();
    for i in 0..10 {
        calls.push(tokio::spawn(
            svc.clone().oneshot(get(&format!("http://api.test/x{i}"))),
        ));
    }
    for c in calls {
        c.await.unwrap().unwrap();
    }
    let times: Vec<Duration> = sent.lock().unwrap()[before..].iter().map(|x| x.1).collect();
    assert_eq!(times.len(), 10);
    assert!(times.iter().all(|t| *t == t0), "{times:?} vs {t0:?}");
}

/// ratelimit.md: past `with_max_keys` "the keys beyond the bound share one overflow limiter,
/// listed by `paused()` as `*`; the handle answers for such a key with that limiter (its pause,
/// its line), and `clear_pause` of one of them clears the pause of all"; handle.rs: "A pace the
/// key learned from bare 429s is forgotten too". The overflow limiter learns a pace from a bare
/// 429 of one key past the bound; another key past it reads that pace; clearing it through
/// that other key ends the shared pause and pace and leaves the kept key's own untouched.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s107_overflow_limiter_learns_one_pace_for_all_keys_past_the_bound() {
    let start = Instant::now();
    let (api, _sent) = scripted(start, |_, req| match req.uri().host() {
        Some("a.test") | Some("b.test") => response(429, &[]),
        _ => response(200, &[]),
    });
    let (layer, handle) = RateLimitLayer::adaptive_only().with_max_keys(1).pair();
    let svc = layer.layer(api);
    // a.test: paused and paced, so it is not idle and keeps its place.
    svc.clone().oneshot(get("http://a.test/")).await.unwrap();
    assert_eq!(handle.learned_pace("a.test"), Some(ms(125)));
    // c.test then b.test: past the bound.
    svc.clone().oneshot(get("http://c.test/")).await.unwrap();
    svc.clone().oneshot(get("http://b.test/")).await.unwrap();
    let mut paused = handle.paused();
    paused.sort();
    let keys: Vec<&str> = paused.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["*", "a.test"], "{paused:?}");
    assert!(
        near(handle.pause("c.test"), secs(1)),
        "{:?}",
        handle.pause("c.test")
    );
    assert_eq!(handle.learned_pace("c.test"), Some(ms(125)));
    assert_eq!(handle.learned_pace("*"), Some(ms(125)));
    assert!(handle.clear_pause("C.test").is_some());
    assert_eq!(handle.pause("b.test"), None);
    assert_eq!(
        handle.learned_pace("b.test"),
        None,
        "the shared pace is forgotten"
    );
    assert_eq!(
        handle.learned_pace("a.test"),
        Some(ms(125)),
        "the kept key's pace is its own"
    );
    assert!(handle.pause("a.test").is_some());
}

/// ratelimit.md: "If it is dropped (a timeout above it, an aborted task), it leaves the line and
/// the calls behind it move up", and after a bare 429 "every call of the key takes its slot at
/// that pace". Eight calls wait behind a bare 429's pause; three are aborted in line: the line
/// shrinks at once, and the five left go from the end of the pause at the learned pace (each at
/// most 125 ms after the one before), not with gaps where the aborted ones were.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s107_calls_aborted_in_a_paced_line_leave_no_gap() {
    let start = Instant::now();
    let (api, sent) = scripted(start, |n, _| {
        if n == 0 {
            response(429, &[])
        } else {
            response(200, &[])
        }
    });
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    let svc = layer.layer(api);
    svc.clone()
        .oneshot(get("http://api.test/first"))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..8 {
        tasks.push(tokio::spawn(
            svc.clone().oneshot(get(&format!("http://api.test/w{i}"))),
        ));
        settle().await;
    }
    assert_eq!(handle.waiting("api.test"), 8);
    for i in [1, 2, 4] {
        tasks[i].abort();
    }
    settle().await;
    assert_eq!(handle.waiting("api.test"), 5, "aborted calls left the line");
    let mut ok = 0;
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await {
            Ok(r) => {
                assert_eq!(r.unwrap().status(), 200);
                ok += 1;
            }
            Err(e) => assert!(e.is_cancelled() && [1, 2, 4].contains(&i)),
        }
    }
    assert_eq!(ok, 5);
    assert_eq!(handle.waiting("api.test"), 0);
    let sent = sent.lock().unwrap().clone();
    let paths: Vec<&str> = sent[1..].iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        paths,
        ["/w0", "/w3", "/w5", "/w6", "/w7"],
        "first come, first served"
    );
    let times: Vec<Duration> = sent[1..].iter().map(|(_, t)| *t).collect();
    assert!(times[0].abs_diff(secs(1)) <= ms(1), "{times:?}");
    for w in times.windows(2) {
        assert!(w[1] - w[0] <= ms(126), "a gap in the line: {times:?}");
    }
    assert!(
        times[4] <= secs(1) + ms(4 * 125 + 2),
        "the aborted calls' slots were kept: {times:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// RateLimit / RateLimit-Policy: the draft's vectors as they are
// ---------------------------------------------------------------------------------------------

/// The vectors of /work/shared/vectors/STANDARDS.md §5.1, copied from the draft, as they are.
const POLICY_VECTORS: [&str; 6] = [
    r#""burst";q=100;w=60,"daily";q=1000;w=86400"#,
    r#""default";q=100;w=10"#,
    r#""permin";q=50;w=60,"perhr";q=1000;w=3600"#,
    r#""peruser";q=100;w=60;pk=:cHsdsRa894==:"#,
    r#""peruser";q=65535;qu="content-bytes";w=10;pk=:sdfjLJUOUH==:"#,
    r#""somepolicy";q=10000;w=1000"#,
];
const RATELIMIT_VECTORS: [&str; 6] = [
    r#""default";r=50;t=30"#,
    r#""default";r=999;pk=:dHJpYWwxMjEzMjM=:"#,
    r#""default";r=300000000;t=60;pk=:QXBwLTk5OQ==:"#,
    r#""default";r=0;t=50"#,
    r#""problemPolicy";r=0;t=10"#,
    r#""somepolicy";r=10000;t=10"#,
];

/// One fresh adaptive-only layer, one answer: the pause it left on `api.test`, and the
/// `PauseCapped` the response carried.
async fn one_answer(
    layer: RateLimitLayer,
    status: u16,
    headers: &[(&str, &str)],
) -> (Option<Duration>, Option<PauseCapped>, RateLimitHandle) {
    let res = response(status, headers);
    let (layer, handle) = layer.pair();
    let api = service_fn(move |_req: Request<()>| {
        let mut r = Response::new(());
        *r.status_mut() = res.status();
        *r.headers_mut() = res.headers().clone();
        async move { Ok::<_, Infallible>(r) }
    });
    let out = layer
        .layer(api)
        .oneshot(get("http://api.test/"))
        .await
        .unwrap();
    let capped = out.extensions().get::<PauseCapped>().cloned();
    (handle.pause("api.test"), capped, handle)
}

async fn pause_of(status: u16, headers: &[(&str, &str)]) -> Option<Duration> {
    one_answer(RateLimitLayer::adaptive_only(), status, headers)
        .await
        .0
}

/// ratelimit.md: "`RateLimit: "policy";r=0;t=N` (the IETF draft), on any status" pauses; the
/// draft's vectors: only `r=0` ones pause, for `t` seconds, also on the 301; a
/// `RateLimit-Policy` alone never pauses; both fields of one response together pause for `t`.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s107_draft_vectors_as_they_are() {
    for p in POLICY_VECTORS {
        assert_eq!(pause_of(200, &[("ratelimit-policy", p)]).await, None, "{p}");
    }
    let expected = [None, None, None, Some(secs(50)), Some(secs(10)), None];
    for (v, e) in RATELIMIT_VECTORS.iter().zip(expected) {
        let status = if v.contains("problemPolicy") {
            301
        } else {
            200
        };
        let got = pause_of(status, &[("ratelimit", v)]).await;
        match e {
            None => assert_eq!(got, None, "{v}"),
            Some(e) => assert!(near(got, e), "{v}: {got:?}"),
        }
    }
    // The draft's pairs, in one response.
    let got = pause_of(
        200,
        &[
            ("ratelimit-policy", POLICY_VECTORS[1]),
            ("ratelimit", RATELIMIT_VECTORS[3]),
        ],
    )
    .await;
    assert!(near(got, secs(50)), "{got:?}");
    let got = pause_of(
        200,
        &[
            ("ratelimit-policy", POLICY_VECTORS[5]),
            ("ratelimit", RATELIMIT_VECTORS[5]),
        ],
    )
    .await;
    assert_eq!(got, None);
}

/// ratelimit.md: "A later, shorter reset never cuts a pause short." Two exhausted policies in one
/// field (the draft's `default` with t=50 and `problemPolicy` with t=10), in either order, on one
/// field line or two: the key is paused for the longer, 50 s.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s107_two_exhausted_policies_in_one_field_pause_for_the_longer() {
    let a = RATELIMIT_VECTORS[3];
    let b = RATELIMIT_VECTORS[4];
    for field in [format!("{a}, {b}"), format!("{b}, {a}")] {
        let got = pause_of(429, &[("ratelimit", &field)]).await;
        assert!(near(got, secs(50)), "{field}: {got:?}");
    }
    for (x, y) in [(a, b), (b, a)] {
        let got = pause_of(200, &[("ratelimit", x), ("ratelimit", y)]).await;
        assert!(near(got, secs(50)), "{x} / {y}: {got:?}");
    }
}

/// ratelimit.md: "a field's first 4,096 list members are read and the rest left unread ...: a
/// member with `r=0` past them pauses nothing". The 4,096th member pauses; the 4,097th does
/// not; the count runs over a field split across two field lines.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s107_ratelimit_member_4096_is_read_and_4097_is_not() {
    let filler = |n: usize| -> Vec<String> { (0..n).map(|i| format!("\"p{i}\";r=5")).collect() };
    let exhausted = r#""last";r=0;t=7"#.to_string();

    let mut at_4096 = filler(4095);
    at_4096.push(exhausted.clone());
    let got = pause_of(200, &[("ratelimit", &at_4096.join(", "))]).await;
    assert!(near(got, secs(7)), "member 4,096: {got:?}");

    let mut at_4097 = filler(4096);
    at_4097.push(exhausted.clone());
    let got = pause_of(200, &[("ratelimit", &at_4097.join(", "))]).await;
    assert_eq!(got, None, "member 4,097 must be left unread");

    // Split over two field lines: 4,000 members, then 95 and the exhausted one (the 4,096th).
    let first = filler(4000).join(", ");
    let mut second: Vec<String> = (0..95).map(|i| format!("\"q{i}\";r=5")).collect();
    second.push(exhausted.clone());
    let got = pause_of(
        200,
        &[("ratelimit", &first), ("ratelimit", &second.join(", "))],
    )
    .await;
    assert!(near(got, secs(7)), "4,096th over two lines: {got:?}");
    second.insert(0, r#""extra";r=5"#.to_string());
    let got = pause_of(
        200,
        &[("ratelimit", &first), ("ratelimit", &second.join(", "))],
    )
    .await;
    assert_eq!(got, None, "4,097th over two lines");
}

/// RELIABILITY.md: a pause is "at most `max_pause` \[5 min\]; a longer one is stored as the cap
/// and reported once (`PauseCapped` in the response's extensions ...)". Exactly the cap is not
/// longer: kept, no `PauseCapped`; one second past it is capped, for each header, and
/// `PauseCapped` says what was asked, what was applied and which header. Likewise with a cap of
/// 2 s set by `with_max_pause`.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s107_pause_at_the_cap_and_one_past_it() {
    let cases: [(u16, Vec<(&str, String)>, PauseSource); 3] = [
        (
            429,
            vec![("retry-after", "{}".into())],
            PauseSource::RetryAfter,
        ),
        (
            200,
            vec![("ratelimit", "\"default\";r=0;t={}".into())],
            PauseSource::RateLimit,
        ),
        (
            200,
            vec![
                ("x-ratelimit-remaining", "0".into()),
                ("x-ratelimit-reset", "{}".into()),
            ],
            PauseSource::XRateLimit,
        ),
    ];
    // A fresh state for each answer: clones of one layer share its pauses.
    let layer_for = |cap: u64| {
        if cap == 300 {
            RateLimitLayer::adaptive_only()
        } else {
            RateLimitLayer::adaptive_only().with_max_pause(secs(cap))
        }
    };
    for cap in [300u64, 2] {
        for (status, headers, source) in &cases {
            for asked in [cap, cap + 1] {
                let hs: Vec<(&str, String)> = headers
                    .iter()
                    .map(|(k, v)| (*k, v.replace("{}", &asked.to_string())))
                    .collect();
                let hs: Vec<(&str, &str)> = hs.iter().map(|(k, v)| (*k, v.as_str())).collect();
                let (pause, capped, _) = one_answer(layer_for(cap), *status, &hs).await;
                assert!(near(pause, secs(cap)), "{hs:?} cap {cap}: {pause:?}");
                if asked == cap {
                    assert!(capped.is_none(), "{hs:?}: exactly the cap is not capped");
                } else {
                    let c = capped.unwrap_or_else(|| panic!("{hs:?}: no PauseCapped"));
                    assert_eq!(
                        (c.asked(), c.applied(), c.source()),
                        (secs(asked), secs(cap), *source),
                        "{hs:?}"
                    );
                }
            }
        }
    }
}

/// The smallest pauses a peer can send: `X-RateLimit-Reset: 0.001` with nothing remaining
/// pauses at most a millisecond ("seconds to wait (whole or decimal)"), `RateLimit` with `t=0`
/// and `Retry-After: 0` hold nobody, and `t=1` holds one second.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s107_the_smallest_pauses_a_peer_can_send() {
    let (p, _, handle) = one_answer(
        RateLimitLayer::adaptive_only(),
        200,
        &[
            ("x-ratelimit-remaining", "0"),
            ("x-ratelimit-reset", "0.001"),
        ],
    )
    .await;
    assert!(p.unwrap_or_default() <= ms(1), "{p:?}");
    advance(ms(1)).await;
    assert_eq!(handle.pause("api.test"), None);
    assert_eq!(
        pause_of(200, &[("ratelimit", "\"default\";r=0;t=0")]).await,
        None
    );
    assert_eq!(pause_of(429, &[("retry-after", "0")]).await, None);
    assert!(near(
        pause_of(200, &[("ratelimit", "\"default\";r=0;t=1")]).await,
        secs(1)
    ));
}

// ---------------------------------------------------------------------------------------------
// Adaptive concurrency
// ---------------------------------------------------------------------------------------------

/// An API whose calls take `latency(in_flight_at_start)` and that counts calls in flight at
/// it (now and at the peak) and answers 503 past `shed_at` in flight.
#[derive(Clone)]
struct Server {
    in_flight: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
    capacity: Arc<AtomicUsize>,
    shed: Arc<AtomicUsize>,
    served: Arc<AtomicUsize>,
}

impl Server {
    fn new(capacity: usize) -> Self {
        Self {
            in_flight: Arc::new(AtomicUsize::new(0)),
            peak: Arc::new(AtomicUsize::new(0)),
            capacity: Arc::new(AtomicUsize::new(capacity)),
            shed: Arc::new(AtomicUsize::new(0)),
            served: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Queues past its capacity (each call takes `base × in_flight / capacity`, at least
    /// `base`) and sheds past three times it.
    #[allow(clippy::type_complexity)]
    fn queueing(
        &self,
        base: Duration,
    ) -> impl Service<Request<()>, Response = Response<()>, Error = Infallible, Future = impl Send>
           + Clone
           + Send
           + 'static {
        let me = self.clone();
        service_fn(move |_req: Request<()>| {
            let me = me.clone();
            async move {
                let n = me.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                me.peak.fetch_max(n, Ordering::SeqCst);
                let cap = me.capacity.load(Ordering::SeqCst);
                let status = if n > 3 * cap {
                    me.shed.fetch_add(1, Ordering::SeqCst);
                    503
                } else {
                    let factor = (n as f64 / cap as f64).max(1.0);
                    tokio::time::sleep(base.mul_f64(factor)).await;
                    me.served.fetch_add(1, Ordering::SeqCst);
                    200
                };
                me.in_flight.fetch_sub(1, Ordering::SeqCst);
                Ok::<_, Infallible>(response(status, &[]))
            }
        })
    }
}

/// concurrency.md (Vegas): "its first window, and one window in every 100, runs at half the
/// limit". Forty calls at once against a fresh host with the initial limit 20: ten reach the
/// server, thirty wait.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s107_vegas_first_window_runs_at_half_the_limit() {
    let server = Server::new(100);
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_algorithm(Algorithm::Vegas)
        .pair();
    let svc = layer.layer(server.queueing(ms(50)));
    let mut calls = Vec::new();
    for _ in 0..40 {
        calls.push(tokio::spawn(svc.clone().oneshot(get("http://api.test/"))));
    }
    settle().await;
    let state = handle.state("api.test").expect("a state");
    assert_eq!(
        (server.in_flight.load(Ordering::SeqCst), state.limit()),
        (10, 20),
        "in flight at the server, limit; handle: in flight {} waiting {}",
        state.in_flight(),
        state.waiting()
    );
    for c in calls {
        assert_eq!(c.await.unwrap().unwrap().status(), 200);
    }
}

/// concurrency.md: Vegas "settles a few calls above capacity, before the server fails
/// anything" and follows capacity down and back up ("Both follow capacity down and back up
/// within a second"). On paused time: a server of capacity 20 at 10 ms that queues past it and
/// sheds past 60; 48 callers; capacity 20, then 10, then 20 for 3 s each. The limit ends each
/// phase between capacity and twice it, lower in the middle phase, the server sheds nothing,
/// and the no-load latency the handle reports is the server's 10 ms.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s107_vegas_follows_a_queueing_servers_capacity_down_and_up() {
    let server = Server::new(20);
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_algorithm(Algorithm::Vegas)
        .pair();
    let svc = layer.layer(server.queueing(ms(10)));
    let stop = Arc::new(AtomicBool::new(false));
    let mut callers = Vec::new();
    for _ in 0..48 {
        let svc = svc.clone();
        let stop = stop.clone();
        callers.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let _ = svc.clone().oneshot(get("http://api.test/")).await;
            }
        }));
    }
    let mut limits = Vec::new();
    for cap in [20, 10, 20] {
        server.capacity.store(cap, Ordering::SeqCst);
        tokio::time::sleep(secs(3)).await;
        limits.push(handle.limit("api.test").unwrap());
    }
    stop.store(true, Ordering::SeqCst);
    for c in callers {
        c.await.unwrap();
    }
    let baseline = handle.state("api.test").unwrap().baseline();
    eprintln!(
        "limits {limits:?}, served {}, shed {}, peak {}, baseline {baseline:?}",
        server.served.load(Ordering::SeqCst),
        server.shed.load(Ordering::SeqCst),
        server.peak.load(Ordering::SeqCst)
    );
    assert!((20..=40).contains(&limits[0]), "{limits:?}");
    assert!((10..=20).contains(&limits[1]), "{limits:?}");
    assert!(limits[1] < limits[0], "{limits:?}");
    assert!((20..=40).contains(&limits[2]), "{limits:?}");
    assert_eq!(server.shed.load(Ordering::SeqCst), 0, "{limits:?}");
    let b = baseline.expect("a no-load latency");
    assert!(b >= ms(10) && b <= ms(12), "{b:?}");
}

/// An API whose behaviour each request picks with its path.
fn errors_api(
) -> impl Service<Request<()>, Response = Response<()>, Error = BoxError, Future = impl Send>
       + Clone
       + Send
       + 'static {
    service_fn(|req: Request<()>| async move {
        tokio::time::sleep(ms(10)).await;
        match req.uri().path() {
            "/elsewhere-timeout" => Err(sturdy::core::Error::new(
                ErrorKind::Timeout,
                "no access token within 5s",
            )
            .with_cause_elsewhere()
            .into()),
            "/elsewhere-limited" => Err(sturdy::core::Error::new(
                ErrorKind::RateLimited { retry_after: None },
                "the token endpoint refused",
            )
            .with_cause_elsewhere()
            .into()),
            "/timeout" => Err(sturdy::core::Error::new(
                ErrorKind::Timeout,
                "the server did not answer",
            )
            .into()),
            "/hang" => {
                tokio::time::sleep(secs(3600)).await;
                Ok(response(200, &[]))
            }
            _ => Ok(response(200, &[])),
        }
    })
}

/// concurrency.md: "failures whose cause is not the server (a token endpoint that failed or did
/// not answer, a local limit: `sturdy_core::classify::concerns_destination`) ... say nothing
/// about capacity and are ignored". Thirty of each, one after another (each admitted after the
/// last came back, so each could lower the limit): errors marked `with_cause_elsewhere` (of
/// kinds `Timeout` and `RateLimited`), refusals of a `RateLimitLayer` below, of tower's
/// `LoadShed` below, and of a second, full adaptive limit below. The limit stays at 20. The
/// control, a plain `Timeout` error, lowers it to 18.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s107_errors_caused_elsewhere_never_lower_the_limit() {
    async fn limit_after<S>(
        svc: S,
        handle: &sturdy::concurrency::ConcurrencyHandle,
        path: &str,
    ) -> usize
    where
        S: Service<Request<()>, Response = Response<()>> + Clone,
        S::Error: std::fmt::Debug,
    {
        for _ in 0..30 {
            let _ = svc
                .clone()
                .oneshot(get(&format!("http://api.test{path}")))
                .await;
        }
        handle.limit("api.test").unwrap()
    }
    // Marked errors.
    for path in ["/elsewhere-timeout", "/elsewhere-limited"] {
        let (layer, handle) = AdaptiveConcurrencyLayer::new().pair();
        let svc = layer.layer(errors_api());
        assert_eq!(limit_after(svc, &handle, path).await, 20, "{path}");
    }
    // A local rate limiter below, refusing at once.
    {
        let (layer, handle) = AdaptiveConcurrencyLayer::new().pair();
        let svc = ServiceBuilder::new()
            .layer(layer)
            .layer(RateLimitLayer::new(Quota::per_minute(1).unwrap()).with_max_wait(Duration::ZERO))
            .service(errors_api());
        assert_eq!(
            limit_after(svc, &handle, "/").await,
            20,
            "RateLimitLayer below"
        );
    }
    // tower's LoadShed over a full GlobalConcurrencyLimit(1), below.
    {
        let (layer, handle) = AdaptiveConcurrencyLayer::new().pair();
        let global = tower::limit::GlobalConcurrencyLimitLayer::new(1);
        let hog = ServiceBuilder::new()
            .layer(global.clone())
            .service(errors_api());
        let held = tokio::spawn(hog.oneshot(get("http://other.test/hang")));
        settle().await;
        let svc = ServiceBuilder::new()
            .layer(layer)
            .layer(tower::load_shed::LoadShedLayer::new())
            .layer(global)
            .service(errors_api());
        assert_eq!(limit_after(svc, &handle, "/").await, 20, "LoadShed below");
        held.abort();
    }
    // A second adaptive limit below, full, shedding.
    {
        let (layer, handle) = AdaptiveConcurrencyLayer::new().pair();
        let inner = AdaptiveConcurrencyLayer::new()
            .with_limits(1, 1)
            .with_max_wait(Duration::ZERO)
            .layer(errors_api());
        let held = tokio::spawn(inner.clone().oneshot(get("http://api.test/hang")));
        settle().await;
        let svc = layer.layer(inner);
        assert_eq!(
            limit_after(svc, &handle, "/").await,
            20,
            "a full limit below"
        );
        held.abort();
    }
    // Control: the same shape with an error of the server's.
    let (layer, handle) = AdaptiveConcurrencyLayer::new().pair();
    let svc = layer.layer(errors_api());
    let _ = svc.clone().oneshot(get("http://api.test/timeout")).await;
    assert_eq!(
        handle.limit("api.test"),
        Some(18),
        "a plain timeout is a signal"
    );
}

/// concurrency.md: "Past the wait, the call fails without being sent: a `sturdy_core::Error` of
/// kind `RateLimited` (no wait given), delivery `NotSent`, whose source is `LimitReached` (the
/// key, the limit, how long it waited). A maximum wait of zero sheds load instead: a call that
/// finds the limit full fails at once." On paused time the wait is exact: 250 ms, or 0; the
/// refused calls take nothing; the line is empty afterwards.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s107_a_full_limit_refuses_after_exactly_max_wait_or_at_once() {
    for wait in [ms(250), Duration::ZERO] {
        let events = Arc::new(Mutex::new(Vec::new()));
        let e = events.clone();
        let (layer, handle) = AdaptiveConcurrencyLayer::new()
            .with_limits(1, 1)
            .with_max_wait(wait)
            .on_event(move |ev: &Event<'_>| {
                if let Event::ConcurrencyRejected { key, limit, .. } = ev {
                    e.lock().unwrap().push((key.to_string(), *limit));
                }
            })
            .pair();
        let svc = layer.layer(errors_api());
        let slow = tokio::spawn(svc.clone().oneshot(get("http://API.test/hang")));
        settle().await;
        let start = Instant::now();
        let err = svc
            .clone()
            .oneshot(get("http://api.test/"))
            .await
            .unwrap_err();
        assert_eq!(start.elapsed(), wait);
        let reached = find::<LimitReached>(&*err).expect("LimitReached in the chain");
        assert_eq!(
            (
                reached.key(),
                reached.limit(),
                reached.waited(),
                reached.is_shared()
            ),
            ("api.test", 1, wait, false)
        );
        let core = find::<sturdy::core::Error>(&*err).expect("a sturdy error");
        assert_eq!(
            *core.kind(),
            ErrorKind::RateLimited { retry_after: None },
            "{err}"
        );
        assert_eq!(delivery(&*err), Delivery::NotSent);
        assert_eq!(*events.lock().unwrap(), [("api.test".to_string(), 1)]);
        let s = handle.state("api.test").unwrap();
        assert_eq!((s.in_flight(), s.waiting()), (1, 0));
        slow.abort();
        settle().await;
        let s = handle.state("api.test").unwrap();
        assert_eq!((s.in_flight(), s.waiting()), (0, 0));
        let t = Instant::now();
        svc.clone().oneshot(get("http://api.test/")).await.unwrap();
        assert_eq!(t.elapsed(), ms(10), "the place came back");
    }
}

/// concurrency.md: "at most 1,024 hosts (`.with_max_hosts(n)`); a host with nothing in flight
/// and nobody waiting may be forgotten past the bound, and starts again from the initial
/// limit"; handle.rs: `set_limit` of "A key past the layer's host bound ... shares the overflow
/// limit (key `*`), which this then sets"; `state` of such a key gives "those of the overflow
/// limit"; `LimitReached::key` is "the call's own, also past the layer's bound".
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s107_hosts_past_max_hosts_share_the_overflow_and_a_forgotten_host_starts_afresh() {
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_max_hosts(1)
        .with_max_wait(Duration::ZERO)
        .pair();
    let svc = layer.layer(errors_api());
    let a = tokio::spawn(svc.clone().oneshot(get("http://a.test/hang")));
    settle().await;
    handle.set_limit("a.test", 7);
    let b = tokio::spawn(svc.clone().oneshot(get("http://b.test/hang")));
    settle().await;
    let sb = handle.state("b.test").expect("b.test reads the overflow");
    let star = handle.state("*").expect("the overflow state");
    assert_eq!(
        (sb.limit(), sb.in_flight()),
        (star.limit(), star.in_flight())
    );
    assert_eq!((star.limit(), star.in_flight()), (20, 1));
    handle.set_limit("B.test", 1);
    assert_eq!(handle.limit("*"), Some(1));
    assert_eq!(
        handle.limit("a.test"),
        Some(7),
        "the kept host is untouched"
    );
    // c.test is past the bound too: the overflow limit of 1 is full.
    let err = svc
        .clone()
        .oneshot(get("http://c.test/"))
        .await
        .unwrap_err();
    let reached = find::<LimitReached>(&*err).expect("LimitReached");
    assert_eq!(
        (reached.key(), reached.is_shared(), reached.limit()),
        ("c.test", true, 1)
    );
    a.abort();
    b.abort();
    settle().await;
    // a.test has nothing in flight now: a new host may take its place, and a.test starts again
    // from the initial limit.
    svc.clone().oneshot(get("http://d.test/")).await.unwrap();
    svc.clone().oneshot(get("http://a.test/")).await.unwrap();
    assert_eq!(
        handle.limit("a.test"),
        Some(20),
        "states {:?}",
        handle.states()
    );
}

// ---------------------------------------------------------------------------------------------
// Composition, cancelled at every await
// ---------------------------------------------------------------------------------------------

/// README: "Every layer keeps tower's readiness contract, so the client (or any layer alone)
/// can sit under a `Buffer` or over a `ConcurrencyLimit`, driven by `oneshot` or a kept
/// `ready().await?.call(req)`"; ratelimit.md: a dropped waiting call "leaves the line";
/// concurrency.md: "A dropped waiting call leaves the line; a dropped call in flight gives its
/// permit back". Seeded: 60 tasks through `Buffer` → `Timeout(300 ms)` → `RateLimit` →
/// `ConcurrencyLimit(1)` → `AdaptiveConcurrency` → an API with bare 429s, 503s and latencies,
/// each cancelled at a seeded point (dropping the ready service, dropping the call before its
/// first poll, aborting the task, or cut by the timeout). Afterwards nothing is in line or in
/// flight, and a new call goes through at once.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s107_kept_stack_under_buffer_timeout_and_limit_one_cancelled_everywhere() {
    let mut rng = Rng(0x5107_5107);
    let plan: Vec<(u64, u16, u64)> = (0..60)
        .map(|_| {
            let latency = rng.below(150);
            let status = match rng.below(20) {
                0 | 1 => 429,
                2 => 503,
                _ => 200,
            };
            (latency, status, rng.below(6))
        })
        .collect();
    let plan = Arc::new(plan);
    let p = plan.clone();
    let api = service_fn(move |req: Request<()>| {
        let (latency, status, _) = req.uri().path()[1..]
            .parse::<usize>()
            .ok()
            .and_then(|i| p.get(i).copied())
            .unwrap_or((0, 200, 0));
        async move {
            tokio::time::sleep(ms(latency)).await;
            Ok::<_, Infallible>(response(status, &[]))
        }
    });
    let (rl, rl_handle) = RateLimitLayer::adaptive_only().pair();
    let (conc, conc_handle) = AdaptiveConcurrencyLayer::new()
        .with_max_wait(ms(200))
        .pair();
    let stack = ServiceBuilder::new()
        .layer(tower::timeout::TimeoutLayer::new(ms(300)))
        .layer(rl)
        .layer(tower::limit::ConcurrencyLimitLayer::new(1))
        .layer(conc)
        .service(api);
    let buffered = tower::buffer::Buffer::new(stack, 8);
    let mut tasks = Vec::new();
    for (i, &(_, _, how)) in plan.iter().enumerate() {
        let mut svc = buffered.clone();
        let uri = format!("http://api.test/{i}");
        let abort_after = ms(rng.below(400));
        let task = tokio::spawn(async move {
            let ready = svc.ready().await?;
            match how {
                // Dropped once ready, never called.
                0 => Ok::<_, BoxError>(None),
                // Called, and the call dropped before its first poll.
                1 => {
                    drop(ready.call(get(&uri)));
                    Ok(None)
                }
                _ => ready.call(get(&uri)).await.map(|r| Some(r.status())),
            }
        });
        if how == 5 {
            let handle = task.abort_handle();
            tokio::spawn(async move {
                tokio::time::sleep(abort_after).await;
                handle.abort();
            });
        }
        tasks.push(task);
        tokio::time::sleep(ms(rng.below(30))).await;
    }
    let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
    for t in tasks {
        let what = match tokio::time::timeout(secs(60), t)
            .await
            .expect("a task hung")
        {
            Err(e) if e.is_cancelled() => "aborted".to_string(),
            Err(e) => panic!("{e}"),
            Ok(Ok(Some(s))) => s.as_u16().to_string(),
            Ok(Ok(None)) => "dropped".to_string(),
            Ok(Err(e)) => {
                if e.is::<tower::timeout::error::Elapsed>() {
                    "timeout".to_string()
                } else {
                    format!("error: {e}")
                }
            }
        };
        *outcomes.entry(what).or_default() += 1;
    }
    eprintln!("outcomes {outcomes:?}");
    tokio::time::sleep(secs(10)).await;
    assert_eq!(rl_handle.waiting("api.test"), 0);
    let s = conc_handle.state("api.test").expect("a state");
    assert_eq!((s.in_flight(), s.waiting()), (0, 0), "{outcomes:?}");
    rl_handle.clear_pause("api.test");
    let t = Instant::now();
    let mut svc = buffered.clone();
    let res = svc
        .ready()
        .await
        .unwrap()
        .call(get("http://api.test/new"))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(t.elapsed() <= ms(1), "{:?}", t.elapsed());
}

/// `ClientBuilder::with_adaptive_concurrency`: "Placed under the rate limiter, so a call holds
/// its permit for the attempt, not while it waits for a rate slot." A kept client under
/// `Buffer`: a 429 with `Retry-After: 2` pauses the host; five calls made in the pause wait in
/// the rate limiter's line without holding a concurrency place; two of them are cut while they
/// wait (one aborted, one timed out), and the others go when the pause ends.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s107_client_calls_waiting_for_a_pause_hold_no_concurrency_place() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let http = service_fn(move |_req: Request<Body>| {
        let n = c.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(ms(5)).await;
            let mut res = Response::new(Body::default());
            if n == 0 {
                *res.status_mut() = StatusCode::TOO_MANY_REQUESTS;
                res.headers_mut()
                    .insert("retry-after", HeaderValue::from_static("2"));
            }
            Ok::<_, Infallible>(res)
        }
    });
    let (rl, rl_handle) = RateLimitLayer::adaptive_only().pair();
    let (conc, conc_handle) = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .with_max_wait(ms(100))
        .pair();
    let client = ClientBuilder::new()
        .with_rate_limit(rl)
        .with_adaptive_concurrency(conc)
        .build(http);
    let buffered = tower::buffer::Buffer::new(client, 16);
    let full_get = || {
        Request::get("http://api.test/")
            .body(Body::default())
            .unwrap()
    };
    let mut first = buffered.clone();
    let first = tokio::spawn(async move {
        first
            .ready()
            .await
            .unwrap()
            .call(
                Request::get("http://api.test/first")
                    .body(Body::default())
                    .unwrap(),
            )
            .await
    });
    tokio::time::sleep(ms(20)).await;
    assert!(
        rl_handle.pause("api.test").is_some(),
        "the 429 paused the host"
    );
    let mut waiting = Vec::new();
    for i in 0..5 {
        let mut svc = buffered.clone();
        let req = full_get();
        // The third is cut by its own timeout while it waits for the pause.
        let limit = if i == 2 { ms(300) } else { secs(10) };
        waiting.push(tokio::spawn(async move {
            let fut = svc.ready().await?.call(req);
            tokio::time::timeout(limit, fut)
                .await
                .map_err(BoxError::from)?
        }));
    }
    settle().await;
    tokio::time::sleep(ms(100)).await;
    let s = conc_handle.state("api.test").unwrap();
    assert_eq!(
        (s.in_flight(), s.waiting()),
        (0, 0),
        "calls waiting for the pause hold no concurrency place; rate line {}",
        rl_handle.waiting("api.test")
    );
    assert!(
        rl_handle.waiting("api.test") >= 5,
        "{}",
        rl_handle.waiting("api.test")
    );
    waiting.remove(1).abort();
    let cut = waiting.remove(1);
    let res = first.await.unwrap().unwrap();
    assert_eq!(
        res.status(),
        200,
        "the first call was retried after the pause"
    );
    let cut = cut.await.unwrap().unwrap_err();
    assert!(
        cut.is::<tokio::time::error::Elapsed>(),
        "cut by its timeout: {cut}"
    );
    for w in waiting {
        assert_eq!(w.await.unwrap().unwrap().status(), 200);
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        5,
        "the 429, the retry and three calls"
    );
    let s = conc_handle.state("api.test").unwrap();
    assert_eq!((s.in_flight(), s.waiting()), (0, 0));
    assert_eq!(rl_handle.waiting("api.test"), 0);
}

// ---------------------------------------------------------------------------------------------
// More corners of the learned pace
// ---------------------------------------------------------------------------------------------

/// The n-th bare 429 (from 0) answers according to `plan`, through a fresh layer.
async fn pace_after(
    layer: RateLimitLayer,
    answers: Vec<Response<()>>,
) -> (RateLimitHandle, Vec<(Option<Duration>, Option<Duration>)>) {
    let answers = Arc::new(Mutex::new(answers.into_iter()));
    let a = answers.clone();
    let api = service_fn(move |_req: Request<()>| {
        let res = a
            .lock()
            .unwrap()
            .next()
            .unwrap_or_else(|| response(200, &[]));
        async move { Ok::<_, Infallible>(res) }
    });
    let (layer, handle) = layer.pair();
    let svc = layer.layer(api);
    let n = answers.lock().unwrap().len();
    let mut seen = Vec::new();
    for _ in 0..n {
        svc.clone().oneshot(get("http://api.test/")).await.unwrap();
        seen.push((handle.learned_pace("api.test"), handle.pause("api.test")));
    }
    (handle, seen)
}

/// ratelimit.md: "A 429 or 503 that says how long to wait (`Retry-After`, `RateLimit`,
/// `X-RateLimit-*`) sets a pause, not a pace: the server said when." Once a pace is learned, a
/// 429 with `Retry-After: 3` pauses 3 s and leaves the pace as it was (neither halved nor
/// made faster); so do a `RateLimit` and an `X-RateLimit-*` pause on a 429.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s107_a_pause_with_a_wait_leaves_the_learned_pace_as_it_was() {
    for headers in [
        vec![("retry-after", "3")],
        vec![("ratelimit", "\"default\";r=0;t=3")],
        vec![("x-ratelimit-remaining", "0"), ("x-ratelimit-reset", "3")],
    ] {
        let (_, seen) = pace_after(
            RateLimitLayer::adaptive_only(),
            vec![response(429, &[]), response(429, &headers)],
        )
        .await;
        assert_eq!(seen[0].0, Some(ms(125)), "{headers:?}");
        assert_eq!(seen[1].0, Some(ms(125)), "{headers:?}: {seen:?}");
        assert!(near(seen[1].1, secs(3)), "{headers:?}: {seen:?}");
    }
}

/// ratelimit.md: "a bare 503 too, and it teaches a pace as a bare 429 does, with
/// `.with_bare_503_pauses(true)`": 125 ms, then halved by a bare 503 at that pace (250 ms,
/// paused 250 ms), and by a bare 429 after it (500 ms).
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s107_bare_503s_teach_and_halve_the_pace_when_asked() {
    let (_, seen) = pace_after(
        RateLimitLayer::adaptive_only().with_bare_503_pauses(true),
        vec![response(503, &[]), response(503, &[]), response(429, &[])],
    )
    .await;
    let paces: Vec<Option<Duration>> = seen.iter().map(|s| s.0).collect();
    assert_eq!(
        paces,
        [Some(ms(125)), Some(ms(250)), Some(ms(500))],
        "{seen:?}"
    );
    assert!(near(seen[1].1, ms(250)), "{seen:?}");
}

/// `with_max_pause`: "Zero: never pause." A bare 429 then pauses nothing, and so leaves no
/// pace to hold the next calls (one per eighth of no pause); `with_default_pause(ZERO)` too.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s107_no_pause_teaches_no_pace() {
    for layer in [
        RateLimitLayer::adaptive_only().with_max_pause(Duration::ZERO),
        RateLimitLayer::adaptive_only().with_default_pause(Duration::ZERO),
    ] {
        let (_, seen) = pace_after(layer, vec![response(429, &[]), response(429, &[])]).await;
        assert_eq!(seen, [(None, None), (None, None)]);
    }
}

/// `with_default_pause`: "How long a 429 without any wait header pauses its key \[1 s\] (at most
/// `max_pause`)"; ratelimit.md: the first bare 429 "sets a pace of one call per eighth of the
/// pause". A default pause of 10 min under the 5 min cap: the pause is 5 min and the pace an
/// eighth of it, 37.5 s; halving stops at one call per (capped) pause.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s107_a_default_pause_past_the_cap_paces_from_the_capped_pause() {
    let (_, seen) = pace_after(
        RateLimitLayer::adaptive_only()
            .with_default_pause(secs(600))
            .with_max_wait(secs(3600)),
        vec![
            response(429, &[]),
            response(429, &[]),
            response(429, &[]),
            response(429, &[]),
            response(429, &[]),
        ],
    )
    .await;
    assert!(near(seen[0].1, secs(300)), "{seen:?}");
    let paces: Vec<Option<Duration>> = seen.iter().map(|s| s.0).collect();
    assert_eq!(
        paces,
        [
            Some(ms(37_500)),
            Some(secs(75)),
            Some(secs(150)),
            Some(secs(300)),
            Some(secs(300))
        ],
        "{seen:?}"
    );
}

/// A default pause of 4 ms would give a pace of 0.5 ms, under the millisecond at which the docs
/// say a pace is forgotten ("once its interval is under a millisecond (more than one call per
/// millisecond) it is forgotten, and the key runs free again").
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s107_a_pace_under_a_millisecond_is_never_kept() {
    let (_, seen) = pace_after(
        RateLimitLayer::adaptive_only().with_default_pause(ms(4)),
        vec![response(429, &[])],
    )
    .await;
    assert_eq!(seen[0].0, None, "{seen:?}");
}

/// concurrency.md / `with_key`: "A key `*` names the state the keys past the bound share
/// (`OVERFLOW_KEY`): its calls share it with theirs." Keys by tenant, one kept: a tenant past
/// the bound and the tenant named `*` are counted in one overflow limit.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s107_a_concurrency_key_named_star_shares_the_overflow_limit() {
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_max_hosts(1)
        .with_key(|req: &Request<()>| {
            req.headers()
                .get("x-tenant")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("none")
                .to_string()
        })
        .pair();
    let svc = layer.layer(errors_api());
    let call = |tenant: &str| {
        let mut r = get("http://api.test/hang");
        r.headers_mut()
            .insert("x-tenant", HeaderValue::from_str(tenant).unwrap());
        tokio::spawn(svc.clone().oneshot(r))
    };
    let a = call("Tenant-A");
    settle().await;
    let b = call("tenant-b");
    let star = call("*");
    settle().await;
    let s = handle.state("*").expect("overflow");
    assert_eq!(s.in_flight(), 2, "states {:?}", handle.states());
    assert_eq!(handle.state("Tenant-A").unwrap().in_flight(), 1);
    // Keys keep their case: "tenant-a" is not "Tenant-A", so it is past the bound too.
    assert_eq!(handle.state("tenant-a").unwrap().in_flight(), 2);
    for t in [a, b, star] {
        t.abort();
    }
    settle().await;
    assert_eq!(handle.state("*").unwrap().in_flight(), 0);
}

/// The words of `LimitReached`: the key, the limit, the wait.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s107_limit_reached_says_key_limit_and_wait() {
    for (limit, wait) in [(1usize, Duration::ZERO), (2, ms(1500))] {
        let svc = AdaptiveConcurrencyLayer::new()
            .with_limits(limit, limit)
            .with_max_wait(wait)
            .layer(errors_api());
        let mut held = Vec::new();
        for _ in 0..limit {
            held.push(tokio::spawn(
                svc.clone().oneshot(get("http://api.test/hang")),
            ));
        }
        settle().await;
        let err = svc
            .clone()
            .oneshot(get("http://api.test/"))
            .await
            .unwrap_err();
        let reached = find::<LimitReached>(&*err).unwrap().to_string();
        eprintln!("{limit}/{wait:?}: {err} | {reached}");
        assert!(reached.contains("api.test"), "{reached}");
        let at_once = if limit == 1 {
            "1 call at once"
        } else {
            "2 calls at once"
        };
        assert!(reached.contains(at_once), "{reached}");
        for h in held {
            h.abort();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A real nginx `limit_req` on 127.0.0.1
// ---------------------------------------------------------------------------------------------

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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// nginx serving a file behind `limit_req zone=.. {limit}` at `rate`, refusing with `status`.
async fn start_nginx(tag: &str, rate: &str, limit: &str, status: u16) -> Option<Nginx> {
    if !std::path::Path::new(NGINX).exists() {
        eprintln!("nginx not installed: skipped");
        return None;
    }
    for attempt in 0..5 {
        let dir = std::env::temp_dir().join(format!(
            "sturdy-s107-nginx-{}-{tag}-{attempt}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("www")).unwrap();
        std::fs::write(dir.join("www/index.html"), "ok").unwrap();
        let port = free_port();
        let d = dir.display();
        let conf = format!(
            r#"
worker_processes 1;
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
    limit_req_zone $server_port zone=s107:1m rate={rate};
    server {{
        listen 127.0.0.1:{port};
        location / {{
            limit_req zone=s107 {limit};
            limit_req_status {status};
            root {d}/www;
        }}
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
            .arg("-g")
            .arg("daemon off;")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nginx starts");
        let mut nginx = Nginx { child, dir, port };
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                tokio::time::sleep(ms(300)).await;
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

/// A hyper-util client that records each status nginx sent.
#[allow(clippy::type_complexity)]
fn counted_http() -> (
    impl Service<
            Request<Body>,
            Response = Response<hyper::body::Incoming>,
            Error = BoxError,
            Future = impl Send,
        > + Clone
        + Send
        + Sync
        + 'static,
    Arc<Mutex<Vec<u16>>>,
) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Body>();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let svc = service_fn(move |req: Request<Body>| {
        let client = client.clone();
        let s = s.clone();
        async move {
            let res = client.request(req).await.map_err(BoxError::from)?;
            s.lock().unwrap().push(res.status().as_u16());
            Ok::<_, BoxError>(res)
        }
    });
    (svc, seen)
}

/// ratelimit.md, measured against nginx (`limit_req rate=10r/s`, no burst, `limit_req_status
/// 429`): "20 GETs at once through the default `ClientBuilder` all succeed in about 4 s".
/// Here the default client also has an adaptive concurrency limit (nginx's 429s are overload
/// signals to it) and is driven as a kept service under `Buffer`. All 20 succeed; the host
/// learned a pace; after a quiet second the pace is still there (kept while the key is quiet),
/// and a second wave of 10 all succeed; nothing is left in line or in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s107_nginx_limit_req_429_kept_client_with_adaptive_concurrency() {
    let Some(nginx) = start_nginx("c429", "10r/s", "", 429).await else {
        return;
    };
    let (http, seen) = counted_http();
    let (rl, rl_handle) = RateLimitLayer::adaptive_only().pair();
    let (conc, conc_handle) = AdaptiveConcurrencyLayer::new().pair();
    let client = ClientBuilder::new()
        .with_rate_limit(rl)
        .with_adaptive_concurrency(conc)
        .build(http);
    let svc = tower::buffer::Buffer::new(client, 64);
    let uri = format!("http://127.0.0.1:{}/", nginx.port);
    let key = format!("127.0.0.1:{}", nginx.port);
    async fn wave<S, B>(svc: &S, uri: &str, n: usize) -> Vec<Result<u16, String>>
    where
        B: Send + 'static,
        S: Service<Request<Body>, Response = Response<B>, Error = BoxError>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
    {
        let mut calls = Vec::new();
        for _ in 0..n {
            let mut svc = svc.clone();
            let req = Request::get(uri).body(Body::default()).unwrap();
            calls.push(tokio::spawn(async move {
                let fut = svc.ready().await.map_err(|e| e.to_string())?.call(req);
                fut.await
                    .map(|r| r.status().as_u16())
                    .map_err(|e| e.to_string())
            }));
        }
        let mut out = Vec::new();
        for c in calls {
            out.push(
                tokio::time::timeout(secs(30), c)
                    .await
                    .expect("a call hung")
                    .unwrap(),
            );
        }
        out
    }
    let start = Instant::now();
    let first = wave(&svc, &uri, 20).await;
    let took = start.elapsed();
    let refused_first = seen.lock().unwrap().iter().filter(|s| **s != 200).count();
    eprintln!(
        "wave 1: {took:?}, {refused_first} refusals, pace {:?}, limit {:?}",
        rl_handle.learned_pace(&key),
        conc_handle.limit(&key)
    );
    assert!(first.iter().all(|r| r == &Ok(200)), "{first:?}");
    assert!(took < secs(10), "{took:?}");
    tokio::time::sleep(ms(1200)).await;
    assert!(
        rl_handle.learned_pace(&key).is_some(),
        "the pace is kept while the host is quiet"
    );
    let second = wave(&svc, &uri, 10).await;
    assert!(second.iter().all(|r| r == &Ok(200)), "{second:?}");
    let seen = seen.lock().unwrap().clone();
    eprintln!(
        "wave 2: {} more refusals",
        seen.iter().filter(|s| **s != 200).count() - refused_first
    );
    assert_eq!(seen.iter().filter(|s| **s == 200).count(), 30);
    assert_eq!(rl_handle.waiting(&key), 0);
    let s = conc_handle.state(&key).unwrap();
    assert_eq!((s.in_flight(), s.waiting()), (0, 0));
}

// ---------------------------------------------------------------------------------------------
// More corners: zero max_wait under a learned pace, Vegas starting far above capacity, and
// the no-load latency moving up
// ---------------------------------------------------------------------------------------------

/// ratelimit.md: "Zero `max_wait`: the layer never waits", and a call refused "fails at once
/// with `RateLimited` carrying the wait"; after a bare 429 "every call of the key takes its
/// slot at that pace". With a learned pace of 125 ms and zero `max_wait`, a call right after a
/// call that went is refused at once, carrying a wait of at most one interval.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s107_zero_max_wait_under_a_learned_pace_refuses_with_the_paces_wait() {
    let start = Instant::now();
    let (api, sent) = scripted(start, |n, _| {
        if n == 0 {
            response(429, &[])
        } else {
            response(200, &[])
        }
    });
    let (layer, handle) = RateLimitLayer::adaptive_only()
        .with_max_wait(Duration::ZERO)
        .pair();
    let svc = layer.layer(api);
    svc.clone().oneshot(get("http://api.test/0")).await.unwrap();
    let err = svc
        .clone()
        .oneshot(get("http://api.test/paused"))
        .await
        .unwrap_err();
    let limited = find::<sturdy::core::RateLimited>(&*err).expect("RateLimited");
    assert!(
        limited.retry_after() > ms(900) && limited.retry_after() <= secs(1),
        "{err}"
    );
    advance(secs(1)).await;
    svc.clone().oneshot(get("http://api.test/1")).await.unwrap();
    let t = Instant::now();
    let err = svc
        .clone()
        .oneshot(get("http://api.test/2"))
        .await
        .unwrap_err();
    assert_eq!(t.elapsed(), Duration::ZERO, "refused at once");
    let limited = find::<sturdy::core::RateLimited>(&*err).expect("RateLimited");
    // The slot after call 1 was taken at the pace of its time, 125 ms (its success then made
    // the pace a sixteenth faster for the slots after).
    let pace = handle.learned_pace("api.test").unwrap();
    assert!(pace < ms(125), "{pace:?}");
    assert!(
        limited.retry_after() > Duration::ZERO && limited.retry_after() <= ms(125),
        "{err}; pace {pace:?}"
    );
    assert_eq!(delivery(&*err), Delivery::NotSent);
    assert_eq!(sent.lock().unwrap().len(), 2);
    assert_eq!(handle.waiting("api.test"), 0);
}

/// concurrency.md (Vegas): "A probe that finds a clearly lower latency is followed by another
/// after 10 windows, so a limit that starts far above capacity comes down in a few probes."
/// Starting at 200 against a queueing server of capacity 20 (10 ms, sheds past 60) with 100
/// callers: within 3 s (paused) the limit is down to between 20 and 40.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s107_vegas_starting_far_above_capacity_comes_down() {
    let server = Server::new(20);
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_algorithm(Algorithm::Vegas)
        .with_initial_limit(200)
        .pair();
    let svc = layer.layer(server.queueing(ms(10)));
    let stop = Arc::new(AtomicBool::new(false));
    let mut callers = Vec::new();
    for _ in 0..100 {
        let svc = svc.clone();
        let stop = stop.clone();
        callers.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let _ = svc.clone().oneshot(get("http://api.test/")).await;
            }
        }));
    }
    let mut trace = Vec::new();
    for _ in 0..12 {
        tokio::time::sleep(ms(250)).await;
        trace.push(handle.limit("api.test").unwrap());
    }
    stop.store(true, Ordering::SeqCst);
    for c in callers {
        c.await.unwrap();
    }
    eprintln!(
        "limit every 250 ms from 200: {trace:?}, shed {}",
        server.shed.load(Ordering::SeqCst)
    );
    let last = *trace.last().unwrap();
    assert!((20..=40).contains(&last), "{trace:?}");
}

/// concurrency.md (Vegas): "the lowest window average over the last two probe periods is the
/// no-load latency (so a higher one replaces a lower only after two probes)". A server that is
/// never queued (8 callers, latency fixed) answers in 10 ms, then in 30 ms for good: the
/// baseline stays 10 ms for a while, then becomes 30 ms, and the limit, pressed down while the
/// baseline was stale, is not left below the load.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s107_vegas_baseline_moves_up_after_two_probe_periods() {
    let latency = Arc::new(AtomicUsize::new(10));
    let l = latency.clone();
    let api = service_fn(move |_req: Request<()>| {
        let d = ms(l.load(Ordering::SeqCst) as u64);
        async move {
            tokio::time::sleep(d).await;
            Ok::<_, Infallible>(response(200, &[]))
        }
    });
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_algorithm(Algorithm::Vegas)
        .pair();
    let svc = layer.layer(api);
    let stop = Arc::new(AtomicBool::new(false));
    let mut callers = Vec::new();
    for _ in 0..8 {
        let svc = svc.clone();
        let stop = stop.clone();
        callers.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let _ = svc.clone().oneshot(get("http://api.test/")).await;
            }
        }));
    }
    tokio::time::sleep(secs(5)).await;
    let before = handle.state("api.test").unwrap().baseline();
    latency.store(30, Ordering::SeqCst);
    tokio::time::sleep(secs(2)).await;
    let soon = handle.state("api.test").unwrap().baseline();
    let mut trace = Vec::new();
    for _ in 0..24 {
        tokio::time::sleep(secs(10)).await;
        let s = handle.state("api.test").unwrap();
        trace.push((s.baseline(), s.limit()));
    }
    stop.store(true, Ordering::SeqCst);
    for c in callers {
        c.await.unwrap();
    }
    eprintln!("baseline {before:?}, 2 s after {soon:?}, then every 10 s {trace:?}");
    assert!(near(before, ms(10)), "{before:?}");
    assert!(
        near(soon, ms(10)),
        "a higher latency replaced the baseline at once: {soon:?}"
    );
    let (last_baseline, last_limit) = *trace.last().unwrap();
    assert!(near(last_baseline, ms(30)), "{trace:?}");
    assert!(
        last_limit >= 8,
        "the limit stayed below the load: {trace:?}"
    );
}

/// handle.rs `set_limit`: "A change is reported like any other: a `ConcurrencyLimitChanged`
/// event ... A key past the layer's host bound has no limit of its own: it shares the overflow
/// limit (key `*`), which this then sets, and the event names `*`"; `states`: "Every host's
/// limit and load, sorted by key". One host kept and busy; `set_limit` of a host never called
/// sets the overflow limit, reports it under `*`, and leaves the kept host alone.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s107_set_limit_of_a_new_host_past_the_bound_sets_the_overflow() {
    let events = Arc::new(Mutex::new(Vec::new()));
    let e = events.clone();
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_max_hosts(1)
        .on_event(move |ev: &Event<'_>| {
            if let Event::ConcurrencyLimitChanged { key, from, to, .. } = ev {
                e.lock().unwrap().push((key.to_string(), *from, *to));
            }
        })
        .pair();
    let svc = layer.layer(errors_api());
    let a = tokio::spawn(svc.clone().oneshot(get("http://a.test/hang")));
    settle().await;
    let b = tokio::spawn(svc.clone().oneshot(get("http://b.test/hang")));
    settle().await;
    events.lock().unwrap().clear();
    handle.set_limit("z.test", 4);
    assert_eq!(
        *events.lock().unwrap(),
        [("*".to_string(), 20, 4)],
        "states {:?}",
        handle.states()
    );
    assert_eq!(handle.limit("*"), Some(4));
    assert_eq!(handle.limit("a.test"), Some(20));
    let keys: Vec<String> = handle.states().into_iter().map(|(k, _)| k).collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted);
    assert!(
        keys.contains(&"*".to_string()) && keys.contains(&"a.test".to_string()),
        "{keys:?}"
    );
    assert!(!keys.contains(&"z.test".to_string()), "{keys:?}");
    a.abort();
    b.abort();
}

/// concurrency.md: "A dropped waiting call leaves the line; a dropped call in flight gives its
/// permit back." Corner: the waiter's turn came (the call ahead of it finished and handed its
/// place on) but the waiter was never polled again before it was dropped. The place is not
/// lost: the next call goes at once, and nothing is left in flight or in line. Also with a
/// waiter that had a zero-length timeout above it.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s107_a_waiter_dropped_after_its_turn_came_unpolled_keeps_no_place() {
    let (layer, handle) = AdaptiveConcurrencyLayer::new().with_limits(1, 1).pair();
    let svc = layer.layer(errors_api());
    for round in 0..3 {
        let a = tokio::spawn(svc.clone().oneshot(get("http://api.test/")));
        settle().await;
        let mut b = tokio_test::task::spawn(svc.clone().oneshot(get("http://api.test/")));
        assert!(b.poll().is_pending());
        assert_eq!(handle.state("api.test").unwrap().waiting(), 1);
        // A finishes (10 ms); B's turn comes, but B is not polled.
        advance(ms(10)).await;
        a.await.unwrap().unwrap();
        settle().await;
        if round == 1 {
            // Polled once more (it takes its place and is in flight), then dropped.
            assert!(b.poll().is_pending());
        }
        drop(b);
        settle().await;
        let s = handle.state("api.test").unwrap();
        assert_eq!((s.in_flight(), s.waiting()), (0, 0), "round {round}");
        let t = Instant::now();
        let r = tokio::time::timeout(secs(1), svc.clone().oneshot(get("http://api.test/")))
            .await
            .unwrap_or_else(|_| panic!("round {round}: the place was lost"));
        r.unwrap();
        assert_eq!(t.elapsed(), ms(10), "round {round}");
    }
    assert_eq!(handle.limit("api.test"), Some(1));
}

/// ratelimit.md: "A call with a deadline in a `ClientBuilder` stack with its retry layer ...
/// whose turn would come after that deadline does not wait for it to pass: it is refused at
/// once with `RateLimited` carrying the wait, and it was not sent." The turn here is a slot of
/// the pace learned from a bare 429 (125 ms), the deadline 50 ms.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn s107_client_a_paced_slot_past_the_deadline_is_refused_at_once() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let http = service_fn(move |_req: Request<Body>| {
        let n = c.fetch_add(1, Ordering::SeqCst);
        async move {
            let mut res = Response::new(Body::default());
            if n == 0 {
                *res.status_mut() = StatusCode::TOO_MANY_REQUESTS;
            }
            Ok::<_, Infallible>(res)
        }
    });
    let (rl, handle) = RateLimitLayer::adaptive_only().pair();
    let client = ClientBuilder::new().with_rate_limit(rl).build(http);
    let with = |opts: sturdy::core::CallOptions| {
        let mut r = Request::get("http://api.test/")
            .body(Body::default())
            .unwrap();
        r.extensions_mut().insert(opts);
        r
    };
    let first = client
        .clone()
        .oneshot(with(sturdy::core::CallOptions::new().without_retries()))
        .await;
    match first {
        Ok(r) => assert_eq!(r.status(), 429),
        Err(e) => assert!(find::<sturdy::core::RateLimited>(&*e).is_some(), "{e}"),
    }
    assert_eq!(handle.learned_pace("api.test"), Some(ms(125)));
    advance(secs(1)).await;
    let res = client
        .clone()
        .oneshot(with(sturdy::core::CallOptions::new()))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let sent = calls.load(Ordering::SeqCst);
    let t = Instant::now();
    let err = client
        .clone()
        .oneshot(with(sturdy::core::CallOptions::new().with_deadline(ms(50))))
        .await
        .unwrap_err();
    assert_eq!(t.elapsed(), Duration::ZERO, "refused at once: {err}");
    let limited = find::<sturdy::core::RateLimited>(&*err).expect("RateLimited");
    assert!(
        limited.retry_after() > ms(50) && limited.retry_after() <= ms(125),
        "{err}"
    );
    assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");
    assert_eq!(calls.load(Ordering::SeqCst), sent, "not sent");
    assert_eq!(handle.waiting("api.test"), 0);
}
