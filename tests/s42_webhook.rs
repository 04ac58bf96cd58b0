//! Round s42, outside tests of `sturdy::webhook` against docs/guides/webhooks.md and the
//! rustdoc of `sturdy_webhook`: the public vectors of /work/shared/vectors/STANDARDS.md (SW-1,
//! SW-neg, SW-multi, SW-time, GH-1, Stripe header negatives) through the receiver, timestamps
//! at the i64 extremes, two header lines where one is expected (the checked timestamp and id
//! must be the signed ones), empty bodies, the body limit, the cost of huge and many signature
//! headers (time ratios, checked loosely), secrets kept out of `Debug` and answers, and a
//! delivery cut mid-flight (not queued, the redelivery queued once).
#![cfg(feature = "full")]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::cost_common::fastest;
use axum::body::Body;
use bytes::Bytes;
use http::header::HeaderName;
use http::{HeaderMap, HeaderValue, Request, StatusCode};
use http_body_util::BodyExt;
use sturdy::core::WallClock;
use sturdy::webhook::{
    sign_github, sign_standard, sign_stripe, GenericHmac, GitHub, MemoryQueue, MemoryReceiver,
    StandardWebhooks, Stripe, Verifier, WebhookReceiver, MAX_ID_LEN,
};
use tokio::time::Instant;
use tower::ServiceExt;

const SW1_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const SW1_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
const SW1_TS: i64 = 1_614_265_330;
const SW1_BODY: &str = r#"{"test": 2432232314}"#;
const SW1_SIG: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

const GH_SECRET: &str = "It's a Secret to Everybody";
const STRIPE_SECRET: &str = "whsec_s42_stripe_secret_value";

#[derive(Debug)]
struct Clock(SystemTime);
impl WallClock for Clock {
    fn now(&self) -> SystemTime {
        self.0
    }
}

fn time_of(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

fn clock(secs: i64) -> Arc<Clock> {
    Arc::new(Clock(time_of(secs)))
}

fn standard_receiver(now: i64) -> (WebhookReceiver<MemoryQueue>, MemoryReceiver) {
    let (q, events) = MemoryQueue::new(64);
    let rx =
        WebhookReceiver::new(StandardWebhooks::new(SW1_SECRET).unwrap(), q).with_clock(clock(now));
    (rx, events)
}

/// Sends one delivery; answers the status and the body text.
async fn deliver<Q: sturdy::webhook::EventQueue>(
    rx: &WebhookReceiver<Q>,
    headers: &[(&str, &str)],
    body: impl Into<Body>,
) -> (StatusCode, String) {
    let mut b = Request::post("/hook");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let res = rx
        .clone()
        .oneshot(b.body(body.into()).unwrap())
        .await
        .unwrap();
    let status = res.status();
    let text = res.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&text).into_owned())
}

fn drain(events: &mut MemoryReceiver) -> usize {
    let mut n = 0;
    while events.try_recv().is_some() {
        n += 1;
    }
    n
}

/// SW-1: the shared reference vector is accepted, and the event carries what the guide's table
/// says (id, timestamp, the two headers, the raw body).
#[tokio::test]
async fn s42_sw1_vector_is_accepted_and_carried() {
    let (rx, mut events) = standard_receiver(SW1_TS);
    let ts = SW1_TS.to_string();
    let (status, _) = deliver(
        &rx,
        &[
            ("webhook-id", SW1_ID),
            ("webhook-timestamp", &ts),
            ("webhook-signature", SW1_SIG),
        ],
        SW1_BODY,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let e = events.try_recv().expect("queued");
    assert_eq!(e.scheme, "standard");
    assert_eq!(e.route, "standard");
    assert_eq!(e.id, SW1_ID);
    assert_eq!(e.timestamp, Some(SW1_TS));
    assert_eq!(e.headers["webhook-id"], SW1_ID);
    assert_eq!(e.headers["webhook-timestamp"], ts.as_str());
    assert_eq!(&e.body[..], SW1_BODY.as_bytes());
    // sign_standard reproduces the vector.
    assert_eq!(
        sign_standard(SW1_SECRET, SW1_ID, SW1_TS, SW1_BODY.as_bytes()).unwrap(),
        SW1_SIG
    );
}

/// SW-neg and the Rust multi-signature negative: each is refused (400 or 401, never 200), with a
/// short generic text, and nothing is queued.
#[tokio::test]
async fn s42_sw_negatives_are_refused_without_queueing() {
    let (rx, mut events) = standard_receiver(SW1_TS);
    let ts = SW1_TS.to_string();
    let negatives = [
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OA=",
        "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=",
        "v1,dawfeoifkpqwoekfpqoekf",
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLawdd",
        "v1,",
        "v1,g0hM9",
        "v1,tFtCZ5RDCPxzWQRWXWPgrCgE2frDBe9gjpbWQxnVfsQ= v1,Mm7xgUVICxZfQ3bgf0h0Dof65L/IFx+PnZvnDWPCX6Q= v1,9DfC1c3eeOrXB6w/5dIDydLNQaEyww5KalE5jLBZucE=",
        "v2,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
        "v1a,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
        "g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
        "v1,!!!!",
        "v1,====",
    ];
    for sig in negatives {
        let (status, text) = deliver(
            &rx,
            &[
                ("webhook-id", SW1_ID),
                ("webhook-timestamp", &ts),
                ("webhook-signature", sig),
            ],
            SW1_BODY,
        )
        .await;
        assert!(
            status == StatusCode::UNAUTHORIZED || status == StatusCode::BAD_REQUEST,
            "{sig:?}: {status}"
        );
        assert!(
            text.len() < 64,
            "{sig:?}: a short generic text, got {text:?}"
        );
        assert!(!text.contains("MfKQ9r8"), "{sig:?}: {text:?}");
    }
    assert_eq!(drain(&mut events), 0);
}

/// "401 ... for a Standard Webhooks header without a decodable `v1` entry": a header of
/// well-formed entries that are all undecodable or of another version gets 401, not 400.
#[tokio::test]
async fn s42_sw_header_without_decodable_v1_is_401() {
    let (rx, _events) = standard_receiver(SW1_TS);
    let ts = SW1_TS.to_string();
    for sig in [
        "v1,dawfeoifkpqwoekfpqoekf",
        "v2,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
    ] {
        let (status, _) = deliver(
            &rx,
            &[
                ("webhook-id", SW1_ID),
                ("webhook-timestamp", &ts),
                ("webhook-signature", sig),
            ],
            SW1_BODY,
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{sig:?}");
    }
}

/// SW-multi: decoys around the right entry (one of them `v2`) pass.
#[tokio::test]
async fn s42_sw_multi_signature_header_is_accepted() {
    let (rx, mut events) = standard_receiver(SW1_TS);
    let ts = SW1_TS.to_string();
    let sig = "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= v2,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE= v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=";
    let (status, _) = deliver(
        &rx,
        &[
            ("webhook-id", SW1_ID),
            ("webhook-timestamp", &ts),
            ("webhook-signature", sig),
        ],
        SW1_BODY,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(drain(&mut events), 1);
}

/// SW-time: 300 s both ways pass, 301 s both ways get 401, a non-number gets 400, and each
/// missing header gets 400.
#[tokio::test]
async fn s42_sw_time_tolerance_and_missing_headers() {
    let body = SW1_BODY.as_bytes();
    for (offset, want) in [
        (0, StatusCode::OK),
        (-300, StatusCode::OK),
        (300, StatusCode::OK),
        (-301, StatusCode::UNAUTHORIZED),
        (301, StatusCode::UNAUTHORIZED),
    ] {
        let (rx, _events) = standard_receiver(SW1_TS);
        let ts = SW1_TS + offset;
        let sig = sign_standard(SW1_SECRET, SW1_ID, ts, body).unwrap();
        let t = ts.to_string();
        let (status, _) = deliver(
            &rx,
            &[
                ("webhook-id", SW1_ID),
                ("webhook-timestamp", &t),
                ("webhook-signature", &sig),
            ],
            SW1_BODY,
        )
        .await;
        assert_eq!(status, want, "offset {offset}");
    }
    let (rx, mut events) = standard_receiver(SW1_TS);
    let ts = SW1_TS.to_string();
    let all = [
        ("webhook-id", SW1_ID),
        ("webhook-timestamp", ts.as_str()),
        ("webhook-signature", SW1_SIG),
    ];
    for skip in 0..3 {
        let some: Vec<_> = all
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != skip)
            .map(|(_, h)| *h)
            .collect();
        let (status, _) = deliver(&rx, &some, SW1_BODY).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "without {}", all[skip].0);
    }
    for bad in ["hello", "1614265330.5", "", " ", "+1614265330", "0x10"] {
        let (status, _) = deliver(
            &rx,
            &[
                ("webhook-id", SW1_ID),
                ("webhook-timestamp", bad),
                ("webhook-signature", SW1_SIG),
            ],
            SW1_BODY,
        )
        .await;
        assert!(
            status == StatusCode::BAD_REQUEST || status == StatusCode::UNAUTHORIZED,
            "timestamp {bad:?}: {status}"
        );
    }
    assert_eq!(drain(&mut events), 0);
}

/// A body whose every poll is recorded: the guide says a delivery without well-formed, fresh
/// signature headers costs no body read.
fn watched_body(polled: Arc<AtomicBool>) -> Body {
    let stream = futures_util::stream::poll_fn(move |_| {
        polled.store(true, Ordering::SeqCst);
        std::task::Poll::Ready(Some(Ok::<_, std::io::Error>(Bytes::from_static(b"x"))))
    });
    Body::from_stream(stream)
}

/// Timestamps at the i64 extremes and beyond: refused before the body is touched, never a
/// panic; every scheme with a timestamp.
#[tokio::test]
async fn s42_extreme_timestamps_are_refused_before_the_body() {
    let now = 1_700_000_000;
    let extremes = [
        i64::MAX.to_string(),
        i64::MIN.to_string(),
        (i64::MAX as i128 + 1).to_string(),
        (i64::MIN as i128 - 1).to_string(),
        "99999999999999999999999999999".to_string(),
        "-1".to_string(),
        "0".to_string(),
        (now - 86_400 * 365 * 100).to_string(),
        (now + 86_400 * 365 * 100).to_string(),
    ];
    for t in &extremes {
        // Standard Webhooks.
        let (rx, mut events) = standard_receiver(now);
        let polled = Arc::new(AtomicBool::new(false));
        let (status, _) = deliver(
            &rx,
            &[
                ("webhook-id", "msg_1"),
                ("webhook-timestamp", t),
                ("webhook-signature", SW1_SIG),
            ],
            watched_body(polled.clone()),
        )
        .await;
        assert!(
            status == StatusCode::BAD_REQUEST || status == StatusCode::UNAUTHORIZED,
            "standard {t}: {status}"
        );
        assert!(!polled.load(Ordering::SeqCst), "standard {t}: body read");
        assert_eq!(drain(&mut events), 0);

        // Stripe.
        let (q, mut events) = MemoryQueue::new(8);
        let rx =
            WebhookReceiver::new(Stripe::new(STRIPE_SECRET).unwrap(), q).with_clock(clock(now));
        let polled = Arc::new(AtomicBool::new(false));
        let header = format!("t={t},v1={}", "ab".repeat(32));
        let (status, _) = deliver(
            &rx,
            &[("stripe-signature", &header)],
            watched_body(polled.clone()),
        )
        .await;
        assert!(
            status == StatusCode::BAD_REQUEST || status == StatusCode::UNAUTHORIZED,
            "stripe {t}: {status}"
        );
        assert!(!polled.load(Ordering::SeqCst), "stripe {t}: body read");
        assert_eq!(drain(&mut events), 0);

        // A generic scheme with a timestamp header.
        let (q, mut events) = MemoryQueue::new(8);
        let v = GenericHmac::new("acme", HeaderName::from_static("x-acme-sig"), "k")
            .unwrap()
            .with_timestamp_header(HeaderName::from_static("x-acme-ts"));
        let rx = WebhookReceiver::new(v, q).with_clock(clock(now));
        let polled = Arc::new(AtomicBool::new(false));
        let hex = "ab".repeat(32);
        let (status, _) = deliver(
            &rx,
            &[("x-acme-sig", &hex), ("x-acme-ts", t)],
            watched_body(polled.clone()),
        )
        .await;
        assert!(
            status == StatusCode::BAD_REQUEST || status == StatusCode::UNAUTHORIZED,
            "generic {t}: {status}"
        );
        assert!(!polled.load(Ordering::SeqCst), "generic {t}: body read");
        assert_eq!(drain(&mut events), 0);
    }
}

/// A delivery signed at a timestamp far out (up to i64::MAX seconds) verified by
/// a clock at that very time: fresh, so accepted; working out how long to remember its id
/// (timestamp + tolerance + 1 s) must not overflow into a panic.
#[tokio::test]
async fn s42_signed_timestamps_at_the_clock_extremes_do_not_panic() {
    for ts in [i64::MAX, i64::MAX - 300, 4_102_444_800_000] {
        let (q, mut events) = MemoryQueue::new(8);
        let rx = WebhookReceiver::new(StandardWebhooks::new(SW1_SECRET).unwrap(), q)
            .with_clock(Arc::new(Clock(time_of(ts))));
        let sig = sign_standard(SW1_SECRET, "msg_x", ts, b"{}").unwrap();
        let t = ts.to_string();
        let headers = [
            ("webhook-id", "msg_x"),
            ("webhook-timestamp", t.as_str()),
            ("webhook-signature", sig.as_str()),
        ];
        let (status, _) = deliver(&rx, &headers, "{}").await;
        assert_eq!(status, StatusCode::OK, "ts {ts}");
        let (again, _) = deliver(&rx, &headers, "{}").await;
        assert_eq!(again, StatusCode::OK, "ts {ts}: the copy is a duplicate");
        assert_eq!(drain(&mut events), 1, "ts {ts}: queued once");
    }
}

/// With the age check off (`with_tolerance(Duration::MAX)`), a delivery at any age passes, the
/// oldest an i64 can write included, and its copy is still a duplicate.
#[tokio::test]
async fn s42_tolerance_max_accepts_any_age_and_still_dedups() {
    for ts in [i64::MIN, 0, i64::MAX] {
        let (q, mut events) = MemoryQueue::new(8);
        let rx = WebhookReceiver::new(
            StandardWebhooks::new(SW1_SECRET)
                .unwrap()
                .with_tolerance(Duration::MAX),
            q,
        )
        .with_clock(clock(1_700_000_000));
        let sig = sign_standard(SW1_SECRET, "msg_y", ts, b"[]").unwrap();
        let t = ts.to_string();
        let headers = [
            ("webhook-id", "msg_y"),
            ("webhook-timestamp", t.as_str()),
            ("webhook-signature", sig.as_str()),
        ];
        assert_eq!(deliver(&rx, &headers, "[]").await.0, StatusCode::OK, "{ts}");
        assert_eq!(deliver(&rx, &headers, "[]").await.0, StatusCode::OK, "{ts}");
        assert_eq!(drain(&mut events), 1, "ts {ts}");
    }
}

/// Two `webhook-timestamp` lines: whatever the receiver does with them, the freshness it checks
/// must be that of the timestamp the signature covers. A captured delivery signed an hour ago,
/// resent with a fresh timestamp line added (before or after), must not be accepted.
#[tokio::test]
async fn s42_a_second_timestamp_line_cannot_refresh_a_stale_delivery() {
    let now = 1_700_000_000;
    let old = now - 3_600;
    let sig = sign_standard(SW1_SECRET, "msg_old", old, b"{}").unwrap();
    let (old_t, now_t) = (old.to_string(), now.to_string());
    for order in [[&old_t, &now_t], [&now_t, &old_t]] {
        let (rx, mut events) = standard_receiver(now);
        let mut req = Request::post("/hook");
        req = req
            .header("webhook-id", "msg_old")
            .header("webhook-signature", sig.as_str());
        for t in order {
            req = req.header("webhook-timestamp", t.as_str());
        }
        let res = rx
            .oneshot(req.body(Body::from("{}")).unwrap())
            .await
            .unwrap();
        assert_ne!(res.status(), StatusCode::OK, "{order:?}");
        assert_eq!(drain(&mut events), 0, "{order:?}");
    }
}

/// Two `webhook-id` lines: if accepted at all, the event is deduplicated on the id the
/// signature covers, so a copy with another second id line is still a duplicate.
#[tokio::test]
async fn s42_a_second_id_line_does_not_change_the_dedup_id() {
    let now = 1_700_000_000;
    let sig = sign_standard(SW1_SECRET, "msg_a", now, b"{}").unwrap();
    let t = now.to_string();
    let (rx, mut events) = standard_receiver(now);
    let mut accepted = 0;
    for second in ["msg_b", "msg_c", "msg_d"] {
        let req = Request::post("/hook")
            .header("webhook-id", "msg_a")
            .header("webhook-id", second)
            .header("webhook-timestamp", t.as_str())
            .header("webhook-signature", sig.as_str())
            .body(Body::from("{}"))
            .unwrap();
        let res = rx.clone().oneshot(req).await.unwrap();
        if res.status() == StatusCode::OK {
            accepted += 1;
        }
    }
    let mut ids = Vec::new();
    while let Some(e) = events.try_recv() {
        ids.push(e.id);
    }
    assert!(ids.len() <= 1, "one signed delivery queued {ids:?}");
    if accepted > 0 {
        assert_eq!(ids, ["msg_a"]);
    }
}

/// Two `Stripe-Signature` lines mixing a fresh `t` with an old signed one: never accepted.
#[tokio::test]
async fn s42_stripe_second_signature_line_cannot_refresh_a_stale_delivery() {
    let now = 1_700_000_000;
    let old = now - 3_600;
    let body = br#"{"id":"evt_s42"}"#;
    let signed_old = sign_stripe(STRIPE_SECRET, old, body);
    let fresh_t = format!("t={now}");
    for order in [[&signed_old, &fresh_t], [&fresh_t, &signed_old]] {
        let (q, mut events) = MemoryQueue::new(8);
        let rx =
            WebhookReceiver::new(Stripe::new(STRIPE_SECRET).unwrap(), q).with_clock(clock(now));
        let mut req = Request::post("/hook");
        for v in order {
            req = req.header("stripe-signature", v.as_str());
        }
        let res = rx
            .oneshot(req.body(Body::from(&body[..])).unwrap())
            .await
            .unwrap();
        assert_ne!(res.status(), StatusCode::OK, "{order:?}");
        assert_eq!(drain(&mut events), 0);
    }
}

/// The Stripe header negatives of STANDARDS.md §2.3 are refused, a valid header with an extra
/// undecodable `v1` passes, a header with only `v0` is refused.
#[tokio::test]
async fn s42_stripe_header_vectors() {
    let now = 1_700_000_000;
    let body = br#"{"id":"evt_vec"}"#;
    let (q, mut events) = MemoryQueue::new(8);
    let rx = WebhookReceiver::new(Stripe::new(STRIPE_SECRET).unwrap(), q).with_clock(clock(now));
    let good = sign_stripe(STRIPE_SECRET, now, body);
    let hex = good.split("v1=").nth(1).unwrap().to_owned();
    let bad = [
        "t=,v1=2220f87ef101a04665f11cdf770523143f875572008577fa0f20882ddb9cc3c7,v0=63f3a72374a733066c4be69ed7f8e5ac85c22c9f0a6a612ab9a025a9e4ee7eef".to_owned(),
        "t,v1=,v0=".to_owned(),
        "t,v1=,v0".to_owned(),
        "t,v1=,".to_owned(),
        "t,,".to_owned(),
        ",,".to_owned(),
        "t".to_owned(),
        "".to_owned(),
        "v1,t=1".to_owned(),
        "t=".to_owned(),
        "bad_header".to_owned(),
        format!("t={now},v0={hex}"),
        format!("t={now}"),
        format!("v1={hex}"),
    ];
    for h in &bad {
        let (status, _) = deliver(&rx, &[("stripe-signature", h)], &body[..]).await;
        assert!(
            status == StatusCode::BAD_REQUEST || status == StatusCode::UNAUTHORIZED,
            "{h:?}: {status}"
        );
    }
    assert_eq!(drain(&mut events), 0);
    let extra = format!("{good},v1=bad_signature");
    let (status, _) = deliver(&rx, &[("stripe-signature", &extra)], &body[..]).await;
    assert_eq!(status, StatusCode::OK);
    let e = events.try_recv().unwrap();
    assert_eq!(e.id, "evt_vec");
    assert_eq!(e.timestamp, Some(now));
}

/// GH-1 through the receiver, and empty bodies: GitHub signs an empty body and dedups it on its
/// digest; Stripe's empty body (no `id`) is deduplicated on a digest of `t.body`.
#[tokio::test]
async fn s42_github_vector_and_empty_bodies() {
    assert_eq!(
        sign_github(GH_SECRET, b"Hello, World!"),
        "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    );
    let (q, mut events) = MemoryQueue::new(8);
    let rx = WebhookReceiver::new(GitHub::new(GH_SECRET).unwrap(), q);
    let sig = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
    let (status, _) = deliver(
        &rx,
        &[("x-hub-signature-256", sig), ("x-github-delivery", "1")],
        "Hello, World!",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    // The same body under a new delivery id is a duplicate.
    let (status, _) = deliver(
        &rx,
        &[("x-hub-signature-256", sig), ("x-github-delivery", "2")],
        "Hello, World!",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(drain(&mut events), 1);

    let empty = sign_github(GH_SECRET, b"");
    for _ in 0..2 {
        let (status, _) = deliver(&rx, &[("x-hub-signature-256", &empty)], Body::empty()).await;
        assert_eq!(status, StatusCode::OK);
    }
    let e = events.try_recv().expect("the empty body is queued");
    assert!(e.body.is_empty());
    assert!(e.id.starts_with("sha256:"));
    assert!(
        events.try_recv().is_none(),
        "the empty-body copy is a duplicate"
    );

    let now = 1_700_000_000;
    let (q, mut events) = MemoryQueue::new(8);
    let rx = WebhookReceiver::new(Stripe::new(STRIPE_SECRET).unwrap(), q).with_clock(clock(now));
    let h = sign_stripe(STRIPE_SECRET, now, b"");
    for _ in 0..2 {
        let (status, _) = deliver(&rx, &[("stripe-signature", &h)], Body::empty()).await;
        assert_eq!(status, StatusCode::OK);
    }
    let e = events.try_recv().unwrap();
    assert!(e.id.starts_with("sha256:"), "{}", e.id);
    assert!(events.try_recv().is_none());
}

/// The body limit: a body of exactly the limit passes, one byte more gets 413 `payload too
/// large` and is not queued, with or without a `Content-Length`, and the default is 1 MiB.
#[tokio::test]
async fn s42_body_limit_edges() {
    let (q, mut events) = MemoryQueue::new(8);
    let rx = WebhookReceiver::new(GitHub::new(GH_SECRET).unwrap(), q).with_body_limit(1024);
    let at = vec![b'a'; 1024];
    let over = vec![b'b'; 1025];
    let (status, _) = deliver(
        &rx,
        &[("x-hub-signature-256", &sign_github(GH_SECRET, &at))],
        at.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, text) = deliver(
        &rx,
        &[("x-hub-signature-256", &sign_github(GH_SECRET, &over))],
        over.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(text, "payload too large");
    // Streamed in chunks, no length known up front.
    let chunks: Vec<Result<Bytes, std::io::Error>> = over
        .chunks(100)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    let (status, _) = deliver(
        &rx,
        &[("x-hub-signature-256", &sign_github(GH_SECRET, &over))],
        Body::from_stream(futures_util::stream::iter(chunks)),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(drain(&mut events), 1);

    // Default 1 MiB.
    let (q, mut events) = MemoryQueue::new(8);
    let rx = WebhookReceiver::new(GitHub::new(GH_SECRET).unwrap(), q);
    let mib = vec![b'c'; 1 << 20];
    let (status, _) = deliver(
        &rx,
        &[("x-hub-signature-256", &sign_github(GH_SECRET, &mib))],
        mib.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let more = vec![b'd'; (1 << 20) + 1];
    let (status, _) = deliver(
        &rx,
        &[("x-hub-signature-256", &sign_github(GH_SECRET, &more))],
        more,
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(drain(&mut events), 1);
}

/// `webhook-id` bounds: 256 visible ASCII bytes pass, 257 bytes, a `.`, a space or a non-ASCII
/// byte get 400.
#[tokio::test]
async fn s42_webhook_id_bounds() {
    let now = 1_700_000_000;
    let t = now.to_string();
    let ok = "i".repeat(MAX_ID_LEN);
    let long = "i".repeat(MAX_ID_LEN + 1);
    for (id, want) in [
        (ok.as_str(), StatusCode::OK),
        (long.as_str(), StatusCode::BAD_REQUEST),
        ("msg.1", StatusCode::BAD_REQUEST),
    ] {
        let (rx, _events) = standard_receiver(now);
        let sig = sign_standard(SW1_SECRET, id, now, b"{}").unwrap();
        let (status, _) = deliver(
            &rx,
            &[
                ("webhook-id", id),
                ("webhook-timestamp", &t),
                ("webhook-signature", &sig),
            ],
            "{}",
        )
        .await;
        assert_eq!(
            status,
            want,
            "id of {} bytes {:?}",
            id.len(),
            &id[..id.len().min(8)]
        );
    }
    // A non-ASCII id (bytes the header accepts, `to_str` refuses).
    let (rx, mut events) = standard_receiver(now);
    let req = Request::post("/hook")
        .header(
            "webhook-id",
            HeaderValue::from_bytes("msg_caf\u{e9}".as_bytes()).unwrap(),
        )
        .header("webhook-timestamp", t.as_str())
        .header("webhook-signature", SW1_SIG)
        .body(Body::from("{}"))
        .unwrap();
    let res = rx.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    assert_eq!(drain(&mut events), 0);
}

/// Empty secrets are refused by every constructor; no `Debug` shows a secret (verifiers,
/// receivers, the queue).
#[test]
fn s42_empty_secrets_refused_and_debug_hides_secrets() {
    let h = || HeaderName::from_static("x-sig");
    assert!(StandardWebhooks::new("").is_err());
    assert!(StandardWebhooks::new("whsec_").is_err());
    assert!(Stripe::new("").is_err());
    assert!(GitHub::new("").is_err());
    assert!(GenericHmac::new("g", h(), "").is_err());
    assert!(Stripe::with_secrets(["good", ""]).is_err());
    assert!(GitHub::with_secrets(Vec::<&str>::new()).is_err());
    assert!(StandardWebhooks::with_secrets([SW1_SECRET, ""]).is_err());
    assert!(GenericHmac::new("", h(), "k").is_err());

    let stripe = Stripe::with_secrets(["sk_s42_TOPSECRET_one", "sk_s42_TOPSECRET_two"]).unwrap();
    let gh = GitHub::new("gh_s42_TOPSECRET").unwrap();
    let gen = GenericHmac::new("g", h(), "gen_s42_TOPSECRET").unwrap();
    let sw = StandardWebhooks::new(SW1_SECRET).unwrap();
    for text in [
        format!("{stripe:?}"),
        format!("{gh:?}"),
        format!("{gen:?}"),
        format!("{sw:?}"),
        format!("{:?}", WebhookReceiver::new(gh, MemoryQueue::new(1).0)),
        format!("{:#?}", WebhookReceiver::new(stripe, MemoryQueue::new(1).0)),
    ] {
        assert!(!text.contains("TOPSECRET"), "{text}");
        assert!(!text.contains("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"), "{text}");
    }
}

/// The receiver, the verifiers and the queue may be shared by many tasks.
#[test]
fn s42_webhook_types_are_send_and_sync() {
    fn both<T: Send + Sync>() {}
    both::<WebhookReceiver<MemoryQueue>>();
    both::<MemoryQueue>();
    both::<StandardWebhooks>();
    both::<Stripe>();
    both::<GitHub>();
    both::<GenericHmac>();
    both::<sturdy::webhook::WebhookEvent>();
    fn send<T: Send>() {}
    send::<sturdy::webhook::ResponseFuture>();
    send::<MemoryReceiver>();
}

/// "A delivery costs one MAC per configured secret ... however many signature entries its
/// header lists": with a 512 KiB body and three secrets, 4,000 wrong entries (one header of
/// about 200 KB) cost about what one entry costs. Checked loosely: under 3x.
#[test]
fn s42_many_signature_entries_do_not_multiply_the_hashing() {
    let now = 1_700_000_000;
    let body = vec![b'z'; 512 * 1024];
    let wrong = "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=";
    let sw = StandardWebhooks::with_secrets([
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "whsec_c2VjcmV0LXR3by1zNDItdGVzdC12YWx1ZQ==",
        "whsec_c2VjcmV0LXRocmVlLXM0Mi12YWx1ZXM=",
    ])
    .unwrap();
    let headers = |entries: usize| {
        let mut h = HeaderMap::new();
        h.insert("webhook-id", HeaderValue::from_static("msg_cost"));
        h.insert("webhook-timestamp", HeaderValue::from(now));
        let v = vec![wrong; entries].join(" ");
        h.insert("webhook-signature", HeaderValue::from_str(&v).unwrap());
        h
    };
    let (one, many) = (headers(1), headers(4_000));
    let at = time_of(now);
    let t1 = fastest(7, || assert!(sw.verify(&one, &body, at).is_err()));
    let tn = fastest(7, || assert!(sw.verify(&many, &body, at).is_err()));
    assert!(
        tn < t1 * 3,
        "4,000 entries took {tn:?}, one entry {t1:?}: more than three times"
    );

    let stripe = Stripe::with_secrets(["a_s42", "b_s42", "c_s42"]).unwrap();
    let wrong_hex = format!("v1={}", "ab".repeat(32));
    let sheaders = |entries: usize| {
        let mut h = HeaderMap::new();
        let v = format!("t={now},{}", vec![wrong_hex.as_str(); entries].join(","));
        h.insert("stripe-signature", HeaderValue::from_str(&v).unwrap());
        h
    };
    let (one, many) = (sheaders(1), sheaders(4_000));
    let t1 = fastest(7, || assert!(stripe.verify(&one, &body, at).is_err()));
    let tn = fastest(7, || assert!(stripe.verify(&many, &body, at).is_err()));
    assert!(
        tn < t1 * 3,
        "stripe: 4,000 entries took {tn:?}, one entry {t1:?}"
    );
}

/// The scan of a huge header stays linear: with an empty body, a header 10 times longer costs
/// well under 40 times as much (quadratic would be 100). Also as many header lines.
#[test]
fn s42_header_scan_is_linear_in_its_size() {
    let now = 1_700_000_000;
    let at = time_of(now);
    let sw = StandardWebhooks::new(SW1_SECRET).unwrap();
    let wrong = "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=";
    let one_line = |entries: usize| {
        let mut h = HeaderMap::new();
        h.insert("webhook-id", HeaderValue::from_static("msg_lin"));
        h.insert("webhook-timestamp", HeaderValue::from(now));
        let v = vec![wrong; entries].join(" ");
        h.insert("webhook-signature", HeaderValue::from_str(&v).unwrap());
        h
    };
    let many_lines = |lines: usize| {
        let mut h = HeaderMap::new();
        h.insert("webhook-id", HeaderValue::from_static("msg_lin"));
        h.insert("webhook-timestamp", HeaderValue::from(now));
        for _ in 0..lines {
            h.append("webhook-signature", HeaderValue::from_static(wrong));
        }
        h
    };
    for (name, small, big) in [
        ("one line", one_line(1_500), one_line(15_000)),
        ("many lines", many_lines(1_500), many_lines(15_000)),
    ] {
        let ts = fastest(9, || {
            let _ = sw.check_headers(&small, at);
            let _ = sw.verify(&small, b"", at);
        });
        let tb = fastest(9, || {
            let _ = sw.check_headers(&big, at);
            let _ = sw.verify(&big, b"", at);
        });
        assert!(
            tb < ts * 40 + Duration::from_millis(2),
            "{name}: 15,000 entries {tb:?} against 1,500 entries {ts:?}"
        );
    }
}

/// A delivery cut mid-flight (its body trickles, a timeout above the receiver drops it): nothing
/// queued, the dedup id not remembered, so the sender's redelivery is queued, once.
#[tokio::test(start_paused = true)]
async fn s42_delivery_cut_mid_body_is_redelivered_once() {
    let (q, mut events) = MemoryQueue::new(8);
    let rx = WebhookReceiver::new(GitHub::new(GH_SECRET).unwrap(), q);
    let body = b"{\"action\":\"opened\"}".to_vec();
    let sig = sign_github(GH_SECRET, &body);
    let (first, rest) = body.split_at(5);
    let (first, rest) = (Bytes::copy_from_slice(first), Bytes::copy_from_slice(rest));
    let slow = futures_util::stream::unfold(0u8, move |step| {
        let (first, rest) = (first.clone(), rest.clone());
        async move {
            match step {
                0 => Some((Ok::<_, std::io::Error>(first), 1)),
                1 => {
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    Some((Ok(rest), 2))
                }
                _ => None,
            }
        }
    });
    let req = Request::post("/hook")
        .header("x-hub-signature-256", sig.as_str())
        .body(Body::from_stream(slow))
        .unwrap();
    let cut = tower::timeout::Timeout::new(rx.clone(), Duration::from_secs(1));
    assert!(cut.oneshot(req).await.is_err(), "the timeout cut it");
    assert_eq!(drain(&mut events), 0);
    for _ in 0..2 {
        let (status, _) =
            deliver(&rx, &[("x-hub-signature-256", sig.as_str())], body.clone()).await;
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(drain(&mut events), 1);
}

/// The receiver mounted in an axum `Router` behind tower's `Timeout`, `Buffer` and
/// `ConcurrencyLimit(1)` (errors turned into answers by `HandleErrorLayer`), served on
/// 127.0.0.1: 20 deliveries at once are all answered 200 and queued once each; their copies are
/// answered 200 and not queued again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s42_receiver_in_axum_router_under_tower_layers() {
    use axum::error_handling::HandleErrorLayer;
    use axum::routing::post_service;
    use sturdy::core::BoxError;

    let (q, mut events) = MemoryQueue::new(64);
    let rx = WebhookReceiver::new(GitHub::new(GH_SECRET).unwrap(), q).with_route("gh");
    let svc = tower::ServiceBuilder::new()
        .layer(HandleErrorLayer::new(|e: BoxError| async move {
            (StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }))
        .timeout(Duration::from_secs(10))
        .buffer(4)
        .concurrency_limit(1)
        .service(rx);
    let app = axum::Router::new().route("/hooks/gh", post_service(svc));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let client = reqwest::Client::new();
    let url = format!("http://{addr}/hooks/gh");
    let send = |i: usize| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let body = format!("{{\"n\":{i}}}");
            client
                .post(url)
                .header(
                    "x-hub-signature-256",
                    sign_github(GH_SECRET, body.as_bytes()),
                )
                .header("x-github-event", "push")
                .body(body)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    for round in 0..2 {
        let answers = futures_util::future::join_all((0..20).map(send)).await;
        assert!(
            answers.iter().all(|s| *s == reqwest::StatusCode::OK),
            "round {round}: {answers:?}"
        );
    }
    let mut bodies = Vec::new();
    while let Some(e) = events.try_recv() {
        assert_eq!(e.route, "gh");
        assert_eq!(e.headers["x-github-event"], "push");
        bodies.push(e.body);
    }
    bodies.sort();
    bodies.dedup();
    assert_eq!(bodies.len(), 20);
    assert!(events.try_recv().is_none());
    server.abort();
}

/// "a full queue gets 503 with `Retry-After` and the id is not remembered, so the redelivery is
/// accepted".
#[tokio::test]
async fn s42_full_queue_answers_503_and_forgets_the_id() {
    let (q, mut events) = MemoryQueue::new(1);
    let rx = WebhookReceiver::new(GitHub::new(GH_SECRET).unwrap(), q);
    let send = |body: &'static str| {
        let rx = rx.clone();
        async move {
            let req = Request::post("/hook")
                .header(
                    "x-hub-signature-256",
                    sign_github(GH_SECRET, body.as_bytes()),
                )
                .body(Body::from(body))
                .unwrap();
            rx.oneshot(req).await.unwrap()
        }
    };
    assert_eq!(send("{\"a\":1}").await.status(), StatusCode::OK);
    let full = send("{\"b\":2}").await;
    assert_eq!(full.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(full.headers().contains_key("retry-after"));
    assert_eq!(drain(&mut events), 1);
    assert_eq!(send("{\"b\":2}").await.status(), StatusCode::OK);
    let e = events.try_recv().expect("the redelivery is queued");
    assert_eq!(&e.body[..], b"{\"b\":2}");
}

/// The source allowlist through the receiver: no `ConnectInfo` is 403 `forbidden` without a
/// body read; an allowed peer passes; a forged `X-Forwarded-For` from an untrusted peer is
/// ignored; IPv4-mapped IPv6 peers match IPv4 networks; a header of 5,000 trusted hops is 403,
/// quickly; lists with host bits set or no network are errors.
#[tokio::test]
async fn s42_source_allowlist_through_the_receiver() {
    use axum::extract::ConnectInfo;
    use std::net::SocketAddr;
    use sturdy::webhook::SourceAllowlist;

    assert!(SourceAllowlist::new(["10.0.0.1/8"]).is_err());
    assert!(SourceAllowlist::new(Vec::<&str>::new()).is_err());
    assert!(SourceAllowlist::new(["10.0.0.0/33"]).is_err());
    assert!(SourceAllowlist::new(["not-an-ip"]).is_err());

    let list = SourceAllowlist::new(["192.30.252.0/22"])
        .unwrap()
        .with_trusted_proxies(["10.0.0.0/8"])
        .unwrap();
    let (q, mut events) = MemoryQueue::new(16);
    let rx = WebhookReceiver::new(GitHub::new(GH_SECRET).unwrap(), q).with_source_allowlist(list);
    let body = "{\"s\":1}";
    let sig = sign_github(GH_SECRET, body.as_bytes());
    let send = |peer: Option<&str>, xff: Option<String>, body: Body| {
        let mut req = Request::post("/hook")
            .header("x-hub-signature-256", sig.as_str())
            .body(body)
            .unwrap();
        if let Some(p) = peer {
            req.extensions_mut()
                .insert(ConnectInfo(p.parse::<SocketAddr>().unwrap()));
        }
        if let Some(x) = xff {
            req.headers_mut()
                .insert("x-forwarded-for", HeaderValue::from_str(&x).unwrap());
        }
        let rx = rx.clone();
        async move {
            let res = rx.oneshot(req).await.unwrap();
            let status = res.status();
            let text = res.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8_lossy(&text).into_owned())
        }
    };
    let polled = Arc::new(AtomicBool::new(false));
    let (status, text) = send(None, None, watched_body(polled.clone())).await;
    assert_eq!(
        (status, text.as_str()),
        (StatusCode::FORBIDDEN, "forbidden")
    );
    assert!(
        !polled.load(Ordering::SeqCst),
        "refused without reading the body"
    );

    let forged = Some("192.30.252.9".to_owned());
    let (status, _) = send(Some("203.0.113.5:443"), forged, Body::from(body)).await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "an untrusted peer's header is ignored"
    );

    let (status, _) = send(Some("[::ffff:192.30.252.1]:9000"), None, Body::from(body)).await;
    assert_eq!(status, StatusCode::OK, "IPv4-mapped peer");
    assert_eq!(drain(&mut events), 1);

    let via_proxy = Some("1.2.3.4, 192.30.253.7, 10.9.9.9".to_owned());
    let (status, _) = send(Some("10.0.0.1:1234"), via_proxy, Body::from(body)).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "through a trusted proxy (a duplicate, answered 200)"
    );

    let prepended = Some("192.30.252.1, 203.0.113.9".to_owned());
    let (status, _) = send(Some("10.0.0.1:1234"), prepended, Body::from(body)).await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "a client's prepended entry is left of the source"
    );

    let hops = vec!["10.1.1.1"; 5_000].join(", ");
    let started = Instant::now();
    let (status, _) = send(
        Some("10.0.0.1:1234"),
        Some(format!("192.30.252.1, {hops}")),
        Body::from(body),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "more than 32 trusted hops");
    assert!(started.elapsed() < Duration::from_secs(1));
    let (status, _) = send(
        Some("10.0.0.1:1234"),
        Some("unknown".to_owned()),
        Body::from(body),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

/// The guide: `webhook-id` is "ASCII, 1 to 256 bytes, without a `.`, else 400; spaces and
/// tabs inside are kept" (it said "visible ASCII" until s42 found that spaces and tabs, which
/// `http`'s `to_str` accepts, were let through: the words now say what the code does). An id
/// holding one is accepted once, and a copy of it is a duplicate.
#[tokio::test]
async fn s42_webhook_id_with_space_or_tab_is_kept() {
    let now = 1_700_000_000;
    let t = now.to_string();
    for id in ["msg 1", "msg\t1"] {
        let (rx, mut events) = standard_receiver(now);
        let sig = sign_standard(SW1_SECRET, id, now, b"{}").unwrap();
        let headers = [
            ("webhook-id", id),
            ("webhook-timestamp", t.as_str()),
            ("webhook-signature", sig.as_str()),
        ];
        let (status, _) = deliver(&rx, &headers, "{}").await;
        assert_eq!(status, StatusCode::OK, "{id:?}");
        let (again, _) = deliver(&rx, &headers, "{}").await;
        assert_eq!(again, StatusCode::OK, "{id:?}");
        assert_eq!(drain(&mut events), 1, "{id:?} queued once");
    }
}

/// A sender's clock and ours both before 1970 (negative Unix timestamps): the delivery is
/// exactly on time and accepted. (s42 found it refused 401: a clock before 1970 read as 1970.)
#[tokio::test]
async fn s42_negative_timestamp_on_time_is_accepted() {
    for ts in [-1_000_000, -(i64::MAX) + 1] {
        let (q, _events) = MemoryQueue::new(8);
        let rx = WebhookReceiver::new(StandardWebhooks::new(SW1_SECRET).unwrap(), q)
            .with_clock(Arc::new(Clock(time_of(ts))));
        let sig = sign_standard(SW1_SECRET, "msg_neg", ts, b"{}").unwrap();
        let t = ts.to_string();
        let (status, _) = deliver(
            &rx,
            &[
                ("webhook-id", "msg_neg"),
                ("webhook-timestamp", &t),
                ("webhook-signature", &sig),
            ],
            "{}",
        )
        .await;
        assert_eq!(status, StatusCode::OK, "ts {ts}");
    }
}

/// "The dedup key is kept at least until the timestamp plus the tolerance plus one second ...
/// whatever the dedup TTL": with a 1 ms TTL, a Stripe copy 200 s later (on paused time, the
/// wall clock moved with it) is still a duplicate; Stripe's own retry, signed again later with
/// the same body `id`, is one too; past the tolerance, the copy is refused as stale.
#[tokio::test(start_paused = true)]
async fn s42_short_dedup_ttl_does_not_shorten_replay_protection() {
    use sturdy::core::clock::ManualClock;
    let now = 1_700_000_000;
    let wall = Arc::new(ManualClock::at(time_of(now)));
    let (q, mut events) = MemoryQueue::new(8);
    let rx = WebhookReceiver::new(Stripe::new(STRIPE_SECRET).unwrap(), q)
        .with_clock(wall.clone())
        .with_dedup_ttl(Duration::from_millis(1));
    let body = br#"{"id":"evt_ttl","object":"event"}"#;
    let h = sign_stripe(STRIPE_SECRET, now, body);
    assert_eq!(
        deliver(&rx, &[("stripe-signature", &h)], &body[..]).await.0,
        StatusCode::OK
    );
    for step in [200, 99] {
        tokio::time::advance(Duration::from_secs(step)).await;
        wall.advance(Duration::from_secs(step));
        assert_eq!(
            deliver(&rx, &[("stripe-signature", &h)], &body[..]).await.0,
            StatusCode::OK
        );
    }
    // Stripe's own retry: signed again now, same event id.
    let retry = sign_stripe(STRIPE_SECRET, now + 299, body);
    assert_eq!(
        deliver(&rx, &[("stripe-signature", &retry)], &body[..])
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        drain(&mut events),
        1,
        "copies within the tolerance are duplicates"
    );
    tokio::time::advance(Duration::from_secs(5)).await;
    wall.advance(Duration::from_secs(5));
    assert_eq!(
        deliver(&rx, &[("stripe-signature", &h)], &body[..]).await.0,
        StatusCode::UNAUTHORIZED,
        "past the tolerance, stale"
    );
    assert_eq!(drain(&mut events), 0);
}

/// Two receivers of one scheme on one queue, with their own routes: the same delivery is
/// queued once per route; a Stripe `id` longer than `MAX_ID_LEN` is not used (a digest is).
#[tokio::test]
async fn s42_routes_separate_id_spaces_and_long_stripe_ids() {
    let now = 1_700_000_000;
    let (q, mut events) = MemoryQueue::new(8);
    let a = WebhookReceiver::new(Stripe::new(STRIPE_SECRET).unwrap(), q.clone())
        .with_clock(clock(now))
        .with_route("billing");
    let b = WebhookReceiver::new(Stripe::new(STRIPE_SECRET).unwrap(), q)
        .with_clock(clock(now))
        .with_route("payouts");
    let body = br#"{"id":"evt_route"}"#;
    let h = sign_stripe(STRIPE_SECRET, now, body);
    for rx in [&a, &b, &a, &b] {
        assert_eq!(
            deliver(rx, &[("stripe-signature", &h)], &body[..]).await.0,
            StatusCode::OK
        );
    }
    let mut routes = Vec::new();
    while let Some(e) = events.try_recv() {
        assert_eq!(e.id, "evt_route");
        routes.push(e.route);
    }
    routes.sort();
    assert_eq!(routes, ["billing", "payouts"]);

    let long = format!("{{\"id\":\"evt_{}\"}}", "x".repeat(MAX_ID_LEN));
    let h = sign_stripe(STRIPE_SECRET, now, long.as_bytes());
    assert_eq!(
        deliver(&a, &[("stripe-signature", &h)], long.clone())
            .await
            .0,
        StatusCode::OK
    );
    let e = events.try_recv().unwrap();
    assert!(e.id.starts_with("sha256:"), "{}", &e.id[..20]);
    assert!(e.id.len() <= MAX_ID_LEN);
}

/// SW-secret: the `whsec_` prefix is optional and so is the padding; empty secrets and
/// non-base64 are errors. A generic scheme configured like GitHub verifies GH-1.
#[tokio::test]
async fn s42_secret_forms_and_generic_github_vector() {
    use sturdy::webhook::decode_standard_secret;
    let with = decode_standard_secret(SW1_SECRET).unwrap();
    assert_eq!(with.len(), 24);
    assert_eq!(
        decode_standard_secret("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap(),
        with
    );
    assert!(decode_standard_secret("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaS").is_ok());
    assert!(decode_standard_secret("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSwBr").is_ok());
    assert!(decode_standard_secret("").is_err());
    assert!(decode_standard_secret("whsec_").is_err());
    assert!(decode_standard_secret("whsec_!!!not base64!!!").is_err());

    let v = GenericHmac::new(
        "gh-like",
        HeaderName::from_static("x-hub-signature-256"),
        GH_SECRET,
    )
    .unwrap()
    .with_prefix("sha256=");
    let (q, mut events) = MemoryQueue::new(4);
    let rx = WebhookReceiver::new(v, q);
    let (status, _) = deliver(
        &rx,
        &[(
            "x-hub-signature-256",
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
        )],
        "Hello, World!",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let e = events.try_recv().unwrap();
    assert_eq!(
        (e.scheme.as_str(), e.route.as_str()),
        ("gh-like", "gh-like")
    );
    assert!(e.id.starts_with("sha256:"));
    let (status, _) = deliver(
        &rx,
        &[(
            "x-hub-signature-256",
            "sha256=757107EA0EB2509FC211221CCE984B8A37570B6D7586C22C46F4379C8B043E17",
        )],
        "Hello, World!",
    )
    .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "uppercase hex is accepted; a duplicate"
    );
    assert!(events.try_recv().is_none());
}

/// "only the first `MAX_SIGNATURES` (16) `v1` entries ... are considered; the rest are
/// ignored": the right signature as the 16th `v1` entry passes, as the 17th it does not;
/// entries of another version before it do not count towards the 16.
#[tokio::test]
async fn s42_only_the_first_sixteen_v1_entries_count() {
    use sturdy::webhook::MAX_SIGNATURES;
    assert_eq!(MAX_SIGNATURES, 16);
    let now = 1_700_000_000;
    let t = now.to_string();
    let good = sign_standard(SW1_SECRET, "msg_16", now, b"{}").unwrap();
    let wrong = "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=";
    let other = "v2,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=";
    for (before, others, want) in [
        (15, 0, StatusCode::OK),
        (16, 0, StatusCode::UNAUTHORIZED),
        (15, 40, StatusCode::OK),
    ] {
        let mut entries = vec![other; others];
        entries.extend(vec![wrong; before]);
        entries.push(good.as_str());
        let header = entries.join(" ");
        let (rx, _events) = standard_receiver(now);
        let (status, _) = deliver(
            &rx,
            &[
                ("webhook-id", "msg_16"),
                ("webhook-timestamp", &t),
                ("webhook-signature", &header),
            ],
            "{}",
        )
        .await;
        assert_eq!(status, want, "{before} wrong v1 and {others} v2 before it");
    }

    let body = br#"{"id":"evt_16"}"#;
    let good = sign_stripe(STRIPE_SECRET, now, body);
    let hex = good.split("v1=").nth(1).unwrap().to_owned();
    let wrong = format!("v1={}", "ab".repeat(32));
    let v0 = format!("v0={}", "cd".repeat(32));
    for (before, others, want) in [
        (15, 0, StatusCode::OK),
        (16, 0, StatusCode::UNAUTHORIZED),
        (15, 40, StatusCode::OK),
    ] {
        let mut entries = vec![format!("t={now}")];
        entries.extend(vec![v0.clone(); others]);
        entries.extend(vec![wrong.clone(); before]);
        entries.push(format!("v1={hex}"));
        let header = entries.join(",");
        let (q, _events) = MemoryQueue::new(4);
        let rx =
            WebhookReceiver::new(Stripe::new(STRIPE_SECRET).unwrap(), q).with_clock(clock(now));
        let (status, _) = deliver(&rx, &[("stripe-signature", &header)], &body[..]).await;
        assert_eq!(
            status, want,
            "stripe: {before} wrong v1 and {others} v0 before it"
        );
    }
}

/// Two `t=` entries in one `Stripe-Signature` (a fresh one added to a captured, stale, signed
/// header), or two timestamp lines for a generic scheme: the timestamp whose freshness is
/// checked must be the one the MAC covers, so none of these is accepted.
#[tokio::test]
async fn s42_duplicate_timestamp_entries_cannot_refresh_a_stale_delivery() {
    let now = 1_700_000_000;
    let old = now - 3_600;
    let body = br#"{"id":"evt_dup_t"}"#;
    let sig = sign_stripe(STRIPE_SECRET, old, body);
    let v1 = sig.split("v1=").nth(1).unwrap().to_owned();
    for header in [
        format!("t={now},t={old},v1={v1}"),
        format!("t={old},t={now},v1={v1}"),
        format!("t={old},v1={v1},t={now}"),
    ] {
        let (q, mut events) = MemoryQueue::new(4);
        let rx =
            WebhookReceiver::new(Stripe::new(STRIPE_SECRET).unwrap(), q).with_clock(clock(now));
        let (status, _) = deliver(&rx, &[("stripe-signature", &header)], &body[..]).await;
        assert_ne!(status, StatusCode::OK, "{header}");
        assert_eq!(drain(&mut events), 0);
    }

    // A generic scheme signing `timestamp.body`, with its timestamp header twice.
    // HMAC-SHA256 over `old.{}` keyed with the secret's bytes: what sign_github computes.
    let signed = format!("{old}.{{}}");
    let tag = sign_github("gen-key", signed.as_bytes())
        .strip_prefix("sha256=")
        .unwrap()
        .to_owned();
    // The tag is right for `old` alone: accepted when `old` is fresh, so the refusals below
    // are about the second timestamp line, not a wrong tag.
    {
        let v = GenericHmac::new("acme", HeaderName::from_static("x-acme-sig"), "gen-key")
            .unwrap()
            .with_timestamp_header(HeaderName::from_static("x-acme-ts"));
        let (q, _events) = MemoryQueue::new(4);
        let rx = WebhookReceiver::new(v, q).with_clock(clock(old));
        let t = old.to_string();
        let (status, _) = deliver(&rx, &[("x-acme-sig", &tag), ("x-acme-ts", &t)], "{}").await;
        assert_eq!(status, StatusCode::OK);
    }
    for order in [[old, now], [now, old]] {
        let v = GenericHmac::new("acme", HeaderName::from_static("x-acme-sig"), "gen-key")
            .unwrap()
            .with_timestamp_header(HeaderName::from_static("x-acme-ts"));
        let (q, mut events) = MemoryQueue::new(4);
        let rx = WebhookReceiver::new(v, q).with_clock(clock(now));
        let mut req = Request::post("/hook").header("x-acme-sig", tag.as_str());
        for t in order {
            req = req.header("x-acme-ts", t.to_string());
        }
        let res = rx
            .oneshot(req.body(Body::from("{}")).unwrap())
            .await
            .unwrap();
        assert_ne!(res.status(), StatusCode::OK, "{order:?}");
        assert_eq!(drain(&mut events), 0);
    }
}

/// Stripe deduplicates on the body's top-level `id` only: two events whose only `id` is nested
/// are two events.
#[tokio::test]
async fn s42_stripe_nested_id_is_not_the_event_id() {
    let now = 1_700_000_000;
    let (q, mut events) = MemoryQueue::new(4);
    let rx = WebhookReceiver::new(Stripe::new(STRIPE_SECRET).unwrap(), q).with_clock(clock(now));
    for body in [
        r#"{"data":{"id":"same"},"n":1}"#,
        r#"{"data":{"id":"same"},"n":2}"#,
    ] {
        let h = sign_stripe(STRIPE_SECRET, now, body.as_bytes());
        let (status, _) = deliver(&rx, &[("stripe-signature", &h)], body).await;
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(drain(&mut events), 2);
}

/// Limits at their extremes: `with_body_limit(0)` takes an empty body and refuses one byte;
/// `with_body_limit(usize::MAX)` with a lying `Content-Length` of a terabyte or of `u64::MAX`
/// on a 2-byte body neither allocates that much nor crashes; `with_offload_above(0)` verifies
/// every body on the blocking pool of a current-thread runtime.
#[tokio::test]
async fn s42_limit_extremes_and_lying_content_length() {
    let (q, mut events) = MemoryQueue::new(8);
    let rx = WebhookReceiver::new(GitHub::new(GH_SECRET).unwrap(), q).with_body_limit(0);
    let (status, _) = deliver(
        &rx,
        &[("x-hub-signature-256", &sign_github(GH_SECRET, b""))],
        Body::empty(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = deliver(
        &rx,
        &[("x-hub-signature-256", &sign_github(GH_SECRET, b"x"))],
        "x",
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(drain(&mut events), 1);

    let (q, mut events) = MemoryQueue::new(8);
    let rx = WebhookReceiver::new(GitHub::new(GH_SECRET).unwrap(), q)
        .with_body_limit(usize::MAX)
        .with_offload_above(0);
    for (i, len) in ["1099511627776", "18446744073709551615"].iter().enumerate() {
        let body = format!("[{i}]");
        let sig = sign_github(GH_SECRET, body.as_bytes());
        let (status, _) = deliver(
            &rx,
            &[("x-hub-signature-256", &sig), ("content-length", len)],
            body,
        )
        .await;
        assert!(
            status == StatusCode::OK || status.is_client_error(),
            "content-length {len}: {status}"
        );
    }
    let _ = drain(&mut events);
}
