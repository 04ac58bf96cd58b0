//! The Redis Cluster backends on the shared cluster (`STURDY_REDIS_CLUSTER_URLS`), read from the
//! docs only: `docs/guides/{idempotency,ratelimit,webhooks}.md`, `docs/RELIABILITY.md` and the
//! rustdoc of `sturdy-redis`.
#![cfg(feature = "full")]

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

use axum::body::Body;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use sturdy::idempotency::server::{
    Begin, ByCredentials, IdempotencyLayer, IdempotencyStore, LockToken, StoredResponse,
};
use sturdy::ratelimit::{OnStoreError, Quota, RateLimitLayer, Reserve};
use sturdy::redis::{RedisIdempotencyStore, RedisQuota, RedisStreamConsumer, RedisStreamQueue};
use sturdy::webhook::{EventQueue, Push, WebhookEvent};
use tower::{Service, ServiceBuilder, ServiceExt};

use crate::cluster32_util::{
    chain, cli, cluster_nodes, keyslot, kind, port_of, shared_nodes, unique, Rng,
};

fn granted(r: &Reserve) -> bool {
    matches!(r, Reserve::Granted { wait } if wait.is_zero())
}

/// Every key on every primary of the shared cluster whose name starts with `prefix`.
fn keys_with_prefix(nodes: &[String], prefix: &str) -> Vec<(u16, String)> {
    let any = port_of(&nodes[0]);
    let mut out = Vec::new();
    for n in cluster_nodes(any) {
        if !n.primary || n.failed {
            continue;
        }
        let pat = format!("{prefix}*");
        let keys = cli(n.port, &["--scan", "--pattern", &pat]);
        for k in keys.lines().filter(|l| !l.is_empty()) {
            out.push((n.port, k.to_owned()));
        }
    }
    out
}

/// `RedisQuota` (ratelimit.md): "the keys of one limiter share a hash tag, so each decision
/// runs on one node. One Lua script per decision ..., atomic in Redis". Two processes (two
/// cluster connections), 12 tasks each, asking with no wait for 1.5 s: the grants never exceed
/// the quota (burst 3, then one per 50 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster32_quota_two_connections_never_exceed_the_quota() {
    let Some(nodes) = shared_nodes() else { return };
    let quota = Quota::per_second(20).unwrap().with_burst(3).unwrap();
    let prefix = unique("q2");
    let a = RedisQuota::connect_cluster(&nodes, quota)
        .await
        .unwrap()
        .with_prefix(&prefix);
    let b = RedisQuota::connect_cluster(&nodes, quota)
        .await
        .unwrap()
        .with_prefix(&prefix);
    let grants = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let start = Instant::now();
    let run_for = Duration::from_millis(1500);
    let mut tasks = Vec::new();
    for i in 0..24 {
        let q = if i % 2 == 0 { a.clone() } else { b.clone() };
        let g = grants.clone();
        let errs = errors.clone();
        tasks.push(tokio::spawn(async move {
            while start.elapsed() < run_for {
                match q.try_reserve("k", Duration::ZERO).await {
                    Ok(r) if granted(&r) => {
                        g.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    Err(e) => errs.lock().unwrap().push(chain(&*e)),
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = start.elapsed();
    let n = grants.load(Ordering::SeqCst);
    let bound = 3 + (elapsed.as_millis() / 50) as usize + 1;
    assert!(
        errors.lock().unwrap().is_empty(),
        "{:?}",
        errors.lock().unwrap()
    );
    assert!(
        n <= bound,
        "{n} grants in {elapsed:?}, quota allows {bound}"
    );
    assert!(n >= 10, "only {n} grants in {elapsed:?}");
}

/// ratelimit.md "Where it sits among other layers": under tower's `Buffer` and over
/// `ConcurrencyLimit(1)`, a kept service driven with `ready().await?.call(req)` from 8 tasks,
/// with the Redis Cluster quota and `OnStoreError::Fail`: every call ends Ok and the inner
/// service is called no faster than the quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster32_quota_under_buffer_and_concurrency_limit_from_many_tasks() {
    let Some(nodes) = shared_nodes() else { return };
    let quota = Quota::per_second(20).unwrap();
    let remote = RedisQuota::connect_cluster(&nodes, quota)
        .await
        .unwrap()
        .with_prefix(unique("buf"));
    let calls = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let c2 = calls.clone();
    let inner = tower::service_fn(move |_req: Request<()>| {
        let c = c2.clone();
        async move {
            c.lock().unwrap().push(Instant::now());
            Ok::<_, sturdy::core::BoxError>(http::Response::new(()))
        }
    });
    let svc = ServiceBuilder::new()
        .buffer(64)
        .layer(
            RateLimitLayer::new(quota)
                .with_remote(Arc::new(remote))
                .with_on_store_error(OnStoreError::Fail)
                .with_max_wait(Duration::from_secs(10)),
        )
        .concurrency_limit(1)
        .service(inner);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut s = svc.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..4 {
                let req = Request::get("http://api.example/x").body(()).unwrap();
                s.ready().await?.call(req).await?;
            }
            Ok::<_, sturdy::core::BoxError>(())
        }));
    }
    for t in tasks {
        let r = tokio::time::timeout(Duration::from_secs(20), t)
            .await
            .expect("a task hung")
            .unwrap();
        assert!(r.is_ok(), "{:?}", r.err().map(|e| chain(&*e)));
    }
    let times = calls.lock().unwrap().clone();
    assert_eq!(times.len(), 32);
    let span = times.iter().max().unwrap().duration_since(start);
    // 32 calls at one per 50 ms with a burst of 1 take at least 31 intervals.
    assert!(
        span >= Duration::from_millis(31 * 50 - 60),
        "32 calls went through in {span:?}"
    );
}

fn counting_app(store: RedisIdempotencyStore, delay: Duration) -> (Router, Arc<AtomicUsize>) {
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let router = Router::new()
        .route(
            "/orders",
            post(move |body: Bytes| {
                let r = r.clone();
                async move {
                    let n = r.fetch_add(1, Ordering::SeqCst) + 1;
                    tokio::time::sleep(delay).await;
                    (StatusCode::CREATED, format!("run {n}: {}", body.len()))
                }
            }),
        )
        .layer(IdempotencyLayer::new(store, ByCredentials::default()));
    (router, runs)
}

fn order(key: &str) -> Request<Body> {
    Request::post("/orders")
        .header("idempotency-key", key)
        .header("authorization", "Bearer c32")
        .body(Body::from("{\"amount\":1}"))
        .unwrap()
}

async fn send(app: &Router, key: &str) -> (StatusCode, http::HeaderMap, Bytes) {
    let resp = app.clone().oneshot(order(key)).await.unwrap();
    let (p, b) = resp.into_parts();
    (p.status, p.headers, b.collect().await.unwrap().to_bytes())
}

/// idempotency.md "duplicate concurrent request ... exactly one execution start, across every
/// instance sharing the store": two app instances on two cluster connections, 16 concurrent
/// requests with one key: the handler runs once, the others get 409 or the stored response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster32_idempotent_request_runs_once_across_two_cluster_instances() {
    let Some(nodes) = shared_nodes() else { return };
    let prefix = unique("idem2");
    let s1 = RedisIdempotencyStore::connect_cluster(&nodes)
        .await
        .unwrap()
        .with_prefix(&prefix);
    let s2 = RedisIdempotencyStore::connect_cluster(&nodes)
        .await
        .unwrap()
        .with_prefix(&prefix);
    let (a, ra) = counting_app(s1, Duration::from_millis(300));
    let (b, rb) = counting_app(s2, Duration::from_millis(300));
    for key in ["plain", "{tag}", "a}{b", &"k".repeat(255)] {
        let mut tasks = Vec::new();
        for i in 0..16 {
            let app = if i % 2 == 0 { a.clone() } else { b.clone() };
            let key = key.to_owned();
            tasks.push(tokio::spawn(async move { send(&app, &key).await.0 }));
        }
        let mut st = Vec::new();
        for t in tasks {
            st.push(t.await.unwrap());
        }
        assert!(
            st.iter()
                .all(|s| *s == StatusCode::CREATED || *s == StatusCode::CONFLICT),
            "{st:?}"
        );
        // Once it finished, each instance replays it.
        tokio::time::sleep(Duration::from_millis(400)).await;
        for app in [&a, &b] {
            let (s, h, body) = send(app, key).await;
            assert_eq!(s, StatusCode::CREATED, "{body:?}");
            assert_eq!(h["idempotent-replayed"], "true");
        }
    }
    assert_eq!(
        ra.load(Ordering::SeqCst) + rb.load(Ordering::SeqCst),
        4,
        "the handler ran more than once per key"
    );
}

/// idempotency.md: "`RedisIdempotencyStore::connect_cluster(nodes)` works on a Redis Cluster
/// (each operation touches one key)". Hostile keys (empty, braces, 1 MiB) and a prefix with a
/// brace: begin/complete/begin answers the stored response, and exactly one Redis key per
/// idempotency key exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster32_idempotency_store_hostile_keys_on_a_cluster() {
    let Some(nodes) = shared_nodes() else { return };
    let prefix = format!("{}{{p", unique("idemkeys"));
    let store = RedisIdempotencyStore::connect_cluster(&nodes)
        .await
        .unwrap()
        .with_prefix(&prefix);
    let big = "x{".repeat(512 * 1024);
    let keys = ["", "{", "}", "{}", "a}{b", "{x}y", big.as_str()];
    for (i, key) in keys.iter().enumerate() {
        let fp = [i as u8; 32];
        let tok = LockToken::random();
        let t0 = Instant::now();
        let b = store
            .begin(key, fp, tok, Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("key #{i}: {}", chain(&*e)));
        assert!(matches!(b, Begin::Started), "key #{i}: {b:?}");
        let resp = StoredResponse {
            status: 201,
            headers: vec![("x-k".into(), b"v".to_vec())],
            body: Bytes::from(format!("body {i}")),
        };
        store
            .complete(key, fp, tok, resp.clone(), Duration::from_secs(60))
            .await
            .unwrap();
        match store
            .begin(key, fp, LockToken::random(), Duration::from_secs(30))
            .await
            .unwrap()
        {
            Begin::Completed(r) => assert_eq!(r.body, resp.body, "key #{i}"),
            other => panic!("key #{i}: {other:?}"),
        }
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "key #{i} took {:?}",
            t0.elapsed()
        );
    }
    let found = keys_with_prefix(&nodes, &unique_prefix_glob(&prefix));
    assert_eq!(found.len(), keys.len(), "{:?}", found.len());
}

/// `--scan --pattern` treats `*?[\` as glob characters: escape them.
fn unique_prefix_glob(prefix: &str) -> String {
    let mut s = String::new();
    for c in prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            s.push('\\');
        }
        s.push(c);
    }
    s
}

/// lib.rs "Key layout": `RedisQuota` keys `<prefix>:{<key>}:tat` and `:pause` in one slot,
/// "an empty key ..., and a prefix or key with a brace in it ... get a hex tag instead". Each
/// hostile limiter key gets its pause and its decision on one node, the pair shares a slot,
/// and no two limiters share a key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster32_quota_hostile_keys_keep_each_limiter_in_one_slot() {
    let Some(nodes) = shared_nodes() else { return };
    let quota = Quota::per_second(1).unwrap();
    let prefix = unique("qkeys");
    let q = RedisQuota::connect_cluster(&nodes, quota)
        .await
        .unwrap()
        .with_prefix(&prefix);
    let big = "b".repeat(64 * 1024);
    let lkeys = [
        "",
        "{",
        "}",
        "{}",
        "}{",
        "t}:{c",
        "t",
        "{t}",
        "a b",
        big.as_str(),
    ];
    for k in &lkeys {
        let r = q.try_reserve(k, Duration::ZERO).await.unwrap();
        assert!(granted(&r), "{:?}: {r:?}", &k[..k.len().min(10)]);
        // A second at once is refused: the first decision was kept.
        let r = q.try_reserve(k, Duration::ZERO).await.unwrap();
        assert!(!granted(&r), "{:?}: {r:?}", &k[..k.len().min(10)]);
        q.try_pause(k, Duration::from_secs(30)).await.unwrap();
        let p = q.try_paused(k).await.unwrap();
        assert!(p.is_some_and(|d| d > Duration::from_secs(25)), "{p:?}");
    }
    let any = port_of(&nodes[0]);
    // Keys with a hex tag start `{x<prefix in hex>.` (what Redis holds shows it).
    let hex: String = prefix.bytes().map(|b| format!("{b:02x}")).collect();
    let mut found = keys_with_prefix(&nodes, &unique_prefix_glob(&prefix));
    found.extend(keys_with_prefix(&nodes, &format!("{{x{hex}")));
    assert_eq!(
        found.len(),
        2 * lkeys.len(),
        "each limiter has its two keys"
    );
    // Pair the keys by what comes before `:tat` / `:pause`.
    let mut by_base: HashMap<String, Vec<(u16, u16)>> = HashMap::new();
    for (port, k) in &found {
        let base = k
            .strip_suffix(":tat")
            .or_else(|| k.strip_suffix(":pause"))
            .unwrap_or_else(|| panic!("unexpected key {}", &k[..k.len().min(80)]));
        by_base
            .entry(base.to_owned())
            .or_default()
            .push((*port, keyslot(any, k)));
    }
    assert_eq!(by_base.len(), lkeys.len());
    for (base, v) in &by_base {
        assert_eq!(v.len(), 2, "{}", &base[..base.len().min(80)]);
        assert_eq!(
            v[0],
            v[1],
            "{}: keys on two slots",
            &base[..base.len().min(80)]
        );
    }
    // Pausing one limiter left the others' pause alone: clear one, the rest stay.
    assert!(q.try_clear_pause("{t}").await.unwrap().is_some());
    assert!(q.try_paused("{t}").await.unwrap().is_none());
    assert!(q.try_paused("t").await.unwrap().is_some());
}

/// RELIABILITY.md "The Redis URL, which may hold a password, is never in a message or in
/// `Debug` output"; conn.rs "The message never repeats a URL". A seed list with a password
/// (the shared cluster has none, so AUTH is refused) and an unparsable one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster32_password_never_in_errors_or_debug() {
    let Some(nodes) = shared_nodes() else { return };
    let secret = "S3cr3t-pw-c32";
    let with_pw: Vec<String> = nodes
        .iter()
        .map(|u| u.replace("redis://", &format!("redis://:{secret}@")))
        .collect();
    let bad = vec![format!("redis://:{secret}@127.0.0.1:notaport/")];
    let user_pw: Vec<String> = nodes
        .iter()
        .map(|u| u.replace("redis://", &format!("redis://admin:{secret}@")))
        .collect();
    let quota = Quota::per_second(1).unwrap();
    for seeds in [&with_pw, &bad, &user_pw] {
        let mut texts = Vec::new();
        match RedisQuota::connect_cluster(seeds, quota).await {
            Ok(q) => {
                texts.push(format!("{q:?}"));
                if let Err(e) = q.try_reserve("k", Duration::ZERO).await {
                    texts.push(format!("{} {e:?}", chain(&*e)));
                }
            }
            Err(e) => texts.push(format!("{} {e:?}", chain(&*e))),
        }
        match RedisIdempotencyStore::connect_cluster(seeds).await {
            Ok(s) => texts.push(format!("{s:?}")),
            Err(e) => texts.push(format!("{} {e:?}", chain(&*e))),
        }
        match RedisStreamQueue::connect_cluster(seeds, unique("pw")).await {
            Ok(s) => texts.push(format!("{s:?}")),
            Err(e) => texts.push(format!("{} {e:?}", chain(&*e))),
        }
        match RedisStreamConsumer::connect_cluster(
            seeds,
            unique("pw"),
            "g",
            "c",
            Duration::from_secs(5),
        )
        .await
        {
            Ok(s) => texts.push(format!("{s:?}")),
            Err(e) => texts.push(format!("{} {e:?}", chain(&*e))),
        }
        for t in &texts {
            assert!(!t.contains(secret), "the password leaked: {t}");
        }
    }
}

/// conn.rs: "one reachable node is enough, it tells where the others are"; a seed list whose
/// first node is dead connects, within 2 s, for every backend; a list of only dead nodes fails
/// within the connect bound with a `Connect` error that says Redis cannot be reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster32_seed_list_with_a_dead_node() {
    let Some(nodes) = shared_nodes() else { return };
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        drop(l);
        format!("redis://127.0.0.1:{p}/")
    };
    let seeds = vec![dead.clone(), nodes[0].clone()];
    let quota = Quota::per_second(10).unwrap();
    let t0 = Instant::now();
    let q = RedisQuota::connect_cluster(&seeds, quota).await.unwrap();
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    let q = q.with_prefix(unique("seed"));
    assert!(granted(&q.try_reserve("k", Duration::ZERO).await.unwrap()));
    let s = RedisIdempotencyStore::connect_cluster(&seeds)
        .await
        .unwrap()
        .with_prefix(unique("seed"));
    let b = s
        .begin("k", [1; 32], LockToken::random(), Duration::from_secs(5))
        .await
        .unwrap();
    assert!(matches!(b, Begin::Started));
    let stream = unique("seedstream");
    let queue = RedisStreamQueue::connect_cluster(&seeds, stream.clone())
        .await
        .unwrap();
    let mut cons =
        RedisStreamConsumer::connect_cluster(&seeds, stream, "g", "c", Duration::from_secs(5))
            .await
            .unwrap();
    let p = queue
        .push(
            WebhookEvent::new("standard", "e1", Bytes::from_static(b"{}")),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert_eq!(p, Push::Enqueued);
    let d = cons.next().await.unwrap().expect("the event");
    cons.ack(&d).await.unwrap();
}

/// RELIABILITY.md "Clear errors": `Connect` (Redis cannot be reached: the command was not
/// sent), with the message "Redis cannot be reached (down, restarting or failing over)"; conn.rs
/// `connect_cluster` "# Errors ... no node answers in time". A seed list of only dead nodes
/// (connection refused) must say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster32_all_dead_seeds_say_redis_cannot_be_reached() {
    if shared_nodes().is_none() {
        return;
    }
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        drop(l);
        format!("redis://127.0.0.1:{p}/")
    };
    let quota = Quota::per_second(10).unwrap();
    let t0 = Instant::now();
    let e = RedisQuota::connect_cluster([dead.as_str(), dead.as_str()], quota)
        .await
        .unwrap_err();
    let took = t0.elapsed();
    let text = chain(&*e);
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert!(text.contains("cannot be reached"), "{text}");
    assert_eq!(kind(&*e), Some(sturdy::core::ErrorKind::Connect), "{text}");
    // No seed at all: a clear error, not a panic.
    let none: [&str; 0] = [];
    let e = RedisIdempotencyStore::connect_cluster(none)
        .await
        .unwrap_err();
    assert!(!chain(&*e).is_empty());
}

/// webhooks.md: "Dedup and append happen in one script"; RedisStreamQueue: "of concurrent
/// pushes of one key, exactly one is `Enqueued`"; consumers of one group share the work, each
/// event going to one of them. 60 events pushed twice each from two queues (cluster
/// connections) at once; two consumers drain: each event handled once; the stream, its dedup
/// keys and its dead-letter stream share the stream's slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster32_stream_two_queues_two_consumers_each_event_once() {
    let Some(nodes) = shared_nodes() else { return };
    for stream in [unique("plain"), format!("{{{}}}", unique("tagged"))] {
        let q1 = RedisStreamQueue::connect_cluster(&nodes, stream.clone())
            .await
            .unwrap();
        let q2 = RedisStreamQueue::connect_cluster(&nodes, stream.clone())
            .await
            .unwrap();
        let c1 = RedisStreamConsumer::connect_cluster(
            &nodes,
            stream.clone(),
            "g",
            "c1",
            Duration::from_secs(30),
        )
        .await
        .unwrap()
        .with_wait(Duration::from_millis(200))
        .with_max_deliveries(1);
        let c2 = RedisStreamConsumer::connect_cluster(
            &nodes,
            stream.clone(),
            "g",
            "c2",
            Duration::from_secs(30),
        )
        .await
        .unwrap()
        .with_wait(Duration::from_millis(200));
        let mut tasks = Vec::new();
        for i in 0..60 {
            for q in [q1.clone(), q2.clone()] {
                tasks.push(tokio::spawn(async move {
                    let ev = WebhookEvent::new("standard", format!("evt_{i}"), Bytes::from("{}"));
                    q.push(ev, Duration::from_secs(600)).await.unwrap()
                }));
            }
        }
        let mut enq = 0;
        let mut dup = 0;
        for t in tasks {
            match t.await.unwrap() {
                Push::Enqueued => enq += 1,
                Push::Duplicate => dup += 1,
                Push::Full => panic!("full"),
            }
        }
        assert_eq!((enq, dup), (60, 60));
        let seen = Arc::new(Mutex::new(Vec::<String>::new()));
        let mut hs = Vec::new();
        for mut c in [c1, c2] {
            let seen = seen.clone();
            hs.push(tokio::spawn(async move {
                let mut idle = 0;
                while idle < 3 {
                    match c.next().await.unwrap() {
                        Some(d) => {
                            idle = 0;
                            assert_eq!(d.deliveries, 1);
                            seen.lock().unwrap().push(d.event.id.clone());
                            c.ack(&d).await.unwrap();
                        }
                        None => idle += 1,
                    }
                }
            }));
        }
        for h in hs {
            h.await.unwrap();
        }
        let seen = seen.lock().unwrap().clone();
        let set: HashSet<_> = seen.iter().cloned().collect();
        assert_eq!(
            seen.len(),
            60,
            "delivered {} times for 60 events",
            seen.len()
        );
        assert_eq!(set.len(), 60);
        // Layout: every key of this stream (the stream, `:seen:` keys) in the stream's slot.
        let any = port_of(&nodes[0]);
        let slot = keyslot(any, &stream);
        let base = if stream.starts_with('{') {
            stream.clone()
        } else {
            format!("{{{stream}}}")
        };
        let found = keys_with_prefix(&nodes, &unique_prefix_glob(&base));
        assert!(found.len() >= 60, "{} dedup keys found", found.len());
        for (_, k) in &found {
            assert_eq!(keyslot(any, k), slot, "{k} is not in the stream's slot");
        }
        assert!(q1.dead_letters(None, 10).await.unwrap().is_empty());
    }
}

/// webhooks.md "Poison events": after `with_max_deliveries` deliveries without an ack, an event
/// moves to the dead-letter stream `{<stream>}:dead`; listed, replayed (fresh count), discarded;
/// on a cluster, for a stream name without a hash tag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster32_dead_letters_on_a_cluster() {
    let Some(nodes) = shared_nodes() else { return };
    let stream = unique("dl");
    let queue = RedisStreamQueue::connect_cluster(&nodes, stream.clone())
        .await
        .unwrap();
    let mut c = RedisStreamConsumer::connect_cluster(
        &nodes,
        stream.clone(),
        "g",
        "c",
        Duration::from_millis(100),
    )
    .await
    .unwrap()
    .with_wait(Duration::from_millis(100))
    .with_max_deliveries(2);
    for id in ["poison", "good"] {
        let p = queue
            .push(
                WebhookEvent::new("standard", id, Bytes::from_static(b"{}")),
                Duration::from_secs(600),
            )
            .await
            .unwrap();
        assert_eq!(p, Push::Enqueued);
    }
    let mut poison = 0;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        if let Some(d) = c.next().await.unwrap() {
            if d.event.id == "poison" {
                poison += 1;
                assert!(d.deliveries <= 2, "{}", d.deliveries);
            } else {
                c.ack(&d).await.unwrap();
            }
        }
        if queue.dead_letter_count().await.unwrap() == 1 {
            break;
        }
    }
    assert_eq!(poison, 2, "delivered {poison} times with a limit of 2");
    let dead = queue.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].event.id, "poison");
    assert_eq!(dead[0].group, "g");
    // The dead-letter stream is `{<stream>}:dead`, in the stream's slot.
    let any = port_of(&nodes[0]);
    let dk = format!("{{{stream}}}:dead");
    assert_eq!(cli(any, &["-c", "EXISTS", &dk]).trim(), "1", "{dk}");
    assert_eq!(keyslot(any, &dk), keyslot(any, &stream));
    assert!(queue.replay_dead_letter(&dead[0].entry).await.unwrap());
    assert!(!queue.replay_dead_letter(&dead[0].entry).await.unwrap());
    let start = Instant::now();
    let d = loop {
        if let Some(d) = c.next().await.unwrap() {
            break d;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "replay not seen");
    };
    assert_eq!((d.event.id.as_str(), d.deliveries), ("poison", 1));
    c.dead_letter(&d, "still bad").await.unwrap();
    let dead = queue.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, "still bad");
    assert!(queue.discard_dead_letter(&dead[0].entry).await.unwrap());
    assert_eq!(queue.dead_letter_count().await.unwrap(), 0);
}

/// ratelimit.md: "A call that waited for a Redis slot and was dropped ... gives the slot back
/// (`try_release`: the next free slot moves back one interval)". On a cluster: with one call
/// per second, a second call waits for its slot and is dropped (a `tokio::time::timeout`); a
/// third process then finds the next slot about one interval away, not two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster32_dropped_waiting_call_gives_its_cluster_slot_back() {
    let Some(nodes) = shared_nodes() else { return };
    let quota = Quota::new(1, Duration::from_secs(1)).unwrap();
    let prefix = unique("drop");
    let remote = RedisQuota::connect_cluster(&nodes, quota)
        .await
        .unwrap()
        .with_prefix(&prefix);
    let observer = RedisQuota::connect_cluster(&nodes, quota)
        .await
        .unwrap()
        .with_prefix(&prefix);
    let inner = tower::service_fn(|_req: Request<()>| async {
        Ok::<_, sturdy::core::BoxError>(http::Response::new(()))
    });
    let layer = RateLimitLayer::new(quota)
        .with_remote(Arc::new(remote))
        .with_on_store_error(OnStoreError::Fail)
        .with_max_wait(Duration::from_secs(5));
    let svc = ServiceBuilder::new().layer(layer).service(inner);
    let req = || Request::get("http://api.example/x").body(()).unwrap();
    svc.clone().oneshot(req()).await.unwrap();
    let r = tokio::time::timeout(Duration::from_millis(300), svc.clone().oneshot(req())).await;
    assert!(r.is_err(), "the second call should have waited");
    // The release goes in the background.
    tokio::time::sleep(Duration::from_millis(300)).await;
    // ratelimit.md: "Keys are ... by default the URI's authority as written".
    let r = observer
        .try_reserve("api.example", Duration::from_secs(5))
        .await
        .unwrap();
    let Reserve::Granted { wait } = r else {
        panic!("{r:?}")
    };
    assert!(
        !wait.is_zero() && wait <= Duration::from_millis(700),
        "next slot {wait:?} away: the dropped call kept its slot (or the key is not shared)"
    );
}

/// idempotency.md "client gone while the store is locking the key ... if it locked the key,
/// the key is released" and "client timeout mid-handler: the handler runs to its end ... the
/// handler ran once": requests cut by a timeout at every point from 0 to ~20 ms, then retried:
/// the handler ran at most once per key, and a retry gets an answer (not 409) within 3 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster32_cancelled_idempotent_requests_hold_nothing() {
    let Some(nodes) = shared_nodes() else { return };
    let per_key = Arc::new(Mutex::new(HashMap::<String, usize>::new()));
    let pk = per_key.clone();
    // Count per key in a layer under the idempotency layer: read the header in the handler.
    let inner = Router::new()
        .route(
            "/orders",
            post(move |h: http::HeaderMap| {
                let pk = pk.clone();
                async move {
                    let k = h["idempotency-key"].to_str().unwrap().to_owned();
                    *pk.lock().unwrap().entry(k).or_default() += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    (StatusCode::CREATED, "ok")
                }
            }),
        )
        .layer(IdempotencyLayer::new(
            RedisIdempotencyStore::connect_cluster(&nodes)
                .await
                .unwrap()
                .with_prefix(unique("cancel")),
            ByCredentials::default(),
        ));
    let mut rng = Rng(0x05ee_dc32);
    for i in 0..30 {
        let key = format!("k{i}");
        let cut = Duration::from_micros(rng.below(20_000));
        let _ = tokio::time::timeout(cut, inner.clone().oneshot(order(&key))).await;
        let start = Instant::now();
        loop {
            let (s, _, body) = send(&inner, &key).await;
            if s == StatusCode::CREATED {
                break;
            }
            assert_eq!(s, StatusCode::CONFLICT, "{body:?}");
            assert!(
                start.elapsed() < Duration::from_secs(3),
                "key {key} (cut after {cut:?}) still held after {:?}",
                start.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let per_key = per_key.lock().unwrap();
    for (k, n) in per_key.iter() {
        assert_eq!(*n, 1, "{k} ran {n} times");
    }
}

/// webhooks.md: "a `next()` cancelled by a timeout or a `select!` loses nothing (an event a
/// dropped read took is delivered again after the claim delay ...)". 12 events; every `next()`
/// cut at a random point: every event is handled and acknowledged, none twice after its ack,
/// nothing dead-lettered (limit 20).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster32_cancelled_next_loses_nothing_on_a_cluster() {
    let Some(nodes) = shared_nodes() else { return };
    let stream = unique("cut");
    let queue = RedisStreamQueue::connect_cluster(&nodes, stream.clone())
        .await
        .unwrap();
    let mut c = RedisStreamConsumer::connect_cluster(
        &nodes,
        stream.clone(),
        "g",
        "c",
        Duration::from_millis(300),
    )
    .await
    .unwrap()
    .with_wait(Duration::from_millis(50))
    .with_max_deliveries(20);
    for i in 0..12 {
        queue
            .push(
                WebhookEvent::new("standard", format!("e{i}"), Bytes::from("{}")),
                Duration::from_secs(600),
            )
            .await
            .unwrap();
    }
    let mut rng = Rng(0xc32_c32);
    let mut acked = HashSet::new();
    let start = Instant::now();
    while acked.len() < 12 {
        assert!(
            start.elapsed() < Duration::from_secs(25),
            "only {} of 12 handled",
            acked.len()
        );
        let cut = Duration::from_micros(rng.below(3_000));
        if let Ok(r) = tokio::time::timeout(cut, c.next()).await {
            if let Some(d) = r.unwrap() {
                assert!(
                    acked.insert(d.event.id.clone()),
                    "{} delivered after its ack",
                    d.event.id
                );
                c.ack(&d).await.unwrap();
            }
        }
    }
    assert_eq!(queue.dead_letter_count().await.unwrap(), 0);
}
