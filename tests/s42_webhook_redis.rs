//! Round s42, outside tests of the durable webhook queue (`sturdy::redis::RedisStreamQueue`,
//! `RedisStreamConsumer`) against docs/guides/webhooks.md ("Queues"): a delivery cut at any
//! point of its push is in the stream once after the sender's redelivery (neither lost nor
//! doubled); a handler dropped before its `ack` gets the event again after the claim delay,
//! counted, and an acknowledged event never comes back; `next()` cut by a timeout loses
//! nothing. Needs the Redis of `STURDY_REDIS_URL` (as the other Redis tests).
#![cfg(feature = "full")]

use std::collections::HashMap;
use std::time::{Duration, UNIX_EPOCH};

use axum::body::Body;
use http::{Request, StatusCode};
use sturdy::redis::{RedisStreamConsumer, RedisStreamQueue};
use sturdy::webhook::{sign_github, GitHub, WebhookReceiver};
use tokio::time::Instant;
use tower::ServiceExt;

const SECRET: &str = "s42-redis-secret";

fn url() -> String {
    std::env::var("STURDY_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:17379/".into())
}

fn stream(tag: &str) -> String {
    let n = sturdy::core::WallClock::now(&sturdy::core::clock::SystemClock)
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{{s42-{tag}-{n}}}")
}

fn request(body: &str) -> Request<Body> {
    Request::post("/hook")
        .header("x-hub-signature-256", sign_github(SECRET, body.as_bytes()))
        .body(Body::from(body.to_owned()))
        .unwrap()
}

/// Reads and acknowledges events until `expected` bodies were seen and none came for three
/// waits in a row (or 20 s passed); counts bodies.
async fn read_all(c: &mut RedisStreamConsumer, expected: usize) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    let start = Instant::now();
    let mut empty = 0;
    while (empty < 3 || seen.len() < expected) && start.elapsed() < Duration::from_secs(20) {
        match c.next().await.unwrap() {
            Some(d) => {
                empty = 0;
                *seen
                    .entry(String::from_utf8_lossy(&d.event.body).into_owned())
                    .or_insert(0) += 1;
                c.ack(&d).await.unwrap();
            }
            None => empty += 1,
        }
    }
    seen
}

/// "200 only once the event is queued; a duplicate gets 200 and is not queued again": a
/// delivery whose answer is cut at any moment (a timeout above the receiver, from 0 to 3 ms),
/// then redelivered in full, is in the stream exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s42_redis_push_cut_at_any_moment_is_queued_exactly_once() {
    let name = stream("cut");
    let q = RedisStreamQueue::connect(&url(), name.as_str())
        .await
        .unwrap();
    let mut c =
        RedisStreamConsumer::connect(&url(), name.as_str(), "g", "w", Duration::from_secs(60))
            .await
            .unwrap()
            .with_wait(Duration::from_millis(50));
    let rx = WebhookReceiver::new(GitHub::new(SECRET).unwrap(), q);
    let n = 40;
    for i in 0..n {
        let body = format!("{{\"n\":{i}}}");
        let cut = Duration::from_micros(i * 75);
        let _ = tokio::time::timeout(cut, rx.clone().oneshot(request(&body))).await;
        let res = rx.clone().oneshot(request(&body)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "delivery {i}");
    }
    let seen = read_all(&mut c, n as usize).await;
    assert_eq!(seen.len(), n as usize, "every delivery is in the stream");
    let doubled: Vec<_> = seen.iter().filter(|(_, k)| **k != 1).collect();
    assert!(doubled.is_empty(), "queued more than once: {doubled:?}");
}

/// A handler dropped mid-flight (its `Delivery` never acknowledged) gets the event again after
/// the claim delay, with `deliveries` 2; once acknowledged it never comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s42_redis_unacked_event_comes_back_once_acked_never() {
    let name = stream("ack");
    let q = RedisStreamQueue::connect(&url(), name.as_str())
        .await
        .unwrap();
    let claim = Duration::from_millis(300);
    let mut c = RedisStreamConsumer::connect(&url(), name.as_str(), "g", "w", claim)
        .await
        .unwrap()
        .with_wait(Duration::from_millis(50));
    let rx = WebhookReceiver::new(GitHub::new(SECRET).unwrap(), q);
    let res = rx.oneshot(request("{\"ack\":1}")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);

    let first = c.next().await.unwrap().expect("the event");
    assert_eq!(first.deliveries, 1);
    // The handler is cancelled: a future holding the delivery is dropped before any ack.
    let handler = {
        let d = first.clone();
        async move {
            std::future::pending::<()>().await;
            drop(d);
        }
    };
    assert!(tokio::time::timeout(Duration::from_millis(1), handler)
        .await
        .is_err());

    let start = Instant::now();
    let again = loop {
        if let Some(d) = c.next().await.unwrap() {
            break d;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the unacknowledged event never came back"
        );
    };
    assert!(
        start.elapsed() + Duration::from_millis(50) >= claim,
        "came back before the claim delay"
    );
    assert_eq!(again.event, first.event);
    assert_eq!(again.deliveries, 2);
    c.ack(&again).await.unwrap();

    // Past two more claim delays nothing comes back.
    let start = Instant::now();
    while start.elapsed() < claim * 2 + Duration::from_millis(100) {
        assert!(
            c.next().await.unwrap().is_none(),
            "an acknowledged event came back"
        );
    }
}

/// "a `next()` cancelled by a timeout or a `select!` loses nothing": five events, three reads cut
/// at once, then every event is read, each acknowledged once, none dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s42_redis_cut_next_loses_nothing() {
    let name = stream("next");
    let q = RedisStreamQueue::connect(&url(), name.as_str())
        .await
        .unwrap();
    let mut c =
        RedisStreamConsumer::connect(&url(), name.as_str(), "g", "w", Duration::from_millis(200))
            .await
            .unwrap()
            .with_wait(Duration::from_millis(50));
    let rx = WebhookReceiver::new(GitHub::new(SECRET).unwrap(), q.clone());
    for i in 0..5 {
        let res = rx
            .clone()
            .oneshot(request(&format!("{{\"e\":{i}}}")))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
    for k in 0..3u64 {
        let _ = tokio::time::timeout(Duration::from_micros(200 * k), c.next()).await;
    }
    let seen = read_all(&mut c, 5).await;
    assert_eq!(seen.len(), 5, "{seen:?}");
    assert!(seen.values().all(|k| *k == 1), "{seen:?}");
    assert_eq!(q.dead_letter_count().await.unwrap(), 0);
}
