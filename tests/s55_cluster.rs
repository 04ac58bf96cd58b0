//! s55 outside round: sturdy-redis on the shared Redis Cluster (`STURDY_REDIS_CLUSTER_URLS`,
//! 3 primaries + 3 replicas), read from the rustdoc of `RedisQuota`, `RedisIdempotencyStore`,
//! `RedisStreamQueue`, `RedisStreamConsumer`, docs/guides/{webhooks,idempotency,ratelimit}.md
//! and docs/RELIABILITY.md's Redis section. Nothing here changes the cluster's configuration;
//! every key carries a name of its own.
#![cfg(feature = "full")]

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use axum::body::Body;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use http::{Request, StatusCode};
use sturdy::core::{BoxError, Error as SturdyError, ErrorKind};
use sturdy::idempotency::server::{
    conformance, Begin, ByCredentials, IdempotencyLayer, IdempotencyStore, LockToken,
};
use sturdy::ratelimit::{Quota, Reserve};
use sturdy::redis::{
    RedisConnection, RedisIdempotencyStore, RedisQuota, RedisStreamConsumer, RedisStreamQueue,
};
use sturdy::webhook::{EventQueue, Push, WebhookEvent};
use tower::ServiceExt;

/// The shared cluster's node URLs, or `None` (the test is skipped).
pub(crate) fn nodes() -> Option<Vec<String>> {
    match std::env::var("STURDY_REDIS_CLUSTER_URLS") {
        Ok(s) => Some(s.split(',').map(str::to_owned).collect()),
        Err(_) => {
            eprintln!("STURDY_REDIS_CLUSTER_URLS not set: skipped");
            None
        }
    }
}

/// The ports of the cluster's nodes, from `STURDY_REDIS_CLUSTER_URLS`
/// (`redis://127.0.0.1:<port>/`, comma-separated).
pub(crate) fn ports() -> Vec<u16> {
    nodes()
        .unwrap_or_default()
        .iter()
        .filter_map(|u| {
            let rest = u.split("://").nth(1)?;
            let hostport = rest.split('/').next()?;
            hostport.rsplit(':').next()?.parse().ok()
        })
        .collect()
}

/// One node's port (`redis-cli -c` follows the cluster's redirections from any).
pub(crate) fn port0() -> u16 {
    ports().first().copied().expect("a cluster node's port")
}

/// A name no other test, process or run uses.
pub(crate) fn unique(tag: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = sturdy::core::WallClock::now(&sturdy::core::SystemClock)
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "s55:{tag}:{}:{}:{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// `redis-cli -c` against the cluster node on `port` (follows redirections); its raw output.
pub(crate) fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-c", "-h", "127.0.0.1", "-p", &port.to_string(), "--raw"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("redis-cli runs");
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    s
}

/// A number `redis-cli` printed.
pub(crate) fn cli_num(port: u16, args: &[&str]) -> i64 {
    let out = cli(port, args);
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("{args:?} answered {out:?}"))
}

pub(crate) fn slot(key: &str) -> i64 {
    cli_num(port0(), &["CLUSTER", "KEYSLOT", key])
}

/// Every key matching `pattern` on the three primaries.
pub(crate) fn scan_all(pattern: &str) -> Vec<String> {
    let mut keys = Vec::new();
    for port in ports() {
        let role = cli(port, &["ROLE"]);
        if !role.starts_with("master") {
            continue;
        }
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "--raw"])
            .args(["--scan", "--pattern", pattern])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        keys.extend(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| !l.is_empty())
                .map(str::to_owned),
        );
    }
    keys.sort();
    keys
}

pub(crate) fn kind(e: &BoxError) -> Option<ErrorKind> {
    e.downcast_ref::<SturdyError>().map(|e| e.kind().clone())
}

pub(crate) fn event(id: &str) -> WebhookEvent {
    WebhookEvent::new("standard", id, Bytes::from(format!("body of {id}")))
}

fn quota_burst(n: u32) -> Quota {
    Quota::new(1, Duration::from_secs(3600))
        .unwrap()
        .with_burst(n)
        .unwrap()
}

fn granted(r: &Reserve) -> bool {
    matches!(r, Reserve::Granted { .. })
}

/// lib.rs: "connect_cluster(nodes, ..) for a Redis Cluster"; conn.rs: "Connects to a Redis
/// Cluster through any of its nodes (... one reachable node is enough, it tells where the
/// others are)". A replica alone as the seed: every backend works through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s55_cluster_one_replica_as_the_only_seed_is_enough() {
    let Some(_) = nodes() else { return };
    // Find a replica among the shared nodes.
    let replica = ports()
        .into_iter()
        .find(|p| cli(*p, &["ROLE"]).starts_with("slave"))
        .expect("a replica");
    let seed = [format!("redis://127.0.0.1:{replica}/")];
    let prefix = unique("seed");
    let q = RedisQuota::connect_cluster(&seed, quota_burst(1))
        .await
        .unwrap()
        .with_prefix(&prefix);
    assert!(granted(&q.try_reserve("k", Duration::ZERO).await.unwrap()));
    assert!(!granted(&q.try_reserve("k", Duration::ZERO).await.unwrap()));
    let store = RedisIdempotencyStore::connect_cluster(&seed)
        .await
        .unwrap()
        .with_prefix(&prefix);
    let fp = [7u8; 32];
    let b = store
        .begin("k", fp, LockToken::random(), Duration::from_secs(5))
        .await
        .unwrap();
    assert!(matches!(b, Begin::Started), "{b:?}");
    let stream = unique("seedstream");
    let mut c = RedisStreamConsumer::connect_cluster(
        &seed,
        stream.clone(),
        "g",
        "c1",
        Duration::from_secs(30),
    )
    .await
    .unwrap()
    .with_wait(Duration::from_millis(200));
    let queue = RedisStreamQueue::connect_cluster(&seed, stream)
        .await
        .unwrap();
    assert_eq!(
        queue
            .push(event("e1"), Duration::from_secs(60))
            .await
            .unwrap(),
        Push::Enqueued
    );
    let d = c.next().await.unwrap().expect("the event");
    assert_eq!(d.event.id, "e1");
    c.ack(&d).await.unwrap();
}

/// conn.rs `connect_cluster`, # Errors: "When no URL is given, a URL is invalid, or no node
/// answers in time. The message never repeats a URL." Every backend's `connect_cluster`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s55_cluster_no_url_or_an_invalid_one_is_an_error_without_the_url() {
    let Some(good) = nodes() else { return };
    let none: Vec<String> = Vec::new();
    let start = Instant::now();
    let e = RedisConnection::connect_cluster(&none).await.unwrap_err();
    assert!(!e.to_string().is_empty());
    assert!(RedisQuota::connect_cluster(&none, quota_burst(1))
        .await
        .is_err());
    assert!(RedisIdempotencyStore::connect_cluster(&none).await.is_err());
    assert!(RedisStreamQueue::connect_cluster(&none, "s").await.is_err());
    assert!(
        RedisStreamConsumer::connect_cluster(&none, "s", "g", "c", Duration::from_secs(1))
            .await
            .is_err()
    );
    assert!(start.elapsed() < Duration::from_secs(10));

    for bad in [
        "redis://:hunter2secret@127.0.0.1:99999/",
        "definitely not a url hunter2secret",
        "http://:hunter2secret@127.0.0.1:17400/",
    ] {
        let seeds = vec![good[0].clone(), bad.to_owned()];
        let start = Instant::now();
        let r = RedisConnection::connect_cluster(&seeds).await;
        assert!(start.elapsed() < Duration::from_secs(10));
        match r {
            Ok(_) => panic!("a list holding the invalid URL {bad:?} was accepted"),
            Err(e) => {
                let text = format!("{e} {e:?}");
                assert!(!text.contains("hunter2secret"), "{text}");
            }
        }
    }
}

/// lib.rs key layout: "`<prefix>:{<key>}:tat`, `<prefix>:{<key>}:pause`", and an empty key or
/// a key with a brace "get a hex tag instead"; "Every script touches the keys of one Redis
/// Cluster hash slot only". Checked from the keys the cluster holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s55_cluster_quota_keys_are_laid_out_as_documented() {
    let Some(n) = nodes() else { return };
    let prefix = unique("layout");
    let q = RedisQuota::connect_cluster(&n, quota_burst(3))
        .await
        .unwrap()
        .with_prefix(&prefix);
    q.try_reserve("plain", Duration::ZERO).await.unwrap();
    q.try_pause("plain", Duration::from_secs(30)).await.unwrap();
    let tat = format!("{prefix}:{{plain}}:tat");
    let pause = format!("{prefix}:{{plain}}:pause");
    assert_eq!(cli_num(port0(), &["EXISTS", &tat]), 1, "{tat} missing");
    assert_eq!(cli_num(port0(), &["EXISTS", &pause]), 1, "{pause} missing");
    for key in ["", "a}b{c", "{x}", "}{"] {
        q.try_reserve(key, Duration::ZERO).await.unwrap();
        q.try_pause(key, Duration::from_secs(30)).await.unwrap();
    }
    // The method's doc: "the prefix and the key are written in hex inside the tag instead".
    let hex: String = prefix.bytes().map(|b| format!("{b:02x}")).collect();
    let mut keys = scan_all(&format!("{prefix}:*"));
    keys.extend(scan_all(&format!("*{hex}*")));
    // plain + 4 hostile keys, two keys each.
    assert_eq!(keys.len(), 10, "{keys:?}");
    let mut slots = std::collections::HashMap::<String, Vec<i64>>::new();
    for k in &keys {
        let (stem, _) = k.rsplit_once(':').unwrap();
        slots.entry(stem.to_owned()).or_default().push(slot(k));
    }
    assert_eq!(slots.len(), 5, "{keys:?}");
    for (stem, s) in slots {
        assert_eq!(s.len(), 2, "{stem}");
        assert_eq!(s[0], s[1], "the two keys of {stem} are in two slots");
    }
}

/// lib.rs: pauses "capped (\[5 min\], `RedisQuota::with_max_pause`): no pause key lives
/// longer than the cap"; `try_pause`: "A `duration` of zero pauses nothing (nothing is
/// written)"; `try_clear_pause`: "returns the time it had left (`None`: it was not paused)".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s55_cluster_pause_cap_zero_and_clear() {
    let Some(n) = nodes() else { return };
    let prefix = unique("pause");
    let q = RedisQuota::connect_cluster(&n, quota_burst(1))
        .await
        .unwrap()
        .with_prefix(&prefix)
        .with_max_pause(Duration::from_secs(2));
    q.try_pause("k", Duration::from_secs(3600)).await.unwrap();
    let left = q.try_paused("k").await.unwrap().expect("paused");
    assert!(
        left <= Duration::from_secs(2) && left > Duration::ZERO,
        "{left:?}"
    );
    let pttl = cli_num(port0(), &["PTTL", &format!("{prefix}:{{k}}:pause")]);
    assert!(pttl > 0 && pttl <= 2000, "pause key PTTL {pttl}");
    // A reservation during the pause is not granted now.
    let r = q.try_reserve("k", Duration::ZERO).await.unwrap();
    assert!(!granted(&r), "{r:?}");
    let cleared = q
        .try_clear_pause("k")
        .await
        .unwrap()
        .expect("it was paused");
    assert!(cleared <= Duration::from_secs(2));
    assert_eq!(q.try_paused("k").await.unwrap(), None);
    assert_eq!(q.try_clear_pause("k").await.unwrap(), None);
    // Zero: nothing written.
    q.try_pause("z", Duration::ZERO).await.unwrap();
    assert_eq!(q.try_paused("z").await.unwrap(), None);
    assert_eq!(
        cli_num(port0(), &["EXISTS", &format!("{prefix}:{{z}}:pause")]),
        0
    );
    // Duration::MAX: stored as the cap.
    q.try_pause("m", Duration::MAX).await.unwrap();
    let left = q.try_paused("m").await.unwrap().expect("paused");
    assert!(left <= Duration::from_secs(2), "{left:?}");
}

/// `try_release`: "The quota's next free slot moves back one interval, never before now;
/// whether a slot was given back." Two instances (two processes) share one quota on the
/// cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s55_cluster_release_and_two_instances_share_one_quota() {
    let Some(n) = nodes() else { return };
    let prefix = unique("release");
    let a = RedisQuota::connect_cluster(&n, quota_burst(2))
        .await
        .unwrap()
        .with_prefix(&prefix);
    let b = RedisQuota::connect_cluster(&n, quota_burst(2))
        .await
        .unwrap()
        .with_prefix(&prefix);
    assert!(
        !a.try_release("fresh").await.unwrap(),
        "a slot given back that was never taken"
    );
    assert!(granted(&a.try_reserve("k", Duration::ZERO).await.unwrap()));
    assert!(granted(&b.try_reserve("k", Duration::ZERO).await.unwrap()));
    assert!(!granted(&a.try_reserve("k", Duration::ZERO).await.unwrap()));
    assert!(!granted(&b.try_reserve("k", Duration::ZERO).await.unwrap()));
    assert!(b.try_release("k").await.unwrap());
    assert!(granted(&a.try_reserve("k", Duration::ZERO).await.unwrap()));
    assert!(!granted(&b.try_reserve("k", Duration::ZERO).await.unwrap()));
}

/// idempotency.md: "Your own store: ... run `server::conformance::run(a, b)` against two
/// handles to the same storage"; `connect_cluster` "works on a Redis Cluster". Two cluster
/// connections as the two handles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s55_cluster_idempotency_store_passes_the_conformance_suite() {
    let Some(n) = nodes() else { return };
    let prefix = unique("conf");
    let a = RedisIdempotencyStore::connect_cluster(&n)
        .await
        .unwrap()
        .with_prefix(&prefix);
    let b = RedisIdempotencyStore::connect_cluster(&n)
        .await
        .unwrap()
        .with_prefix(&prefix);
    tokio::time::timeout(Duration::from_secs(240), conformance::run(a, b))
        .await
        .expect("the conformance suite ends");
}

fn app(store: RedisIdempotencyStore) -> (Router, Arc<AtomicUsize>) {
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let router = Router::new()
        .route(
            "/orders",
            post(move |body: Bytes| {
                let r = r.clone();
                async move {
                    r.fetch_add(1, Ordering::SeqCst);
                    (StatusCode::CREATED, format!("made {}", body.len()))
                }
            }),
        )
        .layer(IdempotencyLayer::new(store, ByCredentials::default()));
    (router, runs)
}

fn order(key: &str) -> Request<Body> {
    Request::post("/orders")
        .header("idempotency-key", key)
        .header("authorization", "Bearer s55-very-secret-token")
        .body(Body::from("{\"amount\":1}"))
        .unwrap()
}

/// `RedisIdempotencyStore`: "The Redis key is the prefix, a hash of the client's scope and the
/// idempotency key; no credential is stored." Read from the cluster itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s55_cluster_idempotency_key_layout_and_no_credential_stored() {
    let Some(n) = nodes() else { return };
    let prefix = unique("idemkeys");
    let store = RedisIdempotencyStore::connect_cluster(&n)
        .await
        .unwrap()
        .with_prefix(&prefix);
    let (app, runs) = app(store);
    let resp = app.clone().oneshot(order("order-77")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let resp = app.clone().oneshot(order("order-77")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let keys = scan_all(&format!("{prefix}:*"));
    assert_eq!(keys.len(), 1, "{keys:?}");
    let key = &keys[0];
    let rest = key.strip_prefix(&format!("{prefix}:")).unwrap();
    let (scope, idem) = rest.split_once(':').expect("<scope hash>:<key>");
    assert_eq!(idem, "order-77", "{key}");
    assert!(!scope.is_empty() && !scope.contains("s55-very-secret-token"));
    let value = cli(port0(), &["GET", key]);
    assert!(value.starts_with("d:"), "{value}");
    assert!(!value.contains("s55-very-secret-token"), "{value}");
    assert!(!key.contains("s55-very-secret-token"));
}

/// lib.rs / RELIABILITY.md: `with_replication(n, timeout)` makes "an enqueue, a lock and a
/// stored response count only once that many replicas confirmed them ..., and fail
/// otherwise", with the message "the write reached the Redis primary, but only 0 of the 1
/// replicas asked for confirmed it"; and for the redelivery: "if the primary survived, that
/// copy is a duplicate and gets 2xx once `n` replicas confirm the event: until then, with fewer
/// replicas connected, it gets 503 too". The shared cluster has one replica per primary: 2
/// can never confirm, 1 does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s55_cluster_replication_asked_of_more_replicas_than_exist_fails_clearly() {
    let Some(n) = nodes() else { return };
    let stream = unique("repl");
    let mut c =
        RedisStreamConsumer::connect_cluster(&n, stream.clone(), "g", "c", Duration::from_secs(30))
            .await
            .unwrap()
            .with_wait(Duration::from_millis(200));
    let two = RedisStreamQueue::connect_cluster(&n, stream.clone())
        .await
        .unwrap()
        .with_replication(2, Duration::from_millis(100));
    let start = Instant::now();
    let e = two
        .push(event("r1"), Duration::from_secs(60))
        .await
        .unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(6),
        "{:?}",
        start.elapsed()
    );
    let text = e.to_string();
    assert!(
        text.contains("only 1 of the 2 replicas") || text.contains("only 0 of the 2 replicas"),
        "{text}"
    );
    // The redelivery, still with fewer replicas than asked: an error too, not `Duplicate`.
    let again = two.push(event("r1"), Duration::from_secs(60)).await;
    assert!(
        again.is_err(),
        "a copy acknowledged before 2 replicas confirmed it: {again:?}"
    );
    // With 1 replica asked: a duplicate now.
    let one = RedisStreamQueue::connect_cluster(&n, stream.clone())
        .await
        .unwrap()
        .with_replication(1, Duration::from_secs(2));
    assert_eq!(
        one.push(event("r1"), Duration::from_secs(60))
            .await
            .unwrap(),
        Push::Duplicate
    );
    assert_eq!(
        one.push(event("r2"), Duration::from_secs(60))
            .await
            .unwrap(),
        Push::Enqueued
    );
    // Each event in the stream once.
    let mut seen = Vec::new();
    while let Some(d) = c.next().await.unwrap() {
        seen.push(d.event.id.clone());
        c.ack(&d).await.unwrap();
    }
    assert_eq!(seen, ["r1", "r2"]);

    // The idempotency store: `begin` fails; through the layer, 503 without running the
    // handler, and "releases the lock in the background, so a retry runs at once".
    let prefix = unique("replidem");
    let strict = RedisIdempotencyStore::connect_cluster(&n)
        .await
        .unwrap()
        .with_prefix(&prefix)
        .with_replication(2, Duration::from_millis(100));
    let (strict_app, strict_runs) = app(strict);
    let resp = strict_app.clone().oneshot(order("k1")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(strict_runs.load(Ordering::SeqCst), 0);
    let relaxed = RedisIdempotencyStore::connect_cluster(&n)
        .await
        .unwrap()
        .with_prefix(&prefix)
        .with_replication(1, Duration::from_secs(2));
    let (relaxed_app, relaxed_runs) = app(relaxed);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let resp = relaxed_app.clone().oneshot(order("k1")).await.unwrap();
        if resp.status() == StatusCode::CREATED {
            break;
        }
        assert_eq!(resp.status(), StatusCode::CONFLICT);
        assert!(Instant::now() < deadline, "the lock was never released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(relaxed_runs.load(Ordering::SeqCst), 1);
}

/// lib.rs key layout for the stream: "the stream, `<base>:seen:<dedup key>`, `<base>:dead`"
/// where "`<base>` is the stream name when it has a hash tag (`{webhooks}`), else the name made
/// a tag (`webhooks` gives `{webhooks}`), whose slot is the stream's"; `RedisStreamQueue`: the
/// dedup key is "one per event, expiring with the dedup TTL".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s55_cluster_stream_keys_share_the_streams_slot() {
    let Some(n) = nodes() else { return };
    let plain = unique("layout-stream");
    let tagged = format!("{{{}}}", unique("layout-tagged"));
    for (stream, base) in [
        (plain.clone(), format!("{{{plain}}}")),
        (tagged.clone(), tagged.clone()),
    ] {
        let mut c = RedisStreamConsumer::connect_cluster(
            &n,
            stream.clone(),
            "g",
            "c",
            Duration::from_secs(30),
        )
        .await
        .unwrap()
        .with_wait(Duration::from_millis(200));
        let q = RedisStreamQueue::connect_cluster(&n, stream.clone())
            .await
            .unwrap();
        let ev = event("lay1");
        let dedup = ev.dedup_key();
        assert_eq!(
            q.push(ev, Duration::from_secs(100)).await.unwrap(),
            Push::Enqueued
        );
        let seen = format!("{base}:seen:{dedup}");
        let pttl = cli_num(port0(), &["PTTL", &seen]);
        assert!(
            pttl > 50_000 && pttl <= 100_000,
            "{seen}: PTTL {pttl} for a 100 s dedup TTL"
        );
        let d = c.next().await.unwrap().expect("event");
        c.dead_letter(&d, "layout").await.unwrap();
        let dead = format!("{base}:dead");
        assert_eq!(cli_num(port0(), &["XLEN", &dead]), 1, "{dead}");
        assert_eq!(slot(&seen), slot(&stream));
        assert_eq!(slot(&dead), slot(&stream));
        assert_eq!(q.dead_letter_count().await.unwrap(), 1);
    }
}

/// `RedisStreamQueue`: "The streams `webhooks` and `{webhooks}` would have one base: while one
/// of them exists in a Redis, a push to the other fails with a `Config` error that names
/// both".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s55_cluster_twin_streams_refuse_each_other() {
    let Some(n) = nodes() else { return };
    for first_tagged in [false, true] {
        let name = unique("twin");
        let tagged = format!("{{{name}}}");
        let (first, second) = if first_tagged {
            (tagged.clone(), name.clone())
        } else {
            (name.clone(), tagged.clone())
        };
        let a = RedisStreamQueue::connect_cluster(&n, first.clone())
            .await
            .unwrap();
        let b = RedisStreamQueue::connect_cluster(&n, second.clone())
            .await
            .unwrap();
        assert_eq!(
            a.push(event("t1"), Duration::from_secs(60)).await.unwrap(),
            Push::Enqueued
        );
        let e = b
            .push(event("t2"), Duration::from_secs(60))
            .await
            .unwrap_err();
        assert_eq!(kind(&e), Some(ErrorKind::Config), "{e}");
        let text = e.to_string();
        assert!(
            text.contains(&first) && text.contains(&second),
            "does not name both: {text}"
        );
        // Not taken for a duplicate of the other's event either.
        let e = b.push(event("t1"), Duration::from_secs(60)).await;
        assert!(e.is_err(), "{e:?}");
    }
}

/// `with_dead_letter_stream`: "On a Redis Cluster it must be in the stream's hash slot ... or
/// every operation that touches both fails with an error that says so." And `dead_letter`'s
/// # Errors: "The event then stays pending and is delivered again".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s55_cluster_dead_letter_stream_in_another_slot_fails_saying_so() {
    let Some(n) = nodes() else { return };
    let stream = format!("{{{}}}", unique("dlslot"));
    // A name in another slot than the stream's (tried until one is).
    let mut other = String::new();
    for i in 0..100 {
        let cand = format!("{{{}}}:dead", unique(&format!("other{i}")));
        if slot(&cand) != slot(&stream) {
            other = cand;
            break;
        }
    }
    let mut c = RedisStreamConsumer::connect_cluster(
        &n,
        stream.clone(),
        "g",
        "c",
        Duration::from_millis(200),
    )
    .await
    .unwrap()
    .with_wait(Duration::from_millis(200))
    .with_dead_letter_stream(other.clone());
    let q = RedisStreamQueue::connect_cluster(&n, stream.clone())
        .await
        .unwrap()
        .with_dead_letter_stream(other.clone());
    assert_eq!(
        q.push(event("d1"), Duration::from_secs(60)).await.unwrap(),
        Push::Enqueued
    );
    // `next` touches both (the claim may dead-letter): an error that says so.
    let r = c.next().await;
    let e = match r {
        Err(e) => e,
        Ok(Some(d)) => c.dead_letter(&d, "poison").await.unwrap_err(),
        Ok(None) => panic!("the event was not delivered and no error came"),
    };
    let text = e.to_string().to_lowercase();
    assert!(
        text.contains("slot") || text.contains("hash tag"),
        "the error does not say the two streams are in two slots: {e}"
    );
    // Nothing lost: the stream still holds the event.
    assert_eq!(cli_num(port0(), &["XLEN", &stream]), 1);
}

/// Every backend: `with_timeout(Duration::MAX)` is accepted (lib.rs `connect`: "Any `timeout`
/// is accepted, `Duration::MAX` too") and operations work on the cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s55_cluster_extreme_timeouts_are_accepted() {
    let Some(n) = nodes() else { return };
    let prefix = unique("tmax");
    let q = RedisQuota::connect_cluster(&n, quota_burst(1))
        .await
        .unwrap()
        .with_prefix(&prefix)
        .with_timeout(Duration::MAX);
    assert!(granted(&q.try_reserve("k", Duration::MAX).await.unwrap()));
    let r = q.try_reserve("k", Duration::MAX).await.unwrap();
    // A wait of an hour is within Duration::MAX: granted with a wait.
    assert!(granted(&r), "{r:?}");
    let s = RedisIdempotencyStore::connect_cluster(&n)
        .await
        .unwrap()
        .with_prefix(&prefix)
        .with_timeout(Duration::MAX);
    let b = s
        .begin("k", [9u8; 32], LockToken::random(), Duration::MAX)
        .await
        .unwrap();
    assert!(matches!(b, Begin::Started), "{b:?}");
    let stream = unique("tmax-stream");
    let qu = RedisStreamQueue::connect_cluster(&n, stream.clone())
        .await
        .unwrap()
        .with_timeout(Duration::MAX);
    assert_eq!(
        qu.push(event("x"), Duration::MAX).await.unwrap(),
        Push::Enqueued
    );
    assert_eq!(
        qu.push(event("x"), Duration::MAX).await.unwrap(),
        Push::Duplicate
    );
}

/// `connect_cluster`: "the same defaults as [`connect`]": keys prefixed `sturdy:rl` (quota) and
/// `sturdy:idem` (store).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s55_cluster_default_prefixes() {
    let Some(n) = nodes() else { return };
    let key = unique("defprefix");
    let q = RedisQuota::connect_cluster(&n, quota_burst(1))
        .await
        .unwrap();
    q.try_reserve(&key, Duration::ZERO).await.unwrap();
    let tat = format!("sturdy:rl:{{{key}}}:tat");
    assert_eq!(cli_num(port0(), &["EXISTS", &tat]), 1, "{tat}");
    cli(port0(), &["DEL", &tat]);
    let s = RedisIdempotencyStore::connect_cluster(&n).await.unwrap();
    let b = s
        .begin(&key, [1u8; 32], LockToken::random(), Duration::from_secs(5))
        .await
        .unwrap();
    assert!(matches!(b, Begin::Started));
    let found = scan_all(&format!("sturdy:idem:*{key}*"));
    assert_eq!(found.len(), 1, "{found:?}");
    cli(port0(), &["DEL", &found[0]]);
}
