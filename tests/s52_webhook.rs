//! s52: a webhook delivery whose response future is dropped mid-way (the sender hung up while
//! the durable queue was writing), per docs/guides/webhooks.md: "200 only once the event is
//! queued; a duplicate gets 200 and is not queued again", "Dedup and append happen in one
//! script", and `EventQueue`'s rustdoc: "a key is remembered only if its event was queued".
//!
//! So after a delivery dropped at any await, the sender's redelivery is answered 200, and the
//! event is in the stream exactly once: never lost (remembered but not queued), never twice.
#![cfg(feature = "full")]
// Webhook timestamps and unique Redis key names need the wall clock.
#![allow(clippy::disallowed_methods)]

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use sturdy::redis::{RedisStreamConsumer, RedisStreamQueue};
use sturdy::webhook::{sign_standard, MemoryQueue, StandardWebhooks, WebhookReceiver};
use tokio::time::timeout;
use tower::ServiceExt;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn redis_url() -> Option<String> {
    std::env::var("STURDY_REDIS_URL").ok()
}

fn delivery(id: &str, body: &'static str) -> Request<Full<Bytes>> {
    let ts = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let sig = sign_standard(SECRET, id, ts, body.as_bytes()).unwrap();
    Request::post("http://x/webhooks")
        .header("webhook-id", id)
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", sig)
        .header("content-type", "application/json")
        .body(Full::from(body))
        .unwrap()
}

fn unique(prefix: &str) -> String {
    let n = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{}-{n}", std::process::id())
}

/// Redis Streams queue: the receiver's future dropped after k polls (k = 0..12, real time in
/// between, so the drop lands before, during and after the script's round trip). The
/// redelivery gets 200, and every event comes out of the stream exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_delivery_dropped_at_each_await_is_queued_exactly_once_after_redelivery() {
    let Some(url) = redis_url() else {
        eprintln!("STURDY_REDIS_URL not set: skipped");
        return;
    };
    let stream = unique("s52-webhooks");
    let mut consumer = RedisStreamConsumer::connect(
        &url,
        stream.clone(),
        "workers",
        "w1",
        Duration::from_secs(60),
    )
    .await
    .unwrap()
    .with_wait(Duration::from_millis(50));
    let queue = RedisStreamQueue::connect(&url, stream.clone())
        .await
        .unwrap();
    let receiver = WebhookReceiver::new(StandardWebhooks::new(SECRET).unwrap(), queue);
    let ks = 0..=12usize;
    for k in ks.clone() {
        let id = format!("msg_s52_{k}");
        let mut fut = tokio_test::task::spawn(receiver.clone().oneshot(delivery(&id, "{}")));
        let mut finished = false;
        for _ in 0..k {
            if fut.poll().is_ready() {
                finished = true;
                break;
            }
            tokio::time::sleep(Duration::from_micros(400)).await;
        }
        drop(fut);
        let _ = finished;
        // The sender redelivers (at once, and once more a moment later).
        for _ in 0..2 {
            let res = timeout(
                Duration::from_secs(3),
                receiver.clone().oneshot(delivery(&id, "{}")),
            )
            .await
            .expect("the redelivery hung")
            .unwrap();
            assert_eq!(
                res.status(),
                StatusCode::OK,
                "k={k}: the redelivery after a dropped delivery was not acknowledged"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let mut counts: HashMap<String, usize> = HashMap::new();
    let t0 = tokio::time::Instant::now();
    loop {
        let next = timeout(Duration::from_secs(3), consumer.next())
            .await
            .unwrap()
            .unwrap();
        let Some(d) = next else { break };
        *counts.entry(d.event.id.clone()).or_default() += 1;
        consumer.ack(&d).await.unwrap();
        assert!(t0.elapsed() < Duration::from_secs(5));
    }
    for k in ks {
        let id = format!("msg_s52_{k}");
        assert_eq!(
            counts.get(&id).copied().unwrap_or(0),
            1,
            "k={k}: the event came out of the stream {} times: {counts:?}",
            counts.get(&id).copied().unwrap_or(0)
        );
    }
}

/// The in-memory queue, paused time not needed: a delivery dropped after k polls, then
/// redelivered, is queued exactly once.
#[tokio::test]
async fn memory_delivery_dropped_at_each_await_is_queued_exactly_once_after_redelivery() {
    let (queue, mut events) = MemoryQueue::new(100);
    let receiver = WebhookReceiver::new(StandardWebhooks::new(SECRET).unwrap(), queue);
    for k in 0..=4usize {
        let id = format!("msg_mem_{k}");
        let mut fut = tokio_test::task::spawn(receiver.clone().oneshot(delivery(&id, "{}")));
        for _ in 0..k {
            if fut.poll().is_ready() {
                break;
            }
            tokio::task::yield_now().await;
        }
        drop(fut);
        let res = receiver.clone().oneshot(delivery(&id, "{}")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "k={k}");
        let mut n = 0;
        while let Some(e) = events.try_recv() {
            assert_eq!(e.id, id);
            n += 1;
        }
        assert_eq!(n, 1, "k={k}: queued {n} times");
    }
}
