//! Outside round s68: `sturdy-webhook` (and its Redis Streams queue) judged from its public docs
//! (docs/guides/webhooks.md, docs/RELIABILITY.md, the crates' rustdoc): verification of hostile
//! headers, timestamps and bodies, the acknowledgement only after the queue has the event,
//! deduplication, composition under tower's `Buffer` + `ConcurrencyLimit(1)` and a timeout, a
//! sender that drops its connection mid-request, and the Redis-backed queue and consumer.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use sturdy::core::events::{Event, WebhookOutcome};
use sturdy::core::{BoxError, WallClock};
use sturdy::webhook::{
    sign_github, sign_standard, sign_stripe, BoxFuture, EventQueue, GenericHmac, GitHub,
    MemoryQueue, MemoryReceiver, Push, StandardWebhooks, Stripe, WebhookEvent, WebhookReceiver,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::{Service, ServiceBuilder, ServiceExt};

const SW_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const SW_OTHER: &str = "whsec_dGhlIG90aGVyIHNlY3JldCBvZiB0aGUgdGVzdHM=";
const STRIPE_SECRET: &str = "whsec_s68_stripe_endpoint_secret";
const NOW: i64 = 1_700_000_000;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
struct Fixed(SystemTime);

impl WallClock for Fixed {
    fn now(&self) -> SystemTime {
        self.0
    }
}

fn clock_at(secs: i64) -> Arc<dyn WallClock> {
    Arc::new(Fixed(UNIX_EPOCH + Duration::from_secs(secs as u64)))
}

fn real_now() -> i64 {
    sturdy::core::SystemClock
        .now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A seeded splitmix64 (no `rand` in this package's dev-dependencies).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

type Req = Request<Full<Bytes>>;

fn sw_req_raw(id: &str, ts: &str, sig: &str, body: impl Into<Bytes>) -> Req {
    Request::post("/wh")
        .header("webhook-id", id)
        .header("webhook-timestamp", ts)
        .header("webhook-signature", sig)
        .body(Full::new(body.into()))
        .unwrap()
}

fn sw_req(id: &str, ts: i64, body: &[u8]) -> Req {
    let sig = sign_standard(SW_SECRET, id, ts, body).unwrap();
    sw_req_raw(id, &ts.to_string(), &sig, Bytes::copy_from_slice(body))
}

fn stripe_req(sig: &str, body: impl Into<Bytes>) -> Req {
    Request::post("/wh")
        .header("stripe-signature", sig)
        .body(Full::new(body.into()))
        .unwrap()
}

fn sw_receiver(cap: usize) -> (WebhookReceiver<MemoryQueue>, MemoryReceiver) {
    let (queue, events) = MemoryQueue::new(cap);
    let r = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), queue)
        .with_clock(clock_at(NOW));
    (r, events)
}

fn stripe_receiver(cap: usize) -> (WebhookReceiver<MemoryQueue>, MemoryReceiver) {
    let (queue, events) = MemoryQueue::new(cap);
    let r =
        WebhookReceiver::new(Stripe::new(STRIPE_SECRET).unwrap(), queue).with_clock(clock_at(NOW));
    (r, events)
}

async fn send<Q: EventQueue, B>(r: &WebhookReceiver<Q>, req: Request<B>) -> (StatusCode, String)
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let resp = tokio::time::timeout(Duration::from_secs(5), r.clone().oneshot(req))
        .await
        .expect("the receiver answered within 5 s")
        .unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn drain(events: &mut MemoryReceiver) -> Vec<WebhookEvent> {
    let mut out = Vec::new();
    while let Some(e) = events.try_recv() {
        out.push(e);
    }
    out
}

fn outcomes() -> (
    Arc<Mutex<Vec<(WebhookOutcome, StatusCode)>>>,
    impl Fn(&Event<'_>) + Send + Sync + 'static,
) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let f = move |e: &Event<'_>| {
        if let Event::WebhookReceived {
            outcome, status, ..
        } = e
        {
            s.lock().unwrap().push((*outcome, *status));
        }
    };
    (seen, f)
}

/// The `v1,<base64>` of a header signed with another secret: well-formed, never matching.
fn decoy_sw(n: usize) -> String {
    sign_standard(SW_OTHER, &format!("decoy{n}"), NOW, b"x").unwrap()
}

/// The hex of a Stripe `v1=` signed with another secret.
fn decoy_stripe(n: usize) -> String {
    let h = sign_stripe("whsec_decoy_other", NOW + n as i64, b"x");
    h.split(',').nth(1).unwrap().to_string()
}

// ---------------------------------------------------------------------------------------------
// Verification: public vectors, timestamps, headers
// ---------------------------------------------------------------------------------------------

/// STANDARDS.md SW-1, SW-neg, SW-multi and the Rust multi negative, at the vector's clock.
#[tokio::test]
async fn sw1_vectors_verify_as_they_are() {
    let (queue, mut events) = MemoryQueue::new(100);
    let r = WebhookReceiver::new(
        StandardWebhooks::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap(),
        queue,
    )
    .with_clock(clock_at(1_614_265_330));
    let id = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    let body = r#"{"test": 2432232314}"#;
    assert_eq!(
        sign_standard(SW_SECRET, id, 1_614_265_330, body.as_bytes()).unwrap(),
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    );
    for neg in [
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OA=",
        "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=",
        "v1,dawfeoifkpqwoekfpqoekf",
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLawdd",
        "v1,",
        "v1,g0hM9",
        "v1,tFtCZ5RDCPxzWQRWXWPgrCgE2frDBe9gjpbWQxnVfsQ= v1,Mm7xgUVICxZfQ3bgf0h0Dof65L/IFx+PnZvnDWPCX6Q= v1,9DfC1c3eeOrXB6w/5dIDydLNQaEyww5KalE5jLBZucE=",
    ] {
        let (status, text) = send(&r, sw_req_raw(id, "1614265330", neg, body)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{neg:?}: {text}");
        assert!(!text.contains("g0hM9SsE"), "the answer shows the expected MAC: {text}");
    }
    assert!(drain(&mut events).is_empty());
    let multi = "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= v2,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE= v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=";
    let (status, _) = send(&r, sw_req_raw(id, "1614265330", multi, body)).await;
    assert_eq!(status, StatusCode::OK);
    let got = drain(&mut events);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].id, id);
    assert_eq!(got[0].timestamp, Some(1_614_265_330));
    assert_eq!(&got[0].body[..], body.as_bytes());
}

/// "a signed timestamp within the tolerance [5 minutes, both directions]": ±300 s pass,
/// ±301 s get 401; the same for Stripe (the docs say both directions for it too).
#[tokio::test]
async fn tolerance_edges_both_directions() {
    let (r, mut events) = sw_receiver(100);
    for (i, (off, want)) in [
        (-300, StatusCode::OK),
        (300, StatusCode::OK),
        (-301, StatusCode::UNAUTHORIZED),
        (301, StatusCode::UNAUTHORIZED),
        (0, StatusCode::OK),
    ]
    .into_iter()
    .enumerate()
    {
        let (s, _) = send(&r, sw_req(&format!("msg_tol{i}"), NOW + off, b"{}")).await;
        assert_eq!(s, want, "standard, offset {off}");
    }
    assert_eq!(drain(&mut events).len(), 3);

    let (r, mut events) = stripe_receiver(100);
    for (i, (off, want)) in [
        (-300, StatusCode::OK),
        (300, StatusCode::OK),
        (-301, StatusCode::UNAUTHORIZED),
        (301, StatusCode::UNAUTHORIZED),
    ]
    .into_iter()
    .enumerate()
    {
        let body = format!(r#"{{"id":"evt_tol{i}"}}"#);
        let sig = sign_stripe(STRIPE_SECRET, NOW + off, body.as_bytes());
        let (s, _) = send(&r, stripe_req(&sig, body)).await;
        assert_eq!(s, want, "stripe, offset {off}");
    }
    assert_eq!(drain(&mut events).len(), 2);
}

/// Hostile `webhook-timestamp` values: refused with 400 or 401, never queued, never a panic.
#[tokio::test]
async fn hostile_standard_timestamps_refused() {
    let (r, mut events) = sw_receiver(100);
    let sig = sign_standard(SW_SECRET, "msg_h", NOW, b"{}").unwrap();
    for ts in [
        "hello",
        "",
        "-1",
        "+1700000000",
        "1700000000.0",
        "0x6553f100",
        "18446744073709551615",
        "9223372036854775807",
        "-9223372036854775808",
        "99999999999999999999999999999999",
        "1_700_000_000",
        "1e9",
    ] {
        let (s, _) = send(&r, sw_req_raw("msg_h", ts, &sig, "{}")).await;
        assert!(
            s == StatusCode::BAD_REQUEST || s == StatusCode::UNAUTHORIZED,
            "timestamp {ts:?}: {s}"
        );
    }
    // Signed, but absurd: the far past and far future are refused as stale / future.
    for ts in [i64::MIN, -1, 0, i64::MAX, NOW + 86_400 * 365 * 1000] {
        let (s, _) = send(&r, sw_req(&format!("msg_x{ts}"), ts, b"{}")).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "signed timestamp {ts}");
    }
    // A non-ASCII timestamp header value.
    let mut req = sw_req("msg_u", NOW, b"{}");
    req.headers_mut().insert(
        "webhook-timestamp",
        HeaderValue::from_bytes("１７００".as_bytes()).unwrap(),
    );
    let (s, _) = send(&r, req).await;
    assert!(s == StatusCode::BAD_REQUEST || s == StatusCode::UNAUTHORIZED);
    // Stripe: malformed headers (STANDARDS.md 2.3).
    let (rs, mut sevents) = stripe_receiver(10);
    let good = sign_stripe(STRIPE_SECRET, NOW, b"{}");
    let v1 = good.split(',').nth(1).unwrap();
    for h in [
        "t=,v1=2220f87ef101a04665f11cdf770523143f875572008577fa0f20882ddb9cc3c7".to_string(),
        "t,v1=,v0=".into(),
        "t,v1=,v0".into(),
        "t,,".into(),
        ",,".into(),
        "t".into(),
        "v1,t=1".into(),
        "t=".into(),
        "bad_header".into(),
        format!("t=-1,{v1}"),
        format!("t=9223372036854775807,{v1}"),
        format!("t=18446744073709551615,{v1}"),
        format!("t=1700000000.0,{v1}"),
        format!("t={NOW},v0={}", &v1[3..]),
    ] {
        let (s, _) = send(&rs, stripe_req(&h, "{}")).await;
        assert!(
            s == StatusCode::BAD_REQUEST || s == StatusCode::UNAUTHORIZED,
            "stripe header {h:?}: {s}"
        );
    }
    assert!(drain(&mut events).is_empty());
    assert!(drain(&mut sevents).is_empty());
}

/// With the age check off (`with_tolerance(Duration::MAX)`, documented), a signed delivery of
/// any timestamp passes, and its key is kept ("about 30 years in Redis, 100 years in memory"):
/// a copy is a duplicate. Nothing may overflow or panic at the extremes.
#[tokio::test]
async fn tolerance_max_accepts_extreme_timestamps_without_panic() {
    let (queue, mut events) = MemoryQueue::new(100);
    let r = WebhookReceiver::new(
        StandardWebhooks::new(SW_SECRET)
            .unwrap()
            .with_tolerance(Duration::MAX),
        queue,
    )
    .with_clock(clock_at(NOW));
    for (i, ts) in [0, 1, NOW - 86_400 * 3650, i64::MAX, NOW + 86_400 * 36500]
        .into_iter()
        .enumerate()
    {
        let id = format!("msg_max{i}");
        let (s, _) = send(&r, sw_req(&id, ts, b"{}")).await;
        assert_eq!(s, StatusCode::OK, "timestamp {ts}");
        let (s, _) = send(&r, sw_req(&id, ts, b"{}")).await;
        assert_eq!(s, StatusCode::OK, "copy at timestamp {ts}");
    }
    assert_eq!(drain(&mut events).len(), 5, "each copy was a duplicate");

    let (queue, mut events) = MemoryQueue::new(100);
    let r = WebhookReceiver::new(
        Stripe::new(STRIPE_SECRET)
            .unwrap()
            .with_tolerance(Duration::MAX),
        queue,
    )
    .with_clock(clock_at(NOW));
    for ts in [0, i64::MAX] {
        let body = format!(r#"{{"id":"evt_max{ts}"}}"#);
        let sig = sign_stripe(STRIPE_SECRET, ts, body.as_bytes());
        let (s, _) = send(&r, stripe_req(&sig, body.clone())).await;
        assert_eq!(s, StatusCode::OK, "stripe timestamp {ts}");
    }
    assert_eq!(drain(&mut events).len(), 2);
}

/// A Stripe header listing two `t=` cannot make a stale signature pass: whichever one the
/// verifier reads, it must check the freshness of the timestamp it signed with.
#[tokio::test]
async fn stripe_two_timestamps_do_not_launder_a_stale_signature() {
    let (r, mut events) = stripe_receiver(10);
    let old = NOW - 10_000;
    let body = r#"{"id":"evt_stale"}"#;
    let stale = sign_stripe(STRIPE_SECRET, old, body.as_bytes());
    let v1 = stale.split(',').nth(1).unwrap();
    for h in [
        format!("t={NOW},t={old},{v1}"),
        format!("t={old},t={NOW},{v1}"),
        format!("t={old},{v1},t={NOW}"),
        format!("t={NOW},{v1},t={old}"),
    ] {
        let (s, _) = send(&r, stripe_req(&h, body)).await;
        assert_ne!(s, StatusCode::OK, "{h}");
    }
    assert!(drain(&mut events).is_empty(), "a stale delivery was queued");
}

/// Two `webhook-timestamp` (or `webhook-id`) lines: a stale signature is never accepted, and an
/// accepted delivery is deduplicated on the id that was signed.
#[tokio::test]
async fn standard_duplicate_header_lines() {
    let (r, mut events) = sw_receiver(10);
    let old = NOW - 10_000;
    let sig = sign_standard(SW_SECRET, "msg_dup_ts", old, b"{}").unwrap();
    for order in [[NOW, old], [old, NOW]] {
        let mut req = sw_req_raw("msg_dup_ts", &order[0].to_string(), &sig, "{}");
        req.headers_mut()
            .append("webhook-timestamp", order[1].to_string().parse().unwrap());
        let (s, _) = send(&r, req).await;
        assert_ne!(s, StatusCode::OK, "timestamps {order:?}");
    }
    assert!(drain(&mut events).is_empty());

    let sig = sign_standard(SW_SECRET, "msg_signed", NOW, b"{}").unwrap();
    for (first, second) in [("msg_signed", "msg_other"), ("msg_other", "msg_signed")] {
        let mut req = sw_req_raw(first, &NOW.to_string(), &sig, "{}");
        req.headers_mut()
            .append("webhook-id", second.parse().unwrap());
        let (s, _) = send(&r, req).await;
        if s == StatusCode::OK {
            for e in drain(&mut events) {
                assert_eq!(e.id, "msg_signed", "deduplicated on an unsigned id");
            }
        }
    }
}

/// "only the first MAX_SIGNATURES (16) `v1` entries of a Standard Webhooks or Stripe header are
/// considered; the rest are ignored": a match 17th is ignored, a match 16th counts, and other
/// versions do not use up the 16.
#[tokio::test]
async fn signature_cap_counts_v1_entries_only() {
    let (r, mut events) = sw_receiver(100);
    let mut n = 0;
    let mut check = |decoys: Vec<String>, want: StatusCode, what: &str| {
        n += 1;
        let id = format!("msg_cap{n}");
        let good = sign_standard(SW_SECRET, &id, NOW, b"{}").unwrap();
        let mut entries = decoys;
        entries.push(good);
        (
            sw_req_raw(&id, &NOW.to_string(), &entries.join(" "), "{}"),
            want,
            what.to_string(),
        )
    };
    let cases = vec![
        check((0..15).map(decoy_sw).collect(), StatusCode::OK, "15 decoys"),
        check(
            (0..16).map(decoy_sw).collect(),
            StatusCode::UNAUTHORIZED,
            "16 decoys",
        ),
        check(
            (0..100)
                .map(|i| decoy_sw(i).replacen("v1,", "v2,", 1))
                .collect(),
            StatusCode::OK,
            "100 v2",
        ),
        check(
            (0..100)
                .map(|i| format!("v1a,{}", &decoy_sw(i)[3..]))
                .collect(),
            StatusCode::OK,
            "100 v1a",
        ),
    ];
    for (req, want, what) in cases {
        let (s, _) = send(&r, req).await;
        assert_eq!(s, want, "standard: {what}");
    }
    assert_eq!(drain(&mut events).len(), 3);

    let (r, mut events) = stripe_receiver(100);
    for (i, (k, scheme, want)) in [
        (15, "v1", StatusCode::OK),
        (16, "v1", StatusCode::UNAUTHORIZED),
        (100, "v0", StatusCode::OK),
        (100, "v2", StatusCode::OK),
    ]
    .into_iter()
    .enumerate()
    {
        let body = format!(r#"{{"id":"evt_cap{i}"}}"#);
        let good = sign_stripe(STRIPE_SECRET, NOW, body.as_bytes());
        let mut parts = vec![format!("t={NOW}")];
        parts.extend((0..k).map(|j| decoy_stripe(j).replacen("v1=", &format!("{scheme}="), 1)));
        parts.push(good.split(',').nth(1).unwrap().to_string());
        let (s, _) = send(&r, stripe_req(&parts.join(","), body)).await;
        assert_eq!(s, want, "stripe: {k} {scheme} decoys");
    }
    assert_eq!(drain(&mut events).len(), 3);
}

/// Stripe's own libraries read the header's pairs in any order (`v1=..,t=..`).
#[tokio::test]
async fn stripe_pairs_in_any_order() {
    let (r, mut events) = stripe_receiver(10);
    let body = r#"{"id":"evt_order"}"#;
    let good = sign_stripe(STRIPE_SECRET, NOW, body.as_bytes());
    let (t, v1) = good.split_once(',').unwrap();
    let (s, _) = send(&r, stripe_req(&format!("{v1},{t}"), body)).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(drain(&mut events).len(), 1);
}

/// Whitespace in a Standard Webhooks list: extra spaces between entries, a trailing space, a
/// header line with many spaces. The reference Rust library skips empty entries.
#[tokio::test]
async fn standard_signature_whitespace() {
    let (r, mut events) = sw_receiver(10);
    let mut ok = 0;
    for (i, shape) in ["{d}  {g}", "{g}   {d}", "{d} {g} ", "{d}\t{g}"]
        .iter()
        .enumerate()
    {
        let id = format!("msg_ws{i}");
        let g = sign_standard(SW_SECRET, &id, NOW, b"{}").unwrap();
        let h = shape.replace("{d}", &decoy_sw(i)).replace("{g}", &g);
        let (s, _) = send(&r, sw_req_raw(&id, &NOW.to_string(), &h, "{}")).await;
        if i < 3 {
            assert_eq!(s, StatusCode::OK, "{shape}");
            ok += 1;
        } else {
            // A tab is not the spec's separator: refused or accepted, never a panic.
            assert!(
                s == StatusCode::OK
                    || s == StatusCode::UNAUTHORIZED
                    || s == StatusCode::BAD_REQUEST
            );
            if s == StatusCode::OK {
                ok += 1;
            }
        }
    }
    assert_eq!(drain(&mut events).len(), ok);
}

/// A header of 10,000 entries (and one of 40,000) is parsed in time linear in its size, and
/// a single 64 KiB entry is just a bad signature.
#[tokio::test]
async fn huge_signature_headers_cost_linear_and_small() {
    let (r, mut events) = sw_receiver(100);
    let decoy = decoy_sw(0);
    let timed = |k: usize, id: String| {
        let r = r.clone();
        let good = sign_standard(SW_SECRET, &id, NOW, b"{}").unwrap();
        let mut h = vec![decoy.replacen("v1,", "v2,", 1); k];
        h.push(good);
        let h = h.join(" ");
        async move {
            let start = Instant::now();
            let (s, _) = send(&r, sw_req_raw(&id, &NOW.to_string(), &h, "{}")).await;
            (s, start.elapsed())
        }
    };
    let mut small = Duration::MAX;
    let mut big = Duration::MAX;
    let mut bigger = Duration::MAX;
    for round in 0..3 {
        let (s, t) = timed(1, format!("msg_s{round}")).await;
        assert_eq!(s, StatusCode::OK);
        small = small.min(t);
        let (s, t) = timed(10_000, format!("msg_b{round}")).await;
        assert_eq!(s, StatusCode::OK);
        big = big.min(t);
        let (s, t) = timed(40_000, format!("msg_bb{round}")).await;
        assert_eq!(s, StatusCode::OK);
        bigger = bigger.min(t);
    }
    assert!(
        big < Duration::from_millis(500),
        "10,000 entries took {big:?}"
    );
    assert!(
        bigger < big * 12 + Duration::from_millis(20),
        "4x the entries took {bigger:?} vs {big:?} (small: {small:?}): not linear"
    );
    assert_eq!(drain(&mut events).len(), 9);
    let huge = format!("v1,{}", "A".repeat(64 * 1024));
    let (s, _) = send(&r, sw_req_raw("msg_huge", &NOW.to_string(), &huge, "{}")).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(drain(&mut events).is_empty());
}

/// A body changed by one byte anywhere is refused; an empty body and a non-UTF-8 body that were
/// signed are queued exactly as sent.
#[tokio::test]
async fn body_bytes_exactly_as_signed() {
    let (r, mut events) = sw_receiver(100);
    let body: Vec<u8> = br#"{"type":"invoice.paid","amount":1200}"#.to_vec();
    let sig = sign_standard(SW_SECRET, "msg_b", NOW, &body).unwrap();
    let mut rng = Rng(68);
    for _ in 0..20 {
        let mut b = body.clone();
        let at = rng.below(b.len() as u64) as usize;
        b[at] ^= 1 << rng.below(8);
        let (s, _) = send(&r, sw_req_raw("msg_b", &NOW.to_string(), &sig, b)).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
    }
    let mut longer = body.clone();
    longer.push(b' ');
    let (s, _) = send(&r, sw_req_raw("msg_b", &NOW.to_string(), &sig, longer)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = send(
        &r,
        sw_req_raw(
            "msg_b",
            &NOW.to_string(),
            &sig,
            body[..body.len() - 1].to_vec(),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(drain(&mut events).is_empty());

    let (s, _) = send(&r, sw_req("msg_empty", NOW, b"")).await;
    assert_eq!(s, StatusCode::OK);
    let raw: Vec<u8> = vec![0xff, 0xfe, 0x00, 0xc3, 0x28, b'.', 0x80];
    let (s, _) = send(&r, sw_req("msg_raw", NOW, &raw)).await;
    assert_eq!(s, StatusCode::OK);
    let got = drain(&mut events);
    assert_eq!(got.len(), 2);
    assert!(got[0].body.is_empty());
    assert_eq!(&got[1].body[..], &raw[..]);
}

struct ChunkStream {
    chunks: Vec<Bytes>,
    polled: Arc<AtomicUsize>,
    pend_after: bool,
}

impl futures_util::Stream for ChunkStream {
    type Item = Result<http_body::Frame<Bytes>, std::io::Error>;
    fn poll_next(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.polled.fetch_add(1, Ordering::SeqCst);
        if self.chunks.is_empty() {
            if self.pend_after {
                return Poll::Pending;
            }
            return Poll::Ready(None);
        }
        let c = self.chunks.remove(0);
        Poll::Ready(Some(Ok(http_body::Frame::data(c))))
    }
}

/// "[1 MiB, `with_body_limit`]; past it, 413", whether or not a length is declared; and "a
/// delivery without well-formed, fresh signature headers costs no body read".
#[tokio::test]
async fn body_limit_edges_and_no_read_before_headers() {
    let (queue, mut events) = MemoryQueue::new(100);
    let r = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), queue)
        .with_clock(clock_at(NOW))
        .with_body_limit(100);
    let (s, _) = send(&r, sw_req("msg_l100", NOW, &[b'a'; 100])).await;
    assert_eq!(s, StatusCode::OK);
    let (s, text) = send(&r, sw_req("msg_l101", NOW, &[b'a'; 101])).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(text, "payload too large");
    // Streamed, no length: 60 + 60 bytes.
    let body = [b'b'; 120];
    let sig = sign_standard(SW_SECRET, "msg_ls", NOW, &body).unwrap();
    let polled = Arc::new(AtomicUsize::new(0));
    let stream = ChunkStream {
        chunks: vec![
            Bytes::copy_from_slice(&body[..60]),
            Bytes::copy_from_slice(&body[60..]),
        ],
        polled: polled.clone(),
        pend_after: true,
    };
    let req = Request::post("/wh")
        .header("webhook-id", "msg_ls")
        .header("webhook-timestamp", NOW.to_string())
        .header("webhook-signature", sig)
        .body(StreamBody::new(stream))
        .unwrap();
    let (s, _) = send(&r, req).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "streamed past the limit");
    // Stale headers: answered without the body ever being polled (it would never end).
    for (ts, id, sig) in [
        (NOW - 1000, "msg_stale", None),
        (NOW, "msg.dot", None),
        (NOW, "msg_v2", Some(decoy_sw(2).replacen("v1,", "v2,", 1))),
        (NOW, "msg_nob64a", Some("v1,not*base64".to_string())),
    ] {
        let polled = Arc::new(AtomicUsize::new(0));
        let stream = ChunkStream {
            chunks: vec![],
            polled: polled.clone(),
            pend_after: true,
        };
        let req = Request::post("/wh")
            .header("webhook-id", id)
            .header("webhook-timestamp", ts.to_string())
            .header(
                "webhook-signature",
                sig.unwrap_or_else(|| sign_standard(SW_SECRET, "x", ts, b"").unwrap()),
            )
            .body(StreamBody::new(stream))
            .unwrap();
        let s = tokio::time::timeout(Duration::from_secs(2), r.clone().oneshot(req))
            .await
            .unwrap_or_else(|_| panic!("{id}: no answer: the receiver waits for the body"))
            .unwrap()
            .status();
        assert!(
            s == StatusCode::UNAUTHORIZED || s == StatusCode::BAD_REQUEST,
            "{id}: {s}"
        );
        assert_eq!(polled.load(Ordering::SeqCst), 0, "{id}: the body was read");
    }
    assert_eq!(drain(&mut events).len(), 1);

    // The default: exactly 1 MiB passes, one byte more is 413.
    let (r, mut events) = sw_receiver(10);
    let mib = vec![b'z'; 1024 * 1024];
    let (s, _) = send(&r, sw_req("msg_mib", NOW, &mib)).await;
    assert_eq!(s, StatusCode::OK);
    let mut more = mib.clone();
    more.push(b'z');
    let (s, _) = send(&r, sw_req("msg_mib1", NOW, &more)).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(drain(&mut events).len(), 1);
}

#[derive(Debug)]
struct Movable(Arc<AtomicI64>);

impl WallClock for Movable {
    fn now(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.0.load(Ordering::SeqCst) as u64)
    }
}

/// "The timestamp is checked again once the body is in: a body that trickles in past the
/// tolerance gets 401 and is not queued."
#[tokio::test]
async fn body_trickling_past_the_tolerance_is_refused() {
    for advance in [0i64, 10] {
        let now = Arc::new(AtomicI64::new(NOW));
        let (queue, mut rx) = MemoryQueue::new(10);
        let r = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), queue)
            .with_clock(Arc::new(Movable(now.clone())));
        let ts = NOW - 295;
        let body = b"{\"slow\":true}";
        let sig = sign_standard(SW_SECRET, "msg_trickle", ts, body).unwrap();
        let (tx, rxb) = tokio::sync::mpsc::channel::<Bytes>(4);
        let stream = futures_util::stream::unfold(rxb, |mut rxb| async move {
            rxb.recv()
                .await
                .map(|b| (Ok::<_, std::io::Error>(http_body::Frame::data(b)), rxb))
        });
        let req = Request::post("/wh")
            .header("webhook-id", "msg_trickle")
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", sig)
            .body(StreamBody::new(stream))
            .unwrap();
        let r2 = r.clone();
        let task = tokio::spawn(async move { send(&r2, req).await.0 });
        tx.send(Bytes::copy_from_slice(&body[..5])).await.unwrap();
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        now.fetch_add(advance, Ordering::SeqCst);
        tx.send(Bytes::copy_from_slice(&body[5..])).await.unwrap();
        drop(tx);
        let s = task.await.unwrap();
        if advance == 0 {
            assert_eq!(s, StatusCode::OK);
            assert_eq!(drain(&mut rx).len(), 1);
        } else {
            assert_eq!(
                s,
                StatusCode::UNAUTHORIZED,
                "finished 305 s after its timestamp"
            );
            assert!(drain(&mut rx).is_empty());
        }
    }
}

/// "The dedup key is kept at least until the timestamp plus the tolerance plus one second ...
/// whatever the dedup TTL": with a TTL of zero a copy is still a duplicate.
#[tokio::test]
async fn zero_dedup_ttl_still_refuses_a_copy_in_the_window() {
    let (queue, mut rx) = MemoryQueue::new(10);
    let r = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), queue)
        .with_clock(clock_at(NOW))
        .with_dedup_ttl(Duration::ZERO);
    for _ in 0..3 {
        assert_eq!(
            send(&r, sw_req("msg_z", NOW, b"{}")).await.0,
            StatusCode::OK
        );
    }
    assert_eq!(drain(&mut rx).len(), 1);
}

/// "`:` and `%` in the scheme and route names are percent-encoded, so distinct triples never
/// give one key", through receivers sharing a queue.
#[tokio::test]
async fn dedup_keys_of_distinct_triples_differ() {
    let triples = [
        ("standard", "a", "b:c"),
        ("standard", "a:b", "c"),
        ("standard", "a%3Ab", "c"),
        ("standard:a", "b", "c"),
        ("standard", "a%", "3Ab:c"),
    ];
    let keys: Vec<String> = triples
        .iter()
        .map(|(s, r, i)| {
            WebhookEvent::new(*s, *i, Bytes::new())
                .with_route(*r)
                .dedup_key()
        })
        .collect();
    for i in 0..keys.len() {
        for j in i + 1..keys.len() {
            assert_ne!(keys[i], keys[j], "{:?} and {:?}", triples[i], triples[j]);
        }
    }
    let (queue, mut rx) = MemoryQueue::new(10);
    for (_, route, id) in &triples[..3] {
        let r = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), queue.clone())
            .with_clock(clock_at(NOW))
            .with_route(*route);
        assert_eq!(send(&r, sw_req(id, NOW, b"{}")).await.0, StatusCode::OK);
    }
    assert_eq!(drain(&mut rx).len(), 3);
}

/// `webhook-id`: "ASCII, 1 to 256 bytes, without a `.`, else 400; spaces and tabs inside are
/// kept".
#[tokio::test]
async fn webhook_id_edges() {
    let (r, mut rx) = sw_receiver(10);
    let max = "i".repeat(256);
    for (id, want) in [
        (max.as_str(), StatusCode::OK),
        ("msg with\tspace s", StatusCode::OK),
        ("msg.dot", StatusCode::BAD_REQUEST),
        (".", StatusCode::BAD_REQUEST),
        ("", StatusCode::BAD_REQUEST),
    ] {
        let (s, _) = send(&r, sw_req(id, NOW, b"{}")).await;
        assert_eq!(s, want, "id {id:?}");
    }
    let long = "i".repeat(257);
    assert_eq!(
        send(&r, sw_req(&long, NOW, b"{}")).await.0,
        StatusCode::BAD_REQUEST
    );
    let mut req = sw_req("msg_x", NOW, b"{}");
    req.headers_mut().insert(
        "webhook-id",
        HeaderValue::from_bytes("msg_café".as_bytes()).unwrap(),
    );
    assert_eq!(send(&r, req).await.0, StatusCode::BAD_REQUEST);
    let mut req = sw_req("msg_y", NOW, b"{}");
    req.headers_mut().remove("webhook-id");
    assert_eq!(send(&r, req).await.0, StatusCode::BAD_REQUEST);
    let got = drain(&mut rx);
    assert_eq!(
        got.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
        [max.as_str(), "msg with\tspace s"]
    );
    assert_eq!(got[1].headers["webhook-id"], "msg with\tspace s");
}

/// "Every rejection answers a short generic text": nothing the sender sent is echoed back.
#[tokio::test]
async fn rejection_texts_are_generic_and_echo_nothing() {
    let (queue, _rx) = MemoryQueue::new(10);
    let r = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), queue)
        .with_clock(clock_at(NOW))
        .with_body_limit(10);
    let evil = "EVIL<script>alert(1)</script>";
    let cases = vec![
        sw_req_raw(evil, &NOW.to_string(), "v1,AAAA", "{}"),
        sw_req_raw("msg.x", &NOW.to_string(), &format!("v1,{evil}"), "{}"),
        sw_req_raw("msg_e", evil, &decoy_sw(0), "{}"),
        sw_req_raw("msg_e", &NOW.to_string(), evil, "{}"),
        sw_req_raw("msg_e", &NOW.to_string(), &decoy_sw(0), evil),
        sw_req_raw("msg_e", &(NOW - 999).to_string(), &decoy_sw(0), "{}"),
        sw_req("msg_e", NOW, evil.as_bytes()),
    ];
    for req in cases {
        let (s, text) = send(&r, req).await;
        assert!(s.is_client_error(), "{s}");
        assert!(
            !text.contains("EVIL") && !text.contains("script"),
            "{s}: {text:?}"
        );
        assert!(
            [
                "invalid signature",
                "payload too large",
                "forbidden",
                "bad request",
                "unauthorized"
            ]
            .contains(&text.as_str()),
            "{s}: {text:?} is not one of the short generic texts"
        );
    }
}

/// `MemoryQueue::new(0)` holds one event, `usize::MAX` is accepted; at most 100,000 dedup keys
/// are remembered, the oldest forgotten first.
#[tokio::test]
async fn memory_queue_capacity_and_key_bound() {
    let (q, mut rx) = MemoryQueue::new(0);
    let ev = |id: &str| WebhookEvent::new("standard", id, Bytes::new());
    let ttl = Duration::from_secs(3600);
    assert_eq!(q.push(ev("a"), ttl).await.unwrap(), Push::Enqueued);
    assert_eq!(q.push(ev("b"), ttl).await.unwrap(), Push::Full);
    assert_eq!(q.push(ev("a"), ttl).await.unwrap(), Push::Duplicate);
    assert_eq!(rx.recv().await.unwrap().id, "a");
    assert_eq!(q.push(ev("b"), ttl).await.unwrap(), Push::Enqueued);
    let (_big, _rx2) = MemoryQueue::new(usize::MAX);

    let (q, mut rx) = MemoryQueue::new(16);
    for i in 0..100_001u32 {
        assert_eq!(
            q.push(ev(&format!("k{i}")), ttl).await.unwrap(),
            Push::Enqueued
        );
        rx.try_recv().unwrap();
    }
    assert_eq!(q.push(ev("k100000"), ttl).await.unwrap(), Push::Duplicate);
    assert_eq!(q.push(ev("k50000"), ttl).await.unwrap(), Push::Duplicate);
    assert_eq!(
        q.push(ev("k0"), ttl).await.unwrap(),
        Push::Enqueued,
        "the oldest forgotten"
    );
}

/// "remembers at most 100,000 dedup keys (the oldest forgotten first): only past 100,000
/// deliveries within one tolerance window could a copy of the oldest get through again". After
/// exactly 100,000 deliveries a copy of the first was accepted again (the bound was 99,999, and
/// a duplicate push itself forgot the oldest key); fixed.
#[tokio::test]
async fn memory_queue_remembers_100000_keys() {
    let ev = |id: &str| WebhookEvent::new("standard", id, Bytes::new());
    let ttl = Duration::from_secs(3600);
    let (q, mut rx) = MemoryQueue::new(16);
    for i in 0..100_000u32 {
        assert_eq!(
            q.push(ev(&format!("p{i}")), ttl).await.unwrap(),
            Push::Enqueued
        );
        rx.try_recv().unwrap();
    }
    assert_eq!(
        q.push(ev("p0"), ttl).await.unwrap(),
        Push::Duplicate,
        "the oldest of exactly 100,000 keys was forgotten"
    );
    assert_eq!(q.push(ev("p1"), ttl).await.unwrap(), Push::Duplicate);
}

/// `with_body_limit(0)`: an empty body passes, one byte is 413; `with_offload_above(0)` (every
/// body on the blocking pool) verifies the same, on a current-thread runtime too.
#[tokio::test]
async fn body_limit_zero_and_offload_everything() {
    let (queue, mut rx) = MemoryQueue::new(10);
    let r = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), queue)
        .with_clock(clock_at(NOW))
        .with_body_limit(0)
        .with_offload_above(0);
    assert_eq!(send(&r, sw_req("msg_0", NOW, b"")).await.0, StatusCode::OK);
    assert_eq!(
        send(&r, sw_req("msg_1", NOW, b"x")).await.0,
        StatusCode::PAYLOAD_TOO_LARGE
    );
    let r = r.with_body_limit(1 << 20);
    assert_eq!(send(&r, sw_req("msg_2", NOW, b"x")).await.0, StatusCode::OK);
    assert_eq!(
        send(&r, sw_req_raw("msg_3", &NOW.to_string(), &decoy_sw(1), "x"))
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(drain(&mut rx).len(), 2);
}

/// `GenericHmac` with a timestamp header: `timestamp.body` signed, the tolerance both ways,
/// deduplicated on a digest of the signed content, the timestamp header and named headers
/// carried (values up to 1 KiB, at most 4 per name).
#[tokio::test]
async fn generic_hmac_with_timestamp_and_carried_headers() {
    let secret = "generic-s68-secret";
    let verifier = GenericHmac::new("acme", HeaderName::from_static("x-acme-sig"), secret)
        .unwrap()
        .with_prefix("sha256=")
        .with_timestamp_header(HeaderName::from_static("x-acme-ts"))
        .with_event_header(HeaderName::from_static("x-acme-event"));
    let (queue, mut rx) = MemoryQueue::new(100);
    let r = WebhookReceiver::new(verifier, queue).with_clock(clock_at(NOW));
    let req = |ts: &str, body: &str, events: &[String]| {
        let mut b = Request::post("/wh").header("x-acme-ts", ts).header(
            "x-acme-sig",
            sign_github(secret, format!("{ts}.{body}").as_bytes()),
        );
        for e in events {
            b = b.header("x-acme-event", e.as_str());
        }
        b.body(Full::new(Bytes::from(body.to_string()))).unwrap()
    };
    for (off, want) in [
        (-300i64, StatusCode::OK),
        (300, StatusCode::OK),
        (-301, StatusCode::UNAUTHORIZED),
        (301, StatusCode::UNAUTHORIZED),
    ] {
        let ts = (NOW + off).to_string();
        assert_eq!(send(&r, req(&ts, "{}", &[])).await.0, want, "offset {off}");
    }
    for ts in ["hello", "", "-1", "1.5", "18446744073709551615"] {
        let (s, _) = send(&r, req(ts, "{}", &[])).await;
        assert!(
            s == StatusCode::BAD_REQUEST || s == StatusCode::UNAUTHORIZED,
            "{ts:?}: {s}"
        );
    }
    assert_eq!(drain(&mut rx).len(), 2);
    // Carried headers: 5 values, one of them over 1 KiB.
    let events: Vec<String> = vec![
        "a".into(),
        "x".repeat(1025),
        "b".into(),
        "c".into(),
        "d".into(),
        "e".into(),
    ];
    let ts = NOW.to_string();
    assert_eq!(
        send(&r, req(&ts, "{\"k\":1}", &events)).await.0,
        StatusCode::OK
    );
    // The same signed content again is a duplicate; a new timestamp is a new event.
    assert_eq!(send(&r, req(&ts, "{\"k\":1}", &[])).await.0, StatusCode::OK);
    let ts2 = (NOW + 1).to_string();
    assert_eq!(
        send(&r, req(&ts2, "{\"k\":1}", &[])).await.0,
        StatusCode::OK
    );
    let got = drain(&mut rx);
    assert_eq!(got.len(), 2);
    assert!(got[0].id.starts_with("sha256:"));
    assert_ne!(got[0].id, got[1].id);
    assert_eq!(got[0].timestamp, Some(NOW));
    assert_eq!(got[0].scheme, "acme");
    assert_eq!(got[0].headers["x-acme-ts"], ts.as_str());
    let carried: Vec<_> = got[0].headers.get_all("x-acme-event").iter().collect();
    assert!(carried.len() <= 4, "{carried:?}");
    assert!(
        carried.iter().all(|v| v.len() <= 1024),
        "a value over 1 KiB carried"
    );
    assert!(!carried.is_empty());
}

/// "401 ... for a Standard Webhooks header without a decodable `v1` entry", at the headers
/// step, before the body is read; "a delivery without well-formed, fresh signature headers
/// costs no body read". `v1,not*base64` is refused at once, but an empty `v1,`
/// entry (STANDARDS.md's "partial signature"), like `v1,AAAA` (3 bytes, not a 32-byte
/// HMAC-SHA256 tag), had the body read first; now refused before it (the guide: a `v1` entry
/// "that decodes to 32 bytes").
#[tokio::test]
async fn empty_v1_entry_refused_before_the_body() {
    for sig in ["v1,", "v1,AAAA", "v1, v2,AAAA v1,AAAAAAAA"] {
        let (r, _rx) = sw_receiver(10);
        let polled = Arc::new(AtomicUsize::new(0));
        let stream = ChunkStream {
            chunks: vec![],
            polled: polled.clone(),
            pend_after: true,
        };
        let req = Request::post("/wh")
            .header("webhook-id", "msg_empty_v1")
            .header("webhook-timestamp", NOW.to_string())
            .header("webhook-signature", sig)
            .body(StreamBody::new(stream))
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(2), r.oneshot(req))
            .await
            .expect("answered without waiting for a body that never ends")
            .unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{sig}");
        assert_eq!(polled.load(Ordering::SeqCst), 0, "{sig}");
    }
}

// ---------------------------------------------------------------------------------------------
// Secrets
// ---------------------------------------------------------------------------------------------

/// Secrets: `whsec_` optional, padding optional; empty and non-base64 refused with an error
/// that does not show the secret; `Debug` of every verifier and receiver shows no secret.
#[tokio::test]
async fn secrets_decode_refuse_and_never_show() {
    let padded = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaS=";
    let unpadded = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaS";
    let bare = "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaS=";
    let a = sign_standard(padded, "m", 1, b"x").unwrap();
    assert_eq!(sign_standard(unpadded, "m", 1, b"x").unwrap(), a);
    assert_eq!(sign_standard(bare, "m", 1, b"x").unwrap(), a);
    for s in [padded, unpadded, bare] {
        StandardWebhooks::new(s).unwrap();
    }
    for bad in [
        "",
        "whsec_",
        "whsec_hunter2!!notbase64",
        "whsec_hunter2 secret",
        "whsec_hunter2\u{e9}",
    ] {
        let e = StandardWebhooks::new(bad).expect_err(bad);
        let text = format!("{e} {e:?}");
        assert!(
            !text.contains("hunter2"),
            "the error shows the secret: {text}"
        );
        assert!(sign_standard(bad, "m", 1, b"x").is_err());
    }
    assert!(Stripe::new("").is_err());
    assert!(GitHub::new("").is_err());
    assert!(Stripe::with_secrets(std::iter::empty::<&str>()).is_err());
    assert!(Stripe::with_secrets(["whsec_ok", ""]).is_err());
    assert!(StandardWebhooks::with_secrets([SW_SECRET, ""]).is_err());
    assert!(GenericHmac::new("x", HeaderName::from_static("x-sig"), "").is_err());
    assert!(GenericHmac::new("", HeaderName::from_static("x-sig"), "k").is_err());

    let secret_b64 = "aHVudGVyMi1zd2gtc2VjcmV0LWtleS0yNC1ieXRlcyE=";
    let raw = "hunter2-swh-secret-key-24-bytes!";
    let stripe_secret = "whsec_hunter2_stripe";
    let (q, _rx) = MemoryQueue::new(1);
    let sw = StandardWebhooks::with_secrets([format!("whsec_{secret_b64}").as_str(), SW_SECRET])
        .unwrap();
    let dbg = format!(
        "{:?} {:?} {:?} {:?} {:?}",
        sw,
        Stripe::new(stripe_secret).unwrap(),
        GitHub::new(stripe_secret).unwrap(),
        GenericHmac::new("g", HeaderName::from_static("x-sig"), stripe_secret).unwrap(),
        WebhookReceiver::new(sw.clone(), q),
    );
    let bytes_dbg = format!("{:?}", raw.as_bytes());
    for needle in [
        secret_b64,
        raw,
        "hunter2",
        &bytes_dbg[1..20],
        "MfKQ9r8GKYqr",
    ] {
        assert!(!dbg.contains(needle), "Debug shows {needle:?}: {dbg}");
    }
}

/// "No `Debug` output or log line shows a secret": and no log line shows the MAC a delivery
/// should have carried (that would let anyone reading logs sign).
#[test]
fn logs_show_neither_secret_nor_expected_signature() {
    let logs = crate::logs13_common::Capture::default();
    let _guard = logs.install();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (r, _events) = sw_receiver(10);
        let body = b"{\"n\":1}";
        let good = sign_standard(SW_SECRET, "msg_log", NOW, body).unwrap();
        let bad = decoy_sw(1);
        let (s, _) = send(&r, sw_req_raw("msg_log", &NOW.to_string(), &bad, &body[..])).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        let (s, _) = send(
            &r,
            sw_req_raw("msg_log", &(NOW - 999).to_string(), &bad, &body[..]),
        )
        .await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        let (rs, _e) = stripe_receiver(10);
        let sbody = r#"{"id":"evt_log"}"#;
        let sgood = sign_stripe(STRIPE_SECRET, NOW, sbody.as_bytes());
        let sbad = format!("t={NOW},{}", decoy_stripe(3));
        let (s, _) = send(&rs, stripe_req(&sbad, sbody)).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        let text = logs.all();
        assert!(text.contains("sturdy"), "nothing was logged:\n{text}");
        let good_mac = &good[3..];
        let sgood_mac = sgood.split("v1=").nth(1).unwrap();
        for needle in [
            &SW_SECRET[6..],
            STRIPE_SECRET,
            "s68_stripe_endpoint",
            good_mac,
            &good_mac[..16],
            sgood_mac,
            &sgood_mac[..16],
        ] {
            assert!(
                !text.contains(needle),
                "a log line shows {needle:?}:\n{text}"
            );
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Acknowledgement, queue failures, dedup
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct FlakyQueue {
    inner: MemoryQueue,
    /// 0: works, 1: fails, 2: hangs, 3: panics.
    mode: Arc<AtomicU8>,
    pushes: Arc<AtomicUsize>,
}

impl EventQueue for FlakyQueue {
    fn push(&self, event: WebhookEvent, ttl: Duration) -> BoxFuture<Result<Push, BoxError>> {
        self.pushes.fetch_add(1, Ordering::SeqCst);
        match self.mode.load(Ordering::SeqCst) {
            1 => Box::pin(async {
                Err::<Push, BoxError>("redis://:hunter2@db refused: DB PASSWORD WRONG".into())
            }),
            2 => Box::pin(std::future::pending()),
            3 => Box::pin(async { panic!("queue bug") }),
            _ => self.inner.push(event, ttl),
        }
    }
}

fn flaky() -> (FlakyQueue, MemoryReceiver, Arc<AtomicU8>) {
    let (inner, rx) = MemoryQueue::new(100);
    let mode = Arc::new(AtomicU8::new(0));
    (
        FlakyQueue {
            inner,
            mode: mode.clone(),
            pushes: Arc::new(AtomicUsize::new(0)),
        },
        rx,
        mode,
    )
}

/// A queue that fails: 503 with `Retry-After`, a generic text (not the queue's error), the
/// outcome `QueueFailed`; the redelivery once it works is queued once.
#[tokio::test]
async fn failing_queue_is_503_retry_after_and_redelivery_is_queued_once() {
    let (q, mut rx, mode) = flaky();
    let (seen, f) = outcomes();
    let r = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), q)
        .with_clock(clock_at(NOW))
        .on_event(f);
    mode.store(1, Ordering::SeqCst);
    let resp = r
        .clone()
        .oneshot(sw_req("msg_q", NOW, b"{}"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let ra = resp
        .headers()
        .get(http::header::RETRY_AFTER)
        .expect("Retry-After on a failed queue")
        .to_str()
        .unwrap()
        .to_string();
    assert!(ra.parse::<u64>().is_ok(), "Retry-After {ra:?}");
    let text = resp.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&text);
    assert!(
        !text.contains("hunter2") && !text.contains("PASSWORD"),
        "the answer shows the queue's error: {text}"
    );
    mode.store(0, Ordering::SeqCst);
    for _ in 0..2 {
        let (s, _) = send(&r, sw_req("msg_q", NOW, b"{}")).await;
        assert_eq!(s, StatusCode::OK);
    }
    assert_eq!(drain(&mut rx).len(), 1);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![
            (WebhookOutcome::QueueFailed, StatusCode::SERVICE_UNAVAILABLE),
            (WebhookOutcome::Accepted, StatusCode::OK),
            (WebhookOutcome::Duplicate, StatusCode::OK),
        ]
    );
}

/// A full queue: 503 with `Retry-After`, "the id is not remembered, so the redelivery is
/// accepted".
#[tokio::test]
async fn full_queue_then_redelivery_accepted() {
    let (queue, mut rx) = MemoryQueue::new(1);
    let (seen, f) = outcomes();
    let r = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), queue)
        .with_clock(clock_at(NOW))
        .on_event(f);
    assert_eq!(
        send(&r, sw_req("msg_f1", NOW, b"1")).await.0,
        StatusCode::OK
    );
    let resp = r
        .clone()
        .oneshot(sw_req("msg_f2", NOW, b"2"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(resp.headers().contains_key(http::header::RETRY_AFTER));
    assert_eq!(rx.recv().await.unwrap().id, "msg_f1");
    assert_eq!(
        send(&r, sw_req("msg_f2", NOW, b"2")).await.0,
        StatusCode::OK
    );
    assert_eq!(rx.recv().await.unwrap().id, "msg_f2");
    let seen: Vec<_> = seen.lock().unwrap().iter().map(|x| x.0).collect();
    assert_eq!(
        seen,
        vec![
            WebhookOutcome::Accepted,
            WebhookOutcome::QueueFull,
            WebhookOutcome::Accepted
        ]
    );
}

/// The same message id delivered 32 times at once (on a multi-thread runtime) and then again:
/// every copy gets 200, one is queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_id_at_once_is_handled_once() {
    let (queue, mut rx) = MemoryQueue::new(100);
    let (seen, f) = outcomes();
    let r = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), queue)
        .with_clock(clock_at(NOW))
        .on_event(f);
    let mut tasks = Vec::new();
    for i in 0..32 {
        let r = r.clone();
        // The same id, signed over different bodies (a sender's retry with a changed body).
        let body = format!("{{\"copy\":{}}}", i % 3);
        tasks.push(tokio::spawn(async move {
            send(&r, sw_req("msg_once", NOW, body.as_bytes())).await.0
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(
        send(&r, sw_req("msg_once", NOW, b"{}")).await.0,
        StatusCode::OK
    );
    assert_eq!(drain(&mut rx).len(), 1);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen.iter()
            .filter(|x| x.0 == WebhookOutcome::Accepted)
            .count(),
        1
    );
    assert_eq!(
        seen.iter()
            .filter(|x| x.0 == WebhookOutcome::Duplicate)
            .count(),
        32
    );
}

/// Stripe dedup: "the body's `id`" is the top-level one; a too-long or non-string id falls
/// back to a digest; Stripe's retries (same body, new timestamp) are duplicates.
#[tokio::test]
async fn stripe_dedup_on_top_level_id() {
    let (r, mut rx) = stripe_receiver(100);
    let deliver = |body: String, ts: i64| {
        let r = r.clone();
        async move {
            let sig = sign_stripe(STRIPE_SECRET, ts, body.as_bytes());
            send(&r, stripe_req(&sig, body)).await.0
        }
    };
    assert_eq!(
        deliver(r#"{"id":"evt_1","type":"a"}"#.into(), NOW).await,
        StatusCode::OK
    );
    assert_eq!(
        deliver(r#"{"id":"evt_1","type":"a"}"#.into(), NOW + 60).await,
        StatusCode::OK
    );
    assert_eq!(
        deliver(r#"{"data":{"object":{"id":"evt_inner"}}}"#.into(), NOW).await,
        StatusCode::OK
    );
    assert_eq!(deliver(r#"{"id":12345}"#.into(), NOW).await, StatusCode::OK);
    let long = "e".repeat(257);
    assert_eq!(
        deliver(format!(r#"{{"id":"{long}"}}"#), NOW).await,
        StatusCode::OK
    );
    let max = "f".repeat(256);
    assert_eq!(
        deliver(format!(r#"{{"id":"{max}"}}"#), NOW).await,
        StatusCode::OK
    );
    assert_eq!(deliver("not json".into(), NOW).await, StatusCode::OK);
    let got = drain(&mut rx);
    let ids: Vec<&str> = got.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids.len(), 6, "{ids:?}");
    assert_eq!(ids[0], "evt_1");
    assert!(ids[1].starts_with("sha256:"), "nested id used: {}", ids[1]);
    assert!(ids[2].starts_with("sha256:"), "numeric id: {}", ids[2]);
    assert!(ids[3].starts_with("sha256:"), "257-byte id: {}", ids[3]);
    assert_eq!(ids[4], max);
    assert!(ids[5].starts_with("sha256:"));
    assert_eq!(got[0].timestamp, Some(NOW));
    assert!(got[0].headers.contains_key("stripe-signature"));
}

/// "give each receiver that shares a queue with another receiver of the same scheme its own
/// name": two routes on one queue never share an id space; GitHub dedups on the body digest
/// whatever `X-GitHub-Delivery` says.
#[tokio::test]
async fn routes_and_github_digest() {
    let (queue, mut rx) = MemoryQueue::new(100);
    let a = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), queue.clone())
        .with_clock(clock_at(NOW))
        .with_route("a");
    let b = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), queue.clone())
        .with_clock(clock_at(NOW))
        .with_route("b");
    assert_eq!(
        send(&a, sw_req("msg_r", NOW, b"{}")).await.0,
        StatusCode::OK
    );
    assert_eq!(
        send(&b, sw_req("msg_r", NOW, b"{}")).await.0,
        StatusCode::OK
    );
    assert_eq!(
        send(&a, sw_req("msg_r", NOW, b"{}")).await.0,
        StatusCode::OK
    );
    let got = drain(&mut rx);
    assert_eq!(
        got.iter().map(|e| e.route.as_str()).collect::<Vec<_>>(),
        ["a", "b"]
    );
    let gh = WebhookReceiver::new(GitHub::new("It's a Secret to Everybody").unwrap(), queue);
    for d in ["d-1", "d-2", "d-3"] {
        let req = Request::post("/wh")
            .header(
                "x-hub-signature-256",
                "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
            )
            .header("x-github-delivery", d)
            .header("x-github-event", "ping")
            .body(Full::new(Bytes::from_static(b"Hello, World!")))
            .unwrap();
        assert_eq!(send(&gh, req).await.0, StatusCode::OK);
    }
    assert_eq!(
        sign_github("It's a Secret to Everybody", b"Hello, World!"),
        "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    );
    let got = drain(&mut rx);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].headers["x-github-delivery"], "d-1");
}

// ---------------------------------------------------------------------------------------------
// Composition
// ---------------------------------------------------------------------------------------------

/// Under `Buffer` + `ConcurrencyLimit(1)`, kept services and clones driven with
/// `ready().await?.call(req)` from 40 tasks: all answered, nothing stuck.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_buffer_and_concurrency_limit_one() {
    let (r, mut rx) = sw_receiver(1_000);
    let svc = ServiceBuilder::new()
        .buffer::<Req>(4)
        .concurrency_limit(1)
        .service(r);
    let mut tasks = Vec::new();
    for t in 0..8 {
        let mut kept = svc.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..5 {
                let id = format!("msg_c{}", (t * 5 + i) % 30);
                let resp = kept
                    .ready()
                    .await
                    .unwrap()
                    .call(sw_req(&id, NOW, b"{}"))
                    .await
                    .unwrap();
                assert_eq!(resp.status(), StatusCode::OK);
            }
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(10), t)
            .await
            .expect("no deadlock")
            .unwrap();
    }
    assert_eq!(drain(&mut rx).len(), 30, "40 deliveries of 30 ids");
}

/// A queue that hangs, under a 50 ms timeout layer (paused clock, in process): 408, the
/// hanging push dropped; the service goes on (no stuck permit under `ConcurrencyLimit(1)`),
/// and the redelivery is queued once. A panicking queue under `CatchPanic` gives 500 and
/// breaks nothing.
#[tokio::test(start_paused = true)]
async fn hanging_queue_under_timeout_and_concurrency_limit() {
    let (q, mut rx, mode) = flaky();
    let pushes = q.pushes.clone();
    let r = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), q)
        .with_clock(clock_at(NOW));
    let svc = ServiceBuilder::new()
        .layer(tower_http::catch_panic::CatchPanicLayer::new())
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_millis(50),
        ))
        .buffer::<Req>(4)
        .concurrency_limit(1)
        .service(r);
    mode.store(2, Ordering::SeqCst);
    for i in 0..3 {
        let resp = tokio::time::timeout(
            Duration::from_secs(2),
            svc.clone()
                .oneshot(sw_req(&format!("msg_h{i}"), NOW, b"{}")),
        )
        .await
        .expect("the timeout layer answered")
        .unwrap();
        assert_eq!(resp.status(), StatusCode::REQUEST_TIMEOUT);
    }
    mode.store(3, Ordering::SeqCst);
    let resp = tokio::time::timeout(
        Duration::from_secs(2),
        svc.clone().oneshot(sw_req("msg_h0", NOW, b"{}")),
    )
    .await
    .expect("answered")
    .unwrap();
    assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
    mode.store(0, Ordering::SeqCst);
    for i in 0..3 {
        for _ in 0..2 {
            let resp = tokio::time::timeout(
                Duration::from_secs(2),
                svc.clone()
                    .oneshot(sw_req(&format!("msg_h{i}"), NOW, b"{}")),
            )
            .await
            .expect("the service still answers")
            .unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
        }
    }
    assert_eq!(drain(&mut rx).len(), 3);
    assert_eq!(pushes.load(Ordering::SeqCst), 10);
}

/// The receiver and its futures are `Send`/`Sync` (a composed server needs it).
#[test]
fn receiver_is_send_sync() {
    fn check<T: Send + Sync + Clone + 'static>(_: &T) {}
    fn fut<F: Future + Send>(_: &F) {}
    let (r, _rx) = sw_receiver(1);
    check(&r);
    let mut r2 = r;
    let f = Service::<Req>::call(&mut r2, sw_req("m", NOW, b""));
    fut(&f);
}

// ---------------------------------------------------------------------------------------------
// Over the wire: a sender that drops its connection at seeded points
// ---------------------------------------------------------------------------------------------

async fn serve<Q: EventQueue>(r: WebhookReceiver<Q>) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let app = axum::Router::new().route("/wh", axum::routing::post_service(r));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let h = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (addr, h)
}

fn raw_request(id: &str, ts: i64, body: &[u8]) -> (Vec<u8>, usize) {
    let sig = sign_standard(SW_SECRET, id, ts, body).unwrap();
    let mut head = format!(
        "POST /wh HTTP/1.1\r\nhost: x\r\nwebhook-id: {id}\r\nwebhook-timestamp: {ts}\r\nwebhook-signature: {sig}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    let head_len = head.len();
    head.extend_from_slice(body);
    (head, head_len)
}

/// Sends `bytes[..cut]` and drops the connection (`cut == len` reads nothing back either when
/// `read` is false); returns the status read, if any.
async fn send_raw(addr: SocketAddr, bytes: &[u8], cut: usize, read: bool) -> Option<u16> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&bytes[..cut]).await.unwrap();
    if !read {
        return None;
    }
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("the server answered")
        .unwrap();
    let text = String::from_utf8_lossy(&buf);
    text.split(' ').nth(1).and_then(|c| c.parse().ok())
}

/// A sender drops its connection at seeded points (in the headers, in the body, after the body
/// before reading the answer). Nothing is queued from a cut request; everything acknowledged is
/// queued; after complete redeliveries every id is queued exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wire_sender_drops_at_seeded_points() {
    let now = real_now();
    let (queue, mut rx) = MemoryQueue::new(1_000);
    let r = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), queue);
    let (addr, server) = serve(r).await;
    let mut rng = Rng(6801);
    let mut acked = Vec::new();
    let mut cut_early = Vec::new();
    let n = 40;
    for i in 0..n {
        let id = format!("msg_w{i}");
        let body = vec![b'a' + (i % 26) as u8; 1 + rng.below(4000) as usize];
        let (bytes, head) = raw_request(&id, now, &body);
        match rng.below(4) {
            0 => {
                send_raw(addr, &bytes, rng.below(head as u64) as usize, false).await;
                cut_early.push(id);
            }
            1 => {
                let cut = head + rng.below(body.len() as u64) as usize;
                send_raw(addr, &bytes, cut, false).await;
                cut_early.push(id);
            }
            2 => {
                // Whole request, answer never read: may be queued, at most once.
                send_raw(addr, &bytes, bytes.len(), false).await;
            }
            _ => {
                let s = send_raw(addr, &bytes, bytes.len(), true).await;
                assert_eq!(s, Some(200));
                acked.push(id);
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let first: Vec<String> = drain(&mut rx).into_iter().map(|e| e.id).collect();
    for id in &acked {
        assert!(first.contains(id), "{id} acknowledged but not queued");
    }
    for id in &cut_early {
        assert!(!first.contains(id), "{id} queued from a cut request");
    }
    let mut uniq = first.clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!(uniq.len(), first.len(), "queued twice");
    for i in 0..n {
        let id = format!("msg_w{i}");
        let body = vec![b'a' + (i % 26) as u8; 10];
        let (bytes, _) = raw_request(&id, now, &body);
        assert_eq!(send_raw(addr, &bytes, bytes.len(), true).await, Some(200));
    }
    let second: Vec<String> = drain(&mut rx).into_iter().map(|e| e.id).collect();
    assert_eq!(first.len() + second.len(), n, "each id queued exactly once");
    server.abort();
}

/// Over the wire, a body declared (`content-length`) past the limit gets 413 at once, without
/// waiting for bytes that will never come; one declared within the limit but cut short is
/// never queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wire_declared_length_past_limit_is_413_at_once() {
    let now = real_now();
    let (queue, mut rx) = MemoryQueue::new(10);
    let r =
        WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), queue).with_body_limit(100);
    let (addr, server) = serve(r).await;
    for declared in [101usize, 1_000_000, 1 << 40] {
        let sig = sign_standard(SW_SECRET, "msg_cl", now, b"0123456789").unwrap();
        let head = format!(
            "POST /wh HTTP/1.1\r\nhost: x\r\nwebhook-id: msg_cl\r\nwebhook-timestamp: {now}\r\nwebhook-signature: {sig}\r\ncontent-length: {declared}\r\n\r\n0123456789"
        );
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(head.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
            .await
            .expect("answered without waiting for the declared body")
            .unwrap();
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(
            text.starts_with("HTTP/1.1 413"),
            "declared {declared}: {text}"
        );
    }
    assert!(drain(&mut rx).is_empty());
    server.abort();
}

// ---------------------------------------------------------------------------------------------
// Redis Streams
// ---------------------------------------------------------------------------------------------

fn redis_url() -> Option<String> {
    std::env::var("STURDY_REDIS_URL").ok()
}

fn redis_addr(url: &str) -> String {
    let rest = url.trim_start_matches("redis://");
    let rest = rest.rsplit('@').next().unwrap();
    rest.split('/').next().unwrap().to_string()
}

fn uniq(tag: &str) -> String {
    let n = sturdy::core::SystemClock
        .now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{{s68-{tag}-{}-{n}}}", std::process::id())
}

/// Deletes `keys` with a raw RESP `DEL` (the test's own keys only).
async fn redis_del(url: &str, keys: &[String]) {
    let Ok(mut s) = TcpStream::connect(redis_addr(url)).await else {
        return;
    };
    let mut cmd = format!("*{}\r\n$3\r\nDEL\r\n", keys.len() + 1);
    for k in keys {
        cmd.push_str(&format!("${}\r\n{k}\r\n", k.len()));
    }
    let _ = s.write_all(cmd.as_bytes()).await;
    let mut buf = [0u8; 64];
    let _ = tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await;
}

/// A TCP proxy in front of Redis that can hold every byte (a hung Redis) and let them go.
async fn stall_proxy(upstream: String) -> (SocketAddr, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stalled = Arc::new(AtomicBool::new(false));
    let st = stalled.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(&upstream).await else {
                continue;
            };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            for (mut r, mut w) in [(cr, sw), (sr, cw)] {
                let st = st.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    while let Ok(n) = r.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        while st.load(Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        if w.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        }
    });
    (addr, stalled)
}

/// Same id at once through the Redis queue: one entry; the consumer's failed handling is
/// delivered again with its count, dead-lettered after `with_max_deliveries`, listed with its
/// group, count and reason, replayed with a fresh count, and gone once acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_dedup_redelivery_dead_letter_replay() {
    let Some(url) = redis_url() else { return };
    use sturdy::redis::{RedisStreamConsumer, RedisStreamQueue};
    let stream = uniq("dl");
    let group = "g";
    let mut consumer =
        RedisStreamConsumer::connect(&url, &stream, group, "c1", Duration::from_millis(150))
            .await
            .unwrap()
            .with_max_deliveries(2)
            .with_wait(Duration::from_millis(100));
    let queue = RedisStreamQueue::connect(&url, &stream).await.unwrap();
    let (seen, f) = outcomes();
    let r =
        WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), queue.clone()).on_event(f);
    let now = real_now();
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let r = r.clone();
        tasks.push(tokio::spawn(async move {
            send(&r, sw_req("msg_redis", now, b"{\"a\":1}")).await.0
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    let accepted = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|x| x.0 == WebhookOutcome::Accepted)
        .count();
    assert_eq!(accepted, 1);

    let bounded = Duration::from_secs(3);
    let d1 = tokio::time::timeout(bounded, consumer.next())
        .await
        .unwrap()
        .unwrap()
        .expect("the event");
    assert_eq!(d1.event.id, "msg_redis");
    assert_eq!(d1.deliveries, 1);
    assert_eq!(&d1.event.body[..], b"{\"a\":1}");
    // Not acknowledged: delivered again after the claim delay (150 ms), counted.
    let start = Instant::now();
    let d2 = loop {
        if let Some(d) = tokio::time::timeout(bounded, consumer.next())
            .await
            .unwrap()
            .unwrap()
        {
            break d;
        }
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "never redelivered"
        );
    };
    assert_eq!(d2.entry, d1.entry);
    assert_eq!(d2.deliveries, 2);
    // The third time it goes to the dead letters instead.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..3 {
        let n = tokio::time::timeout(bounded, consumer.next())
            .await
            .unwrap()
            .unwrap();
        assert!(n.is_none(), "delivered a third time: {n:?}");
    }
    let dead = queue.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(queue.dead_letter_count().await.unwrap(), 1);
    assert_eq!(dead[0].event.id, "msg_redis");
    assert_eq!(dead[0].group, group);
    assert_eq!(dead[0].deliveries, 2);
    assert!(!dead[0].reason.is_empty());
    // Replayed: back with a fresh count; acknowledged: gone.
    assert!(queue.replay_dead_letter(&dead[0].entry).await.unwrap());
    assert!(!queue.replay_dead_letter(&dead[0].entry).await.unwrap());
    assert!(!queue.discard_dead_letter("0").await.unwrap());
    assert!(!queue.replay_dead_letter("not-an-id").await.unwrap());
    let d3 = tokio::time::timeout(bounded, consumer.next())
        .await
        .unwrap()
        .unwrap()
        .expect("the replayed event");
    assert_eq!(d3.event.id, "msg_redis");
    assert_eq!(d3.deliveries, 1);
    consumer.ack(&d3).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(tokio::time::timeout(bounded, consumer.next())
        .await
        .unwrap()
        .unwrap()
        .is_none());
    // The same delivery again is still a duplicate (the key outlives the handling).
    assert_eq!(
        send(&r, sw_req("msg_redis", now, b"{\"a\":1}")).await.0,
        StatusCode::OK
    );
    assert!(tokio::time::timeout(bounded, consumer.next())
        .await
        .unwrap()
        .unwrap()
        .is_none());
    // A handler's own dead letter, then discarded.
    assert_eq!(
        send(&r, sw_req("msg_redis2", now, b"{}")).await.0,
        StatusCode::OK
    );
    let d = tokio::time::timeout(bounded, consumer.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    consumer.dead_letter(&d, "unparseable s68").await.unwrap();
    let dead = queue.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, "unparseable s68");
    assert_eq!(dead[0].deliveries, 1);
    assert!(queue.discard_dead_letter(&dead[0].entry).await.unwrap());
    assert_eq!(queue.dead_letter_count().await.unwrap(), 0);
    let base = stream.clone();
    redis_del(&url, &[stream, format!("{base}:dead")]).await;
}

/// A full stream (`with_max_backlog(1)`): 503 with `Retry-After`, the id not remembered; once
/// the first is handled the redelivery is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_full_backlog_then_redelivery() {
    let Some(url) = redis_url() else { return };
    use sturdy::redis::{RedisStreamConsumer, RedisStreamQueue};
    let stream = uniq("full");
    let mut consumer =
        RedisStreamConsumer::connect(&url, &stream, "g", "c1", Duration::from_secs(30))
            .await
            .unwrap()
            .with_wait(Duration::from_millis(100));
    let queue = RedisStreamQueue::connect(&url, &stream)
        .await
        .unwrap()
        .with_max_backlog(1);
    let r = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), queue);
    let now = real_now();
    assert_eq!(send(&r, sw_req("msg_a", now, b"a")).await.0, StatusCode::OK);
    let resp = r.clone().oneshot(sw_req("msg_b", now, b"b")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(resp.headers().contains_key(http::header::RETRY_AFTER));
    let d = consumer.next().await.unwrap().unwrap();
    assert_eq!(d.event.id, "msg_a");
    consumer.ack(&d).await.unwrap();
    assert_eq!(send(&r, sw_req("msg_b", now, b"b")).await.0, StatusCode::OK);
    let d = consumer.next().await.unwrap().unwrap();
    assert_eq!(d.event.id, "msg_b");
    consumer.ack(&d).await.unwrap();
    redis_del(&url, &[stream.clone(), format!("{stream}:dead")]).await;
}

/// A hung Redis (a proxy holding every byte): the receiver answers 503 within about the
/// queue's timeout, never 200; once Redis answers again the redelivery gets 200, and the event
/// is in the stream exactly once ("Nothing acknowledged that was not stored").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_hung_is_503_in_time_then_once() {
    let Some(url) = redis_url() else { return };
    use sturdy::redis::{RedisStreamConsumer, RedisStreamQueue};
    let stream = uniq("hung");
    let mut consumer =
        RedisStreamConsumer::connect(&url, &stream, "g", "c1", Duration::from_secs(30))
            .await
            .unwrap()
            .with_wait(Duration::from_millis(100));
    let (proxy, stalled) = stall_proxy(redis_addr(&url)).await;
    let queue = RedisStreamQueue::connect(&format!("redis://{proxy}/"), &stream)
        .await
        .unwrap()
        .with_timeout(Duration::from_millis(200));
    let (seen, f) = outcomes();
    let r = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), queue).on_event(f);
    let now = real_now();
    stalled.store(true, Ordering::SeqCst);
    for i in 0..3 {
        let start = Instant::now();
        let (s, _) = send(&r, sw_req(&format!("msg_hung{i}"), now, b"{}")).await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            start.elapsed() < Duration::from_millis(1500),
            "answered after {:?}",
            start.elapsed()
        );
    }
    stalled.store(false, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(5);
    for i in 0..3 {
        loop {
            let (s, _) = send(&r, sw_req(&format!("msg_hung{i}"), now, b"{}")).await;
            if s == StatusCode::OK {
                break;
            }
            assert!(Instant::now() < deadline, "never recovered: {s}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let mut ids = Vec::new();
    while let Some(d) = consumer.next().await.unwrap() {
        consumer.ack(&d).await.unwrap();
        ids.push(d.event.id);
    }
    ids.sort();
    assert_eq!(
        ids,
        ["msg_hung0", "msg_hung1", "msg_hung2"],
        "each exactly once"
    );
    let seen = seen.lock().unwrap().clone();
    assert!(seen
        .iter()
        .all(|x| x.0 != WebhookOutcome::Accepted || x.1 == StatusCode::OK));
    redis_del(&url, &[stream.clone(), format!("{stream}:dead")]).await;
}

/// The dedup TTL at its extremes on Redis: zero (GitHub, whose TTL is its whole replay
/// protection, and Standard Webhooks, whose key is kept for its window whatever the TTL) and
/// `Duration::MAX` ("about 30 years in Redis"): every delivery is answered 200, never a 503
/// from an expiry Redis refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_dedup_ttl_extremes() {
    let Some(url) = redis_url() else { return };
    use sturdy::redis::{RedisStreamConsumer, RedisStreamQueue};
    let stream = uniq("ttl");
    let mut consumer =
        RedisStreamConsumer::connect(&url, &stream, "g", "c1", Duration::from_secs(30))
            .await
            .unwrap()
            .with_wait(Duration::from_millis(50));
    let queue = RedisStreamQueue::connect(&url, &stream).await.unwrap();
    let now = real_now();
    let mut results = Vec::new();
    for (k, ttl) in [Duration::ZERO, Duration::from_nanos(1), Duration::MAX]
        .into_iter()
        .enumerate()
    {
        let gh = WebhookReceiver::new(GitHub::new("gh-secret").unwrap(), queue.clone())
            .with_dedup_ttl(ttl)
            .with_route(format!("gh{k}"));
        let body = format!("{{\"k\":{k}}}");
        let req = Request::post("/wh")
            .header(
                "x-hub-signature-256",
                sign_github("gh-secret", body.as_bytes()),
            )
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        results.push((format!("github ttl {ttl:?}"), send(&gh, req).await.0));
        let sw = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), queue.clone())
            .with_dedup_ttl(ttl)
            .with_route(format!("sw{k}"));
        for copy in 0..2 {
            results.push((
                format!("standard ttl {ttl:?} copy {copy}"),
                send(&sw, sw_req("msg_ttl", now, b"{}")).await.0,
            ));
        }
    }
    let mut n = 0;
    while let Some(d) = consumer.next().await.unwrap() {
        consumer.ack(&d).await.unwrap();
        n += 1;
    }
    redis_del(&url, &[stream.clone(), format!("{stream}:dead")]).await;
    for (what, s) in &results {
        assert_eq!(*s, StatusCode::OK, "{what}: {results:?}");
    }
    assert_eq!(n, 6, "3 GitHub events and one per Standard Webhooks route");
}

/// `next()` cut by timeouts at seeded points loses nothing: every event is handled and
/// acknowledged exactly once, none dead-lettered (a limit of 10 leaves room for cut reads).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_consumer_cancelled_at_seeded_points_loses_nothing() {
    let Some(url) = redis_url() else { return };
    use sturdy::redis::{RedisStreamConsumer, RedisStreamQueue};
    let stream = uniq("cancel");
    let mut consumer =
        RedisStreamConsumer::connect(&url, &stream, "g", "c1", Duration::from_millis(100))
            .await
            .unwrap()
            .with_max_deliveries(10)
            .with_wait(Duration::from_millis(30));
    let queue = RedisStreamQueue::connect(&url, &stream).await.unwrap();
    let r = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), queue.clone());
    let now = real_now();
    for i in 0..8 {
        assert_eq!(
            send(&r, sw_req(&format!("msg_k{i}"), now, b"{}")).await.0,
            StatusCode::OK
        );
    }
    let mut rng = Rng(6868);
    let mut acked = Vec::new();
    let start = Instant::now();
    while acked.len() < 8 {
        assert!(
            start.elapsed() < Duration::from_secs(8),
            "lost: got {acked:?}"
        );
        let cut = Duration::from_micros(rng.below(3_000));
        match tokio::time::timeout(cut, consumer.next()).await {
            Err(_) => continue,
            Ok(res) => {
                if let Some(d) = res.unwrap() {
                    assert!(!acked.contains(&d.event.id), "{} handled twice", d.event.id);
                    consumer.ack(&d).await.unwrap();
                    acked.push(d.event.id);
                }
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(consumer.next().await.unwrap().is_none());
    assert_eq!(queue.dead_letter_count().await.unwrap(), 0);
    redis_del(&url, &[stream.clone(), format!("{stream}:dead")]).await;
}

/// "The streams `webhooks` and `{webhooks}` would so share their keys: while one of them
/// exists in a Redis, an event pushed to the other is refused (503 to the sender; the error
/// names both streams)".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_twin_streams_refused_not_duplicates() {
    let Some(url) = redis_url() else { return };
    use sturdy::redis::RedisStreamQueue;
    let n = sturdy::core::SystemClock
        .now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let plain = format!("s68twin-{}-{n}", std::process::id());
    let tagged = format!("{{{plain}}}");
    let qa = RedisStreamQueue::connect(&url, &plain).await.unwrap();
    let qb = RedisStreamQueue::connect(&url, &tagged).await.unwrap();
    let now = real_now();
    let ra = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), qa.clone());
    let rb = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), qb.clone());
    assert_eq!(
        send(&ra, sw_req("msg_t", now, b"{}")).await.0,
        StatusCode::OK
    );
    assert_eq!(
        send(&rb, sw_req("msg_t", now, b"{}")).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let e = qb
        .push(
            WebhookEvent::new("standard", "msg_u", Bytes::new()),
            Duration::from_secs(60),
        )
        .await
        .expect_err("refused");
    let text = e.to_string();
    assert!(text.contains(&plain) && text.contains(&tagged), "{text}");
    redis_del(&url, &[plain.clone(), tagged, format!("{{{plain}}}:dead")]).await;
}

/// `with_replication(1, ..)` on a Redis without replicas: every delivery is 503 (never
/// acknowledged unconfirmed), a redelivery of a stored but unconfirmed event too ("until then,
/// with fewer replicas connected, it gets 503 too"), each within about the wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_replication_without_replicas_never_acknowledges() {
    let Some(url) = redis_url() else { return };
    use sturdy::redis::{RedisStreamConsumer, RedisStreamQueue};
    let stream = uniq("repl");
    let mut consumer =
        RedisStreamConsumer::connect(&url, &stream, "g", "c1", Duration::from_secs(30))
            .await
            .unwrap()
            .with_wait(Duration::from_millis(50));
    let queue = RedisStreamQueue::connect(&url, &stream)
        .await
        .unwrap()
        .with_replication(1, Duration::from_millis(100));
    let r = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), queue);
    let now = real_now();
    for copy in 0..3 {
        let start = Instant::now();
        let resp = r
            .clone()
            .oneshot(sw_req("msg_repl", now, b"{}"))
            .await
            .unwrap();
        assert_eq!(
            resp.status(),
            StatusCode::SERVICE_UNAVAILABLE,
            "copy {copy}"
        );
        assert!(resp.headers().contains_key(http::header::RETRY_AFTER));
        assert!(start.elapsed() < Duration::from_millis(1500));
    }
    let mut n = 0;
    while let Some(d) = consumer.next().await.unwrap() {
        consumer.ack(&d).await.unwrap();
        consumer.ack(&d).await.unwrap();
        n += 1;
    }
    assert!(n <= 1, "stored {n} times");
    redis_del(&url, &[stream.clone(), format!("{stream}:dead")]).await;
}

/// Names refused when the queue or a consumer is made: empty names, a name that is another
/// stream's dead-letter stream or dedup key.
#[tokio::test]
async fn redis_names_refused() {
    let Some(url) = redis_url() else { return };
    use sturdy::redis::{RedisStreamConsumer, RedisStreamQueue};
    let d = Duration::from_secs(1);
    assert!(RedisStreamQueue::connect(&url, "").await.is_err());
    assert!(RedisStreamQueue::connect(&url, "{s68x}:dead")
        .await
        .is_err());
    assert!(RedisStreamQueue::connect(&url, "{s68x}:seen:abc")
        .await
        .is_err());
    assert!(RedisStreamQueue::connect(&url, "s68}x").await.is_err());
    assert!(RedisStreamConsumer::connect(&url, "{s68x}", "", "c", d)
        .await
        .is_err());
    assert!(RedisStreamConsumer::connect(&url, "{s68x}", "g", "", d)
        .await
        .is_err());
    assert!(
        RedisStreamConsumer::connect(&url, "{s68x}:dead", "g", "c", d)
            .await
            .is_err()
    );
}

/// A Redis URL's password never shows in an error or in `Debug`.
#[tokio::test]
async fn redis_password_never_shown() {
    let Some(url) = redis_url() else { return };
    use sturdy::redis::RedisStreamQueue;
    let addr = redis_addr(&url);
    let with_pw = format!("redis://:hunter2pw@{addr}/");
    match RedisStreamQueue::connect(&with_pw, uniq("pw")).await {
        Ok(q) => {
            let d = format!("{q:?}");
            assert!(!d.contains("hunter2pw"), "Debug shows the password: {d}");
        }
        Err(e) => {
            let mut text = format!("{e} {e:?}");
            let mut src = e.source();
            while let Some(s) = src {
                text.push_str(&format!(" {s} {s:?}"));
                src = s.source();
            }
            assert!(
                !text.contains("hunter2pw"),
                "the error shows the password: {text}"
            );
        }
    }
}
