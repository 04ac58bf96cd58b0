//! s53 outside round: docs/guides/webhooks.md and sturdy-webhook's rustdoc read sentence by
//! sentence, with the public vectors of /work/shared/vectors/STANDARDS.md as they are, hostile
//! signature headers, body limits and the acknowledgement over a real socket.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use axum::body::Body;
use axum::routing::post_service;
use axum::Router;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode};
use http_body_util::BodyExt;
use sturdy::core::events::{Event, WebhookOutcome};
use sturdy::core::{BoxError, WallClock};
use sturdy::webhook::{
    decode_standard_secret, sign_github, sign_standard, sign_stripe, BoxFuture, EventQueue,
    GenericHmac, GitHub, MemoryQueue, Push, StandardWebhooks, Stripe, Verifier, WebhookEvent,
    WebhookReceiver, MAX_ID_LEN, MAX_SIGNATURES,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tower::ServiceExt;

use crate::logs13_common::Capture;

// SW-1 (STANDARDS.md §1.3, verified).
const SW_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const SW_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
const SW_TS: i64 = 1_614_265_330;
const SW_BODY: &str = "{\"test\": 2432232314}";
const SW_SIG: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
// GH-1 (§3, verified).
const GH_SECRET: &str = "It's a Secret to Everybody";
const GH_SIG: &str = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
const STRIPE_SECRET: &str = "whsec_s53_stripe_endpoint_secret_value";

#[derive(Debug, Clone, Copy)]
struct Fixed(SystemTime);
impl WallClock for Fixed {
    fn now(&self) -> SystemTime {
        self.0
    }
}

fn at(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

fn now_s() -> i64 {
    sturdy::core::SystemClock
        .now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

async fn send<Q: EventQueue + Clone>(
    rx: &WebhookReceiver<Q>,
    headers: &[(&str, &[u8])],
    body: impl Into<Bytes>,
) -> (u16, String) {
    let mut b = Request::post("/hook");
    for (k, v) in headers {
        b = b.header(*k, HeaderValue::from_bytes(v).unwrap());
    }
    let resp = rx
        .clone()
        .oneshot(b.body(Body::from(body.into())).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&text).into_owned())
}

fn sw_headers<'a>(id: &'a str, ts: &'a str, sig: &'a str) -> Vec<(&'static str, &'a [u8])> {
    vec![
        ("webhook-id", id.as_bytes()),
        ("webhook-timestamp", ts.as_bytes()),
        ("webhook-signature", sig.as_bytes()),
    ]
}

fn sw_receiver() -> (
    WebhookReceiver<MemoryQueue>,
    sturdy::webhook::MemoryReceiver,
) {
    let (q, events) = MemoryQueue::new(100);
    let rx = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), q)
        .with_clock(Arc::new(Fixed(at(SW_TS))));
    (rx, events)
}

// ---------------------------------------------------------------------------------------------
// Standard Webhooks vectors.

#[tokio::test]
async fn s53_sw1_vector_signs_and_is_accepted() {
    assert_eq!(
        sign_standard(SW_SECRET, SW_ID, SW_TS, SW_BODY.as_bytes()).unwrap(),
        SW_SIG
    );
    // The secret without its prefix is the same key.
    assert_eq!(
        sign_standard(
            "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            SW_ID,
            SW_TS,
            SW_BODY.as_bytes()
        )
        .unwrap(),
        SW_SIG
    );
    let (rx, mut events) = sw_receiver();
    let ts = SW_TS.to_string();
    let (st, text) = send(&rx, &sw_headers(SW_ID, &ts, SW_SIG), SW_BODY).await;
    assert_eq!(st, 200, "{text}");
    let e = events.try_recv().expect("queued before the 200");
    assert_eq!(
        (e.scheme.as_str(), e.route.as_str()),
        ("standard", "standard")
    );
    assert_eq!(e.id, SW_ID);
    assert_eq!(e.timestamp, Some(SW_TS));
    assert_eq!(e.body, SW_BODY.as_bytes());
    assert_eq!(e.headers["webhook-id"], SW_ID);
    assert_eq!(e.headers["webhook-timestamp"], ts.as_str());
    // A duplicate: 200, not queued again.
    let (st, _) = send(&rx, &sw_headers(SW_ID, &ts, SW_SIG), SW_BODY).await;
    assert_eq!(st, 200);
    assert!(events.try_recv().is_none());
}

#[tokio::test]
async fn s53_sw_negative_vectors_are_401_invalid_signature() {
    let (rx, mut events) = sw_receiver();
    let ts = SW_TS.to_string();
    for sig in [
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OA=",
        "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=",
        "v1,dawfeoifkpqwoekfpqoekf",
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLawdd",
        "v1,",
        "v1,g0hM9",
        "v1,tFtCZ5RDCPxzWQRWXWPgrCgE2frDBe9gjpbWQxnVfsQ= v1,Mm7xgUVICxZfQ3bgf0h0Dof65L/IFx+PnZvnDWPCX6Q= v1,9DfC1c3eeOrXB6w/5dIDydLNQaEyww5KalE5jLBZucE=",
        "v2,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
        "v1a,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
    ] {
        let (st, text) = send(&rx, &sw_headers(SW_ID, &ts, sig), SW_BODY).await;
        assert_eq!(st, 401, "{sig}: {text}");
        assert_eq!(text, "invalid signature", "{sig}");
    }
    assert!(events.try_recv().is_none());
    // The body changed by one byte.
    let (st, _) = send(
        &rx,
        &sw_headers(SW_ID, &ts, SW_SIG),
        "{\"test\": 2432232315}",
    )
    .await;
    assert_eq!(st, 401);
    // The id changed (signed).
    let (st, _) = send(&rx, &sw_headers("msg_other", &ts, SW_SIG), SW_BODY).await;
    assert_eq!(st, 401);
}

#[tokio::test]
async fn s53_sw_multi_signature_vector_is_accepted() {
    let (rx, mut events) = sw_receiver();
    let ts = SW_TS.to_string();
    let multi = "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= v2,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE= v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=";
    let (st, text) = send(&rx, &sw_headers(SW_ID, &ts, multi), SW_BODY).await;
    assert_eq!(st, 200, "{text}");
    assert!(events.try_recv().is_some());
}

#[tokio::test]
async fn s53_only_the_first_sixteen_v1_entries_are_considered() {
    assert_eq!(MAX_SIGNATURES, 16);
    let decoy = "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=";
    let ts = SW_TS.to_string();
    for (decoys, other_versions, ok) in [
        (15, 0, true),
        (16, 0, false),
        (15, 40, true),
        (40, 0, false),
    ] {
        let (rx, _events) = sw_receiver();
        let mut entries: Vec<String> = Vec::new();
        for _ in 0..other_versions {
            entries.push("v2,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=".into());
        }
        for _ in 0..decoys {
            entries.push(decoy.into());
        }
        entries.push(SW_SIG.into());
        let sig = entries.join(" ");
        let (st, _) = send(&rx, &sw_headers(SW_ID, &ts, &sig), SW_BODY).await;
        assert_eq!(
            st == 200,
            ok,
            "{decoys} v1 decoys, {other_versions} v2 entries: {st}"
        );
        if !ok {
            assert_eq!(st, 401);
        }
    }
}

#[tokio::test]
async fn s53_timestamp_tolerance_both_directions_and_extremes() {
    let (q, _events) = MemoryQueue::new(1000);
    let now = 1_700_000_000i64;
    let rx = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), q)
        .with_clock(Arc::new(Fixed(at(now))));
    for (i, (ts, want)) in [
        (now, 200),
        (now - 300, 200),
        (now + 300, 200),
        (now - 301, 401),
        (now + 301, 401),
        (i64::MAX, 401),
        (i64::MIN, 401),
        (0, 401),
        (-1, 401),
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("msg_t{i}");
        let sig = sign_standard(SW_SECRET, &id, ts, b"{}").unwrap();
        let t = ts.to_string();
        let (st, _) = send(&rx, &sw_headers(&id, &t, &sig), "{}").await;
        assert_eq!(st, want, "ts {ts} (now {now})");
    }
    // Malformed timestamps: 400 (or 401 for a number past i64); never accepted, never 500.
    for t in [
        "hello",
        "1614265330.5",
        "",
        " 1700000000",
        "1700000000 ",
        "+1700000000",
        "1e9",
        "0x10",
        "9223372036854775808",
        "-9223372036854775809",
        "99999999999999999999999999999999",
    ] {
        let id = "msg_bad_ts";
        let sig = format!("v1,{}", "A".repeat(43) + "=");
        let (st, _) = send(&rx, &sw_headers(id, t, &sig), "{}").await;
        assert!(st == 400 || st == 401, "{t:?}: {st}");
        if t.trim().parse::<i128>().is_err() {
            assert_eq!(st, 400, "{t:?} is malformed");
        }
    }
}

#[tokio::test]
async fn s53_webhook_id_rules() {
    let (q, mut events) = MemoryQueue::new(1000);
    let now = now_s();
    let rx = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), q);
    let t = now.to_string();
    assert_eq!(MAX_ID_LEN, 256);
    let max = "i".repeat(256);
    let over = "i".repeat(257);
    for (id, want) in [
        (max.as_str(), 200),
        (over.as_str(), 400),
        ("a.b", 400),
        ("", 400),
        ("msg with space\tand tab", 200),
    ] {
        let sig = sign_standard(SW_SECRET, id, now, b"{}").unwrap();
        let (st, _) = send(&rx, &sw_headers(id, &t, &sig), "{}").await;
        assert_eq!(st, want, "{id:.20?}");
        if want == 200 {
            assert_eq!(events.try_recv().unwrap().id, id, "kept as signed");
        }
    }
    // Not ASCII (`msg_café` in UTF-8 bytes).
    let id = "msg_café";
    let sig = sign_standard(SW_SECRET, id, now, b"{}").unwrap();
    let (st, _) = send(
        &rx,
        &[
            ("webhook-id", id.as_bytes()),
            ("webhook-timestamp", t.as_bytes()),
            ("webhook-signature", sig.as_bytes()),
        ],
        "{}",
    )
    .await;
    assert_eq!(st, 400);
}

#[tokio::test]
async fn s53_missing_and_non_utf8_headers_are_400_never_500() {
    let (rx, _events) = sw_receiver();
    let ts = SW_TS.to_string();
    let h = sw_headers(SW_ID, &ts, SW_SIG);
    for skip in 0..3 {
        let hs: Vec<_> = h
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != skip)
            .map(|(_, x)| *x)
            .collect();
        let (st, _) = send(&rx, &hs, SW_BODY).await;
        assert_eq!(st, 400, "without {}", h[skip].0);
    }
    let (st, _) = send(
        &rx,
        &[
            ("webhook-id", SW_ID.as_bytes()),
            ("webhook-timestamp", ts.as_bytes()),
            ("webhook-signature", b"v1,\xff\xfe\x80abc"),
        ],
        SW_BODY,
    )
    .await;
    assert!(st == 400 || st == 401, "{st}");
    let (st, _) = send(
        &rx,
        &[
            ("webhook-id", SW_ID.as_bytes()),
            ("webhook-timestamp", b"16142\xff5330"),
            ("webhook-signature", SW_SIG.as_bytes()),
        ],
        SW_BODY,
    )
    .await;
    assert_eq!(st, 400);
    // Stripe and GitHub with non-UTF-8 signature headers.
    let (q, _e) = MemoryQueue::new(10);
    let s = WebhookReceiver::new(Stripe::new(STRIPE_SECRET).unwrap(), q);
    let (st, _) = send(&s, &[("stripe-signature", b"t=1,v1=\xff\xff")], "{}").await;
    assert!(st == 400 || st == 401, "{st}");
    let (q, _e) = MemoryQueue::new(10);
    let g = WebhookReceiver::new(GitHub::new(GH_SECRET).unwrap(), q);
    let (st, _) = send(&g, &[("x-hub-signature-256", b"sha256=\xff\xff")], "{}").await;
    assert!(st == 400 || st == 401, "{st}");
}

// ---------------------------------------------------------------------------------------------
// Stripe.

fn stripe_receiver(
    now: i64,
) -> (
    WebhookReceiver<MemoryQueue>,
    sturdy::webhook::MemoryReceiver,
) {
    let (q, events) = MemoryQueue::new(100);
    let rx = WebhookReceiver::new(Stripe::new(STRIPE_SECRET).unwrap(), q)
        .with_clock(Arc::new(Fixed(at(now))));
    (rx, events)
}

#[tokio::test]
async fn s53_stripe_header_negatives_are_refused() {
    let now = 1_700_000_000;
    let (rx, mut events) = stripe_receiver(now);
    let body = "{\"id\":\"evt_1\"}";
    let good = sign_stripe(STRIPE_SECRET, now, body.as_bytes());
    let v0 = good.replace("v1=", "v0=");
    for h in [
        "t=,v1=2220f87ef101a04665f11cdf770523143f875572008577fa0f20882ddb9cc3c7,v0=63f3a72374a733066c4be69ed7f8e5ac85c22c9f0a6a612ab9a025a9e4ee7eef",
        "t,v1=,v0=",
        "t,v1=,v0",
        "t,v1=,",
        "t,,",
        ",,",
        "t",
        "",
        "v1,t=1",
        "t=",
        "bad_header",
        v0.as_str(),
    ] {
        let (st, _) = send(&rx, &[("stripe-signature", h.as_bytes())], body).await;
        assert!(st == 400 || st == 401, "{h:?}: {st}");
    }
    assert!(events.try_recv().is_none());
    // An extra undecodable v1 entry is ignored.
    let (st, _) = send(
        &rx,
        &[(
            "stripe-signature",
            format!("{good},v1=bad_signature").as_bytes(),
        )],
        body,
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(events.try_recv().unwrap().id, "evt_1");
}

#[tokio::test]
async fn s53_stripe_tolerance_both_directions_and_id_dedup() {
    let now = 1_700_000_000;
    let (rx, mut events) = stripe_receiver(now);
    let body = "{\"id\":\"evt_tol\",\"object\":\"event\"}";
    for (ts, want) in [
        (now - 301, 401),
        (now + 301, 401),
        (i64::MAX, 401),
        (i64::MIN, 401),
    ] {
        let h = sign_stripe(STRIPE_SECRET, ts, body.as_bytes());
        let (st, _) = send(&rx, &[("stripe-signature", h.as_bytes())], body).await;
        assert_eq!(st, want, "ts {ts}");
    }
    let h = sign_stripe(STRIPE_SECRET, now - 300, body.as_bytes());
    assert_eq!(
        send(&rx, &[("stripe-signature", h.as_bytes())], body)
            .await
            .0,
        200
    );
    // Stripe's retry is signed again with a new timestamp: the same id, a duplicate.
    let h = sign_stripe(STRIPE_SECRET, now, body.as_bytes());
    let (st, text) = send(&rx, &[("stripe-signature", h.as_bytes())], body).await;
    assert_eq!(st, 200, "{text}");
    assert_eq!(events.try_recv().unwrap().id, "evt_tol");
    assert!(events.try_recv().is_none(), "not queued twice");
    // An id longer than MAX_ID_LEN is not used: a digest instead.
    let long = format!("{{\"id\":\"{}\"}}", "e".repeat(257));
    let h = sign_stripe(STRIPE_SECRET, now, long.as_bytes());
    assert_eq!(
        send(&rx, &[("stripe-signature", h.as_bytes())], long.clone())
            .await
            .0,
        200
    );
    let e = events.try_recv().unwrap();
    assert!(e.id.starts_with("sha256:"), "{}", e.id);
    assert_eq!(e.headers["stripe-signature"], h.as_str());
}

#[tokio::test]
async fn s53_github_vector() {
    assert_eq!(sign_github(GH_SECRET, b"Hello, World!"), GH_SIG);
    let (q, mut events) = MemoryQueue::new(10);
    let rx = WebhookReceiver::new(GitHub::new(GH_SECRET).unwrap(), q);
    let (st, _) = send(
        &rx,
        &[
            ("x-hub-signature-256", GH_SIG.as_bytes()),
            ("x-github-delivery", b"d-1"),
        ],
        "Hello, World!",
    )
    .await;
    assert_eq!(st, 200);
    let e = events.try_recv().unwrap();
    assert!(e.id.starts_with("sha256:"));
    // The same body under a new delivery id: a duplicate.
    let (st, _) = send(
        &rx,
        &[
            ("x-hub-signature-256", GH_SIG.as_bytes()),
            ("x-github-delivery", b"d-2"),
        ],
        "Hello, World!",
    )
    .await;
    assert_eq!(st, 200);
    assert!(events.try_recv().is_none());
    // Uppercase hex, sha1 prefix, missing prefix.
    for sig in [
        GH_SIG.to_uppercase().replace("SHA256=", "sha256="),
        GH_SIG.replace("sha256=", "sha1="),
        GH_SIG.replace("sha256=", ""),
    ] {
        let (st, _) = send(
            &rx,
            &[("x-hub-signature-256", sig.as_bytes())],
            "Hello, World!",
        )
        .await;
        assert!(st == 200 || st == 400 || st == 401, "{sig}: {st}");
        if !sig.starts_with("sha256=") {
            assert_ne!(st, 200, "{sig}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Carried headers, secrets, errors.

#[tokio::test]
async fn s53_carried_header_values_are_bounded() {
    let (q, mut events) = MemoryQueue::new(10);
    let rx = WebhookReceiver::new(GitHub::new(GH_SECRET).unwrap(), q);
    let long = "e".repeat(1025);
    let kib = "k".repeat(1024);
    let mut b = Request::post("/hook").header("x-hub-signature-256", GH_SIG);
    for i in 0..6 {
        b = b.header("x-github-event", format!("ev{i}"));
    }
    b = b.header("x-github-delivery", long.as_str());
    b = b.header("x-github-hook-id", kib.as_str());
    let resp = rx
        .clone()
        .oneshot(b.body(Body::from("Hello, World!")).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let e = events.try_recv().unwrap();
    assert_eq!(
        e.headers.get_all("x-github-event").iter().count(),
        4,
        "at most 4 per name"
    );
    assert!(
        e.headers.get("x-github-delivery").is_none(),
        "a value over 1 KiB is not carried"
    );
    assert_eq!(
        e.headers["x-github-hook-id"],
        kib.as_str(),
        "1 KiB is carried"
    );
}

#[test]
fn s53_empty_secrets_are_refused_and_errors_show_no_secret() {
    assert!(Stripe::new("").is_err());
    assert!(GitHub::new("").is_err());
    assert!(StandardWebhooks::new("").is_err());
    assert!(StandardWebhooks::new("whsec_").is_err());
    assert!(GenericHmac::new("x", HeaderName::from_static("x-sig"), "").is_err());
    assert!(GenericHmac::new("", HeaderName::from_static("x-sig"), "k").is_err());
    assert!(Stripe::with_secrets([]).is_err());
    assert!(GitHub::with_secrets(["ok", ""]).is_err());
    assert!(StandardWebhooks::with_secrets([SW_SECRET, ""]).is_err());
    // A secret that is not base64: the error names the cause, not the secret.
    for bad in ["whsec_S53notbase64!!secretpart", "S53notbase64!!secretpart"] {
        let e = StandardWebhooks::new(bad).unwrap_err();
        let w = format!("{e} | {e:?}");
        assert!(!w.contains("S53notbase64"), "{w}");
        assert!(!w.contains("secretpart"), "{w}");
        let e = decode_standard_secret(bad).unwrap_err();
        let w = format!("{e} | {e:?}");
        assert!(!w.contains("secretpart"), "{w}");
        let e = sign_standard(bad, "id", 1, b"x").unwrap_err();
        assert!(!format!("{e} {e:?}").contains("secretpart"));
    }
    // Debug output of every verifier and of a receiver.
    let key_b64 = "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let shown = [
        format!("{:?}", StandardWebhooks::new(SW_SECRET).unwrap()),
        format!("{:?}", Stripe::new(STRIPE_SECRET).unwrap()),
        format!("{:?}", GitHub::new(GH_SECRET).unwrap()),
        format!(
            "{:?}",
            GenericHmac::new("acme", HeaderName::from_static("x-sig"), "acme_S53_key").unwrap()
        ),
        format!(
            "{:?}",
            WebhookReceiver::new(Stripe::new(STRIPE_SECRET).unwrap(), MemoryQueue::new(1).0)
        ),
    ];
    for s in shown {
        for secret in [
            key_b64,
            "s53_stripe_endpoint",
            "Secret to Everybody",
            "acme_S53_key",
        ] {
            assert!(!s.contains(secret), "{secret} in {s}");
        }
    }
}

#[tokio::test]
async fn s53_rejection_logs_hold_no_secret_and_no_expected_signature() {
    // The reason goes to tracing: it must not hand out the signature that would have matched
    // (a forgery oracle) nor the secret.
    let cap = Capture::default();
    let _g = cap.install();
    let (rx, _events) = sw_receiver();
    let ts = SW_TS.to_string();
    let (st, _) = send(
        &rx,
        &sw_headers(
            SW_ID,
            &ts,
            "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=",
        ),
        SW_BODY,
    )
    .await;
    assert_eq!(st, 401);
    let (q, _e) = MemoryQueue::new(1);
    let gh = WebhookReceiver::new(GitHub::new(GH_SECRET).unwrap(), q);
    let (st, _) = send(
        &gh,
        &[(
            "x-hub-signature-256",
            b"sha256=0000000000000000000000000000000000000000000000000000000000000000",
        )],
        "Hello, World!",
    )
    .await;
    assert_eq!(st, 401);
    let now = now_s();
    let (q, _e) = MemoryQueue::new(1);
    let st_rx = WebhookReceiver::new(Stripe::new(STRIPE_SECRET).unwrap(), q);
    let good = sign_stripe(STRIPE_SECRET, now, b"{}");
    let bad = format!("t={now},v1={}", "0".repeat(64));
    assert_eq!(
        send(&st_rx, &[("stripe-signature", bad.as_bytes())], "{}")
            .await
            .0,
        401
    );
    let text = cap.all();
    assert!(!text.is_empty(), "the reasons go to tracing");
    for s in [
        "g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE",
        "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
        "Secret to Everybody",
        &good[good.find("v1=").unwrap() + 3..],
        "s53_stripe_endpoint",
    ] {
        assert!(!text.contains(s), "{s} in the logs:\n{text}");
    }
}

#[test]
fn s53_dedup_keys_of_distinct_triples_differ() {
    let mk = |s: &str, r: &str, id: &str| {
        WebhookEvent::new(s.to_owned(), id.to_owned(), Bytes::new())
            .with_route(r.to_owned())
            .dedup_key()
    };
    let triples = [
        ("a:b", "c", "d"),
        ("a", "b:c", "d"),
        ("a", "b", "c:d"),
        ("a%3Ab", "c", "d"),
        ("a", "b%3Ac", "d"),
        ("a%", "b", "c"),
        ("a", "%b", "c"),
        ("", "a:b", "c"),
        ("a:b:", "", "c"),
    ];
    let keys: Vec<String> = triples.iter().map(|(s, r, i)| mk(s, r, i)).collect();
    for i in 0..keys.len() {
        for j in i + 1..keys.len() {
            assert_ne!(keys[i], keys[j], "{:?} vs {:?}", triples[i], triples[j]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Cost of hostile input (coarse ratio, generous bound).

#[test]
fn s53_four_thousand_signature_entries_cost_about_one() {
    let body = vec![b'x'; 1 << 20];
    let now = 1_700_000_000i64;
    let secrets = [
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "whsec_aG9va3MzMSByb3RhdGVkIHNlY3JldCAzMiBieXRlcyE=",
        "whsec_czUzIGEgdGhpcmQgc2VjcmV0IGZvciB0aGUgdGVzdA==",
    ];
    let v = StandardWebhooks::with_secrets(secrets).unwrap();
    let decoy = "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=";
    let mut one = HeaderMap::new();
    one.insert("webhook-id", HeaderValue::from_static("msg_cost"));
    one.insert(
        "webhook-timestamp",
        HeaderValue::from_str(&now.to_string()).unwrap(),
    );
    one.insert("webhook-signature", HeaderValue::from_static(decoy));
    let mut many = one.clone();
    many.insert(
        "webhook-signature",
        HeaderValue::from_str(&vec![decoy; 4000].join(" ")).unwrap(),
    );
    let s = WebhookReceiver::new(
        Stripe::with_secrets(["a", "b", "c"]).unwrap(),
        MemoryQueue::new(1).0,
    );
    drop(s);
    let st = Stripe::with_secrets(["s53_a", "s53_b", "s53_c"]).unwrap();
    let mut s_one = HeaderMap::new();
    s_one.insert(
        "stripe-signature",
        HeaderValue::from_str(&format!("t={now},v1={}", "ab".repeat(32))).unwrap(),
    );
    let mut s_many = HeaderMap::new();
    let mut long = format!("t={now}");
    for _ in 0..4000 {
        long.push_str(&format!(",v1={}", "ab".repeat(32)));
    }
    s_many.insert("stripe-signature", HeaderValue::from_str(&long).unwrap());

    let time = |f: &dyn Fn()| crate::cost_common::fastest(5, f);
    let clock = at(now);
    let a = time(&|| assert!(v.verify(&one, &body, clock).is_err()));
    let b = time(&|| assert!(v.verify(&many, &body, clock).is_err()));
    let c = time(&|| assert!(st.verify(&s_one, &body, clock).is_err()));
    let d = time(&|| assert!(st.verify(&s_many, &body, clock).is_err()));
    let r1 = b.as_secs_f64() / a.as_secs_f64();
    let r2 = d.as_secs_f64() / c.as_secs_f64();
    assert!(r1 < 5.0, "standard: 1 entry {a:?}, 4000 entries {b:?}");
    assert!(r2 < 5.0, "stripe: 1 entry {c:?}, 4000 entries {d:?}");
    // Headers are checked before the body: a malformed or stale header costs no body read.
    assert!(v.check_headers(&many, at(now + 10_000)).is_err());
}

// ---------------------------------------------------------------------------------------------
// Body limit and acknowledgement over a real socket.

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await;
    });
    addr
}

fn raw_head(headers: &[(&str, String)], len: usize) -> Vec<u8> {
    let mut s = String::from("POST /hook HTTP/1.1\r\nhost: 127.0.0.1\r\n");
    for (k, v) in headers {
        s.push_str(&format!("{k}: {v}\r\n"));
    }
    s.push_str(&format!(
        "content-length: {len}\r\nconnection: close\r\n\r\n"
    ));
    s.into_bytes()
}

async fn read_answer(sock: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), sock.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn s53_body_limit_is_inclusive_and_past_it_413_without_reading() {
    let (q, mut events) = MemoryQueue::new(10);
    let rx = WebhookReceiver::new(GitHub::new(GH_SECRET).unwrap(), q).with_body_limit(1000);
    let addr = serve(Router::new().route("/hook", post_service(rx.clone()))).await;
    for (n, want) in [(1000usize, "200"), (1001, "413")] {
        let body = vec![b'a' + (n % 26) as u8; n];
        let sig = sign_github(GH_SECRET, &body);
        let mut sock = TcpStream::connect(addr).await.unwrap();
        sock.write_all(&raw_head(&[("x-hub-signature-256", sig)], n))
            .await
            .unwrap();
        sock.write_all(&body).await.unwrap();
        let ans = read_answer(&mut sock).await;
        assert!(ans.starts_with(&format!("HTTP/1.1 {want}")), "{n}: {ans}");
        if want == "413" {
            assert!(ans.ends_with("payload too large"), "{ans}");
        }
    }
    assert!(events.try_recv().is_some());
    assert!(events.try_recv().is_none());
    // A declared length of 100 MB, nothing sent: 413 at once, not a wait for the body.
    let sig = sign_github(GH_SECRET, b"x");
    let mut sock = TcpStream::connect(addr).await.unwrap();
    sock.write_all(&raw_head(&[("x-hub-signature-256", sig)], 100 << 20))
        .await
        .unwrap();
    let t = Instant::now();
    let ans = read_answer(&mut sock).await;
    assert!(ans.starts_with("HTTP/1.1 413"), "{ans}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}

/// A queue whose pushes wait for a permit, or fail.
#[derive(Debug, Clone)]
struct Slow {
    inner: MemoryQueue,
    gate: Arc<tokio::sync::Semaphore>,
    started: Arc<AtomicUsize>,
    fail: bool,
}

impl EventQueue for Slow {
    fn push(&self, event: WebhookEvent, ttl: Duration) -> BoxFuture<Result<Push, BoxError>> {
        let me = self.clone();
        Box::pin(async move {
            me.started.fetch_add(1, Ordering::SeqCst);
            me.gate.acquire().await.unwrap().forget();
            if me.fail {
                return Err::<Push, BoxError>("disk full".into());
            }
            me.inner.push(event, ttl).await
        })
    }
}

fn slow(fail: bool) -> (Slow, sturdy::webhook::MemoryReceiver) {
    let (q, rx) = MemoryQueue::new(10);
    (
        Slow {
            inner: q,
            gate: Arc::new(tokio::sync::Semaphore::new(0)),
            started: Arc::default(),
            fail,
        },
        rx,
    )
}

#[tokio::test]
async fn s53_no_2xx_before_the_durable_write_and_none_when_it_fails() {
    for fail in [false, true] {
        let (q, mut events) = slow(fail);
        let outcomes: Arc<Mutex<Vec<(WebhookOutcome, u16)>>> = Arc::default();
        let o2 = outcomes.clone();
        let rx = WebhookReceiver::new(GitHub::new(GH_SECRET).unwrap(), q.clone()).on_event(
            move |e: &Event<'_>| {
                if let Event::WebhookReceived {
                    outcome, status, ..
                } = e
                {
                    o2.lock().unwrap().push((*outcome, status.as_u16()));
                }
            },
        );
        let addr = serve(Router::new().route("/hook", post_service(rx))).await;
        let mut sock = TcpStream::connect(addr).await.unwrap();
        sock.write_all(&raw_head(&[("x-hub-signature-256", GH_SIG.to_owned())], 13))
            .await
            .unwrap();
        sock.write_all(b"Hello, World!").await.unwrap();
        // The push has started and waits: no answer yet.
        for _ in 0..200 {
            if q.started.load(Ordering::SeqCst) > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(q.started.load(Ordering::SeqCst), 1);
        let mut buf = [0u8; 64];
        let early = tokio::time::timeout(Duration::from_millis(100), sock.read(&mut buf)).await;
        assert!(
            early.is_err(),
            "answered before the write finished: {early:?}"
        );
        q.gate.add_permits(1);
        let ans = read_answer(&mut sock).await;
        if fail {
            assert!(
                ans.starts_with("HTTP/1.1 5"),
                "a failed write is no 2xx: {ans}"
            );
            assert!(
                !ans.contains("disk full"),
                "the reason stays in the logs: {ans}"
            );
            assert!(events.try_recv().is_none());
        } else {
            assert!(ans.starts_with("HTTP/1.1 200"), "{ans}");
            assert!(events.try_recv().is_some());
        }
        let o = outcomes.lock().unwrap().clone();
        assert_eq!(o.len(), 1, "{o:?}");
        if fail {
            assert!(o[0].1 >= 500, "{o:?}");
        } else {
            assert_eq!(o[0], (WebhookOutcome::Accepted, 200));
        }
    }
}

#[tokio::test]
async fn s53_a_sender_that_disconnects_mid_write_loses_nothing_and_gets_nothing_twice() {
    let (q, mut events) = slow(false);
    let rx = WebhookReceiver::new(GitHub::new(GH_SECRET).unwrap(), q.clone());
    let addr = serve(Router::new().route("/hook", post_service(rx))).await;
    {
        let mut sock = TcpStream::connect(addr).await.unwrap();
        sock.write_all(&raw_head(&[("x-hub-signature-256", GH_SIG.to_owned())], 13))
            .await
            .unwrap();
        sock.write_all(b"Hello, World!").await.unwrap();
        for _ in 0..200 {
            if q.started.load(Ordering::SeqCst) > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(q.started.load(Ordering::SeqCst), 1);
    } // the sender goes away, no answer read
    tokio::time::sleep(Duration::from_millis(50)).await;
    q.gate.add_permits(10);
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The sender redelivers: 200 either way, and the event is in the queue exactly once.
    let mut sock = TcpStream::connect(addr).await.unwrap();
    sock.write_all(&raw_head(&[("x-hub-signature-256", GH_SIG.to_owned())], 13))
        .await
        .unwrap();
    sock.write_all(b"Hello, World!").await.unwrap();
    let ans = read_answer(&mut sock).await;
    assert!(ans.starts_with("HTTP/1.1 200"), "{ans}");
    let mut n = 0;
    while events.try_recv().is_some() {
        n += 1;
    }
    assert_eq!(n, 1, "queued exactly once");
}

#[tokio::test]
async fn s53_a_full_queue_answers_503_with_retry_after_and_the_redelivery_is_taken() {
    let (q, mut events) = MemoryQueue::new(0); // 0 is taken as 1
    let outcomes: Arc<Mutex<Vec<WebhookOutcome>>> = Arc::default();
    let o2 = outcomes.clone();
    let rx =
        WebhookReceiver::new(GitHub::new(GH_SECRET).unwrap(), q).on_event(move |e: &Event<'_>| {
            if let Event::WebhookReceived { outcome, .. } = e {
                o2.lock().unwrap().push(*outcome);
            }
        });
    let sig_a = sign_github(GH_SECRET, b"a");
    let sig_b = sign_github(GH_SECRET, b"b");
    assert_eq!(
        send(&rx, &[("x-hub-signature-256", sig_a.as_bytes())], "a")
            .await
            .0,
        200
    );
    let resp = rx
        .clone()
        .oneshot(
            Request::post("/hook")
                .header("x-hub-signature-256", sig_b.as_str())
                .body(Body::from("b"))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(resp.headers().contains_key("retry-after"));
    assert_eq!(events.try_recv().unwrap().body, "a");
    // The id was not remembered: the redelivery is accepted.
    assert_eq!(
        send(&rx, &[("x-hub-signature-256", sig_b.as_bytes())], "b")
            .await
            .0,
        200
    );
    assert_eq!(events.try_recv().unwrap().body, "b");
    assert_eq!(
        send(&rx, &[("x-hub-signature-256", sig_b.as_bytes())], "b")
            .await
            .0,
        200
    );
    let bad = send(&rx, &[("x-hub-signature-256", sig_a.as_bytes())], "b").await;
    assert_eq!(bad.0, 401);
    assert_eq!(
        *outcomes.lock().unwrap(),
        [
            WebhookOutcome::Accepted,
            WebhookOutcome::QueueFull,
            WebhookOutcome::Accepted,
            WebhookOutcome::Duplicate,
            WebhookOutcome::Rejected
        ]
    );
}

#[tokio::test]
async fn s53_two_routes_sharing_a_queue_keep_their_id_spaces() {
    let (q, mut events) = MemoryQueue::new(10);
    let a = WebhookReceiver::new(GitHub::new(GH_SECRET).unwrap(), q.clone()).with_route("a");
    let b = WebhookReceiver::new(GitHub::new(GH_SECRET).unwrap(), q).with_route("b");
    for rx in [&a, &b, &a] {
        assert_eq!(
            send(
                rx,
                &[("x-hub-signature-256", GH_SIG.as_bytes())],
                "Hello, World!"
            )
            .await
            .0,
            200
        );
    }
    assert_eq!(events.try_recv().unwrap().route, "a");
    assert_eq!(events.try_recv().unwrap().route, "b");
    assert!(events.try_recv().is_none());
}

#[tokio::test]
async fn s53_generic_hmac_with_a_timestamp_and_base64() {
    use sturdy::webhook::Encoding;
    // Sign `ts.body` by using GitHub's signer on the same content: GitHub signs the body with
    // the secret's bytes, hex; a generic scheme with no prefix, hex, over `ts.body` is the same
    // MAC over that content.
    let now = 1_700_000_000i64;
    let (q, mut events) = MemoryQueue::new(10);
    let v = GenericHmac::new("acme", HeaderName::from_static("x-acme-sig"), "acme-key")
        .unwrap()
        .with_timestamp_header(HeaderName::from_static("x-acme-ts"))
        .with_event_header(HeaderName::from_static("x-acme-event"));
    let rx = WebhookReceiver::new(v, q).with_clock(Arc::new(Fixed(at(now))));
    let content = format!("{now}.{{}}");
    let hex = sign_github("acme-key", content.as_bytes()).replace("sha256=", "");
    let ts = now.to_string();
    let (st, _) = send(
        &rx,
        &[
            ("x-acme-sig", hex.as_bytes()),
            ("x-acme-ts", ts.as_bytes()),
            ("x-acme-event", b"created"),
        ],
        "{}",
    )
    .await;
    assert_eq!(st, 200);
    let e = events.try_recv().unwrap();
    assert_eq!((e.scheme.as_str(), e.route.as_str()), ("acme", "acme"));
    assert_eq!(e.timestamp, Some(now));
    assert!(e.id.starts_with("sha256:"));
    assert_eq!(e.headers["x-acme-event"], "created");
    assert_eq!(e.headers["x-acme-ts"], ts.as_str());
    // Stale: 401.
    let old = (now - 301).to_string();
    let content = format!("{old}.{{}}");
    let hex = sign_github("acme-key", content.as_bytes()).replace("sha256=", "");
    let (st, _) = send(
        &rx,
        &[
            ("x-acme-sig", hex.as_bytes()),
            ("x-acme-ts", old.as_bytes()),
        ],
        "{}",
    )
    .await;
    assert_eq!(st, 401);
    // Base64 encoding, prefix.
    let (q, mut events) = MemoryQueue::new(10);
    let v = GenericHmac::new("b64", HeaderName::from_static("x-sig"), GH_SECRET)
        .unwrap()
        .with_prefix("sha256=")
        .with_encoding(Encoding::Base64);
    let rx = WebhookReceiver::new(v, q);
    // GH-1 in base64: 757107ea... as bytes.
    let raw: Vec<u8> = (0..32)
        .map(|i| u8::from_str_radix(&GH_SIG[7 + 2 * i..9 + 2 * i], 16).unwrap())
        .collect();
    let b64 = crate::logs13_common::b64(&raw);
    let sig = format!("sha256={b64}");
    assert_eq!(
        send(&rx, &[("x-sig", sig.as_bytes())], "Hello, World!")
            .await
            .0,
        200
    );
    assert!(events.try_recv().is_some());
}

// ---------------------------------------------------------------------------------------------
// Replays dressed up with a fresh timestamp.

#[tokio::test]
async fn s53_stripe_a_second_t_cannot_refresh_a_stale_signature() {
    let now = 1_700_000_000;
    let old = now - 3_600;
    let body = "{\"id\":\"evt_replay\"}";
    let captured = sign_stripe(STRIPE_SECRET, old, body.as_bytes());
    let v1 = &captured[captured.find("v1=").unwrap()..];
    for h in [
        format!("t={now},t={old},{v1}"),
        format!("t={old},t={now},{v1}"),
        format!("t={now},{v1},t={old}"),
        format!("{v1},t={now},t={old}"),
    ] {
        let (rx, mut events) = stripe_receiver(now);
        let (st, _) = send(&rx, &[("stripe-signature", h.as_bytes())], body).await;
        assert_ne!(st, 200, "a stale delivery replayed with {h}");
        assert!(events.try_recv().is_none());
    }
    // Two header lines: a fresh one without a signature, the captured one.
    let (rx, mut events) = stripe_receiver(now);
    let fresh = format!("t={now}");
    let (st, _) = send(
        &rx,
        &[
            ("stripe-signature", fresh.as_bytes()),
            ("stripe-signature", captured.as_bytes()),
        ],
        body,
    )
    .await;
    assert_ne!(st, 200);
    assert!(events.try_recv().is_none());
}

#[tokio::test]
async fn s53_standard_a_second_timestamp_line_cannot_refresh_a_stale_signature() {
    let now = 1_700_000_000i64;
    let old = now - 3_600;
    let sig = sign_standard(SW_SECRET, "msg_replay", old, b"{}").unwrap();
    let (o, n) = (old.to_string(), now.to_string());
    for lines in [[&n, &o], [&o, &n]] {
        let (q, mut events) = MemoryQueue::new(10);
        let rx = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), q)
            .with_clock(Arc::new(Fixed(at(now))));
        let (st, _) = send(
            &rx,
            &[
                ("webhook-id", b"msg_replay"),
                ("webhook-timestamp", lines[0].as_bytes()),
                ("webhook-timestamp", lines[1].as_bytes()),
                ("webhook-signature", sig.as_bytes()),
            ],
            "{}",
        )
        .await;
        assert_ne!(st, 200, "timestamps {lines:?}");
        assert!(events.try_recv().is_none());
    }
    // Two webhook-id lines: the one deduplicated on must be the one signed.
    let (q, mut events) = MemoryQueue::new(10);
    let rx = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), q)
        .with_clock(Arc::new(Fixed(at(now))));
    let sig = sign_standard(SW_SECRET, "msg_a", now, b"{}").unwrap();
    let (st, _) = send(
        &rx,
        &[
            ("webhook-id", b"msg_a"),
            ("webhook-id", b"msg_b"),
            ("webhook-timestamp", n.as_bytes()),
            ("webhook-signature", sig.as_bytes()),
        ],
        "{}",
    )
    .await;
    if st == 200 {
        assert_eq!(
            events.try_recv().unwrap().id,
            "msg_a",
            "dedup on the signed id"
        );
    }
    let (st, _) = send(
        &rx,
        &[
            ("webhook-id", b"msg_b"),
            ("webhook-id", b"msg_a"),
            ("webhook-timestamp", n.as_bytes()),
            ("webhook-signature", sig.as_bytes()),
        ],
        "{}",
    )
    .await;
    if st == 200 {
        let e = events.try_recv();
        assert!(
            e.is_none() || e.unwrap().id == "msg_a",
            "dedup on the signed id"
        );
    }
}

#[tokio::test]
async fn s53_tolerance_turned_off_accepts_any_age_without_panic() {
    for ts in [i64::MIN, -1, 0, 1, i64::MAX] {
        for clock in [at(0), at(1_700_000_000), at(253_402_300_799)] {
            let (q, mut events) = MemoryQueue::new(10);
            let rx = WebhookReceiver::new(
                StandardWebhooks::new(SW_SECRET)
                    .unwrap()
                    .with_tolerance(Duration::MAX),
                q,
            )
            .with_clock(Arc::new(Fixed(clock)));
            let sig = sign_standard(SW_SECRET, "msg_any", ts, b"{}").unwrap();
            let t = ts.to_string();
            let h = sw_headers("msg_any", &t, &sig);
            assert_eq!(send(&rx, &h, "{}").await.0, 200, "ts {ts}");
            assert_eq!(events.try_recv().unwrap().timestamp, Some(ts));
            assert_eq!(send(&rx, &h, "{}").await.0, 200);
            assert!(
                events.try_recv().is_none(),
                "ts {ts}: a copy at any age is a duplicate"
            );
            let (q, _e) = MemoryQueue::new(10);
            let st = WebhookReceiver::new(
                Stripe::new(STRIPE_SECRET)
                    .unwrap()
                    .with_tolerance(Duration::MAX),
                q,
            )
            .with_clock(Arc::new(Fixed(clock)));
            let s = sign_stripe(STRIPE_SECRET, ts, b"{}");
            assert_eq!(
                send(&st, &[("stripe-signature", s.as_bytes())], "{}")
                    .await
                    .0,
                200
            );
        }
    }
}
