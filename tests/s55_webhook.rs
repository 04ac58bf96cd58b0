//! s55 outside round: docs/guides/webhooks.md "How long a copy is refused" and
//! `WebhookReceiver::with_dedup_ttl`'s rustdoc, read literally, with the Redis Streams queue
//! on the shared Redis Cluster: the dedup key's time to live is read from Redis itself.
#![cfg(feature = "full")]

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use http::Request;
use sturdy::core::WallClock;
use sturdy::redis::{RedisStreamConsumer, RedisStreamQueue};
use sturdy::webhook::{sign_github, sign_standard, GitHub, StandardWebhooks, WebhookReceiver};
use tower::ServiceExt;

use crate::s55_cluster::{cli_num, nodes, port0, scan_all, unique};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const GH_SECRET: &str = "s55 github secret";

#[derive(Debug, Clone, Copy)]
struct Fixed(SystemTime);
impl WallClock for Fixed {
    fn now(&self) -> SystemTime {
        self.0
    }
}

fn now_s() -> i64 {
    sturdy::core::SystemClock
        .now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

async fn send_standard(rx: &WebhookReceiver<RedisStreamQueue>, id: &str, ts: i64) -> u16 {
    let body = format!("{{\"id\":\"{id}\"}}");
    let sig = sign_standard(SECRET, id, ts, body.as_bytes()).unwrap();
    let req = Request::post("/hook")
        .header("webhook-id", id)
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", sig)
        .body(Body::from(body))
        .unwrap();
    rx.clone().oneshot(req).await.unwrap().status().as_u16()
}

async fn send_github(rx: &WebhookReceiver<RedisStreamQueue>, body: &str) -> u16 {
    let req = Request::post("/hook")
        .header(
            "x-hub-signature-256",
            sign_github(GH_SECRET, body.as_bytes()),
        )
        .header("x-github-event", "push")
        .header("x-github-delivery", "d-1")
        .body(Body::from(body.to_owned()))
        .unwrap();
    rx.clone().oneshot(req).await.unwrap().status().as_u16()
}

/// The PTTL of the one dedup key of `stream` (no hash tag: base `{stream}`) whose name ends
/// with `id`.
fn dedup_pttl(stream: &str, id: &str) -> i64 {
    let keys = scan_all(&format!("{{{stream}}}:seen:*"));
    let key = keys
        .iter()
        .find(|k| k.ends_with(&format!(":{id}")))
        .unwrap_or_else(|| panic!("no dedup key for {id} in {keys:?}"));
    cli_num(port0(), &["PTTL", key])
}

async fn drain(n: &[String], stream: &str) -> Vec<String> {
    let mut c = RedisStreamConsumer::connect_cluster(
        n,
        stream.to_owned(),
        "g",
        "w",
        Duration::from_secs(60),
    )
    .await
    .unwrap()
    .with_wait(Duration::from_millis(150));
    let mut ids = Vec::new();
    while let Some(d) = c.next().await.unwrap() {
        ids.push(d.event.id.clone());
        c.ack(&d).await.unwrap();
    }
    ids
}

/// webhooks.md: "Schemes with a signed timestamp ...: The dedup key is kept at least until the
/// timestamp plus the tolerance plus one second ..., and a minute more, whatever the dedup
/// TTL"; `with_dedup_ttl`: "a key is kept at least until the delivery would be refused as
/// stale (timestamp plus tolerance) and a minute more". A 1 ms dedup TTL; timestamps now, 250 s
/// ago and 250 s ahead (tolerance 5 min, both directions).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s55_webhook_signed_timestamp_key_outlives_its_window_whatever_the_ttl() {
    let Some(n) = nodes() else { return };
    let stream = unique("hook-window");
    // The group first, so that it sees every event.
    let _group =
        RedisStreamConsumer::connect_cluster(&n, stream.clone(), "g", "w", Duration::from_secs(60))
            .await
            .unwrap();
    let queue = RedisStreamQueue::connect_cluster(&n, stream.clone())
        .await
        .unwrap();
    let rx = WebhookReceiver::new(StandardWebhooks::new(SECRET).unwrap(), queue)
        .with_dedup_ttl(Duration::from_millis(1));
    let now = now_s();
    let cases = [
        ("msg_now", now),
        ("msg_past", now - 250),
        ("msg_future", now + 250),
    ];
    for (id, ts) in cases {
        assert_eq!(send_standard(&rx, id, ts).await, 200, "{id}");
    }
    for (id, ts) in cases {
        let at_least_ms = (ts + 300 + 1 + 60 - now_s()) * 1000;
        let pttl = dedup_pttl(&stream, id);
        assert!(
            pttl >= at_least_ms - 3000,
            "{id}: dedup key PTTL {pttl} ms, expected at least about {at_least_ms} ms"
        );
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    for (id, ts) in cases {
        assert_eq!(send_standard(&rx, id, ts).await, 200, "copy of {id}");
    }
    let mut ids = drain(&n, &stream).await;
    ids.sort();
    assert_eq!(
        ids,
        ["msg_future", "msg_now", "msg_past"],
        "a copy was queued"
    );
}

/// webhooks.md: "With the age check turned off (`with_tolerance(Duration::MAX)`), a copy
/// passes at any age, so its key is kept as long as the queue keeps a key at all: about 30
/// years in Redis". And a dedup TTL of `Duration::MAX` with the default tolerance: also
/// about 30 years (the longest the queue keeps a key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s55_webhook_age_check_off_keeps_the_key_about_30_years() {
    let Some(n) = nodes() else { return };
    const YEAR_MS: i64 = 365 * 24 * 3600 * 1000;
    let stream = unique("hook-30y");
    let queue = RedisStreamQueue::connect_cluster(&n, stream.clone())
        .await
        .unwrap();
    let rx = WebhookReceiver::new(
        StandardWebhooks::new(SECRET)
            .unwrap()
            .with_tolerance(Duration::MAX),
        queue.clone(),
    )
    .with_dedup_ttl(Duration::from_millis(1));
    // An old timestamp passes with the age check off.
    assert_eq!(send_standard(&rx, "msg_old", 1_000).await, 200);
    let pttl = dedup_pttl(&stream, "msg_old");
    assert!(
        pttl > 29 * YEAR_MS && pttl < 31 * YEAR_MS,
        "PTTL {pttl} ms is not about 30 years"
    );
    let rx = WebhookReceiver::new(StandardWebhooks::new(SECRET).unwrap(), queue)
        .with_dedup_ttl(Duration::MAX);
    assert_eq!(send_standard(&rx, "msg_max", now_s()).await, 200);
    let pttl = dedup_pttl(&stream, "msg_max");
    assert!(
        pttl > 29 * YEAR_MS && pttl < 31 * YEAR_MS,
        "PTTL {pttl} ms is not about 30 years"
    );
}

/// webhooks.md: "ages are compared in whole seconds: a copy 1.9 s past a 1 s tolerance is "1 s
/// old" and passes", and the key is kept until "the timestamp plus the tolerance plus one
/// second ..., and a minute more": from a clock 1.9 s after the timestamp, about 60.1 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s55_webhook_whole_second_ages_and_the_minute_more() {
    let Some(n) = nodes() else { return };
    let stream = unique("hook-whole");
    let queue = RedisStreamQueue::connect_cluster(&n, stream.clone())
        .await
        .unwrap();
    let ts = now_s();
    let clock_at = |ms: u64| {
        Arc::new(Fixed(
            UNIX_EPOCH + Duration::from_secs(ts as u64) + Duration::from_millis(ms),
        )) as Arc<dyn WallClock>
    };
    let verifier = StandardWebhooks::new(SECRET)
        .unwrap()
        .with_tolerance(Duration::from_secs(1));
    let rx = WebhookReceiver::new(verifier.clone(), queue.clone())
        .with_dedup_ttl(Duration::from_millis(1))
        .with_clock(clock_at(1900));
    assert_eq!(send_standard(&rx, "msg_19", ts).await, 200);
    let pttl = dedup_pttl(&stream, "msg_19");
    assert!(pttl >= 58_000, "PTTL {pttl} ms, expected about 60,100 ms");
    let late = WebhookReceiver::new(verifier, queue)
        .with_dedup_ttl(Duration::from_millis(1))
        .with_clock(clock_at(2500));
    assert_eq!(send_standard(&late, "msg_25", ts).await, 401);
}

/// webhooks.md: "Schemes without one (GitHub ...): while the digest is remembered, that is the
/// dedup TTL"; a zero dedup TTL remembers nothing, and a delivery is still answered 200 (a
/// 503 would make the sender redeliver forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s55_webhook_github_copy_refused_for_the_dedup_ttl_only() {
    let Some(n) = nodes() else { return };
    let stream = unique("hook-gh");
    let _group =
        RedisStreamConsumer::connect_cluster(&n, stream.clone(), "g", "w", Duration::from_secs(60))
            .await
            .unwrap();
    let queue = RedisStreamQueue::connect_cluster(&n, stream.clone())
        .await
        .unwrap();
    let rx = WebhookReceiver::new(GitHub::new(GH_SECRET).unwrap(), queue.clone())
        .with_dedup_ttl(Duration::from_millis(400));
    let body = "{\"action\":\"opened\"}";
    assert_eq!(send_github(&rx, body).await, 200);
    assert_eq!(send_github(&rx, body).await, 200);
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(send_github(&rx, body).await, 200);
    let ids = drain(&n, &stream).await;
    assert_eq!(ids.len(), 2, "{ids:?}");

    let zero =
        WebhookReceiver::new(GitHub::new(GH_SECRET).unwrap(), queue).with_dedup_ttl(Duration::ZERO);
    assert_eq!(
        send_github(&zero, "{\"zero\":1}").await,
        200,
        "a zero dedup TTL made the delivery fail"
    );
}

/// webhooks.md step 5: "a full queue gets 503 with `Retry-After` and the id is not
/// remembered, so the redelivery is accepted" (the Redis queue at its backlog).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s55_webhook_full_redis_queue_is_503_and_the_redelivery_is_accepted() {
    let Some(n) = nodes() else { return };
    let stream = unique("hook-full");
    let mut c =
        RedisStreamConsumer::connect_cluster(&n, stream.clone(), "g", "w", Duration::from_secs(60))
            .await
            .unwrap()
            .with_wait(Duration::from_millis(150));
    let queue = RedisStreamQueue::connect_cluster(&n, stream.clone())
        .await
        .unwrap()
        .with_max_backlog(1);
    let rx = WebhookReceiver::new(StandardWebhooks::new(SECRET).unwrap(), queue);
    let ts = now_s();
    assert_eq!(send_standard(&rx, "msg_a", ts).await, 200);
    let body = "{\"id\":\"msg_b\"}";
    let req = Request::post("/hook")
        .header("webhook-id", "msg_b")
        .header("webhook-timestamp", ts.to_string())
        .header(
            "webhook-signature",
            sign_standard(SECRET, "msg_b", ts, body.as_bytes()).unwrap(),
        )
        .body(Body::from(body))
        .unwrap();
    let resp = rx.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status().as_u16(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    let d = c.next().await.unwrap().unwrap();
    assert_eq!(d.event.id, "msg_a");
    c.ack(&d).await.unwrap();
    assert_eq!(send_standard(&rx, "msg_b", ts).await, 200);
    let d = c.next().await.unwrap().expect("the redelivery was queued");
    assert_eq!(d.event.id, "msg_b");
}
