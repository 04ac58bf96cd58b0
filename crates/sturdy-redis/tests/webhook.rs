//! The Redis Streams webhook queue against the real Redis at STURDY_REDIS_URL.

mod support;
use support::{redis_url, unique};

fn stream(name: &str) -> String {
    unique(&format!("webhooks:{name}"))
}

use std::time::Duration;

use bytes::Bytes;
use sturdy_redis::{RedisStreamConsumer, RedisStreamQueue};
use sturdy_webhook::{EventQueue, Push, WebhookEvent};

fn event(id: &str) -> WebhookEvent {
    WebhookEvent {
        scheme: "standard".into(),
        id: id.into(),
        body: Bytes::from(format!("{{\"id\":\"{id}\"}}")),
    }
}

#[tokio::test]
async fn two_instances_dedup_and_a_crashed_worker_is_taken_over() {
    let Some(url) = redis_url() else { return };
    let s = stream("crash");
    let q1 = RedisStreamQueue::connect(&url, &s).await.unwrap();
    let q2 = RedisStreamQueue::connect(&url, &s).await.unwrap();
    let ttl = Duration::from_secs(60);
    assert_eq!(q1.push(event("evt_1"), ttl).await.unwrap(), Push::Enqueued);
    // The same event arriving at the other instance is a duplicate.
    assert_eq!(q2.push(event("evt_1"), ttl).await.unwrap(), Push::Duplicate);
    assert_eq!(q2.push(event("evt_2"), ttl).await.unwrap(), Push::Enqueued);

    let mut a = RedisStreamConsumer::connect(&url, &s, "workers", "a", Duration::from_millis(200))
        .await
        .unwrap();
    let mut b = RedisStreamConsumer::connect(&url, &s, "workers", "b", Duration::from_millis(200))
        .await
        .unwrap();
    // Worker a takes evt_1 and dies mid-event: no ack.
    let taken = a.next().await.unwrap().unwrap();
    assert_eq!(taken.event, event("evt_1"));
    drop(a);
    // Worker b gets the other event at once, and evt_1 once it has been idle long enough.
    let d2 = b.next().await.unwrap().unwrap();
    assert_eq!(d2.event.id, "evt_2");
    b.ack(&d2).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let d1 = b.next().await.unwrap().unwrap();
    assert_eq!(d1.event, event("evt_1"));
    b.ack(&d1).await.unwrap();
    // Nothing left, nothing delivered twice after its ack.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(b.next().await.unwrap().is_none());
}

#[tokio::test]
async fn a_full_stream_refuses_and_does_not_remember_the_id() {
    let Some(url) = redis_url() else { return };
    let s = stream("full");
    let q = RedisStreamQueue::connect(&url, &s)
        .await
        .unwrap()
        .with_max_backlog(2);
    let ttl = Duration::from_secs(60);
    assert_eq!(q.push(event("a"), ttl).await.unwrap(), Push::Enqueued);
    assert_eq!(q.push(event("b"), ttl).await.unwrap(), Push::Enqueued);
    assert_eq!(q.push(event("c"), ttl).await.unwrap(), Push::Full);
    let mut w = RedisStreamConsumer::connect(&url, &s, "g", "w", Duration::from_secs(30))
        .await
        .unwrap();
    let d = w.next().await.unwrap().unwrap();
    w.ack(&d).await.unwrap();
    assert_eq!(
        q.push(event("c"), ttl).await.unwrap(),
        Push::Enqueued,
        "the redelivery is accepted"
    );
}
