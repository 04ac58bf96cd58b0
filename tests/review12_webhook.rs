//! Review of `Verified::fresh_until` (timestamp + the tolerance's whole seconds + 1 s) against
//! the timestamp check of each built-in scheme with a signed timestamp (Standard Webhooks,
//! Stripe, a generic HMAC scheme with a timestamp header), and of the receiver's promise built
//! on it (docs/guides/webhooks.md): a copy is refused for as long as it would pass the
//! timestamp check, whatever the dedup TTL. Sub-second, zero and `Duration::MAX` tolerances,
//! timestamps at both ends of the window; in process under paused time, and over TCP with the
//! in-memory and the Redis queue.
#![cfg(feature = "full")]

use crate::server11_common;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::routing::post_service;
use axum::Router;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request};
use http_body_util::{BodyExt, Full};
use server11_common::{ms, redis_url, serve, unique};
use sturdy::core::WallClock;
use sturdy::redis::{RedisStreamConsumer, RedisStreamQueue};
use sturdy::webhook::{
    sign_standard, sign_stripe, EventQueue, GenericHmac, MemoryQueue, MemoryReceiver, Rejection,
    StandardWebhooks, Stripe, Verified, Verifier, WebhookEvent, WebhookReceiver,
};
use tower::ServiceExt;

const WHSEC: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const STRIPE_SECRET: &str = "whsec_stripe_review12";
const GENERIC_SECRET: &str = "acme-review12-secret";

#[derive(Debug, Clone, Copy)]
enum Scheme {
    Standard,
    Stripe,
    Generic,
}

const SCHEMES: [Scheme; 3] = [Scheme::Standard, Scheme::Stripe, Scheme::Generic];

/// Any verifier behind one type, so one receiver type serves every scheme.
#[derive(Debug, Clone)]
struct AnyVerifier(Arc<dyn Verifier>);

impl Verifier for AnyVerifier {
    fn scheme(&self) -> &'static str {
        self.0.scheme()
    }
    fn check_headers(&self, headers: &HeaderMap, now: SystemTime) -> Result<(), Rejection> {
        self.0.check_headers(headers, now)
    }
    fn verify(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        now: SystemTime,
    ) -> Result<Verified, Rejection> {
        self.0.verify(headers, body, now)
    }
}

fn verifier(s: Scheme, tolerance: Duration) -> AnyVerifier {
    AnyVerifier(match s {
        Scheme::Standard => Arc::new(
            StandardWebhooks::new(WHSEC)
                .unwrap()
                .with_tolerance(tolerance),
        ),
        Scheme::Stripe => Arc::new(
            Stripe::new(STRIPE_SECRET)
                .unwrap()
                .with_tolerance(tolerance),
        ),
        Scheme::Generic => Arc::new(
            GenericHmac::new(
                "acme",
                HeaderName::from_static("x-acme-signature"),
                GENERIC_SECRET,
            )
            .unwrap()
            .with_timestamp_header(HeaderName::from_static("x-acme-timestamp"))
            .with_tolerance(tolerance),
        ),
    })
}

fn body(id: &str) -> String {
    format!(r#"{{"id":"{id}","type":"payment.done","n":1}}"#)
}

/// The signed headers of a delivery of `body(id)` at `ts`.
fn signed(s: Scheme, id: &str, ts: i64) -> Vec<(&'static str, String)> {
    let b = body(id);
    match s {
        Scheme::Standard => vec![
            ("webhook-id", id.to_owned()),
            ("webhook-timestamp", ts.to_string()),
            (
                "webhook-signature",
                sign_standard(WHSEC, id, ts, b.as_bytes()).unwrap(),
            ),
        ],
        Scheme::Stripe => vec![(
            "stripe-signature",
            sign_stripe(STRIPE_SECRET, ts, b.as_bytes()),
        )],
        Scheme::Generic => {
            // HMAC-SHA256 over `ts.body`, hex: what Stripe's helper computes, without its `t=`.
            let sig = sign_stripe(GENERIC_SECRET, ts, b.as_bytes());
            let hex = sig.split_once("v1=").unwrap().1.to_owned();
            vec![
                ("x-acme-timestamp", ts.to_string()),
                ("x-acme-signature", hex),
            ]
        }
    }
}

fn header_map(pairs: &[(&'static str, String)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (n, v) in pairs {
        h.insert(*n, HeaderValue::from_str(v).unwrap());
    }
    h
}

fn at(ts: i64, offset_ms: i64) -> SystemTime {
    let base = UNIX_EPOCH + Duration::from_secs(ts as u64);
    if offset_ms >= 0 {
        base + ms(offset_ms as u64)
    } else {
        base - ms(offset_ms.unsigned_abs())
    }
}

const TS: i64 = 1_700_000_000;

/// The tolerances looked at: zero, sub-second, whole and fractional seconds, the default.
const TOLERANCES_MS: [u64; 8] = [0, 1, 500, 999, 1000, 1500, 2999, 300_000];

/// For every instant around both edges of the window: the verifier accepts exactly while the
/// instant is before `fresh_until`, in the past direction; and `fresh_until` is the timestamp
/// plus the tolerance's whole seconds plus one second.
#[test]
fn fresh_until_is_exactly_the_end_of_what_each_scheme_accepts() {
    for s in SCHEMES {
        for tol_ms in TOLERANCES_MS {
            let tol = ms(tol_ms);
            let tol_s = (tol_ms / 1000) as i64;
            let v = verifier(s, tol);
            let h = header_map(&signed(s, "evt_edge", TS));
            let b = body("evt_edge");
            let expected_until = at(TS, (tol_s + 1) * 1000);
            // Around the past edge and the future edge, in 10 ms steps, and 1 ns either side
            // of the end.
            let mut instants: Vec<SystemTime> = Vec::new();
            for edge in [-(tol_s * 1000), (tol_s + 1) * 1000] {
                for off in (edge - 1500..=edge + 1500).step_by(10) {
                    instants.push(at(TS, off));
                }
            }
            instants.push(expected_until - Duration::from_nanos(1));
            instants.push(expected_until);
            for now in instants {
                let age_s = now.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64 - TS;
                let should = age_s <= tol_s && -age_s <= tol_s;
                match v.verify(&h, b.as_bytes(), now) {
                    Ok(got) => {
                        assert!(should, "{s:?} tol {tol_ms} ms: accepted at age {age_s} s");
                        assert_eq!(got.timestamp, Some(TS));
                        assert_eq!(
                            got.fresh_until,
                            Some(expected_until),
                            "{s:?} tol {tol_ms} ms"
                        );
                        assert!(
                            got.fresh_until.unwrap() > now,
                            "{s:?} tol {tol_ms} ms: accepted at {now:?}, after fresh_until"
                        );
                    }
                    Err(r) => {
                        assert!(
                            !should,
                            "{s:?} tol {tol_ms} ms: refused at age {age_s} s: {r}"
                        );
                        assert_eq!(r.status, 401);
                    }
                }
                // The headers-only check agrees with the full verification.
                assert_eq!(
                    v.check_headers(&h, now).is_ok(),
                    should,
                    "{s:?} tol {tol_ms} ms at age {age_s} s"
                );
            }
        }
    }
}

/// A tolerance of `Duration::MAX` accepts every timestamp; the delivery is then acceptable
/// forever, so `fresh_until` (documented: "Until when the verifier would accept this same
/// delivery again", and the receiver keeps the key at least that long) must not be `None`,
/// which means "no timestamp" and lets the receiver forget the key after its dedup TTL.
#[test]
fn a_tolerance_of_duration_max_keeps_a_fresh_until() {
    for s in SCHEMES {
        let v = verifier(s, Duration::MAX);
        let h = header_map(&signed(s, "evt_max", TS));
        let got = v
            .verify(&h, body("evt_max").as_bytes(), at(TS, 86_400_000 * 365))
            .unwrap();
        assert!(got.fresh_until.is_some(), "{s:?}: {got:?}");
    }
    // The same straight through the public constructor.
    let v = Verified::new().with_timestamp(TS, Duration::MAX);
    assert!(v.fresh_until.is_some(), "{v:?}");
}

/// Huge but finite tolerances, and the largest timestamps: no panic, and a `fresh_until` as
/// long as `SystemTime` can hold it.
#[test]
fn with_timestamp_at_the_extremes_never_panics() {
    for (ts, tol) in [
        (0, Duration::ZERO),
        (i64::MAX, Duration::ZERO),
        (i64::MAX, Duration::from_secs(1)),
        (-1, Duration::from_secs(5)),
        (TS, Duration::from_secs(u64::MAX)),
        (TS, Duration::new(u64::MAX, 999_999_999)),
        (TS, Duration::from_nanos(999_999_999)),
    ] {
        let v = Verified::new().with_timestamp(ts, tol);
        assert_eq!(v.timestamp, Some(ts));
    }
    let v = Verified::new().with_timestamp(TS, Duration::from_nanos(999_999_999));
    assert_eq!(v.fresh_until, Some(at(TS, 1000)));
    let v = Verified::new().with_timestamp(TS, ms(86_400_000 * 365 * 100));
    assert_eq!(v.fresh_until, Some(at(TS, 86_400_000 * 365 * 100 + 1000)));
}

// ---------------------------------------------------------------- in process, paused time

/// A wall clock that moves with tokio's (paused) clock, from `origin`.
#[derive(Debug)]
struct TokioWall {
    origin: SystemTime,
    start: tokio::time::Instant,
}

impl WallClock for TokioWall {
    fn now(&self) -> SystemTime {
        self.origin + self.start.elapsed()
    }
}

fn request(s: Scheme, id: &str, ts: i64) -> Request<Full<Bytes>> {
    let mut r = Request::post("/hook");
    for (n, v) in signed(s, id, ts) {
        r = r.header(n, v);
    }
    r.body(Full::from(body(id))).unwrap()
}

async fn answer(rx: &WebhookReceiver<MemoryQueue>, s: Scheme, id: &str, ts: i64) -> (u16, String) {
    let r = rx.clone().oneshot(request(s, id, ts)).await.unwrap();
    let status = r.status().as_u16();
    let text = r.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&text).into_owned())
}

fn drain(events: &mut MemoryReceiver) -> Vec<WebhookEvent> {
    std::iter::from_fn(|| events.try_recv()).collect()
}

/// For each scheme and tolerance, a first delivery at the start, at the oldest instant and at
/// the most future instant the check accepts, then copies every 50 ms (coarser far from the
/// edge) until 1.5 s past the end of the window, with a dedup TTL of 1 ms: the event is queued
/// once; every copy is a duplicate or refused as stale.
#[tokio::test(start_paused = true)]
async fn a_copy_is_never_queued_twice_around_the_edge_paused() {
    for s in SCHEMES {
        for tol_ms in TOLERANCES_MS {
            let tol_s = (tol_ms / 1000) as i64;
            // The first delivery's age, in ms: just signed, the oldest accepted, the most
            // future accepted.
            for first_age_ms in [0, tol_s * 1000 + 999, -(tol_s * 1000)] {
                let (q, mut events) = MemoryQueue::new(1000);
                let rx = WebhookReceiver::new(verifier(s, ms(tol_ms)), q)
                    .with_dedup_ttl(ms(1))
                    .with_clock(Arc::new(TokioWall {
                        origin: at(TS, first_age_ms),
                        start: tokio::time::Instant::now(),
                    }));
                let id = format!("evt_{tol_ms}_{first_age_ms}");
                let first = answer(&rx, s, &id, TS).await;
                assert_eq!(first, (200, "ok".to_owned()), "{s:?} tol {tol_ms} ms");
                let end_ms = (tol_s + 1) * 1000 + 1500;
                let mut age = first_age_ms;
                let mut answers = Vec::new();
                while age < end_ms {
                    let step = if age < tol_s * 1000 - 2000 {
                        ((tol_s * 1000 - 2000 - age) / 8).max(50)
                    } else {
                        50
                    };
                    tokio::time::advance(ms(step as u64)).await;
                    age += step;
                    let a = answer(&rx, s, &id, TS).await;
                    assert!(
                        a == (200, "duplicate".to_owned()) || a.0 == 401,
                        "{s:?} tol {tol_ms} ms, first at age {first_age_ms} ms: copy at age {age} ms answered {a:?}"
                    );
                    answers.push((age, a.0));
                }
                let got = drain(&mut events);
                assert_eq!(
                    got.len(),
                    1,
                    "{s:?} tol {tol_ms} ms, first at age {first_age_ms} ms: queued {} times; answers {answers:?}",
                    got.len()
                );
                // The last copies were refused as stale, not taken as duplicates forever.
                assert_eq!(answers.last().unwrap().1, 401);
            }
        }
    }
}

/// `Duration::MAX` tolerance with the default dedup TTL (24 h): a copy a day and a second later
/// still passes the timestamp check, and is queued again.
#[tokio::test(start_paused = true)]
async fn a_tolerance_of_duration_max_never_queues_a_copy_twice_paused() {
    for s in SCHEMES {
        let (q, mut events) = MemoryQueue::new(10);
        let rx =
            WebhookReceiver::new(verifier(s, Duration::MAX), q).with_clock(Arc::new(TokioWall {
                origin: at(TS, 0),
                start: tokio::time::Instant::now(),
            }));
        assert_eq!(answer(&rx, s, "evt_max", TS).await.0, 200);
        tokio::time::advance(Duration::from_secs(24 * 3600 + 1)).await;
        let again = answer(&rx, s, "evt_max", TS).await;
        let got = drain(&mut events);
        assert_eq!(got.len(), 1, "{s:?}: the copy answered {again:?}");
    }
}

// ---------------------------------------------------------------- over TCP, real time

fn wall() -> SystemTime {
    sturdy::core::clock::SystemClock.now()
}

fn now_ms() -> i64 {
    wall().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

fn raw(s: Scheme, id: &str, ts: i64) -> Vec<u8> {
    let b = body(id);
    let mut head =
        String::from("POST /hook HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n");
    for (n, v) in signed(s, id, ts) {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    head.push_str(&format!("content-length: {}\r\n\r\n", b.len()));
    let mut r = head.into_bytes();
    r.extend_from_slice(b.as_bytes());
    r
}

async fn deliver(addr: SocketAddr, s: Scheme, id: &str, ts: i64) -> (u16, String) {
    let r = server11_common::exchange(addr, &raw(s, id, ts))
        .await
        .expect("an answer");
    (r.status, r.text())
}

/// Sleeps until `ms` (Unix milliseconds) on the wall clock.
async fn until_ms(target: i64) {
    let left = target - now_ms();
    if left > 0 {
        tokio::time::sleep(ms(left as u64)).await;
    }
}

/// Copies of one delivery, over TCP, every 100 ms from the start of a second until 1.3 s past
/// the end of the window, the delivery signed so that the window ends one second after the
/// first (its age is the tolerance's whole seconds at the first): the event is queued once.
/// Returns the answers, and how many events were queued (read by `count`).
async fn copies_over_tcp<Q, F, Fut>(s: Scheme, tol_ms: u64, queue: Q, count: F) -> usize
where
    Q: EventQueue + Clone,
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = usize>,
{
    let tol_s = (tol_ms / 1000) as i64;
    let rx = WebhookReceiver::new(verifier(s, ms(tol_ms)), queue)
        .with_route(unique("route"))
        .with_dedup_ttl(ms(1));
    let addr = serve(Router::new().route("/hook", post_service(rx))).await;
    let id = unique("evt");
    // The first at 30 ms into a second, so it is in the window even on a slow machine; if it
    // still came too late, the next second is tried.
    let mut ts = 0;
    let mut first = (0, String::new());
    for _ in 0..4 {
        let second = now_ms() / 1000 + 1;
        until_ms(second * 1000 + 30).await;
        ts = second - tol_s;
        first = deliver(addr, s, &id, ts).await;
        if first.0 == 200 {
            break;
        }
    }
    assert_eq!(first, (200, "ok".to_owned()), "{s:?} tol {tol_ms} ms");
    let end = (ts + tol_s + 1) * 1000 + 1300;
    let mut answers = Vec::new();
    while now_ms() < end {
        tokio::time::sleep(ms(100)).await;
        let a = deliver(addr, s, &id, ts).await;
        answers.push((now_ms() - ts * 1000, a.clone()));
        assert!(
            a == (200, "duplicate".to_owned()) || a.0 == 401,
            "{s:?} tol {tol_ms} ms: {answers:?}"
        );
    }
    let n = count().await;
    assert_eq!(n, 1, "{s:?} tol {tol_ms} ms: queued {n} times; {answers:?}");
    n
}

/// The tolerances each scheme is tried with, all at once: each case has its own receiver, route
/// and event, and waits out a window of about three seconds on the wall clock.
const TCP_TOLERANCES_MS: [u64; 5] = [0, 500, 1000, 1500, 300_000];

async fn over_tcp_memory(s: Scheme) {
    futures_util::future::join_all(TCP_TOLERANCES_MS.map(|tol_ms| async move {
        let (q, events) = MemoryQueue::new(1000);
        let events = Arc::new(tokio::sync::Mutex::new(events));
        let e2 = events.clone();
        copies_over_tcp(s, tol_ms, q, || async move {
            drain(&mut *e2.lock().await).len()
        })
        .await;
    }))
    .await;
}

async fn redis_pair() -> (RedisStreamQueue, RedisStreamConsumer) {
    let stream = unique("review12-hooks");
    let consumer = RedisStreamConsumer::connect(&redis_url(), stream.clone(), "g", "w", ms(60_000))
        .await
        .unwrap()
        .with_wait(ms(50));
    let queue = RedisStreamQueue::connect(&redis_url(), stream)
        .await
        .unwrap();
    (queue, consumer)
}

async fn drain_redis(consumer: &mut RedisStreamConsumer) -> Vec<WebhookEvent> {
    let mut out = Vec::new();
    while let Some(d) = consumer.next().await.unwrap() {
        consumer.ack(&d).await.unwrap();
        out.push(d.event);
    }
    out
}

async fn over_tcp_redis(s: Scheme) {
    futures_util::future::join_all(TCP_TOLERANCES_MS.map(|tol_ms| async move {
        let (q, consumer) = redis_pair().await;
        let consumer = Arc::new(tokio::sync::Mutex::new(consumer));
        let c2 = consumer.clone();
        copies_over_tcp(s, tol_ms, q, || async move {
            drain_redis(&mut *c2.lock().await).await.len()
        })
        .await;
    }))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standard_copies_over_tcp_memory() {
    over_tcp_memory(Scheme::Standard).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stripe_copies_over_tcp_memory() {
    over_tcp_memory(Scheme::Stripe).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generic_copies_over_tcp_memory() {
    over_tcp_memory(Scheme::Generic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standard_copies_over_tcp_redis() {
    over_tcp_redis(Scheme::Standard).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stripe_copies_over_tcp_redis() {
    over_tcp_redis(Scheme::Stripe).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generic_copies_over_tcp_redis() {
    over_tcp_redis(Scheme::Generic).await;
}

/// A timestamp in the future (by the whole tolerance): the key outlives every copy that
/// passes, over TCP, both queues.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_future_timestamp_is_not_queued_twice_over_tcp() {
    for s in SCHEMES {
        let (q, mut events) = MemoryQueue::new(100);
        let (rq, mut consumer) = redis_pair().await;
        let mem = WebhookReceiver::new(verifier(s, ms(1000)), q).with_dedup_ttl(ms(1));
        let red = WebhookReceiver::new(verifier(s, ms(1000)), rq)
            .with_route(unique("route"))
            .with_dedup_ttl(ms(1));
        let a = serve(Router::new().route("/hook", post_service(mem))).await;
        let b = serve(Router::new().route("/hook", post_service(red))).await;
        let id = unique("evt-future");
        let ts = now_ms() / 1000 + 1;
        let first = (deliver(a, s, &id, ts).await, deliver(b, s, &id, ts).await);
        if first.0 .0 != 200 || first.1 .0 != 200 {
            // The second turned before the first delivery: ts is no longer in the future.
            continue;
        }
        for _ in 0..6 {
            tokio::time::sleep(ms(150)).await;
            let x = deliver(a, s, &id, ts).await;
            let y = deliver(b, s, &id, ts).await;
            assert!(x.0 == 401 || x.1 == "duplicate", "{s:?} {x:?}");
            assert!(y.0 == 401 || y.1 == "duplicate", "{s:?} {y:?}");
        }
        assert_eq!(drain(&mut events).len(), 1, "{s:?}");
        assert_eq!(drain_redis(&mut consumer).await.len(), 1, "{s:?}");
    }
}

/// `Duration::MAX` tolerance over TCP with a short dedup TTL: the copy still verifies, and is
/// queued again once the TTL is over, in memory and in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tolerance_of_duration_max_never_queues_a_copy_twice_over_tcp() {
    for s in SCHEMES {
        let (q, mut events) = MemoryQueue::new(100);
        let (rq, mut consumer) = redis_pair().await;
        let mem = WebhookReceiver::new(verifier(s, Duration::MAX), q).with_dedup_ttl(ms(20));
        let red = WebhookReceiver::new(verifier(s, Duration::MAX), rq)
            .with_route(unique("route"))
            .with_dedup_ttl(ms(20));
        let a = serve(Router::new().route("/hook", post_service(mem))).await;
        let b = serve(Router::new().route("/hook", post_service(red))).await;
        let id = unique("evt-max");
        let ts = now_ms() / 1000;
        assert_eq!(deliver(a, s, &id, ts).await.0, 200);
        assert_eq!(deliver(b, s, &id, ts).await.0, 200);
        tokio::time::sleep(ms(200)).await;
        let x = deliver(a, s, &id, ts).await;
        let y = deliver(b, s, &id, ts).await;
        assert_eq!(
            drain(&mut events).len(),
            1,
            "{s:?} memory: the copy answered {x:?}"
        );
        assert_eq!(
            drain_redis(&mut consumer).await.len(),
            1,
            "{s:?} redis: the copy answered {y:?}"
        );
    }
}
