//! Outside round s67: the Redis backends on the real Redis Cluster at
//! `STURDY_REDIS_CLUSTER_URLS` (hash tags in prefixes and keys, a slot of our own moved with
//! `CLUSTER SETSLOT` / `MIGRATE` while requests run, a client that leaves mid-handler), and the
//! client-side idempotency keys (`IdempotencyKeyLayer` alone and in `ClientBuilder`), read
//! against docs/guides/idempotency.md, docs/RELIABILITY.md and the crates' rustdoc.
//!
//! Redis tests skip when `STURDY_REDIS_CLUSTER_URLS` is unset and fail when it is set and the
//! cluster cannot be reached. Every test uses key prefixes of its own; the one slot a test moves
//! is put back by a guard's `Drop`, also when the test fails.
#![cfg(feature = "full")]

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::slot_move_util::{cli, free_tag, keys_in_slot, keyslot, SlotMove, SLOT_MOVES};
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use sturdy::core::CallOptions;
use sturdy::idempotency::client::IdempotencyKeyLayer;
use sturdy::idempotency::server::{
    Begin, ByCredentials, IdempotencyLayer, IdempotencyStore, LockToken, StoredResponse,
};
use sturdy::ratelimit::{Quota, Reserve};
use sturdy::redis::{RedisIdempotencyStore, RedisQuota, RedisStreamConsumer, RedisStreamQueue};
use sturdy::retry::RetryLayer;
use sturdy::webhook::{EventQueue, Push, WebhookEvent};
use sturdy::ClientBuilder;
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A small seeded generator (xorshift64*), so drop points repeat from run to run.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A name no other test (or run) uses: the wall clock only makes names differ between runs.
#[allow(clippy::disallowed_methods)]
fn unique(what: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "s67{what}{}x{nanos}x{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// The cluster's seed URLs; `None` (skip) when the variable is unset. A cluster that is named
/// but does not answer fails the test.
fn cluster() -> Option<Vec<String>> {
    let Ok(v) = std::env::var("STURDY_REDIS_CLUSTER_URLS") else {
        eprintln!("STURDY_REDIS_CLUSTER_URLS unset: skipping a Redis Cluster test");
        return None;
    };
    let urls: Vec<String> = v
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    assert!(
        !urls.is_empty(),
        "STURDY_REDIS_CLUSTER_URLS is set but empty"
    );
    let port = port_of(&urls[0]);
    let pong = cli(port, &["PING"]);
    assert_eq!(
        pong, "PONG",
        "STURDY_REDIS_CLUSTER_URLS is set but {} does not answer",
        urls[0]
    );
    Some(urls)
}

fn port_of(url: &str) -> u16 {
    url.trim_end_matches('/')
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn runs_of(map: &Mutex<HashMap<String, usize>>, key: &str) -> usize {
    map.lock().unwrap().get(key).copied().unwrap_or(0)
}

/// An axum app with the idempotency layer over `store`; the handler counts its runs per key
/// and sleeps `work` before answering 201 with the body.
async fn idem_app(
    store: RedisIdempotencyStore,
    lease: Duration,
    work: Duration,
) -> (String, Arc<Mutex<HashMap<String, usize>>>) {
    let runs: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let counted = runs.clone();
    let layer = IdempotencyLayer::new(store, ByCredentials::default())
        .with_lease(lease)
        .unwrap();
    let app: axum::Router = axum::Router::new()
        .route(
            "/orders",
            axum::routing::post(move |headers: http::HeaderMap, body: String| {
                let runs = counted.clone();
                async move {
                    let key = headers
                        .get("idempotency-key")
                        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                        .unwrap_or_default();
                    let n = {
                        let mut m = runs.lock().unwrap();
                        let e = m.entry(key).or_insert(0);
                        *e += 1;
                        *e
                    };
                    tokio::time::sleep(work).await;
                    (StatusCode::CREATED, format!("run {n}: {body}"))
                }
            }),
        )
        .layer(layer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/orders"), runs)
}

struct Answer {
    status: StatusCode,
    replayed: bool,
    retry_after: Option<String>,
    body: String,
}

async fn post(url: &str, key: &[u8], body: &str) -> Answer {
    let req = Request::post(url)
        .header("idempotency-key", HeaderValue::from_bytes(key).unwrap())
        .body(Full::from(body.to_owned()))
        .unwrap();
    // A bound for a hang only: the slot-move test lets its store retry for up to 10 s.
    let res = tokio::time::timeout(
        Duration::from_secs(25),
        sturdy_chaos::http_client().request(req),
    )
    .await
    .expect("request hung")
    .expect("request failed");
    let status = res.status();
    let replayed = res
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true");
    let retry_after = res
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = res.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        replayed,
        retry_after,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// Redis Cluster: the idempotency store
// ---------------------------------------------------------------------------------------------

/// idempotency.md: "`RedisIdempotencyStore::connect_cluster(nodes)` works on a Redis Cluster
/// (each operation touches one key)". Keys with braces (a hash tag of their own, an empty tag,
/// an unclosed one), a prefix with a tag, and two layers whose stores were seeded through
/// different nodes: no CROSSSLOT, a repeat replays, another body is 422, and the handler runs
/// once per key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s67_cluster_braced_keys_and_prefixes_replay_across_instances() {
    let Some(urls) = cluster() else { return };
    for prefix in [
        unique("p"),
        format!("{{{}}}", unique("tagged")),
        unique("a}{b"),
    ] {
        let a = RedisIdempotencyStore::connect_cluster([urls[0].as_str()])
            .await
            .expect("connect through the first node")
            .with_prefix(prefix.clone())
            .with_timeout(Duration::from_secs(10));
        let b = RedisIdempotencyStore::connect_cluster([urls[2].as_str()])
            .await
            .expect("connect through the third node")
            .with_prefix(prefix.clone())
            .with_timeout(Duration::from_secs(10));
        let (url_a, runs_a) = idem_app(a, Duration::from_secs(5), Duration::ZERO).await;
        let (url_b, runs_b) = idem_app(b, Duration::from_secs(5), Duration::ZERO).await;
        let long = format!("{{{}}}", "t".repeat(253));
        for key in ["{a}", "}{", "{", "x{}y", "{x}{y}", "\"{q}\"", long.as_str()] {
            let first = post(&url_a, key.as_bytes(), "order").await;
            assert_eq!(
                first.status,
                StatusCode::CREATED,
                "key {key:?} prefix {prefix:?}: {}",
                first.body
            );
            assert!(!first.replayed);
            let again = post(&url_b, key.as_bytes(), "order").await;
            assert_eq!(
                (again.status, again.replayed),
                (StatusCode::CREATED, true),
                "key {key:?} prefix {prefix:?} not replayed by the other instance: {}",
                again.body
            );
            assert_eq!(again.body, first.body);
            let other = post(&url_b, key.as_bytes(), "another order").await;
            assert_eq!(
                other.status,
                StatusCode::UNPROCESSABLE_ENTITY,
                "{}",
                other.body
            );
        }
        // Not 1 to 255 visible ASCII characters: 400, invalid, on a cluster as anywhere.
        for bad in [
            "k".repeat(256).into_bytes(),
            b"caf\xe9".to_vec(),
            b"a b".to_vec(),
        ] {
            let a = post(&url_a, &bad, "order").await;
            assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.body);
            assert!(a.body.contains("idempotency-key-invalid"), "{}", a.body);
        }
        let total: usize = runs_a.lock().unwrap().values().sum::<usize>()
            + runs_b.lock().unwrap().values().sum::<usize>();
        assert_eq!(total, 7, "each key must run its handler once");
    }
}

/// The store API on a cluster with hostile keys: a key of 64 KiB with braces in it, a key that
/// is a lone `{`, and an empty key: each operation touches one key, so none is refused with
/// CROSSSLOT, and begin / complete / begin replays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s67_cluster_store_takes_64k_braced_and_empty_keys() {
    let Some(urls) = cluster() else { return };
    // The shared cluster can be down for a few seconds while other tests move slots on a
    // loaded machine (CLUSTERDOWN): a bound above a failover's, not the default 1 s.
    let store = RedisIdempotencyStore::connect_cluster(urls.iter())
        .await
        .unwrap()
        .with_prefix(unique("big"))
        .with_timeout(Duration::from_secs(10));
    let big = format!("{{{}}}{}", "k".repeat(32 * 1024), "{v}".repeat(10 * 1024));
    assert!(big.len() > 60 * 1024);
    for key in [big.as_str(), "{", "", "}"] {
        let fp = [7u8; 32];
        let t = LockToken::random();
        let lease = Duration::from_secs(5);
        let started = store.begin(key, fp, t, lease).await;
        assert!(
            matches!(started, Ok(Begin::Started)),
            "key of {} bytes: {started:?}",
            key.len()
        );
        let again = store.begin(key, fp, LockToken::random(), lease).await;
        assert!(matches!(again, Ok(Begin::InFlight)), "{again:?}");
        let resp = StoredResponse {
            status: 201,
            headers: vec![("x-order".into(), b"1".to_vec())],
            body: Bytes::from_static(b"done"),
        };
        store
            .complete(key, fp, t, resp.clone(), Duration::from_secs(30))
            .await
            .unwrap();
        match store.begin(key, fp, LockToken::random(), lease).await {
            Ok(Begin::Completed(r)) => assert_eq!(r, resp),
            other => panic!("key of {} bytes: {other:?}", key.len()),
        }
        let mismatch = store
            .begin(key, [8u8; 32], LockToken::random(), lease)
            .await;
        assert!(matches!(mismatch, Ok(Begin::Mismatch)), "{mismatch:?}");
    }
}

/// idempotency.md, "client timeout mid-handler": "the handler runs to its end in its own task;
/// its response is stored ... a retry with the same key gets 409 in flight (`Retry-After: 1`)
/// while the handler runs, then the stored response with `Idempotent-Replayed: true`; the
/// handler ran once", and "the task renews the lock every third of the lease": here with the
/// Redis Cluster store, a 300 ms lease and a 900 ms handler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s67_cluster_client_gone_mid_handler_runs_once_and_replays() {
    let Some(urls) = cluster() else { return };
    let store = RedisIdempotencyStore::connect_cluster(urls.iter())
        .await
        .unwrap()
        .with_prefix(unique("gone"));
    let (url, runs) = idem_app(
        store,
        Duration::from_millis(300),
        Duration::from_millis(900),
    )
    .await;
    let t0 = Instant::now();
    let cut = tokio::time::timeout(Duration::from_millis(100), post(&url, b"k-gone", "book")).await;
    assert!(cut.is_err(), "the first client should have given up");
    // Past the lease, while the handler still runs: in flight, not a second run.
    tokio::time::sleep(Duration::from_millis(500).saturating_sub(t0.elapsed())).await;
    let mid = post(&url, b"k-gone", "book").await;
    assert_eq!(mid.status, StatusCode::CONFLICT, "{}", mid.body);
    assert_eq!(mid.retry_after.as_deref(), Some("1"));
    assert!(
        mid.body.contains("idempotency-key-in-flight"),
        "{}",
        mid.body
    );
    tokio::time::sleep(Duration::from_millis(1200).saturating_sub(t0.elapsed())).await;
    let end = post(&url, b"k-gone", "book").await;
    assert_eq!(
        (end.status, end.replayed),
        (StatusCode::CREATED, true),
        "{}",
        end.body
    );
    assert_eq!(end.body, "run 1: book");
    assert_eq!(runs_of(&runs, "k-gone"), 1);
}

/// RELIABILITY.md: "Keys already on either node are served throughout (`ASK`)", and the
/// cluster client "follows `MOVED`/`ASK` redirections". One slot of ours is moved while
/// idempotent requests run: a response stored before the move is replayed while the slot is
/// migrating, after its key moved, after the move and after the move back; a key first seen
/// while migrating lands on the importing node and is replayed from there; each handler runs
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s67_cluster_slot_move_keeps_locks_and_stored_responses() {
    let Some(urls) = cluster() else { return };
    let _moves = SLOT_MOVES.lock().await;
    let seed = port_of(&urls[0]);
    let (tag, slot) = free_tag(seed);
    let mut mv = SlotMove::new(seed, slot);
    let store = RedisIdempotencyStore::connect_cluster(urls.iter())
        .await
        .unwrap()
        .with_prefix(format!("{{{tag}}}:idem"))
        // Nodes can disagree about the moved slot (MOVED both ways) for seconds on a loaded
        // machine; the store sends the command again until its timeout (2 s ran out in a CI).
        .with_timeout(Duration::from_secs(10));
    let (url, runs) = idem_app(store, Duration::from_secs(10), Duration::ZERO).await;

    let replay = |key: &'static str, body: &'static str, stage: &'static str| {
        let url = url.clone();
        async move {
            let a = post(&url, key.as_bytes(), "order").await;
            assert_eq!(
                (a.status, a.replayed, a.body.as_str()),
                (StatusCode::CREATED, true, body),
                "{key} {stage}"
            );
        }
    };

    let k1 = post(&url, b"k1", "order").await;
    assert_eq!(k1.status, StatusCode::CREATED);
    assert_eq!(
        keys_in_slot(mv.home.port, slot).len(),
        1,
        "k1 not on its node"
    );

    mv.start();
    replay("k1", "run 1: order", "while migrating, key on the old node").await;
    let k2 = post(&url, b"k2", "order").await;
    assert_eq!(
        (k2.status, k2.replayed),
        (StatusCode::CREATED, false),
        "{}",
        k2.body
    );
    replay("k2", "run 1: order", "while migrating, key on the new node").await;
    assert_eq!(
        keys_in_slot(mv.away.port, slot).len(),
        1,
        "k2 not on the importing node"
    );
    let reused = post(&url, b"k1", "another").await;
    assert_eq!(
        reused.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        reused.body
    );

    mv.migrate_keys(&mv.home.clone(), &mv.away.clone());
    replay("k1", "run 1: order", "after its key moved").await;
    mv.finish();
    replay("k1", "run 1: order", "after the move").await;
    replay("k2", "run 1: order", "after the move").await;
    let k3 = post(&url, b"k3", "order").await;
    assert_eq!(
        (k3.status, k3.replayed),
        (StatusCode::CREATED, false),
        "{}",
        k3.body
    );

    mv.restore();
    for k in ["k1", "k2", "k3"] {
        replay(k, "run 1: order", "after the move back").await;
        assert_eq!(runs_of(&runs, k), 1, "{k} ran more than once");
    }
}

// ---------------------------------------------------------------------------------------------
// Redis Cluster: the rate-limit quota
// ---------------------------------------------------------------------------------------------

/// RELIABILITY.md, "Slot moves": "an operation that needs a key of that slot not yet on the node
/// it asks (a limiter's pause key, ...) gets Redis's `TRYAGAIN`; it is tried again a few times
/// within its timeout, and for a move that lasts longer it fails with "the Redis Cluster cannot
/// serve this key now"", and "Bounded time. Every operation ends within its timeout". The quota
/// spent before the move is still spent after it (the state moves with the key), and two
/// clients seeded through different nodes share it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s67_cluster_quota_during_and_after_a_slot_move() {
    let Some(urls) = cluster() else { return };
    let _moves = SLOT_MOVES.lock().await;
    let seed = port_of(&urls[0]);
    let (tag, slot) = free_tag(seed);
    let mut mv = SlotMove::new(seed, slot);
    let quota = Quota::per_minute(1).unwrap().with_burst(3).unwrap();
    let prefix = unique("q");
    let timeout = Duration::from_millis(400);
    let a = RedisQuota::connect_cluster([urls[0].as_str()], quota)
        .await
        .unwrap()
        .with_prefix(prefix.clone())
        .with_timeout(timeout);
    let b = RedisQuota::connect_cluster([urls[4].as_str()], quota)
        .await
        .unwrap()
        .with_prefix(prefix.clone())
        .with_timeout(timeout);
    assert_eq!(keyslot(seed, &format!("{prefix}:{{{tag}}}:tat")), slot);
    let granted = |r: Reserve| matches!(r, Reserve::Granted { wait } if wait.is_zero());
    assert!(granted(a.try_reserve(&tag, Duration::ZERO).await.unwrap()));
    assert!(granted(b.try_reserve(&tag, Duration::ZERO).await.unwrap()));
    assert!(granted(a.try_reserve(&tag, Duration::ZERO).await.unwrap()));
    assert!(matches!(
        b.try_reserve(&tag, Duration::ZERO).await.unwrap(),
        Reserve::Denied { .. }
    ));

    mv.start();
    // The `tat` key is on the old node, the pause key nowhere: TRYAGAIN until the timeout.
    let t0 = Instant::now();
    let during = a.try_reserve(&tag, Duration::ZERO).await;
    let took = t0.elapsed();
    assert!(
        took < timeout + Duration::from_millis(300),
        "took {took:?} for a {timeout:?} timeout"
    );
    match during {
        Err(e) => assert!(
            e.to_string()
                .contains("the Redis Cluster cannot serve this key now"),
            "the error does not say so: {e}"
        ),
        Ok(r) => assert!(
            matches!(r, Reserve::Denied { .. }),
            "a spent quota granted a slot during the move: {r:?}"
        ),
    }
    mv.migrate_keys(&mv.home.clone(), &mv.away.clone());
    // `tat` on the importing node, the pause key nowhere: TRYAGAIN there too, until the end.
    match b.try_reserve(&tag, Duration::ZERO).await {
        Err(e) => assert!(
            e.to_string()
                .contains("the Redis Cluster cannot serve this key now"),
            "the error does not say so: {e}"
        ),
        Ok(r) => assert!(
            matches!(r, Reserve::Denied { .. }),
            "the quota was forgotten by the move: {r:?}"
        ),
    }
    mv.finish();
    let after = a.try_reserve(&tag, Duration::ZERO).await.unwrap();
    assert!(matches!(after, Reserve::Denied { .. }), "{after:?}");
    mv.restore();
    let back = b.try_reserve(&tag, Duration::ZERO).await.unwrap();
    assert!(matches!(back, Reserve::Denied { .. }), "{back:?}");
}

/// The quota keys with braces in the key (a hex tag instead, per the crate's key layout table)
/// and an empty key, shared by two clients seeded through different nodes, one a replica: the
/// burst of 2 is 2 in all, never 2 each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s67_cluster_quota_with_braced_keys_is_shared_by_two_clients() {
    let Some(urls) = cluster() else { return };
    let quota = Quota::per_minute(1).unwrap().with_burst(2).unwrap();
    let prefix = unique("qb");
    let a = RedisQuota::connect_cluster([urls[1].as_str()], quota)
        .await
        .unwrap()
        .with_prefix(prefix.clone());
    let b = RedisQuota::connect_cluster([urls[5].as_str()], quota)
        .await
        .unwrap()
        .with_prefix(prefix.clone());
    for key in ["t}:{c", "", "{", "{x}", "}{"] {
        let mut grants = 0;
        for i in 0..6 {
            let q = if i % 2 == 0 { &a } else { &b };
            if let Reserve::Granted { .. } = q.try_reserve(key, Duration::ZERO).await.unwrap() {
                grants += 1;
            }
        }
        assert_eq!(grants, 2, "key {key:?}: {grants} grants for a burst of 2");
    }
}

// ---------------------------------------------------------------------------------------------
// Redis Cluster: the stream queue and consumer
// ---------------------------------------------------------------------------------------------

/// A consumer group, its pending entry and the dedup keys move with the slot: an event taken
/// and not acknowledged before the move is delivered again after the claim delay (deliveries
/// 2) to another consumer of the group, a duplicate push after the move is `Duplicate`, and
/// nothing is lost or delivered to a consumer twice in a row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s67_cluster_stream_group_and_pending_entry_survive_a_slot_move() {
    let Some(urls) = cluster() else { return };
    let _moves = SLOT_MOVES.lock().await;
    let seed = port_of(&urls[0]);
    let (tag, slot) = free_tag(seed);
    let mut mv = SlotMove::new(seed, slot);
    let stream = format!("{{{tag}}}");
    let queue = RedisStreamQueue::connect_cluster(urls.iter(), stream.clone())
        .await
        .unwrap();
    let claim = Duration::from_millis(300);
    let mut first =
        RedisStreamConsumer::connect_cluster(urls.iter(), stream.clone(), "g", "a", claim)
            .await
            .unwrap()
            .with_wait(Duration::from_millis(50));
    let ev = |id: &str| WebhookEvent::new("standard", id, Bytes::from(format!("body {id}")));
    let ttl = Duration::from_secs(60);
    for id in ["e1", "e2", "e3"] {
        assert_eq!(queue.push(ev(id), ttl).await.unwrap(), Push::Enqueued);
    }
    let taken = first.next().await.unwrap().expect("e1");
    assert_eq!((taken.event.id.as_str(), taken.deliveries), ("e1", 1));

    mv.start();
    mv.finish();
    assert!(keys_in_slot(mv.home.port, slot).is_empty());
    assert!(!keys_in_slot(mv.away.port, slot).is_empty());
    assert_eq!(
        queue.push(ev("e1"), ttl).await.unwrap(),
        Push::Duplicate,
        "the dedup key was lost by the move"
    );
    let mut second =
        RedisStreamConsumer::connect_cluster(urls.iter(), stream.clone(), "g", "b", claim)
            .await
            .unwrap()
            .with_wait(Duration::from_millis(50));
    let e2 = second.next().await.unwrap().expect("e2");
    assert_eq!((e2.event.id.as_str(), e2.deliveries), ("e2", 1));
    second.ack(&e2).await.unwrap();
    tokio::time::sleep(claim + Duration::from_millis(100)).await;
    let again = second.next().await.unwrap().expect("e1 again");
    assert_eq!(
        (again.event.id.as_str(), again.deliveries),
        ("e1", 2),
        "the pending entry did not survive the move"
    );
    assert_eq!(again.event.body, Bytes::from("body e1"));
    second.ack(&again).await.unwrap();
    let e3 = second.next().await.unwrap().expect("e3");
    assert_eq!(e3.event.id, "e3");
    second.ack(&e3).await.unwrap();
    assert!(second.next().await.unwrap().is_none());

    mv.restore();
    assert_eq!(queue.push(ev("e4"), ttl).await.unwrap(), Push::Enqueued);
    assert_eq!(queue.push(ev("e2"), ttl).await.unwrap(), Push::Duplicate);
    let e4 = first.next().await.unwrap().expect("e4 after the move back");
    assert_eq!((e4.event.id.as_str(), e4.deliveries), ("e4", 1));
    first.ack(&e4).await.unwrap();
    assert!(first.next().await.unwrap().is_none());
    assert!(second.next().await.unwrap().is_none());
}

// ---------------------------------------------------------------------------------------------
// Client-side idempotency keys
// ---------------------------------------------------------------------------------------------

type Seen = Arc<Mutex<Vec<(Method, HashMap<String, Vec<u8>>)>>>;

/// An in-process API that records every request's method and headers and answers with the
/// statuses of `plan` in turn (the last one after that). `Err` stands for a connection reset.
type Api =
    tower::util::BoxCloneSyncService<Request<Full<Bytes>>, Response<Full<Bytes>>, std::io::Error>;

fn api(plan: Vec<Result<u16, ()>>) -> (Api, Seen) {
    let seen: Seen = Arc::default();
    let log = seen.clone();
    let n = Arc::new(AtomicUsize::new(0));
    let svc = tower::service_fn(move |req: Request<Full<Bytes>>| {
        let i = n.fetch_add(1, Ordering::SeqCst);
        let headers = req
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.as_bytes().to_vec()))
            .collect();
        log.lock().unwrap().push((req.method().clone(), headers));
        let step = plan[i.min(plan.len() - 1)];
        async move {
            match step {
                Ok(s) => Ok(Response::builder()
                    .status(s)
                    .body(Full::<Bytes>::from("x"))
                    .unwrap()),
                Err(()) => Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "connection reset by peer",
                )),
            }
        }
    });
    (Api::new(svc), seen)
}

fn header_of(seen: &Seen, name: &str) -> Vec<Option<Vec<u8>>> {
    seen.lock()
        .unwrap()
        .iter()
        .map(|(_, h)| h.get(name).cloned())
        .collect()
}

fn is_uuid_v4(key: &[u8]) -> bool {
    let Ok(s) = std::str::from_utf8(key) else {
        return false;
    };
    let b = s.as_bytes();
    s.len() == 36
        && [8, 13, 18, 23].iter().all(|&i| b[i] == b'-')
        && b.iter()
            .enumerate()
            .filter(|(i, _)| ![8, 13, 18, 23].contains(i))
            .all(|(_, c)| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
        && b[14] == b'4'
        && matches!(b[19], b'8' | b'9' | b'a' | b'b')
}

fn req(method: Method) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri("http://api.example.com/orders")
        .body(Full::from("order"))
        .unwrap()
}

/// idempotency.md: "`client::IdempotencyKeyLayer::new()` outside the retry layer sets one
/// random UUID v4 per logical POST/PATCH; every retry carries the same key"; the retry docs:
/// "4 attempts in all". Through `ClientBuilder`: a POST and a PATCH answered 503 three times,
/// then 201.
#[tokio::test(start_paused = true)]
async fn s67_builder_post_and_patch_retried_carry_one_uuid_v4() {
    for method in [Method::POST, Method::PATCH] {
        let (svc, seen) = api(vec![Ok(503), Ok(503), Ok(503), Ok(201)]);
        let client = ClientBuilder::new().build(svc);
        let res =
            tokio::time::timeout(Duration::from_secs(60), client.oneshot(req(method.clone())))
                .await
                .expect("hung")
                .unwrap();
        assert_eq!(res.status(), 201, "{method}");
        let keys = header_of(&seen, "idempotency-key");
        assert_eq!(keys.len(), 4, "{method}: {} attempts", keys.len());
        let first = keys[0].clone().expect("no key");
        assert!(is_uuid_v4(&first), "{method}: not a UUID v4: {first:?}");
        assert!(keys.iter().all(|k| k.as_deref() == Some(first.as_slice())));
    }
}

/// idempotency.md: keys on POST and PATCH, "`.with_methods([..])` change the ... methods"; "The
/// key is never derived from the payload: two deliberate identical orders are two orders". The
/// layer alone: GET, HEAD, PUT, DELETE, OPTIONS get no key; two identical POSTs two keys.
#[tokio::test]
async fn s67_layer_alone_keys_only_post_and_patch_and_never_twice() {
    let (svc, seen) = api(vec![Ok(200)]);
    let mut client = ServiceBuilder::new()
        .layer(IdempotencyKeyLayer::new())
        .service(svc);
    let methods = [
        Method::POST,
        Method::POST,
        Method::PATCH,
        Method::GET,
        Method::HEAD,
        Method::PUT,
        Method::DELETE,
        Method::OPTIONS,
    ];
    for m in &methods {
        client
            .ready()
            .await
            .unwrap()
            .call(req(m.clone()))
            .await
            .unwrap();
    }
    let keys = header_of(&seen, "idempotency-key");
    assert!(keys[..3]
        .iter()
        .all(|k| k.as_deref().is_some_and(is_uuid_v4)));
    assert_ne!(keys[0], keys[1], "two identical POSTs got one key");
    assert_ne!(keys[1], keys[2]);
    for (m, k) in methods.iter().zip(&keys).skip(3) {
        assert!(k.is_none(), "{m} got a key");
    }
    // with_methods replaces the set.
    let (svc, seen) = api(vec![Ok(200)]);
    let mut client = ServiceBuilder::new()
        .layer(IdempotencyKeyLayer::new().with_methods([Method::PUT]))
        .service(svc);
    for m in [Method::POST, Method::PUT] {
        client.ready().await.unwrap().call(req(m)).await.unwrap();
    }
    let keys = header_of(&seen, "idempotency-key");
    assert!(
        keys[0].is_none(),
        "POST keyed though only PUT was asked for"
    );
    assert!(keys[1].as_deref().is_some_and(is_uuid_v4));
}

/// idempotency.md: "A key you set yourself is kept: put it in the `Idempotency-Key` header";
/// in `ClientBuilder` it is on every retry, and a failed call reports it: "the error says
/// whether any attempt may have been processed and carries the key: `...; it may have been
/// processed: retry with the same idempotency key <key>`".
#[tokio::test(start_paused = true)]
async fn s67_builder_keeps_the_callers_header_key_and_reports_it() {
    let (svc, seen) = api(vec![Err(())]);
    let client = ClientBuilder::new().build(svc);
    let mut r = req(Method::POST);
    r.headers_mut()
        .insert("idempotency-key", HeaderValue::from_static("order-42"));
    let err = tokio::time::timeout(Duration::from_secs(60), client.oneshot(r))
        .await
        .expect("hung")
        .expect_err("every attempt was reset");
    let keys = header_of(&seen, "idempotency-key");
    assert_eq!(
        keys.len(),
        4,
        "a keyed POST is retried: {} attempts",
        keys.len()
    );
    assert!(keys.iter().all(|k| k.as_deref() == Some(&b"order-42"[..])));
    let text = err.to_string();
    assert!(
        text.contains("it may have been processed: retry with the same idempotency key order-42"),
        "{text}"
    );
    let e = err
        .downcast_ref::<sturdy::core::Error>()
        .expect("a sturdy Error");
    assert_eq!(e.idempotency_key(), Some("order-42"));
}

/// idempotency.md: "a blank one, empty or only spaces and tabs, names no operation and is
/// replaced by a fresh key": in `ClientBuilder` the fresh key is on every attempt, and the
/// call reports it. The retry layer alone "does not count a blank key as a key either, so a
/// POST carrying one is not retried".
#[tokio::test(start_paused = true)]
async fn s67_blank_header_key_is_replaced_by_one_fresh_key() {
    for blank in ["", " ", "\t \t"] {
        let (svc, seen) = api(vec![Err(())]);
        let client = ClientBuilder::new().build(svc);
        let mut r = req(Method::POST);
        r.headers_mut()
            .insert("idempotency-key", HeaderValue::from_str(blank).unwrap());
        let err = tokio::time::timeout(Duration::from_secs(60), client.oneshot(r))
            .await
            .expect("hung")
            .expect_err("every attempt was reset");
        let keys = header_of(&seen, "idempotency-key");
        let first = keys[0].clone().expect("no key sent");
        assert!(
            is_uuid_v4(&first),
            "blank {blank:?} not replaced: {first:?}"
        );
        assert_eq!(keys.len(), 4, "blank {blank:?}: {} attempts", keys.len());
        assert!(keys.iter().all(|k| k.as_deref() == Some(first.as_slice())));
        let e = err
            .downcast_ref::<sturdy::core::Error>()
            .expect("a sturdy Error");
        assert_eq!(
            e.idempotency_key().map(str::as_bytes),
            Some(first.as_slice())
        );

        // The retry layer alone.
        let (svc, seen) = api(vec![Err(())]);
        let client = ServiceBuilder::new()
            .layer(RetryLayer::new().with_seed(3))
            .service(svc);
        let mut r = req(Method::POST);
        r.headers_mut()
            .insert("idempotency-key", HeaderValue::from_str(blank).unwrap());
        let err = tokio::time::timeout(Duration::from_secs(60), client.oneshot(r))
            .await
            .expect("hung")
            .expect_err("reset");
        assert_eq!(
            seen.lock().unwrap().len(),
            1,
            "a POST with a blank key was retried"
        );
        assert!(
            !err.to_string()
                .contains("retry with the same idempotency key"),
            "{err}"
        );
    }
}

/// idempotency.md and `CallOptions::with_idempotency_key`: a key no header can carry as it is
/// ("empty, holds control characters, a tab inside among them, or begins or ends with a space
/// or a tab") "is sent as `sturdy-sha256-` and the hex SHA-256 of the key"; "A key given in
/// `CallOptions` is sent with any method"; "one with characters beyond ASCII is sent as its
/// UTF-8 bytes"; a 64 KiB visible key goes as it is; `.with_header(name)` moves it.
#[tokio::test]
async fn s67_call_options_keys_of_every_shape() {
    let digest = |hex: &str| format!("sturdy-sha256-{hex}").into_bytes();
    let long = "k".repeat(64 * 1024);
    let cases: Vec<(String, Method, Vec<u8>)> = vec![
        (
            String::new(),
            Method::POST,
            digest("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
        ),
        (
            "a\r\nb".into(),
            Method::POST,
            digest("18745f36a05e29072709042d6062ce54f1b08ff36c27ba80c39f81fb010c8ce2"),
        ),
        (
            " order-9 ".into(),
            Method::PATCH,
            digest("fefdfa013e4f9d9490253031d8c5a41d0c8289817cac59065f6a3d48a125042d"),
        ),
        (
            "a\tb".into(),
            Method::GET,
            digest("894891f8b78a9945b0aa07e70d5f71f10b1f1990af127de561cc0ac36024c188"),
        ),
        ("café".into(), Method::PUT, "café".as_bytes().to_vec()),
        (long.clone(), Method::DELETE, long.clone().into_bytes()),
        ("a%0D%0Ab".into(), Method::POST, b"a%0D%0Ab".to_vec()),
    ];
    for header in ["idempotency-key", "x-op-key"] {
        let (svc, seen) = api(vec![Ok(200)]);
        let mut client = ServiceBuilder::new()
            .layer(IdempotencyKeyLayer::new().with_header(HeaderName::from_static(header)))
            .service(svc);
        for (key, method, _) in &cases {
            let mut r = req(method.clone());
            r.extensions_mut()
                .insert(CallOptions::new().with_idempotency_key(key.clone()));
            client.ready().await.unwrap().call(r).await.unwrap();
        }
        let keys = header_of(&seen, header);
        for ((key, method, want), got) in cases.iter().zip(keys) {
            let shown = &key[..key.len().min(20)];
            assert_eq!(
                got.as_deref(),
                Some(want.as_slice()),
                "{method} key {shown:?} in {header}"
            );
        }
        if header != "idempotency-key" {
            assert!(header_of(&seen, "idempotency-key")
                .iter()
                .all(Option::is_none));
        }
    }
}

/// idempotency.md: "the value sent is the key a failed call reports" for a `CallOptions` key
/// sent as a digest, and "in `sturdy::ClientBuilder` the retry layer is told the header, so a
/// POST keyed in it is retried".
#[tokio::test(start_paused = true)]
async fn s67_builder_custom_header_and_digest_key_are_retried_and_reported() {
    let (svc, seen) = api(vec![Err(())]);
    let client = ClientBuilder::new()
        .with_idempotency(
            IdempotencyKeyLayer::new().with_header(HeaderName::from_static("x-op-key")),
        )
        .build(svc);
    let mut r = req(Method::POST);
    r.extensions_mut()
        .insert(CallOptions::new().with_idempotency_key("a\r\nb"));
    let err = tokio::time::timeout(Duration::from_secs(60), client.oneshot(r))
        .await
        .expect("hung")
        .expect_err("reset");
    let want = "sturdy-sha256-18745f36a05e29072709042d6062ce54f1b08ff36c27ba80c39f81fb010c8ce2";
    let keys = header_of(&seen, "x-op-key");
    assert_eq!(
        keys.len(),
        4,
        "a POST keyed in x-op-key: {} attempts",
        keys.len()
    );
    assert!(keys.iter().all(|k| k.as_deref() == Some(want.as_bytes())));
    assert!(header_of(&seen, "idempotency-key")
        .iter()
        .all(Option::is_none));
    assert!(err.to_string().contains(want), "{err}");
    let e = err
        .downcast_ref::<sturdy::core::Error>()
        .expect("a sturdy Error");
    assert_eq!(e.idempotency_key(), Some(want));
    assert!(
        !err.to_string().contains('\r'),
        "the raw key leaked into the message"
    );
}

/// `ClientBuilder`: "put it under `Buffer` or a concurrency limit, drive it with `oneshot` or
/// keep it and call `ready().await?.call(req)`". Under `Buffer` + `ConcurrencyLimit(1)`, a kept
/// service and its clones: every logical POST gets its own key, on both of its attempts, and
/// nothing hangs.
#[tokio::test(start_paused = true)]
async fn s67_builder_under_buffer_and_limit_one_key_per_call() {
    // Every first attempt of a call is answered 503, its retry 201: odd requests 503.
    let seen: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let log = seen.clone();
    let n = Arc::new(AtomicUsize::new(0));
    let per_call: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let svc = tower::service_fn(move |req: Request<Full<Bytes>>| {
        let call = req.headers()["x-call"].to_str().unwrap().to_owned();
        let key = req.headers()["idempotency-key"]
            .to_str()
            .unwrap()
            .to_owned();
        log.lock().unwrap().push((call.clone(), key));
        let first = {
            let mut m = per_call.lock().unwrap();
            let e = m.entry(call).or_insert(0);
            *e += 1;
            *e == 1
        };
        n.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            Ok::<_, std::io::Error>(
                Response::builder()
                    .status(if first { 503 } else { 201 })
                    .body(Full::<Bytes>::from("x"))
                    .unwrap(),
            )
        }
    });
    let client = ClientBuilder::new().build(svc);
    let stack = ServiceBuilder::new()
        .buffer(8)
        .concurrency_limit(1)
        .service(client);
    let call = |i: usize| {
        let mut r = req(Method::POST);
        r.headers_mut()
            .insert("x-call", HeaderValue::from_str(&i.to_string()).unwrap());
        r
    };
    let mut kept = stack.clone();
    for i in 0..5 {
        let res = tokio::time::timeout(Duration::from_secs(30), async {
            kept.ready().await.unwrap().call(call(i)).await.unwrap()
        })
        .await
        .expect("kept service hung");
        assert_eq!(res.status(), 201);
    }
    let mut tasks = Vec::new();
    for t in 0..4 {
        let mut svc = stack.clone();
        tasks.push(tokio::spawn(async move {
            for j in 0..3 {
                let res = svc
                    .ready()
                    .await
                    .unwrap()
                    .call(call(100 + t * 10 + j))
                    .await
                    .unwrap();
                assert_eq!(res.status(), 201);
            }
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("a clone hung")
            .unwrap();
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2 * 17);
    let mut by_call: HashMap<String, HashSet<String>> = HashMap::new();
    for (c, k) in &seen {
        by_call.entry(c.clone()).or_default().insert(k.clone());
    }
    assert_eq!(by_call.len(), 17);
    let mut all = HashSet::new();
    for (c, ks) in by_call {
        assert_eq!(ks.len(), 1, "call {c} sent {} keys", ks.len());
        let k = ks.into_iter().next().unwrap();
        assert!(is_uuid_v4(k.as_bytes()));
        assert!(all.insert(k), "two calls shared one key");
    }
}

/// Cancellation: calls through `ClientBuilder` under `ConcurrencyLimit(1)` dropped at seeded
/// moments (mid-attempt, mid-backoff) leak no permit, and each logical call keeps one key of
/// its own on every attempt it made; a call after them all goes through at once.
#[tokio::test(start_paused = true)]
async fn s67_builder_calls_dropped_at_seeded_points_keep_one_key_and_leak_nothing() {
    let seen: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let log = seen.clone();
    let rng = Arc::new(Mutex::new(Rng::new(67)));
    let draw = rng.clone();
    let svc = tower::service_fn(move |req: Request<Full<Bytes>>| {
        let call = req.headers()["x-call"].to_str().unwrap().to_owned();
        let key = req.headers()["idempotency-key"]
            .to_str()
            .unwrap()
            .to_owned();
        log.lock().unwrap().push((call, key));
        let (delay, status) = {
            let mut r = draw.lock().unwrap();
            (r.below(40), if r.below(3) == 0 { 201 } else { 503 })
        };
        async move {
            tokio::time::sleep(Duration::from_millis(delay)).await;
            Ok::<_, std::io::Error>(
                Response::builder()
                    .status(status)
                    .body(Full::<Bytes>::from("x"))
                    .unwrap(),
            )
        }
    });
    let client = ClientBuilder::new().build(svc);
    let mut stack = ServiceBuilder::new()
        .buffer(4)
        .concurrency_limit(1)
        .service(client);
    for i in 0..40 {
        let cut = Duration::from_millis(rng.lock().unwrap().below(400));
        let mut r = req(Method::POST);
        r.headers_mut()
            .insert("x-call", HeaderValue::from_str(&i.to_string()).unwrap());
        let mut svc = stack.clone();
        let _ = tokio::time::timeout(cut, async move { svc.ready().await.unwrap().call(r).await })
            .await;
    }
    // Everything dropped: the limit's one permit must be free again.
    let mut r = req(Method::POST);
    r.headers_mut()
        .insert("x-call", HeaderValue::from_static("last"));
    let last = tokio::time::timeout(Duration::from_secs(30), async {
        stack.ready().await.unwrap().call(r).await
    })
    .await
    .expect("a permit leaked: the last call never ran");
    let _ = last;
    let seen = seen.lock().unwrap().clone();
    let mut by_call: HashMap<String, HashSet<String>> = HashMap::new();
    for (c, k) in &seen {
        by_call.entry(c.clone()).or_default().insert(k.clone());
    }
    assert!(by_call.contains_key("last"));
    let mut all = HashSet::new();
    for (c, ks) in by_call {
        assert_eq!(ks.len(), 1, "call {c} sent {ks:?}");
        assert!(
            all.insert(ks.into_iter().next().unwrap()),
            "two calls shared a key"
        );
    }
}

/// RELIABILITY.md: "Keys already on either node are served throughout (`ASK`)", and the
/// idempotency guide: "While the handler runs, the task renews the lock every third of the
/// lease". A handler (800 ms, lease 300 ms) whose lock key is migrated to another node and
/// whose slot changes owner while it runs: repeats get 409 throughout, the response is stored
/// on the new owner, and the handler runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s67_cluster_lock_moved_while_its_handler_runs_is_kept_and_completed() {
    let Some(urls) = cluster() else { return };
    let _moves = SLOT_MOVES.lock().await;
    let seed = port_of(&urls[0]);
    let (tag, slot) = free_tag(seed);
    let mut mv = SlotMove::new(seed, slot);
    let store = RedisIdempotencyStore::connect_cluster(urls.iter())
        .await
        .unwrap()
        .with_prefix(format!("{{{tag}}}:live"));
    let (url, runs) = idem_app(
        store,
        Duration::from_millis(300),
        Duration::from_millis(800),
    )
    .await;
    let t0 = Instant::now();
    let first = {
        let url = url.clone();
        tokio::spawn(async move { post(&url, b"k-live", "order").await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        keys_in_slot(mv.home.port, slot).len(),
        1,
        "no lock on the owner"
    );
    mv.start();
    let a = post(&url, b"k-live", "order").await;
    assert_eq!(a.status, StatusCode::CONFLICT, "migrating: {}", a.body);
    mv.migrate_keys(&mv.home.clone(), &mv.away.clone());
    let b = post(&url, b"k-live", "order").await;
    assert_eq!(b.status, StatusCode::CONFLICT, "lock migrated: {}", b.body);
    mv.finish();
    tokio::time::sleep(Duration::from_millis(400).saturating_sub(t0.elapsed())).await;
    let c = post(&url, b"k-live", "order").await;
    assert_eq!(
        c.status,
        StatusCode::CONFLICT,
        "past the lease, after the move: {}",
        c.body
    );
    let done = tokio::time::timeout(Duration::from_secs(3), first)
        .await
        .expect("the first request hung")
        .unwrap();
    assert_eq!(
        (done.status, done.replayed),
        (StatusCode::CREATED, false),
        "{}",
        done.body
    );
    let again = post(&url, b"k-live", "order").await;
    assert_eq!(
        (again.status, again.replayed, again.body.as_str()),
        (StatusCode::CREATED, true, "run 1: order"),
        "the response was not stored across the move"
    );
    mv.restore();
    let back = post(&url, b"k-live", "order").await;
    assert_eq!((back.status, back.replayed), (StatusCode::CREATED, true));
    assert_eq!(runs_of(&runs, "k-live"), 1);
}

/// RELIABILITY.md, "Slot moves": a new webhook dedup key during a move gets `TRYAGAIN`, "tried
/// again a few times within its timeout, and for a move that lasts longer it fails with "the
/// Redis Cluster cannot serve this key now"", within the timeout; the consumer's `next()`
/// errs, bounded, as well. After the move the same objects work: the refused event is queued
/// once, the earlier one is delivered once, with its first delivery count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s67_cluster_stream_during_a_slot_move_fails_clearly_then_recovers() {
    let Some(urls) = cluster() else { return };
    let _moves = SLOT_MOVES.lock().await;
    let seed = port_of(&urls[0]);
    let (tag, slot) = free_tag(seed);
    let mut mv = SlotMove::new(seed, slot);
    let stream = format!("{{{tag}}}");
    let timeout = Duration::from_millis(400);
    let queue = RedisStreamQueue::connect_cluster(urls.iter(), stream.clone())
        .await
        .unwrap()
        .with_timeout(timeout);
    let mut worker = RedisStreamConsumer::connect_cluster(
        urls.iter(),
        stream.clone(),
        "g",
        "w",
        Duration::from_secs(30),
    )
    .await
    .unwrap()
    .with_wait(Duration::from_millis(50))
    .with_timeout(timeout);
    let ev = |id: &str| WebhookEvent::new("standard", id, Bytes::from(format!("body {id}")));
    let ttl = Duration::from_secs(60);
    assert_eq!(queue.push(ev("e1"), ttl).await.unwrap(), Push::Enqueued);

    mv.start();
    let t0 = Instant::now();
    let pushed = queue.push(ev("e2"), ttl).await;
    let took = t0.elapsed();
    assert!(
        took < timeout + Duration::from_millis(300),
        "push took {took:?}"
    );
    match &pushed {
        Err(e) => assert!(
            e.to_string()
                .contains("the Redis Cluster cannot serve this key now"),
            "the error does not say so: {e}"
        ),
        Ok(p) => assert_eq!(*p, Push::Enqueued),
    }
    let t0 = Instant::now();
    let during = tokio::time::timeout(Duration::from_secs(3), worker.next())
        .await
        .expect("next() hung during the move");
    let took = t0.elapsed();
    assert!(
        took < timeout + Duration::from_millis(400),
        "next() took {took:?}"
    );
    let mut got: Vec<(String, u64)> = Vec::new();
    if let Ok(Some(d)) = &during {
        got.push((d.event.id.clone(), d.deliveries));
        worker.ack(d).await.unwrap();
    }
    mv.finish();
    let second = queue.push(ev("e2"), ttl).await.unwrap();
    if pushed.is_err() {
        assert_eq!(second, Push::Enqueued, "the refused push was remembered");
    } else {
        assert_eq!(second, Push::Duplicate);
    }
    while let Some(d) = worker.next().await.unwrap() {
        got.push((d.event.id.clone(), d.deliveries));
        worker.ack(&d).await.unwrap();
    }
    assert_eq!(
        got,
        vec![("e1".to_owned(), 1), ("e2".to_owned(), 1)],
        "events lost, doubled or counted wrong"
    );
    mv.restore();
    assert!(worker.next().await.unwrap().is_none());
}

/// idempotency.md: "A key you set yourself is kept", and a failed call "carries the key". A
/// caller's key of 64 KiB and one of bytes beyond ASCII (not UTF-8) in `ClientBuilder`: the
/// same bytes on all 4 attempts, and the error names a key to retry with.
#[tokio::test(start_paused = true)]
async fn s67_builder_keeps_huge_and_non_utf8_header_keys() {
    let huge = "h".repeat(64 * 1024);
    for key in [huge.as_bytes().to_vec()] {
        let (svc, seen) = api(vec![Err(())]);
        let client = ClientBuilder::new().build(svc);
        let mut r = req(Method::POST);
        r.headers_mut()
            .insert("idempotency-key", HeaderValue::from_bytes(&key).unwrap());
        let err = tokio::time::timeout(Duration::from_secs(60), client.oneshot(r))
            .await
            .expect("hung")
            .expect_err("reset");
        let keys = header_of(&seen, "idempotency-key");
        assert_eq!(keys.len(), 4, "{} attempts", keys.len());
        assert!(keys.iter().all(|k| k.as_deref() == Some(key.as_slice())));
        let e = err
            .downcast_ref::<sturdy::core::Error>()
            .expect("a sturdy Error");
        assert!(
            e.idempotency_key().is_some(),
            "the error carries no key for a {}-byte key: {err}",
            key.len()
        );
        assert!(
            err.to_string()
                .contains("retry with the same idempotency key"),
            "{}",
            &err.to_string()[..err.to_string().len().min(300)]
        );
    }
}

/// idempotency.md: "`.with_header(name)` ... in `sturdy::ClientBuilder` the retry layer is told
/// the header, so a POST keyed in it is retried (used alone, tell it yourself with
/// `RetryLayer::with_idempotency_header`)". Alone and not told: one attempt; told: four, one key.
#[tokio::test(start_paused = true)]
async fn s67_layers_alone_need_the_header_told_to_retry() {
    let name = HeaderName::from_static("x-op-key");
    for told in [false, true] {
        let (svc, seen) = api(vec![Err(())]);
        let retry = if told {
            RetryLayer::new().with_idempotency_header(name.clone())
        } else {
            RetryLayer::new()
        };
        let client = ServiceBuilder::new()
            .layer(IdempotencyKeyLayer::new().with_header(name.clone()))
            .layer(retry.with_seed(5))
            .service(svc);
        let err = tokio::time::timeout(Duration::from_secs(60), client.oneshot(req(Method::POST)))
            .await
            .expect("hung")
            .expect_err("reset");
        let keys = header_of(&seen, "x-op-key");
        assert_eq!(keys.len(), if told { 4 } else { 1 }, "told {told}");
        assert!(keys.iter().all(|k| k == &keys[0] && k.is_some()));
        if told {
            let k = String::from_utf8(keys[0].clone().unwrap()).unwrap();
            assert!(err.to_string().contains(&k), "{err}");
        }
    }
}

/// idempotency.md: "When the server answers 409 with `Retry-After` to a request that carries a
/// key ..., the retry layer waits and asks again, so the caller gets the stored response. A 409
/// without `Retry-After`, or to a request without a key, is a real conflict and is returned as
/// it is." Through `ClientBuilder`, with paused time: the wait is at least the `Retry-After`.
#[tokio::test(start_paused = true)]
async fn s67_builder_in_flight_409_is_waited_out_only_with_a_key_and_retry_after() {
    let conflict = |retry_after: Option<&'static str>| {
        let n = Arc::new(AtomicUsize::new(0));
        let seen: Seen = Arc::default();
        let log = seen.clone();
        let svc = tower::service_fn(move |req: Request<Full<Bytes>>| {
            let i = n.fetch_add(1, Ordering::SeqCst);
            let headers = req
                .headers()
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), v.as_bytes().to_vec()))
                .collect();
            log.lock().unwrap().push((req.method().clone(), headers));
            async move {
                let mut b = Response::builder().status(if i < 2 { 409 } else { 201 });
                if let (true, Some(ra)) = (i < 2, retry_after) {
                    b = b.header("retry-after", ra);
                }
                Ok::<_, std::io::Error>(b.body(Full::<Bytes>::from("x")).unwrap())
            }
        });
        (Api::new(svc), seen)
    };
    // A keyed POST with Retry-After: 1, twice: waited out, 3 attempts, one key, >= 2 s.
    let (svc, seen) = conflict(Some("1"));
    let client = ClientBuilder::new().build(svc);
    let t0 = Instant::now();
    let res = tokio::time::timeout(Duration::from_secs(60), client.oneshot(req(Method::POST)))
        .await
        .expect("hung")
        .unwrap();
    assert_eq!(res.status(), 201);
    assert!(
        t0.elapsed() >= Duration::from_secs(2),
        "waited {:?}",
        t0.elapsed()
    );
    let keys = header_of(&seen, "idempotency-key");
    assert_eq!(keys.len(), 3);
    assert!(keys.iter().all(|k| k == &keys[0] && k.is_some()));
    // Without Retry-After: returned as it is.
    let (svc, seen) = conflict(None);
    let res = ClientBuilder::new()
        .build(svc)
        .oneshot(req(Method::POST))
        .await
        .unwrap();
    assert_eq!(res.status(), 409);
    assert_eq!(seen.lock().unwrap().len(), 1);
    // Without a key (a PUT gets none): returned as it is.
    let (svc, seen) = conflict(Some("1"));
    let res = ClientBuilder::new()
        .build(svc)
        .oneshot(req(Method::PUT))
        .await
        .unwrap();
    assert_eq!(res.status(), 409);
    assert_eq!(seen.lock().unwrap().len(), 1);
    assert!(header_of(&seen, "idempotency-key")[0].is_none());
}

/// idempotency.md: "A key you set yourself is kept", and "If the call still fails, the error
/// says whether any attempt may have been processed and carries the key: `...; it may have
/// been processed: retry with the same idempotency key <key>`". A caller's header key with
/// bytes beyond ASCII (`caf\xe9-\xff`, a legal header value) is kept and retried as a key on
/// all 4 attempts; the final error cannot write such a key into its message (a lossy copy would
/// be another key), so it says to retry with the key the request carried, never the unkeyed
/// "check before sending it again", and `CallReport::idempotency_key` is `None` (idempotency.md).
#[tokio::test(start_paused = true)]
async fn s67_builder_non_utf8_header_key_is_reported() {
    let key = b"caf\xe9-\xff".to_vec();
    let (svc, seen) = api(vec![Err(())]);
    let client = ClientBuilder::new().build(svc);
    let mut r = req(Method::POST);
    r.headers_mut()
        .insert("idempotency-key", HeaderValue::from_bytes(&key).unwrap());
    let err = tokio::time::timeout(Duration::from_secs(60), client.oneshot(r))
        .await
        .expect("hung")
        .expect_err("reset");
    let keys = header_of(&seen, "idempotency-key");
    assert_eq!(keys.len(), 4, "{} attempts", keys.len());
    assert!(keys.iter().all(|k| k.as_deref() == Some(key.as_slice())));
    let e = err
        .downcast_ref::<sturdy::core::Error>()
        .expect("a sturdy Error");
    assert_eq!(e.idempotency_key(), None, "{err}");
    assert!(
        err.to_string().contains(
            "it may have been processed: retry with the same idempotency key, the one the request carried"
        ),
        "{err}"
    );
}

/// RELIABILITY.md, "Slot moves": for a move that lasts longer than the timeout the operation
/// "fails with "the Redis Cluster cannot serve this key now": the limiter then applies its
/// `with_on_store_error` policy"; the table: fail-open by default ("the call goes through"),
/// fail-closed "the call fails at once, not sent, with "the rate-limit store failed, so the
/// call was not sent"". `RateLimitLayer` over a `RedisQuota` whose slot is migrating.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s67_cluster_rate_limit_layer_store_error_policy_during_a_slot_move() {
    use sturdy::ratelimit::{OnStoreError, RateLimitLayer};
    let Some(urls) = cluster() else { return };
    let _moves = SLOT_MOVES.lock().await;
    let seed = port_of(&urls[0]);
    let (tag, slot) = free_tag(seed);
    let mut mv = SlotMove::new(seed, slot);
    let quota = Quota::per_minute(1).unwrap().with_burst(50).unwrap();
    let remote = Arc::new(
        RedisQuota::connect_cluster(urls.iter(), quota)
            .await
            .unwrap()
            .with_prefix(unique("rl"))
            .with_timeout(Duration::from_millis(300)),
    );
    let (inner, seen) = api(vec![Ok(200)]);
    let layer = |policy| {
        ServiceBuilder::new()
            .layer(
                RateLimitLayer::new(quota)
                    .with_remote(remote.clone())
                    .with_on_store_error(policy),
            )
            .service(inner.clone())
    };
    let call = || {
        Request::get(format!("http://{tag}/x"))
            .body(Full::<Bytes>::from(""))
            .unwrap()
    };
    let first = layer(OnStoreError::Fail).oneshot(call()).await.unwrap();
    assert_eq!(first.status(), 200);
    assert!(
        !keys_in_slot(mv.home.port, slot).is_empty(),
        "the limiter's key is not in the slot of its host's tag"
    );
    mv.start();
    let open = tokio::time::timeout(
        Duration::from_secs(3),
        layer(OnStoreError::Allow).oneshot(call()),
    )
    .await
    .expect("fail-open call hung")
    .expect("fail-open let the call through");
    assert_eq!(open.status(), 200);
    let before = seen.lock().unwrap().len();
    let t0 = Instant::now();
    let closed = tokio::time::timeout(
        Duration::from_secs(3),
        layer(OnStoreError::Fail).oneshot(call()),
    )
    .await
    .expect("fail-closed call hung")
    .expect_err("fail-closed during the move");
    assert!(
        t0.elapsed() < Duration::from_millis(900),
        "took {:?}",
        t0.elapsed()
    );
    assert_eq!(seen.lock().unwrap().len(), before, "the call was sent");
    let text = closed.to_string();
    assert!(
        text.contains("the rate-limit store failed, so the call was not sent"),
        "{text}"
    );
    assert_eq!(
        sturdy::core::classify::delivery(&*closed),
        sturdy::core::Delivery::NotSent
    );
    mv.finish();
    let after = layer(OnStoreError::Fail).oneshot(call()).await.unwrap();
    assert_eq!(after.status(), 200);
    mv.restore();
}
