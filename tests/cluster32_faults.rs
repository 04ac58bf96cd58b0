//! The Redis Cluster backends through faults of a 6-node cluster of the test's own (3
//! primaries, 1 replica each, node timeout 1 s): a failover, a primary killed, a slot moved
//! during traffic (MOVED/ASK/TRYAGAIN), a paused node, a restart without data. What is checked is
//! the table and rules of `docs/RELIABILITY.md` "Redis backends: failover and partitions".
#![cfg(feature = "full")]

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

use axum::body::Body;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use sturdy::idempotency::server::{ByCredentials, IdempotencyLayer};
use sturdy::ratelimit::{Quota, Reserve};
use sturdy::redis::{RedisIdempotencyStore, RedisQuota, RedisStreamConsumer, RedisStreamQueue};
use sturdy::webhook::{EventQueue, Push, WebhookEvent};
use tower::ServiceExt;

use crate::cluster32_util::{chain, kind, names_cause, own_possible, OwnCluster, OWN};

/// Every key of these tests is in the slot of `t`: the stream `{t}`, the quota key `t` (keys
/// `c32rl:{t}:tat`), the idempotency prefix `{t}:idem`.
const STREAM: &str = "{t}";
const QKEY: &str = "t";
const IDEM_PREFIX: &str = "{t}:idem";

type PerKey = Arc<Mutex<HashMap<String, usize>>>;

fn app(store: RedisIdempotencyStore) -> (Router, PerKey) {
    let per_key = PerKey::default();
    let pk = per_key.clone();
    let router = Router::new()
        .route(
            "/orders",
            post(move |h: http::HeaderMap| {
                let pk = pk.clone();
                async move {
                    let k = h["idempotency-key"].to_str().unwrap().to_owned();
                    *pk.lock().unwrap().entry(k).or_default() += 1;
                    (StatusCode::CREATED, "made")
                }
            }),
        )
        .layer(IdempotencyLayer::new(store, ByCredentials::default()));
    (router, per_key)
}

async fn send(app: &Router, key: &str) -> (StatusCode, Bytes) {
    let req = Request::post("/orders")
        .header("idempotency-key", key)
        .header("authorization", "Bearer c32")
        .body(Body::from("{}"))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let (p, b) = resp.into_parts();
    (p.status, b.collect().await.unwrap().to_bytes())
}

/// What a traffic loop saw.
#[derive(Default)]
struct Seen {
    /// Events the queue answered `Enqueued` or `Duplicate` for.
    acked: HashSet<String>,
    /// Idempotency keys whose first request got 201.
    created: HashSet<String>,
    /// Quota grants, with their time.
    grants: Vec<Instant>,
    /// (operation, error text, how long it took)
    errors: Vec<(String, String, Duration)>,
    /// The slowest enqueue or quota decision.
    slowest: Duration,
    /// The slowest idempotent request (a lock, a handler, a stored response and its retries).
    slowest_request: Duration,
    /// Rounds in a row with no error at the end.
    clean_tail: usize,
    rounds: usize,
}

struct Backends {
    queue: RedisStreamQueue,
    app: Router,
    per_key: PerKey,
    quota: RedisQuota,
}

async fn backends(urls: &[String], replication: bool) -> Backends {
    let mut queue = RedisStreamQueue::connect_cluster(urls, STREAM)
        .await
        .unwrap();
    let mut store = RedisIdempotencyStore::connect_cluster(urls)
        .await
        .unwrap()
        .with_prefix(IDEM_PREFIX);
    if replication {
        queue = queue.with_replication(1, Duration::from_millis(500));
        store = store.with_replication(1, Duration::from_millis(500));
    }
    let (app, per_key) = app(store);
    let quota = RedisQuota::connect_cluster(urls, Quota::per_second(50).unwrap())
        .await
        .unwrap()
        .with_prefix("c32rl");
    Backends {
        queue,
        app,
        per_key,
        quota,
    }
}

/// Two primaries that disagree for a moment about who owns a slot (the old owner already gives
/// it to the new one, which does not serve it yet and sends each request back) answer every
/// try with `MOVED`: the cluster client's own tries are spent in milliseconds. An answer that
/// says the command did not run is tried again within the operation's timeout, so operations
/// begun while the nodes disagree end well once they agree (RedisConnection::connect_cluster).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster32_nodes_that_disagree_about_a_slot_for_a_moment_cost_no_error() {
    if !own_possible() {
        return;
    }
    let _one = OWN.lock().await;
    let cluster = OwnCluster::start().await;
    let urls = cluster.urls();
    let b = Arc::new(backends(&urls, false).await);
    let (s, _) = send(&b.app, "pp-before").await;
    assert_eq!(s, StatusCode::CREATED);
    let slot = crate::cluster32_util::keyslot(cluster.ports[0], QKEY);
    let from = cluster.primary_of_slot(slot);
    let to = cluster.other_primary(&from.id);
    cluster.begin_move(slot, &from, &to);
    cluster.migrate_keys(slot, &from, &to);
    // The old owner gives the slot away; the new one, still importing, sends requests back.
    let out = crate::cluster32_util::cli(
        from.port,
        &["CLUSTER", "SETSLOT", &slot.to_string(), "NODE", &to.id],
    );
    assert_eq!(out.trim(), "OK", "SETSLOT NODE on the old owner: {out}");
    let ops = {
        let b = b.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let ev = WebhookEvent::new("standard", "pp-event", Bytes::from("{}"));
            let (sent, push, quota) = tokio::join!(
                send(&b.app, "pp-during"),
                b.queue.push(ev, Duration::from_secs(600)),
                b.quota.try_reserve(QKEY, Duration::ZERO),
            );
            let request = (sent.0, String::from_utf8_lossy(&sent.1).into_owned());
            let push = push.map_err(|e| chain(&*e));
            let quota = quota.map(|_| ()).map_err(|e| chain(&*e));
            (request, push, quota, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(250)).await;
    cluster.end_move(slot, &to);
    let (request, push, quota, took) = tokio::time::timeout(Duration::from_secs(10), ops)
        .await
        .expect("the operations hang")
        .unwrap();
    eprintln!("the three operations took {took:?}");
    assert_eq!(request.0, StatusCode::CREATED, "the request: {}", request.1);
    assert!(matches!(push, Ok(Push::Enqueued)), "the enqueue: {push:?}");
    assert!(quota.is_ok(), "the quota: {quota:?}");
    cluster.wait_ok(Duration::from_secs(10)).await;
    assert_eq!(cluster.primary_of_slot(slot).id, to.id);
    assert_eq!(b.per_key.lock().unwrap().get("pp-during"), Some(&1));
}

/// One enqueue, one idempotent request (sent twice) and one quota decision per round, every
/// 10 ms, until `stop`, and then on until the last 20 rounds were clean (for at most 30 s more):
/// on a loaded machine a round can take far longer than 10 ms, and a fixed wait after the fault
/// then held too few rounds to tell a recovered cluster from one that is not.
async fn traffic(b: Arc<Backends>, tag: &'static str, stop: Arc<AtomicBool>) -> Seen {
    let mut seen = Seen::default();
    let mut i = 0u64;
    let mut stopped_at: Option<Instant> = None;
    loop {
        if stop.load(Ordering::SeqCst) {
            let at = *stopped_at.get_or_insert_with(Instant::now);
            if seen.clean_tail >= 20 || at.elapsed() > Duration::from_secs(30) {
                break;
            }
        }
        i += 1;
        seen.rounds += 1;
        let mut clean = true;
        let id = format!("{tag}-{i}");
        let t0 = Instant::now();
        let ev = WebhookEvent::new("standard", id.clone(), Bytes::from("{}"));
        match b.queue.push(ev, Duration::from_secs(600)).await {
            Ok(Push::Enqueued | Push::Duplicate) => {
                seen.acked.insert(id.clone());
            }
            Ok(Push::Full) => panic!("full"),
            Err(e) => {
                clean = false;
                seen.errors.push(("push".into(), chain(&*e), t0.elapsed()));
            }
        }
        seen.slowest = seen.slowest.max(t0.elapsed());
        for attempt in 0..2 {
            let t0 = Instant::now();
            let (s, body) = send(&b.app, &id).await;
            seen.slowest_request = seen.slowest_request.max(t0.elapsed());
            match s {
                StatusCode::CREATED => {
                    if attempt == 0 {
                        seen.created.insert(id.clone());
                    }
                }
                StatusCode::CONFLICT => {}
                _ => {
                    clean = false;
                    seen.errors.push((
                        format!("idem {s}"),
                        String::from_utf8_lossy(&body).into_owned(),
                        t0.elapsed(),
                    ));
                }
            }
        }
        let t0 = Instant::now();
        match b.quota.try_reserve(QKEY, Duration::ZERO).await {
            Ok(Reserve::Granted { wait }) if wait.is_zero() => seen.grants.push(Instant::now()),
            Ok(_) => {}
            Err(e) => {
                clean = false;
                seen.errors.push(("quota".into(), chain(&*e), t0.elapsed()));
            }
        }
        seen.slowest = seen.slowest.max(t0.elapsed());
        if clean {
            seen.clean_tail += 1;
        } else {
            seen.clean_tail = 0;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    seen
}

/// Drains the stream with a fresh group; the ids and how often each came out.
async fn drain(urls: &[String], group: &str) -> HashMap<String, usize> {
    let mut c =
        RedisStreamConsumer::connect_cluster(urls, STREAM, group, "drain", Duration::from_secs(60))
            .await
            .unwrap()
            .with_wait(Duration::from_millis(200));
    let mut out: HashMap<String, usize> = HashMap::new();
    let mut idle = 0;
    while idle < 3 {
        match c.next().await.unwrap() {
            Some(d) => {
                idle = 0;
                *out.entry(d.event.id.clone()).or_default() += 1;
                c.ack(&d).await.unwrap();
            }
            None => idle += 1,
        }
    }
    out
}

/// Checks shared by the fault tests: bounded time, errors that name their cause, every acked
/// event in the stream once, every idempotent request run at most once and replayed after.
async fn check_after(
    urls: &[String],
    b: &Backends,
    seen: &Seen,
    bound: Duration,
    lock_may_stay: bool,
) {
    assert!(
        seen.slowest <= bound,
        "an operation took {:?} (bound {bound:?})",
        seen.slowest
    );
    // A request is a lock, the handler and a stored response (tried 3 times, then a marker).
    assert!(
        seen.slowest_request <= bound * 6,
        "an idempotent request took {:?}",
        seen.slowest_request
    );
    for (op, text, took) in &seen.errors {
        assert!(
            names_cause(text) || text.contains("unavailable") || text.contains("rate-limit"),
            "{op} failed after {took:?} with an unclear error: {text}"
        );
    }
    let out = drain(urls, "drain").await;
    for id in &seen.acked {
        match out.get(id) {
            Some(1) => {}
            Some(n) => panic!("acked event {id} came out {n} times"),
            None => panic!("acked event {id} is lost"),
        }
    }
    for (id, n) in out.iter() {
        assert_eq!(*n, 1, "{id} came out {n} times");
    }
    for (k, n) in b.per_key.lock().unwrap().iter() {
        assert_eq!(*n, 1, "the handler ran {n} times for {k}");
    }
    for k in &seen.created {
        let (s, body) = send(&b.app, k).await;
        // idempotency.md "store down when the response is stored ... the key stays locked
        // until its lease ends": 409 is then documented.
        if !(lock_may_stay && s == StatusCode::CONFLICT) {
            assert_eq!(s, StatusCode::CREATED, "{k} not replayed: {body:?}");
        }
    }
    for (k, n) in b.per_key.lock().unwrap().iter() {
        assert_eq!(
            *n, 1,
            "the handler ran {n} times for {k} (after the replay)"
        );
    }
}

/// RELIABILITY.md "after the failover": decisions go to the promoted replica; locks, stored
/// responses and events that reached the replica are there. A graceful `CLUSTER FAILOVER` (the
/// replica has everything) during traffic with `with_replication(1, 500ms)`: every operation
/// ends within 2 s, the same objects work afterwards, no acked event lost or doubled, no
/// idempotent request run twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster32_graceful_failover_during_traffic_loses_and_doubles_nothing() {
    if !own_possible() {
        return;
    }
    let _one = OWN.lock().await;
    let cluster = OwnCluster::start().await;
    let urls = cluster.urls();
    let b = Arc::new(backends(&urls, true).await);
    let stop = Arc::new(AtomicBool::new(false));
    let t = tokio::spawn(traffic(b.clone(), "fo", stop.clone()));
    tokio::time::sleep(Duration::from_millis(800)).await;
    let primary = cluster.primary_of_key(QKEY);
    let replica = cluster.replica_of(&primary.id);
    cluster.failover(&replica, Duration::from_secs(10)).await;
    cluster.wait_ok(Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::SeqCst);
    let seen = t.await.unwrap();
    assert!(
        seen.clean_tail >= 20,
        "only {} clean rounds at the end; errors: {:?}",
        seen.clean_tail,
        seen.errors
    );
    assert!(seen.created.len() >= 20);
    check_after(&urls, &b, &seen, Duration::from_secs(2), false).await;
    // A failover answers no grant beyond the quota: at most one more burst (1).
    let span = seen.grants.last().unwrap().duration_since(seen.grants[0]);
    let bound = 2 + (span.as_millis() / 20) as usize + 1;
    assert!(
        seen.grants.len() <= bound,
        "{} grants in {span:?}",
        seen.grants.len()
    );
}

/// RELIABILITY.md "a cluster primary dies, until a replica takes over": operations on that
/// primary's keys fail with the documented causes, each within its bound; "Recovery without a
/// restart of the application": the same objects work once the replica took over; with
/// `with_replication(1, ..)` a lock and the events acked before the kill are still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster32_killed_primary_recovers_and_keeps_replicated_writes() {
    if !own_possible() {
        return;
    }
    let _one = OWN.lock().await;
    let mut cluster = OwnCluster::start().await;
    let urls = cluster.urls();
    let b = Arc::new(backends(&urls, true).await);
    // A lock held by a long handler, on another store, before the kill.
    let holder = RedisIdempotencyStore::connect_cluster(&urls)
        .await
        .unwrap()
        .with_prefix(IDEM_PREFIX)
        .with_replication(1, Duration::from_millis(500));
    use sturdy::idempotency::server::{Begin, IdempotencyStore, LockToken};
    // Right after the cluster came up, a replica may not confirm yet: try for a few seconds.
    let start = Instant::now();
    let mut n = 0;
    let held = loop {
        n += 1;
        let key = format!("held-{n}");
        match holder
            .begin(&key, [7; 32], LockToken::random(), Duration::from_secs(60))
            .await
        {
            Ok(r) => {
                assert!(matches!(r, Begin::Started), "{r:?}");
                break key;
            }
            Err(e) => {
                assert!(start.elapsed() < Duration::from_secs(5), "{}", chain(&*e));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let t = tokio::spawn(traffic(b.clone(), "kill", stop.clone()));
    tokio::time::sleep(Duration::from_millis(800)).await;
    let primary = cluster.primary_of_key(QKEY);
    let replica = cluster.replica_of(&primary.id);
    let killed_at = Instant::now();
    cluster.kill(primary.port);
    cluster
        .wait_primary(replica.port, Duration::from_secs(15))
        .await;
    let promoted_after = killed_at.elapsed();
    // Bring the old primary back (it rejoins as a replica), so that replication is confirmed.
    cluster.restart(primary.port).await;
    cluster.wait_ok(Duration::from_secs(15)).await;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    stop.store(true, Ordering::SeqCst);
    let seen = t.await.unwrap();
    eprintln!(
        "promoted after {promoted_after:?}; {} errors; {} rounds",
        seen.errors.len(),
        seen.rounds
    );
    assert!(
        seen.clean_tail >= 20,
        "only {} clean rounds at the end; last errors: {:?}",
        seen.clean_tail,
        seen.errors.iter().rev().take(3).collect::<Vec<_>>()
    );
    check_after(&urls, &b, &seen, Duration::from_millis(2500), true).await;
    let r = holder
        .begin(&held, [7; 32], LockToken::random(), Duration::from_secs(60))
        .await
        .unwrap();
    assert!(
        matches!(r, Begin::InFlight),
        "the replicated lock is gone: {r:?}"
    );
}

/// RELIABILITY.md "Slot moves": while a slot moves, "Keys already on either node are served
/// throughout (`ASK`)"; a new key gets `TRYAGAIN`, tried again within the timeout, then "the
/// Redis Cluster cannot serve this key now". The slot of every key moves to another primary
/// during traffic (MIGRATING/IMPORTING, keys migrated, then assigned): errors only with that
/// cause, already-stored responses replayed throughout, nothing lost or doubled, all clean
/// after the move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster32_slot_move_during_traffic() {
    if !own_possible() {
        return;
    }
    // The store's warnings (what a 503 was for) show with a failure's output.
    let _ = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_test_writer()
        .try_init();
    let _one = OWN.lock().await;
    let cluster = OwnCluster::start().await;
    let urls = cluster.urls();
    let b = Arc::new(backends(&urls, false).await);
    // Stored responses made before the move: replayed during it.
    for i in 0..5 {
        let (s, _) = send(&b.app, &format!("old-{i}")).await;
        assert_eq!(s, StatusCode::CREATED);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let t = tokio::spawn(traffic(b.clone(), "mv", stop.clone()));
    let replays = {
        let b = b.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut bad = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                for i in 0..5 {
                    let sent = Instant::now();
                    let (s, body) = send(&b.app, &format!("old-{i}")).await;
                    let took = sent.elapsed();
                    n += 1;
                    // The store's 1 s timeout can fire on a loaded machine (a 503 after about
                    // a second); a stored response the move made unreachable would fail fast.
                    let timed_out =
                        s == StatusCode::SERVICE_UNAVAILABLE && took >= Duration::from_millis(900);
                    if s != StatusCode::CREATED && !timed_out {
                        bad.push((s, took, String::from_utf8_lossy(&body).into_owned()));
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (n, bad)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let slot = crate::cluster32_util::keyslot(cluster.ports[0], QKEY);
    let from = cluster.primary_of_slot(slot);
    let to = cluster.other_primary(&from.id);
    cluster.begin_move(slot, &from, &to);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let moved = cluster.migrate_keys(slot, &from, &to);
    tokio::time::sleep(Duration::from_millis(800)).await;
    cluster.end_move(slot, &to);
    cluster.wait_ok(Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    stop.store(true, Ordering::SeqCst);
    let seen = t.await.unwrap();
    let (n, bad) = replays.await.unwrap();
    eprintln!(
        "moved {moved} keys; {} errors in {} rounds; {n} replays",
        seen.errors.len(),
        seen.rounds
    );
    assert!(
        bad.is_empty(),
        "stored responses not served during the move: {bad:?}"
    );
    for (op, text, _) in &seen.errors {
        assert!(
            // A 1 s store timeout can also fire on a loaded machine, and says so.
            text.contains("cannot serve this key now")
                || text.contains("unavailable")
                || text.contains("did not answer in time"),
            "{op}: {text}"
        );
    }
    assert!(
        seen.clean_tail >= 20,
        "only {} clean rounds after the move; last errors: {:?}",
        seen.clean_tail,
        seen.errors.iter().rev().take(3).collect::<Vec<_>>()
    );
    check_after(&urls, &b, &seen, Duration::from_millis(1500), false).await;
    assert_eq!(cluster.primary_of_slot(slot).id, to.id);
}

/// RELIABILITY.md "Redis hung (accepts, never answers)": as for Redis down, after the timeout;
/// "a lock the timed-out `begin` may have taken is released in the background ... so a retry
/// runs once Redis is back". The primary of the keys is paused (`CLIENT PAUSE 2500 ALL`): a
/// decision fails within its timeout with a `Timeout` error, an idempotent request gets 503
/// within the bound; once the pause ends, the same key runs (once) within a few seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster32_paused_primary_times_out_then_recovers() {
    if !own_possible() {
        return;
    }
    let _one = OWN.lock().await;
    let cluster = OwnCluster::start().await;
    let urls = cluster.urls();
    let quota = RedisQuota::connect_cluster(&urls, Quota::per_second(50).unwrap())
        .await
        .unwrap()
        .with_prefix("c32rl")
        .with_timeout(Duration::from_millis(300));
    let store = RedisIdempotencyStore::connect_cluster(&urls)
        .await
        .unwrap()
        .with_prefix(IDEM_PREFIX)
        .with_timeout(Duration::from_millis(300));
    let (app, per_key) = app(store);
    let queue = RedisStreamQueue::connect_cluster(&urls, STREAM)
        .await
        .unwrap()
        .with_timeout(Duration::from_millis(300));
    assert!(quota.try_reserve(QKEY, Duration::ZERO).await.is_ok());
    let primary = cluster.primary_of_key(QKEY);
    let out = crate::cluster32_util::cli(primary.port, &["CLIENT", "PAUSE", "2500", "ALL"]);
    assert_eq!(out.trim(), "OK");
    let paused_at = Instant::now();

    let t0 = Instant::now();
    let e = quota
        .try_reserve(QKEY, Duration::ZERO)
        .await
        .expect_err("a paused primary answered");
    let took = t0.elapsed();
    let text = chain(&*e);
    assert!(took < Duration::from_millis(1200), "{took:?}");
    assert_eq!(kind(&*e), Some(sturdy::core::ErrorKind::Timeout), "{text}");
    assert!(names_cause(&text), "{text}");

    let t0 = Instant::now();
    let (s, body) = send(&app, "during-pause").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{body:?}");
    assert!(
        t0.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t0.elapsed()
    );

    let t0 = Instant::now();
    let e = queue
        .push(
            WebhookEvent::new("standard", "p1", Bytes::from("{}")),
            Duration::from_secs(60),
        )
        .await
        .expect_err("a paused primary queued it");
    assert!(
        t0.elapsed() < Duration::from_millis(1200),
        "{:?}",
        t0.elapsed()
    );
    assert!(names_cause(&chain(&*e)), "{}", chain(&*e));
    assert!(
        paused_at.elapsed() < Duration::from_millis(2400),
        "the checks were too slow to be inside the pause"
    );

    // After the pause: the same key runs, once, within a few seconds.
    let start = Instant::now();
    loop {
        let (s, body) = send(&app, "during-pause").await;
        if s == StatusCode::CREATED {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(8),
            "still {s} {body:?} after {:?}",
            start.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(per_key.lock().unwrap()["during-pause"], 1);
    assert!(quota.try_reserve(QKEY, Duration::ZERO).await.is_ok());
    let p = queue
        .push(
            WebhookEvent::new("standard", "p1", Bytes::from("{}")),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    // The push that timed out may have run once the pause ended (then this is a duplicate):
    // either way the sender gets 200 now, and the event is in the stream once.
    assert!(matches!(p, Push::Enqueued | Push::Duplicate), "{p:?}");
    let mut c =
        RedisStreamConsumer::connect_cluster(&urls, STREAM, "g", "c", Duration::from_secs(30))
            .await
            .unwrap()
            .with_wait(Duration::from_millis(200));
    let mut ids = Vec::new();
    while let Some(d) = c.next().await.unwrap() {
        ids.push(d.event.id.clone());
        c.ack(&d).await.unwrap();
    }
    assert_eq!(ids, vec!["p1".to_owned()]);
}

/// RELIABILITY.md "Redis restarts without persistence": the consumer group is gone too: "a
/// consumer that joined before the restart gets errors (`NOGROUP`) until it joins again";
/// every stored response is gone ("a retry runs the handler again"); the same objects work.
/// The replica is stopped first, so the empty primary keeps its slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster32_restart_without_data() {
    if !own_possible() {
        return;
    }
    let _one = OWN.lock().await;
    let mut cluster = OwnCluster::start().await;
    let urls = cluster.urls();
    let b = backends(&urls, false).await;
    let mut old =
        RedisStreamConsumer::connect_cluster(&urls, STREAM, "g", "old", Duration::from_secs(30))
            .await
            .unwrap()
            .with_wait(Duration::from_millis(100));
    let p = b
        .queue
        .push(
            WebhookEvent::new("standard", "before", Bytes::from("{}")),
            Duration::from_secs(600),
        )
        .await
        .unwrap();
    assert_eq!(p, Push::Enqueued);
    assert_eq!(send(&b.app, "r1").await.0, StatusCode::CREATED);
    let primary = cluster.primary_of_key(QKEY);
    let replica = cluster.replica_of(&primary.id);
    cluster.kill(replica.port);
    cluster.restart(primary.port).await;
    cluster.wait_ok(Duration::from_secs(15)).await;
    cluster.restart(replica.port).await;
    cluster.wait_ok(Duration::from_secs(15)).await;

    // The same queue works again within a few seconds.
    let start = Instant::now();
    loop {
        match b
            .queue
            .push(
                WebhookEvent::new("standard", "after", Bytes::from("{}")),
                Duration::from_secs(600),
            )
            .await
        {
            Ok(p) => {
                assert_eq!(p, Push::Enqueued);
                break;
            }
            Err(e) => {
                assert!(names_cause(&chain(&*e)), "{}", chain(&*e));
                assert!(start.elapsed() < Duration::from_secs(10), "{}", chain(&*e));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    // The old consumer errs, naming the missing group; a new join works.
    let t0 = Instant::now();
    let e = old.next().await.expect_err("the group is gone");
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    let text = chain(&*e);
    assert!(
        text.to_lowercase().contains("nogroup") || text.contains("group"),
        "{text}"
    );
    drop(old);
    let mut new =
        RedisStreamConsumer::connect_cluster(&urls, STREAM, "g", "new", Duration::from_secs(30))
            .await
            .unwrap()
            .with_wait(Duration::from_millis(200));
    let mut ids = Vec::new();
    while let Some(d) = new.next().await.unwrap() {
        ids.push(d.event.id.clone());
        new.ack(&d).await.unwrap();
    }
    assert_eq!(ids, vec!["after".to_owned()]);
    // The stored response is gone: the retry runs the handler again (documented), no error.
    assert_eq!(send(&b.app, "r1").await.0, StatusCode::CREATED);
    assert_eq!(b.per_key.lock().unwrap()["r1"], 2);
    assert!(b.quota.try_reserve(QKEY, Duration::ZERO).await.is_ok());
}
