//! docs/guides/webhooks.md and sturdy-webhook's rustdoc, read literally: id and timestamp
//! bounds, the 16-entry signature bound, a full queue, deduplication per scheme, carried
//! headers, empty secrets, generic rejection texts, a delivery dropped mid-body, a body that
//! trickles in past the tolerance, and the source allowlist. In process, with a settable clock.
#![cfg(feature = "full")]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::ConnectInfo;
use bytes::Bytes;
use http::{HeaderName, Request};
use http_body_util::{BodyExt, Full};
use sturdy::core::WallClock;
use sturdy::webhook::{
    sign_github, sign_standard, sign_stripe, GenericHmac, GitHub, MemoryQueue, SourceAllowlist,
    StandardWebhooks, Stripe, WebhookReceiver,
};
use tower::{Service, ServiceExt};

const WHSEC: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const T0: i64 = 1_800_000_000;

#[derive(Debug)]
struct Clock(Mutex<SystemTime>);
impl WallClock for Clock {
    fn now(&self) -> SystemTime {
        *self.0.lock().unwrap()
    }
}
fn clock(secs: i64) -> Arc<Clock> {
    Arc::new(Clock(Mutex::new(
        UNIX_EPOCH + Duration::from_secs(secs as u64),
    )))
}

async fn text(res: http::Response<Full<Bytes>>) -> (u16, String, http::HeaderMap) {
    let status = res.status().as_u16();
    let h = res.headers().clone();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned(), h)
}

fn standard(id: &str, ts: &str, sig: &str, body: &'static str) -> Request<Body> {
    Request::post("/hooks")
        .header("webhook-id", id)
        .header("webhook-timestamp", ts)
        .header("webhook-signature", sig)
        .body(Body::from(body))
        .unwrap()
}

/// "`webhook-id` (at most 256 bytes, else 400)".
#[tokio::test]
async fn standard_id_bound() {
    let (q, mut rx) = MemoryQueue::new(10);
    let r = WebhookReceiver::new(StandardWebhooks::new(WHSEC).unwrap(), q).with_clock(clock(T0));
    for (len, want) in [(256usize, 200u16), (257, 400)] {
        let id = "i".repeat(len);
        let sig = sign_standard(WHSEC, &id, T0, b"{}").unwrap();
        let (s, body, _) = text(
            r.clone()
                .oneshot(standard(&id, &T0.to_string(), &sig, "{}"))
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(s, want, "id of {len} bytes: {body}");
    }
    assert_eq!(rx.try_recv().unwrap().id.len(), 256);
    assert!(rx.try_recv().is_none());
}

/// "a signed timestamp within the tolerance [5 minutes, both directions]. 400 for missing or
/// malformed headers, 401 for a stale or future timestamp".
#[tokio::test]
async fn timestamp_bounds() {
    let (q, _rx) = MemoryQueue::new(100);
    let r = WebhookReceiver::new(StandardWebhooks::new(WHSEC).unwrap(), q).with_clock(clock(T0));
    let mut i = 0;
    for (ts, want) in [
        (T0 - 300, 200u16),
        (T0 + 300, 200),
        (T0 - 301, 401),
        (T0 + 301, 401),
        (0, 401),
        (i64::MAX / 2, 401),
    ] {
        i += 1;
        let id = format!("msg_{i}");
        let sig = sign_standard(WHSEC, &id, ts, b"{}").unwrap();
        let (s, body, _) = text(
            r.clone()
                .oneshot(standard(&id, &ts.to_string(), &sig, "{}"))
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(s, want, "timestamp {ts} ({}): {body}", ts - T0);
    }
    for bad in ["12a", "", " ", "1.5", "0x10"] {
        let sig = sign_standard(WHSEC, "msg_bad", T0, b"{}").unwrap();
        let (s, body, _) = text(
            r.clone()
                .oneshot(standard("msg_bad", bad, &sig, "{}"))
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(s, 400, "timestamp {bad:?}: {body}");
    }
    // Missing headers.
    let req = Request::post("/hooks").body(Body::from("{}")).unwrap();
    assert_eq!(text(r.clone().oneshot(req).await.unwrap()).await.0, 400);
}

/// "only the first `MAX_SIGNATURES` (16) `v1` entries of a Standard Webhooks or Stripe header
/// are considered; the rest are ignored", and a header of thousands of entries costs little.
#[tokio::test]
async fn sixteen_v1_entries() {
    let (q, _rx) = MemoryQueue::new(100);
    let r = WebhookReceiver::new(StandardWebhooks::new(WHSEC).unwrap(), q).with_clock(clock(T0));
    let fake = "v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    let mut n = 0;
    let mut send = |before: Vec<&'static str>| {
        n += 1;
        let id = format!("m{n}");
        let good = sign_standard(WHSEC, &id, T0, b"{}").unwrap();
        let mut sig = before.join(" ");
        sig.push(' ');
        sig.push_str(&good);
        r.clone()
            .oneshot(standard(&id, &T0.to_string(), sig.trim(), "{}"))
    };
    assert_eq!(text(send(vec![fake; 15]).await.unwrap()).await.0, 200);
    assert_eq!(text(send(vec![fake; 16]).await.unwrap()).await.0, 401);
    // Entries that are not `v1` are not among the 16.
    assert_eq!(
        text(send(vec!["v1a,AAAA"; 40]).await.unwrap()).await.0,
        200,
        "v1a entries counted against the v1 bound"
    );
    let t = tokio::time::Instant::now();
    let (s, _, _) = text(send(vec![fake; 8_000]).await.unwrap()).await;
    assert_eq!(s, 401);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}

/// "a full queue gets 503 with `Retry-After` and the id is not remembered, so the redelivery is
/// accepted"; "a duplicate gets 200 and is not queued again".
#[tokio::test]
async fn full_queue_and_duplicates() {
    let (q, mut rx) = MemoryQueue::new(1);
    let r = WebhookReceiver::new(StandardWebhooks::new(WHSEC).unwrap(), q).with_clock(clock(T0));
    let deliver = |id: &str| {
        let sig = sign_standard(WHSEC, id, T0, b"{}").unwrap();
        r.clone().oneshot(standard(id, &T0.to_string(), &sig, "{}"))
    };
    assert_eq!(text(deliver("a").await.unwrap()).await.0, 200);
    let (s, _, h) = text(deliver("b").await.unwrap()).await;
    assert_eq!(s, 503);
    assert!(h.contains_key("retry-after"));
    assert_eq!(rx.recv().await.unwrap().id, "a");
    assert_eq!(text(deliver("a").await.unwrap()).await.0, 200);
    assert!(rx.try_recv().is_none(), "a duplicate was queued again");
    assert_eq!(text(deliver("b").await.unwrap()).await.0, 200);
    assert_eq!(rx.try_recv().unwrap().id, "b");
}

/// Stripe: "deduplicated on the body's `id` (else `sha256:` of `t.body`)"; GitHub: "`sha256:`
/// of the body", whatever `X-GitHub-Delivery` says; "carried header values at most 1 KiB, 4 per
/// name".
#[tokio::test]
async fn dedup_ids_per_scheme_and_carried_headers() {
    let secret = "whsec_stripe_test";
    let (q, mut rx) = MemoryQueue::new(10);
    let stripe =
        WebhookReceiver::new(Stripe::new(secret).unwrap(), q.clone()).with_clock(clock(T0));
    let body = r#"{"id":"evt_1","type":"charge.succeeded"}"#;
    for t in [T0, T0 - 10] {
        let req = Request::post("/s")
            .header("stripe-signature", sign_stripe(secret, t, body.as_bytes()))
            .body(Body::from(body))
            .unwrap();
        assert_eq!(
            text(stripe.clone().oneshot(req).await.unwrap()).await.0,
            200
        );
    }
    let e = rx.try_recv().unwrap();
    assert_eq!(e.id, "evt_1");
    assert!(
        rx.try_recv().is_none(),
        "the same Stripe event id was queued twice"
    );
    // No id: each signed timestamp is another delivery.
    for t in [T0, T0 - 10] {
        let req = Request::post("/s")
            .header("stripe-signature", sign_stripe(secret, t, b"{}"))
            .body(Body::from("{}"))
            .unwrap();
        assert_eq!(
            text(stripe.clone().oneshot(req).await.unwrap()).await.0,
            200
        );
    }
    assert!(rx.try_recv().unwrap().id.starts_with("sha256:"));
    assert!(rx.try_recv().unwrap().id.starts_with("sha256:"));

    let gh = WebhookReceiver::new(GitHub::new("gh-secret").unwrap(), q);
    let long = "e".repeat(1025);
    for (delivery, event) in [("d-1", "push"), ("d-2", long.as_str())] {
        let mut b = Request::post("/g")
            .header(
                "x-hub-signature-256",
                sign_github("gh-secret", b"{\"a\":1}"),
            )
            .header("x-github-delivery", delivery);
        for _ in 0..6 {
            b = b.header("x-github-event", event);
        }
        let res = gh
            .clone()
            .oneshot(b.body(Body::from("{\"a\":1}")).unwrap())
            .await
            .unwrap();
        assert_eq!(text(res).await.0, 200);
    }
    let e = rx.try_recv().unwrap();
    assert!(e.id.starts_with("sha256:"), "{}", e.id);
    assert_eq!(e.headers.get_all("x-github-event").iter().count(), 4);
    assert_eq!(e.headers["x-github-delivery"], "d-1");
    assert!(
        rx.try_recv().is_none(),
        "a GitHub copy under a new delivery id was queued again"
    );
    // A value over 1 KiB is not carried.
    let req = Request::post("/g")
        .header(
            "x-hub-signature-256",
            sign_github("gh-secret", b"{\"a\":2}"),
        )
        .header("x-github-event", long.as_str())
        .body(Body::from("{\"a\":2}"))
        .unwrap();
    assert_eq!(text(gh.clone().oneshot(req).await.unwrap()).await.0, 200);
    assert!(rx
        .try_recv()
        .unwrap()
        .headers
        .get("x-github-event")
        .is_none());
}

/// "Empty secrets are refused when the verifier is built (`Stripe::new("")`, `GitHub::new("")`,
/// `GenericHmac::new(.., "")` and `StandardWebhooks::new("")` are errors)" — a secret that is
/// empty once decoded too, and an empty one among several.
#[test]
fn empty_secrets_refused() {
    let h = HeaderName::from_static("x-sig");
    assert!(Stripe::new("").is_err());
    assert!(GitHub::new("").is_err());
    assert!(GenericHmac::new("acme", h.clone(), "").is_err());
    assert!(StandardWebhooks::new("").is_err());
    assert!(StandardWebhooks::new("whsec_").is_err());
    for s in ["whsec_=", "whsec_==", "="] {
        assert!(StandardWebhooks::new(s).is_err(), "{s:?} is an empty key");
    }
    assert!(Stripe::with_secrets(["k", ""]).is_err());
    assert!(GitHub::with_secrets(["", "k"]).is_err());
    assert!(GenericHmac::with_secrets("acme", h, ["k", ""]).is_err());
    assert!(StandardWebhooks::with_secrets([WHSEC, ""]).is_err());
}

/// "No `Debug` output or log line shows a secret"; "Every rejection answers a short generic
/// text (`forbidden`, `invalid signature`, `payload too large`)".
#[tokio::test]
async fn debug_and_rejection_texts() {
    let (q, _rx) = MemoryQueue::new(10);
    let list = SourceAllowlist::new(["192.0.2.0/24"]).unwrap();
    let stripe_secret = "whsec_VERYSECRET_stripe";
    let r =
        WebhookReceiver::new(Stripe::new(stripe_secret).unwrap(), q.clone()).with_clock(clock(T0));
    let g = GitHub::with_secrets(["GH-SECRET-1", "GH-SECRET-2"]).unwrap();
    let gen = GenericHmac::new("acme", HeaderName::from_static("x-sig"), "ACME-SECRET").unwrap();
    let sw = StandardWebhooks::new(WHSEC).unwrap();
    for d in [
        format!("{r:?}"),
        format!("{g:?}"),
        format!("{gen:?}"),
        format!("{sw:?}"),
    ] {
        for s in [
            "VERYSECRET",
            "GH-SECRET",
            "ACME-SECRET",
            "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        ] {
            assert!(!d.contains(s), "{s} in {d}");
        }
    }
    let bad = Request::post("/s")
        .header("stripe-signature", sign_stripe("other", T0, b"{}"))
        .body(Body::from("{}"))
        .unwrap();
    let (s, body, _) = text(r.clone().oneshot(bad).await.unwrap()).await;
    assert_eq!((s, body.trim()), (401, "invalid signature"));
    let big = vec![b'x'; 64];
    let req = Request::post("/s")
        .header("stripe-signature", sign_stripe(stripe_secret, T0, &big))
        .body(Body::from(big.clone()))
        .unwrap();
    let (s, body, _) = text(r.clone().with_body_limit(32).oneshot(req).await.unwrap()).await;
    assert_eq!((s, body.trim()), (413, "payload too large"));
    let mut req = Request::post("/s")
        .header("stripe-signature", sign_stripe(stripe_secret, T0, b"{}"))
        .body(Body::from("{}"))
        .unwrap();
    req.extensions_mut()
        .insert(ConnectInfo(SocketAddr::from(([198, 51, 100, 1], 4000))));
    let (s, body, _) = text(
        r.clone()
            .with_source_allowlist(list)
            .oneshot(req)
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((s, body.trim()), (403, "forbidden"));
}

/// "200 only once the event is queued": a delivery whose future is dropped mid-body (its sender
/// timed out) is not queued and its id is not remembered, so the redelivery is accepted and
/// queued once.
#[tokio::test]
async fn dropped_mid_body_then_redelivered() {
    let (q, mut rx) = MemoryQueue::new(10);
    let mut r =
        WebhookReceiver::new(StandardWebhooks::new(WHSEC).unwrap(), q).with_clock(clock(T0));
    let sig = sign_standard(WHSEC, "msg_drop", T0, b"{\"n\":1}").unwrap();
    let (tx, body_rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
    tx.send(Ok(Bytes::from_static(b"{\"n\""))).await.unwrap();
    let stream = futures_util::stream::unfold(body_rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let req = Request::post("/hooks")
        .header("webhook-id", "msg_drop")
        .header("webhook-timestamp", T0.to_string())
        .header("webhook-signature", sig.clone())
        .body(Body::from_stream(stream))
        .unwrap();
    let fut = ServiceExt::<Request<Body>>::ready(&mut r)
        .await
        .unwrap()
        .call(req);
    assert!(tokio::time::timeout(Duration::from_millis(30), fut)
        .await
        .is_err());
    drop(tx);
    assert!(rx.try_recv().is_none());
    let res = ServiceExt::<Request<Body>>::ready(&mut r)
        .await
        .unwrap()
        .call(standard("msg_drop", &T0.to_string(), &sig, "{\"n\":1}"))
        .await
        .unwrap();
    assert_eq!(text(res).await.0, 200);
    assert_eq!(rx.try_recv().unwrap().id, "msg_drop");
    assert!(rx.try_recv().is_none());
}

/// "The timestamp is checked again once the body is in: a body that trickles in past the
/// tolerance gets 401 and is not queued."
#[tokio::test]
async fn trickled_body_past_tolerance() {
    let (q, mut rx) = MemoryQueue::new(10);
    let c = clock(T0);
    let r = WebhookReceiver::new(StandardWebhooks::new(WHSEC).unwrap(), q).with_clock(c.clone());
    let sig = sign_standard(WHSEC, "msg_slow", T0 - 200, b"{\"n\":1}").unwrap();
    let (tx, body_rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
    let stream = futures_util::stream::unfold(body_rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let req = Request::post("/hooks")
        .header("webhook-id", "msg_slow")
        .header("webhook-timestamp", (T0 - 200).to_string())
        .header("webhook-signature", sig)
        .body(Body::from_stream(stream))
        .unwrap();
    let call = tokio::spawn(r.oneshot(req));
    tx.send(Ok(Bytes::from_static(b"{\"n\""))).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    *c.0.lock().unwrap() = UNIX_EPOCH + Duration::from_secs((T0 + 200) as u64);
    tx.send(Ok(Bytes::from_static(b":1}"))).await.unwrap();
    drop(tx);
    let (s, _, _) = text(call.await.unwrap().unwrap()).await;
    assert_eq!(s, 401);
    assert!(rx.try_recv().is_none());
}

/// The allowlist: "host bits set past the prefix (`10.0.0.1/8`) or an empty list is an error";
/// "Without it [ConnectInfo] ... every delivery is refused with 403"; forwarded addresses are
/// read only from trusted proxies, from the right; "IPv4-mapped IPv6 peers ... match IPv4
/// networks".
#[tokio::test]
async fn source_allowlist_rules() {
    assert!(SourceAllowlist::new(["10.0.0.1/8"]).is_err());
    assert!(SourceAllowlist::new(Vec::<&str>::new()).is_err());
    assert!(SourceAllowlist::new(["10.0.0.0/33"]).is_err());
    assert!(SourceAllowlist::new(["not-a-net"]).is_err());
    assert!(SourceAllowlist::new(["192.0.2.0/24"])
        .unwrap()
        .with_trusted_proxies(["10.0.0.1/8"])
        .is_err());
    let list = SourceAllowlist::new(["192.0.2.0/24", "2001:db8::/32"])
        .unwrap()
        .with_trusted_proxies(["10.0.0.0/8"])
        .unwrap();
    let (q, mut rx) = MemoryQueue::new(100);
    let r = WebhookReceiver::new(GitHub::new("s").unwrap(), q).with_source_allowlist(list);
    let mut n = 0;
    let mut send = |peer: Option<&str>, xff: Option<&str>| {
        n += 1;
        let body = format!("{{\"n\":{n}}}");
        let mut b =
            Request::post("/g").header("x-hub-signature-256", sign_github("s", body.as_bytes()));
        if let Some(x) = xff {
            b = b.header("x-forwarded-for", x);
        }
        let mut req = b.body(Body::from(body)).unwrap();
        if let Some(p) = peer {
            let ip: std::net::IpAddr = p.parse().unwrap();
            req.extensions_mut()
                .insert(ConnectInfo(SocketAddr::new(ip, 1234)));
        }
        r.clone().oneshot(req)
    };
    let cases: [(Option<&str>, Option<&str>, u16); 9] = [
        (None, None, 403),
        (None, Some("192.0.2.5"), 403),
        (Some("192.0.2.5"), None, 200),
        (Some("::ffff:192.0.2.5"), None, 200),
        (Some("2001:db8::1"), None, 200),
        (Some("198.51.100.1"), Some("192.0.2.5"), 403),
        (Some("10.1.1.1"), Some("192.0.2.5"), 200),
        (Some("10.1.1.1"), Some("192.0.2.5, 198.51.100.7"), 403),
        (
            Some("10.1.1.1"),
            Some("198.51.100.7, 192.0.2.5, 10.2.2.2"),
            200,
        ),
    ];
    let mut queued = 0;
    for (peer, xff, want) in cases {
        let (s, _, _) = text(send(peer, xff).await.unwrap()).await;
        assert_eq!(s, want, "peer {peer:?} xff {xff:?}");
        if s == 200 {
            queued += 1;
        }
    }
    let mut got = 0;
    while rx.try_recv().is_some() {
        got += 1;
    }
    assert_eq!(got, queued);
}
