//! `RedisIdempotencyStore` under the server `IdempotencyLayer`, read from
//! docs/guides/idempotency.md ("Guarantees, per failure", "Stores"), the sturdy-redis rustdoc
//! and docs/RELIABILITY.md: two app instances on one store served over the wire, clients that
//! leave mid-handler, Redis killed, paused or cut around the handler, a cluster, hostile keys,
//! bodies and headers, and tower's layers around the app.
//! Skipped unless STURDY_REDIS_URL (STURDY_REDIS_CLUSTER_URLS for the cluster) is set; the
//! tests that kill, pause or cut Redis start their own `redis-server` or proxy.
#![cfg(feature = "full")]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;
use sturdy::idempotency::server::{
    problem, Begin, ByCredentials, IdempotencyLayer, IdempotencyStore, LockToken, StoredResponse,
};
use sturdy::redis::RedisIdempotencyStore;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt};

use crate::redis30_util::{
    client, cluster_urls, own_redis_possible, post as wire_post, problem_type, redis_url, serve,
    unique, CutProxy, Mode, OwnRedis,
};

type Runs = Arc<AtomicUsize>;

/// An app whose handler counts its runs, waits `delay`, then answers 201 `run <n>`.
fn app(store: RedisIdempotencyStore, delay: Duration) -> (Router, Runs) {
    let runs = Runs::default();
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

async fn store(url: &str, prefix: &str) -> RedisIdempotencyStore {
    RedisIdempotencyStore::connect(url)
        .await
        .unwrap()
        .with_prefix(prefix)
}

fn key_header(key: &str) -> [(&str, &str); 2] {
    [("idempotency-key", key), ("authorization", "Bearer t")]
}

/// "duplicate concurrent request ... the store's atomic lock lets exactly one execution start,
/// across every instance sharing the store"; "client timeout mid-handler ... the handler ran
/// once". Two axum apps, each with its own connection to one Redis and one prefix, served on
/// 127.0.0.1:0 and called over the wire: 16 identical requests at once, half to each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis30_two_instances_over_the_wire_run_a_key_once() {
    let Some(url) = redis_url() else { return };
    let prefix = unique("two");
    let (a, runs_a) = app(store(&url, &prefix).await, Duration::from_millis(300));
    let (b, runs_b) = app(store(&url, &prefix).await, Duration::from_millis(300));
    let (a, b) = (serve(a).await, serve(b).await);
    let c = client();
    let mut tasks = Vec::new();
    for i in 0..16 {
        let c = c.clone();
        let to = if i % 2 == 0 { a } else { b };
        tasks.push(tokio::spawn(async move {
            wire_post(&c, to, "/orders", &key_header("order-1"), "pay 10").await
        }));
    }
    let mut created = 0;
    for t in tasks {
        let (status, headers, body) = t.await.unwrap().unwrap();
        match status {
            StatusCode::CREATED => {
                created += 1;
                assert_eq!(&body[..], b"run 1: 6");
            }
            StatusCode::CONFLICT => {
                assert_eq!(problem_type(&body), problem::IN_FLIGHT);
                assert_eq!(headers["retry-after"], "1");
            }
            s => panic!("{s}: {body:?}"),
        }
    }
    assert!(created >= 1);
    let runs = runs_a.load(Ordering::SeqCst) + runs_b.load(Ordering::SeqCst);
    assert_eq!(runs, 1, "the handler ran {runs} times for one key");
    // Afterwards, either instance replays the stored response.
    for to in [a, b] {
        let (status, headers, body) =
            wire_post(&c, to, "/orders", &key_header("order-1"), "pay 10")
                .await
                .unwrap();
        assert_eq!(status, StatusCode::CREATED);
        assert_eq!(headers["idempotent-replayed"], "true");
        assert_eq!(&body[..], b"run 1: 6");
    }
}

/// "client timeout mid-handler: the handler runs to its end in its own task; its response is
/// stored ... a retry with the same key gets 409 in flight (`Retry-After: 1`) while the handler
/// runs, then the stored response ...; the handler ran once". The client gives up on instance A
/// after 100 ms; its retries go to instance B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis30_a_client_gone_mid_handler_does_not_free_the_key() {
    let Some(url) = redis_url() else { return };
    let prefix = unique("gone");
    let (a, runs_a) = app(store(&url, &prefix).await, Duration::from_millis(700));
    let (b, runs_b) = app(store(&url, &prefix).await, Duration::from_millis(700));
    let (a, b) = (serve(a).await, serve(b).await);
    let c = client();
    let cut = tokio::time::timeout(
        Duration::from_millis(100),
        wire_post(&c, a, "/orders", &key_header("k-gone"), "charge"),
    )
    .await;
    assert!(cut.is_err(), "the first attempt was meant to time out");
    let t = Instant::now();
    let mut saw_conflict = false;
    loop {
        let (status, headers, body) = wire_post(&c, b, "/orders", &key_header("k-gone"), "charge")
            .await
            .unwrap();
        match status {
            StatusCode::CONFLICT => {
                assert_eq!(problem_type(&body), problem::IN_FLIGHT);
                saw_conflict = true;
            }
            StatusCode::CREATED => {
                assert_eq!(headers["idempotent-replayed"], "true", "{body:?}");
                assert_eq!(&body[..], b"run 1: 6");
                break;
            }
            s => panic!("{s}: {body:?}"),
        }
        assert!(t.elapsed() < Duration::from_secs(5), "never stored");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(saw_conflict, "the retry during the handler should get 409");
    assert_eq!(runs_a.load(Ordering::SeqCst), 1);
    assert_eq!(runs_b.load(Ordering::SeqCst), 0);
}

/// A handler that, once it has committed, lets the test act on Redis before it answers.
fn app_with_hook(
    store: RedisIdempotencyStore,
    hook: mpsc::Sender<oneshot::Sender<()>>,
) -> (Router, Runs) {
    let runs = Runs::default();
    let r = runs.clone();
    let router = Router::new()
        .route(
            "/orders",
            post(move || {
                let r = r.clone();
                let hook = hook.clone();
                async move {
                    r.fetch_add(1, Ordering::SeqCst);
                    let (tx, rx) = oneshot::channel();
                    if hook.send(tx).await.is_ok() {
                        let _ = rx.await;
                    }
                    (StatusCode::CREATED, "charged")
                }
            }),
        )
        .layer(IdempotencyLayer::new(store, ByCredentials::default()));
    (router, runs)
}

/// "store down when the response is stored: tried 3 times (50 ms, then 100 ms apart), then a
/// small 500 marker ...; if that fails too, the key stays locked ... | the handler's response".
/// Redis is killed after the handler committed: the client gets the handler's 201, not a 503
/// or 500 that would read as "not processed", and within the bound of four operations. A retry
/// while Redis is down gets 503 store-unavailable and the handler does not run again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis30_redis_killed_after_the_commit_the_client_gets_the_handlers_response() {
    if !own_redis_possible() {
        return;
    }
    let mut redis = OwnRedis::start().await;
    let (hook, mut hooks) = mpsc::channel(4);
    let (router, runs) = app_with_hook(store(&redis.url(), "p").await, hook);
    let addr = serve(router).await;
    let c = client();
    let call = {
        let c = c.clone();
        tokio::spawn(async move { wire_post(&c, addr, "/orders", &key_header("k1"), "").await })
    };
    let go = hooks.recv().await.unwrap();
    redis.kill();
    let t = Instant::now();
    go.send(()).unwrap();
    let (status, _, body) = call.await.unwrap().unwrap();
    let took = t.elapsed();
    assert_eq!(
        (status, &body[..]),
        (StatusCode::CREATED, &b"charged"[..]),
        "the handler ran; its client must get its response"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    let (status, headers, body) = wire_post(&c, addr, "/orders", &key_header("k1"), "")
        .await
        .unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body:?}");
    assert_eq!(problem_type(&body), problem::STORE_UNAVAILABLE);
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// The same with Redis hung (`CLIENT PAUSE`) for 2.5 s after the commit: each store try waits
/// out its 1 s timeout, the client still gets the handler's response, and once Redis answers
/// again the key is not left to run the handler twice: a retry gets the stored 201 (or 409
/// while a lock is held), never a second run and never the "too large" marker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis30_redis_hung_after_the_commit_keeps_the_outcome() {
    if !own_redis_possible() {
        return;
    }
    let redis = OwnRedis::start().await;
    let (hook, mut hooks) = mpsc::channel(4);
    let (router, runs) = app_with_hook(store(&redis.url(), "p").await, hook);
    let addr = serve(router).await;
    let c = client();
    let call = {
        let c = c.clone();
        tokio::spawn(async move { wire_post(&c, addr, "/orders", &key_header("k2"), "").await })
    };
    let go = hooks.recv().await.unwrap();
    redis.pause(2500);
    let t = Instant::now();
    go.send(()).unwrap();
    let (status, _, body) = call.await.unwrap().unwrap();
    let took = t.elapsed();
    assert_eq!((status, &body[..]), (StatusCode::CREATED, &b"charged"[..]));
    assert!(took < Duration::from_secs(7), "{took:?}");
    tokio::time::sleep(Duration::from_millis(3000).saturating_sub(t.elapsed())).await;
    let t = Instant::now();
    loop {
        let (status, headers, body) = wire_post(&c, addr, "/orders", &key_header("k2"), "")
            .await
            .unwrap();
        match status {
            StatusCode::CREATED => {
                assert_eq!(&body[..], b"charged");
                assert_eq!(headers["idempotent-replayed"], "true");
                break;
            }
            StatusCode::CONFLICT => {}
            s => panic!("{s}: {:?}", String::from_utf8_lossy(&body)),
        }
        assert!(t.elapsed() < Duration::from_secs(5), "never resolved");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// "store down when the request arrives: 503 `…/idempotency-store-unavailable`, `Retry-After:
/// 1`; the handler does not run; if the store's `begin` may have locked the key before failing
/// (a timeout ...), the lock is released in the background | 503; a later retry with the same
/// key runs normally". Redis hung by `CLIENT PAUSE` when the request arrives: 503 within the
/// 1 s timeout (plus slack), and after Redis is back a retry runs without waiting for the
/// 30 s lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis30_redis_hung_at_arrival_is_503_and_the_retry_runs_soon_after() {
    if !own_redis_possible() {
        return;
    }
    let redis = OwnRedis::start().await;
    let (router, runs) = app(store(&redis.url(), "p").await, Duration::ZERO);
    let addr = serve(router).await;
    let c = client();
    // Warm the connection.
    let (s, _, _) = wire_post(&c, addr, "/orders", &key_header("warm"), "")
        .await
        .unwrap();
    assert_eq!(s, StatusCode::CREATED);
    redis.pause(2000);
    let t = Instant::now();
    let (status, headers, body) = wire_post(&c, addr, "/orders", &key_header("k3"), "x")
        .await
        .unwrap();
    assert!(
        t.elapsed() < Duration::from_millis(2500),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(problem_type(&body), problem::STORE_UNAVAILABLE);
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    tokio::time::sleep(Duration::from_millis(2200).saturating_sub(t.elapsed())).await;
    let t = Instant::now();
    let held = loop {
        let (status, _, body) = wire_post(&c, addr, "/orders", &key_header("k3"), "x")
            .await
            .unwrap();
        match status {
            StatusCode::CREATED => {
                assert_eq!(&body[..], b"run 2: 1");
                break t.elapsed();
            }
            StatusCode::CONFLICT | StatusCode::SERVICE_UNAVAILABLE => {}
            s => panic!("{s}: {body:?}"),
        }
        assert!(t.elapsed() < Duration::from_secs(40), "held past the lease");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        held < Duration::from_secs(6),
        "the key stayed held (409 in flight) for {held:?} after Redis came back"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// "a connection broken after the command was sent ... the lock is released in the
/// background": a `begin` whose connection is cut after Redis took it answers 503 and a retry
/// once the connection is back runs the handler (not a 409 until the lease ends).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis30_a_begin_cut_after_sending_is_released() {
    let Some(url) = redis_url() else { return };
    let target = crate::redis30_util::port_of(&url);
    let proxy = CutProxy::start(SocketAddr::from(([127, 0, 0, 1], target))).await;
    let (router, runs) = app(store(&proxy.url(), &unique("cut")).await, Duration::ZERO);
    let addr = serve(router).await;
    let c = client();
    let (s, _, _) = wire_post(&c, addr, "/orders", &key_header("warm"), "")
        .await
        .unwrap();
    assert_eq!(s, StatusCode::CREATED);
    proxy.set(Mode::Cut);
    let (status, _, body) = wire_post(&c, addr, "/orders", &key_header("k4"), "")
        .await
        .unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body:?}");
    assert_eq!(problem_type(&body), problem::STORE_UNAVAILABLE);
    proxy.set(Mode::Pass);
    let t = Instant::now();
    loop {
        let (status, _, body) = wire_post(&c, addr, "/orders", &key_header("k4"), "")
            .await
            .unwrap();
        if status == StatusCode::CREATED {
            assert_eq!(&body[..], b"run 2: 0");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the key stayed held: {status} {}",
            problem_type(&body)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// A stored response is kept byte for byte: a 900 KiB body of every byte value (not UTF-8) and
/// 90 headers (hyper's client reads at most 100) are replayed as they were sent, by the other instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis30_a_large_binary_response_with_many_headers_replays_exactly() {
    let Some(url) = redis_url() else { return };
    let prefix = unique("big");
    let make = |s: RedisIdempotencyStore| {
        Router::new()
            .route(
                "/orders",
                post(|| async {
                    let body: Vec<u8> = (0..900 * 1024).map(|i| (i % 256) as u8).collect();
                    let mut h = HeaderMap::new();
                    for i in 0..90 {
                        h.append(
                            http::HeaderName::try_from(format!("x-h-{}", i % 30)).unwrap(),
                            http::HeaderValue::from_bytes(format!("v{i}\u{ff}").as_bytes())
                                .unwrap(),
                        );
                    }
                    (StatusCode::CREATED, h, body)
                }),
            )
            .layer(IdempotencyLayer::new(s, ByCredentials::default()))
    };
    let a = serve(make(store(&url, &prefix).await)).await;
    let b = serve(make(store(&url, &prefix).await)).await;
    let c = client();
    let (s1, h1, b1) = wire_post(&c, a, "/orders", &key_header("big"), "")
        .await
        .unwrap();
    let (s2, h2, b2) = wire_post(&c, b, "/orders", &key_header("big"), "")
        .await
        .unwrap();
    assert_eq!((s1, s2), (StatusCode::CREATED, StatusCode::CREATED));
    assert_eq!(h2["idempotent-replayed"], "true");
    assert_eq!(b1.len(), 900 * 1024);
    assert!(b1 == b2, "the replayed body differs");
    for i in 0..30 {
        let name = format!("x-h-{i}");
        let v1: Vec<_> = h1.get_all(&name).iter().collect();
        let v2: Vec<_> = h2.get_all(&name).iter().collect();
        assert_eq!(v1.len(), 3, "{name}");
        assert_eq!(v1, v2, "{name}");
    }
}

/// Composition: the app (layer inside) under tower's `Buffer`, `Timeout` and
/// `ConcurrencyLimit(1)`, driven as a kept service from 30 tasks; 10 keys, 3 requests each. Each
/// key's handler runs once; every answer is its 201 (or a 409 while it runs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis30_under_buffer_timeout_and_limit_one_each_key_runs_once() {
    let Some(url) = redis_url() else { return };
    let (router, runs) = app(
        store(&url, &unique("compose")).await,
        Duration::from_millis(20),
    );
    let svc = ServiceBuilder::new()
        .buffer(64)
        .timeout(Duration::from_secs(10))
        .concurrency_limit(1)
        .service(router);
    let mut tasks = Vec::new();
    for i in 0..30 {
        let mut svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            let req = Request::post("/orders")
                .header("idempotency-key", format!("key-{}", i % 10))
                .body(Body::from("abc"))
                .unwrap();
            let res = svc.ready().await.unwrap().call(req).await.unwrap();
            let status = res.status();
            let body = res.into_body().collect().await.unwrap().to_bytes();
            (status, body)
        }));
    }
    for t in tasks {
        let (status, body) = t.await.unwrap();
        assert!(
            status == StatusCode::CREATED || status == StatusCode::CONFLICT,
            "{status}: {body:?}"
        );
    }
    assert_eq!(runs.load(Ordering::SeqCst), 10);
}

/// The store itself with hostile keys: empty, 64 KiB, control characters and bytes that look
/// like the store's own value layout (`i:`, `d:`) or a hash tag. Each is locked once, completed,
/// then found completed with its response; another fingerprint is a mismatch.
#[tokio::test]
async fn redis30_the_store_with_hostile_keys() {
    let Some(url) = redis_url() else { return };
    let st = store(&url, &unique("keys")).await;
    let big = "k".repeat(64 * 1024);
    let keys = [
        "",
        big.as_str(),
        "\u{0}\r\n\t\u{7f}",
        "i:00:11",
        "d:00:{}",
        "{tag}",
        "}{",
        "a:b:c",
    ];
    let fp = [7u8; 32];
    for key in keys {
        let token = LockToken::random();
        let b = st
            .begin(key, fp, token, Duration::from_secs(30))
            .await
            .unwrap();
        assert!(matches!(b, Begin::Started), "{:?}: {b:?}", key.len());
        let again = st
            .begin(key, fp, LockToken::random(), Duration::from_secs(30))
            .await
            .unwrap();
        assert!(matches!(again, Begin::InFlight), "{again:?}");
        let resp = StoredResponse {
            status: 201,
            headers: vec![("x-k".into(), b"\xff\x00v".to_vec())],
            body: Bytes::from_static(b"\x00\xff\xfe done"),
        };
        st.complete(key, fp, token, resp, Duration::from_secs(60))
            .await
            .unwrap();
        match st
            .begin(key, fp, LockToken::random(), Duration::from_secs(30))
            .await
            .unwrap()
        {
            Begin::Completed(r) => {
                assert_eq!(r.status, 201);
                assert_eq!(r.headers, vec![("x-k".into(), b"\xff\x00v".to_vec())]);
                assert_eq!(&r.body[..], b"\x00\xff\xfe done");
            }
            other => panic!("{:?}: {other:?}", key.len()),
        }
        let other = st
            .begin(key, [8u8; 32], LockToken::random(), Duration::from_secs(30))
            .await
            .unwrap();
        assert!(matches!(other, Begin::Mismatch), "{other:?}");
    }
}

/// Leases and TTLs at the edges: a zero lease and a zero TTL are not errors (at least 1 ms
/// goes to Redis); a lease and a TTL of `Duration::MAX` are about 30 years, and the key is
/// still found.
#[tokio::test]
async fn redis30_zero_and_endless_leases_and_ttls() {
    let Some(url) = redis_url() else { return };
    let st = store(&url, &unique("ttl")).await;
    let fp = [1u8; 32];
    let t = LockToken::random();
    assert!(matches!(
        st.begin("zero", fp, t, Duration::ZERO).await.unwrap(),
        Begin::Started
    ));
    tokio::time::sleep(Duration::from_millis(20)).await;
    // The lease ran out: the key is free again.
    assert!(matches!(
        st.begin("zero", fp, LockToken::random(), Duration::from_secs(5))
            .await
            .unwrap(),
        Begin::Started
    ));
    let t = LockToken::random();
    assert!(matches!(
        st.begin("max", fp, t, Duration::MAX).await.unwrap(),
        Begin::Started
    ));
    assert!(st.renew("max", fp, t, Duration::MAX).await.unwrap());
    let r = StoredResponse {
        status: 200,
        headers: vec![],
        body: Bytes::new(),
    };
    st.complete("max", fp, t, r.clone(), Duration::MAX)
        .await
        .unwrap();
    assert!(matches!(
        st.begin("max", fp, LockToken::random(), Duration::MAX)
            .await
            .unwrap(),
        Begin::Completed(_)
    ));
    let t = LockToken::random();
    st.begin("zttl", fp, t, Duration::from_secs(5))
        .await
        .unwrap();
    st.complete("zttl", fp, t, r, Duration::ZERO).await.unwrap();
}

/// Over a Redis Cluster: two instances, keys with hash-tag characters (visible ASCII, so the
/// layer takes them), each run once and replayed by the other instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis30_two_instances_on_a_cluster_with_braced_keys() {
    let Some(nodes) = cluster_urls() else { return };
    let prefix = unique("cl");
    let mk = || async {
        RedisIdempotencyStore::connect_cluster(&nodes)
            .await
            .unwrap()
            .with_prefix(prefix.clone())
    };
    let (a, runs_a) = app(mk().await, Duration::from_millis(100));
    let (b, runs_b) = app(mk().await, Duration::from_millis(100));
    let (a, b) = (serve(a).await, serve(b).await);
    let c = client();
    let keys = ["{a}", "}{", "{}", "x{y}z", "{{}}", "k}", "{k"];
    for key in keys {
        let h = key_header(key);
        let (s1, s2) = tokio::join!(
            wire_post(&c, a, "/orders", &h, "1"),
            wire_post(&c, b, "/orders", &h, "1"),
        );
        let (s1, s2) = (s1.unwrap().0, s2.unwrap().0);
        assert!(
            s1 == StatusCode::CREATED || s2 == StatusCode::CREATED,
            "{key}: {s1} {s2}"
        );
        let (s, h, _) = wire_post(&c, b, "/orders", &key_header(key), "1")
            .await
            .unwrap();
        assert_eq!(s, StatusCode::CREATED, "{key}");
        assert_eq!(h["idempotent-replayed"], "true", "{key}");
    }
    let runs = runs_a.load(Ordering::SeqCst) + runs_b.load(Ordering::SeqCst);
    assert_eq!(runs, keys.len());
}

/// "an idempotency key: 1 to 255 visible ASCII characters": 255 runs; 256, a tab inside, and a
/// byte beyond ASCII get 400 `…/idempotency-key-invalid` over the wire, and the handler does not
/// run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis30_invalid_keys_over_the_wire_are_400() {
    let Some(url) = redis_url() else { return };
    let (router, runs) = app(store(&url, &unique("inv")).await, Duration::ZERO);
    let addr = serve(router).await;
    let c = client();
    let k255 = "a".repeat(255);
    let (s, _, _) = wire_post(&c, addr, "/orders", &[("idempotency-key", &k255)], "")
        .await
        .unwrap();
    assert_eq!(s, StatusCode::CREATED);
    let k256 = "a".repeat(256);
    for bad in [k256.as_str(), "a\tb"] {
        let (s, _, body) = wire_post(&c, addr, "/orders", &[("idempotency-key", bad)], "")
            .await
            .unwrap();
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad:?}");
        assert_eq!(problem_type(&body), problem::INVALID_KEY);
    }
    // A byte beyond ASCII (not UTF-8), written on the wire by hand.
    let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    sock.write_all(
        b"POST /orders HTTP/1.1\r\nhost: x\r\nidempotency-key: k\xff\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    sock.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains(problem::INVALID_KEY), "{text}");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// `with_ttl(Duration::MAX)` and `with_lease(Duration::MAX)` on a Redis store: about 30 years
/// (CHANGELOG), never a refused command; the request runs once and is replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis30_endless_layer_ttl_and_lease_on_redis() {
    let Some(url) = redis_url() else { return };
    let runs = Runs::default();
    let r = runs.clone();
    let layer = IdempotencyLayer::new(store(&url, &unique("max")).await, ByCredentials::default())
        .with_ttl(Duration::MAX)
        .unwrap()
        .with_lease(Duration::MAX)
        .unwrap();
    let router = Router::new()
        .route(
            "/orders",
            post(move || {
                let r = r.clone();
                async move {
                    r.fetch_add(1, Ordering::SeqCst);
                    (StatusCode::CREATED, "made")
                }
            }),
        )
        .layer(layer);
    let addr = serve(router).await;
    let c = client();
    for i in 0..3 {
        let (s, h, b) = wire_post(&c, addr, "/orders", &key_header("forever"), "")
            .await
            .unwrap();
        assert_eq!((s, &b[..]), (StatusCode::CREATED, &b"made"[..]));
        assert_eq!(h.contains_key("idempotent-replayed"), i > 0);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// RELIABILITY.md, "Redis restarts without persistence: every lock and stored response is
/// gone"; the store's docs: completion acts "also on a key whose lease ran out with nobody
/// taking it over". Redis restarts (empty) while a handler runs: the handler's response still
/// reaches its client, and once stored (the key being free) a retry gets it, the handler ran once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis30_redis_restarted_mid_handler_keeps_the_outcome() {
    if !own_redis_possible() {
        return;
    }
    let mut redis = OwnRedis::start().await;
    let (hook, mut hooks) = mpsc::channel(4);
    let (router, runs) = app_with_hook(store(&redis.url(), "p").await, hook);
    let addr = serve(router).await;
    let c = client();
    let call = {
        let c = c.clone();
        tokio::spawn(async move { wire_post(&c, addr, "/orders", &key_header("k9"), "").await })
    };
    let go = hooks.recv().await.unwrap();
    redis.restart().await;
    go.send(()).unwrap();
    let (status, _, body) = call.await.unwrap().unwrap();
    assert_eq!((status, &body[..]), (StatusCode::CREATED, &b"charged"[..]));
    let t = Instant::now();
    loop {
        let (status, headers, body) = wire_post(&c, addr, "/orders", &key_header("k9"), "")
            .await
            .unwrap();
        if status == StatusCode::CREATED && headers.contains_key("idempotent-replayed") {
            assert_eq!(&body[..], b"charged");
            break;
        }
        assert!(
            status == StatusCode::CONFLICT || status == StatusCode::SERVICE_UNAVAILABLE,
            "{status}: {}",
            String::from_utf8_lossy(&body)
        );
        assert!(t.elapsed() < Duration::from_secs(5), "never stored");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}
