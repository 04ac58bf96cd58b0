//! s55 outside round: the Redis Streams webhook consumer (`RedisStreamQueue`,
//! `RedisStreamConsumer`, `Delivery`, `DeadLetter`) on the shared Redis Cluster, read from their
//! rustdoc and docs/guides/webhooks.md ("Queues"): consumer groups, ack, claiming, dead
//! letters, `with_wait`, and `next()` cancelled at every point.
#![cfg(feature = "full")]

use std::collections::{HashMap, HashSet};
use std::time::Duration;
use tokio::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use sturdy::redis::{RedisConnection, RedisStreamConsumer, RedisStreamQueue};
use sturdy::webhook::{EventQueue, Push, WebhookEvent};

use crate::s55_cluster::{cli, cli_num, event, kind, nodes, port0, unique};

const TTL: Duration = Duration::from_secs(600);

async fn consumer(
    n: &[String],
    stream: &str,
    group: &str,
    name: &str,
    claim: Duration,
) -> RedisStreamConsumer {
    RedisStreamConsumer::connect_cluster(n, stream.to_owned(), group, name, claim)
        .await
        .unwrap()
        .with_wait(Duration::from_millis(150))
}

async fn queue(n: &[String], stream: &str) -> RedisStreamQueue {
    RedisStreamQueue::connect_cluster(n, stream.to_owned())
        .await
        .unwrap()
}

/// A small seeded xorshift (no randomness without a seed).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// `RedisStreamConsumer`: "the consumers of one group share the work, each event going to one
/// of them"; `ack`: "The entry is deleted from the stream unless another consumer group still
/// needs it"; `Delivery::deliveries`: "1 the first time".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s55_stream_one_group_shares_the_work_and_ack_deletes() {
    let Some(n) = nodes() else { return };
    let stream = unique("share");
    let claim = Duration::from_secs(60);
    let mut a = consumer(&n, &stream, "g", "a", claim).await;
    let mut b = consumer(&n, &stream, "g", "b", claim).await;
    let q = queue(&n, &stream).await;
    for i in 0..10 {
        assert_eq!(
            q.push(event(&format!("e{i}")), TTL).await.unwrap(),
            Push::Enqueued
        );
    }
    let mut got: Vec<String> = Vec::new();
    let mut per = [0usize; 2];
    loop {
        let mut any = false;
        for (i, c) in [&mut a, &mut b].into_iter().enumerate() {
            if let Some(d) = c.next().await.unwrap() {
                assert_eq!(d.deliveries, 1);
                got.push(d.event.id.clone());
                per[i] += 1;
                c.ack(&d).await.unwrap();
                any = true;
            }
        }
        if !any {
            break;
        }
    }
    let set: HashSet<_> = got.iter().cloned().collect();
    assert_eq!(got.len(), 10, "{got:?}");
    assert_eq!(set.len(), 10, "an event went to two consumers: {got:?}");
    assert!(per[0] > 0 && per[1] > 0, "{per:?}");
    assert_eq!(cli_num(port0(), &["XLEN", &stream]), 0);
}

/// `connect`: "Events left unacknowledged for `claim_after` are delivered again (to this
/// consumer or another)"; `Delivery`: "An event never acknowledged (the handler failed, or the
/// worker crashed) is delivered again after the claim delay"; `deliveries` "this time
/// included".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s55_stream_an_event_a_crashed_consumer_left_is_claimed_by_another() {
    let Some(n) = nodes() else { return };
    let stream = unique("claim");
    let claim = Duration::from_millis(400);
    let mut crashed = consumer(&n, &stream, "g", "crashed", claim).await;
    let mut b = consumer(&n, &stream, "g", "b", claim).await;
    let q = queue(&n, &stream).await;
    q.push(event("c1"), TTL).await.unwrap();
    let first = crashed.next().await.unwrap().expect("delivered");
    assert_eq!(first.deliveries, 1);
    drop(crashed);
    // Not before the claim delay.
    let early = Instant::now();
    let r = b.next().await.unwrap();
    if early.elapsed() < Duration::from_millis(350) {
        assert!(r.is_none(), "claimed before the claim delay: {r:?}");
    }
    tokio::time::sleep(Duration::from_millis(450)).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let d = loop {
        if let Some(d) = b.next().await.unwrap() {
            break d;
        }
        assert!(Instant::now() < deadline, "never claimed");
    };
    assert_eq!(d.event.id, "c1");
    assert_eq!(d.entry, first.entry);
    assert_eq!(d.deliveries, 2);
    b.ack(&d).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        b.next().await.unwrap().is_none(),
        "delivered again after its ack"
    );
    assert_eq!(cli_num(port0(), &["XLEN", &stream]), 0);
}

/// "Poison events": "An event delivered \[5\] times without being acknowledged is moved to the
/// dead-letter stream ... instead of being delivered again"; `DeadLetter`'s fields;
/// `replay_dead_letter`: "with a fresh delivery count; it leaves the dead-letter stream.
/// `Ok(false)` when there is no such dead letter"; `discard_dead_letter`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s55_stream_dead_lettered_after_max_deliveries_then_replayed_and_discarded() {
    let Some(n) = nodes() else { return };
    let stream = unique("poison");
    let claim = Duration::from_millis(150);
    let mut c = consumer(&n, &stream, "billing", "w", claim)
        .await
        .with_max_deliveries(3);
    let q = queue(&n, &stream).await;
    let mut headers = HeaderMap::new();
    headers.insert("webhook-id", HeaderValue::from_static("p1"));
    let ev = event("p1")
        .with_route("billing-route")
        .with_timestamp(Some(1_700_000_000))
        .with_headers(headers);
    q.push(ev.clone(), TTL).await.unwrap();
    let mut counts = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut entry = String::new();
    while q.dead_letter_count().await.unwrap() == 0 {
        assert!(Instant::now() < deadline, "never dead-lettered: {counts:?}");
        if let Some(d) = c.next().await.unwrap() {
            counts.push(d.deliveries);
            entry = d.entry.clone();
        } else {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(counts, [1, 2, 3], "deliveries before the dead letter");
    let dead = q.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    let dl = &dead[0];
    assert_eq!(dl.group, "billing");
    assert_eq!(dl.deliveries, 3);
    assert_eq!(dl.original_entry, entry);
    assert!(!dl.reason.is_empty());
    assert_eq!(dl.event.id, ev.id);
    assert_eq!(dl.event.route, ev.route);
    assert_eq!(dl.event.scheme, ev.scheme);
    assert_eq!(dl.event.timestamp, ev.timestamp);
    assert_eq!(dl.event.headers, ev.headers);
    assert_eq!(dl.event.body, ev.body);
    // Not delivered again while dead.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(c.next().await.unwrap().is_none());

    assert!(q.replay_dead_letter(&dl.entry).await.unwrap());
    assert_eq!(q.dead_letter_count().await.unwrap(), 0);
    assert!(!q.replay_dead_letter(&dl.entry).await.unwrap());
    let d = c.next().await.unwrap().expect("the replayed event");
    assert_eq!(d.event.id, "p1");
    assert_eq!(d.deliveries, 1, "not a fresh delivery count");
    c.dead_letter(&d, "still broken").await.unwrap();
    let dead = q.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, "still broken");
    assert_eq!(dead[0].deliveries, 1);
    assert!(q.discard_dead_letter(&dead[0].entry).await.unwrap());
    assert!(!q.discard_dead_letter(&dead[0].entry).await.unwrap());
    assert!(!q.replay_dead_letter(&dead[0].entry).await.unwrap());
    assert_eq!(q.dead_letter_count().await.unwrap(), 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(c.next().await.unwrap().is_none());
}

/// `replay_dead_letter`: "for the consumer group that gave up on it only (other groups skip
/// it)"; "Several groups may read one stream, each getting every event"; "An entry is deleted
/// from the stream only when no group still needs it".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s55_stream_two_groups_each_get_every_event_and_replay_is_for_one() {
    let Some(n) = nodes() else { return };
    let stream = unique("groups");
    let claim = Duration::from_secs(60);
    let mut g1 = consumer(&n, &stream, "g1", "w", claim).await;
    let mut g2 = consumer(&n, &stream, "g2", "w", claim).await;
    let q = queue(&n, &stream).await;
    for id in ["a", "b", "c"] {
        q.push(event(id), TTL).await.unwrap();
    }
    let mut ids1 = Vec::new();
    while let Some(d) = g1.next().await.unwrap() {
        ids1.push(d.event.id.clone());
        if d.event.id == "b" {
            g1.dead_letter(&d, "g1 cannot").await.unwrap();
        } else {
            g1.ack(&d).await.unwrap();
        }
    }
    assert_eq!(ids1, ["a", "b", "c"]);
    // g2 has not read them: every entry is still there.
    assert_eq!(cli_num(port0(), &["XLEN", &stream]), 3);
    // A group created now sees the entries still in the stream.
    let mut g3 = consumer(&n, &stream, "g3", "w", claim).await;
    let mut ids3 = Vec::new();
    while let Some(d) = g3.next().await.unwrap() {
        ids3.push(d.event.id.clone());
        g3.ack(&d).await.unwrap();
    }
    assert_eq!(ids3, ["a", "b", "c"]);
    let mut ids2 = Vec::new();
    while let Some(d) = g2.next().await.unwrap() {
        ids2.push(d.event.id.clone());
        g2.ack(&d).await.unwrap();
    }
    assert_eq!(ids2, ["a", "b", "c"]);
    assert_eq!(cli_num(port0(), &["XLEN", &stream]), 0);
    let dead = q.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].group, "g1");
    assert!(q.replay_dead_letter(&dead[0].entry).await.unwrap());
    let d = g1.next().await.unwrap().expect("replayed to g1");
    assert_eq!(d.event.id, "b");
    assert!(g2.next().await.unwrap().is_none(), "g2 got g1's replay");
    assert!(g3.next().await.unwrap().is_none(), "g3 got g1's replay");
    g1.ack(&d).await.unwrap();
    // Once g1 acked the replayed entry, no group needs it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while cli_num(port0(), &["XLEN", &stream]) != 0 {
        assert!(
            Instant::now() < deadline,
            "the replayed entry stays in the stream after its ack"
        );
        // Let the other groups skip it (they acknowledge skipped entries).
        assert!(g2.next().await.unwrap().is_none());
        assert!(g3.next().await.unwrap().is_none());
    }
}

/// `dead_letter`: "it moves to the dead-letter stream with `reason` (at most 1 KiB kept)".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s55_stream_dead_letter_reason_is_cut_to_1_kib_at_a_char_boundary() {
    let Some(n) = nodes() else { return };
    let stream = unique("reason");
    let mut c = consumer(&n, &stream, "g", "w", Duration::from_secs(60)).await;
    let q = queue(&n, &stream).await;
    q.push(event("r"), TTL).await.unwrap();
    q.push(event("s"), TTL).await.unwrap();
    let long = "é".repeat(1000) + "\n\0 tail";
    let d = c.next().await.unwrap().unwrap();
    c.dead_letter(&d, &long).await.unwrap();
    let d = c.next().await.unwrap().unwrap();
    c.dead_letter(&d, "").await.unwrap();
    let dead = q.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.len(), 2);
    assert!(dead[0].reason.len() <= 1024, "{}", dead[0].reason.len());
    assert!(dead[0].reason.len() >= 1022, "{}", dead[0].reason.len());
    assert!(long.starts_with(&dead[0].reason));
    assert_eq!(dead[1].reason, "");
}

/// `dead_letters`: "Up to `count` dead letters (at most 1,000), oldest first, after the entry
/// `after` (exclusive) when given: page through them by passing the last `entry` seen."
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s55_stream_dead_letters_page_oldest_first() {
    let Some(n) = nodes() else { return };
    let stream = unique("pages");
    let mut c = consumer(&n, &stream, "g", "w", Duration::from_secs(60)).await;
    let q = queue(&n, &stream).await;
    for i in 0..7 {
        q.push(event(&format!("d{i}")), TTL).await.unwrap();
    }
    while let Some(d) = c.next().await.unwrap() {
        c.dead_letter(&d, &d.event.id.clone()).await.unwrap();
    }
    assert_eq!(q.dead_letter_count().await.unwrap(), 7);
    let mut all = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = q.dead_letters(after.as_deref(), 3).await.unwrap();
        assert!(page.len() <= 3);
        if page.is_empty() {
            break;
        }
        after = Some(page.last().unwrap().entry.clone());
        all.extend(page.into_iter().map(|d| d.event.id));
    }
    assert_eq!(all, ["d0", "d1", "d2", "d3", "d4", "d5", "d6"]);
    let zero = q.dead_letters(None, 0).await.unwrap();
    assert!(zero.is_empty(), "asked for 0, got {}", zero.len());
    let many = q.dead_letters(None, usize::MAX).await.unwrap();
    assert_eq!(many.len(), 7);
    // After a discarded entry, paging goes on from where it was.
    let first = q.dead_letters(None, 2).await.unwrap();
    assert!(q.discard_dead_letter(&first[1].entry).await.unwrap());
    let rest = q.dead_letters(Some(&first[1].entry), 10).await.unwrap();
    let ids: Vec<_> = rest.iter().map(|d| d.event.id.as_str()).collect();
    assert_eq!(ids, ["d2", "d3", "d4", "d5", "d6"]);
}

/// Malformed ids given to the dead-letter API: `replay_dead_letter` / `discard_dead_letter`:
/// "`Ok(false)` when there is no such dead letter". No panic, never `Ok(true)`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s55_stream_malformed_dead_letter_ids() {
    let Some(n) = nodes() else { return };
    let stream = unique("badids");
    let q = queue(&n, &stream).await;
    q.push(event("x"), TTL).await.unwrap();
    for bad in [
        "",
        "garbage",
        "0-0",
        "-",
        "+",
        "99999999999999-0",
        "1-1\r\nPING",
    ] {
        let r = q.discard_dead_letter(bad).await;
        assert!(!matches!(r, Ok(true)), "{bad:?}: {r:?}");
        let r = q.replay_dead_letter(bad).await;
        assert!(!matches!(r, Ok(true)), "{bad:?}: {r:?}");
        let r = q.dead_letters(Some(bad), 5).await;
        assert!(
            r.as_ref().map(|v| v.is_empty()).unwrap_or(true),
            "{bad:?}: {r:?}"
        );
    }
}

/// `with_wait`: "How long `next` waits for a new event before answering `None` \[500 ms\]. ...
/// a new event waits about 100 ms at most to be seen; it never blocks the connection, which
/// its clones (a queue, a store, other consumers) share."
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s55_stream_with_wait_bounds_and_a_shared_connection_is_not_blocked() {
    let Some(n) = nodes() else { return };
    let stream = unique("wait");
    let conn = RedisConnection::connect_cluster(&n).await.unwrap();
    let mut c = RedisStreamConsumer::join(conn.clone(), stream.clone(), "g", "w", TTL)
        .await
        .unwrap()
        .with_wait(Duration::from_millis(400));
    let start = Instant::now();
    assert!(c.next().await.unwrap().is_none());
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(380),
        "answered None after {took:?}, before its wait"
    );
    assert!(took < Duration::from_secs(4), "{took:?}");

    // A long wait: an event pushed on the same connection meanwhile is pushed at once and seen.
    let q = RedisStreamQueue::new(conn.clone(), stream.clone()).unwrap();
    let mut c = c.with_wait(Duration::from_secs(20));
    let waiter = tokio::spawn(async move {
        let s = Instant::now();
        let d = c.next().await;
        (d.map(|d| d.map(|d| d.event.id)), s.elapsed(), c)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let push_start = Instant::now();
    assert_eq!(q.push(event("w1"), TTL).await.unwrap(), Push::Enqueued);
    let push_took = push_start.elapsed();
    assert!(
        push_took < Duration::from_secs(5),
        "the push waited {push_took:?} behind the consumer's wait"
    );
    let (got, took, c) = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("next() saw the new event")
        .unwrap();
    assert_eq!(got.unwrap().as_deref(), Some("w1"));
    assert!(took < Duration::from_secs(10), "{took:?}");

    // Zero: answers at once; Duration::MAX: waits until an event comes.
    let mut c = c.with_wait(Duration::ZERO);
    let s = Instant::now();
    assert!(c.next().await.unwrap().is_none());
    assert!(s.elapsed() < Duration::from_secs(3), "{:?}", s.elapsed());
    let mut c = c.with_wait(Duration::MAX);
    let q2 = q.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        q2.push(event("w2"), TTL).await.unwrap();
    });
    let d = tokio::time::timeout(Duration::from_secs(10), c.next())
        .await
        .expect("a Duration::MAX wait ended with the event")
        .unwrap()
        .expect("an event");
    assert_eq!(d.event.id, "w2");
}

/// `next`: "Cancelling it (a `select!` or a timeout around it) loses nothing: an event taken by
/// a read whose answer was dropped stays pending for this consumer and is delivered again
/// after the claim delay, counted as a delivery." 40 events, `next()` cut at seeded random
/// points, every completed delivery acknowledged: in the end every event was handled, none
/// after its ack, none dead-lettered (10 deliveries allowed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s55_stream_next_cancelled_at_random_points_loses_nothing() {
    let Some(n) = nodes() else { return };
    let stream = unique("cancel");
    let claim = Duration::from_millis(300);
    let mut c = consumer(&n, &stream, "g", "w", claim)
        .await
        .with_max_deliveries(10);
    let q = queue(&n, &stream).await;
    let all: Vec<String> = (0..40).map(|i| format!("x{i}")).collect();
    for id in &all {
        q.push(event(id), TTL).await.unwrap();
    }
    let mut rng = Rng(0x5eed_5555);
    let mut acked: HashMap<String, u64> = HashMap::new();
    let mut cut = 0;
    for _ in 0..300 {
        let d = Duration::from_micros(rng.next() % 4000);
        match tokio::time::timeout(d, c.next()).await {
            Err(_) => cut += 1,
            Ok(r) => {
                if let Some(d) = r.unwrap() {
                    assert!(
                        !acked.contains_key(&d.event.id),
                        "{} delivered again after its ack",
                        d.event.id
                    );
                    acked.insert(d.event.id.clone(), d.deliveries);
                    c.ack(&d).await.unwrap();
                }
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.len() < all.len() && Instant::now() < deadline {
        if let Some(d) = c.next().await.unwrap() {
            assert!(
                !acked.contains_key(&d.event.id),
                "{} delivered again after its ack",
                d.event.id
            );
            acked.insert(d.event.id.clone(), d.deliveries);
            c.ack(&d).await.unwrap();
        }
    }
    eprintln!("{cut} reads cut");
    let missing: Vec<_> = all.iter().filter(|id| !acked.contains_key(*id)).collect();
    assert!(missing.is_empty(), "lost: {missing:?}");
    assert_eq!(q.dead_letter_count().await.unwrap(), 0);
    tokio::time::sleep(claim * 2).await;
    assert!(c.next().await.unwrap().is_none());
}

/// `with_max_deliveries`: "with 1, such an event goes to the dead letters (where it can be
/// replayed) instead of to a handler"; and "(at least 1)": 0 delivers once, then dead-letters.
/// Every event is handled or dead-lettered, never both, never lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s55_stream_max_deliveries_one_and_zero_cut_reads_go_to_dead_letters() {
    let Some(n) = nodes() else { return };
    for limit in [1u64, 0] {
        let stream = unique(&format!("max{limit}"));
        let claim = Duration::from_millis(200);
        let mut c = consumer(&n, &stream, "g", "w", claim)
            .await
            .with_max_deliveries(limit);
        let q = queue(&n, &stream).await;
        let all: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
        for id in &all {
            q.push(event(id), TTL).await.unwrap();
        }
        let mut rng = Rng(0xabcd_0000 + limit);
        let mut handled = HashSet::new();
        for _ in 0..150 {
            let d = Duration::from_micros(rng.next() % 3000);
            if let Ok(r) = tokio::time::timeout(d, c.next()).await {
                if let Some(d) = r.unwrap() {
                    assert_eq!(d.deliveries, 1);
                    assert!(handled.insert(d.event.id.clone()));
                    c.ack(&d).await.unwrap();
                }
            }
        }
        // Drain: after the claim delay the cut reads' events are dead-lettered.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            tokio::time::sleep(claim + Duration::from_millis(50)).await;
            while let Some(d) = c.next().await.unwrap() {
                assert_eq!(d.deliveries, 1, "delivered twice with a limit of {limit}");
                assert!(handled.insert(d.event.id.clone()));
                c.ack(&d).await.unwrap();
            }
            let dead = q.dead_letter_count().await.unwrap() as usize;
            if handled.len() + dead >= all.len() || Instant::now() > deadline {
                break;
            }
        }
        let dead: HashSet<String> = q
            .dead_letters(None, 1000)
            .await
            .unwrap()
            .into_iter()
            .map(|d| d.event.id)
            .collect();
        assert!(handled.is_disjoint(&dead), "handled and dead: {dead:?}");
        let missing: Vec<_> = all
            .iter()
            .filter(|id| !handled.contains(*id) && !dead.contains(*id))
            .collect();
        assert!(missing.is_empty(), "limit {limit}: lost {missing:?}");
    }
}

/// `with_max_deliveries(0)` "(at least 1)": an event is delivered once before it is
/// dead-lettered, never dead-lettered unseen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s55_stream_max_deliveries_zero_still_delivers_once() {
    let Some(n) = nodes() else { return };
    let stream = unique("zero");
    let mut c = consumer(&n, &stream, "g", "w", Duration::from_millis(100))
        .await
        .with_max_deliveries(0);
    let q = queue(&n, &stream).await;
    q.push(event("z"), TTL).await.unwrap();
    let d = c.next().await.unwrap().expect("delivered once");
    assert_eq!(d.deliveries, 1);
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(c.next().await.unwrap().is_none());
    assert_eq!(q.dead_letter_count().await.unwrap(), 1);
}

/// `RedisStreamQueue`: "a dedup key is remembered only if its event was appended; the backlog
/// is bounded (a full stream answers `Push::Full`)"; `with_max_backlog` "(at least 1)";
/// `EventQueue::push`: "Queues `event` unless its dedup key was taken within `dedup_ttl`".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s55_stream_backlog_and_dedup_on_the_cluster() {
    let Some(n) = nodes() else { return };
    let stream = unique("backlog");
    let mut c = consumer(&n, &stream, "g", "w", TTL).await;
    let q = queue(&n, &stream).await.with_max_backlog(2);
    assert_eq!(q.push(event("b1"), TTL).await.unwrap(), Push::Enqueued);
    assert_eq!(q.push(event("b2"), TTL).await.unwrap(), Push::Enqueued);
    assert_eq!(q.push(event("b3"), TTL).await.unwrap(), Push::Full);
    assert_eq!(q.push(event("b3"), TTL).await.unwrap(), Push::Full);
    assert_eq!(q.push(event("b1"), TTL).await.unwrap(), Push::Duplicate);
    let d = c.next().await.unwrap().unwrap();
    c.ack(&d).await.unwrap();
    assert_eq!(q.push(event("b3"), TTL).await.unwrap(), Push::Enqueued);
    // A short dedup TTL: a copy within it is a duplicate, one after it an event again.
    let short = Duration::from_millis(300);
    let stream2 = unique("dedupttl");
    let mut c2 = consumer(&n, &stream2, "g", "w", TTL).await;
    let q2 = queue(&n, &stream2).await;
    assert_eq!(q2.push(event("t"), short).await.unwrap(), Push::Enqueued);
    assert_eq!(q2.push(event("t"), short).await.unwrap(), Push::Duplicate);
    // The same id on another route is another event.
    assert_eq!(
        q2.push(event("t").with_route("other"), short)
            .await
            .unwrap(),
        Push::Enqueued
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(q2.push(event("t"), short).await.unwrap(), Push::Enqueued);
    let mut n_t = 0;
    while let Some(d) = c2.next().await.unwrap() {
        n_t += 1;
        c2.ack(&d).await.unwrap();
    }
    assert_eq!(n_t, 3);
    // Backlog 0 is taken as 1.
    let stream3 = unique("backlog0");
    let _c3 = consumer(&n, &stream3, "g", "w", TTL).await;
    let q3 = queue(&n, &stream3).await.with_max_backlog(0);
    assert_eq!(q3.push(event("o1"), TTL).await.unwrap(), Push::Enqueued);
    assert_eq!(q3.push(event("o2"), TTL).await.unwrap(), Push::Full);
}

/// A zero dedup TTL is a `Duration` like any other: a push with it must not fail (Redis
/// refuses an expiry of 0 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s55_stream_push_with_a_zero_dedup_ttl() {
    let Some(n) = nodes() else { return };
    let stream = unique("ttl0");
    let q = queue(&n, &stream).await;
    let r = q.push(event("z0"), Duration::ZERO).await;
    assert!(
        matches!(r, Ok(Push::Enqueued)),
        "a push with a zero dedup TTL: {r:?}"
    );
    let r = q.push(event("z1"), Duration::from_nanos(1)).await;
    assert!(matches!(r, Ok(Push::Enqueued)), "{r:?}");
}

/// `DeadLetter::event` / `Delivery::event`: "The event"; `WebhookEvent::body`: "The raw body,
/// exactly as signed". Hostile field values go through the stream unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s55_stream_events_round_trip_exactly() {
    let Some(n) = nodes() else { return };
    let stream = unique("roundtrip");
    let mut c = consumer(&n, &stream, "g", "w", TTL).await;
    let q = queue(&n, &stream).await;
    let bin: Vec<u8> = (0..=255u8).collect();
    let mut headers = HeaderMap::new();
    headers.append(
        HeaderName::from_static("x-a"),
        HeaderValue::from_bytes(b"\xff\xfe raw").unwrap(),
    );
    headers.append(HeaderName::from_static("x-a"), HeaderValue::from_static(""));
    headers.append(
        HeaderName::from_static("x-b"),
        HeaderValue::from_static("v"),
    );
    let evs = vec![
        WebhookEvent::new("standard", "", Bytes::new()),
        WebhookEvent::new("sch:em%e", "i{d}:\u{1F600}", Bytes::from(bin.clone()))
            .with_route("r:o%ute")
            .with_timestamp(Some(i64::MIN))
            .with_headers(headers.clone()),
        WebhookEvent::new("s", "fields", Bytes::from_static(b"event\0id\0scheme"))
            .with_timestamp(Some(i64::MAX)),
        WebhookEvent::new("s", "big", Bytes::from(vec![b'x'; 1 << 20])),
    ];
    for e in &evs {
        assert_eq!(q.push(e.clone(), TTL).await.unwrap(), Push::Enqueued);
    }
    for e in &evs {
        let d = c.next().await.unwrap().expect("event");
        assert_eq!(d.event.scheme, e.scheme);
        assert_eq!(d.event.route, e.route);
        assert_eq!(d.event.id, e.id);
        assert_eq!(d.event.timestamp, e.timestamp);
        assert_eq!(d.event.headers, e.headers);
        assert_eq!(d.event.body, e.body);
        c.dead_letter(&d, "check").await.unwrap();
    }
    let dead = q.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.len(), evs.len());
    for (dl, e) in dead.iter().zip(&evs) {
        assert_eq!(dl.event.id, e.id);
        assert_eq!(dl.event.headers, e.headers);
        assert_eq!(dl.event.body, e.body);
        assert_eq!(dl.event.timestamp, e.timestamp);
    }
}

/// Names: `connect`/`join` # Errors: "When a name is empty, the stream name has a `}` but no
/// hash tag". A tag Redis ignores (`{}`) is no hash tag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s55_stream_names_refused_before_anything_is_sent() {
    let Some(n) = nodes() else { return };
    let conn = RedisConnection::connect_cluster(&n).await.unwrap();
    let s = unique("names");
    for (stream, group, name) in [
        (s.as_str(), "", "w"),
        (s.as_str(), "g", ""),
        ("", "g", "w"),
        ("a}b", "g", "w"),
        ("a{}b}", "g", "w"),
    ] {
        let r = RedisStreamConsumer::join(conn.clone(), stream, group, name, TTL).await;
        assert!(r.is_err(), "{stream:?}/{group:?}/{name:?} accepted");
    }
    for stream in ["", "a}b", "{}}", "a{}b}"] {
        assert!(
            RedisStreamQueue::new(conn.clone(), stream).is_err(),
            "queue on {stream:?} accepted"
        );
    }
    // A stream whose `}` comes before its tag has a hash tag: accepted.
    let ok = format!("}}{{{}}}", unique("ok"));
    assert!(RedisStreamQueue::new(conn.clone(), ok.clone()).is_ok());
    assert!(RedisStreamConsumer::join(conn.clone(), ok, "g", "w", TTL)
        .await
        .is_ok());
    // Nothing was created under the refused names.
    assert_eq!(cli(port0(), &["EXISTS", "a}b"]).trim(), "0");
}

/// `replay_dead_letter` # Errors: "When the stream is full (its backlog is at the maximum)".
/// The refused replay loses nothing: the dead letter stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s55_stream_replay_into_a_full_stream_fails_and_keeps_the_dead_letter() {
    let Some(n) = nodes() else { return };
    let stream = unique("replayfull");
    let mut c = consumer(&n, &stream, "g", "w", TTL).await;
    let q = queue(&n, &stream).await.with_max_backlog(1);
    q.push(event("f0"), TTL).await.unwrap();
    let d = c.next().await.unwrap().unwrap();
    c.dead_letter(&d, "poison").await.unwrap();
    assert_eq!(q.push(event("f1"), TTL).await.unwrap(), Push::Enqueued);
    let dead = q.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    let r = q.replay_dead_letter(&dead[0].entry).await;
    assert!(r.is_err(), "replayed into a full stream: {r:?}");
    assert_eq!(
        q.dead_letter_count().await.unwrap(),
        1,
        "the dead letter is gone"
    );
    let d = c.next().await.unwrap().unwrap();
    assert_eq!(d.event.id, "f1");
    c.ack(&d).await.unwrap();
    assert!(q.replay_dead_letter(&dead[0].entry).await.unwrap());
    let d = c.next().await.unwrap().unwrap();
    assert_eq!(d.event.id, "f0");
}

/// "Poison events": an entry in the stream that is not an event (written by something else)
/// must not wedge the consumer: the events after it are still delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s55_stream_a_foreign_entry_does_not_wedge_the_consumer() {
    let Some(n) = nodes() else { return };
    let stream = unique("foreign");
    let mut c = consumer(&n, &stream, "g", "w", TTL).await;
    let q = queue(&n, &stream).await;
    let out = cli(port0(), &["XADD", &stream, "*", "not", "an event"]);
    assert!(out.contains('-'), "{out}");
    q.push(event("after"), TTL).await.unwrap();
    let mut got = None;
    for _ in 0..5 {
        match c.next().await {
            Ok(Some(d)) => {
                got = Some(d);
                break;
            }
            Ok(None) => {}
            Err(e) => eprintln!("next: {e}"),
        }
    }
    let d = got.expect("the event after a foreign entry never came");
    assert_eq!(d.event.id, "after");
}

/// `with_wait`: "so a new event waits about 100 ms at most to be seen", also late in a long
/// wait (the reads are at most 100 ms apart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s55_stream_an_event_late_in_a_long_wait_is_seen_within_about_100_ms() {
    let Some(n) = nodes() else { return };
    let stream = unique("latency");
    let mut c = consumer(&n, &stream, "g", "w", TTL)
        .await
        .with_wait(Duration::from_secs(30));
    let q = queue(&n, &stream).await;
    let waiter = tokio::spawn(async move {
        let d = c.next().await.unwrap().expect("event");
        (Instant::now(), d.event.id)
    });
    tokio::time::sleep(Duration::from_millis(2500)).await;
    q.push(event("late"), TTL).await.unwrap();
    let pushed = Instant::now();
    let (seen, id) = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("seen")
        .unwrap();
    assert_eq!(id, "late");
    let lag = seen.saturating_duration_since(pushed);
    assert!(
        lag < Duration::from_millis(600),
        "seen {lag:?} after the push"
    );
}

/// A stale handler: consumer A's event was claimed by B after the claim delay and B acked it;
/// A then gives up on it with `dead_letter`. "an event leaves a group only once its handler
/// acknowledged it or it was dead-lettered": it already left; a dead letter of it would be
/// replayed and handled a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s55_stream_dead_letter_after_another_consumer_acked_it() {
    let Some(n) = nodes() else { return };
    let stream = unique("stale");
    let claim = Duration::from_millis(200);
    let mut a = consumer(&n, &stream, "g", "a", claim).await;
    let mut b = consumer(&n, &stream, "g", "b", claim).await;
    let q = queue(&n, &stream).await;
    q.push(event("s1"), TTL).await.unwrap();
    let da = a.next().await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let db = b.next().await.unwrap().expect("claimed by b");
    assert_eq!(db.entry, da.entry);
    b.ack(&db).await.unwrap();
    let r = a.dead_letter(&da, "a gave up late").await;
    let dead = q.dead_letter_count().await.unwrap();
    eprintln!("late dead_letter: {r:?}, dead letters: {dead}");
    assert_eq!(dead, 0, "an acknowledged event became a dead letter");
}

/// `next`: "first one left unacknowledged for longer than the claim delay ..., else a new
/// one".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s55_stream_a_claimable_entry_comes_before_a_new_one() {
    let Some(n) = nodes() else { return };
    let stream = unique("order");
    let claim = Duration::from_millis(200);
    let mut c = consumer(&n, &stream, "g", "w", claim).await;
    let q = queue(&n, &stream).await;
    q.push(event("old"), TTL).await.unwrap();
    let d = c.next().await.unwrap().unwrap();
    assert_eq!(d.event.id, "old");
    q.push(event("new"), TTL).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let d = c.next().await.unwrap().unwrap();
    assert_eq!(
        d.event.id, "old",
        "a new event came before the claimable one"
    );
    assert_eq!(d.deliveries, 2);
}

/// Found by this round (fixed): `RedisStreamQueue`: "Keys: the stream, ... and `<base>:dead` for
/// dead letters"; the streams `webhooks` and `{webhooks}` sharing one base are told apart. The
/// stream `{X}:dead` is the dead-letter stream of `X`: a queue on it answered `Enqueued` for an
/// event that was then listed as a dead letter of `X` (group "", 0 deliveries), and replaying it
/// moved it into `X` for a group that does not exist. Now "A name that is another stream's key
/// is refused when the queue or a consumer is made (a `Config` error)"; X's dead letters are
/// untouched. The same for a name with `:seen:` after its tag (a dedup key's place).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s55_stream_a_stream_named_like_anothers_dead_letters() {
    let Some(n) = nodes() else { return };
    let x = unique("deadname");
    let mut c = consumer(&n, &x, "g", "w", TTL).await;
    let qx = queue(&n, &x).await;
    qx.push(event("x1"), TTL).await.unwrap();
    let d = c.next().await.unwrap().unwrap();
    c.dead_letter(&d, "poison").await.unwrap();
    for name in [
        format!("{{{x}}}:dead"),
        format!("a{{{x}}}b:dead"),
        format!("{{{x}}}:seen:standard:x1"),
    ] {
        let e = RedisStreamQueue::connect_cluster(&n, name.clone())
            .await
            .expect_err("another stream's key as a queue");
        assert_eq!(kind(&e), Some(sturdy::core::ErrorKind::Config), "{e}");
        assert!(e.to_string().contains(&name), "names the stream: {e}");
        let e = RedisStreamConsumer::connect_cluster(&n, name.clone(), "g", "w", TTL)
            .await
            .expect_err("another stream's key as a consumer's stream");
        assert_eq!(kind(&e), Some(sturdy::core::ErrorKind::Config), "{e}");
    }
    // Not another stream's key: accepted.
    for name in [format!("{x}:dead"), format!("{{{x}}}:deadline")] {
        RedisStreamQueue::connect_cluster(&n, name.clone())
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let dead = qx.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].event.id, "x1");
}

/// `with_max_dead_letters`: "About how many dead letters are kept \[100,000\] (at least 1);
/// past it the oldest are dropped (Redis's approximate `MAXLEN ~` trimming)". Probe: 10 kept,
/// 250 dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s55_stream_max_dead_letters_keeps_about_that_many() {
    let Some(n) = nodes() else { return };
    let stream = unique("maxdead");
    let mut c = consumer(&n, &stream, "g", "w", TTL)
        .await
        .with_max_dead_letters(10);
    let q = queue(&n, &stream).await;
    for i in 0..250 {
        q.push(event(&format!("m{i}")), TTL).await.unwrap();
        let d = c.next().await.unwrap().unwrap();
        c.dead_letter(&d, "x").await.unwrap();
    }
    let count = q.dead_letter_count().await.unwrap();
    eprintln!("with_max_dead_letters(10): {count} kept of 250");
    assert!(count < 250, "none dropped");
    let first = q.dead_letters(None, 1).await.unwrap();
    assert_ne!(first[0].event.id, "m0", "the oldest was not dropped first");
}
