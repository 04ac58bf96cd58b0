//! Outside tests of the webhook receiver against docs/guides/webhooks.md and the crate docs:
//! hostile signature headers, timestamps, ids, bodies, dedup and the source allowlist.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::ConnectInfo;
use http::{Request, StatusCode};
use sturdy::core::WallClock;
use sturdy::webhook::{
    sign_github, sign_standard, sign_stripe, GenericHmac, GitHub, MemoryQueue, MemoryReceiver,
    SourceAllowlist, StandardWebhooks, Stripe, WebhookReceiver,
};
use tower::ServiceExt;

const NOW: i64 = 1_700_000_000;
const WHSEC: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

#[derive(Debug)]
struct Fixed(i64);
impl WallClock for Fixed {
    fn now(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.0 as u64)
    }
}

fn stripe_rx() -> (WebhookReceiver<MemoryQueue>, MemoryReceiver) {
    let (q, events) = MemoryQueue::new(100);
    (
        WebhookReceiver::new(Stripe::new("sk_test").unwrap(), q).with_clock(Arc::new(Fixed(NOW))),
        events,
    )
}

fn std_rx() -> (WebhookReceiver<MemoryQueue>, MemoryReceiver) {
    let (q, events) = MemoryQueue::new(100);
    (
        WebhookReceiver::new(StandardWebhooks::new(WHSEC).unwrap(), q)
            .with_clock(Arc::new(Fixed(NOW))),
        events,
    )
}

async fn send(
    rx: &WebhookReceiver<MemoryQueue>,
    headers: &[(&str, &str)],
    body: impl Into<Body>,
) -> StatusCode {
    let mut b = Request::post("/hook");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    rx.clone()
        .oneshot(b.body(body.into()).unwrap())
        .await
        .unwrap()
        .status()
}

#[tokio::test]
async fn stripe_accepts_a_valid_delivery_and_dedups_it() {
    let (rx, mut events) = stripe_rx();
    let body = r#"{"id":"evt_1","type":"x"}"#;
    let sig = sign_stripe("sk_test", NOW, body.as_bytes());
    assert_eq!(send(&rx, &[("stripe-signature", &sig)], body).await, 200);
    assert_eq!(send(&rx, &[("stripe-signature", &sig)], body).await, 200);
    let e = events.try_recv().unwrap();
    assert_eq!(e.id, "evt_1");
    assert!(events.try_recv().is_none(), "a duplicate was queued");
}

/// A replay two days later: the attacker prepends a fresh `t=` to a captured header. Only the
/// signed timestamp may be checked for freshness.
#[tokio::test]
async fn stripe_replay_with_a_fresh_t_prepended_is_refused() {
    let (rx, mut events) = stripe_rx();
    let body = r#"{"id":"evt_old","type":"x"}"#;
    let old = NOW - 2 * 86_400;
    let sig = sign_stripe("sk_test", old, body.as_bytes());
    let v1 = sig.split(',').find(|p| p.starts_with("v1=")).unwrap();
    for forged in [
        format!("t={NOW},{sig}"),
        format!("{sig},t={NOW}"),
        format!("t={NOW},{v1},t={old}"),
        format!("t={old},t={NOW},{v1}"),
        format!("t={NOW},{v1}"),
    ] {
        let status = send(&rx, &[("stripe-signature", &forged)], body).await;
        assert_ne!(status, StatusCode::OK, "replayed with {forged}");
    }
    assert!(events.try_recv().is_none());
}

#[tokio::test]
async fn stripe_hostile_headers() {
    let (rx, mut events) = stripe_rx();
    let body = r#"{"id":"evt_2"}"#;
    let good = sign_stripe("sk_test", NOW, body.as_bytes());
    let v1 = good
        .split(',')
        .find(|p| p.starts_with("v1="))
        .unwrap()
        .to_owned();
    let many = std::iter::repeat_n("v1=00", 10_000)
        .collect::<Vec<_>>()
        .join(",");
    let cases: Vec<(String, &str)> = vec![
        ("".into(), "empty"),
        ("t=".into(), "empty t"),
        (format!("t=99999999999999999999,{v1}"), "huge t"),
        (format!("t=-1,{v1}"), "negative t"),
        (format!("t=+{NOW},{v1}"), "plus t"),
        (format!("t={NOW}"), "no v1"),
        (format!("t={NOW},v1="), "empty v1"),
        (format!("t={NOW},v1=zz"), "non-hex v1"),
        (format!("t={NOW},v0={}", &v1[3..]), "v0 only"),
        (format!("t={NOW},{many}"), "10,000 entries"),
        (
            format!("t={NOW},{many},{v1}"),
            "the good entry after 10,000",
        ),
        (",,,,,,=,=,=".into(), "commas"),
        (format!("t={NOW},{}", v1.to_uppercase()), "uppercase hex"),
    ];
    for (h, what) in cases {
        let status = send(&rx, &[("stripe-signature", &h)], body).await;
        assert!(status == 400 || status == 401, "{what}: {status}");
    }
    assert!(events.try_recv().is_none());
    // Exactly at the tolerance edges.
    for (t, ok) in [
        (NOW - 300, true),
        (NOW + 300, true),
        (NOW - 301, false),
        (NOW + 301, false),
    ] {
        let (rx, _ev) = stripe_rx();
        let body = format!(r#"{{"id":"evt_{t}"}}"#);
        let sig = sign_stripe("sk_test", t, body.as_bytes());
        let status = send(&rx, &[("stripe-signature", &sig)], body).await;
        assert_eq!(status == 200, ok, "t = now {:+}: {status}", t - NOW);
    }
}

#[tokio::test]
async fn standard_webhooks_hostile() {
    let body = r#"{"type":"x"}"#;
    let (rx, mut events) = std_rx();
    let ts = NOW.to_string();
    let good = sign_standard(WHSEC, "msg_1", NOW, body.as_bytes()).unwrap();
    assert_eq!(
        send(
            &rx,
            &[
                ("webhook-id", "msg_1"),
                ("webhook-timestamp", &ts),
                ("webhook-signature", &good)
            ],
            body
        )
        .await,
        200
    );
    assert_eq!(events.try_recv().unwrap().id, "msg_1");
    let long_id = "a".repeat(257);
    let long_sig = sign_standard(WHSEC, &long_id, NOW, body.as_bytes()).unwrap();
    assert_eq!(
        send(
            &rx,
            &[
                ("webhook-id", &long_id),
                ("webhook-timestamp", &ts),
                ("webhook-signature", &long_sig)
            ],
            body
        )
        .await,
        400
    );
    let id256 = "b".repeat(256);
    let sig256 = sign_standard(WHSEC, &id256, NOW, body.as_bytes()).unwrap();
    assert_eq!(
        send(
            &rx,
            &[
                ("webhook-id", &id256),
                ("webhook-timestamp", &ts),
                ("webhook-signature", &sig256)
            ],
            body
        )
        .await,
        200
    );
    for (t, what) in [
        ("99999999999999999999", "huge"),
        ("-1", "negative"),
        ("", "empty"),
        ("1.7e9", "float"),
        (" 1700000000", "space"),
        ("0x10", "hex"),
    ] {
        let status = send(
            &rx,
            &[
                ("webhook-id", "msg_2"),
                ("webhook-timestamp", t),
                ("webhook-signature", &good),
            ],
            body,
        )
        .await;
        assert!(status == 400 || status == 401, "timestamp {what}: {status}");
    }
    for s in [
        "",
        "v1,",
        "v1,!!!!",
        "v2,abcd",
        "v1",
        "v1a,abcd",
        &"v1,AAAA ".repeat(5000),
    ] {
        let status = send(
            &rx,
            &[
                ("webhook-id", "msg_3"),
                ("webhook-timestamp", &ts),
                ("webhook-signature", s),
            ],
            body,
        )
        .await;
        assert!(
            status == 400 || status == 401,
            "signature {:?}: {status}",
            &s[..s.len().min(20)]
        );
    }
    // The same id, another (validly signed) body: a duplicate, not queued again.
    let other = r#"{"type":"y"}"#;
    let sig = sign_standard(WHSEC, "msg_1", NOW, other.as_bytes()).unwrap();
    assert_eq!(
        send(
            &rx,
            &[
                ("webhook-id", "msg_1"),
                ("webhook-timestamp", &ts),
                ("webhook-signature", &sig)
            ],
            other
        )
        .await,
        200
    );
    assert_eq!(events.try_recv().map(|e| e.id), Some("b".repeat(256)));
    assert!(events.try_recv().is_none());
}

#[tokio::test]
async fn github_hostile_and_dedup() {
    let (q, mut events) = MemoryQueue::new(100);
    let rx = WebhookReceiver::new(GitHub::new("s3cret").unwrap(), q);
    let body = r#"{"zen":"ok"}"#;
    let sig = sign_github("s3cret", body.as_bytes());
    assert_eq!(
        send(
            &rx,
            &[("x-hub-signature-256", &sig), ("x-github-delivery", "d1")],
            body
        )
        .await,
        200
    );
    assert_eq!(
        send(
            &rx,
            &[("x-hub-signature-256", &sig), ("x-github-delivery", "d2")],
            body
        )
        .await,
        200
    );
    events.try_recv().unwrap();
    assert!(
        events.try_recv().is_none(),
        "a copy under a new delivery id was queued"
    );
    for s in [
        "",
        "sha256=",
        "sha256=zz",
        "sha1=abc",
        &sig.to_uppercase(),
        &format!("{sig}00"),
        &sig[..sig.len() - 2],
    ] {
        let status = send(&rx, &[("x-hub-signature-256", s)], body).await;
        assert!(status == 400 || status == 401, "{s:?}: {status}");
    }
    let status = send(&rx, &[], body).await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn body_limit_and_lying_content_length() {
    let (q, _events) = MemoryQueue::new(100);
    let rx = WebhookReceiver::new(GitHub::new("s3cret").unwrap(), q).with_body_limit(1024);
    let big = "x".repeat(2048);
    let sig = sign_github("s3cret", big.as_bytes());
    assert_eq!(
        send(&rx, &[("x-hub-signature-256", &sig)], big.clone()).await,
        413
    );
    assert_eq!(
        send(
            &rx,
            &[("x-hub-signature-256", &sig), ("content-length", "10")],
            big.clone()
        )
        .await,
        413
    );
    assert_eq!(
        send(
            &rx,
            &[
                ("x-hub-signature-256", &sig),
                ("content-length", "99999999999999999999")
            ],
            "x"
        )
        .await
        .as_u16()
            / 100,
        4
    );
}

#[tokio::test]
async fn full_queue_answers_503_and_the_redelivery_is_accepted() {
    let (q, mut events) = MemoryQueue::new(1);
    let rx = WebhookReceiver::new(GitHub::new("s3cret").unwrap(), q);
    let a = r#"{"n":1}"#;
    let b = r#"{"n":2}"#;
    assert_eq!(
        send(
            &rx,
            &[("x-hub-signature-256", &sign_github("s3cret", a.as_bytes()))],
            a
        )
        .await,
        200
    );
    let mut req =
        Request::post("/hook").header("x-hub-signature-256", sign_github("s3cret", b.as_bytes()));
    req = req.header("x-github-event", "push");
    let res = rx
        .clone()
        .oneshot(req.body(Body::from(b)).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert!(res.headers().contains_key("retry-after"));
    events.try_recv().unwrap();
    assert_eq!(
        send(
            &rx,
            &[("x-hub-signature-256", &sign_github("s3cret", b.as_bytes()))],
            b
        )
        .await,
        200
    );
    assert!(events.try_recv().is_some());
}

#[tokio::test]
async fn empty_and_bad_secrets_are_refused() {
    assert!(Stripe::new("").is_err());
    assert!(GitHub::new("").is_err());
    assert!(StandardWebhooks::new("").is_err());
    assert!(StandardWebhooks::new("whsec_").is_err());
    assert!(StandardWebhooks::new("whsec_!!!notbase64").is_err());
    assert!(GenericHmac::new("x", http::header::HeaderName::from_static("x-sig"), "").is_err());
    assert!(Stripe::with_secrets(["a", ""]).is_err());
    assert!(
        Stripe::with_secrets(std::iter::empty::<&str>()).is_err(),
        "no secret at all must be refused"
    );
    assert!(
        GitHub::with_secrets(std::iter::empty::<&str>()).is_err(),
        "no secret at all must be refused"
    );
    let s = Stripe::new("sk_hidden_value").unwrap();
    assert!(!format!("{s:?}").contains("sk_hidden_value"));
}

fn with_peer(mut req: Request<Body>, peer: &str) -> Request<Body> {
    let addr: SocketAddr = peer.parse().unwrap();
    req.extensions_mut().insert(ConnectInfo(addr));
    req
}

#[tokio::test]
async fn source_allowlist_and_forwarded_for() {
    let list = SourceAllowlist::new(["192.30.252.0/22"])
        .unwrap()
        .with_trusted_proxies(["10.0.0.0/8"])
        .unwrap();
    let (q, _events) = MemoryQueue::new(100);
    let rx = WebhookReceiver::new(GitHub::new("s3cret").unwrap(), q).with_source_allowlist(list);
    let body = r#"{"a":1}"#;
    let sig = sign_github("s3cret", body.as_bytes());
    let mk = |xff: Option<&str>, peer: &str| {
        let mut b = Request::post("/hook").header("x-hub-signature-256", sig.clone());
        if let Some(x) = xff {
            b = b.header("x-forwarded-for", x);
        }
        with_peer(b.body(Body::from(body)).unwrap(), peer)
    };
    let st = |r| {
        let rx = rx.clone();
        async move { rx.oneshot(r).await.unwrap().status().as_u16() }
    };
    assert_eq!(st(mk(None, "192.30.252.1:4000")).await, 200);
    assert_eq!(st(mk(None, "[::ffff:192.30.252.2]:4000")).await, 200);
    assert_eq!(st(mk(None, "8.8.8.8:4000")).await, 403);
    assert_eq!(
        st(mk(Some("192.30.252.1"), "8.8.8.8:4000")).await,
        403,
        "XFF from an untrusted peer"
    );
    assert_eq!(st(mk(Some("192.30.252.3"), "10.1.1.1:4000")).await, 200);
    assert_eq!(
        st(mk(Some("192.30.252.3, 8.8.8.8"), "10.1.1.1:4000")).await,
        403
    );
    assert_eq!(
        st(mk(Some("8.8.8.8, 192.30.252.3"), "10.1.1.1:4000")).await,
        200
    );
    assert_eq!(st(mk(Some("unknown"), "10.1.1.1:4000")).await, 403);
    let hops = std::iter::repeat_n("10.0.0.1", 40)
        .collect::<Vec<_>>()
        .join(",");
    assert_eq!(
        st(mk(Some(&format!("192.30.252.3,{hops}")), "10.1.1.1:4000")).await,
        403
    );
    let many = std::iter::repeat_n("192.30.252.3", 100_000)
        .collect::<Vec<_>>()
        .join(",");
    assert_eq!(st(mk(Some(&many), "10.1.1.1:4000")).await, 200);
    for odd in [
        "192.30.252.3:443",
        "[192.30.252.3]",
        " 192.30.252.3 ",
        "192.030.252.003",
    ] {
        let s = st(mk(Some(odd), "10.1.1.1:4000")).await;
        eprintln!("XFF {odd:?} -> {s}");
    }
    // No ConnectInfo at all: fail closed.
    let req = Request::post("/hook")
        .header("x-hub-signature-256", sig.clone())
        .body(Body::from(body))
        .unwrap();
    assert_eq!(rx.clone().oneshot(req).await.unwrap().status(), 403);
    assert!(SourceAllowlist::new(["10.0.0.1/8"]).is_err());
    assert!(SourceAllowlist::new(Vec::<&str>::new()).is_err());
    assert!(SourceAllowlist::new(["10.0.0.0/33"]).is_err());
    assert!(SourceAllowlist::new(["::/129"]).is_err());
}

/// A body that never arrives: a delivery without a fresh, well-formed signature header is
/// answered without reading it ("A delivery without well-formed, fresh signature headers costs
/// no body read").
#[tokio::test]
async fn bad_headers_are_answered_without_reading_the_body() {
    struct Never;
    impl http_body::Body for Never {
        type Data = bytes::Bytes;
        type Error = std::io::Error;
        fn poll_frame(
            self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
            std::task::Poll::Pending
        }
    }
    let (rx, _events) = stripe_rx();
    for h in ["", "t=1,v1=00", &format!("t={NOW}")] {
        let mut b = Request::post("/hook");
        if !h.is_empty() {
            b = b.header("stripe-signature", h);
        }
        let r = tokio::time::timeout(
            Duration::from_secs(2),
            rx.clone().oneshot(b.body(Never).unwrap()),
        )
        .await;
        let status = r
            .unwrap_or_else(|_| panic!("{h:?}: the receiver waited for the body"))
            .unwrap()
            .status();
        assert!(status == 400 || status == 401, "{h:?}: {status}");
    }
}

#[tokio::test]
async fn generic_hmac_with_timestamp() {
    use http::header::HeaderName;
    use sturdy::webhook::Encoding;
    let (q, mut events) = MemoryQueue::new(10);
    let v = GenericHmac::new(
        "acme",
        HeaderName::from_static("x-acme-signature"),
        "sekret",
    )
    .unwrap()
    .with_prefix("sha256=")
    .with_encoding(Encoding::Hex)
    .with_timestamp_header(HeaderName::from_static("x-acme-timestamp"))
    .with_event_header(HeaderName::from_static("x-acme-event"));
    let rx = WebhookReceiver::new(v, q).with_clock(Arc::new(Fixed(NOW)));
    // HMAC-SHA256("sekret", "<ts>.<body>") computed with the Stripe helper's MAC (same construction).
    let body = r#"{"a":1}"#;
    let stripe = sign_stripe("sekret", NOW, body.as_bytes());
    let hex = stripe
        .split(',')
        .find_map(|p| p.strip_prefix("v1="))
        .unwrap()
        .to_owned();
    let sig = format!("sha256={hex}");
    let ts = NOW.to_string();
    let st = send(
        &rx,
        &[
            ("x-acme-signature", &sig),
            ("x-acme-timestamp", &ts),
            ("x-acme-event", "paid"),
        ],
        body,
    )
    .await;
    assert_eq!(st, 200);
    let e = events.try_recv().unwrap();
    assert_eq!(e.route, "acme");
    assert_eq!(e.timestamp, Some(NOW));
    assert_eq!(e.headers["x-acme-event"], "paid");
    // Replayed: a duplicate.
    assert_eq!(
        send(
            &rx,
            &[("x-acme-signature", &sig), ("x-acme-timestamp", &ts)],
            body
        )
        .await,
        200
    );
    assert!(events.try_recv().is_none());
    // The timestamp moved without re-signing: refused.
    let ts2 = (NOW + 1).to_string();
    let st = send(
        &rx,
        &[("x-acme-signature", &sig), ("x-acme-timestamp", &ts2)],
        body,
    )
    .await;
    assert_eq!(st, 401);
    // An event header value over 1 KiB is not carried as is.
    let long = "e".repeat(2000);
    let body2 = r#"{"a":2}"#;
    let s2 = sign_stripe("sekret", NOW, body2.as_bytes());
    let sig2 = format!(
        "sha256={}",
        s2.split(',').find_map(|p| p.strip_prefix("v1=")).unwrap()
    );
    let st = send(
        &rx,
        &[
            ("x-acme-signature", &sig2),
            ("x-acme-timestamp", &ts),
            ("x-acme-event", &long),
        ],
        body2,
    )
    .await;
    eprintln!("long event header: {st}");
    if st == 200 {
        let e = events.try_recv().unwrap();
        assert!(
            e.headers
                .get("x-acme-event")
                .is_none_or(|v| v.len() <= 1024),
            "a 2,000-byte header value was carried"
        );
    }
}
