//! The Redis Streams webhook queue against the real Redis at STURDY_REDIS_URL.

use crate::support;
use support::proxy::{counted, sent, stall};
use support::{backends, unique, Backend};

fn stream(name: &str) -> String {
    unique(&format!("webhooks:{name}"))
}

use std::time::Duration;

use bytes::Bytes;
use sturdy_core::{Error, ErrorKind};
use sturdy_redis::{RedisStreamConsumer, RedisStreamQueue};
use sturdy_webhook::http::HeaderMap;
use sturdy_webhook::{EventQueue, Push, WebhookEvent};

fn event(id: &str) -> WebhookEvent {
    WebhookEvent::new("standard", id, Bytes::from(format!("{{\"id\":\"{id}\"}}")))
}

const TTL: Duration = Duration::from_secs(60);

async fn xlen(back: &Backend, key: &str) -> u64 {
    let mut c = back.conn().await;
    redis::cmd("XLEN")
        .arg(key)
        .query_async(&mut c)
        .await
        .unwrap()
}

/// A consumer of group `group` with a short wait, so that "nothing yet" answers quickly.
async fn consumer(
    back: &Backend,
    s: &str,
    group: &str,
    claim_after: Duration,
) -> RedisStreamConsumer {
    RedisStreamConsumer::join(back.conn().await, s, group, "w", claim_after)
        .await
        .unwrap()
        .with_wait(Duration::from_millis(20))
}

#[tokio::test]
async fn two_instances_dedup_and_a_crashed_worker_is_taken_over() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        two_instances_dedup_and_a_crashed_worker_is_taken_over_on(&b).await;
    }
}

async fn two_instances_dedup_and_a_crashed_worker_is_taken_over_on(back: &Backend) {
    let s = stream("crash");
    let q1 = RedisStreamQueue::new(back.conn().await, &s).unwrap();
    let q2 = RedisStreamQueue::new(back.conn().await, &s).unwrap();
    assert_eq!(q1.push(event("evt_1"), TTL).await.unwrap(), Push::Enqueued);
    // The same event arriving at the other instance is a duplicate.
    assert_eq!(q2.push(event("evt_1"), TTL).await.unwrap(), Push::Duplicate);
    assert_eq!(q2.push(event("evt_2"), TTL).await.unwrap(), Push::Enqueued);

    let mut a = RedisStreamConsumer::join(
        back.conn().await,
        &s,
        "workers",
        "a",
        Duration::from_millis(200),
    )
    .await
    .unwrap();
    let mut b = RedisStreamConsumer::join(
        back.conn().await,
        &s,
        "workers",
        "b",
        Duration::from_millis(200),
    )
    .await
    .unwrap();
    // Worker a takes evt_1 and dies mid-event: no ack.
    let taken = a.next().await.unwrap().unwrap();
    assert_eq!(taken.event, event("evt_1"));
    assert_eq!(taken.deliveries, 1);
    drop(a);
    // Worker b gets the other event at once, and evt_1 once it has been idle long enough.
    let d2 = b.next().await.unwrap().unwrap();
    assert_eq!(d2.event.id, "evt_2");
    b.ack(&d2).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let d1 = b.next().await.unwrap().unwrap();
    assert_eq!(d1.event, event("evt_1"));
    assert_eq!(d1.deliveries, 2, "the second delivery is counted");
    b.ack(&d1).await.unwrap();
    // Nothing left, nothing delivered twice after its ack.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(b.next().await.unwrap().is_none());
    assert_eq!(xlen(back, &s).await, 0, "acknowledged entries are deleted");
}

#[tokio::test]
async fn a_full_stream_refuses_and_does_not_remember_the_id() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        a_full_stream_refuses_and_does_not_remember_the_id_on(&b).await;
    }
}

async fn a_full_stream_refuses_and_does_not_remember_the_id_on(back: &Backend) {
    let s = stream("full");
    let q = RedisStreamQueue::new(back.conn().await, &s)
        .unwrap()
        .with_max_backlog(2);
    assert_eq!(q.push(event("a"), TTL).await.unwrap(), Push::Enqueued);
    assert_eq!(q.push(event("b"), TTL).await.unwrap(), Push::Enqueued);
    assert_eq!(q.push(event("c"), TTL).await.unwrap(), Push::Full);
    let mut w = consumer(back, &s, "g", Duration::from_secs(30)).await;
    let d = w.next().await.unwrap().unwrap();
    w.ack(&d).await.unwrap();
    assert_eq!(
        q.push(event("c"), TTL).await.unwrap(),
        Push::Enqueued,
        "the redelivery is accepted"
    );
}

/// The streams `x` and `{x}` would share one base, so their dedup keys and dead letters: an
/// event queued on one would be a "duplicate" on the other, acknowledged and never queued.
/// While both exist, a push to either is refused with a `Config` error naming both.
#[tokio::test]
async fn a_stream_and_its_braced_twin_never_share_dedup_keys() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        a_stream_and_its_braced_twin_never_share_dedup_keys_on(&b).await;
    }
}

async fn a_stream_and_its_braced_twin_never_share_dedup_keys_on(back: &Backend) {
    let plain = stream("twin");
    let braced = format!("{{{plain}}}");
    let q1 = RedisStreamQueue::new(back.conn().await, &plain).unwrap();
    let q2 = RedisStreamQueue::new(back.conn().await, &braced).unwrap();
    assert_eq!(q1.push(event("evt_1"), TTL).await.unwrap(), Push::Enqueued);
    let refused = |err: sturdy_core::BoxError| {
        let text = err.to_string();
        let e = err.downcast_ref::<Error>().expect("a sturdy error");
        assert_eq!(*e.kind(), ErrorKind::Config, "{text}");
        assert!(
            text.contains(&format!("{plain:?}")) && text.contains(&format!("{braced:?}")),
            "{text}"
        );
        assert!(
            text.contains("duplicate") && text.contains("rename"),
            "{text}"
        );
    };
    // Not a duplicate of the other stream's event: refused, so the sender redelivers.
    refused(q2.push(event("evt_1"), TTL).await.unwrap_err());
    refused(q2.push(event("evt_2"), TTL).await.unwrap_err());
    assert_eq!(xlen(back, &braced).await, 0, "nothing queued on the twin");
    // The twin was never made, so the first stream goes on.
    assert_eq!(q1.push(event("evt_2"), TTL).await.unwrap(), Push::Enqueued);
    // Once both exist (another app wrote to the twin), neither takes events.
    let mut c = back.conn().await;
    let _: String = redis::cmd("XADD")
        .arg(&braced)
        .arg("*")
        .arg("other")
        .arg("app")
        .query_async(&mut c)
        .await
        .unwrap();
    refused(q1.push(event("evt_3"), TTL).await.unwrap_err());
    refused(q2.push(event("evt_3"), TTL).await.unwrap_err());
    assert_eq!(xlen(back, &plain).await, 2);
    // A name with more around its tag has a base of its own.
    let other = RedisStreamQueue::new(back.conn().await, format!("{braced}:events")).unwrap();
    assert_eq!(
        other.push(event("evt_1"), TTL).await.unwrap(),
        Push::Enqueued
    );
    // The twin name as the queue's own dead-letter stream is no other queue.
    let own = stream("twin-dead");
    let own_dead = format!("{{{own}}}");
    let q = RedisStreamQueue::new(back.conn().await, &own)
        .unwrap()
        .with_dead_letter_stream(&own_dead);
    assert_eq!(q.push(event("a"), TTL).await.unwrap(), Push::Enqueued);
    let mut w = consumer(back, &own, "g", Duration::from_secs(30))
        .await
        .with_dead_letter_stream(&own_dead);
    let d = w.next().await.unwrap().unwrap();
    w.dead_letter(&d, "poison").await.unwrap();
    assert_eq!(xlen(back, &own_dead).await, 1);
    assert_eq!(q.push(event("b"), TTL).await.unwrap(), Push::Enqueued);
}

#[tokio::test]
async fn events_keep_route_timestamp_and_headers_and_routes_do_not_share_ids() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        events_keep_route_timestamp_and_headers_and_routes_do_not_share_ids_on(&b).await;
    }
}

async fn events_keep_route_timestamp_and_headers_and_routes_do_not_share_ids_on(back: &Backend) {
    let s = stream("fields");
    let q = RedisStreamQueue::new(back.conn().await, &s).unwrap();
    let mut headers = HeaderMap::new();
    headers.insert("x-github-event", "issues".parse().unwrap());
    headers.append("x-multi", "one".parse().unwrap());
    headers.append("x-multi", "two".parse().unwrap());
    let a = WebhookEvent::new("github", "sha256:00", Bytes::from_static(b"\x00binary\xff"))
        .with_route("org-a")
        .with_timestamp(Some(1_700_000_000))
        .with_headers(headers);
    let b = a.clone().with_route("org-b");
    assert_eq!(q.push(a.clone(), TTL).await.unwrap(), Push::Enqueued);
    assert_eq!(q.push(b.clone(), TTL).await.unwrap(), Push::Enqueued);
    assert_eq!(q.push(a.clone(), TTL).await.unwrap(), Push::Duplicate);
    let mut w = consumer(back, &s, "g", Duration::from_secs(30)).await;
    for expected in [a, b] {
        let d = w.next().await.unwrap().unwrap();
        assert_eq!(d.event, expected);
        w.ack(&d).await.unwrap();
    }
}

#[tokio::test]
async fn a_poison_event_goes_to_the_dead_letter_stream_and_can_be_replayed() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        a_poison_event_goes_to_the_dead_letter_stream_and_can_be_replayed_on(&b).await;
    }
}

async fn a_poison_event_goes_to_the_dead_letter_stream_and_can_be_replayed_on(back: &Backend) {
    let s = stream("poison");
    let q = RedisStreamQueue::new(back.conn().await, &s).unwrap();
    let mut w = consumer(back, &s, "g", Duration::from_millis(30))
        .await
        .with_max_deliveries(3);
    q.push(event("poison"), TTL).await.unwrap();
    q.push(event("fine"), TTL).await.unwrap();
    // The handler fails on "poison" every time: it is delivered 3 times, never a 4th.
    let mut seen = Vec::new();
    for _ in 0..40 {
        match w.next().await.unwrap() {
            Some(d) if d.event.id == "fine" => w.ack(&d).await.unwrap(),
            Some(d) => seen.push(d.deliveries),
            None => {}
        }
        if q.dead_letter_count().await.unwrap() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    assert_eq!(seen, [1, 2, 3]);
    assert!(w.next().await.unwrap().is_none());
    assert_eq!(xlen(back, &s).await, 0, "nothing left in the stream");

    let dead = q.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    assert_eq!(d.event, event("poison"));
    assert_eq!((d.group.as_str(), d.deliveries), ("g", 3));
    assert!(d.reason.contains("3 deliveries"), "{}", d.reason);
    assert!(q.dead_letters(Some(&d.entry), 10).await.unwrap().is_empty());

    // Fixed handler: replay it. It comes back with a fresh count, and leaves the dead letters.
    assert!(q.replay_dead_letter(&d.entry).await.unwrap());
    assert!(
        !q.replay_dead_letter(&d.entry).await.unwrap(),
        "replayed once"
    );
    assert_eq!(q.dead_letter_count().await.unwrap(), 0);
    let again = w.next().await.unwrap().unwrap();
    assert_eq!(
        (again.event.clone(), again.deliveries),
        (event("poison"), 1)
    );
    w.ack(&again).await.unwrap();
    assert_eq!(xlen(back, &s).await, 0);

    // A handler can give up at once; a dead letter can be discarded.
    q.push(event("bad"), TTL).await.unwrap();
    let bad = w.next().await.unwrap().unwrap();
    w.dead_letter(&bad, "unparseable payload").await.unwrap();
    let dead = q.dead_letters(None, 10).await.unwrap();
    assert_eq!(
        (dead[0].reason.as_str(), dead[0].deliveries),
        ("unparseable payload", 1)
    );
    assert!(w.next().await.unwrap().is_none());
    assert!(q.discard_dead_letter(&dead[0].entry).await.unwrap());
    assert_eq!(q.dead_letter_count().await.unwrap(), 0);
}

#[tokio::test]
async fn an_ack_never_deletes_what_another_group_still_needs() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        an_ack_never_deletes_what_another_group_still_needs_on(&b).await;
    }
}

async fn an_ack_never_deletes_what_another_group_still_needs_on(back: &Backend) {
    let s = stream("groups");
    let q = RedisStreamQueue::new(back.conn().await, &s).unwrap();
    let mut billing = consumer(back, &s, "billing", Duration::from_secs(30)).await;
    let mut audit = consumer(back, &s, "audit", Duration::from_secs(30)).await;
    q.push(event("e1"), TTL).await.unwrap();
    q.push(event("e2"), TTL).await.unwrap();

    let b1 = billing.next().await.unwrap().unwrap();
    billing.ack(&b1).await.unwrap();
    assert_eq!(xlen(back, &s).await, 2, "audit has not read e1 yet");
    let a1 = audit.next().await.unwrap().unwrap();
    assert_eq!(a1.event.id, "e1");
    // Audit holds e1 unacknowledged while billing finishes e2: e2 stays for audit.
    let b2 = billing.next().await.unwrap().unwrap();
    billing.ack(&b2).await.unwrap();
    audit.ack(&a1).await.unwrap();
    assert_eq!(xlen(back, &s).await, 1, "only e2, which audit still needs");
    let a2 = audit.next().await.unwrap().unwrap();
    assert_eq!(a2.event.id, "e2");
    audit.ack(&a2).await.unwrap();
    assert_eq!(xlen(back, &s).await, 0, "deleted once every group is done");

    // A dead letter is replayed for the group that gave up on it only.
    q.push(event("e3"), TTL).await.unwrap();
    let b3 = billing.next().await.unwrap().unwrap();
    billing
        .dead_letter(&b3, "billing rejected it")
        .await
        .unwrap();
    let a3 = audit.next().await.unwrap().unwrap();
    audit.ack(&a3).await.unwrap();
    assert_eq!(xlen(back, &s).await, 0);
    let dead = q.dead_letters(None, 10).await.unwrap();
    assert!(q.replay_dead_letter(&dead[0].entry).await.unwrap());
    assert!(
        audit.next().await.unwrap().is_none(),
        "audit already handled e3"
    );
    let again = billing.next().await.unwrap().unwrap();
    assert_eq!(again.event, event("e3"));
    billing.ack(&again).await.unwrap();
    assert_eq!(xlen(back, &s).await, 0);
}

/// A delivery the group no longer holds pending is left alone by `dead_letter`, even while the
/// entry stays in the stream for another group: after an ack (a consumer that claimed it), and
/// after an earlier `dead_letter` (a try whose answer was lost), no dead letter is made, so a
/// replay cannot deliver a handled event again or one event twice.
#[tokio::test]
async fn dead_letter_of_a_delivery_no_longer_pending_does_nothing() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        dead_letter_of_a_delivery_no_longer_pending_does_nothing_on(&b).await;
    }
}

async fn dead_letter_of_a_delivery_no_longer_pending_does_nothing_on(back: &Backend) {
    let s = stream("late-dead");
    let q = RedisStreamQueue::new(back.conn().await, &s).unwrap();
    let mut billing = consumer(back, &s, "billing", Duration::from_secs(30)).await;
    // Audit has not read anything: every entry stays in the stream for it.
    let _audit = consumer(back, &s, "audit", Duration::from_secs(30)).await;
    q.push(event("handled"), TTL).await.unwrap();
    q.push(event("given-up"), TTL).await.unwrap();

    let d1 = billing.next().await.unwrap().unwrap();
    billing.ack(&d1).await.unwrap();
    billing.dead_letter(&d1, "too late").await.unwrap();
    assert_eq!(q.dead_letter_count().await.unwrap(), 0, "a handled event");

    let d2 = billing.next().await.unwrap().unwrap();
    billing.dead_letter(&d2, "poison").await.unwrap();
    billing.dead_letter(&d2, "poison").await.unwrap();
    let dead = q.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.len(), 1, "one dead letter: {dead:?}");
    assert_eq!(dead[0].event.id, "given-up");
    assert_eq!(dead[0].deliveries, 1);
    assert_eq!(xlen(back, &s).await, 2, "both still there for audit");
    assert!(billing.next().await.unwrap().is_none());
}

// ===== Round trips and timeouts, seen from the wire =====

#[tokio::test]
async fn next_costs_one_round_trip_when_an_event_is_waiting() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        next_costs_one_round_trip_when_an_event_is_waiting_on(&b).await;
    }
}

async fn next_costs_one_round_trip_when_an_event_is_waiting_on(back: &Backend) {
    let s = stream("trips");
    let (conn, p) = counted(back).await;
    let q = RedisStreamQueue::new(back.conn().await, &s).unwrap();
    let mut w = RedisStreamConsumer::join(conn, &s, "g", "w", Duration::from_millis(30))
        .await
        .unwrap()
        .with_wait(Duration::from_millis(20));
    for id in ["e1", "e2"] {
        q.push(event(id), TTL).await.unwrap();
    }
    // A new event, from the first call on.
    let before = sent(&p);
    let d1 = w.next().await.unwrap().unwrap();
    assert_eq!((d1.event.id.as_str(), sent(&p) - before), ("e1", 1));
    // An event to take over (e1, not acknowledged).
    tokio::time::sleep(Duration::from_millis(60)).await;
    let before = sent(&p);
    let again = w.next().await.unwrap().unwrap();
    assert_eq!((again.event.id.as_str(), sent(&p) - before), ("e1", 1));
    let before = sent(&p);
    w.ack(&again).await.unwrap();
    assert_eq!(sent(&p) - before, 1, "an ack is one round trip");
    let before = sent(&p);
    let d2 = w.next().await.unwrap().unwrap();
    assert_eq!((d2.event.id.as_str(), sent(&p) - before), ("e2", 1));
    w.ack(&d2).await.unwrap();
    // Nothing waiting: short reads for a new event until the 20 ms wait ends (5 ms apart,
    // then 10: at 0, 5, 15 and 20 ms), none of them blocking the connection.
    let before = sent(&p);
    assert!(w.next().await.unwrap().is_none());
    let trips = sent(&p) - before;
    assert!((3..=6).contains(&trips), "{trips} round trips");
    // An enqueue is one round trip too, once the node has the script.
    let (conn, p) = counted(back).await;
    let q = RedisStreamQueue::new(conn, &s).unwrap();
    q.push(event("warm-up"), TTL).await.unwrap();
    let before = sent(&p);
    for i in 0..10 {
        assert_eq!(
            q.push(event(&format!("n{i}")), TTL).await.unwrap(),
            Push::Enqueued
        );
    }
    assert_eq!(q.push(event("n0"), TTL).await.unwrap(), Push::Duplicate);
    assert_eq!(sent(&p) - before, 11);
}

#[tokio::test]
async fn the_redis_timeout_is_configurable() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        the_redis_timeout_is_configurable_on(&b).await;
    }
}

async fn the_redis_timeout_is_configurable_on(back: &Backend) {
    let s = stream("timeout");
    let (conn, p) = counted(back).await;
    let q = RedisStreamQueue::new(conn.clone(), &s)
        .unwrap()
        .with_timeout(Duration::from_millis(50));
    let mut w = RedisStreamConsumer::join(conn, &s, "g", "w", Duration::from_secs(30))
        .await
        .unwrap()
        .with_timeout(Duration::from_millis(50))
        .with_wait(Duration::from_millis(10));
    stall(&p, true);
    let e = q.push(event("e"), TTL).await.unwrap_err();
    let e = e.downcast_ref::<Error>().unwrap();
    assert_eq!(e.kind(), &ErrorKind::Timeout);
    assert!(e.to_string().contains("50ms"), "{e}");
    let e = w.next().await.unwrap_err();
    assert_eq!(
        e.downcast_ref::<Error>().unwrap().kind(),
        &ErrorKind::Timeout
    );
}

#[tokio::test]
async fn empty_names_are_configuration_errors() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        empty_names_are_configuration_errors_on(&b).await;
    }
}

async fn empty_names_are_configuration_errors_on(back: &Backend) {
    let kind = |e: sturdy_core::BoxError| e.downcast_ref::<Error>().unwrap().kind().clone();
    assert_eq!(
        kind(RedisStreamQueue::new(back.conn().await, "").unwrap_err()),
        ErrorKind::Config
    );
    // A '}' without a hash tag: its dedup keys could not share its slot.
    let e = RedisStreamQueue::new(back.conn().await, "web}hooks").unwrap_err();
    assert!(e.to_string().contains("hash tag"), "{e}");
    assert_eq!(kind(e), ErrorKind::Config);
    let s = stream("names");
    for (stream, group, name) in [
        ("", "g", "w"),
        (s.as_str(), "", "w"),
        (s.as_str(), "g", ""),
        ("web}hooks", "g", "w"),
    ] {
        let e = RedisStreamConsumer::join(
            back.conn().await,
            stream,
            group,
            name,
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
        assert_eq!(kind(e), ErrorKind::Config);
    }
}

#[tokio::test]
async fn debug_output_shows_no_url() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        debug_output_shows_no_url_on(&b).await;
    }
}

async fn debug_output_shows_no_url_on(back: &Backend) {
    let s = stream("debug");
    let q = RedisStreamQueue::new(back.conn().await, &s).unwrap();
    let w = consumer(back, &s, "g", Duration::from_secs(1)).await;
    let shown = format!("{q:?} {w:?}");
    assert!(!shown.contains("redis://"), "{shown}");
}

#[tokio::test]
async fn on_a_cluster_every_key_of_a_stream_shares_its_slot() {
    let Some(urls) = support::cluster_urls() else {
        return;
    };
    let back = Backend::Cluster(urls);
    // Stream names with and without a hash tag: dedup, dead letters and replays all work, so
    // the scripts never touched two slots.
    for s in [stream("plain"), format!("{{{}}}", stream("tagged"))] {
        let q = RedisStreamQueue::new(back.conn().await, &s).unwrap();
        let mut w = consumer(&back, &s, "g", Duration::from_secs(30)).await;
        assert_eq!(q.push(event("a"), TTL).await.unwrap(), Push::Enqueued);
        assert_eq!(q.push(event("a"), TTL).await.unwrap(), Push::Duplicate);
        let d = w.next().await.unwrap().unwrap();
        w.dead_letter(&d, "test").await.unwrap();
        let dead = q.dead_letters(None, 10).await.unwrap();
        assert_eq!(dead.len(), 1, "{s}");
        assert!(q.replay_dead_letter(&dead[0].entry).await.unwrap());
        let again = w.next().await.unwrap().unwrap();
        w.ack(&again).await.unwrap();
        assert_eq!(xlen(&back, &s).await, 0);
    }
    // A dead-letter stream chosen in another slot: a clear error, not a silent split.
    let s = stream("split");
    let q = RedisStreamQueue::new(back.conn().await, &s)
        .unwrap()
        .with_dead_letter_stream("elsewhere:dead");
    let e = q.replay_dead_letter("0-1").await.unwrap_err().to_string();
    assert!(e.contains("hash slot") && e.contains("hash tag"), "{e}");
}
