//! Outside round s104: client-side idempotency keys (`IdempotencyKeyLayer` in `ClientBuilder`,
//! keys given in a header and in `CallOptions`, the key a failed call reports) and the Redis
//! idempotency store on a Redis of our own (refusing a large response, stopped, frozen then
//! killed) and on the real six-node Redis Cluster at `STURDY_REDIS_CLUSTER_URLS` (`WAIT` with a
//! zero timeout, an in-flight 409 past the deadline, the largest stored response and where its
//! keys live, a kept `Buffer`ed app whose calls are dropped at seeded points, a global
//! concurrency limit inside the layer held by a client that left), and leases on paused time,
//! read against docs/guides/idempotency.md, docs/guides/retry.md, docs/RELIABILITY.md and the
//! crates' rustdoc.
//!
//! Cluster tests skip when `STURDY_REDIS_CLUSTER_URLS` is unset; every key is under a prefix
//! of this round's own (`s104...`). The Redis servers this file stops are its own, started on
//! free ports with `redis-server --save '' --appendonly no`.
#![cfg(feature = "full")]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::slot_move_util::cli;
use axum::body::Body;
use axum::Router;
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use sturdy::core::classify::delivery;
use sturdy::core::{find, CallOptions, CallReport, Delivery, ErrorKind, RateLimited};
use sturdy::idempotency::server::{
    problem, Begin, ByCredentials, IdempotencyLayer, IdempotencyStore, LockToken, MemoryStore,
};
use sturdy::redis::{RedisConnection, RedisIdempotencyStore};
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::ClientBuilder;
use tokio::time::Instant;
use tower::{Service, ServiceExt};

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
        "s104-{what}-{}-{nanos}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

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

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A redis-server of this test's own, on a free port, without persistence; killed on drop.
struct OwnRedis {
    child: Option<Child>,
    port: u16,
    extra: Vec<String>,
}

impl OwnRedis {
    async fn start(extra: &[&str]) -> Self {
        let mut r = Self {
            child: None,
            port: free_port(),
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
        };
        r.spawn().await;
        r
    }

    async fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server");
        self.child = Some(child);
        let t0 = Instant::now();
        loop {
            if cli(self.port, &["PING"]) == "PONG" {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "own redis never came up"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn replayed(&self) -> bool {
        self.headers
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true")
    }
    fn problem(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v["type"].as_str().map(str::to_owned))
            .unwrap_or_default()
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

async fn post(addr: SocketAddr, key: &str, body: &str) -> Answer {
    let req = Request::post(format!("http://{addr}/orders"))
        .header("idempotency-key", key)
        .body(Full::from(body.to_owned()))
        .unwrap();
    let res = tokio::time::timeout(
        Duration::from_secs(10),
        sturdy_chaos::http_client().request(req),
    )
    .await
    .expect("request hung")
    .expect("request failed");
    let (parts, body) = res.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(" <- ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

fn kind_of(e: &(dyn std::error::Error + 'static)) -> Option<ErrorKind> {
    find::<sturdy::core::Error>(e).map(|e| e.kind().clone())
}

fn is_uuid_v4(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && [8, 13, 18, 23].iter().all(|&i| b[i] == b'-')
        && b[14] == b'4'
        && matches!(b[19], b'8' | b'9' | b'a' | b'b')
        && s.chars()
            .filter(|c| *c != '-')
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
}

type Runs = Arc<Mutex<HashMap<String, usize>>>;

fn runs_of(runs: &Runs, body: &str) -> usize {
    runs.lock().unwrap().get(body).copied().unwrap_or(0)
}

/// `/orders`: counts runs per request body, sleeps `work`, answers 201 `run <n>: <body>`.
fn counting_app<St: IdempotencyStore + Clone>(
    layer: IdempotencyLayer<St>,
    work: Duration,
) -> (Router, Runs) {
    let runs: Runs = Arc::default();
    let counted = runs.clone();
    let app = Router::new()
        .route(
            "/orders",
            axum::routing::post(move |body: String| {
                let runs = counted.clone();
                async move {
                    let n = {
                        let mut m = runs.lock().unwrap();
                        let e = m.entry(body.clone()).or_insert(0);
                        *e += 1;
                        *e
                    };
                    tokio::time::sleep(work).await;
                    (StatusCode::CREATED, format!("run {n}: {body}"))
                }
            }),
        )
        .layer(layer);
    (app, runs)
}

// ---------------------------------------------------------------------------------------------
// A Redis of our own: a response the store refuses, a store that is down, a frozen one killed
// ---------------------------------------------------------------------------------------------

/// An app whose handler answers 201 with as many NUL bytes as the request body says.
fn nul_app(store: RedisIdempotencyStore, lease: Duration) -> (Router, Runs) {
    let runs: Runs = Arc::default();
    let counted = runs.clone();
    let app = Router::new()
        .route(
            "/orders",
            axum::routing::post(move |body: String| {
                let runs = counted.clone();
                async move {
                    *runs.lock().unwrap().entry(body.clone()).or_insert(0) += 1;
                    let n: usize = body.parse().unwrap();
                    (StatusCode::CREATED, Bytes::from(vec![0u8; n]))
                }
            }),
        )
        .layer(
            IdempotencyLayer::new(store, ByCredentials::default())
                .with_lease(lease)
                .unwrap(),
        );
    (app, runs)
}

/// A Redis started with `--proto-max-bulk-len 1mb` refuses any argument over 1 MiB (Redis
/// answers "Protocol error: invalid bulk length" and closes the connection). A 200 KiB body of
/// NUL bytes is under the layer's 1 MiB response limit, but `StoredResponse::to_json` writes
/// each NUL as `\u0000`, six bytes: 1.2 MiB, which this Redis refuses; a 100 KiB body of NULs
/// (600 KiB as JSON) fits and replays as it was.
///
/// idempotency.md: "The same holds for a response the store cannot keep ...: the first client
/// gets the response"; "the handler does not run again". Whatever became of the marker (next
/// test), a retry within the lease never runs the handler again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s104_own_redis_refusing_a_large_response_first_client_gets_it() {
    let redis = OwnRedis::start(&["--proto-max-bulk-len", "1mb"]).await;
    let store = RedisIdempotencyStore::connect(&redis.url())
        .await
        .unwrap()
        .with_prefix(unique("bulk"));
    let (app, runs) = nul_app(store, Duration::from_secs(30));
    let addr = serve(app).await;

    let small = (100 * 1024).to_string();
    let first = post(addr, "k-small", &small).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let again = post(addr, "k-small", &small).await;
    assert_eq!(
        (again.status, again.replayed(), again.body.len()),
        (StatusCode::CREATED, true, 100 * 1024),
        "a 600 KiB stored response on this Redis: {}",
        again.text()
    );

    let big = (200 * 1024).to_string();
    let t0 = Instant::now();
    let first = post(addr, "k-big", &big).await;
    assert_eq!(
        (first.status, first.body.len()),
        (StatusCode::CREATED, 200 * 1024),
        "the first client gets the handler's response"
    );
    assert!(first.body.iter().all(|b| *b == 0));
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "settling took {:?}",
        t0.elapsed()
    );
    let again = post(addr, "k-big", &big).await;
    assert!(
        matches!(again.status.as_u16(), 500 | 409),
        "{} {}",
        again.status,
        again.text()
    );
    assert_eq!(runs_of(&runs, &big), 1, "the handler ran again");
    assert_eq!(runs_of(&runs, &small), 1);
}

/// idempotency.md, "Guarantees, per failure": "store down when the response is stored | tried 3
/// times (50 ms, then 100 ms apart), then a small 500 marker is tried once in its place (a store
/// that refuses only a large response keeps it: retries get 500
/// `…/idempotency-response-too-large` and the handler does not run again)".
///
/// The Redis above refuses only the large response (the marker fits), yet about one key in
/// eight ends up locked: the third refusal closes the connection, the marker goes at once on
/// it and fails ("could not store a response; its key stays locked until its lease ends, then a
/// retry runs the handler again"), so retries get 409 for the lease (30 s) and the first retry
/// after it runs the handler a second time. Sixteen keys make a run all but sure to meet it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s104_own_redis_that_refuses_a_large_response_keeps_the_marker() {
    let redis = OwnRedis::start(&["--proto-max-bulk-len", "1mb"]).await;
    let store = RedisIdempotencyStore::connect(&redis.url())
        .await
        .unwrap()
        .with_prefix(unique("marker"));
    // A lease of 300 ms instead of 30 s, to see what the first retry after it does.
    let (app, runs) = nul_app(store, Duration::from_millis(300));
    let addr = serve(app).await;
    let big = (200 * 1024).to_string();
    let mut locked = Vec::new();
    for i in 0..16 {
        let key = format!("k-big-{i}");
        let first = post(addr, &key, &big).await;
        assert_eq!(first.status, StatusCode::CREATED);
        let again = post(addr, &key, &big).await;
        if (again.status, again.problem().as_str())
            != (
                StatusCode::INTERNAL_SERVER_ERROR,
                problem::RESPONSE_TOO_LARGE,
            )
        {
            locked.push((key, again.status, again.problem()));
        }
    }
    assert_eq!(runs_of(&runs, &big), 16);
    let mut ran_again = Vec::new();
    if !locked.is_empty() {
        tokio::time::sleep(Duration::from_millis(400)).await;
        for (key, _, _) in &locked {
            let late = post(addr, key, &big).await;
            ran_again.push((key.clone(), late.status, late.replayed()));
        }
    }
    assert!(
        locked.is_empty(),
        "keys without the marker: {locked:?}; after the lease: {ran_again:?}, handler runs {} for 16 keys",
        runs_of(&runs, &big)
    );
}

/// RELIABILITY.md, "Clear errors": `Connect` when "Redis cannot be reached" ("nothing ran"),
/// with the words "Redis cannot be reached (down, restarting or failing over)"; "The Redis URL
/// ... is never in a message"; "Connecting ends within 2 s"; "Recovery without a restart of the
/// application ... On one server, an object that was idle during the restart finds its
/// connection closed with its next command, before writing it; that command goes once more, on
/// a new connection". idempotency.md: "store down when the request arrives | 503
/// `…/idempotency-store-unavailable`, `Retry-After: 1`; the handler does not run". retry.md: "a
/// 429 or a 503 that carries a `Retry-After` ends the call as a `RateLimited` error when that
/// wait is not slept" (past the deadline), and for a POST the message carries the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s104_own_redis_down_errors_name_redis_and_the_layer_answers_503() {
    // A closed port: the connect fails at once, as Connect, without the URL.
    let closed = free_port();
    let url = format!("redis://:hunter2@127.0.0.1:{closed}/");
    let t0 = Instant::now();
    let err = RedisIdempotencyStore::connect(&url).await.unwrap_err();
    let text = chain(&*err);
    assert!(
        t0.elapsed() < Duration::from_millis(2500),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(kind_of(&*err), Some(ErrorKind::Connect), "{text}");
    assert!(text.contains("Redis"), "{text}");
    assert!(
        !text.contains("hunter2") && !text.contains("redis://"),
        "{text}"
    );
    assert!(!format!("{err:?}").contains("hunter2"));
    assert_eq!(delivery(&*err), Delivery::NotSent, "{text}");

    let mut redis = OwnRedis::start(&[]).await;
    let store = RedisIdempotencyStore::connect(&redis.url())
        .await
        .unwrap()
        .with_prefix(unique("down"));
    let (app, runs) = counting_app(
        IdempotencyLayer::new(store.clone(), ByCredentials::default()),
        Duration::ZERO,
    );
    let addr = serve(app).await;
    assert_eq!(post(addr, "k-1", "one").await.status, StatusCode::CREATED);

    redis.kill();
    // Idle a moment: a command written in the very instant the server died may have run, as
    // far as the client can tell.
    tokio::time::sleep(Duration::from_millis(100)).await;

    // The store alone: the idle connection is found closed, the command goes again and is
    // refused, so nothing ran: Connect, "Redis cannot be reached".
    let t0 = Instant::now();
    let err = store
        .begin(
            "direct",
            [7; 32],
            LockToken::random(),
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
    let text = chain(&*err);
    assert!(
        t0.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(kind_of(&*err), Some(ErrorKind::Connect), "{text}");
    assert!(text.contains("Redis cannot be reached"), "{text}");
    assert_eq!(delivery(&*err), Delivery::NotSent, "{text}");
    assert!(!text.contains(&redis.port.to_string()), "{text}");

    // The layer: 503 store-unavailable, Retry-After: 1, the handler does not run.
    let down = post(addr, "k-2", "two").await;
    assert_eq!(
        (down.status, down.problem().as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, problem::STORE_UNAVAILABLE),
        "{}",
        down.text()
    );
    assert_eq!(down.headers["retry-after"], "1");
    assert_eq!(
        down.headers["content-type"], "application/problem+json",
        "{:?}",
        down.headers
    );
    assert_eq!(runs_of(&runs, "two"), 0);

    // The client: a 503 with Retry-After: 1 it cannot sleep within its deadline.
    let client = ClientBuilder::new()
        .with_attempt_timeout(Duration::from_secs(2))
        .build(sturdy_chaos::http_client());
    let mut req = Request::post(format!("http://{addr}/orders"))
        .body(Full::from("two"))
        .unwrap();
    req.extensions_mut().insert(
        CallOptions::new()
            .with_deadline(Duration::from_millis(600))
            .with_idempotency_key("k-2"),
    );
    let err = client.oneshot(req).await.unwrap_err();
    let text = chain(&*err);
    let limited = find::<RateLimited>(&*err).expect("no RateLimited in the chain");
    assert_eq!(limited.retry_after(), Duration::from_secs(1), "{text}");
    assert!(err.to_string().contains("k-2"), "the key is not in: {err}");
    // The server answered: the call reached it, so it is never "not sent".
    assert!(!text.contains("not sent"), "{text}");
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed, "{text}");
    eprintln!("client error: {text}\n503 detail: {}", down.text());
    assert_eq!(runs_of(&runs, "two"), 0);

    // Back on the same port, without a new store: the same layer runs k-2 once.
    redis.spawn().await;
    let t0 = Instant::now();
    let back = loop {
        let a = post(addr, "k-2", "two").await;
        if a.status != StatusCode::SERVICE_UNAVAILABLE || t0.elapsed() > Duration::from_secs(5) {
            break a;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(back.status, StatusCode::CREATED, "{}", back.text());
    assert_eq!(back.text(), "run 1: two");
    let again = post(addr, "k-2", "two").await;
    assert!(again.replayed() && again.text() == "run 1: two");
}

/// RELIABILITY.md: "`Transport` (the connection broke before the answer: the command may have
/// run ...)"; "a command that was written before the connection broke is never sent twice: it
/// fails as 'may have run'"; `Connect` only when "nothing ran". A Redis that has read nothing
/// (stopped with SIGSTOP) and is then killed: the `begin` was written, so the error must not say
/// "not sent", even though the server is gone when it is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s104_own_redis_frozen_then_killed_after_the_write_is_may_have_run() {
    let mut redis = OwnRedis::start(&[]).await;
    let store = RedisIdempotencyStore::connect(&redis.url())
        .await
        .unwrap()
        .with_prefix(unique("frozen"))
        .with_timeout(Duration::from_secs(3));
    let warm = store
        .begin("warm", [1; 32], LockToken::random(), Duration::from_secs(5))
        .await
        .unwrap();
    assert!(matches!(warm, Begin::Started), "{warm:?}");
    let stopped = Command::new("kill")
        .args(["-STOP", &redis.pid().to_string()])
        .status()
        .unwrap();
    assert!(stopped.success());
    let s = store.clone();
    let t0 = Instant::now();
    let pending = tokio::spawn(async move {
        s.begin(
            "frozen",
            [2; 32],
            LockToken::random(),
            Duration::from_secs(5),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.kill();
    let err = pending.await.unwrap().unwrap_err();
    let text = chain(&*err);
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    assert_ne!(kind_of(&*err), Some(ErrorKind::Connect), "{text}");
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed, "{text}");
    assert!(text.contains("may have run"), "{text}");
}

/// RELIABILITY.md, "Recovery without a restart of the application": "On one server, an object
/// that was idle during the restart finds its connection closed with its next command, before
/// writing it; that command goes once more, on a new connection, so it works at once".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s104_own_redis_idle_through_a_restart_works_at_once() {
    let mut redis = OwnRedis::start(&[]).await;
    let store = RedisIdempotencyStore::connect(&redis.url())
        .await
        .unwrap()
        .with_prefix(unique("idle"));
    let got = store
        .begin(
            "before",
            [1; 32],
            LockToken::random(),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert!(matches!(got, Begin::Started));
    redis.kill();
    redis.spawn().await;
    for key in ["after-1", "after-2"] {
        let got = store
            .begin(key, [2; 32], LockToken::random(), Duration::from_secs(5))
            .await
            .map_err(|e| chain(&*e));
        assert!(matches!(got, Ok(Begin::Started)), "{key}: {got:?}");
    }
}

/// idempotency.md: "Redis restarts without persistence | every lock and stored response is
/// gone"; the `IdempotencyStore` contract: `renew` "locks the key again for `token` and
/// `fingerprint` if it is free"; "While the handler runs, the task renews the lock every third
/// of the lease"; "store down while the handler runs | renewal fails and is tried again every
/// third of the lease; the handler keeps running". A Redis that restarts empty while a handler
/// runs: once a renewal has reached the new server, the key is held again (a retry gets 409),
/// and the outcome is stored when the handler ends: it ran once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s104_own_redis_restarted_empty_mid_handler_renewal_takes_the_key_again() {
    let mut redis = OwnRedis::start(&[]).await;
    let store = RedisIdempotencyStore::connect(&redis.url())
        .await
        .unwrap()
        .with_prefix(unique("relock"));
    let layer = IdempotencyLayer::new(store, ByCredentials::default())
        .with_lease(Duration::from_millis(300))
        .unwrap();
    let (app, runs) = counting_app(layer, Duration::from_millis(1500));
    let addr = serve(app).await;
    let t0 = Instant::now();
    let first = tokio::spawn(async move { post(addr, "k-r", "r").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    redis.kill();
    redis.spawn().await;
    let restarted = t0.elapsed();
    // Renewals every 100 ms; give three of them after the restart.
    tokio::time::sleep(Duration::from_millis(350)).await;
    let mid = post(addr, "k-r", "r").await;
    assert!(
        t0.elapsed() < Duration::from_millis(1400),
        "too slow to test"
    );
    assert_eq!(
        (mid.status, mid.problem().as_str()),
        (StatusCode::CONFLICT, problem::IN_FLIGHT),
        "restarted at {restarted:?}: {}",
        mid.text()
    );
    let first = first.await.unwrap();
    assert_eq!(first.text(), "run 1: r");
    let again = post(addr, "k-r", "r").await;
    assert!(
        again.replayed() && again.text() == "run 1: r",
        "{} {}",
        again.status,
        again.text()
    );
    assert_eq!(runs_of(&runs, "r"), 1);
}

/// idempotency.md: "handler returns 5xx (or 408, 425, 429) | not stored (5xx configurable);
/// the key is released before the response goes out | the 5xx; a retry, even at once, runs the
/// handler again". On a Redis that closes its connection whenever it refuses a too-large
/// response (another request's), 5xx answers that settle meanwhile must still free their keys:
/// an immediate retry runs again, never 409.
///
/// Two large responses per round break the connection while four streams of 5xx requests
/// settle: every run leaves keys whose release failed ("could not release an idempotency lock;
/// it expires with its lease ... broken pipe" / "Connection reset by peer"), and their
/// immediate retries (with no 503 before) get 409 for the lease (30 s by default). A release
/// after a failed `begin` is tried again in the background (50 ms apart, doubling up to 1 s);
/// this release after a 5xx is tried once. The 5xx row does not say what a failing store does
/// to it, hence DOUBTFUL.
///
/// Resolved: such a release is now tried again in the background (as after a failed `begin`),
/// and the guide's 5xx row says a retry meanwhile gets 409 with `Retry-After`: a 409 is waited
/// out here for up to a second, as after a 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s104_own_redis_5xx_released_while_another_response_breaks_the_connection() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let redis = OwnRedis::start(&["--proto-max-bulk-len", "1mb"]).await;
    let store = RedisIdempotencyStore::connect(&redis.url())
        .await
        .unwrap()
        .with_prefix(unique("rel"));
    let runs: Runs = Arc::default();
    let counted = runs.clone();
    let app = Router::new()
        .route(
            "/orders",
            axum::routing::post(move |body: String| {
                let runs = counted.clone();
                async move {
                    *runs.lock().unwrap().entry(body.clone()).or_insert(0) += 1;
                    if body.starts_with("big-") {
                        (StatusCode::CREATED, Bytes::from(vec![0u8; 200 * 1024]))
                    } else {
                        (StatusCode::INTERNAL_SERVER_ERROR, Bytes::from("down"))
                    }
                }
            }),
        )
        .layer(IdempotencyLayer::new(store, ByCredentials::default()));
    let addr = serve(app).await;
    let mut stuck = Vec::new();
    let unavailable = Arc::new(AtomicUsize::new(0));
    for round in 0..8 {
        let bigs: Vec<_> = (0..2)
            .map(|b| {
                tokio::spawn(async move {
                    post(
                        addr,
                        &format!("kb-{round}-{b}"),
                        &format!("big-{round}-{b}"),
                    )
                    .await
                })
            })
            .collect();
        let mut streams = Vec::new();
        for stream in 0..4 {
            let runs = runs.clone();
            let unavailable = unavailable.clone();
            streams.push(tokio::spawn(async move {
                let mut stuck = Vec::new();
                for i in 0..12 {
                    let key = format!("kf-{round}-{stream}-{i}");
                    let body = format!("fail-{round}-{stream}-{i}");
                    // A begin on the broken connection is a 503 (the store failed): allowed,
                    // and the handler did not run.
                    let first = post(addr, &key, &body).await;
                    if first.status == StatusCode::SERVICE_UNAVAILABLE {
                        unavailable.fetch_add(1, Ordering::SeqCst);
                        continue;
                    }
                    assert_eq!(first.status, StatusCode::INTERNAL_SERVER_ERROR);
                    let mut again = post(addr, &key, &body).await;
                    // After a 503 whose begin may have locked the key, a 409 "for the moment
                    // the release is on its way" is allowed; wait that out (up to a second).
                    let t0 = Instant::now();
                    while again.status == StatusCode::SERVICE_UNAVAILABLE
                        || again.status == StatusCode::CONFLICT
                    {
                        unavailable.fetch_add(1, Ordering::SeqCst);
                        if t0.elapsed() > Duration::from_secs(1) {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        again = post(addr, &key, &body).await;
                    }
                    if again.status == StatusCode::CONFLICT {
                        stuck.push((key, again.status, again.problem()));
                    } else {
                        assert_eq!(
                            again.status,
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "{}",
                            again.text()
                        );
                        assert_eq!(runs_of(&runs, &body), 2);
                    }
                }
                stuck
            }));
        }
        for s in streams {
            stuck.extend(s.await.unwrap());
        }
        for b in bigs {
            b.await.unwrap();
        }
    }
    let unavailable = unavailable.load(Ordering::SeqCst);
    eprintln!("503s met on the broken connection: {unavailable}");
    assert!(stuck.is_empty(), "{} stuck: {stuck:?}", stuck.len());
}

// ---------------------------------------------------------------------------------------------
// The real Redis Cluster
// ---------------------------------------------------------------------------------------------

/// `RedisIdempotencyStore::with_replication` rustdoc: "waiting up to `timeout` for them ... fail
/// when fewer replicas confirm in time: the layer then answers 503 without running the handler
/// and releases the lock in the background, so a retry runs at once"; RELIABILITY.md: "Every
/// operation ends within its timeout \[1 s\] (plus the replication wait ...)". Redis reads
/// `WAIT n 0` as "wait forever": asked of more replicas than the cluster has (one per
/// primary), a zero timeout must still end in time, and must not wedge the connection a store
/// without replication shares.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s104_cluster_zero_replication_wait_for_missing_replicas_ends_and_wedges_nothing() {
    let Some(urls) = cluster() else { return };
    let conn = RedisConnection::connect_cluster(urls.iter()).await.unwrap();
    let prefix = format!("{{{}}}", unique("wait0"));
    let waiting = RedisIdempotencyStore::new(conn.clone())
        .with_prefix(prefix.clone())
        .with_replication(3, Duration::ZERO);
    let plain = RedisIdempotencyStore::new(conn.clone()).with_prefix(prefix.clone());

    let (app_w, runs_w) = counting_app(
        IdempotencyLayer::new(waiting, ByCredentials::default()),
        Duration::ZERO,
    );
    let (app_p, runs_p) = counting_app(
        IdempotencyLayer::new(plain.clone(), ByCredentials::default()),
        Duration::ZERO,
    );
    let addr_w = serve(app_w).await;
    let addr_p = serve(app_p).await;

    let t0 = Instant::now();
    let refused = post(addr_w, "k", "order").await;
    let took = t0.elapsed();
    assert_eq!(
        (refused.status, refused.problem().as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, problem::STORE_UNAVAILABLE),
        "{}",
        refused.text()
    );
    assert!(took < Duration::from_millis(2500), "took {took:?}");
    assert_eq!(runs_of(&runs_w, "order"), 0);

    // The shared connection still serves a store without replication, on the same slot.
    let t0 = Instant::now();
    let other = tokio::time::timeout(
        Duration::from_secs(5),
        plain.begin(
            "other",
            [3; 32],
            LockToken::random(),
            Duration::from_secs(5),
        ),
    )
    .await
    .expect("hung");
    assert!(
        matches!(other, Ok(Begin::Started)),
        "{:?} after {:?}",
        other.map_err(|e| chain(&*e)),
        t0.elapsed()
    );

    // "so a retry runs at once": the lock is released in the background.
    let t0 = Instant::now();
    let retry = loop {
        let a = post(addr_p, "k", "order").await;
        if a.status != StatusCode::CONFLICT || t0.elapsed() > Duration::from_secs(3) {
            break a;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        retry.status,
        StatusCode::CREATED,
        "after {:?}: {}",
        t0.elapsed(),
        retry.text()
    );
    assert_eq!(runs_of(&runs_p, "order"), 1);
}

/// The keys of `pattern` the replicas of the cluster hold right now (`SCAN` on each), each with
/// the first two bytes of its value and its length, as the replica has them (`READONLY`).
fn on_replicas(urls: &[String], pattern: &str) -> Vec<String> {
    let mut found = Vec::new();
    for url in urls {
        let port = port_of(url);
        if !cli(port, &["ROLE"]).starts_with("slave") {
            continue;
        }
        for key in cli(port, &["--scan", "--pattern", pattern]).lines() {
            if key.is_empty() {
                continue;
            }
            let mut child = Command::new("redis-cli")
                .args(["-p", &port.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            std::io::Write::write_all(
                child.stdin.as_mut().unwrap(),
                format!("READONLY\nGETRANGE {key} 0 1\nSTRLEN {key}\n").as_bytes(),
            )
            .unwrap();
            let out = child.wait_with_output().unwrap();
            let out = String::from_utf8_lossy(&out.stdout).replace('\n', " ");
            found.push(format!("{key} {}", out.trim()));
        }
    }
    found
}

/// `with_replication` rustdoc: "Counts a lock taken and a response stored only once `replicas`
/// replicas of the Redis primary confirmed them"; idempotency.md: "an idempotent request runs
/// only after Redis answered that its lock is taken" and the outcome "goes out only after the
/// store knows it" (`execute` docs: "The settlement is complete when this returns"). So with
/// `with_replication(1, ..)` on the cluster, the lock is on a replica when the handler starts,
/// and the stored 1 MiB response is on a replica when its client gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s104_cluster_replicated_lock_and_response_are_on_a_replica_when_seen() {
    let Some(urls) = cluster() else { return };
    let prefix = format!("{{{}}}", unique("repl"));
    let store = RedisIdempotencyStore::connect_cluster(urls.iter())
        .await
        .unwrap()
        .with_prefix(prefix.clone())
        .with_replication(1, Duration::from_millis(500));
    let pattern = format!("{prefix}:*");
    let at_start: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen = at_start.clone();
    let (urls2, pattern2) = (urls.clone(), pattern.clone());
    let app = Router::new()
        .route(
            "/orders",
            axum::routing::post(move || {
                let seen = seen.clone();
                let (urls, pattern) = (urls2.clone(), pattern2.clone());
                async move {
                    let keys = tokio::task::spawn_blocking(move || on_replicas(&urls, &pattern))
                        .await
                        .unwrap();
                    seen.lock().unwrap().extend(keys);
                    let bytes: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
                    (StatusCode::CREATED, Bytes::from(bytes))
                }
            }),
        )
        .layer(IdempotencyLayer::new(store, ByCredentials::default()));
    let addr = serve(app).await;
    let first = post(addr, "k-repl", "order").await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.text());
    let after = on_replicas(&urls, &pattern);
    let at_start = at_start.lock().unwrap().clone();
    eprintln!("at start {at_start:?}; after {after:?}");
    assert_eq!(
        at_start.len(),
        1,
        "the lock was on no replica when the handler ran"
    );
    assert!(
        at_start[0].contains(":k-repl OK i:"),
        "not a lock on the replica: {at_start:?}"
    );
    assert_eq!(after.len(), 1, "{after:?}");
    let len: usize = after[0].rsplit(' ').next().unwrap().parse().unwrap();
    assert!(
        after[0].contains(":k-repl OK d:") && len > 1024 * 1024,
        "the response is not on a replica when its client got it: {after:?}"
    );
    let again = post(addr, "k-repl", "order").await;
    assert!(again.replayed() && again.body == first.body);
}

/// retry.md: "A `Retry-After` ... on an in-flight 409 overrides the backoff ... One ... past the
/// deadline ... is not slept: ... a 409 is returned as it is (the server's answer, with a
/// `CallReport` in its extensions)"; idempotency.md: "client timeout mid-handler | ... its
/// response is stored"; CallReport: "Retry with this key (never a new one) when delivery is
/// MaybeProcessed". The report's key, sent again after the handler ended, gets the stored
/// response of the one run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s104_cluster_in_flight_409_past_the_deadline_comes_back_with_its_report() {
    let Some(urls) = cluster() else { return };
    let store = RedisIdempotencyStore::connect_cluster(urls.iter())
        .await
        .unwrap()
        .with_prefix(unique("409"));
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = runs.clone();
    let app = Router::new()
        .route(
            "/orders",
            axum::routing::post(move |headers: HeaderMap, body: String| {
                let runs = counted.clone();
                async move {
                    let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                    tokio::time::sleep(Duration::from_millis(1200)).await;
                    let key = headers["idempotency-key"].to_str().unwrap().to_owned();
                    (StatusCode::CREATED, format!("run {n} key {key}: {body}"))
                }
            }),
        )
        .layer(IdempotencyLayer::new(store, ByCredentials::default()));
    let addr = serve(app).await;
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_backoff(
            Backoff::exponential(Duration::from_millis(10), Duration::from_millis(20)).unwrap(),
        ))
        .with_attempt_timeout(Duration::from_millis(100))
        .build(sturdy_chaos::http_client());
    let mut req = Request::post(format!("http://{addr}/orders"))
        .body(Full::from("book"))
        .unwrap();
    req.extensions_mut()
        .insert(CallOptions::new().with_deadline(Duration::from_millis(700)));
    let t0 = Instant::now();
    let res = client
        .clone()
        .oneshot(req)
        .await
        .map_err(|e| chain(&*e))
        .unwrap();
    assert!(
        t0.elapsed() < Duration::from_millis(900),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(res.status(), StatusCode::CONFLICT);
    assert_eq!(res.headers()["retry-after"], "1");
    let report = res
        .extensions()
        .get::<CallReport>()
        .cloned()
        .expect("no CallReport on the returned 409");
    assert_eq!(report.delivery(), Delivery::MaybeProcessed);
    assert!(report.attempts() >= 2, "{}", report.attempts());
    let key = report.idempotency_key().expect("no key").to_owned();
    assert!(is_uuid_v4(&key), "{key}");

    tokio::time::sleep(Duration::from_millis(1300).saturating_sub(t0.elapsed())).await;
    let mut again = Request::post(format!("http://{addr}/orders"))
        .body(Full::from("book"))
        .unwrap();
    again
        .extensions_mut()
        .insert(CallOptions::new().with_idempotency_key(key.clone()));
    let res = tokio::time::timeout(Duration::from_secs(10), client.oneshot(again))
        .await
        .unwrap()
        .map_err(|e| chain(&*e))
        .unwrap();
    let status = res.status();
    let replayed = res.headers().get("idempotent-replayed").cloned();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(status, StatusCode::CREATED, "{body:?}");
    assert_eq!(replayed.as_ref().map(|v| v.as_bytes()), Some(&b"true"[..]));
    assert_eq!(body, format!("run 1 key {key}: book").as_bytes());
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// idempotency.md: "A stored response is at most 1 MiB (`with_response_limit`): a handler whose
/// response is larger has run, so it is not run again; its key replays a 500
/// `…/idempotency-response-too-large` instead"; the table: "response over the response limit
/// (1 MiB) | ... | 500 ..., also on every retry". The stored response: "status, headers ...,
/// body" with `Idempotent-Replayed: true`. sturdy-redis key layout: "`<prefix>:<scope
/// hash>:<idempotency key>` | each operation touches one key": with a hash tag in the prefix,
/// every key of the prefix lives on the one primary that owns the tag's slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s104_cluster_largest_stored_response_edges_and_where_the_keys_live() {
    let Some(urls) = cluster() else { return };
    let tag = unique("big");
    let prefix = format!("{{{tag}}}");
    let store = RedisIdempotencyStore::connect_cluster(urls.iter())
        .await
        .unwrap()
        .with_prefix(prefix.clone());
    let runs: Runs = Arc::default();
    let counted = runs.clone();
    let app = Router::new()
        .route(
            "/orders",
            axum::routing::post(move |body: String| {
                let runs = counted.clone();
                async move {
                    *runs.lock().unwrap().entry(body.clone()).or_insert(0) += 1;
                    let n: usize = body.parse().unwrap();
                    let bytes: Vec<u8> = (0..n).map(|i| (i % 256) as u8).collect();
                    Response::builder()
                        .status(StatusCode::CREATED)
                        .header("x-order", "o-1")
                        .body(Body::from(bytes))
                        .unwrap()
                }
            }),
        )
        .layer(IdempotencyLayer::new(store, ByCredentials::default()));
    let addr = serve(app).await;

    let exact = (1024 * 1024).to_string();
    let first = post(addr, "k-exact", &exact).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let again = post(addr, "k-exact", &exact).await;
    assert_eq!(
        (again.status, again.replayed(), again.body.len()),
        (StatusCode::CREATED, true, 1024 * 1024),
        "{}",
        again.problem()
    );
    assert_eq!(again.body, first.body, "the replayed bytes differ");
    assert_eq!(again.headers["x-order"], "o-1");

    let over = (1024 * 1024 + 1).to_string();
    let first = post(addr, "k-over", &over).await;
    let again = post(addr, "k-over", &over).await;
    assert_eq!(
        (again.status, again.problem().as_str()),
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            problem::RESPONSE_TOO_LARGE
        ),
        "{}",
        again.text()
    );
    assert_eq!(runs_of(&runs, &over), 1);
    assert_eq!(runs_of(&runs, &exact), 1);
    assert!(
        first.status == StatusCode::INTERNAL_SERVER_ERROR
            || (first.status == StatusCode::CREATED && first.body.len() == 1024 * 1024 + 1),
        "the first client got {} with {} bytes",
        first.status,
        first.body.len()
    );

    // Where the keys live: every key of the prefix on the primary that owns the tag's slot.
    let seed = port_of(&urls[0]);
    let slot = cli(seed, &["CLUSTER", "KEYSLOT", &tag]);
    let mut found: Vec<(u16, String)> = Vec::new();
    for url in &urls {
        let port = port_of(url);
        if !cli(port, &["ROLE"]).starts_with("master") {
            continue;
        }
        for key in cli(port, &["--scan", "--pattern", &format!("{prefix}:*")]).lines() {
            if !key.is_empty() {
                found.push((port, key.to_owned()));
            }
        }
    }
    assert_eq!(found.len(), 2, "{found:?}");
    assert_eq!(
        found[0].0, found[1].0,
        "the keys are on two primaries: {found:?}"
    );
    for (port, key) in &found {
        assert_eq!(cli(*port, &["CLUSTER", "KEYSLOT", key]), slot);
        let rest = key.strip_prefix(&format!("{prefix}:")).unwrap();
        let (hash, k) = rest.split_once(':').unwrap();
        assert!(
            hash.len() >= 32 && hash.chars().all(|c| c.is_ascii_hexdigit()),
            "{key}"
        );
        assert!(k == "k-exact" || k == "k-over", "{key}");
    }
}

/// idempotency.md: "client gone while the store is locking the key (before the handler starts)
/// | the handler does not run; the store's answer is awaited in the background and, if it locked
/// the key, the key is released"; "client timeout mid-handler | the handler runs to its end in
/// its own task; its response is stored"; `wait_idle`: "Resolves once no keyed request is
/// running", counting "the background releases of keys whose request went away before its
/// handler ran"; "A concurrency limit outside this layer stops counting a request when its
/// client leaves". README: "any layer alone ... can sit under a `Buffer` ..., driven by ... a
/// kept `ready().await?.call(req)`". So after `wait_idle`, a retry is never 409, and the handler has
/// run at most once per key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s104_cluster_kept_buffered_app_dropped_at_seeded_points_holds_no_key() {
    let Some(urls) = cluster() else { return };
    let store = RedisIdempotencyStore::connect_cluster(urls.iter())
        .await
        .unwrap()
        .with_prefix(unique("drops"));
    let layer = IdempotencyLayer::new(store, ByCredentials::default());
    let (app, runs) = counting_app(layer.clone(), Duration::from_millis(20));
    // A concurrency limit of one outside the layer: it stops counting a request when its
    // client leaves (idempotency.md), so a dropped call never wedges the kept service.
    let mut svc = tower::buffer::Buffer::new(tower::limit::ConcurrencyLimit::new(app, 1), 16);
    let mut rng = Rng::new(104);
    let order = |key: &str, body: &str| {
        Request::post("/orders")
            .header("idempotency-key", key)
            .body(Body::from(body.to_owned()))
            .unwrap()
    };
    let mut kinds = HashMap::new();
    for i in 0..24 {
        let key = format!("key-{i}");
        let body = format!("b{i}");
        // Half the cuts in the first 800 µs (while the store locks the key), half in 30 ms.
        let cut = Duration::from_micros(if i % 2 == 0 {
            rng.below(800)
        } else {
            rng.below(30_000)
        });
        let call = async {
            let ready = svc.ready().await?;
            ready.call(order(&key, &body)).await
        };
        let _ = tokio::time::timeout(cut, call).await;
        tokio::time::timeout(Duration::from_secs(5), layer.wait_idle())
            .await
            .expect("wait_idle never resolved");
        assert_eq!(layer.running(), 0);
        let before = runs_of(&runs, &body);
        let res = svc
            .ready()
            .await
            .unwrap()
            .call(order(&key, &body))
            .await
            .unwrap();
        let status = res.status();
        let replayed = res.headers().contains_key("idempotent-replayed");
        let text = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            status,
            StatusCode::CREATED,
            "key {i} cut after {cut:?}: {text:?}"
        );
        assert_eq!(runs_of(&runs, &body), 1, "key {i} cut after {cut:?}");
        assert_eq!(text, format!("run 1: {body}").as_bytes());
        *kinds.entry((before, replayed)).or_insert(0) += 1;
    }
    // Where the seeded cuts fell (real time: before the handler ran, or during it).
    eprintln!("(runs before the retry, replayed): {kinds:?}");
    layer.wait_idle().await;
}

/// idempotency.md: "to bound the handlers that run, including those [whose client left], put
/// the limit inside this layer (in axum, `.layer(GlobalConcurrencyLimitLayer::new(n))` before
/// `.layer(idempotency)`): the permit that the limit's `poll_ready` took goes with the execution
/// and is returned when the handler ends". Over the wire, on the cluster store: a client that
/// leaves mid-handler keeps the one permit until its handler ends; the next request's handler
/// starts after it; the first key's retry gets the stored response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s104_cluster_limit_inside_is_held_by_a_client_that_left() {
    let Some(urls) = cluster() else { return };
    let store = RedisIdempotencyStore::connect_cluster(urls.iter())
        .await
        .unwrap()
        .with_prefix(unique("limit"));
    let log: Arc<Mutex<Vec<String>>> = Arc::default();
    let logged = log.clone();
    let app = Router::new()
        .route(
            "/orders",
            axum::routing::post(move |body: String| {
                let log = logged.clone();
                async move {
                    log.lock().unwrap().push(format!("start {body}"));
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    log.lock().unwrap().push(format!("end {body}"));
                    (StatusCode::CREATED, body)
                }
            }),
        )
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(1))
        .layer(IdempotencyLayer::new(store, ByCredentials::default()));
    let addr = serve(app).await;

    let gone = tokio::time::timeout(Duration::from_millis(60), post(addr, "k-a", "a")).await;
    assert!(
        gone.is_err(),
        "the first request ended before its client left"
    );
    let b = post(addr, "k-b", "b").await;
    assert_eq!((b.status, b.text().as_str()), (StatusCode::CREATED, "b"));
    let a = post(addr, "k-a", "a").await;
    assert_eq!(
        (a.status, a.replayed(), a.text().as_str()),
        (StatusCode::CREATED, true, "a")
    );
    assert_eq!(
        log.lock().unwrap().clone(),
        ["start a", "end a", "start b", "end b"]
    );
}

// ---------------------------------------------------------------------------------------------
// Client-side keys
// ---------------------------------------------------------------------------------------------

type Seen = Arc<Mutex<Vec<Vec<Vec<u8>>>>>;

/// An in-process API recording every attempt's `Idempotency-Key` values; it fails the first
/// `fails` attempts with a reset connection, then answers 201.
fn api(
    fails: usize,
) -> (
    tower::util::BoxCloneSyncService<Request<Full<Bytes>>, Response<Full<Bytes>>, std::io::Error>,
    Seen,
) {
    let seen: Seen = Arc::default();
    let log = seen.clone();
    let n = Arc::new(AtomicUsize::new(0));
    let svc = tower::service_fn(move |req: Request<Full<Bytes>>| {
        let log = log.clone();
        let n = n.clone();
        async move {
            log.lock().unwrap().push(
                req.headers()
                    .get_all("idempotency-key")
                    .iter()
                    .map(|v| v.as_bytes().to_vec())
                    .collect(),
            );
            if n.fetch_add(1, Ordering::SeqCst) < fails {
                Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "connection reset by peer",
                ))
            } else {
                Ok(Response::builder()
                    .status(StatusCode::CREATED)
                    .body(Full::from("ok"))
                    .unwrap())
            }
        }
    });
    (tower::util::BoxCloneSyncService::new(svc), seen)
}

/// idempotency.md: "A key you set yourself is kept: put it in the `Idempotency-Key` header ...
/// or give it for one request with `CallOptions::with_idempotency_key`"; "two or more different
/// key headers on one request" are a 400 at sturdy's own server. A request with both: every
/// attempt must carry exactly one key, the same one, and the failed call must report the key
/// that was sent.
#[tokio::test(start_paused = true)]
async fn s104_header_key_and_options_key_together_send_exactly_one() {
    for (header, option) in [("h-1", "o-1"), ("h-2", ""), ("h-3", "a\r\nb")] {
        let (http, seen) = api(usize::MAX);
        let client = ClientBuilder::new().build(http);
        let mut req = Request::post("http://api.example.com/orders")
            .header("idempotency-key", header)
            .body(Full::from("x"))
            .unwrap();
        req.extensions_mut()
            .insert(CallOptions::new().with_idempotency_key(option));
        let err = client.oneshot(req).await.unwrap_err();
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 4, "{header}/{option:?}: {seen:?}");
        assert!(
            seen.iter().all(|keys| keys.len() == 1 && keys == &seen[0]),
            "{header}/{option:?}: {seen:?}"
        );
        let sent = String::from_utf8(seen[0][0].clone()).unwrap();
        eprintln!("header {header:?} + options {option:?}: sent {sent:?}");
        let e = err.downcast_ref::<sturdy::core::Error>().unwrap();
        assert_eq!(e.idempotency_key(), Some(sent.as_str()), "{err}");
        assert!(err.to_string().contains(&sent), "{err}");
    }
}

/// The same through the retry and the key per logical call: after one call with a header key
/// and one with an options key, a third plain POST gets a fresh UUID v4, and none of the three
/// shares a key with another.
#[tokio::test(start_paused = true)]
async fn s104_given_keys_never_leak_into_the_next_call_of_a_kept_client() {
    let (http, seen) = api(0);
    let mut client = tower::buffer::Buffer::new(ClientBuilder::new().build(http), 4);
    let mut with_header = Request::post("http://api.example.com/orders")
        .header("idempotency-key", "mine-1")
        .body(Full::from("x"))
        .unwrap();
    with_header
        .extensions_mut()
        .insert(CallOptions::new().with_max_attempts(2));
    let mut with_option = Request::post("http://api.example.com/orders")
        .body(Full::from("x"))
        .unwrap();
    with_option
        .extensions_mut()
        .insert(CallOptions::new().with_idempotency_key("mine-2"));
    let plain = Request::post("http://api.example.com/orders")
        .body(Full::from("x"))
        .unwrap();
    for req in [with_header, with_option, plain] {
        let res = client.ready().await.unwrap().call(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::CREATED);
    }
    let seen = seen.lock().unwrap().clone();
    let keys: Vec<String> = seen
        .iter()
        .map(|k| {
            assert_eq!(k.len(), 1, "{seen:?}");
            String::from_utf8(k[0].clone()).unwrap()
        })
        .collect();
    assert_eq!(keys[0], "mine-1");
    assert_eq!(keys[1], "mine-2");
    assert!(is_uuid_v4(&keys[2]), "{keys:?}");
}

/// retry.md: "`report()` gives ... whether any attempt may have been processed"; "for a POST
/// or PATCH the message says ... `...; the request was not sent, so it is safe to send again`
/// only when no attempt could have reached the server, otherwise `...; it may have been
/// processed: retry with the same idempotency key <key>`"; "its `kind()` is the last
/// attempt's". A first attempt that reached a server and timed out, then attempts refused (the
/// server is gone): the call may have been processed, whatever the last attempt was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s104_timeout_then_refused_still_says_may_have_been_processed() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let holder = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        drop(listener);
        tokio::time::sleep(Duration::from_secs(3)).await;
        drop(stream);
    });
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_backoff(
            Backoff::exponential(Duration::from_millis(10), Duration::from_millis(20)).unwrap(),
        ))
        .with_attempt_timeout(Duration::from_millis(150))
        .build(sturdy_chaos::http_client());
    let mut req = Request::post(format!("http://{addr}/orders"))
        .body(Full::from("x"))
        .unwrap();
    req.extensions_mut()
        .insert(CallOptions::new().with_max_attempts(3));
    let err = tokio::time::timeout(Duration::from_secs(5), client.clone().oneshot(req))
        .await
        .unwrap()
        .unwrap_err();
    let text = err.to_string();
    let e = err.downcast_ref::<sturdy::core::Error>().unwrap();
    let key = e.idempotency_key().expect("no key").to_owned();
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed, "{text}");
    assert_eq!(
        e.report().map(CallReport::delivery),
        Some(Delivery::MaybeProcessed)
    );
    assert!(
        text.contains(&format!(
            "it may have been processed: retry with the same idempotency key {key}"
        )),
        "{text}"
    );
    assert!(!text.contains("not sent"), "{text}");
    assert_eq!(e.kind(), &ErrorKind::Connect, "{text}");
    holder.abort();

    // Every attempt refused: not sent, safe to send again.
    let closed = free_port();
    let mut req = Request::post(format!("http://127.0.0.1:{closed}/orders"))
        .body(Full::from("x"))
        .unwrap();
    req.extensions_mut()
        .insert(CallOptions::new().with_max_attempts(2));
    let err = client.oneshot(req).await.unwrap_err();
    let text = err.to_string();
    assert_eq!(delivery(&*err), Delivery::NotSent, "{text}");
    assert!(
        text.contains("the request was not sent, so it is safe to send again"),
        "{text}"
    );
    assert!(!text.contains("may have been processed"), "{text}");
}

/// idempotency.md: a `CallOptions` key goes as a digest "when it is empty, holds control
/// characters ..., or begins or ends with a space or a tab"; otherwise as it is ("so keep keys
/// to visible ASCII"); the server answers 400 `…/idempotency-key-invalid` to "a key that is not
/// 1 to 255 visible ASCII characters"; retry.md: 400 is never retried. Over the wire to a
/// sturdy server: a key with a space inside is sent as it is and refused once; a key of 256
/// characters likewise; an empty one and one with a tab inside go as a digest the server takes,
/// the same digest on a second call, which is replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s104_options_keys_over_the_wire_to_a_sturdy_server() {
    let layer = IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default());
    let seen: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let log = seen.clone();
    let (app, runs) = counting_app(layer, Duration::ZERO);
    let app = app.layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| {
            let log = log.clone();
            async move {
                if let Some(k) = req.headers().get("idempotency-key") {
                    log.lock().unwrap().push(k.as_bytes().to_vec());
                }
                next.run(req).await
            }
        },
    ));
    let addr = serve(app).await;
    let client = ClientBuilder::new()
        .with_attempt_timeout(Duration::from_secs(2))
        .build(sturdy_chaos::http_client());
    let call = |key: String, body: &'static str| {
        let client = client.clone();
        async move {
            let mut req = Request::post(format!("http://{addr}/orders"))
                .body(Full::from(body))
                .unwrap();
            req.extensions_mut()
                .insert(CallOptions::new().with_idempotency_key(key));
            let res = client.oneshot(req).await.unwrap();
            let status = res.status();
            let replayed = res.headers().contains_key("idempotent-replayed");
            let body = res.into_body().collect().await.unwrap().to_bytes();
            (status, replayed, body)
        }
    };
    for (key, body) in [("a b".to_owned(), "space"), ("k".repeat(256), "long")] {
        let (status, _, text) = call(key.clone(), body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{text:?}");
        let ty = serde_json::from_slice::<serde_json::Value>(&text).unwrap()["type"].clone();
        assert_eq!(ty, problem::INVALID_KEY);
        let sent = seen.lock().unwrap().drain(..).collect::<Vec<_>>();
        assert_eq!(sent, vec![key.into_bytes()], "sent once, as it is");
        assert_eq!(runs_of(&runs, body), 0);
    }
    let ok255 = "k".repeat(255);
    for (key, body) in [
        (String::new(), "empty"),
        ("a\tb".to_owned(), "tab"),
        (ok255.clone(), "k255"),
    ] {
        let first = call(key.clone(), body).await;
        let second = call(key.clone(), body).await;
        assert_eq!((first.0, first.1), (StatusCode::CREATED, false), "{key:?}");
        assert_eq!((second.0, second.1), (StatusCode::CREATED, true), "{key:?}");
        let sent = seen.lock().unwrap().drain(..).collect::<Vec<_>>();
        assert_eq!(sent.len(), 2);
        assert_eq!(sent[0], sent[1]);
        let sent = String::from_utf8(sent[0].clone()).unwrap();
        if key == ok255 {
            assert_eq!(sent, ok255);
        } else {
            let hex = sent.strip_prefix("sturdy-sha256-").expect(&sent);
            assert!(
                hex.len() == 64
                    && hex
                        .chars()
                        .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)),
                "{sent}"
            );
        }
        assert_eq!(runs_of(&runs, body), 1);
    }
}

/// idempotency.md: "store down when the request arrives | ... | 503; a later retry with the same
/// key runs normally once the store answers again"; retry.md: a 503's `Retry-After` "overrides
/// the backoff: never sooner than asked". A kept `ClientBuilder` client (under `Buffer`, driven
/// by `ready().await?.call(req)`) whose first attempt meets a stopped Redis, which comes back
/// meanwhile: the call ends 201 after about a second, and the handler ran once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s104_client_rides_out_a_store_outage_with_retry_after() {
    let mut redis = OwnRedis::start(&[]).await;
    let store = RedisIdempotencyStore::connect(&redis.url())
        .await
        .unwrap()
        .with_prefix(unique("ride"));
    let (app, runs) = counting_app(
        IdempotencyLayer::new(store, ByCredentials::default()),
        Duration::ZERO,
    );
    let addr = serve(app).await;
    redis.kill();
    let mut client = tower::buffer::Buffer::new(
        ClientBuilder::new()
            .with_attempt_timeout(Duration::from_secs(2))
            .build(sturdy_chaos::http_client()),
        4,
    );
    let mut req = Request::post(format!("http://{addr}/orders"))
        .body(Full::from("ride"))
        .unwrap();
    req.extensions_mut()
        .insert(CallOptions::new().with_deadline(Duration::from_secs(4)));
    let t0 = Instant::now();
    let call = client.ready().await.unwrap().call(req);
    let restart = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        redis.spawn().await;
    };
    let (res, ()) = tokio::join!(call, restart);
    let res = res.map_err(|e| chain(&*e)).unwrap();
    let took = t0.elapsed();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_millis(2500),
        "{took:?}"
    );
    assert_eq!(runs_of(&runs, "ride"), 1);
}

/// idempotency.md: "duplicate concurrent request (same client, same key, same payload) | the
/// store's atomic lock lets exactly one execution start, across every instance sharing the
/// store | the others get 409 ... with `Retry-After: 1`"; "When the server answers 409 with
/// `Retry-After` to a request that carries a key ..., the retry layer waits and asks again, so
/// the caller gets the stored response." Sixteen `ClientBuilder` calls with one `CallOptions`
/// key, spread over two server instances on the cluster: all sixteen get 201 with the one run's
/// body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s104_cluster_sixteen_clients_one_key_two_instances_one_run() {
    let Some(urls) = cluster() else { return };
    let prefix = unique("sixteen");
    let mut addrs = Vec::new();
    let mut all_runs = Vec::new();
    for _ in 0..2 {
        let store = RedisIdempotencyStore::connect_cluster(urls.iter())
            .await
            .unwrap()
            .with_prefix(prefix.clone());
        let (app, runs) = counting_app(
            IdempotencyLayer::new(store, ByCredentials::default()),
            Duration::from_millis(300),
        );
        addrs.push(serve(app).await);
        all_runs.push(runs);
    }
    let client = ClientBuilder::new()
        .with_attempt_timeout(Duration::from_secs(2))
        .build(sturdy_chaos::http_client());
    let mut calls = Vec::new();
    for i in 0..16 {
        let mut req = Request::post(format!("http://{}/orders", addrs[i % 2]))
            .body(Full::from("same"))
            .unwrap();
        req.extensions_mut().insert(
            CallOptions::new()
                .with_idempotency_key("s104-one-key")
                .with_deadline(Duration::from_secs(4)),
        );
        let client = client.clone();
        calls.push(tokio::spawn(async move {
            let res = client.oneshot(req).await.map_err(|e| chain(&*e))?;
            let status = res.status();
            let body = res.into_body().collect().await.unwrap().to_bytes();
            Ok::<_, String>((status, body))
        }));
    }
    for c in calls {
        let (status, body) = c.await.unwrap().unwrap();
        assert_eq!(
            (status, &body[..]),
            (StatusCode::CREATED, &b"run 1: same"[..])
        );
    }
    let total: usize = all_runs.iter().map(|r| runs_of(r, "same")).sum();
    assert_eq!(total, 1);
}

/// retry.md: "POST, PATCH ... are retried only when they carry an `Idempotency-Key` header ...
/// or when the failure proves the request never left"; "`.with_idempotency_key(k)` (read by
/// `IdempotencyKeyLayer`)"; `CallReport::idempotency_key`: "The idempotency key every attempt
/// carried". Without the key layer (`without_idempotency`, or a `RetryLayer` alone), a key in
/// `CallOptions` is never on the wire: the POST must not be retried after a reset (it may have
/// been processed), and the error must not tell the caller to retry "with the same idempotency
/// key" the server never saw.
#[tokio::test(start_paused = true)]
async fn s104_options_key_without_the_key_layer_is_neither_sent_nor_reported() {
    let (http, seen) = api(usize::MAX);
    let builder = ClientBuilder::new().without_idempotency().build(http);
    let (http2, seen2) = api(usize::MAX);
    let alone = tower::ServiceBuilder::new()
        .layer(RetryLayer::new())
        .service(http2);
    let mut req = Request::post("http://api.example.com/orders")
        .body(Full::from("x"))
        .unwrap();
    req.extensions_mut()
        .insert(CallOptions::new().with_idempotency_key("k-unsent"));
    let mut req2 = Request::post("http://api.example.com/orders")
        .body(Full::from("x"))
        .unwrap();
    req2.extensions_mut()
        .insert(CallOptions::new().with_idempotency_key("k-unsent"));
    let errs = [
        ("builder", builder.oneshot(req).await.unwrap_err(), seen),
        ("retry alone", alone.oneshot(req2).await.unwrap_err(), seen2),
    ];
    for (what, err, seen) in errs {
        let seen = seen.lock().unwrap().clone();
        assert!(
            seen.iter().all(Vec::is_empty),
            "{what}: a key was sent: {seen:?}"
        );
        assert_eq!(seen.len(), 1, "{what}: a keyless POST was retried: {err}");
        let text = err.to_string();
        assert!(!text.contains("k-unsent"), "{what}: {text}");
        if let Some(e) = err.downcast_ref::<sturdy::core::Error>() {
            assert_eq!(e.idempotency_key(), None, "{what}: {text}");
        }
        assert_eq!(delivery(&*err), Delivery::MaybeProcessed, "{what}: {text}");
    }
}

// ---------------------------------------------------------------------------------------------
// Leases on paused time
// ---------------------------------------------------------------------------------------------

/// `with_lease` rustdoc: "A lease of 1 ms or 2 ms is read as 3 ms"; module docs: "While it
/// runs, its lock is renewed every third of its lease"; "if its client goes away ..., the
/// handler still runs to its end and its response is stored". On paused time: a 10 s handler
/// under a 1 ms lease keeps its key the whole time (409 at 5 s and at 9.99 s), also after its
/// caller was aborted, then replays; a `MemoryStore` lock never renewed is free exactly at the
/// end of its lease.
#[tokio::test(start_paused = true)]
async fn s104_memory_one_ms_lease_renewed_through_a_ten_second_handler() {
    let store = MemoryStore::default();
    let layer = IdempotencyLayer::new(store.clone(), ByCredentials::default())
        .with_lease(Duration::from_millis(1))
        .unwrap();
    let (app, runs) = counting_app(layer.clone(), Duration::from_secs(10));
    let order = || {
        Request::post("/orders")
            .header("idempotency-key", "k-lease")
            .body(Body::from("slow"))
            .unwrap()
    };
    let t0 = Instant::now();
    let first = tokio::spawn(app.clone().oneshot(order()));
    tokio::time::sleep(Duration::from_millis(10)).await;
    first.abort();
    for at in [Duration::from_secs(5), Duration::from_millis(9_990)] {
        tokio::time::sleep_until(t0 + at).await;
        let res = app.clone().oneshot(order()).await.unwrap();
        assert_eq!(res.status(), StatusCode::CONFLICT, "at {at:?}");
        assert_eq!(res.headers()["retry-after"], "1");
    }
    tokio::time::sleep_until(t0 + Duration::from_millis(10_020)).await;
    layer.wait_idle().await;
    let res = app.clone().oneshot(order()).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert!(res.headers().contains_key("idempotent-replayed"));
    assert_eq!(runs_of(&runs, "slow"), 1);

    // A lock nobody renews (a crashed worker): held for its lease, free at its end.
    let lease = Duration::from_secs(30);
    let t1 = Instant::now();
    let got = store
        .begin("crash", [9; 32], LockToken::random(), lease)
        .await
        .unwrap();
    assert!(matches!(got, Begin::Started));
    tokio::time::sleep_until(t1 + lease - Duration::from_millis(1)).await;
    let got = store
        .begin("crash", [9; 32], LockToken::random(), lease)
        .await
        .unwrap();
    assert!(matches!(got, Begin::InFlight), "{got:?}");
    tokio::time::sleep_until(t1 + lease + Duration::from_millis(1)).await;
    let got = store
        .begin("crash", [9; 32], LockToken::random(), lease)
        .await
        .unwrap();
    assert!(matches!(got, Begin::Started), "{got:?}");
}
