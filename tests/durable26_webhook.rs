//! The webhook receiver read literally from docs/guides/webhooks.md and the crate docs: the
//! published vectors, signature lists, ids, forwarded-address chains, dedup and queueing.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::ConnectInfo;
use http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode};
use http_body_util::BodyExt;
use sturdy::core::WallClock;
use sturdy::webhook::{
    sign_github, sign_standard, sign_stripe, ForwardedHeader, GenericHmac, GitHub, MemoryQueue,
    MemoryReceiver, SourceAllowlist, StandardWebhooks, Stripe, Verifier, WebhookReceiver,
};
use tower::ServiceExt;

/// The SW-1 vector of the shared standards file, as published.
const SW1_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const SW1_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
const SW1_TS: i64 = 1_614_265_330;
const SW1_BODY: &str = r#"{"test": 2432232314}"#;
const SW1_SIG: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

#[derive(Debug)]
struct Fixed(i64);
impl WallClock for Fixed {
    fn now(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.0 as u64)
    }
}

fn at(ts: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(ts as u64)
}

fn standard_rx(now: i64) -> (WebhookReceiver<MemoryQueue>, MemoryReceiver) {
    let (q, events) = MemoryQueue::new(100);
    (
        WebhookReceiver::new(StandardWebhooks::new(SW1_SECRET).unwrap(), q)
            .with_clock(Arc::new(Fixed(now))),
        events,
    )
}

fn standard_req(id: &[u8], ts: &str, sig: &str, body: impl Into<Body>) -> Request<Body> {
    let mut r = Request::post("/hook").body(body.into()).unwrap();
    let h = r.headers_mut();
    h.insert("webhook-id", HeaderValue::from_bytes(id).unwrap());
    h.insert("webhook-timestamp", HeaderValue::from_str(ts).unwrap());
    h.insert("webhook-signature", HeaderValue::from_str(sig).unwrap());
    r
}

async fn answer<Q: sturdy::webhook::EventQueue>(
    rx: &WebhookReceiver<Q>,
    req: Request<Body>,
) -> (StatusCode, String) {
    let res = rx.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// STANDARDS.md SW-1, SW-neg and SW-multi, used as they are: the sign vector, the must-reject
/// values and the multi-signature header, at `now = 1614265330`.
#[tokio::test]
async fn durable26_standard_webhooks_published_vectors() {
    assert_eq!(
        sign_standard(SW1_SECRET, SW1_ID, SW1_TS, SW1_BODY.as_bytes()).unwrap(),
        SW1_SIG
    );
    let (rx, mut events) = standard_rx(SW1_TS);
    let (s, _) = answer(
        &rx,
        standard_req(SW1_ID.as_bytes(), "1614265330", SW1_SIG, SW1_BODY),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let e = events.try_recv().expect("SW-1 is queued");
    assert_eq!(e.id, SW1_ID);
    assert_eq!(e.timestamp, Some(SW1_TS));
    assert_eq!(e.body, SW1_BODY.as_bytes());

    let negatives = [
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OA=",
        "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=",
        "v1,dawfeoifkpqwoekfpqoekf",
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLawdd",
        "v1,",
        "v1,g0hM9",
        "v1,tFtCZ5RDCPxzWQRWXWPgrCgE2frDBe9gjpbWQxnVfsQ= v1,Mm7xgUVICxZfQ3bgf0h0Dof65L/IFx+PnZvnDWPCX6Q= v1,9DfC1c3eeOrXB6w/5dIDydLNQaEyww5KalE5jLBZucE=",
    ];
    for (i, sig) in negatives.iter().enumerate() {
        // A fresh id each time, so that no answer is a duplicate's.
        let id = format!("msg_neg_{i}");
        let (s, _) = answer(
            &rx,
            standard_req(id.as_bytes(), "1614265330", sig, SW1_BODY),
        )
        .await;
        assert!(
            s == StatusCode::UNAUTHORIZED || s == StatusCode::BAD_REQUEST,
            "{sig:?} must be refused: {s}"
        );
    }
    assert!(events.try_recv().is_none(), "no negative vector is queued");

    // SW-multi: decoys around the valid entry, with a fresh receiver so the id is new.
    let (rx, mut events) = standard_rx(SW1_TS);
    let multi = "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= v2,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE= v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=";
    let (s, _) = answer(
        &rx,
        standard_req(SW1_ID.as_bytes(), "1614265330", multi, SW1_BODY),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert!(events.try_recv().is_some());

    // SW-time: 301 s either way is refused with 401; 300 s is accepted.
    for (ts, want) in [
        (SW1_TS - 301, StatusCode::UNAUTHORIZED),
        (SW1_TS + 301, StatusCode::UNAUTHORIZED),
        (SW1_TS - 300, StatusCode::OK),
        (SW1_TS + 300, StatusCode::OK),
    ] {
        let id = format!("msg_t_{ts}");
        let sig = sign_standard(SW1_SECRET, &id, ts, SW1_BODY.as_bytes()).unwrap();
        let (s, _) = answer(
            &rx,
            standard_req(id.as_bytes(), &ts.to_string(), &sig, SW1_BODY),
        )
        .await;
        assert_eq!(s, want, "timestamp {ts} at now {SW1_TS}");
    }
}

/// "only the first MAX_SIGNATURES (16) `v1` entries of a Standard Webhooks or Stripe header are
/// considered": entries of other versions (`v1a`, the asymmetric scheme the spec's own example
/// lists, and `v2`) are not `v1` entries, so twenty of them before the valid `v1` entry must not
/// push it out.
#[tokio::test]
async fn durable26_other_versions_do_not_use_up_the_sixteen_v1_entries() {
    let (rx, mut events) = standard_rx(SW1_TS);
    let mut entries: Vec<String> = (0..20)
        .map(|i| format!("v1a,{}", "A".repeat(86 + i % 2)))
        .collect();
    entries.push(SW1_SIG.to_owned());
    let (s, _) = answer(
        &rx,
        standard_req(
            SW1_ID.as_bytes(),
            "1614265330",
            &entries.join(" "),
            SW1_BODY,
        ),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "20 v1a entries then the valid v1");
    assert!(events.try_recv().is_some());

    // Stripe: `v0=` entries are "other schemes ... ignored".
    let (q, mut events) = MemoryQueue::new(10);
    let rx = WebhookReceiver::new(Stripe::new("sk_test_d26").unwrap(), q)
        .with_clock(Arc::new(Fixed(SW1_TS)));
    let body = r#"{"id":"evt_d26_v0"}"#;
    let good = sign_stripe("sk_test_d26", SW1_TS, body.as_bytes());
    let v1 = good.split(',').nth(1).unwrap().to_owned();
    let mut header = format!("t={SW1_TS}");
    for _ in 0..20 {
        header.push_str(&format!(",v0={}", "0".repeat(64)));
    }
    header.push(',');
    header.push_str(&v1);
    let req = Request::post("/hook")
        .header("stripe-signature", header)
        .body(Body::from(body))
        .unwrap();
    let (s, _) = answer(&rx, req).await;
    assert_eq!(s, StatusCode::OK, "20 v0 entries then the valid v1");
    assert!(events.try_recv().is_some());
}

/// A Stripe event is "deduplicated on the `id` of the verified body": the event's own top-level
/// `id`, not an `id` nested in `data.object` (every event about one object has that one). Two
/// events about the same object are two events.
#[tokio::test]
async fn durable26_stripe_dedups_on_the_events_own_id_not_a_nested_one() {
    let secret = "sk_test_d26_nested";
    let (q, mut events) = MemoryQueue::new(10);
    let rx =
        WebhookReceiver::new(Stripe::new(secret).unwrap(), q).with_clock(Arc::new(Fixed(SW1_TS)));
    let bodies = [
        r#"{"data":{"object":{"id":"pi_1","object":"payment_intent"}},"id":"evt_A","type":"payment_intent.created"}"#,
        r#"{"data":{"object":{"id":"pi_1","object":"payment_intent"}},"id":"evt_B","type":"payment_intent.succeeded"}"#,
        r#"{"type":"x","previous_attributes":{"id":"evt_A"},"id":"evt_C"}"#,
        r#"{"list":[{"id":"evt_A"}],"id":"evt_D"}"#,
    ];
    for b in bodies {
        let req = Request::post("/hook")
            .header(
                "stripe-signature",
                sign_stripe(secret, SW1_TS, b.as_bytes()),
            )
            .body(Body::from(b))
            .unwrap();
        assert_eq!(answer(&rx, req).await.0, StatusCode::OK);
    }
    let mut ids = Vec::new();
    while let Some(e) = events.try_recv() {
        ids.push(e.id);
    }
    assert_eq!(ids, ["evt_A", "evt_B", "evt_C", "evt_D"]);
}

/// "a longer Stripe `id` in the body is not used (the event is deduplicated on a digest
/// instead)": 256 bytes is used, 257 is not; a non-string id is not used either.
#[test]
fn durable26_stripe_id_bound_is_256_bytes() {
    let secret = "sk_test_d26_len";
    let v = Stripe::new(secret).unwrap();
    let id_of = |body: String| {
        let mut h = HeaderMap::new();
        h.insert(
            "stripe-signature",
            sign_stripe(secret, SW1_TS, body.as_bytes())
                .parse()
                .unwrap(),
        );
        v.verify(&h, body.as_bytes(), at(SW1_TS)).unwrap().id
    };
    let id256 = format!("evt_{}", "a".repeat(252));
    assert_eq!(
        id_of(format!(r#"{{"id":"{id256}"}}"#)).as_deref(),
        Some(id256.as_str())
    );
    let id257 = format!("evt_{}", "a".repeat(253));
    let got = id_of(format!(r#"{{"id":"{id257}"}}"#));
    assert!(
        got.as_deref().is_none_or(|g| g.starts_with("sha256:")),
        "a 257-byte id is not used: {got:?}"
    );
    for odd in [
        r#"{"id":42}"#,
        r#"{"id":null}"#,
        r#"{"id":["evt_1"]}"#,
        "not json",
    ] {
        let got = id_of(odd.to_owned());
        assert!(
            got.as_deref().is_none_or(|g| g.starts_with("sha256:")),
            "{odd}: {got:?}"
        );
    }
}

/// "`webhook-id` (at most 256 bytes, without a `.`, else 400)": an id that is not UTF-8, or
/// not ASCII, is refused with a clear 400 and never queued, without a panic. (The guide names
/// no rule on an id's characters; the receiver keeps ids to ASCII.)
#[tokio::test]
async fn durable26_a_standard_id_beyond_ascii_is_refused_cleanly() {
    let (rx, mut events) = standard_rx(SW1_TS);
    for id in [
        "msg_café".as_bytes(),
        "msg_日本語".as_bytes(),
        b"msg_\xff\xfe",
    ] {
        let text = String::from_utf8_lossy(id).into_owned();
        let sig = sign_standard(SW1_SECRET, &text, SW1_TS, b"{}").unwrap();
        let (s, _) = answer(&rx, standard_req(id, "1614265330", &sig, "{}")).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{text}");
    }
    assert!(events.try_recv().is_none());
    // The same ids in ASCII are accepted.
    let sig = sign_standard(SW1_SECRET, "msg_cafe", SW1_TS, b"{}").unwrap();
    let (s, _) = answer(&rx, standard_req(b"msg_cafe", "1614265330", &sig, "{}")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(events.try_recv().unwrap().id, "msg_cafe");
}

fn allowlist() -> SourceAllowlist {
    SourceAllowlist::new(["192.30.252.0/22"])
        .unwrap()
        .with_trusted_proxies(["10.0.0.0/8"])
        .unwrap()
}

/// An `X-Forwarded-For` list may come on several lines (RFC 9110 §5.3: they are one
/// comma-separated list, in order). Walked from the right, the address a trusted proxy
/// appended on the last line comes first: a client's forged first line must not be the source.
#[test]
fn durable26_forwarded_for_on_two_lines_is_one_list() {
    let list = allowlist();
    let peer: IpAddr = "10.0.0.1".parse().unwrap();
    let mut h = HeaderMap::new();
    h.append("x-forwarded-for", "192.30.252.7".parse().unwrap());
    h.append("x-forwarded-for", "203.0.113.9".parse().unwrap());
    assert_eq!(
        list.source(peer, &h),
        Some("203.0.113.9".parse().unwrap()),
        "the rightmost address of the last line is the nearest hop"
    );
    assert!(
        !list.allows(peer, &h),
        "a forged first line let the delivery in"
    );

    let mut h = HeaderMap::new();
    h.append("x-forwarded-for", "203.0.113.9".parse().unwrap());
    h.append("x-forwarded-for", "192.30.252.7, 10.0.0.2".parse().unwrap());
    assert_eq!(list.source(peer, &h), Some("192.30.252.7".parse().unwrap()));
    assert!(list.allows(peer, &h));
}

/// The same with `Forwarded` (RFC 7239 §4: several lines are one list).
#[test]
fn durable26_forwarded_on_two_lines_is_one_list() {
    let list = allowlist().with_forwarded_header(ForwardedHeader::Forwarded);
    let peer: IpAddr = "10.0.0.1".parse().unwrap();
    let mut h = HeaderMap::new();
    h.append("forwarded", "for=192.30.252.7".parse().unwrap());
    h.append("forwarded", "for=203.0.113.9".parse().unwrap());
    assert!(
        !list.allows(peer, &h),
        "a forged first line let the delivery in"
    );
    let mut h = HeaderMap::new();
    h.append("forwarded", "for=203.0.113.9".parse().unwrap());
    h.append("forwarded", "for=192.30.252.7".parse().unwrap());
    assert!(list.allows(peer, &h));
}

/// Over a real socket: a trusted proxy (the loopback, here) sends the client's forged line and
/// its own appended line; the delivery is refused with 403 `forbidden` and never queued.
#[tokio::test]
async fn durable26_forged_forwarded_line_over_the_wire_is_403() {
    let list = SourceAllowlist::new(["192.30.252.0/22"])
        .unwrap()
        .with_trusted_proxies(["127.0.0.0/8"])
        .unwrap();
    let (q, mut events) = MemoryQueue::new(10);
    let rx = WebhookReceiver::new(GitHub::new("gh_d26").unwrap(), q).with_source_allowlist(list);
    let app = axum::Router::new().route("/hook", axum::routing::post_service(rx));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    let body = "{\"zen\":\"d26\"}";
    let sig = sign_github("gh_d26", body.as_bytes());
    let raw = format!(
        "POST /hook HTTP/1.1\r\nhost: x\r\nx-hub-signature-256: {sig}\r\nx-forwarded-for: 192.30.252.7\r\nx-forwarded-for: 203.0.113.9\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let reply = raw_exchange(addr, raw.as_bytes()).await;
    server.abort();
    assert!(
        reply.starts_with("HTTP/1.1 403"),
        "forged line accepted: {reply}"
    );
    assert!(events.try_recv().is_none());
}

async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A generic scheme with a timestamp header: deduplicated on "`sha256:` of the signed content"
/// (`timestamp.body`), carrying the named event header and the timestamp header; a copy is one
/// event, a new timestamp over the same body is another.
#[tokio::test]
async fn durable26_generic_scheme_dedup_and_carried_headers() {
    let secret = "generic_d26";
    let v = GenericHmac::new("acme:d26", HeaderName::from_static("x-acme-sig"), secret)
        .unwrap()
        .with_prefix("sha256=")
        .with_timestamp_header(HeaderName::from_static("x-acme-ts"))
        .with_event_header(HeaderName::from_static("x-acme-event"));
    let (q, mut events) = MemoryQueue::new(10);
    let rx = WebhookReceiver::new(v, q).with_clock(Arc::new(Fixed(SW1_TS)));
    // HMAC-SHA256 in hex with the secret's bytes, over `timestamp.body`, `sha256=`-prefixed:
    // what `sign_github` computes over the content it is given.
    let sign = |ts: i64, body: &str| sign_github(secret, format!("{ts}.{body}").as_bytes());
    let send = |ts: i64, body: &'static str| {
        Request::post("/hook")
            .header("x-acme-sig", sign(ts, body))
            .header("x-acme-ts", ts.to_string())
            .header("x-acme-event", "order.paid")
            .body(Body::from(body))
            .unwrap()
    };
    assert_eq!(answer(&rx, send(SW1_TS, "{}")).await.0, StatusCode::OK);
    assert_eq!(answer(&rx, send(SW1_TS, "{}")).await.0, StatusCode::OK);
    assert_eq!(answer(&rx, send(SW1_TS - 1, "{}")).await.0, StatusCode::OK);
    let a = events.try_recv().unwrap();
    let b = events.try_recv().unwrap();
    assert!(events.try_recv().is_none(), "the copy was queued twice");
    assert!(a.id.starts_with("sha256:") && b.id.starts_with("sha256:"));
    assert_ne!(a.id, b.id);
    assert_eq!(a.scheme, "acme:d26");
    assert_eq!(a.route, "acme:d26");
    assert_eq!(a.timestamp, Some(SW1_TS));
    assert_eq!(a.headers["x-acme-event"], "order.paid");
    assert_eq!(a.headers["x-acme-ts"], SW1_TS.to_string().as_str());
    assert!(!a.headers.contains_key("x-acme-sig"));
}

/// "Every rejection answers a short generic text (`forbidden`, `invalid signature`, `payload too
/// large`)": each status with its text, and nothing queued.
#[tokio::test]
async fn durable26_rejection_texts_are_the_guides() {
    let (q, mut events) = MemoryQueue::new(10);
    let rx = WebhookReceiver::new(StandardWebhooks::new(SW1_SECRET).unwrap(), q)
        .with_clock(Arc::new(Fixed(SW1_TS)))
        .with_body_limit(64);
    let bad = "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=";
    let (s, t) = answer(&rx, standard_req(b"msg_r1", "1614265330", bad, SW1_BODY)).await;
    assert_eq!(
        (s, t.trim()),
        (StatusCode::UNAUTHORIZED, "invalid signature")
    );
    let big = "x".repeat(65);
    let sig = sign_standard(SW1_SECRET, "msg_r2", SW1_TS, big.as_bytes()).unwrap();
    let (s, t) = answer(&rx, standard_req(b"msg_r2", "1614265330", &sig, big)).await;
    assert_eq!(
        (s, t.trim()),
        (StatusCode::PAYLOAD_TOO_LARGE, "payload too large")
    );
    let rx = rx.with_source_allowlist(allowlist());
    let mut req = standard_req(b"msg_r3", "1614265330", SW1_SIG, SW1_BODY);
    req.extensions_mut()
        .insert(ConnectInfo("203.0.113.5:9".parse::<SocketAddr>().unwrap()));
    let (s, t) = answer(&rx, req).await;
    assert_eq!((s, t.trim()), (StatusCode::FORBIDDEN, "forbidden"));
    assert!(events.try_recv().is_none());
}

/// A zero-byte body is a body like any other: signed, verified, queued, and its copy is a
/// duplicate. For GitHub, "`sha256:` of the body" of zero bytes is the digest of nothing.
#[tokio::test]
async fn durable26_empty_bodies_are_verified_and_deduplicated() {
    let (q, mut events) = MemoryQueue::new(10);
    let rx = WebhookReceiver::new(GitHub::new("gh_empty").unwrap(), q);
    let mk = || {
        Request::post("/hook")
            .header("x-hub-signature-256", sign_github("gh_empty", b""))
            .body(Body::empty())
            .unwrap()
    };
    assert_eq!(answer(&rx, mk()).await.0, StatusCode::OK);
    assert_eq!(answer(&rx, mk()).await.0, StatusCode::OK);
    let e = events.try_recv().unwrap();
    assert!(events.try_recv().is_none());
    assert_eq!(
        e.id,
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    assert!(e.body.is_empty());
}

/// Hostile `webhook-timestamp` values: malformed ones are 400, integers outside the tolerance
/// (including i64's ends) are 401, and none panics or reads the body.
#[tokio::test]
async fn durable26_hostile_standard_timestamps() {
    let (rx, mut events) = standard_rx(SW1_TS);
    let cases: Vec<(String, StatusCode)> = vec![
        ("".into(), StatusCode::BAD_REQUEST),
        ("hello".into(), StatusCode::BAD_REQUEST),
        ("1614265330.5".into(), StatusCode::BAD_REQUEST),
        ("1614265330.0".into(), StatusCode::BAD_REQUEST),
        ("0x603a2c32".into(), StatusCode::BAD_REQUEST),
        ("1e9".into(), StatusCode::BAD_REQUEST),
        ("99999999999999999999999".into(), StatusCode::BAD_REQUEST),
        (i64::MAX.to_string(), StatusCode::UNAUTHORIZED),
        (i64::MIN.to_string(), StatusCode::UNAUTHORIZED),
        ("0".into(), StatusCode::UNAUTHORIZED),
        ("-1".into(), StatusCode::UNAUTHORIZED),
    ];
    for (i, (ts, want)) in cases.iter().enumerate() {
        let id = format!("msg_ts_{i}");
        let (s, _) = answer(&rx, standard_req(id.as_bytes(), ts, SW1_SIG, SW1_BODY)).await;
        let ok = s == *want
            || (*want == StatusCode::BAD_REQUEST && s == StatusCode::UNAUTHORIZED)
            || (*want == StatusCode::UNAUTHORIZED && s == StatusCode::BAD_REQUEST);
        assert!(ok, "timestamp {ts:?}: {s}, expected about {want}");
    }
    assert!(events.try_recv().is_none());
}

/// A queue that records pushes and can be made to wait, to drop a delivery while it is queued.
#[derive(Debug, Clone)]
struct SlowQueue {
    inner: Arc<Mutex<Vec<String>>>,
    gate: Arc<tokio::sync::Semaphore>,
}

impl sturdy::webhook::EventQueue for SlowQueue {
    fn push(
        &self,
        event: sturdy::webhook::WebhookEvent,
        _dedup_ttl: Duration,
    ) -> sturdy::webhook::BoxFuture<Result<sturdy::webhook::Push, sturdy::core::BoxError>> {
        let me = self.clone();
        Box::pin(async move {
            let _p = me.gate.acquire().await.unwrap();
            let mut v = me.inner.lock().unwrap();
            if v.contains(&event.dedup_key()) {
                return Ok(sturdy::webhook::Push::Duplicate);
            }
            v.push(event.dedup_key());
            Ok(sturdy::webhook::Push::Enqueued)
        })
    }
}

/// Dropping the receiver's answer at each point before the queue answers never yields a 200
/// and never loses the redelivery: the sender's next try is queued (or is a duplicate of one
/// that was), exactly once.
#[tokio::test]
async fn durable26_a_delivery_dropped_at_every_poll_is_queued_once_after_redelivery() {
    for polls in 0..4usize {
        let q = SlowQueue {
            inner: Arc::default(),
            gate: Arc::new(tokio::sync::Semaphore::new(0)),
        };
        let rx = WebhookReceiver::new(GitHub::new("gh_drop").unwrap(), q.clone());
        let body = format!("{{\"n\":{polls}}}");
        let mk = || {
            Request::post("/hook")
                .header(
                    "x-hub-signature-256",
                    sign_github("gh_drop", body.as_bytes()),
                )
                .body(Body::from(body.clone()))
                .unwrap()
        };
        {
            let mut fut = tokio_test::task::spawn(rx.clone().oneshot(mk()));
            for _ in 0..polls {
                if fut.poll().is_ready() {
                    panic!("answered before the queue was open");
                }
                tokio::task::yield_now().await;
            }
        }
        q.gate.add_permits(1000);
        let res = rx.clone().oneshot(mk()).await.unwrap();
        assert_eq!(
            res.status(),
            StatusCode::OK,
            "after dropping at poll {polls}"
        );
        assert_eq!(
            q.inner.lock().unwrap().len(),
            1,
            "after dropping at poll {polls}"
        );
    }
}

/// "200 only once the event is queued": with the handler's end of the in-memory queue gone (the
/// worker task ended or panicked), nothing can take the event, so the delivery must not be
/// acknowledged (the sender would never deliver it again and the event would be lost), and its
/// id must not be remembered.
#[tokio::test]
async fn durable26_a_queue_nobody_reads_any_more_never_acknowledges() {
    let (q, events) = MemoryQueue::new(10);
    let rx = WebhookReceiver::new(GitHub::new("gh_gone").unwrap(), q);
    drop(events);
    let body = "{\"lost\":1}";
    let mk = || {
        Request::post("/hook")
            .header(
                "x-hub-signature-256",
                sign_github("gh_gone", body.as_bytes()),
            )
            .body(Body::from(body))
            .unwrap()
    };
    let (s, text) = answer(&rx, mk()).await;
    assert!(
        !s.is_success(),
        "acknowledged {s} {text:?} into a queue nobody reads"
    );
    let (s2, _) = answer(&rx, mk()).await;
    assert!(!s2.is_success(), "the redelivery was acknowledged: {s2}");
}

/// "a full queue gets 503 with `Retry-After` and the id is not remembered, so the redelivery is
/// accepted": `MemoryQueue::new(0)` holds one event ("0 is taken as 1").
#[tokio::test]
async fn durable26_a_full_queue_is_503_and_the_redelivery_is_accepted() {
    let (q, mut events) = MemoryQueue::new(0);
    let rx = WebhookReceiver::new(GitHub::new("gh_full").unwrap(), q);
    let mk = |body: &'static str| {
        Request::post("/hook")
            .header(
                "x-hub-signature-256",
                sign_github("gh_full", body.as_bytes()),
            )
            .body(Body::from(body))
            .unwrap()
    };
    assert_eq!(answer(&rx, mk("{\"n\":1}")).await.0, StatusCode::OK);
    let res = rx.clone().oneshot(mk("{\"n\":2}")).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    let ra = res.headers()["retry-after"].to_str().unwrap().to_owned();
    assert!(
        ra.parse::<u64>().is_ok() || httpdate_like(&ra),
        "Retry-After {ra:?} is neither delay-seconds nor a date"
    );
    // A copy of the queued one is still a duplicate (200), not a 503.
    assert_eq!(answer(&rx, mk("{\"n\":1}")).await.0, StatusCode::OK);
    assert_eq!(events.recv().await.unwrap().body, "{\"n\":1}".as_bytes());
    assert_eq!(answer(&rx, mk("{\"n\":2}")).await.0, StatusCode::OK);
    assert_eq!(events.recv().await.unwrap().body, "{\"n\":2}".as_bytes());
    assert!(events.try_recv().is_none());
}

fn httpdate_like(s: &str) -> bool {
    s.ends_with(" GMT") && s.len() == 29
}

/// A `Content-Length` that lies (2^62 bytes announced, 2 sent) under a body limit the app set to
/// `usize::MAX`: no allocation sized by the peer's claim, no panic; the delivery is verified on
/// the bytes that came.
#[tokio::test]
async fn durable26_a_lying_content_length_under_an_unbounded_limit() {
    let (q, mut events) = MemoryQueue::new(10);
    let rx = WebhookReceiver::new(GitHub::new("gh_len").unwrap(), q).with_body_limit(usize::MAX);
    let body = "{}";
    let req = Request::post("/hook")
        .header(
            "x-hub-signature-256",
            sign_github("gh_len", body.as_bytes()),
        )
        .header("content-length", (1u64 << 62).to_string())
        .body(Body::from(body))
        .unwrap();
    let (s, _) = answer(&rx, req).await;
    assert!(s == StatusCode::OK || s.is_client_error(), "{s}");
    if s == StatusCode::OK {
        assert_eq!(events.try_recv().unwrap().body, body.as_bytes());
    }
}

/// "The dedup key is kept at least until the timestamp plus the tolerance plus one second
/// ..., whatever the dedup TTL": with the receiver's clock (`with_clock`, "the wall clock
/// timestamps are checked against") standing at the delivery's timestamp, a copy sent after the
/// short dedup TTL has passed in real time still passes the timestamp check, so it must still be
/// refused as a duplicate: memory and Redis queues.
#[tokio::test]
async fn durable26_the_dedup_key_follows_the_receivers_clock() {
    let body = "{\"clock\":1}";
    let sig = sign_standard(SW1_SECRET, "msg_clock", SW1_TS, body.as_bytes()).unwrap();
    let mk = || standard_req(b"msg_clock", "1614265330", &sig, body);

    let (q, mut events) = MemoryQueue::new(10);
    let rx = WebhookReceiver::new(StandardWebhooks::new(SW1_SECRET).unwrap(), q)
        .with_clock(Arc::new(Fixed(SW1_TS)))
        .with_dedup_ttl(Duration::from_millis(10));
    assert_eq!(answer(&rx, mk()).await.0, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert_eq!(answer(&rx, mk()).await.0, StatusCode::OK);
    assert!(events.try_recv().is_some());
    assert!(
        events.try_recv().is_none(),
        "memory: a copy that passes the timestamp check was queued twice"
    );

    let url =
        std::env::var("STURDY_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:17379/".into());
    let n = sturdy::core::WallClock::now(&sturdy::core::clock::SystemClock)
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let stream = format!("{{durable26-clock-{n}}}");
    let q = sturdy::redis::RedisStreamQueue::connect(&url, stream.as_str())
        .await
        .unwrap();
    let mut c = sturdy::redis::RedisStreamConsumer::connect(
        &url,
        stream.as_str(),
        "g",
        "w",
        Duration::from_secs(60),
    )
    .await
    .unwrap()
    .with_wait(Duration::from_millis(20));
    let rx = WebhookReceiver::new(StandardWebhooks::new(SW1_SECRET).unwrap(), q)
        .with_clock(Arc::new(Fixed(SW1_TS)))
        .with_dedup_ttl(Duration::from_millis(10));
    assert_eq!(answer(&rx, mk()).await.0, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert_eq!(answer(&rx, mk()).await.0, StatusCode::OK);
    let first = c.next().await.unwrap();
    assert!(first.is_some());
    c.ack(&first.unwrap()).await.unwrap();
    let second = c.next().await.unwrap();
    assert!(
        second.is_none(),
        "redis: a copy that passes the timestamp check was queued twice"
    );
}

/// "A delivery costs one MAC per configured secret (one SHA-256 pass over the body each),
/// however many signature entries its header lists": also when the entries come as thousands
/// of header lines instead of one line. Each scheme, a 256 KiB body, 3,000 lines of wrong
/// signatures: the time stays near the one-line time.
#[tokio::test]
async fn durable26_thousands_of_signature_header_lines_cost_about_one_mac() {
    let body = vec![b'a'; 256 * 1024];
    let time = |rx: WebhookReceiver<MemoryQueue>, req: Request<Body>| async move {
        let t = tokio::time::Instant::now();
        let s = rx.oneshot(req).await.unwrap().status();
        (s, t.elapsed())
    };
    let build =
        |name: &str, value: &dyn Fn(usize) -> String, lines: usize, extra: &[(&str, String)]| {
            let mut r = Request::post("/hook")
                .body(Body::from(body.clone()))
                .unwrap();
            for i in 0..lines {
                r.headers_mut().append(
                    HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    HeaderValue::from_str(&value(i)).unwrap(),
                );
            }
            for (k, v) in extra {
                r.headers_mut().insert(
                    HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                );
            }
            r
        };
    let fake_hex = |i: usize| format!("{:064x}", i as u128 * 0x9e37_79b9_7f4a_7c15);
    let schemes: Vec<(
        &str,
        Box<dyn Fn() -> WebhookReceiver<MemoryQueue>>,
        String,
        Box<dyn Fn(usize) -> String>,
        Vec<(&str, String)>,
    )> = vec![
        (
            "github",
            Box::new(|| {
                WebhookReceiver::new(GitHub::new("gh_lines").unwrap(), MemoryQueue::new(10).0)
            }),
            "x-hub-signature-256".into(),
            Box::new(move |i| format!("sha256={}", fake_hex(i))),
            vec![],
        ),
        (
            "stripe",
            Box::new(|| {
                WebhookReceiver::new(Stripe::new("sk_lines").unwrap(), MemoryQueue::new(10).0)
                    .with_clock(Arc::new(Fixed(SW1_TS)))
            }),
            "stripe-signature".into(),
            Box::new(move |i| format!("t={SW1_TS},v1={}", fake_hex(i))),
            vec![],
        ),
        (
            "standard",
            Box::new(|| {
                WebhookReceiver::new(
                    StandardWebhooks::new(SW1_SECRET).unwrap(),
                    MemoryQueue::new(10).0,
                )
                .with_clock(Arc::new(Fixed(SW1_TS)))
            }),
            "webhook-signature".into(),
            Box::new(|i| {
                format!(
                    "v1,{}",
                    &"Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=".replacen(
                        'C',
                        &((i % 10).to_string()),
                        1
                    )
                )
            }),
            vec![
                ("webhook-id", "msg_lines".to_owned()),
                ("webhook-timestamp", SW1_TS.to_string()),
            ],
        ),
    ];
    for (name, make, header, value, extra) in &schemes {
        let mut one = Duration::MAX;
        for _ in 0..3 {
            let (_, t) = time(make(), build(header, value.as_ref(), 1, extra)).await;
            one = one.min(t);
        }
        let mut many = Duration::MAX;
        for _ in 0..2 {
            let (s, t) = time(make(), build(header, value.as_ref(), 3_000, extra)).await;
            assert!(s.is_client_error(), "{name}: {s}");
            many = many.min(t);
        }
        eprintln!("{name}: one line {one:?}, 3,000 lines {many:?}");
        assert!(
            many < one * 6 + Duration::from_millis(500),
            "{name}: 3,000 signature lines took {many:?} against {one:?} for one"
        );
    }
}

/// A body that never ends: the checks the guide places before the body is read answer at once.
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

/// Step 2 of the guide, "Headers, before the body is read: ... 401 for a stale or future
/// timestamp (and for a Standard Webhooks header without a decodable `v1` entry)"; step 1, a
/// source outside the allowlist "gets 403 and is never read". Each is answered without waiting
/// for a body that never comes, with the status the guide gives.
#[tokio::test]
async fn durable26_header_checks_answer_before_the_body_with_the_guides_status() {
    let rx = WebhookReceiver::new(
        StandardWebhooks::new(SW1_SECRET).unwrap(),
        MemoryQueue::new(10).0,
    )
    .with_clock(Arc::new(Fixed(SW1_TS)));
    let cases: [(&str, &str, StatusCode); 6] = [
        (
            "1614265330",
            "v2,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=",
            StatusCode::UNAUTHORIZED,
        ),
        (
            "1614265330",
            "v1a,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=",
            StatusCode::UNAUTHORIZED,
        ),
        ("1614265330", "v1,!!!!", StatusCode::UNAUTHORIZED),
        ("1614264000", SW1_SIG, StatusCode::UNAUTHORIZED),
        ("1614266000", SW1_SIG, StatusCode::UNAUTHORIZED),
        ("soon", SW1_SIG, StatusCode::BAD_REQUEST),
    ];
    for (ts, sig, want) in cases {
        let mut req = Request::post("/hook").body(Never).unwrap();
        req.headers_mut()
            .insert("webhook-id", HeaderValue::from_static("msg_never"));
        req.headers_mut()
            .insert("webhook-timestamp", HeaderValue::from_str(ts).unwrap());
        req.headers_mut()
            .insert("webhook-signature", HeaderValue::from_str(sig).unwrap());
        let res = tokio::time::timeout(Duration::from_secs(2), rx.clone().oneshot(req))
            .await
            .unwrap_or_else(|_| panic!("{ts} {sig}: waited for the body"))
            .unwrap();
        assert_eq!(res.status(), want, "{ts} {sig}");
    }
    let rx = rx.with_source_allowlist(allowlist());
    let mut req = Request::post("/hook").body(Never).unwrap();
    req.extensions_mut()
        .insert(ConnectInfo("198.51.100.7:1".parse::<SocketAddr>().unwrap()));
    let res = tokio::time::timeout(Duration::from_secs(2), rx.oneshot(req))
        .await
        .expect("a refused source's body was read")
        .unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
}

/// A signed Stripe body nested 200,000 levels deep before its `id` (a broken or hostile sender
/// that holds the secret): reading the `id` must not overflow the stack; the event is queued,
/// deduplicated on its `id` or on a digest.
#[test]
fn durable26_a_deeply_nested_stripe_body_does_not_overflow_the_stack() {
    // A thread with a small stack, as a runtime worker may have.
    let h = std::thread::Builder::new()
        .stack_size(512 * 1024)
        .spawn(|| {
            let secret = "sk_deep";
            let depth = 200_000;
            let body = format!(
                "{{\"data\":{}{},\"id\":\"evt_deep\"}}",
                "[".repeat(depth),
                "]".repeat(depth)
            );
            let mut h = HeaderMap::new();
            h.insert(
                "stripe-signature",
                sign_stripe(secret, SW1_TS, body.as_bytes())
                    .parse()
                    .unwrap(),
            );
            let v = Stripe::new(secret).unwrap();
            v.verify(&h, body.as_bytes(), at(SW1_TS)).map(|v| v.id)
        })
        .unwrap();
    let id = h.join().expect("verifying a deep body crashed its thread");
    let id = id.expect("a signed body is verified");
    assert!(
        id.as_deref()
            .is_none_or(|i| i == "evt_deep" || i.starts_with("sha256:")),
        "{id:?}"
    );
}

/// An empty `webhook-id` is a missing id ("400 for missing or malformed headers"): taken as an
/// id, every later event sent with it would be a "duplicate", acknowledged and never processed.
#[tokio::test]
async fn durable26_an_empty_standard_id_is_a_missing_header() {
    let (rx, mut events) = standard_rx(SW1_TS);
    let mut statuses = Vec::new();
    for body in ["{\"n\":1}", "{\"n\":2}"] {
        let sig = sign_standard(SW1_SECRET, "", SW1_TS, body.as_bytes()).unwrap();
        statuses.push(
            answer(&rx, standard_req(b"", "1614265330", &sig, body))
                .await
                .0
                .as_u16(),
        );
    }
    let mut queued = 0;
    while events.try_recv().is_some() {
        queued += 1;
    }
    assert_eq!(
        (statuses.as_slice(), queued),
        (&[400u16, 400][..], 0),
        "two different events with an empty id: the second was acknowledged and dropped"
    );
}

/// A Stripe body with an empty `id` has no usable id: deduplicated on a digest of `t.body`, so
/// two different events that both carry `"id":""` are both queued, not one dropped.
#[tokio::test]
async fn durable26_an_empty_stripe_id_is_not_an_id() {
    let secret = "sk_empty_id";
    let (q, mut events) = MemoryQueue::new(10);
    let rx =
        WebhookReceiver::new(Stripe::new(secret).unwrap(), q).with_clock(Arc::new(Fixed(SW1_TS)));
    for body in [r#"{"id":"","n":1}"#, r#"{"id":"","n":2}"#] {
        let req = Request::post("/hook")
            .header(
                "stripe-signature",
                sign_stripe(secret, SW1_TS, body.as_bytes()),
            )
            .body(Body::from(body))
            .unwrap();
        assert_eq!(answer(&rx, req).await.0, StatusCode::OK);
    }
    let a = events.try_recv().expect("the first event");
    let b = events.try_recv();
    assert!(
        b.is_some(),
        "the second event with an empty id was taken for a duplicate of {:?}",
        a.id
    );
}
