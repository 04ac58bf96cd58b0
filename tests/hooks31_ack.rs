//! The fast durable acknowledgement, composed as a demanding axum user would: the receiver
//! under tower's LoadShed, Buffer, ConcurrencyLimit(1) and Timeout over the wire, a sender
//! stalling mid-body while holding the one slot, dedup TTLs at their edges, and the in-memory
//! queue's cost at n and 16n deliveries.
#![cfg(feature = "full")]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::error_handling::HandleErrorLayer;
use axum::routing::post_service;
use axum::Router;
use bytes::Bytes;
use http::StatusCode;
use sturdy::core::BoxError;
use sturdy::webhook::{
    sign_github, sign_standard, BoxFuture, EventQueue, GitHub, MemoryQueue, Push, StandardWebhooks,
    WebhookEvent, WebhookReceiver,
};
use tokio::io::AsyncWriteExt;
use tower::ServiceBuilder;

use crate::cost_common::ratio;
use crate::hooks31_util::{body_of, exchange, head, now_s, serve, status_of, Fixed, STD_SECRET};

/// A queue whose every push first sleeps `delay`.
#[derive(Debug, Clone)]
struct Slow {
    inner: MemoryQueue,
    delay: Duration,
}

impl EventQueue for Slow {
    fn push(&self, event: WebhookEvent, dedup_ttl: Duration) -> BoxFuture<Result<Push, BoxError>> {
        let me = self.clone();
        Box::pin(async move {
            tokio::time::sleep(me.delay).await;
            me.inner.push(event, dedup_ttl).await
        })
    }
}

fn delivery(id: &str, ts: i64, body: &str) -> Vec<u8> {
    let sig = sign_standard(STD_SECRET, id, ts, body.as_bytes()).unwrap();
    let mut out = head(
        "/wh",
        &[
            ("webhook-id", id.as_bytes()),
            ("webhook-timestamp", ts.to_string().as_bytes()),
            ("webhook-signature", sig.as_bytes()),
        ],
        body.len(),
    );
    out.extend_from_slice(body.as_bytes());
    out
}

/// The receiver behind `HandleErrorLayer` (503), `LoadShed`, `Buffer(4)`, `ConcurrencyLimit(1)`
/// and `Timeout(60 ms)`, its queue taking 25 ms a push: 40 distinct deliveries sent at once
/// over TCP are each answered 200 (queued) or 503 (shed or timed out, the sender redelivers).
/// Redelivering every non-200 until it is 200 leaves each event queued exactly once: nothing
/// acknowledged without being queued, nothing queued twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks31_load_shed_buffer_limit_timeout_over_the_wire_lose_and_double_nothing() {
    let (inner, mut rx) = MemoryQueue::new(1_000);
    let queue = Slow {
        inner,
        delay: Duration::from_millis(25),
    };
    let receiver = WebhookReceiver::new(StandardWebhooks::new(STD_SECRET).unwrap(), queue);
    let svc = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(|e: BoxError| async move {
            (StatusCode::SERVICE_UNAVAILABLE, format!("busy: {e}"))
        }))
        .load_shed()
        .buffer(4)
        .concurrency_limit(1)
        .timeout(Duration::from_millis(60))
        .service(receiver);
    let addr = serve(Router::new().route("/wh", post_service(svc))).await;
    let ts = now_s();
    let ids: Vec<String> = (0..40).map(|i| format!("msg_hooks31_shed_{i}")).collect();
    let mut pending = ids.clone();
    let mut answers: HashMap<u16, usize> = HashMap::new();
    for round in 0..200 {
        if pending.is_empty() {
            break;
        }
        let tasks: Vec<_> = pending
            .iter()
            .map(|id| {
                let bytes = delivery(id, ts, &format!("{{\"n\":\"{id}\"}}"));
                let id = id.clone();
                tokio::spawn(async move { (id, status_of(&exchange(addr, &bytes).await)) })
            })
            .collect();
        let mut next = Vec::new();
        for t in tasks {
            let (id, status) = t.await.unwrap();
            *answers.entry(status).or_default() += 1;
            match status {
                200 => {}
                503 => next.push(id),
                other => panic!("round {round}: {id} answered {other}"),
            }
        }
        pending = next;
    }
    assert!(pending.is_empty(), "still refused: {pending:?}");
    eprintln!("answers: {answers:?}");
    let mut seen: HashMap<String, usize> = HashMap::new();
    while let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
        *seen.entry(e.id.clone()).or_default() += 1;
    }
    for id in &ids {
        assert_eq!(
            seen.get(id),
            Some(&1),
            "{id} queued {:?} times",
            seen.get(id)
        );
    }
    assert_eq!(seen.len(), ids.len());
}

/// A sender that sends its headers and half its body, then stalls with the connection open,
/// holds the one slot of `ConcurrencyLimit(1)` only until the `Timeout` inside it: another
/// sender's delivery is then answered 200 and queued, and the stalled one is never queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks31_a_stalled_body_frees_the_one_slot_at_the_timeout() {
    let (queue, mut rx) = MemoryQueue::new(100);
    let receiver = WebhookReceiver::new(StandardWebhooks::new(STD_SECRET).unwrap(), queue);
    let svc = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(|_: BoxError| async {
            StatusCode::SERVICE_UNAVAILABLE
        }))
        .buffer(16)
        .concurrency_limit(1)
        .timeout(Duration::from_millis(300))
        .service(receiver);
    let addr = serve(Router::new().route("/wh", post_service(svc))).await;
    let ts = now_s();
    let stalled = delivery(
        "msg_hooks31_stalled",
        ts,
        "{\"half\":\"of a body that never ends\"}",
    );
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(&stalled[..stalled.len() - 10]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let start = tokio::time::Instant::now();
    let answer = exchange(addr, &delivery("msg_hooks31_other", ts, "{}")).await;
    assert_eq!(status_of(&answer), 200, "{answer}");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    let e = tokio::time::timeout(Duration::from_secs(2), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(e.id, "msg_hooks31_other");
    drop(s);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(rx.try_recv().is_none(), "the stalled delivery was queued");
}

/// `with_dedup_ttl(Duration::ZERO)` (and a TTL under a millisecond) on a scheme without a
/// timestamp: the guide says the TTL is then the whole replay protection, so a zero TTL
/// remembers nothing; what a demanding user expects is that deliveries are still accepted and
/// queued (not refused, not a 5xx), each copy then being queued again.
#[tokio::test]
async fn hooks31_a_zero_dedup_ttl_in_memory_still_queues() {
    for ttl in [Duration::ZERO, Duration::from_micros(500)] {
        let (queue, mut rx) = MemoryQueue::new(100);
        let receiver = WebhookReceiver::new(GitHub::new("gh").unwrap(), queue).with_dedup_ttl(ttl);
        let addr = serve(Router::new().route("/gh", post_service(receiver))).await;
        let body = "{\"zero\":true}";
        let sig = sign_github("gh", body.as_bytes());
        for _ in 0..2 {
            let mut bytes = head(
                "/gh",
                &[("x-hub-signature-256", sig.as_bytes())],
                body.len(),
            );
            bytes.extend_from_slice(body.as_bytes());
            let answer = exchange(addr, &bytes).await;
            assert_eq!(status_of(&answer), 200, "ttl {ttl:?}: {answer}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(rx.try_recv().is_some(), "ttl {ttl:?}: nothing queued");
    }
}

/// The in-memory queue's dedup memory ("remembers at most 100,000 dedup keys, the oldest
/// forgotten first") costs each push about the same at 20,000 and at 320,000 distinct events
/// (past the bound, every push also forgets one key): time in proportion to the deliveries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks31_memory_queue_pushes_cost_in_proportion_to_their_number() {
    async fn run(n: usize) -> Duration {
        let (q, mut rx) = MemoryQueue::new(1_024);
        let start = tokio::time::Instant::now();
        for i in 0..n {
            let e = WebhookEvent::new("standard", format!("msg_{i}"), Bytes::from_static(b"{}"));
            assert_eq!(
                q.push(e, Duration::from_secs(3600)).await.unwrap(),
                Push::Enqueued
            );
            let _ = rx.try_recv();
        }
        start.elapsed()
    }
    let _ = run(20_000).await;
    let t = [run(20_000).await, run(80_000).await, run(320_000).await];
    eprintln!("memory queue pushes: {t:?} ratio {:.1}", ratio(&t));
    assert!(ratio(&t) < 40.0, "{t:?}");
    // The oldest is forgotten first: after 100,001 keys, the first is new again, the last not.
    let (q, mut rx) = MemoryQueue::new(8);
    for i in 0..100_001 {
        let e = WebhookEvent::new("s", format!("k{i}"), Bytes::new());
        q.push(e, Duration::from_secs(3600)).await.unwrap();
        let _ = rx.try_recv();
    }
    let again = |i: usize| WebhookEvent::new("s", format!("k{i}"), Bytes::new());
    assert_eq!(
        q.push(again(100_000), Duration::from_secs(3600))
            .await
            .unwrap(),
        Push::Duplicate
    );
    assert_eq!(
        q.push(again(0), Duration::from_secs(3600)).await.unwrap(),
        Push::Enqueued
    );
}

/// A receiver with a fixed clock answers over TCP with the guide's generic texts, through the
/// same layers, and a delivery refused for its timestamp is never queued.
#[tokio::test]
async fn hooks31_rejections_through_the_layers_keep_their_status_and_text() {
    let (queue, mut rx) = MemoryQueue::new(10);
    let now = 1_800_000_000;
    let receiver = WebhookReceiver::new(StandardWebhooks::new(STD_SECRET).unwrap(), queue)
        .with_clock(Arc::new(Fixed(crate::hooks31_util::at(now, 0))))
        .with_body_limit(64);
    let svc = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(|_: BoxError| async {
            StatusCode::SERVICE_UNAVAILABLE
        }))
        .load_shed()
        .buffer(4)
        .concurrency_limit(1)
        .timeout(Duration::from_secs(5))
        .service(receiver);
    let addr = serve(Router::new().route("/wh", post_service(svc))).await;
    for (what, bytes, status, text) in [
        (
            "stale",
            delivery("msg_a", now - 301, "{}"),
            401,
            "invalid signature",
        ),
        (
            "future",
            delivery("msg_b", now + 301, "{}"),
            401,
            "invalid signature",
        ),
        (
            "too large",
            delivery("msg_c", now, &"x".repeat(65)),
            413,
            "payload too large",
        ),
        ("fine", delivery("msg_d", now, "{}"), 200, ""),
    ] {
        let answer = exchange(addr, &bytes).await;
        assert_eq!(status_of(&answer), status, "{what}: {answer}");
        if !text.is_empty() {
            assert_eq!(body_of(&answer).trim(), text, "{what}");
        }
    }
    assert_eq!(rx.try_recv().unwrap().id, "msg_d");
    assert!(rx.try_recv().is_none());
}

/// Reads what the server sends within `wait` (or until it closes).
async fn read_some(s: &mut tokio::net::TcpStream, wait: Duration) -> String {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 4096];
    match tokio::time::timeout(wait, s.read(&mut buf)).await {
        Ok(Ok(n)) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        _ => String::new(),
    }
}

/// "Headers, before the body is read" and "A delivery without well-formed, fresh signature
/// headers costs no body read", seen by a sender that asks `Expect: 100-continue` (curl does
/// for large bodies): a good delivery gets `100 Continue`, then 200 once its body is in; a
/// stale one and one whose declared length is past the limit get their 401 and 413 at once,
/// without `100 Continue` and without a byte of body sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks31_expect_continue_only_for_deliveries_worth_reading() {
    let (queue, mut rx) = MemoryQueue::new(10);
    let receiver = WebhookReceiver::new(StandardWebhooks::new(STD_SECRET).unwrap(), queue)
        .with_body_limit(1024);
    let addr = serve(Router::new().route("/wh", post_service(receiver))).await;
    let ts = now_s();
    let with_expect = |id: &str, ts: i64, body: &str, len: usize| {
        let sig = sign_standard(STD_SECRET, id, ts, body.as_bytes()).unwrap();
        head(
            "/wh",
            &[
                ("webhook-id", id.as_bytes()),
                ("webhook-timestamp", ts.to_string().as_bytes()),
                ("webhook-signature", sig.as_bytes()),
                ("expect", b"100-continue"),
            ],
            len,
        )
    };
    // Good: 100 Continue, then the body, then 200.
    let body = "{\"expect\":1}";
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(&with_expect("msg_expect", ts, body, body.len()))
        .await
        .unwrap();
    let first = read_some(&mut s, Duration::from_secs(10)).await;
    assert!(first.starts_with("HTTP/1.1 100"), "{first:?}");
    s.write_all(body.as_bytes()).await.unwrap();
    let mut answer = first
        .split_once("\r\n\r\n")
        .map(|(_, r)| r.to_owned())
        .unwrap_or_default();
    if answer.is_empty() {
        answer = read_some(&mut s, Duration::from_secs(10)).await;
    }
    assert_eq!(status_of(&answer), 200, "{answer:?}");
    assert_eq!(rx.recv().await.unwrap().id, "msg_expect");
    // Stale, and too large: answered without 100 Continue, no body sent.
    for (what, bytes, status) in [
        (
            "stale",
            with_expect("msg_stale", ts - 3600, body, body.len()),
            401,
        ),
        (
            "too large",
            with_expect("msg_large", ts, body, 1_000_000),
            413,
        ),
    ] {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(&bytes).await.unwrap();
        let got = read_some(&mut s, Duration::from_secs(10)).await;
        assert_eq!(status_of(&got), status, "{what}: {got:?}");
    }
    assert!(rx.try_recv().is_none());
}

/// Header bytes that are not UTF-8 (obs-text, which hyper lets through) in each signature
/// header of each scheme, over the wire: a clean 400 or 401 with the generic text, never a 5xx,
/// nothing queued, and the next good delivery on the same receiver is taken.
#[tokio::test]
async fn hooks31_non_utf8_signature_headers_over_the_wire() {
    let (queue, mut rx) = MemoryQueue::new(10);
    let std_rx = WebhookReceiver::new(StandardWebhooks::new(STD_SECRET).unwrap(), queue.clone());
    let stripe_rx = WebhookReceiver::new(
        sturdy::webhook::Stripe::new(crate::hooks31_util::STRIPE_SECRET).unwrap(),
        queue.clone(),
    );
    let gh_rx = WebhookReceiver::new(GitHub::new("gh").unwrap(), queue);
    let addr = serve(
        Router::new()
            .route("/wh", post_service(std_rx))
            .route("/st", post_service(stripe_rx))
            .route("/gh", post_service(gh_rx)),
    )
    .await;
    let ts = now_s().to_string();
    let sig = sign_standard(STD_SECRET, "msg_ok", now_s(), b"{}").unwrap();
    let cases: Vec<(&str, Vec<(&str, Vec<u8>)>)> = vec![
        (
            "/wh",
            vec![
                ("webhook-id", b"msg_\xe9t\xe9".to_vec()),
                ("webhook-timestamp", ts.clone().into_bytes()),
                ("webhook-signature", sig.clone().into_bytes()),
            ],
        ),
        (
            "/wh",
            vec![
                ("webhook-id", b"msg_ok".to_vec()),
                ("webhook-timestamp", [ts.as_bytes(), b"\xff"].concat()),
                ("webhook-signature", sig.clone().into_bytes()),
            ],
        ),
        (
            "/wh",
            vec![
                ("webhook-id", b"msg_ok".to_vec()),
                ("webhook-timestamp", ts.clone().into_bytes()),
                (
                    "webhook-signature",
                    [sig.as_bytes(), b" v1,\xff\xfe"].concat(),
                ),
            ],
        ),
        (
            "/st",
            vec![("stripe-signature", b"t=1,v1=\xc3\xa9".to_vec())],
        ),
        (
            "/gh",
            vec![("x-hub-signature-256", b"sha256=\x80".to_vec())],
        ),
    ];
    for (path, headers) in &cases {
        let hs: Vec<(&str, &[u8])> = headers.iter().map(|(k, v)| (*k, v.as_slice())).collect();
        let mut bytes = head(path, &hs, 2);
        bytes.extend_from_slice(b"{}");
        let answer = exchange(addr, &bytes).await;
        let status = status_of(&answer);
        assert!(
            status == 400 || status == 401,
            "{path} {headers:?}: {answer}"
        );
        assert_eq!(body_of(&answer).trim(), "invalid signature", "{answer}");
    }
    assert!(rx.try_recv().is_none());
    let mut bytes = head(
        "/wh",
        &[
            ("webhook-id", b"msg_ok"),
            ("webhook-timestamp", ts.as_bytes()),
            ("webhook-signature", sig.as_bytes()),
        ],
        2,
    );
    bytes.extend_from_slice(b"{}");
    assert_eq!(status_of(&exchange(addr, &bytes).await), 200);
    assert_eq!(rx.try_recv().unwrap().id, "msg_ok");
}
