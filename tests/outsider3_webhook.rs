//! Third-round outside tests of the webhook receiver (docs/guides/webhooks.md): thousands of
//! signature entries, non-ASCII and huge headers, concurrent duplicate deliveries, capped
//! carried headers, hostile Stripe ids, and the Redis stream queue's full backlog, redelivery
//! and acknowledgement.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use http::{HeaderValue, Request, StatusCode};
use sturdy::core::WallClock;
use sturdy::redis::{RedisStreamConsumer, RedisStreamQueue};
use sturdy::webhook::{
    sign_github, sign_standard, sign_stripe, GitHub, MemoryQueue, MemoryReceiver, StandardWebhooks,
    Stripe, WebhookReceiver, MAX_ID_LEN,
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

fn std_rx(capacity: usize) -> (WebhookReceiver<MemoryQueue>, MemoryReceiver) {
    let (q, events) = MemoryQueue::new(capacity);
    (
        WebhookReceiver::new(StandardWebhooks::new(WHSEC).unwrap(), q)
            .with_clock(Arc::new(Fixed(NOW))),
        events,
    )
}

async fn send<Q>(rx: &WebhookReceiver<Q>, headers: &[(&str, &[u8])], body: Vec<u8>) -> StatusCode
where
    WebhookReceiver<Q>: tower::Service<
            Request<Body>,
            Response = http::Response<http_body_util::Full<bytes::Bytes>>,
            Error = std::convert::Infallible,
        > + Clone,
{
    let mut b = Request::post("/hook");
    for (k, v) in headers {
        b = b.header(*k, HeaderValue::from_bytes(v).unwrap());
    }
    rx.clone()
        .oneshot(b.body(Body::from(body)).unwrap())
        .await
        .unwrap()
        .status()
}

fn std_headers(id: &str, sig: String) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("webhook-id", id.as_bytes().to_vec()),
        ("webhook-timestamp", NOW.to_string().into_bytes()),
        ("webhook-signature", sig.into_bytes()),
    ]
}

fn refs<'a>(h: &'a [(&'static str, Vec<u8>)]) -> Vec<(&'static str, &'a [u8])> {
    h.iter().map(|(k, v)| (*k, v.as_slice())).collect()
}

#[tokio::test]
async fn thousands_of_signature_entries_only_the_first_sixteen_count() {
    let (rx, mut events) = std_rx(100);
    let body = br#"{"type":"ping"}"#.to_vec();
    let garbage = format!("v1,{}", "A".repeat(43) + "=");
    let mk = |id: &str, pos: usize, total: usize| {
        let good = sign_standard(WHSEC, id, NOW, &body).unwrap();
        let mut entries: Vec<String> = (0..total).map(|_| garbage.clone()).collect();
        entries[pos] = good;
        std_headers(id, entries.join(" "))
    };
    // The good one first among 9,999 bad: accepted.
    let h = mk("msg_first", 0, 10_000);
    assert_eq!(send(&rx, &refs(&h), body.clone()).await, StatusCode::OK);
    // The good one 16th: still considered.
    let h = mk("msg_sixteenth", 15, 10_000);
    assert_eq!(send(&rx, &refs(&h), body.clone()).await, StatusCode::OK);
    // The good one 17th: ignored, so the delivery is not authentic.
    let h = mk("msg_seventeenth", 16, 10_000);
    assert_eq!(
        send(&rx, &refs(&h), body.clone()).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(events.try_recv().unwrap().id, "msg_first");
    assert_eq!(events.try_recv().unwrap().id, "msg_sixteenth");
    assert!(events.try_recv().is_none());
}

#[tokio::test]
async fn non_ascii_and_huge_headers_are_rejected_not_panics() {
    let (rx, mut events) = std_rx(100);
    let body = b"{}".to_vec();
    let good = sign_standard(WHSEC, "msg_1", NOW, &body).unwrap();
    let cases: Vec<Vec<(&'static str, Vec<u8>)>> = vec![
        // obs-text in the signature
        std_headers("msg_1", format!("{good} v1,\u{e9}\u{e9}")),
        std_headers("msg_1", "v1,\u{1F600}".to_owned()),
        // a 300-byte id
        std_headers(&"i".repeat(MAX_ID_LEN + 44), good.clone()),
        // a 256 KiB signature header of one entry
        std_headers("msg_1", format!("v1,{}", "A".repeat(256 * 1024))),
        // a timestamp that overflows
        vec![
            ("webhook-id", b"msg_1".to_vec()),
            ("webhook-timestamp", b"99999999999999999999999999".to_vec()),
            ("webhook-signature", good.clone().into_bytes()),
        ],
        vec![
            ("webhook-id", b"msg_1".to_vec()),
            ("webhook-timestamp", b"-9223372036854775808".to_vec()),
            ("webhook-signature", good.clone().into_bytes()),
        ],
        // non-ASCII bytes in the id
        vec![
            ("webhook-id", b"msg_\xff\xfe".to_vec()),
            ("webhook-timestamp", NOW.to_string().into_bytes()),
            ("webhook-signature", good.clone().into_bytes()),
        ],
    ];
    for (i, h) in cases.iter().enumerate() {
        let s = send(&rx, &refs(h), body.clone()).await;
        assert!(
            s == StatusCode::BAD_REQUEST || s == StatusCode::UNAUTHORIZED,
            "case {i}: {s}"
        );
    }
    assert!(events.try_recv().is_none());
    // A MAX_ID_LEN id is fine.
    let id = "i".repeat(MAX_ID_LEN);
    let sig = sign_standard(WHSEC, &id, NOW, &body).unwrap();
    let h = std_headers(&id, sig);
    assert_eq!(send(&rx, &refs(&h), body).await, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_copies_of_one_delivery_are_queued_once() {
    let (rx, mut events) = std_rx(100);
    let body = br#"{"n":1}"#.to_vec();
    let sig = sign_standard(WHSEC, "msg_dup", NOW, &body).unwrap();
    let h = std_headers("msg_dup", sig);
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (rx, h, body) = (rx.clone(), h.clone(), body.clone());
        tasks.push(tokio::spawn(
            async move { send(&rx, &refs(&h), body).await },
        ));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    assert!(events.try_recv().is_some());
    assert!(events.try_recv().is_none(), "a duplicate was queued twice");
}

#[tokio::test]
async fn carried_headers_are_capped() {
    let (q, mut events) = MemoryQueue::new(10);
    let rx = WebhookReceiver::new(GitHub::new("gh-secret").unwrap(), q);
    let body = br#"{"action":"opened"}"#.to_vec();
    let sig = sign_github("gh-secret", &body);
    let big = "e".repeat(5 * 1024);
    let mut b = Request::post("/hook").header("x-hub-signature-256", sig);
    for i in 0..10 {
        b = b.header("x-github-event", format!("{i}{big}"));
        b = b.header("x-github-delivery", format!("d{i}"));
    }
    let res = rx
        .clone()
        .oneshot(b.body(Body::from(body)).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let e = events.try_recv().unwrap();
    for name in ["x-github-event", "x-github-delivery"] {
        let vals: Vec<_> = e.headers.get_all(name).iter().collect();
        assert!(vals.len() <= 4, "{name}: {} values carried", vals.len());
        for v in vals {
            assert!(
                v.len() <= 1024,
                "{name}: a value of {} bytes carried",
                v.len()
            );
        }
    }
}

#[tokio::test]
async fn hostile_stripe_ids_stay_bounded() {
    let (q, mut events) = MemoryQueue::new(10);
    let rx =
        WebhookReceiver::new(Stripe::new("sk_test").unwrap(), q).with_clock(Arc::new(Fixed(NOW)));
    let long = format!(r#"{{"id":"{}","object":"event"}}"#, "x".repeat(10_000));
    let bodies = [
        long,
        r#"{"id":{"nested":"evt"},"object":"event"}"#.to_owned(),
        r#"{"id":12345}"#.to_owned(),
        r#"{"id":"evt_a","id":"evt_b"}"#.to_owned(),
        r#"{"id":"evt_\u0000\ud800"}"#.to_owned(),
        r#"{"id":""}"#.to_owned(),
        "[1,2,3]".to_owned(),
    ];
    for (i, body) in bodies.iter().enumerate() {
        let sig = sign_stripe("sk_test", NOW, body.as_bytes());
        let s = send(
            &rx,
            &[("stripe-signature", sig.as_bytes())],
            body.clone().into_bytes(),
        )
        .await;
        assert!(
            s == StatusCode::OK || s == StatusCode::BAD_REQUEST,
            "{i}: {s}"
        );
        if s == StatusCode::OK {
            let e = events.try_recv().expect("a 200 means queued");
            assert!(
                !e.id.is_empty() && e.id.len() <= MAX_ID_LEN,
                "body {i}: id of {} bytes",
                e.id.len()
            );
        }
    }
}

fn redis_url() -> String {
    std::env::var("STURDY_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:17379/".to_owned())
}

fn stream_name(what: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    let n = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    format!("outsider3:{what}:{}:{n}", std::process::id())
}

fn now_s() -> i64 {
    use sturdy::core::clock::SystemClock;
    SystemClock
        .now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_full_backlog_answers_503_and_the_redelivery_is_accepted_later() {
    let stream = stream_name("full");
    let mut consumer = RedisStreamConsumer::connect(
        &redis_url(),
        stream.clone(),
        "g",
        "c1",
        Duration::from_secs(30),
    )
    .await
    .unwrap()
    .with_wait(Duration::from_millis(50));
    let q = RedisStreamQueue::connect(&redis_url(), stream.clone())
        .await
        .unwrap()
        .with_max_backlog(1);
    let rx = WebhookReceiver::new(StandardWebhooks::new(WHSEC).unwrap(), q);
    let t = now_s();
    let deliver = |id: &'static str| {
        let rx = rx.clone();
        async move {
            let body = format!(r#"{{"id":"{id}"}}"#).into_bytes();
            let sig = sign_standard(WHSEC, id, t, &body).unwrap();
            let r = rx
                .oneshot(
                    Request::post("/hook")
                        .header("webhook-id", id)
                        .header("webhook-timestamp", t.to_string())
                        .header("webhook-signature", sig)
                        .body(Body::from(body))
                        .unwrap(),
                )
                .await
                .unwrap();
            (r.status(), r.headers().get("retry-after").cloned())
        }
    };
    let run = async {
        assert_eq!(deliver("msg_a").await.0, StatusCode::OK);
        let (s, ra) = deliver("msg_b").await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
        assert!(ra.is_some(), "503 with Retry-After");
        let d = consumer.next().await.unwrap().expect("msg_a");
        assert_eq!((d.event.id.as_str(), d.deliveries), ("msg_a", 1));
        consumer.ack(&d).await.unwrap();
        // The sender's redelivery of msg_b is accepted now, once.
        assert_eq!(deliver("msg_b").await.0, StatusCode::OK);
        assert_eq!(deliver("msg_b").await.0, StatusCode::OK);
        let d = consumer.next().await.unwrap().expect("msg_b");
        assert_eq!(d.event.id, "msg_b");
        consumer.ack(&d).await.unwrap();
        assert!(
            consumer.next().await.unwrap().is_none(),
            "msg_b queued twice"
        );
        // msg_a again after its ack: a duplicate, not queued.
        assert_eq!(deliver("msg_a").await.0, StatusCode::OK);
        assert!(consumer.next().await.unwrap().is_none());
    };
    tokio::time::timeout(Duration::from_secs(15), run)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_unacked_events_come_back_counted_and_acked_ones_do_not() {
    let stream = stream_name("ack");
    let mut consumer = RedisStreamConsumer::connect(
        &redis_url(),
        stream.clone(),
        "g",
        "c1",
        Duration::from_millis(200),
    )
    .await
    .unwrap()
    .with_wait(Duration::from_millis(50))
    .with_max_deliveries(3);
    let q = RedisStreamQueue::connect(&redis_url(), stream.clone())
        .await
        .unwrap();
    let rx = WebhookReceiver::new(StandardWebhooks::new(WHSEC).unwrap(), q.clone());
    let t = now_s();
    let body = br#"{"poison":true}"#.to_vec();
    let sig = sign_standard(WHSEC, "msg_p", t, &body).unwrap();
    let r = rx
        .oneshot(
            Request::post("/hook")
                .header("webhook-id", "msg_p")
                .header("webhook-timestamp", t.to_string())
                .header("webhook-signature", sig)
                .body(Body::from(body))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let run = async {
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while tokio::time::Instant::now() < deadline {
            if let Some(d) = consumer.next().await.unwrap() {
                seen.push(d.deliveries);
            }
            if seen.len() >= 3 {
                // Let the claim delay pass once more: the event must go dead, not come back.
                tokio::time::sleep(Duration::from_millis(300)).await;
                assert!(consumer.next().await.unwrap().is_none());
                assert!(consumer.next().await.unwrap().is_none());
                break;
            }
        }
        assert_eq!(seen, vec![1, 2, 3], "deliveries counted");
        let dead = q.dead_letters(None, 10).await.unwrap();
        assert_eq!(dead.len(), 1, "{dead:?}");
        assert_eq!(dead[0].event.id, "msg_p");
    };
    tokio::time::timeout(Duration::from_secs(15), run)
        .await
        .unwrap();
}

#[tokio::test]
async fn the_body_limit_is_a_boundary() {
    let (q, mut events) = MemoryQueue::new(10);
    let rx = WebhookReceiver::new(GitHub::new("gh-secret").unwrap(), q).with_body_limit(1000);
    for (len, want) in [
        (1000usize, StatusCode::OK),
        (1001, StatusCode::PAYLOAD_TOO_LARGE),
    ] {
        let body = vec![b'x'; len];
        let sig = sign_github("gh-secret", &body);
        let s = send(&rx, &[("x-hub-signature-256", sig.as_bytes())], body).await;
        assert_eq!(s, want, "{len} bytes");
    }
    assert_eq!(events.try_recv().unwrap().body.len(), 1000);
    assert!(events.try_recv().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_body_over_the_wire_does_not_stall_other_deliveries() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (q, mut events) = MemoryQueue::new(10);
    let rx = WebhookReceiver::new(GitHub::new("gh-secret").unwrap(), q);
    let app = axum::Router::new().route_service("/hook", rx);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    // A sender that announces 1000 bytes and sends 10.
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    let sig = sign_github("gh-secret", &[b'x'; 1000]);
    slow.write_all(
        format!(
            "POST /hook HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\nx-hub-signature-256: {sig}\r\n\r\nxxxxxxxxxx"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    // A normal delivery meanwhile.
    let body = br#"{"ok":true}"#.to_vec();
    let sig = sign_github("gh-secret", &body);
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        reqwest::Client::new()
            .post(format!("http://{addr}/hook"))
            .header("x-hub-signature-256", sig)
            .body(body)
            .send(),
    )
    .await
    .expect("the normal delivery is not stalled")
    .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        events.recv().await.unwrap().body.as_ref(),
        br#"{"ok":true}"#
    );
    // The slow one completes its body later and is accepted.
    slow.write_all(&[b'x'; 990]).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), slow.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
}

/// A Redis of this test's own on a free port, ended when dropped.
struct OwnRedis(std::process::Child);

impl OwnRedis {
    async fn start(port: u16) -> Self {
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server");
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self(child)
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_is_503_and_the_redelivery_is_accepted_once_it_is_back() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("redis://127.0.0.1:{port}/");
    let redis = OwnRedis::start(port).await;
    let q = RedisStreamQueue::connect(&url, "outsider3:down")
        .await
        .unwrap();
    let rx = WebhookReceiver::new(StandardWebhooks::new(WHSEC).unwrap(), q);
    drop(redis);
    let t = now_s();
    let deliver = || {
        let rx = rx.clone();
        async move {
            let body = br#"{"d":1}"#.to_vec();
            let sig = sign_standard(WHSEC, "msg_down", t, &body).unwrap();
            let r = rx
                .oneshot(
                    Request::post("/hook")
                        .header("webhook-id", "msg_down")
                        .header("webhook-timestamp", t.to_string())
                        .header("webhook-signature", sig)
                        .body(Body::from(body))
                        .unwrap(),
                )
                .await
                .unwrap();
            (r.status(), r.headers().get("retry-after").cloned())
        }
    };
    let start = tokio::time::Instant::now();
    let (s, ra) = deliver().await;
    assert!(
        start.elapsed() < Duration::from_millis(2_500),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert!(ra.is_some());
    let _redis = OwnRedis::start(port).await;
    let mut ok = false;
    for _ in 0..50 {
        if deliver().await.0 == StatusCode::OK {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "the same receiver works again once Redis is back");
    let mut consumer =
        RedisStreamConsumer::connect(&url, "outsider3:down", "g", "c", Duration::from_secs(30))
            .await
            .unwrap()
            .with_wait(Duration::from_millis(50));
    // The group was created after the event: it sees the entries still in the stream.
    let d = consumer.next().await.unwrap().expect("the event");
    assert_eq!(d.event.id, "msg_down");
    consumer.ack(&d).await.unwrap();
    assert!(consumer.next().await.unwrap().is_none());
}

#[tokio::test]
async fn routes_sharing_a_queue_have_their_own_id_spaces() {
    let (q, mut events) = MemoryQueue::new(10);
    let billing = WebhookReceiver::new(StandardWebhooks::new(WHSEC).unwrap(), q.clone())
        .with_clock(Arc::new(Fixed(NOW)))
        .with_route("billing");
    let shipping = WebhookReceiver::new(StandardWebhooks::new(WHSEC).unwrap(), q.clone())
        .with_clock(Arc::new(Fixed(NOW)))
        .with_route("shipping");
    let billing_again = WebhookReceiver::new(StandardWebhooks::new(WHSEC).unwrap(), q)
        .with_clock(Arc::new(Fixed(NOW)))
        .with_route("billing");
    let body = br#"{"x":1}"#.to_vec();
    let h = std_headers(
        "msg_shared",
        sign_standard(WHSEC, "msg_shared", NOW, &body).unwrap(),
    );
    assert_eq!(
        send(&billing, &refs(&h), body.clone()).await,
        StatusCode::OK
    );
    assert_eq!(
        send(&shipping, &refs(&h), body.clone()).await,
        StatusCode::OK
    );
    assert_eq!(
        send(&billing_again, &refs(&h), body.clone()).await,
        StatusCode::OK
    );
    let a = events.try_recv().unwrap();
    let b = events.try_recv().unwrap();
    assert_eq!(
        (a.route.as_str(), b.route.as_str()),
        ("billing", "shipping")
    );
    assert!(
        events.try_recv().is_none(),
        "the same route dedups across receivers"
    );
}

#[tokio::test(start_paused = true)]
async fn a_short_dedup_ttl_still_refuses_copies_within_the_timestamp_tolerance() {
    let clock = Arc::new(sturdy::core::clock::ManualClock::at(
        UNIX_EPOCH + Duration::from_secs(NOW as u64),
    ));
    let (q, mut events) = MemoryQueue::new(10);
    let rx = WebhookReceiver::new(StandardWebhooks::new(WHSEC).unwrap(), q)
        .with_clock(clock.clone())
        .with_dedup_ttl(Duration::from_secs(1));
    let body = br#"{"ttl":1}"#.to_vec();
    let h = std_headers(
        "msg_ttl",
        sign_standard(WHSEC, "msg_ttl", NOW, &body).unwrap(),
    );
    assert_eq!(send(&rx, &refs(&h), body.clone()).await, StatusCode::OK);
    for step in [10u64, 60, 200] {
        tokio::time::advance(Duration::from_secs(step)).await;
        clock.advance(Duration::from_secs(step));
        let s = send(&rx, &refs(&h), body.clone()).await;
        assert_eq!(s, StatusCode::OK, "after {step} s more");
    }
    assert!(events.try_recv().is_some());
    assert!(
        events.try_recv().is_none(),
        "a copy within the tolerance was queued again after the dedup TTL"
    );
    // Past the tolerance the copy is refused as stale.
    tokio::time::advance(Duration::from_secs(100)).await;
    clock.advance(Duration::from_secs(100));
    assert_eq!(send(&rx, &refs(&h), body).await, StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_short_dedup_ttl_still_refuses_copies_within_the_tolerance() {
    let stream = stream_name("ttl");
    let mut consumer = RedisStreamConsumer::connect(
        &redis_url(),
        stream.clone(),
        "g",
        "c",
        Duration::from_secs(30),
    )
    .await
    .unwrap()
    .with_wait(Duration::from_millis(50));
    let q = RedisStreamQueue::connect(&redis_url(), stream.clone())
        .await
        .unwrap();
    let rx = WebhookReceiver::new(StandardWebhooks::new(WHSEC).unwrap(), q)
        .with_dedup_ttl(Duration::from_millis(100));
    let t = now_s();
    let body = br#"{"ttl":2}"#.to_vec();
    let h = std_headers(
        "msg_rttl",
        sign_standard(WHSEC, "msg_rttl", t, &body).unwrap(),
    );
    let h: Vec<(&'static str, Vec<u8>)> = h
        .into_iter()
        .map(|(k, v)| {
            if k == "webhook-timestamp" {
                (k, t.to_string().into_bytes())
            } else {
                (k, v)
            }
        })
        .collect();
    let run = async {
        assert_eq!(send(&rx, &refs(&h), body.clone()).await, StatusCode::OK);
        let d = consumer.next().await.unwrap().expect("the event");
        consumer.ack(&d).await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(send(&rx, &refs(&h), body.clone()).await, StatusCode::OK);
        assert!(
            consumer.next().await.unwrap().is_none(),
            "a copy within the tolerance was queued again once the dedup TTL had passed"
        );
    };
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .unwrap();
}
