//! The durable webhook queue on Redis Streams (`RedisStreamQueue`, `RedisStreamConsumer`), read
//! from docs/guides/webhooks.md ("Queues"), the sturdy-redis rustdoc and docs/RELIABILITY.md: a
//! receiver served over the wire that acknowledges only what is queued while Redis is killed,
//! paused and restarted; consumers dropped or cancelled mid-handle; hostile events; routes that
//! must not share ids; a Redis Cluster with braces in stream names; and the words of errors.
//! Skipped unless STURDY_REDIS_URL (STURDY_REDIS_CLUSTER_URLS for the cluster) is set; the
//! tests that kill, pause or restart Redis start their own `redis-server`.
#![cfg(feature = "full")]

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, UNIX_EPOCH};

use axum::routing::post_service;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use sturdy::core::ErrorKind;
use sturdy::redis::{RedisConnection, RedisStreamConsumer, RedisStreamQueue};
use sturdy::webhook::{
    sign_standard, EventQueue, Push, StandardWebhooks, WebhookEvent, WebhookReceiver,
};
use tokio::time::Instant;

use crate::redis30_util::{
    chain_text, client, cluster_urls, own_redis_possible, post as wire_post, redis_url, serve,
    unique, CutProxy, Mode, OwnRedis,
};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const TTL: Duration = Duration::from_secs(600);

fn has_kind(e: &(dyn std::error::Error + 'static), kind: &ErrorKind) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(x) = cur {
        if let Some(s) = x.downcast_ref::<sturdy::core::Error>() {
            if s.kind() == kind {
                return true;
            }
        }
        cur = x.source();
    }
    false
}

fn now() -> i64 {
    sturdy::core::WallClock::now(&sturdy::core::SystemClock)
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A signed Standard Webhooks delivery over the wire; its status and headers.
async fn deliver(addr: SocketAddr, id: &str, body: &str) -> (StatusCode, HeaderMap) {
    let ts = now();
    let sig = sign_standard(SECRET, id, ts, body.as_bytes()).unwrap();
    let ts = ts.to_string();
    let (s, h, _) = wire_post(
        &client(),
        addr,
        "/hooks",
        &[
            ("webhook-id", id),
            ("webhook-timestamp", &ts),
            ("webhook-signature", &sig),
            ("content-type", "application/json"),
        ],
        body.to_owned(),
    )
    .await
    .unwrap();
    (s, h)
}

async fn receiver_app(queue: RedisStreamQueue) -> SocketAddr {
    let rx = WebhookReceiver::new(StandardWebhooks::new(SECRET).unwrap(), queue);
    serve(axum::Router::new().route("/hooks", post_service(rx))).await
}

/// Takes every event it can within `within`, acknowledging each; the ids.
async fn drain(c: &mut RedisStreamConsumer, within: Duration) -> Vec<String> {
    let t = Instant::now();
    let mut ids = Vec::new();
    while t.elapsed() < within {
        if let Some(d) = c.next().await.unwrap() {
            c.ack(&d).await.unwrap();
            ids.push(d.event.id.clone());
        }
    }
    ids
}

/// "200 only once the event is queued"; "Redis down or restarting | fail-closed: 503 with
/// `Retry-After`; the event is not acknowledged, so the sender delivers it again"; "Redis hung
/// | as above, after the timeout"; "Redis restarts without persistence | every queued event and
/// dedup key is gone | the consumer group is gone too: a consumer that joined before the
/// restart gets errors (`NOGROUP`) until it joins again". A receiver served over the wire, a
/// Redis killed, restarted and paused: every delivery answered 200 is handled exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis30_a_receiver_over_the_wire_through_kill_restart_and_pause() {
    if !own_redis_possible() {
        return;
    }
    let mut redis = OwnRedis::start().await;
    let url = redis.url();
    let queue = RedisStreamQueue::connect(&url, "hooks").await.unwrap();
    let mut consumer = RedisStreamConsumer::connect(&url, "hooks", "g", "w1", TTL)
        .await
        .unwrap()
        .with_wait(Duration::from_millis(50));
    let addr = receiver_app(queue).await;

    assert_eq!(deliver(addr, "e1", "{\"n\":1}").await.0, StatusCode::OK);
    let d = consumer
        .next()
        .await
        .unwrap()
        .expect("e1 was acknowledged, so it is queued");
    assert_eq!(d.event.id, "e1");
    consumer.ack(&d).await.unwrap();

    // Killed: 503 with Retry-After, within the bound.
    redis.kill();
    let t = Instant::now();
    let (s, h) = deliver(addr, "e2", "{\"n\":2}").await;
    assert!(
        t.elapsed() < Duration::from_millis(2500),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert!(h.contains_key("retry-after"), "{h:?}");
    // The first operation on the broken connection may be called `Transport` (see the quota
    // tests); the next one says what Redis is doing.
    let t = Instant::now();
    let _ = consumer.next().await.unwrap_err();
    let e = consumer.next().await.unwrap_err();
    assert!(
        t.elapsed() < Duration::from_millis(2500),
        "{:?}",
        t.elapsed()
    );
    assert!(
        chain_text(&*e).contains("Redis cannot be reached (down, restarting or failing over)"),
        "{}",
        chain_text(&*e)
    );

    // Restarted empty: the receiver works again; the old consumer errs until it joins again.
    redis.restart().await;
    let t = Instant::now();
    loop {
        let (s, _) = deliver(addr, "e2", "{\"n\":2}").await;
        if s == StatusCode::OK {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "no recovery: {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let t = Instant::now();
    loop {
        match consumer.next().await {
            Err(e) => {
                let text = chain_text(&*e);
                if text.contains("NOGROUP") || text.to_lowercase().contains("group") {
                    break;
                }
                assert!(t.elapsed() < Duration::from_secs(10), "{text}");
            }
            Ok(d) => panic!("a consumer of a group that is gone got {d:?}"),
        }
    }
    let mut consumer = RedisStreamConsumer::connect(&url, "hooks", "g", "w1", TTL)
        .await
        .unwrap()
        .with_wait(Duration::from_millis(50));
    // Created after e2 arrived: "A group sees the entries still in the stream when it is created".
    let ids = drain(&mut consumer, Duration::from_millis(500)).await;
    assert_eq!(ids, ["e2"]);

    // Paused: 503 after the 1 s timeout; the sender's redelivery is answered 200 and the event
    // is handled once, whether or not the first push ran once Redis woke up.
    redis.pause(2000);
    let t = Instant::now();
    let (s, _) = deliver(addr, "e3", "{\"n\":3}").await;
    let took = t.elapsed();
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert!(took < Duration::from_millis(2000), "{took:?}");
    tokio::time::sleep(Duration::from_millis(2300).saturating_sub(t.elapsed())).await;
    let t = Instant::now();
    loop {
        let (s, _) = deliver(addr, "e3", "{\"n\":3}").await;
        if s == StatusCode::OK {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "{s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Delivered twice more for good measure: duplicates, 200, not queued.
    assert_eq!(deliver(addr, "e3", "{\"n\":3}").await.0, StatusCode::OK);
    let ids = drain(&mut consumer, Duration::from_millis(800)).await;
    assert_eq!(ids, ["e3"], "handled {} times", ids.len());
}

/// "an event left unacknowledged for the claim delay is delivered again, and
/// `Delivery::deliveries` counts the deliveries"; "one a crashed worker left is taken over".
/// Worker A takes three events and is dropped mid-handle (no ack); worker B, on its own
/// connection, gets every event: the three after the claim delay with `deliveries == 2`, each
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis30_a_worker_dropped_mid_handle_is_taken_over_once() {
    let Some(url) = redis_url() else { return };
    let s = format!("{{{}}}", unique("drop"));
    let claim = Duration::from_millis(300);
    let q = RedisStreamQueue::connect(&url, &s).await.unwrap();
    let mut a = RedisStreamConsumer::connect(&url, &s, "g", "a", claim)
        .await
        .unwrap()
        .with_wait(Duration::from_millis(20));
    let mut b = RedisStreamConsumer::connect(&url, &s, "g", "b", claim)
        .await
        .unwrap()
        .with_wait(Duration::from_millis(20));
    for i in 0..10 {
        let e = WebhookEvent::new("standard", format!("id{i}"), Bytes::from(format!("{i}")));
        assert_eq!(q.push(e, TTL).await.unwrap(), Push::Enqueued);
    }
    let mut held = HashSet::new();
    for _ in 0..3 {
        held.insert(a.next().await.unwrap().unwrap().event.id);
    }
    drop(a);
    let t = Instant::now();
    let mut got: HashMap<String, u64> = HashMap::new();
    while got.len() < 10 {
        assert!(t.elapsed() < Duration::from_secs(10), "got {got:?}");
        if let Some(d) = b.next().await.unwrap() {
            assert!(
                got.insert(d.event.id.clone(), d.deliveries).is_none(),
                "{} handled twice",
                d.event.id
            );
            b.ack(&d).await.unwrap();
        }
    }
    for (id, n) in &got {
        let want = if held.contains(id) { 2 } else { 1 };
        assert_eq!(*n, want, "{id}");
    }
    tokio::time::sleep(claim * 2).await;
    assert!(b.next().await.unwrap().is_none());
}

/// "a `next()` cancelled by a timeout or a `select!` loses nothing (an event a dropped read
/// took is delivered again after the claim delay)". Each `next()` is cut after 0 to 12 ms in
/// turn; every event is still handled, and acknowledged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis30_next_cancelled_at_every_moment_loses_nothing() {
    let Some(url) = redis_url() else { return };
    let s = unique("cancel");
    let q = RedisStreamQueue::connect(&url, &s).await.unwrap();
    let mut c = RedisStreamConsumer::connect(&url, &s, "g", "w", Duration::from_millis(200))
        .await
        .unwrap()
        .with_wait(Duration::from_millis(30));
    for i in 0..15 {
        let e = WebhookEvent::new("standard", format!("c{i}"), Bytes::from_static(b"{}"));
        assert_eq!(q.push(e, TTL).await.unwrap(), Push::Enqueued);
    }
    let mut acked = HashSet::new();
    let t = Instant::now();
    let mut round = 0u64;
    while acked.len() < 15 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "lost: {} of 15 handled",
            acked.len()
        );
        round += 1;
        let cut = Duration::from_millis(round % 13);
        // Every third round is left to finish.
        let got = if round.is_multiple_of(3) {
            Ok(c.next().await)
        } else {
            tokio::time::timeout(cut, c.next()).await
        };
        if let Ok(r) = got {
            if let Some(d) = r.unwrap() {
                c.ack(&d).await.unwrap();
                assert!(acked.insert(d.event.id.clone()), "{} twice", d.event.id);
            }
        }
    }
}

/// Two workers on one group race on 60 events from their own connections: together they handle
/// each event once (claim delay far longer than the run, so nothing is taken over).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis30_two_workers_share_the_work_without_doubles() {
    let Some(url) = redis_url() else { return };
    let s = unique("race");
    let q = RedisStreamQueue::connect(&url, &s).await.unwrap();
    let mut workers = Vec::new();
    for name in ["a", "b"] {
        workers.push(
            RedisStreamConsumer::connect(&url, &s, "g", name, TTL)
                .await
                .unwrap()
                .with_wait(Duration::from_millis(30)),
        );
    }
    for i in 0..60 {
        let e = WebhookEvent::new("standard", format!("r{i}"), Bytes::from_static(b"{}"));
        assert_eq!(q.push(e, TTL).await.unwrap(), Push::Enqueued);
    }
    let mut tasks = Vec::new();
    for mut w in workers {
        tasks.push(tokio::spawn(async move {
            drain(&mut w, Duration::from_millis(1500)).await
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let set: HashSet<_> = all.iter().cloned().collect();
    assert_eq!(all.len(), 60, "handled {} times for 60 events", all.len());
    assert_eq!(set.len(), 60);
}

/// `EventQueue::push`: "Queues `event` unless its dedup key was taken within `dedup_ttl`". A
/// zero dedup TTL (a receiver built `with_dedup_ttl(Duration::ZERO)`, for a scheme without a
/// timestamp) remembers nothing, but must not make every push an error (every delivery 503).
#[tokio::test]
async fn redis30_a_zero_dedup_ttl_is_not_an_error() {
    let Some(url) = redis_url() else { return };
    let s = unique("zero");
    let q = RedisStreamQueue::connect(&url, &s).await.unwrap();
    let e = WebhookEvent::new("github", "sha256:00", Bytes::from_static(b"{}"));
    let r = q.push(e, Duration::ZERO).await;
    assert!(
        matches!(r, Ok(Push::Enqueued)),
        "{:?}",
        r.map_err(|e| chain_text(&*e))
    );
    let e = WebhookEvent::new("github", "sha256:01", Bytes::from_static(b"{}"));
    assert!(q.push(e, Duration::from_nanos(1)).await.is_ok());
    let e = WebhookEvent::new("github", "sha256:02", Bytes::from_static(b"{}"));
    assert_eq!(q.push(e, Duration::MAX).await.unwrap(), Push::Enqueued);
}

/// "Events are deduplicated per scheme and route, so two routes sharing a queue never share an
/// id space": routes and ids with `:` and `%` that would spell the same key if joined.
#[tokio::test]
async fn redis30_routes_and_ids_with_separators_never_share_a_dedup_key() {
    let Some(url) = redis_url() else { return };
    let s = unique("routes");
    let q = RedisStreamQueue::connect(&url, &s).await.unwrap();
    let events = [
        ("standard", "x", "y:z"),
        ("standard", "x:y", "z"),
        ("standard:x", "y", "z"),
        ("standard", "x%3Ay", "z"),
        ("standard", "x", "y%3Az"),
    ];
    for (scheme, route, id) in events {
        let e = WebhookEvent::new(scheme, id, Bytes::from_static(b"{}")).with_route(route);
        assert_eq!(
            q.push(e, TTL).await.unwrap(),
            Push::Enqueued,
            "{scheme} {route} {id}"
        );
    }
}

/// Hostile events through the queue and back: an empty id, a 64 KiB id, an id with control
/// characters and braces, a 1 MiB body of every byte value (not UTF-8), 40 headers. Each comes
/// out as it went in, and a second push of each is a duplicate.
#[tokio::test]
async fn redis30_hostile_events_round_trip() {
    let Some(url) = redis_url() else { return };
    let s = unique("hostile");
    let q = RedisStreamQueue::connect(&url, &s).await.unwrap();
    let mut c = RedisStreamConsumer::connect(&url, &s, "g", "w", TTL)
        .await
        .unwrap()
        .with_wait(Duration::from_millis(50));
    let big_body: Vec<u8> = (0..1024 * 1024).map(|i| (i % 256) as u8).collect();
    let mut headers = HeaderMap::new();
    for i in 0..40 {
        headers.append(
            http::HeaderName::try_from(format!("x-e-{}", i % 10)).unwrap(),
            HeaderValue::from_bytes(format!("v{i}\u{ff}").as_bytes()).unwrap(),
        );
    }
    let events = vec![
        WebhookEvent::new("standard", "", Bytes::from_static(b"")),
        WebhookEvent::new("standard", "i".repeat(64 * 1024), Bytes::from_static(b"x")),
        WebhookEvent::new("standard", "a\r\n\u{0}}{:seen:", Bytes::from_static(b"y")),
        WebhookEvent::new("standard", "big", Bytes::from(big_body))
            .with_headers(headers)
            .with_timestamp(Some(i64::MIN)),
    ];
    for e in &events {
        assert_eq!(q.push(e.clone(), TTL).await.unwrap(), Push::Enqueued);
    }
    for e in &events {
        assert_eq!(q.push(e.clone(), TTL).await.unwrap(), Push::Duplicate);
    }
    for want in &events {
        let d = c.next().await.unwrap().expect("the event");
        assert_eq!(d.event.id, want.id);
        assert_eq!(d.event.body, want.body, "{}", want.id.len());
        assert_eq!(d.event.headers, want.headers);
        assert_eq!(d.event.timestamp, want.timestamp);
        assert_eq!(d.event.scheme, want.scheme);
        assert_eq!(d.event.route, want.route);
        c.ack(&d).await.unwrap();
    }
}

/// Redis Cluster: "The stream, its dedup keys and its dead-letter stream share one hash slot
/// whatever the stream's name"; "a stream name with a `}` but no hash tag is refused". Every
/// stream name below is either refused when the queue is made, or works end to end on the
/// cluster (push, duplicate, next, dead-letter, list, replay, ack).
#[tokio::test]
async fn redis30_cluster_stream_names_with_braces_work_or_are_refused() {
    let Some(nodes) = cluster_urls() else { return };
    let b = || unique("cl").replace(['{', '}'], "");
    let names = [
        b(),
        format!("{{{}}}", b()),
        format!("a{{{}}}b", b()),
        format!("{}{{", b()),
        format!("{{{}", b()),
        format!("}}{{{}}}", b()),
        format!("{{}}{{{}}}", b()),
        format!("{}}}", b()),
        format!("{{}}{}", b()),
    ];
    for name in &names {
        let conn = RedisConnection::connect_cluster(&nodes).await.unwrap();
        let q = match RedisStreamQueue::new(conn.clone(), name.clone()) {
            Ok(q) => q,
            Err(e) => {
                assert!(name.contains('}'), "{name:?} refused: {e}");
                continue;
            }
        };
        let mut c = RedisStreamConsumer::join(conn, name.clone(), "g", "w", TTL)
            .await
            .unwrap_or_else(|e| panic!("{name:?}: {}", chain_text(&*e)))
            .with_wait(Duration::from_millis(30));
        let e = WebhookEvent::new("standard", "one", Bytes::from_static(b"{}"));
        let r = q.push(e.clone(), TTL).await;
        assert!(
            matches!(r, Ok(Push::Enqueued)),
            "{name:?}: {:?}",
            r.map_err(|e| chain_text(&*e))
        );
        assert_eq!(q.push(e, TTL).await.unwrap(), Push::Duplicate, "{name:?}");
        let d = c
            .next()
            .await
            .unwrap_or_else(|e| panic!("{name:?}: {}", chain_text(&*e)))
            .expect("the event");
        c.dead_letter(&d, "poison")
            .await
            .unwrap_or_else(|e| panic!("{name:?}: {}", chain_text(&*e)));
        let dead = q
            .dead_letters(None, 10)
            .await
            .unwrap_or_else(|e| panic!("{name:?}: {}", chain_text(&*e)));
        assert_eq!(dead.len(), 1, "{name:?}");
        assert!(q.replay_dead_letter(&dead[0].entry).await.unwrap());
        let d = c.next().await.unwrap().expect("replayed");
        assert_eq!(d.deliveries, 1);
        c.ack(&d).await.unwrap();
    }
}

/// "A dead-letter stream named with `with_dead_letter_stream` must carry the stream's hash
/// tag" / "or every operation that touches both fails with an error that says so".
#[tokio::test]
async fn redis30_cluster_dead_letter_stream_in_another_slot_says_so() {
    let Some(nodes) = cluster_urls() else { return };
    let s = format!("{{{}}}", unique("dl").replace(['{', '}'], ""));
    let conn = RedisConnection::connect_cluster(&nodes).await.unwrap();
    // A name in (almost certainly) another slot.
    let other = format!("{{other-{}}}:dead", unique("x").replace(['{', '}'], ""));
    let q = RedisStreamQueue::new(conn.clone(), s.clone())
        .unwrap()
        .with_dead_letter_stream(other.clone());
    let mut c = RedisStreamConsumer::join(conn, s.clone(), "g", "w", TTL)
        .await
        .unwrap()
        .with_dead_letter_stream(other)
        .with_wait(Duration::from_millis(30));
    let e = WebhookEvent::new("standard", "one", Bytes::from_static(b"{}"));
    assert_eq!(q.push(e, TTL).await.unwrap(), Push::Enqueued);
    // `next` touches the stream and the dead-letter stream (it dead-letters poison events).
    let err = c.next().await.unwrap_err();
    let text = chain_text(&*err).to_lowercase();
    assert!(
        text.contains("different hash slots") && text.contains("same hash tag"),
        "the error should say the keys are in two slots: {text}"
    );
}

/// The words of `ack`'s errors: "When Redis fails or does not answer in time. The event then
/// stays pending and is delivered again, unless the command reached Redis before the failure
/// (a `Timeout`, or a `Transport` error: the connection broke before the answer), in which case
/// it may have been done." An ack cut after it was sent is `Transport` and says "may have run";
/// an ack on a hung Redis is a `Timeout` within the bound. Either way, nothing is handled twice
/// once Redis answers again if the ack did run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis30_ack_errors_say_whether_the_ack_may_have_run() {
    let Some(url) = redis_url() else { return };
    let target = crate::redis30_util::port_of(&url);
    let proxy = CutProxy::start(SocketAddr::from(([127, 0, 0, 1], target))).await;
    let s = unique("ackcut");
    let q = RedisStreamQueue::connect(&url, &s).await.unwrap();
    let mut c =
        RedisStreamConsumer::connect(&proxy.url(), &s, "g", "w", Duration::from_millis(300))
            .await
            .unwrap()
            .with_wait(Duration::from_millis(30));
    let e = WebhookEvent::new("standard", "a1", Bytes::from_static(b"{}"));
    assert_eq!(q.push(e, TTL).await.unwrap(), Push::Enqueued);
    let d = c.next().await.unwrap().expect("the event");
    proxy.set(Mode::Cut);
    let err = c.ack(&d).await.unwrap_err();
    let text = chain_text(&*err);
    assert!(has_kind(&*err, &ErrorKind::Transport), "{text}");
    assert!(text.contains("may have run"), "{text}");
    assert!(!text.contains("cannot be reached"), "{text}");
    proxy.set(Mode::Pass);
    // The ack went through before the cut: the event is not delivered again.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let t = Instant::now();
    let again = loop {
        match c.next().await {
            Ok(x) => break x,
            Err(e) => assert!(t.elapsed() < Duration::from_secs(5), "{}", chain_text(&*e)),
        }
    };
    assert!(
        again.is_none(),
        "acknowledged, yet delivered again: {again:?}"
    );
}

/// RELIABILITY.md, "Redis hung": "the error comes after the timeout (for `next()`, the wait for
/// a new event comes on top)"; an `ack` on a hung Redis is a `Timeout`; a push is an error
/// within the timeout. Then, "None of them blocks the connection": once Redis is back, a push
/// over the connection a waiting consumer shares answers at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis30_a_hung_redis_bounds_every_operation_and_the_shared_connection_is_free() {
    if !own_redis_possible() {
        return;
    }
    let redis = OwnRedis::start().await;
    let conn = RedisConnection::connect(&redis.url()).await.unwrap();
    let q = RedisStreamQueue::new(conn.clone(), "s").unwrap();
    let mut c = RedisStreamConsumer::join(conn.clone(), "s", "g", "w", TTL)
        .await
        .unwrap()
        .with_wait(Duration::from_millis(300));
    let e = WebhookEvent::new("standard", "h1", Bytes::from_static(b"{}"));
    assert_eq!(q.push(e, TTL).await.unwrap(), Push::Enqueued);
    let d = c.next().await.unwrap().unwrap();
    redis.pause(3500);
    let t = Instant::now();
    let err = c.ack(&d).await.unwrap_err();
    assert!(
        t.elapsed() < Duration::from_millis(1900),
        "{:?}",
        t.elapsed()
    );
    assert!(
        has_kind(&*err, &ErrorKind::Timeout),
        "{}",
        chain_text(&*err)
    );
    let t = Instant::now();
    let err = c.next().await.unwrap_err();
    assert!(
        t.elapsed() < Duration::from_millis(2300),
        "{:?}",
        t.elapsed()
    );
    assert!(
        has_kind(&*err, &ErrorKind::Timeout),
        "{}",
        chain_text(&*err)
    );
    let t = Instant::now();
    let e = WebhookEvent::new("standard", "h2", Bytes::from_static(b"{}"));
    assert!(q.push(e, TTL).await.is_err());
    assert!(
        t.elapsed() < Duration::from_millis(1900),
        "{:?}",
        t.elapsed()
    );
    redis.unpause();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A consumer waits for events on the shared connection; pushes beside it are prompt.
    let waiter = tokio::spawn(async move {
        let mut got = Vec::new();
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(1500) {
            if let Some(d) = c.next().await.unwrap() {
                c.ack(&d).await.unwrap();
                got.push(d.event.id.clone());
            }
        }
        got
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    for i in 0..5 {
        let t = Instant::now();
        let e = WebhookEvent::new("standard", format!("p{i}"), Bytes::from_static(b"{}"));
        let r = q.push(e, TTL).await.unwrap();
        assert!(
            t.elapsed() < Duration::from_millis(250),
            "a push beside a waiting consumer took {:?}",
            t.elapsed()
        );
        assert_eq!(r, Push::Enqueued);
    }
    let got = waiter.await.unwrap();
    // h1 was not acknowledged (its ack timed out, and may have run): it may come back once; h2's
    // push timed out and may have run too. p0..p4 come once each.
    for i in 0..5 {
        let id = format!("p{i}");
        assert_eq!(got.iter().filter(|g| **g == id).count(), 1, "{got:?}");
    }
}

/// The key layout: a stream name without a hash tag gets `{<stream>}:seen:...` and
/// `{<stream>}:dead`; one with a tag gets `<stream>:seen:...` and `<stream>:dead`. So the
/// streams `webhooks` and `{webhooks}` (say, before and after a move to a cluster-friendly
/// name) are two queues that share dedup keys and a dead-letter stream: an event queued on one
/// is answered `Duplicate` on the other (the receiver answers 200 and never queues it there),
/// and each lists the other's dead letters. Two stream names should be two queues.
#[tokio::test]
async fn redis30_two_stream_names_never_take_one_anothers_events_for_duplicates() {
    let Some(url) = redis_url() else { return };
    let plain = unique("share").replace(['{', '}'], "");
    let tagged = format!("{{{plain}}}");
    let qa = RedisStreamQueue::connect(&url, &plain).await.unwrap();
    let qb = RedisStreamQueue::connect(&url, &tagged).await.unwrap();
    let mut ca = RedisStreamConsumer::connect(&url, &plain, "g", "w", TTL)
        .await
        .unwrap()
        .with_wait(Duration::from_millis(30));
    let e = WebhookEvent::new("standard", "evt_1", Bytes::from_static(b"{}"));
    assert_eq!(qa.push(e.clone(), TTL).await.unwrap(), Push::Enqueued);
    let d = ca.next().await.unwrap().unwrap();
    ca.dead_letter(&d, "poison").await.unwrap();
    // The two names share one key base (documented): while both streams exist, a push to the
    // other is refused with an error naming both, never answered as a duplicate (which a
    // receiver acknowledges with 200 and never queues).
    let err = qb.push(e, TTL).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains(&format!("{plain:?}")) && text.contains(&format!("{tagged:?}")),
        "{text}"
    );
    assert!(text.contains("rename one of them"), "{text}");
}
