//! The Redis Streams webhook queue read literally from docs/guides/webhooks.md and the
//! sturdy-redis docs: dead-letter reasons, replays that must not duplicate work, and groups.

use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use sturdy::redis::{RedisConnection, RedisStreamConsumer, RedisStreamQueue};
use sturdy::webhook::{EventQueue, Push, WebhookEvent};

const TTL: Duration = Duration::from_secs(60);

fn redis_url() -> String {
    std::env::var("STURDY_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:17379/".to_owned())
}

fn unique(what: &str) -> String {
    let n = sturdy::core::WallClock::now(&sturdy::core::clock::SystemClock)
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{{durable26-{what}-{n}}}")
}

async fn conn() -> RedisConnection {
    RedisConnection::connect(&redis_url()).await.unwrap()
}

/// "`consumer.dead_letter(&d, reason)` moves one at once ... with `reason` (at most 1 KiB
/// kept)": a reason of multi-byte characters is cut to at most 1 KiB of whole characters, and
/// the dead letter stays listable, replayable and discardable.
#[tokio::test]
async fn durable26_a_long_reason_of_multibyte_characters_keeps_the_dead_letter_usable() {
    let s = unique("reason");
    let q = RedisStreamQueue::new(conn().await, &s).unwrap();
    let mut c = RedisStreamConsumer::join(conn().await, &s, "g", "w", TTL)
        .await
        .unwrap()
        .with_wait(Duration::from_millis(20));
    for (i, reason) in [
        "€".repeat(2000),
        "𝄞".repeat(1000),
        format!("x{}", "é".repeat(1000)),
    ]
    .iter()
    .enumerate()
    {
        let e = WebhookEvent::new("standard", format!("r{i}"), Bytes::from_static(b"{}"));
        assert_eq!(q.push(e, TTL).await.unwrap(), Push::Enqueued);
        let d = c.next().await.unwrap().expect("the event");
        c.dead_letter(&d, reason).await.unwrap();
    }
    let dead = q
        .dead_letters(None, 10)
        .await
        .expect("dead letters with a cut multi-byte reason must still be listed");
    assert_eq!(dead.len(), 3);
    let reasons = [
        "€".repeat(2000),
        "𝄞".repeat(1000),
        format!("x{}", "é".repeat(1000)),
    ];
    for (d, full) in dead.iter().zip(reasons.iter()) {
        assert!(d.reason.len() <= 1024, "{}", d.reason.len());
        assert!(
            full.starts_with(&d.reason),
            "the kept reason is not a prefix of the given one: {:?}",
            &d.reason[d.reason.len().saturating_sub(12)..]
        );
        assert!(
            d.reason.len() > 1000,
            "almost 1 KiB is kept: {}",
            d.reason.len()
        );
    }
    assert!(q.replay_dead_letter(&dead[0].entry).await.unwrap());
    assert!(q.discard_dead_letter(&dead[1].entry).await.unwrap());
    assert_eq!(q.dead_letter_count().await.unwrap(), 1);
}

/// A dead letter replayed by two operators at once goes back on the stream once: one replay
/// is `Ok(true)`, the other `Ok(false)` ("no such dead letter"), and the group gets the event
/// once, with a fresh count.
#[tokio::test]
async fn durable26_a_dead_letter_replayed_twice_at_once_is_delivered_once() {
    let s = unique("replay2");
    let q = RedisStreamQueue::new(conn().await, &s).unwrap();
    let mut c = RedisStreamConsumer::join(conn().await, &s, "g", "w", Duration::from_millis(100))
        .await
        .unwrap()
        .with_wait(Duration::from_millis(20));
    let e = WebhookEvent::new("standard", "once", Bytes::from_static(b"{\"x\":1}"));
    assert_eq!(q.push(e, TTL).await.unwrap(), Push::Enqueued);
    let d = c.next().await.unwrap().unwrap();
    c.dead_letter(&d, "poison").await.unwrap();
    let dead = q.dead_letters(None, 10).await.unwrap();
    let q2 = RedisStreamQueue::new(conn().await, &s).unwrap();
    let (a, b) = tokio::join!(
        q.replay_dead_letter(&dead[0].entry),
        q2.replay_dead_letter(&dead[0].entry)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert!(a ^ b, "exactly one replay: {a} {b}");
    let d = c.next().await.unwrap().expect("replayed");
    assert_eq!(d.deliveries, 1);
    assert_eq!(d.event.id, "once");
    c.ack(&d).await.unwrap();
    // Well past the claim delay: nothing else comes.
    tokio::time::sleep(Duration::from_millis(250)).await;
    let more = c.next().await.unwrap();
    assert!(more.is_none(), "delivered again: {more:?}");
    assert_eq!(q.dead_letter_count().await.unwrap(), 0);
}

/// "`queue.replay_dead_letter(&dead.entry)` puts one back for the group that gave up on it
/// (with a fresh count; other groups skip it)": group `a` dead-letters, group `b` acknowledges;
/// after the replay `a` gets it once more and `b` never again.
#[tokio::test]
async fn durable26_a_replay_goes_to_the_group_that_gave_up_only() {
    let s = unique("groups");
    let q = RedisStreamQueue::new(conn().await, &s).unwrap();
    let mut a = RedisStreamConsumer::join(conn().await, &s, "a", "wa", Duration::from_millis(100))
        .await
        .unwrap()
        .with_wait(Duration::from_millis(20));
    let mut b = RedisStreamConsumer::join(conn().await, &s, "b", "wb", Duration::from_millis(100))
        .await
        .unwrap()
        .with_wait(Duration::from_millis(20));
    let e = WebhookEvent::new("github", "sha256:00", Bytes::from_static(b"[]"));
    assert_eq!(q.push(e, TTL).await.unwrap(), Push::Enqueued);
    let da = a.next().await.unwrap().unwrap();
    let db = b.next().await.unwrap().unwrap();
    b.ack(&db).await.unwrap();
    a.dead_letter(&da, "a cannot").await.unwrap();
    let dead = q.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].group, "a");
    assert_eq!(dead[0].deliveries, 1);
    assert_eq!(dead[0].reason, "a cannot");
    assert!(q.replay_dead_letter(&dead[0].entry).await.unwrap());
    let again = a.next().await.unwrap().expect("a gets it again");
    assert_eq!(
        (again.deliveries, again.event.id.as_str()),
        (1, "sha256:00")
    );
    a.ack(&again).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(b.next().await.unwrap().is_none(), "group b saw the replay");
    assert!(a.next().await.unwrap().is_none());
}

/// `queue.with_replication(1, timeout)` "acknowledges an event only once a replica confirmed
/// it"; its rustdoc: "when fewer replicas confirm in time, returns an error: the receiver
/// answers 503 and the sender delivers the event again". The test Redis has no replica, so no
/// delivery can ever be confirmed: the sender's redelivery must get 503 again, never a 200 for
/// a "duplicate" of an event no replica holds (a failover would lose it after its sender was
/// told it was safe).
#[tokio::test]
async fn durable26_a_redelivery_of_an_unreplicated_event_is_not_acknowledged() {
    use axum::body::Body;
    use http::Request;
    use sturdy::webhook::{sign_github, GitHub, WebhookReceiver};
    use tower::ServiceExt;
    let s = unique("repl");
    let q = RedisStreamQueue::new(conn().await, &s)
        .unwrap()
        .with_replication(1, Duration::from_millis(30));
    let rx = WebhookReceiver::new(GitHub::new("gh_repl").unwrap(), q);
    let body = "{\"repl\":true}";
    let delivery = || {
        Request::post("/hook")
            .header(
                "x-hub-signature-256",
                sign_github("gh_repl", body.as_bytes()),
            )
            .body(Body::from(body))
            .unwrap()
    };
    let first = rx.clone().oneshot(delivery()).await.unwrap();
    assert_eq!(first.status(), http::StatusCode::SERVICE_UNAVAILABLE);
    assert!(first.headers().contains_key("retry-after"));
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(
            rx.clone()
                .oneshot(delivery())
                .await
                .unwrap()
                .status()
                .as_u16(),
        );
    }
    assert_eq!(
        statuses,
        [503, 503, 503],
        "a redelivery was acknowledged though no replica confirmed the event"
    );
}

/// "Several consumer groups may read one stream, each getting every event. `ack` deletes an
/// entry only when no other group still needs it (not read yet, or held unacknowledged)."
/// Hundreds of events pushed at once share milliseconds (entry ids `<ms>-9`, `<ms>-10`, ...);
/// group `a` acknowledges each entry just before group `b` reads it, so every ack happens while
/// `b` still needs the entry. `b` must still get every event, in order.
#[tokio::test]
async fn durable26_two_groups_each_get_every_event_of_a_burst() {
    let s = unique("burst");
    let c0 = conn().await;
    let q = RedisStreamQueue::new(c0.clone(), &s).unwrap();
    let mut a = RedisStreamConsumer::join(c0.clone(), &s, "a", "wa", TTL)
        .await
        .unwrap()
        .with_wait(Duration::from_millis(20));
    let mut b = RedisStreamConsumer::join(c0.clone(), &s, "b", "wb", TTL)
        .await
        .unwrap()
        .with_wait(Duration::from_millis(20));
    const N: usize = 400;
    let pushes = (0..N).map(|i| {
        let q = q.clone();
        async move {
            let e = WebhookEvent::new("standard", format!("e{i}"), Bytes::from(i.to_string()));
            q.push(e, TTL).await.unwrap()
        }
    });
    let results = futures_util::future::join_all(pushes).await;
    assert!(results.iter().all(|r| *r == Push::Enqueued));
    // Group a takes every event first (pending, not acknowledged yet).
    let mut taken = Vec::new();
    while let Some(d) = a.next().await.unwrap() {
        taken.push(d);
    }
    assert_eq!(taken.len(), N);
    let big_seq = taken
        .iter()
        .filter(|d| {
            d.entry
                .split_once('-')
                .is_some_and(|(_, seq)| seq.len() >= 2)
        })
        .count();
    eprintln!("{big_seq} of {N} entries have a two-digit sequence number");
    // Then: a acknowledges entry j while b has read up to entry j - 1.
    let mut got = Vec::new();
    for d in &taken {
        a.ack(d).await.unwrap();
        if let Some(db) = b.next().await.unwrap() {
            b.ack(&db).await.unwrap();
            got.push(db.event.id.clone());
        }
    }
    while let Some(db) = b.next().await.unwrap() {
        b.ack(&db).await.unwrap();
        got.push(db.event.id.clone());
    }
    let want: Vec<String> = taken.iter().map(|d| d.event.id.clone()).collect();
    let missing: Vec<&String> = want.iter().filter(|w| !got.contains(w)).collect();
    assert!(
        missing.is_empty(),
        "group b never got {} events, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert_eq!(got, want, "group b got them out of order or twice");
}

/// `replay_dead_letter`: "When the stream is full (its backlog is at the maximum)" it is an
/// error, and the dead letter must stay (listed, replayable once there is room): nothing lost.
#[tokio::test]
async fn durable26_a_replay_refused_by_a_full_stream_keeps_the_dead_letter() {
    let s = unique("fullreplay");
    let q = RedisStreamQueue::new(conn().await, &s)
        .unwrap()
        .with_max_backlog(1);
    let mut c = RedisStreamConsumer::join(conn().await, &s, "g", "w", TTL)
        .await
        .unwrap()
        .with_wait(Duration::from_millis(20));
    let e1 = WebhookEvent::new("standard", "e1", Bytes::from_static(b"1"));
    assert_eq!(q.push(e1, TTL).await.unwrap(), Push::Enqueued);
    let d1 = c.next().await.unwrap().unwrap();
    c.dead_letter(&d1, "later").await.unwrap();
    let e2 = WebhookEvent::new("standard", "e2", Bytes::from_static(b"2"));
    assert_eq!(q.push(e2, TTL).await.unwrap(), Push::Enqueued);
    let e3 = WebhookEvent::new("standard", "e3", Bytes::from_static(b"3"));
    assert_eq!(q.push(e3, TTL).await.unwrap(), Push::Full);
    let dead = q.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    let r = q.replay_dead_letter(&dead[0].entry).await;
    assert!(r.is_err(), "a replay into a full stream: {r:?}");
    assert_eq!(
        q.dead_letter_count().await.unwrap(),
        1,
        "the dead letter was lost"
    );
    let d2 = c.next().await.unwrap().unwrap();
    assert_eq!(d2.event.id, "e2");
    c.ack(&d2).await.unwrap();
    assert!(q.replay_dead_letter(&dead[0].entry).await.unwrap());
    let again = c.next().await.unwrap().unwrap();
    assert_eq!((again.event.id.as_str(), again.deliveries), ("e1", 1));
}

fn chain_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut s = e.source();
    while let Some(x) = s {
        out.push_str(" | ");
        out.push_str(&x.to_string());
        s = x.source();
    }
    out
}

/// docs/RELIABILITY.md, "Clear errors": a failure's message says what happened, among them "the
/// write reached the Redis primary, but only 0 of the 1 replicas asked for confirmed it" and
/// "Redis cannot be reached (down, restarting or failing over)" (kind `Connect`), and the URL's
/// password is in no message and no `Debug` output.
#[tokio::test]
async fn durable26_redis_errors_say_what_happened_in_the_documented_words() {
    use sturdy::core::{Error, ErrorKind};
    let s = unique("words");
    let q = RedisStreamQueue::new(conn().await, &s)
        .unwrap()
        .with_replication(1, Duration::from_millis(20));
    let e = WebhookEvent::new("standard", "w1", Bytes::from_static(b"{}"));
    let err = q.push(e, TTL).await.unwrap_err();
    let text = chain_text(&*err);
    assert!(
        text.contains("the write reached the Redis primary, but only 0 of the 1 replicas asked for confirmed it"),
        "{text}"
    );

    let st = sturdy::redis::RedisIdempotencyStore::new(conn().await)
        .with_prefix(unique("words-idem"))
        .with_replication(1, Duration::from_millis(20));
    use sturdy::idempotency::server::{IdempotencyStore, LockToken};
    let err = st
        .begin("k", [7; 32], LockToken::random(), Duration::from_secs(5))
        .await
        .unwrap_err();
    let text = chain_text(&*err);
    assert!(
        text.contains("the write reached the Redis primary, but only 0 of the 1 replicas asked for confirmed it"),
        "{text}"
    );

    // A closed port, with a password in the URL.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let url = format!("redis://:hunter2-d26@127.0.0.1:{port}/");
    let err = RedisConnection::connect(&url).await.unwrap_err();
    let text = chain_text(&*err);
    let debug = format!("{err:?}");
    assert!(
        !text.contains("hunter2") && !debug.contains("hunter2"),
        "{text} {debug}"
    );
    assert!(
        text.contains("Redis cannot be reached (down, restarting or failing over)"),
        "{text}"
    );
    let kind = err.downcast_ref::<Error>().map(|e| e.kind().clone());
    assert!(matches!(kind, Some(ErrorKind::Connect)), "{kind:?}: {text}");
    let err = RedisStreamQueue::connect(&url, "{x}").await.unwrap_err();
    let text = chain_text(&*err);
    assert!(!text.contains("hunter2") && !format!("{err:?}").contains("hunter2"));
    assert!(
        text.contains("Redis cannot be reached (down, restarting or failing over)"),
        "{text}"
    );
}

/// "an event left unacknowledged for the claim delay is delivered again, and
/// `Delivery::deliveries` counts the deliveries": a worker that took 200 events and died
/// leaves all 200 to another worker of its group, each once, counted 2, and new events pushed
/// meanwhile are not lost either.
#[tokio::test]
async fn durable26_every_event_a_dead_worker_held_is_taken_over_once() {
    let s = unique("takeover");
    let q = RedisStreamQueue::new(conn().await, &s).unwrap();
    let claim = Duration::from_millis(3000);
    let mut dead = RedisStreamConsumer::join(conn().await, &s, "g", "dead", claim)
        .await
        .unwrap()
        .with_wait(Duration::from_millis(10));
    const N: usize = 200;
    for i in 0..N {
        let e = WebhookEvent::new("github", format!("old{i}"), Bytes::from_static(b"{}"));
        assert_eq!(q.push(e, TTL).await.unwrap(), Push::Enqueued);
    }
    let mut held = std::collections::HashSet::new();
    while held.len() < N {
        let d = dead.next().await.unwrap().expect("an event");
        assert!(
            held.insert(d.event.id),
            "taken twice before the claim delay"
        );
    }
    drop(dead);
    for i in 0..20 {
        let e = WebhookEvent::new("github", format!("new{i}"), Bytes::from_static(b"{}"));
        assert_eq!(q.push(e, TTL).await.unwrap(), Push::Enqueued);
    }
    tokio::time::sleep(claim + Duration::from_millis(50)).await;
    let mut live = RedisStreamConsumer::join(conn().await, &s, "g", "live", claim)
        .await
        .unwrap()
        .with_wait(Duration::from_millis(10));
    let mut seen = std::collections::HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match live.next().await.unwrap() {
            Some(d) => {
                live.ack(&d).await.unwrap();
                *seen.entry(d.event.id.clone()).or_insert(0) += 1;
                if d.event.id.starts_with("old") {
                    assert_eq!(d.deliveries, 2, "{}", d.event.id);
                } else {
                    assert_eq!(d.deliveries, 1, "{}", d.event.id);
                }
            }
            None if seen.len() == N + 20 => break,
            None => {}
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {} events came back",
            seen.len(),
            N + 20
        );
    }
    assert!(seen.values().all(|&n| n == 1), "some came twice");
}

/// `with_replication(replicas, timeout)`: "waiting up to `timeout` for them"; every operation
/// "ends within its timeout [1 s] (plus the replication wait ...)". A replication timeout of
/// zero (do not wait) must not become Redis's `WAIT n 0`, which blocks the connection forever:
/// the enqueue fails within about a second, and the connection it shares with a queue and an
/// idempotency store keeps serving them.
#[tokio::test]
async fn durable26_a_zero_replication_wait_never_blocks_the_shared_connection() {
    use sturdy::idempotency::server::{Begin, IdempotencyStore, LockToken};
    let shared = conn().await;
    let s = unique("wait0");
    let replicated = RedisStreamQueue::new(shared.clone(), &s)
        .unwrap()
        .with_replication(1, Duration::ZERO);
    let plain = RedisStreamQueue::new(shared.clone(), &s).unwrap();
    let store =
        sturdy::redis::RedisIdempotencyStore::new(shared.clone()).with_prefix(unique("wait0-idem"));
    let t = tokio::time::Instant::now();
    let r = replicated
        .push(
            WebhookEvent::new("standard", "z1", Bytes::from_static(b"{}")),
            TTL,
        )
        .await;
    let took = t.elapsed();
    assert!(r.is_err(), "no replica can confirm: {r:?}");
    assert!(
        took < Duration::from_millis(2500),
        "the enqueue took {took:?}"
    );
    let t = tokio::time::Instant::now();
    let after = plain
        .push(
            WebhookEvent::new("standard", "z2", Bytes::from_static(b"{}")),
            TTL,
        )
        .await;
    let begin = store
        .begin("k", [1; 32], LockToken::random(), Duration::from_secs(5))
        .await;
    assert!(
        matches!(after, Ok(Push::Enqueued)) && matches!(begin, Ok(Begin::Started)),
        "the shared connection no longer answers: {after:?} {begin:?} after {:?}",
        t.elapsed()
    );

    // The idempotency store's own replication wait of zero, likewise.
    let store0 = sturdy::redis::RedisIdempotencyStore::new(shared.clone())
        .with_prefix(unique("wait0-idem2"))
        .with_replication(1, Duration::ZERO);
    let t = tokio::time::Instant::now();
    let r = store0
        .begin("k", [2; 32], LockToken::random(), Duration::from_secs(5))
        .await;
    assert!(r.is_err(), "{r:?}");
    assert!(
        t.elapsed() < Duration::from_millis(2500),
        "{:?}",
        t.elapsed()
    );
    let after = plain
        .push(
            WebhookEvent::new("standard", "z3", Bytes::from_static(b"{}")),
            TTL,
        )
        .await;
    assert!(matches!(after, Ok(Push::Enqueued)), "{after:?}");
}

/// "A group sees the entries still in the stream when it is created": events queued before any
/// consumer joined are not lost to the first group, nor to a second group created while the
/// first still holds them; an entry every existing group acknowledged is gone for a group made
/// after that.
#[tokio::test]
async fn durable26_a_group_created_late_sees_the_entries_still_in_the_stream() {
    let s = unique("late");
    let q = RedisStreamQueue::new(conn().await, &s).unwrap();
    for i in 0..3 {
        let e = WebhookEvent::new("github", format!("early{i}"), Bytes::from_static(b"{}"));
        assert_eq!(q.push(e, TTL).await.unwrap(), Push::Enqueued);
    }
    let mut a = RedisStreamConsumer::join(conn().await, &s, "a", "wa", TTL)
        .await
        .unwrap()
        .with_wait(Duration::from_millis(20));
    let mut got_a = Vec::new();
    while let Some(d) = a.next().await.unwrap() {
        got_a.push(d);
    }
    assert_eq!(
        got_a
            .iter()
            .map(|d| d.event.id.as_str())
            .collect::<Vec<_>>(),
        ["early0", "early1", "early2"]
    );
    // Group b, created while a holds them unacknowledged, sees them too.
    let mut b = RedisStreamConsumer::join(conn().await, &s, "b", "wb", TTL)
        .await
        .unwrap()
        .with_wait(Duration::from_millis(20));
    for d in &got_a {
        a.ack(d).await.unwrap();
    }
    let mut got_b = Vec::new();
    while let Some(d) = b.next().await.unwrap() {
        b.ack(&d).await.unwrap();
        got_b.push(d.event.id);
    }
    assert_eq!(got_b, ["early0", "early1", "early2"]);
    // Both groups are done with them: a group made now sees nothing of them.
    let mut c = RedisStreamConsumer::join(conn().await, &s, "c", "wc", TTL)
        .await
        .unwrap()
        .with_wait(Duration::from_millis(20));
    assert!(c.next().await.unwrap().is_none());
}

/// A delivery whose runtime is dropped at some moment of its way (verifying, appending to the
/// stream, answering) was never acknowledged, so its sender delivers it again, to another
/// process (a new runtime with its own connection): that redelivery is acknowledged, and the
/// group gets the event exactly once, whatever moment the first process died at.
#[test]
fn durable26_a_runtime_dropped_mid_delivery_neither_loses_nor_doubles_the_event() {
    use axum::body::Body;
    use http::Request;
    use sturdy::webhook::{sign_github, GitHub, WebhookReceiver};
    use tower::ServiceExt;
    let stream = unique("rtdrop");
    let secret = "gh_rtdrop";
    let delivery = |i: u64| {
        let body = format!("{{\"delivery\":{i}}}");
        Request::post("/hook")
            .header("x-hub-signature-256", sign_github(secret, body.as_bytes()))
            .body(Body::from(body))
            .unwrap()
    };
    const N: u64 = 12;
    for i in 0..N {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let s = stream.clone();
        rt.block_on(async move {
            let q = RedisStreamQueue::new(conn().await, &s).unwrap();
            let rx = WebhookReceiver::new(GitHub::new(secret).unwrap(), q);
            let fut = rx.oneshot(delivery(i));
            // Stop polling after i * 150 µs; the runtime is then dropped with the task.
            let _ = tokio::time::timeout(Duration::from_micros(i * 150), fut).await;
        });
        drop(rt);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let mut c = RedisStreamConsumer::join(conn().await, &stream, "g", "w", TTL)
            .await
            .unwrap()
            .with_wait(Duration::from_millis(50));
        let q = RedisStreamQueue::new(conn().await, &stream).unwrap();
        let rx = WebhookReceiver::new(GitHub::new(secret).unwrap(), q);
        for i in 0..N {
            let res = rx.clone().oneshot(delivery(i)).await.unwrap();
            assert_eq!(res.status(), http::StatusCode::OK, "redelivery {i}");
        }
        let mut bodies = Vec::new();
        while let Some(d) = c.next().await.unwrap() {
            c.ack(&d).await.unwrap();
            bodies.push(String::from_utf8(d.event.body.to_vec()).unwrap());
        }
        bodies.sort();
        let mut want: Vec<String> = (0..N).map(|i| format!("{{\"delivery\":{i}}}")).collect();
        want.sort();
        assert_eq!(bodies, want, "events lost or doubled");
    });
}
