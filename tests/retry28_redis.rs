//! `RedisIdempotencyStore` on one server and on a Redis Cluster (sturdy-redis rustdoc,
//! docs/guides/idempotency.md "Stores", RELIABILITY.md "Redis backends"): conformance, bounded
//! connects, secrets kept out of errors, a store that stalls, goes down or cannot replicate, a
//! request dropped while its Redis call is in flight, and the key layout.
//! Skipped unless STURDY_REDIS_URL (and, for the cluster, STURDY_REDIS_CLUSTER_URLS) are set.
#![cfg(feature = "full")]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use axum::body::Body;
use axum::routing::post;
use axum::Router;
use http::{Request, StatusCode};
use sturdy::core::{find, BoxError, ErrorKind};
use sturdy::idempotency::server::{
    conformance, problem, ByCredentials, IdempotencyLayer, IdempotencyStore, LockToken,
};
use sturdy::redis::{RedisConnection, RedisIdempotencyStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tower::ServiceExt;

fn redis_url() -> Option<String> {
    let u = std::env::var("STURDY_REDIS_URL").ok();
    if u.is_none() {
        eprintln!("STURDY_REDIS_URL not set: skipped");
    }
    u
}

fn cluster_urls() -> Option<Vec<String>> {
    let u = std::env::var("STURDY_REDIS_CLUSTER_URLS").ok();
    if u.is_none() {
        eprintln!("STURDY_REDIS_CLUSTER_URLS not set: skipped");
    }
    u.map(|s| s.split(',').map(str::to_owned).collect())
}

fn addr_of(url: &str) -> SocketAddr {
    let hostport = url.trim_start_matches("redis://").trim_end_matches('/');
    hostport.parse().unwrap()
}

fn unique(prefix: &str) -> String {
    format!("retry28:{prefix}:{}", LockToken::random())
}

/// A TCP proxy to Redis that can stall (stop forwarding, keep the sockets) or go down.
struct Proxy {
    addr: SocketAddr,
    stalled: watch::Sender<bool>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

async fn pump<R, W>(mut r: R, mut w: W, mut stalled: watch::Receiver<bool>)
where
    R: AsyncReadExt + Unpin,
    W: AsyncWriteExt + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        while *stalled.borrow_and_update() {
            if stalled.changed().await.is_err() {
                return;
            }
        }
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while *stalled.borrow_and_update() {
            if stalled.changed().await.is_err() {
                return;
            }
        }
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Proxy {
    async fn start(target: SocketAddr) -> Self {
        Self::start_on(target, "127.0.0.1:0".parse().unwrap()).await
    }
    async fn start_on(target: SocketAddr, on: SocketAddr) -> Self {
        let l = TcpListener::bind(on).await.unwrap();
        let addr = l.local_addr().unwrap();
        let (stalled, rx) = watch::channel(false);
        let tasks = Arc::new(Mutex::new(Vec::new()));
        let t2 = tasks.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = l.accept().await {
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                let a = tokio::spawn(pump(cr, sw, rx.clone()));
                let b = tokio::spawn(pump(sr, cw, rx.clone()));
                t2.lock().unwrap().extend([a, b]);
            }
        });
        tasks.lock().unwrap().push(accept);
        Self {
            addr,
            stalled,
            tasks,
        }
    }
    fn url(&self) -> String {
        format!("redis://{}/", self.addr)
    }
    fn stall(&self, on: bool) {
        self.stalled.send_replace(on);
    }
    /// Closes every connection and the listener: Redis is down.
    fn kill(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

type Hits = Arc<AtomicUsize>;

fn app(store: RedisIdempotencyStore) -> (Router, Hits) {
    let hits = Hits::default();
    let h = hits.clone();
    let app = Router::new()
        .route(
            "/orders",
            post(move || {
                let h = h.clone();
                async move {
                    h.fetch_add(1, Ordering::SeqCst);
                    (StatusCode::CREATED, "created")
                }
            }),
        )
        .layer(IdempotencyLayer::new(store, ByCredentials::default()));
    (app, hits)
}

fn order(key: &str) -> Request<Body> {
    Request::post("/orders")
        .header("authorization", "Bearer secret-token-QWERTY")
        .header("idempotency-key", key)
        .body(Body::from("{}"))
        .unwrap()
}

async fn send(app: &Router, key: &str) -> (StatusCode, http::HeaderMap, String) {
    let res = app.clone().oneshot(order(key)).await.unwrap();
    let (p, b) = res.into_parts();
    let b = axum::body::to_bytes(b, usize::MAX).await.unwrap();
    (
        p.status,
        p.headers,
        String::from_utf8_lossy(&b).into_owned(),
    )
}

/// Sends until the answer is not a 409 in flight, for at most `within`.
async fn send_settled(
    app: &Router,
    key: &str,
    within: Duration,
) -> (StatusCode, http::HeaderMap, String) {
    let start = Instant::now();
    loop {
        let got = send(app, key).await;
        if got.0 != StatusCode::CONFLICT || start.elapsed() > within {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn is_store_unavailable(got: &(StatusCode, http::HeaderMap, String)) {
    assert_eq!(got.0, StatusCode::SERVICE_UNAVAILABLE, "{}", got.2);
    assert_eq!(got.1["retry-after"], "1");
    let v: serde_json::Value = serde_json::from_str(&got.2).unwrap();
    assert_eq!(v["type"], problem::STORE_UNAVAILABLE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_on_one_server() {
    let Some(url) = redis_url() else { return };
    let p = unique("conf");
    let a = RedisIdempotencyStore::connect(&url)
        .await
        .unwrap()
        .with_prefix(p.clone());
    let b = RedisIdempotencyStore::connect(&url)
        .await
        .unwrap()
        .with_prefix(p);
    conformance::run(a, b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_on_a_cluster() {
    let Some(urls) = cluster_urls() else { return };
    let p = unique("cconf");
    let a = RedisIdempotencyStore::connect_cluster(urls.clone())
        .await
        .unwrap()
        .with_prefix(p.clone());
    let b = RedisIdempotencyStore::connect_cluster(urls[2..].to_vec())
        .await
        .unwrap()
        .with_prefix(p);
    conformance::run(a, b).await;
}

#[tokio::test]
async fn connection_kinds() {
    let Some(url) = redis_url() else { return };
    assert!(!RedisConnection::connect(&url).await.unwrap().is_cluster());
    assert!(RedisConnection::connect_cluster(Vec::<String>::new())
        .await
        .is_err());
    let Some(urls) = cluster_urls() else { return };
    // One reachable node is enough.
    let one = RedisConnection::connect_cluster([urls[4].clone()])
        .await
        .unwrap();
    assert!(one.is_cluster());
    let (app, hits) = app(RedisIdempotencyStore::new(one).with_prefix(unique("one-node")));
    for key in ["c-1", "c-2", "c-3", "c-4", "c-5", "c-6"] {
        assert_eq!(send(&app, key).await.0, 201);
        assert_eq!(send(&app, key).await.1["idempotent-replayed"], "true");
    }
    assert_eq!(hits.load(Ordering::SeqCst), 6);
}

#[tokio::test]
async fn passwords_never_appear_in_errors() {
    let dead = [
        "redis://:hunter2@127.0.0.1:1/",
        "redis://bob:hunter2@127.0.0.1:1/0",
        "redis://:hunter2@127.0.0.1:notaport/",
        "rediss://:hunter2@127.0.0.1:1/",
        "http://:hunter2@127.0.0.1:1/",
    ];
    for url in dead {
        let start = Instant::now();
        let err = RedisConnection::connect(url).await.unwrap_err();
        assert!(start.elapsed() < Duration::from_millis(2500), "{url}");
        let all = format!("{err} {err:?}");
        assert!(!all.contains("hunter2"), "{url}: {all}");
        let err = RedisIdempotencyStore::connect(url).await.unwrap_err();
        assert!(!format!("{err} {err:?}").contains("hunter2"));
        let err = RedisConnection::connect_cluster([url]).await.unwrap_err();
        assert!(!format!("{err} {err:?}").contains("hunter2"), "{url}");
    }
    let err = RedisConnection::connect("redis://:hunter2@127.0.0.1:1/")
        .await
        .unwrap_err();
    let kind = find::<sturdy::core::Error>(&*err).map(|e| e.kind().clone());
    assert_eq!(kind, Some(ErrorKind::Connect), "{err}");
    // A password the server refuses.
    let Some(url) = redis_url() else { return };
    let with_pw = url.replacen("redis://", "redis://:hunter2@", 1);
    match RedisIdempotencyStore::connect(&with_pw).await {
        Err(err) => {
            let all = format!("{err} {err:?}");
            assert!(!all.contains("hunter2"), "{all}");
            let kind = find::<sturdy::core::Error>(&*err).map(|e| e.kind().clone());
            assert_eq!(kind, Some(ErrorKind::Auth), "{all}");
        }
        Ok(store) => assert!(!format!("{store:?}").contains("hunter2")),
    }
}

#[tokio::test]
async fn connecting_to_a_hung_server_ends_within_two_seconds() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    let start = Instant::now();
    let err = RedisIdempotencyStore::connect(&format!("redis://{addr}/"))
        .await
        .unwrap_err();
    let took = start.elapsed();
    assert!(took < Duration::from_millis(2600), "{took:?}");
    assert!(!err.to_string().contains(&addr.port().to_string()), "{err}");
}

#[tokio::test]
async fn a_stalled_store_answers_503_and_a_later_retry_runs() {
    let Some(url) = redis_url() else { return };
    let proxy = Proxy::start(addr_of(&url)).await;
    let store = RedisIdempotencyStore::connect(&proxy.url())
        .await
        .unwrap()
        .with_prefix(unique("stall"));
    let (app, hits) = app(store);
    assert_eq!(send(&app, "warm").await.0, 201);
    proxy.stall(true);
    let start = Instant::now();
    let got = send(&app, "stalled-key").await;
    let took = start.elapsed();
    is_store_unavailable(&got);
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2000),
        "{took:?}"
    );
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    proxy.stall(false);
    // "a later retry with the same key runs normally"
    let got = send_settled(&app, "stalled-key", Duration::from_secs(3)).await;
    assert_eq!(got.0, 201, "{}", got.2);
    assert_eq!(hits.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_store_that_is_down_answers_503_without_running_the_handler() {
    let Some(url) = redis_url() else { return };
    let proxy = Proxy::start(addr_of(&url)).await;
    let store = RedisIdempotencyStore::connect(&proxy.url())
        .await
        .unwrap()
        .with_prefix(unique("down"));
    let (app, hits) = app(store);
    proxy.kill();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let start = Instant::now();
    for key in ["d1", "d2"] {
        is_store_unavailable(&send(&app, key).await);
    }
    assert!(start.elapsed() < Duration::from_millis(2600));
    assert_eq!(hits.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_request_dropped_while_begin_is_in_flight_frees_its_key() {
    let Some(url) = redis_url() else { return };
    let proxy = Proxy::start(addr_of(&url)).await;
    let store = RedisIdempotencyStore::connect(&proxy.url())
        .await
        .unwrap()
        .with_prefix(unique("dropbegin"));
    let (app, hits) = app(store);
    assert_eq!(send(&app, "warm").await.0, 201);
    proxy.stall(true);
    let a = app.clone();
    let task = tokio::spawn(async move { a.oneshot(order("dropped")).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    task.abort();
    let _ = task.await;
    proxy.stall(false);
    // The handler did not run for the dropped request; a retry runs it once, well before the
    // 30 s lease would have freed the key.
    let got = send_settled(&app, "dropped", Duration::from_secs(3)).await;
    assert_eq!(got.0, 201, "{}", got.2);
    assert!(got.1.get("idempotent-replayed").is_none());
    assert_eq!(hits.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn replication_that_cannot_be_confirmed_refuses_and_releases() {
    let Some(url) = redis_url() else { return };
    let prefix = unique("repl");
    let strict = RedisIdempotencyStore::connect(&url)
        .await
        .unwrap()
        .with_prefix(prefix.clone())
        .with_replication(1, Duration::from_millis(100));
    // The store itself says why.
    let token = LockToken::random();
    let err: BoxError = match strict
        .begin("direct", [7; 32], token, Duration::from_secs(30))
        .await
    {
        Err(e) => e,
        Ok(b) => panic!("begin without a replica succeeded: {b:?}"),
    };
    assert!(
        err.to_string()
            .contains("the write reached the Redis primary, but only 0 of the 1 replicas asked for confirmed it"),
        "{err}"
    );
    strict.release("direct", token).await.unwrap();
    // The layer answers 503 and does not run the handler.
    let (strict_app, hits) = app(strict);
    is_store_unavailable(&send(&strict_app, "repl-key").await);
    assert_eq!(hits.load(Ordering::SeqCst), 0);
    // "releases the lock in the background, so a retry runs at once": the same key through a
    // store on the same prefix that does not ask for replicas runs.
    let loose = RedisIdempotencyStore::connect(&url)
        .await
        .unwrap()
        .with_prefix(prefix);
    let (loose_app, loose_hits) = app(loose);
    let got = send_settled(&loose_app, "repl-key", Duration::from_millis(500)).await;
    assert_eq!(
        got.0, 201,
        "the lock of a refused begin was not released: {}",
        got.2
    );
    assert_eq!(loose_hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn replication_on_a_cluster_with_replicas_works() {
    let Some(urls) = cluster_urls() else { return };
    let store = RedisIdempotencyStore::connect_cluster(urls)
        .await
        .unwrap()
        .with_prefix(unique("crepl"))
        .with_replication(1, Duration::from_millis(1000));
    let (app, hits) = app(store);
    for key in ["r1", "r2", "r3", "r4"] {
        assert_eq!(send(&app, key).await.0, 201);
        let again = send(&app, key).await;
        assert_eq!(again.1["idempotent-replayed"], "true", "{}", again.2);
    }
    assert_eq!(hits.load(Ordering::SeqCst), 4);
}

/// One command over RESP; the reply's bulk strings.
pub(crate) async fn resp(addr: SocketAddr, args: &[&str]) -> Vec<Vec<u8>> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut cmd = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        cmd.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
    }
    s.write_all(&cmd).await.unwrap();
    let mut buf = Vec::new();
    loop {
        let mut chunk = [0u8; 8192];
        let n = s.read(&mut chunk).await.unwrap();
        buf.extend_from_slice(&chunk[..n]);
        if let Some(v) = parse(&buf) {
            return v;
        }
        assert!(n > 0, "connection closed");
    }
}

fn parse(b: &[u8]) -> Option<Vec<Vec<u8>>> {
    fn line(b: &[u8], at: usize) -> Option<(&[u8], usize)> {
        let end = b[at..].windows(2).position(|w| w == b"\r\n")? + at;
        Some((&b[at..end], end + 2))
    }
    fn bulk(b: &[u8], at: usize) -> Option<(Option<Vec<u8>>, usize)> {
        let (l, next) = line(b, at)?;
        let n: i64 = std::str::from_utf8(&l[1..]).ok()?.parse().ok()?;
        if n < 0 {
            return Some((None, next));
        }
        let end = next + n as usize;
        if b.len() < end + 2 {
            return None;
        }
        Some((Some(b[next..end].to_vec()), end + 2))
    }
    match b.first()? {
        b'*' => {
            let (l, mut at) = line(b, 0)?;
            let n: usize = std::str::from_utf8(&l[1..]).ok()?.parse().ok()?;
            let mut out = Vec::new();
            for _ in 0..n {
                let (v, next) = bulk(b, at)?;
                out.extend(v);
                at = next;
            }
            Some(out)
        }
        b'$' => bulk(b, 0).map(|(v, _)| v.into_iter().collect()),
        _ => line(b, 0).map(|(l, _)| vec![l.to_vec()]),
    }
}

#[tokio::test]
async fn keys_are_prefixed_hashed_and_hold_no_credential() {
    let Some(url) = redis_url() else { return };
    let prefix = unique("layout");
    let store = RedisIdempotencyStore::connect(&url)
        .await
        .unwrap()
        .with_prefix(prefix.clone());
    let (app, _) = app(store);
    assert_eq!(send(&app, "layout-key").await.0, 201);
    let keys = resp(addr_of(&url), &["KEYS", &format!("{prefix}:*")]).await;
    assert_eq!(keys.len(), 1, "{keys:?}");
    let key = String::from_utf8(keys[0].clone()).unwrap();
    assert!(key.starts_with(&format!("{prefix}:")), "{key}");
    assert!(key.ends_with(":layout-key"), "{key}");
    assert!(!key.contains("QWERTY") && !key.contains("Bearer"), "{key}");
    let value = resp(addr_of(&url), &["GET", &key]).await;
    let value = String::from_utf8_lossy(&value[0]).into_owned();
    assert!(value.starts_with("d:"), "{value}");
    assert!(!value.contains("QWERTY"), "{value}");
    let ttl = resp(addr_of(&url), &["PTTL", &key]).await;
    let ttl: i64 = String::from_utf8_lossy(&ttl[0])
        .trim_start_matches(':')
        .parse()
        .unwrap();
    // Stored 24 h.
    assert!(ttl > 86_000_000 && ttl <= 86_400_000, "{ttl}");
}

#[tokio::test]
async fn the_operation_timeout_is_the_one_set() {
    let Some(url) = redis_url() else { return };
    let proxy = Proxy::start(addr_of(&url)).await;
    let store = RedisIdempotencyStore::connect(&proxy.url())
        .await
        .unwrap()
        .with_prefix(unique("timeout"))
        .with_timeout(Duration::from_millis(150));
    let (app, hits) = app(store);
    assert_eq!(send(&app, "t-warm").await.0, 201);
    proxy.stall(true);
    let start = Instant::now();
    is_store_unavailable(&send(&app, "t-stalled").await);
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(140) && took < Duration::from_millis(600),
        "{took:?}"
    );
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    proxy.stall(false);
}

#[tokio::test]
async fn the_same_store_works_again_after_redis_comes_back() {
    let Some(url) = redis_url() else { return };
    let proxy = Proxy::start(addr_of(&url)).await;
    let at = proxy.addr;
    let store = RedisIdempotencyStore::connect(&proxy.url())
        .await
        .unwrap()
        .with_prefix(unique("back"));
    let (app, hits) = app(store);
    assert_eq!(send(&app, "b-1").await.0, 201);
    proxy.kill();
    tokio::time::sleep(Duration::from_millis(50)).await;
    is_store_unavailable(&send(&app, "b-2").await);
    let _again = Proxy::start_on(addr_of(&url), at).await;
    let start = Instant::now();
    let mut got = send(&app, "b-2").await;
    while got.0 != StatusCode::CREATED && start.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        got = send(&app, "b-2").await;
    }
    assert_eq!(got.0, 201, "no recovery within 10 s: {}", got.2);
    assert_eq!(send(&app, "b-1").await.1["idempotent-replayed"], "true");
    assert_eq!(hits.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_store_down_when_the_response_is_stored() {
    let Some(url) = redis_url() else { return };
    let proxy = Proxy::start(addr_of(&url)).await;
    let at = proxy.addr;
    let store = RedisIdempotencyStore::connect(&proxy.url())
        .await
        .unwrap()
        .with_prefix(unique("complete"))
        .with_timeout(Duration::from_millis(200));
    let runs = Hits::default();
    let r = runs.clone();
    let gate = Arc::new(tokio::sync::Notify::new());
    let g = gate.clone();
    let app = Router::new()
        .route(
            "/orders",
            post(move || {
                let (r, g) = (r.clone(), g.clone());
                async move {
                    let n = r.fetch_add(1, Ordering::SeqCst);
                    if n == 0 {
                        g.notified().await;
                    }
                    (StatusCode::CREATED, format!("run {n}"))
                }
            }),
        )
        .layer(
            IdempotencyLayer::new(store, ByCredentials::default())
                .with_lease(Duration::from_millis(900))
                .unwrap(),
        );
    let a = app.clone();
    let first = tokio::spawn(async move { send(&a, "c-1").await });
    while runs.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    proxy.kill();
    gate.notify_one();
    // "the handler's response"
    let got = tokio::time::timeout(Duration::from_secs(5), first)
        .await
        .expect("the first client never got its response")
        .unwrap();
    assert_eq!(got.0, 201);
    assert_eq!(got.2, "run 0");
    let _again = Proxy::start_on(addr_of(&url), at).await;
    // "after the lease, the handler runs again (the store never learned the outcome)"
    let start = Instant::now();
    let mut got = send(&app, "c-1").await;
    while got.0 != StatusCode::CREATED && start.elapsed() < Duration::from_secs(5) {
        assert!(got.0 == 409 || got.0 == 503, "{:?} {}", got.0, got.2);
        tokio::time::sleep(Duration::from_millis(50)).await;
        got = send(&app, "c-1").await;
    }
    assert_eq!(got.0, 201, "{}", got.2);
    assert_eq!(got.2, "run 1");
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}
