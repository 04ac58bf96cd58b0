#![cfg(feature = "full")]
//! Outside round s120: hostile HTTP/1 clients (raw TCP and hyper's client) and HTTP/2 streams
//! (node's http2 client through nginx speaking h2c, as the workspace has no h2) against sturdy's
//! server-side layers served by axum on 127.0.0.1: the idempotency layer (memory and Redis
//! stores) under tower-http's timeout, body-limit and panic-catching layers, and the webhook
//! receiver (memory queue and Redis stream). Trickled, cut, never-ending and malformed bodies,
//! headers only, pipelined requests sharing a key, connections closed while the handler runs,
//! `Expect: 100-continue`, a thousand keys at once, replays from a hundred connections. Each
//! test counts handler runs and queued events, checks that keys are free again and that every
//! refusal is the documented one, and that other clients are served meanwhile.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{post, post_service};
use axum::Router;
use sturdy::idempotency::server::{
    problem, ByCredentials, IdempotencyLayer, IdempotencyStore, MemoryStore,
};
use sturdy::webhook::{MemoryQueue, Stripe, WebhookReceiver};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{sleep, timeout, Instant};

const T: Duration = Duration::from_secs(10);

#[derive(Clone)]
struct Ctx {
    runs: Arc<AtomicUsize>,
    /// Handlers that have returned.
    done: Arc<AtomicUsize>,
    delay: Duration,
}

async fn create(State(ctx): State<Ctx>, body: String) -> (StatusCode, String) {
    let n = ctx.runs.fetch_add(1, Ordering::SeqCst) + 1;
    sleep(ctx.delay).await;
    ctx.done.fetch_add(1, Ordering::SeqCst);
    (StatusCode::CREATED, format!("order {n}: {body}"))
}

async fn fast(body: String) -> (StatusCode, String) {
    (StatusCode::OK, format!("fast {}", body.len()))
}

/// `/orders` behind the layer (and an optional limit inside it), `/other` behind it too,
/// `/health` outside it.
fn app<St: IdempotencyStore + Clone>(
    layer: IdempotencyLayer<St>,
    ctx: Ctx,
    limit: Option<usize>,
) -> Router {
    let orders = Router::new()
        .route("/orders", post(create))
        .route("/other", post(create))
        .with_state(ctx);
    let orders = match limit {
        Some(n) => orders.layer(tower::limit::GlobalConcurrencyLimitLayer::new(n)),
        None => orders,
    };
    orders
        .layer(layer)
        .route("/health", post(fast).get(|| async { "ok" }))
}

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await;
    });
    addr
}

#[derive(Debug, Clone)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn problem_type(&self) -> String {
        let v: serde_json::Value = serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body));
        v["type"].as_str().unwrap_or_default().to_owned()
    }
    fn assert_problem(&self, status: u16, ty: &str) {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json"),
            "{self:?}"
        );
        assert_eq!(self.problem_type(), ty, "{self:?}");
        let v: serde_json::Value = serde_json::from_str(&self.body).unwrap();
        assert_eq!(v["status"].as_u64(), Some(status as u64), "{self:?}");
        assert!(
            !v["title"].as_str().unwrap_or_default().is_empty(),
            "{self:?}"
        );
        assert!(
            !v["detail"].as_str().unwrap_or_default().is_empty(),
            "{self:?}"
        );
    }
}

/// Reads one HTTP/1 response (Content-Length, chunked, or to the close) from `buf` + `s`.
/// Interim 1xx responses are skipped unless `keep_interim`.
async fn read_resp(s: &mut TcpStream, buf: &mut Vec<u8>, keep_interim: bool) -> Option<Resp> {
    loop {
        let head_end = loop {
            if let Some(i) = find(buf, b"\r\n\r\n") {
                break i;
            }
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        buf.drain(..head_end + 4);
        let mut lines = head.split("\r\n");
        let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| {
                let (k, v) = l.split_once(':')?;
                Some((k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            })
            .collect();
        if (100..200).contains(&status) {
            if keep_interim {
                return Some(Resp {
                    status,
                    headers,
                    body: String::new(),
                });
            }
            continue;
        }
        let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        let body = if let Some(cl) = get("content-length") {
            let cl: usize = cl.parse().ok()?;
            while buf.len() < cl {
                let mut chunk = [0u8; 4096];
                let n = s.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            buf.drain(..cl).collect::<Vec<u8>>()
        } else if get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            let mut out = Vec::new();
            loop {
                let line_end = loop {
                    if let Some(i) = find(buf, b"\r\n") {
                        break i;
                    }
                    let mut chunk = [0u8; 4096];
                    let n = s.read(&mut chunk).await.ok()?;
                    if n == 0 {
                        return None;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                };
                let size = usize::from_str_radix(
                    String::from_utf8_lossy(&buf[..line_end])
                        .split(';')
                        .next()?
                        .trim(),
                    16,
                )
                .ok()?;
                buf.drain(..line_end + 2);
                while buf.len() < size + 2 {
                    let mut chunk = [0u8; 4096];
                    let n = s.read(&mut chunk).await.ok()?;
                    if n == 0 {
                        return None;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                out.extend(buf.drain(..size));
                buf.drain(..2);
                if size == 0 {
                    break;
                }
            }
            out
        } else if status == 204 || status == 304 {
            Vec::new()
        } else {
            let _ = s.read_to_end(buf).await;
            std::mem::take(buf)
        };
        return Some(Resp {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        });
    }
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

/// A well-formed POST, read to its answer, on a fresh connection.
async fn post_once(addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: &str) -> Resp {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request(path, headers, body).as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    timeout(T, read_resp(&mut s, &mut buf, false))
        .await
        .expect("answer in time")
        .expect("an answer")
}

fn request(path: &str, headers: &[(&str, &str)], body: &str) -> String {
    let mut r = format!(
        "POST {path} HTTP/1.1\r\nhost: localhost\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    r.push_str("\r\n");
    r.push_str(body);
    r
}

/// Retries `key` until the answer is not 409 in flight, at most `T`.
async fn settle(addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: &str) -> Resp {
    let start = Instant::now();
    loop {
        let r = post_once(addr, path, headers, body).await;
        if r.status != 409 || start.elapsed() > T {
            return r;
        }
        r.assert_problem(409, problem::IN_FLIGHT);
        assert_eq!(r.header("retry-after"), Some("1"));
        sleep(Duration::from_millis(10)).await;
    }
}

/// The time the fast route takes to answer, while something else goes on.
async fn health(addr: SocketAddr) -> Duration {
    let t = Instant::now();
    let r = post_once(addr, "/health", &[], "x").await;
    assert_eq!(r.status, 200, "{r:?}");
    t.elapsed()
}

fn ctx(delay_ms: u64) -> Ctx {
    Ctx {
        runs: Arc::new(AtomicUsize::new(0)),
        done: Arc::new(AtomicUsize::new(0)),
        delay: Duration::from_millis(delay_ms),
    }
}

fn mem_layer() -> IdempotencyLayer<MemoryStore> {
    IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default())
        .with_require_key(true)
        .with_lease(Duration::from_millis(300))
        .unwrap()
}

fn wall_now() -> std::time::SystemTime {
    sturdy::core::WallClock::now(&sturdy::core::SystemClock)
}

fn redis_url() -> String {
    std::env::var("STURDY_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:17379/".into())
}

fn uniq(tag: &str) -> String {
    let n = wall_now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("s120-{tag}-{n}")
}

async fn redis_layer(
    tag: &str,
) -> (
    IdempotencyLayer<sturdy::redis::RedisIdempotencyStore>,
    String,
) {
    let prefix = uniq(tag);
    let store = sturdy::redis::RedisIdempotencyStore::connect(&redis_url())
        .await
        .unwrap()
        .with_prefix(prefix.clone());
    let layer = IdempotencyLayer::new(store, ByCredentials::default())
        .with_require_key(true)
        .with_lease(Duration::from_millis(300))
        .unwrap();
    (layer, prefix)
}

/// `redis-cli` against `$STURDY_REDIS_URL`, one reply a line.
fn redis_cli(args: &[&str]) -> Vec<String> {
    let out = std::process::Command::new("redis-cli")
        .arg("-u")
        .arg(redis_url())
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Every key under `prefix` with its TTL in ms.
async fn redis_keys(prefix: &str) -> Vec<(String, i64)> {
    let keys = redis_cli(&["--scan", "--pattern", &format!("*{prefix}*")]);
    keys.into_iter()
        .map(|k| {
            let ttl = redis_cli(&["PTTL", &k])[0].parse().unwrap();
            (k, ttl)
        })
        .collect()
}

async fn redis_cleanup(prefix: &str) {
    for k in redis_cli(&["--scan", "--pattern", &format!("*{prefix}*")]) {
        redis_cli(&["DEL", &k]);
    }
}

// ---------------------------------------------------------------------------------------------
// Idempotency layer

/// Run against memory and Redis: the connection closes while the handler runs; the handler ends,
/// its outcome is stored, a retry gets 409 then the stored answer, never a second run.
async fn closed_mid_handler<St: IdempotencyStore + Clone>(layer: IdempotencyLayer<St>) {
    let c = ctx(200);
    let addr = serve(app(layer.clone(), c.clone(), None)).await;
    let h = [
        ("idempotency-key", "k-close"),
        ("authorization", "Bearer a"),
    ];
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request("/orders", &h, "{\"n\":1}").as_bytes())
        .await
        .unwrap();
    sleep(Duration::from_millis(50)).await;
    drop(s);
    assert_eq!(c.runs.load(Ordering::SeqCst), 1);
    let r = post_once(addr, "/orders", &h, "{\"n\":1}").await;
    r.assert_problem(409, problem::IN_FLIGHT);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(!r.body.contains("k-close") && !r.body.contains("Bearer"));
    let r = settle(addr, "/orders", &h, "{\"n\":1}").await;
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(r.header("idempotent-replayed"), Some("true"), "{r:?}");
    assert_eq!(r.body, "order 1: {\"n\":1}");
    assert_eq!(c.runs.load(Ordering::SeqCst), 1);
    timeout(T, layer.wait_idle()).await.unwrap();
    assert_eq!(layer.running(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s120_memory_connection_closed_mid_handler_is_stored_and_replayed() {
    timeout(T, closed_mid_handler(mem_layer())).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s120_redis_connection_closed_mid_handler_is_stored_and_replayed() {
    let (layer, prefix) = redis_layer("close").await;
    timeout(T, closed_mid_handler(layer)).await.unwrap();
    // The stored response is kept for the TTL (24 h), not the lease.
    let keys = redis_keys(&prefix).await;
    assert!(!keys.is_empty());
    for (k, ttl) in &keys {
        assert!(*ttl > 3_600_000, "{k} expires in {ttl} ms");
    }
    redis_cleanup(&prefix).await;
}

/// Pipelined: three requests with the same key (and a fourth with another body) written at once
/// on one connection: one run, then two replays, then 422.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s120_pipelined_requests_with_one_key_run_once() {
    timeout(T, async {
        let c = ctx(100);
        let addr = serve(app(mem_layer(), c.clone(), None)).await;
        let h = [("idempotency-key", "k-pipe")];
        let mut wire = String::new();
        for _ in 0..3 {
            wire.push_str(&request("/orders", &h, "same"));
        }
        wire.push_str(&request("/orders", &h, "other"));
        wire.push_str(&request("/other", &h, "same"));
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(wire.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let mut answers = Vec::new();
        for _ in 0..5 {
            answers.push(read_resp(&mut s, &mut buf, false).await.expect("an answer"));
        }
        assert_eq!(answers[0].status, 201, "{:?}", answers[0]);
        assert_eq!(answers[0].header("idempotent-replayed"), None);
        for a in &answers[1..3] {
            assert_eq!(a.status, 201, "{a:?}");
            assert_eq!(a.header("idempotent-replayed"), Some("true"));
            assert_eq!(a.body, answers[0].body);
        }
        answers[3].assert_problem(422, problem::KEY_REUSED);
        answers[4].assert_problem(422, problem::KEY_REUSED);
        for a in &answers[3..] {
            assert!(!a.body.contains("k-pipe"), "{a:?}");
        }
        assert_eq!(c.runs.load(Ordering::SeqCst), 1);
    })
    .await
    .unwrap();
}

/// A body sent one byte every 20 ms holds no lock: another client with the same key and the
/// same body runs meanwhile, the slow one then gets the replay; other keys and routes are
/// served at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s120_trickled_body_holds_no_key_and_blocks_nobody() {
    timeout(T, async {
        let c = ctx(0);
        let addr = serve(app(mem_layer(), c.clone(), None)).await;
        let body = "0123456789012345678901234";
        let h = [("idempotency-key", "k-slow")];
        let head = format!(
            "POST /orders HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\nidempotency-key: k-slow\r\n\r\n",
            body.len()
        );
        let slow = tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(head.as_bytes()).await.unwrap();
            for b in body.bytes() {
                s.write_all(&[b]).await.unwrap();
                sleep(Duration::from_millis(20)).await;
            }
            let mut buf = Vec::new();
            read_resp(&mut s, &mut buf, false).await.unwrap()
        });
        sleep(Duration::from_millis(60)).await;
        let t = Instant::now();
        let other = post_once(addr, "/orders", &[("idempotency-key", "k-other")], "x").await;
        assert_eq!(other.status, 201);
        let same = post_once(addr, "/orders", &h, body).await;
        assert_eq!(same.status, 201, "{same:?}");
        assert!(t.elapsed() < Duration::from_millis(250), "{:?}", t.elapsed());
        assert!(health(addr).await < Duration::from_millis(200));
        let slow = slow.await.unwrap();
        assert_eq!(slow.status, 201, "{slow:?}");
        assert_eq!(slow.header("idempotent-replayed"), Some("true"));
        assert_eq!(slow.body, same.body);
        assert_eq!(c.runs.load(Ordering::SeqCst), 2);
    })
    .await
    .unwrap();
}

/// The guide's recommended composition (a global concurrency limit of 1 inside the layer): a
/// client trickling its body must not hold the only slot that other clients' handlers need,
/// since "a request waiting for a slot is not running" and the limit counts running handlers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s120_trickled_body_does_not_hold_the_slot_of_a_limit_inside_the_layer() {
    timeout(T, async {
        let c = ctx(0);
        let addr = serve(app(mem_layer(), c.clone(), Some(1))).await;
        let body = "x".repeat(40);
        let head = format!(
            "POST /orders HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\nidempotency-key: k-slow\r\n\r\n",
            body.len()
        );
        let slow = tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(head.as_bytes()).await.unwrap();
            for b in body.bytes() {
                s.write_all(&[b]).await.unwrap();
                sleep(Duration::from_millis(20)).await;
            }
            let mut buf = Vec::new();
            read_resp(&mut s, &mut buf, false).await.unwrap()
        });
        sleep(Duration::from_millis(60)).await;
        let t = Instant::now();
        let other = post_once(addr, "/orders", &[("idempotency-key", "k-other")], "x").await;
        let waited = t.elapsed();
        assert_eq!(other.status, 201);
        let slow = slow.await.unwrap();
        assert_eq!(slow.status, 201);
        assert!(
            waited < Duration::from_millis(300),
            "a fast client waited {waited:?} behind a trickling body"
        );
    })
    .await
    .unwrap();
}

/// `Content-Length` larger than what is sent, then silence, then close; headers only, then
/// close: the handler never runs, the key is free at once, and the same request sent whole
/// runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s120_short_bodies_and_bare_heads_then_close_leave_the_key_free() {
    timeout(T, async {
        let layer = mem_layer();
        let c = ctx(0);
        let addr = serve(app(layer.clone(), c.clone(), None)).await;
        // Content-Length 100, 10 bytes, silence, close.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(
            b"POST /orders HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\nidempotency-key: k-short\r\n\r\n0123456789",
        )
        .await
        .unwrap();
        sleep(Duration::from_millis(100)).await;
        drop(s);
        // Headers only, then close.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"POST /orders HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\nidempotency-key: k-head\r\n\r\n")
            .await
            .unwrap();
        drop(s);
        // Half a head, then close.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"POST /orders HTTP/1.1\r\nidempotency-key: k-half\r\ncontent-le")
            .await
            .unwrap();
        drop(s);
        sleep(Duration::from_millis(50)).await;
        assert_eq!(c.runs.load(Ordering::SeqCst), 0);
        timeout(Duration::from_secs(1), layer.wait_idle()).await.unwrap();
        // The key is free now (no 409, well before the 300 ms lease).
        let body = "0".repeat(100);
        let r = post_once(addr, "/orders", &[("idempotency-key", "k-short")], &body).await;
        assert_eq!(r.status, 201, "{r:?}");
        let r = post_once(addr, "/orders", &[("idempotency-key", "k-head")], "hello").await;
        assert_eq!(r.status, 201, "{r:?}");
        assert_eq!(c.runs.load(Ordering::SeqCst), 2);
    })
    .await
    .unwrap();
}

/// A chunked body that never ends, under tower-http's `RequestBodyTimeoutLayer` in front (as
/// the guide says): no run, no 2xx, the key is free, other clients are served meanwhile; and a
/// chunked body with a malformed chunk size is refused without a run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s120_endless_and_malformed_chunked_bodies() {
    timeout(T, async {
        let layer = mem_layer();
        let c = ctx(0);
        let app = app(layer.clone(), c.clone(), None).layer(
            tower_http::timeout::RequestBodyTimeoutLayer::new(Duration::from_millis(150)),
        );
        let addr = serve(app).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"POST /orders HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nidempotency-key: k-endless\r\n\r\n3\r\nabc\r\n")
            .await
            .unwrap();
        let endless = tokio::spawn(async move {
            let mut buf = Vec::new();
            let r = read_resp(&mut s, &mut buf, false).await;
            (r, s)
        });
        assert!(health(addr).await < Duration::from_millis(100));
        let (r, _s) = endless.await.unwrap();
        let r = r.expect("an answer");
        r.assert_problem(400, problem::UNREADABLE_BODY);
        assert!(r.body.contains("timeout"), "names the cause: {r:?}");
        assert_eq!(c.runs.load(Ordering::SeqCst), 0);
        let r = post_once(addr, "/orders", &[("idempotency-key", "k-endless")], "abc").await;
        assert_eq!(r.status, 201, "the key is free: {r:?}");

        // Malformed chunk sizes.
        for bad in ["zz\r\nabc\r\n0\r\n\r\n", "ffffffffffffffffffff\r\nabc\r\n", "-1\r\n\r\n"] {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(
                format!("POST /orders HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nidempotency-key: k-bad\r\n\r\n{bad}")
                    .as_bytes(),
            )
            .await
            .unwrap();
            let mut buf = Vec::new();
            let r = timeout(Duration::from_secs(2), read_resp(&mut s, &mut buf, false))
                .await
                .expect("an answer or a close in time");
            let r = r.expect("an answer");
            r.assert_problem(400, problem::UNREADABLE_BODY);
            assert!(!r.body.contains("k-bad"), "{r:?}");
        }
        assert_eq!(c.runs.load(Ordering::SeqCst), 1);
        let r = post_once(addr, "/orders", &[("idempotency-key", "k-bad")], "abc").await;
        assert_eq!(r.status, 201, "the key is free: {r:?}");
        timeout(Duration::from_secs(1), layer.wait_idle()).await.unwrap();
    })
    .await
    .unwrap();
}

/// When the body read fails (a body timeout in front), the layer's answer is its own: a
/// problem+json, never a 2xx, and nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s120_a_body_that_fails_mid_read_is_answered_with_a_problem() {
    timeout(T, async {
        let c = ctx(0);
        let app = app(mem_layer(), c.clone(), None).layer(
            tower_http::timeout::RequestBodyTimeoutLayer::new(Duration::from_millis(100)),
        );
        let addr = serve(app).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"POST /orders HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\nidempotency-key: k-stall\r\n\r\n01234")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let r = read_resp(&mut s, &mut buf, false).await.expect("an answer");
        r.assert_problem(400, problem::UNREADABLE_BODY);
        assert!(!r.body.contains("k-stall"));
        assert_eq!(c.runs.load(Ordering::SeqCst), 0);
    })
    .await
    .unwrap();
}

/// `Expect: 100-continue`: a request that will be refused on its head (no key, an invalid key)
/// gets its refusal without sending its body; a good one gets `100 Continue`, then runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s120_expect_continue() {
    timeout(T, async {
        let c = ctx(0);
        let addr = serve(app(mem_layer(), c.clone(), None)).await;
        for (key, ty) in [
            (None, problem::MISSING_KEY),
            (Some("bad key"), problem::INVALID_KEY),
            (Some("k\u{e9}-non-ascii"), problem::INVALID_KEY),
        ] {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let kh = key
                .map(|k| format!("idempotency-key: {k}\r\n"))
                .unwrap_or_default();
            s.write_all(
                format!("POST /orders HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\nexpect: 100-continue\r\n{kh}\r\n")
                    .as_bytes(),
            )
            .await
            .unwrap();
            let mut buf = Vec::new();
            let r = timeout(Duration::from_secs(2), read_resp(&mut s, &mut buf, true))
                .await
                .expect("answered without the body")
                .expect("an answer");
            r.assert_problem(400, ty);
            if let Some(k) = key {
                assert!(!r.body.contains(k), "{r:?}");
            }
        }
        // Declared over the limit (1 MiB): 413 without the body.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"POST /orders HTTP/1.1\r\nhost: x\r\ncontent-length: 2000000\r\nexpect: 100-continue\r\nidempotency-key: k-exp\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let r = timeout(Duration::from_secs(2), read_resp(&mut s, &mut buf, false))
            .await
            .expect("answered without the body")
            .expect("an answer");
        r.assert_problem(413, problem::BODY_TOO_LARGE);
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"POST /orders HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\nexpect: 100-continue\r\nidempotency-key: k-exp\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let r = timeout(Duration::from_secs(2), read_resp(&mut s, &mut buf, true))
            .await
            .expect("100 in time")
            .expect("an answer");
        assert_eq!(r.status, 100, "{r:?}");
        s.write_all(b"hello").await.unwrap();
        let r = read_resp(&mut s, &mut buf, false).await.unwrap();
        assert_eq!(r.status, 201, "{r:?}");
        assert_eq!(c.runs.load(Ordering::SeqCst), 1);
    })
    .await
    .unwrap();
}

/// A thousand different keys at once (and each twice): a thousand runs, every repeat a 409 or
/// the replay, the store holds a thousand entries, nothing is left running.
async fn thousand<St: IdempotencyStore + Clone>(layer: IdempotencyLayer<St>, n: usize) {
    let c = ctx(5);
    let addr = serve(app(layer.clone(), c.clone(), None)).await;
    let mut tasks = Vec::new();
    for i in 0..n {
        for _ in 0..2 {
            tasks.push(tokio::spawn(async move {
                let key = format!("k-{i}");
                let auth = format!("Bearer c{}", i % 7);
                let h = [
                    ("idempotency-key", key.as_str()),
                    ("authorization", auth.as_str()),
                ];
                let body = format!("b{i}");
                let r = post_once(addr, "/orders", &h, &body).await;
                if r.status == 409 {
                    r.assert_problem(409, problem::IN_FLIGHT);
                    settle(addr, "/orders", &h, &body).await
                } else {
                    r
                }
            }));
        }
    }
    let mut bodies = std::collections::HashMap::new();
    for (j, t) in tasks.into_iter().enumerate() {
        let r = t.await.unwrap();
        assert_eq!(r.status, 201, "{r:?}");
        let prev = bodies.insert(j / 2, r.body.clone());
        if let Some(p) = prev {
            assert_eq!(p, r.body);
        }
    }
    assert_eq!(c.runs.load(Ordering::SeqCst), n);
    timeout(T, layer.wait_idle()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s120_memory_a_thousand_keys_at_once() {
    let store = MemoryStore::default();
    let layer = IdempotencyLayer::new(store.clone(), ByCredentials::default())
        .with_require_key(true)
        .with_lease(Duration::from_millis(300))
        .unwrap();
    timeout(Duration::from_secs(30), thousand(layer, 1000))
        .await
        .unwrap();
    assert_eq!(store.len(), 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s120_redis_three_hundred_keys_at_once() {
    let (layer, prefix) = redis_layer("many").await;
    timeout(Duration::from_secs(30), thousand(layer, 300))
        .await
        .unwrap();
    let keys = redis_keys(&prefix).await;
    assert_eq!(keys.len(), 300, "one entry per key");
    for (k, ttl) in &keys {
        assert!(*ttl > 3_600_000, "{k}: {ttl}");
    }
    redis_cleanup(&prefix).await;
}

/// The same key with another body, path or query is 422; with other credentials it is another
/// scope and runs; no refusal echoes the key or a credential.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s120_same_key_other_body_path_or_credentials() {
    timeout(T, async {
        let c = ctx(0);
        let addr = serve(app(mem_layer(), c.clone(), None)).await;
        let key = "k-secretish-0f3a";
        let a = [
            ("idempotency-key", key),
            ("authorization", "Bearer tok-alice"),
        ];
        let b = [
            ("idempotency-key", key),
            ("authorization", "Bearer tok-bob"),
        ];
        assert_eq!(post_once(addr, "/orders", &a, "one").await.status, 201);
        for (path, body) in [
            ("/orders", "two"),
            ("/other", "one"),
            ("/orders?x=1", "one"),
            ("/orders", "one "),
        ] {
            let r = post_once(addr, path, &a, body).await;
            r.assert_problem(422, problem::KEY_REUSED);
            assert!(
                !r.body.contains(key) && !r.body.contains("tok-alice"),
                "{r:?}"
            );
        }
        let r = post_once(addr, "/orders", &b, "two").await;
        assert_eq!(r.status, 201, "{r:?}");
        assert_eq!(r.body, "order 2: two");
        let r = post_once(addr, "/orders", &a, "one").await;
        assert_eq!(r.body, "order 1: one");
        assert_eq!(r.header("idempotent-replayed"), Some("true"));
        assert_eq!(c.runs.load(Ordering::SeqCst), 2);
    })
    .await
    .unwrap();
}

/// tower-http's `TimeoutLayer` outside the layer cuts the client's wait; the handler goes on,
/// stores its outcome, and the retry gets it; `CatchPanicLayer` outside turns a panic into a
/// 500 and the key is free for a retry at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s120_tower_http_timeout_and_catch_panic_outside() {
    timeout(T, async {
        let layer = mem_layer();
        let runs = Arc::new(AtomicUsize::new(0));
        let r2 = runs.clone();
        let panics = Arc::new(AtomicUsize::new(0));
        let p2 = panics.clone();
        let app = Router::new()
            .route(
                "/slow",
                post(move |body: String| {
                    let runs = r2.clone();
                    async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        sleep(Duration::from_millis(700)).await;
                        (StatusCode::CREATED, body)
                    }
                }),
            )
            .route(
                "/panic",
                post(move || {
                    let p = p2.clone();
                    async move {
                        if p.fetch_add(1, Ordering::SeqCst) == 0 {
                            panic!("first run panics");
                        }
                        (StatusCode::CREATED, "second run")
                    }
                }),
            )
            .layer(layer.clone())
            .layer(tower_http::catch_panic::CatchPanicLayer::new())
            .layer(tower_http::timeout::TimeoutLayer::with_status_code(
                StatusCode::REQUEST_TIMEOUT,
                Duration::from_millis(300),
            ))
            .layer(tower_http::limit::RequestBodyLimitLayer::new(64));
        let addr = serve(app).await;
        let h = [("idempotency-key", "k-t")];
        let r = post_once(addr, "/slow", &h, "s").await;
        assert_eq!(r.status, 408, "{r:?}");
        let r = settle(addr, "/slow", &h, "s").await;
        assert_eq!(r.status, 201, "{r:?}");
        assert_eq!(r.header("idempotent-replayed"), Some("true"));
        assert_eq!(runs.load(Ordering::SeqCst), 1);

        let r = post_once(addr, "/panic", &[("idempotency-key", "k-p")], "").await;
        assert_eq!(r.status, 500, "{r:?}");
        let r = post_once(addr, "/panic", &[("idempotency-key", "k-p")], "").await;
        assert_eq!(r.status, 201, "a retry at once runs again: {r:?}");
        assert_eq!(panics.load(Ordering::SeqCst), 2);

        // Over tower-http's body limit in front: 413 from it, the handler never runs.
        let big = "x".repeat(100);
        let r = post_once(addr, "/slow", &[("idempotency-key", "k-big")], &big).await;
        assert_eq!(r.status, 413, "{r:?}");
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        timeout(T, layer.wait_idle()).await.unwrap();
    })
    .await
    .unwrap();
}

/// Over the layer's own body limit with a `Content-Length` that says so, and nothing sent: 413
/// problem at once; the same for a chunked body that crosses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s120_declared_and_chunked_bodies_over_the_layers_limit() {
    timeout(T, async {
        let c = ctx(0);
        let layer = mem_layer().with_body_limit(16);
        let addr = serve(app(layer, c.clone(), None)).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"POST /orders HTTP/1.1\r\nhost: x\r\ncontent-length: 1000000000\r\nidempotency-key: k-l\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let r = timeout(Duration::from_secs(2), read_resp(&mut s, &mut buf, false))
            .await
            .expect("refused before the body")
            .expect("an answer");
        r.assert_problem(413, problem::BODY_TOO_LARGE);
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"POST /orders HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nidempotency-key: k-l\r\n\r\n10\r\n0123456789abcdef\r\n1\r\nx\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let r = timeout(Duration::from_secs(2), read_resp(&mut s, &mut buf, false))
            .await
            .expect("refused once past the limit")
            .expect("an answer");
        r.assert_problem(413, problem::BODY_TOO_LARGE);
        assert_eq!(c.runs.load(Ordering::SeqCst), 0);
        let r = post_once(addr, "/orders", &[("idempotency-key", "k-l")], "0123456789abcdef").await;
        assert_eq!(r.status, 201, "{r:?}");
    })
    .await
    .unwrap();
}

/// Redis: while a handler runs, its lock's TTL is at most the lease; after a cut connection
/// and a server whose handler is killed by the runtime's end... (not here) — the lock of a
/// running handler is renewed, never longer than the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s120_redis_lock_ttl_is_the_lease_while_running() {
    let (layer, prefix) = redis_layer("lease").await;
    timeout(T, async {
        let c = ctx(500);
        let addr = serve(app(layer.clone(), c.clone(), None)).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request("/orders", &[("idempotency-key", "k-lease")], "b").as_bytes())
            .await
            .unwrap();
        sleep(Duration::from_millis(50)).await;
        drop(s);
        for _ in 0..6 {
            sleep(Duration::from_millis(50)).await;
            let keys = redis_keys(&prefix).await;
            // Read after the keys: a handler that had not returned by then had not stored its
            // outcome (kept for a day) when they were read (the reads run redis-cli and can
            // outlast the handler on a loaded machine).
            let running = c.runs.load(Ordering::SeqCst) == 1 && c.done.load(Ordering::SeqCst) == 0;
            for (k, ttl) in keys {
                if running {
                    assert!(ttl <= 300, "{k}: {ttl} ms with a 300 ms lease");
                }
            }
        }
        let r = settle(addr, "/orders", &[("idempotency-key", "k-lease")], "b").await;
        assert_eq!(r.status, 201);
        assert_eq!(r.header("idempotent-replayed"), Some("true"));
        assert_eq!(c.runs.load(Ordering::SeqCst), 1);
    })
    .await
    .unwrap();
    redis_cleanup(&prefix).await;
}

// ---------------------------------------------------------------------------------------------
// Webhook receiver

const SECRET: &str = "whsec_s120_secret_value";

fn now() -> i64 {
    wall_now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn stripe_delivery(body: &str) -> String {
    let sig = sturdy::webhook::sign_stripe(SECRET, now(), body.as_bytes());
    format!(
        "POST /hook HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\nstripe-signature: {sig}\r\n\r\n{body}",
        body.len()
    )
}

/// A delivery whose body is cut mid-way (by a close, or a body timeout in front) is never
/// queued and never acknowledged; the whole delivery afterwards is queued once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s120_webhook_cut_body_is_not_queued_and_redelivery_is() {
    timeout(T, async {
        let (queue, mut events) = MemoryQueue::new(100);
        let receiver = WebhookReceiver::new(Stripe::new(SECRET).unwrap(), queue);
        let app = Router::new()
            .route("/hook", post_service(receiver))
            .route("/health", post(fast))
            .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
                Duration::from_millis(100),
            ));
        let addr = serve(app).await;
        let body = r#"{"id":"evt_s120_cut","type":"x","pad":"0123456789"}"#;
        let wire = stripe_delivery(body);
        let cut = &wire[..wire.len() - 20];
        // Cut and closed.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(cut.as_bytes()).await.unwrap();
        drop(s);
        // Cut and stalled: the body timeout ends it.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(cut.as_bytes()).await.unwrap();
        assert!(health(addr).await < Duration::from_millis(100));
        let mut buf = Vec::new();
        let r = read_resp(&mut s, &mut buf, false).await.expect("an answer");
        assert_eq!(r.status, 400, "{r:?}");
        assert_eq!(r.body, "unreadable body");
        assert!(!r.body.contains(SECRET));
        sleep(Duration::from_millis(20)).await;
        assert!(events.try_recv().is_none(), "nothing queued");
        // Whole: queued once.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(wire.as_bytes()).await.unwrap();
        let r = read_resp(&mut s, &mut buf, false).await.unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        let e = events.try_recv().expect("queued");
        assert_eq!(e.id, "evt_s120_cut");
        assert!(events.try_recv().is_none());
    })
    .await
    .unwrap();
}

async fn replay_100(addr: SocketAddr, wire: String) -> Vec<Resp> {
    let barrier = Arc::new(tokio::sync::Barrier::new(100));
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let b = barrier.clone();
        let w = wire.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let (head, body) = w.split_at(w.len() - 5);
            s.write_all(head.as_bytes()).await.unwrap();
            b.wait().await;
            s.write_all(body.as_bytes()).await.unwrap();
            let mut buf = Vec::new();
            read_resp(&mut s, &mut buf, false).await.unwrap()
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// One signed Stripe delivery sent 100 times at once from 100 connections: every answer 200,
/// one event queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s120_webhook_memory_replayed_100_times_at_once_is_queued_once() {
    timeout(T, async {
        let (queue, mut events) = MemoryQueue::new(1000);
        let receiver = WebhookReceiver::new(Stripe::new(SECRET).unwrap(), queue);
        let addr = serve(Router::new().route("/hook", post_service(receiver))).await;
        let wire = stripe_delivery(r#"{"id":"evt_s120_100","type":"x"}"#);
        let answers = replay_100(addr, wire).await;
        for r in &answers {
            assert_eq!(r.status, 200, "{r:?}");
        }
        let mut n = 0;
        while events.try_recv().is_some() {
            n += 1;
        }
        assert_eq!(n, 1);
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s120_webhook_redis_replayed_100_times_at_once_is_queued_once() {
    let stream = uniq("hooks");
    timeout(T, async {
        let queue = sturdy::redis::RedisStreamQueue::connect(&redis_url(), stream.clone())
            .await
            .unwrap();
        let receiver = WebhookReceiver::new(Stripe::new(SECRET).unwrap(), queue);
        let addr = serve(Router::new().route("/hook", post_service(receiver))).await;
        let wire = stripe_delivery(r#"{"id":"evt_s120_r100","type":"x"}"#);
        let answers = replay_100(addr, wire).await;
        for r in &answers {
            assert_eq!(r.status, 200, "{r:?}");
        }
        let len: u64 = redis_cli(&["XLEN", &stream])[0].parse().unwrap();
        assert_eq!(len, 1);
    })
    .await
    .unwrap();
    redis_cleanup(&stream).await;
}

/// Pipelined deliveries on one connection: the same delivery three times and a forged one;
/// answers in order, one event queued, the forged one 401 with the generic text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s120_webhook_pipelined_duplicates_and_forgery() {
    timeout(T, async {
        let (queue, mut events) = MemoryQueue::new(100);
        let receiver = WebhookReceiver::new(Stripe::new(SECRET).unwrap(), queue);
        let addr = serve(Router::new().route("/hook", post_service(receiver))).await;
        let body = r#"{"id":"evt_s120_pipe","type":"x"}"#;
        let good = stripe_delivery(body);
        let forged = good.replace("evt_s120_pipe", "evt_s120_pipf");
        let wire = format!("{good}{good}{forged}{good}");
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(wire.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let mut st = Vec::new();
        for _ in 0..4 {
            let r = read_resp(&mut s, &mut buf, false).await.unwrap();
            if r.status == 401 {
                assert_eq!(r.body, "invalid signature");
            }
            st.push(r.status);
        }
        assert_eq!(st, [200, 200, 401, 200]);
        assert_eq!(events.try_recv().unwrap().id, "evt_s120_pipe");
        assert!(events.try_recv().is_none());
    })
    .await
    .unwrap();
}

// ---------------------------------------------------------------------------------------------
// HTTP/2 (node's http2 client, through nginx speaking h2c in front, HTTP/1.1 to the app)

const H2_CLIENT: &str = r#"
const http2 = require('http2');
const c = http2.connect('http://127.0.0.1:' + process.env.PORT);
c.on('error', () => {});
function req(key, body, mode) { return new Promise(res => {
  const s = c.request({':method': 'POST', ':path': '/orders', 'idempotency-key': key,
                       'content-type': 'text/plain'}, {endStream: false});
  let status = null, data = '', done = false;
  const fin = (x) => { if (!done) { done = true; res(Object.assign({status, data}, x)); } };
  s.on('response', h => { status = h[':status']; });
  s.on('data', d => data += d);
  s.on('end', () => fin({}));
  s.on('close', () => fin({closed: true}));
  s.on('error', e => fin({error: String(e)}));
  const cancel = (ms) => setTimeout(() => s.close(http2.constants.NGHTTP2_CANCEL), ms);
  if (mode === 'before') { cancel(30); }
  else if (mode === 'mid') { s.write(body.slice(0, 2)); cancel(60); }
  else if (mode === 'after') { s.end(body); cancel(80); }
  else { s.end(body); }
});}
(async () => {
  const out = {};
  out.same = await Promise.all(Array.from({length: 10}, () => req('h2-same', 'body', 'full')));
  out.before = await req('h2-before', 'body', 'before');
  out.mid = await req('h2-mid', 'body', 'mid');
  out.after = await req('h2-after', 'body', 'after');
  out.mixed = await Promise.all(['before', 'after', 'full', 'full', 'after'].map(m => req('h2-mixed', 'body', m)));
  console.log(JSON.stringify(out));
  c.close();
})();
"#;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// HTTP/2 streams sharing a key opened at once, and streams reset (`RST_STREAM`) before the
/// body, mid-body and after it while the handler runs: nginx in front closes the app's
/// connection for each reset. One run per key; a retry gets the stored answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s120_h2_streams_sharing_a_key_and_reset_at_every_point() {
    let layer = mem_layer();
    let c = ctx(200);
    let up = serve(app(layer.clone(), c.clone(), None)).await;
    let dir = std::env::temp_dir().join(uniq("nginx"));
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    let d = dir.display();
    let conf = format!(
        "daemon off; master_process off; worker_processes 1; pid {d}/nginx.pid; \
         error_log {d}/error.log; events {{}} http {{ access_log off; \
         client_body_temp_path {d}/b; proxy_temp_path {d}/p; fastcgi_temp_path {d}/f; \
         uwsgi_temp_path {d}/u; scgi_temp_path {d}/s; server {{ listen 127.0.0.1:{port} http2; \
         location / {{ proxy_pass http://{up}; proxy_http_version 1.1; \
         proxy_request_buffering off; proxy_buffering off; }} }} }}"
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    let _nginx = Child(
        std::process::Command::new("nginx")
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "nginx did not start"
        );
        sleep(Duration::from_millis(20)).await;
    }
    std::fs::write(dir.join("client.js"), H2_CLIENT).unwrap();
    let script = dir.join("client.js");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("timeout")
            .arg("10")
            .arg("node")
            .arg(script)
            .env("PORT", port.to_string())
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(text.trim()).expect("node's JSON");
    let same: Vec<i64> = v["same"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_i64().unwrap_or(0))
        .collect();
    assert!(same.contains(&201), "{same:?}");
    assert!(same.iter().all(|s| *s == 201 || *s == 409), "{same:?}");
    for m in v["mixed"].as_array().unwrap() {
        let s = m["status"].as_i64().unwrap_or(0);
        assert!(s == 0 || s == 201 || s == 409, "{m}");
    }
    // Settle every key over HTTP/1, straight to the app.
    let mut replayed = Vec::new();
    for key in ["h2-same", "h2-before", "h2-mid", "h2-after", "h2-mixed"] {
        let r = timeout(
            T,
            settle(up, "/orders", &[("idempotency-key", key)], "body"),
        )
        .await
        .unwrap();
        if (key == "h2-mid" || key == "h2-before") && r.status == 422 {
            // nginx 1.22 ends the upstream body of a stream reset before or mid-body with a
            // last chunk (`2\r\nbo\r\n0\r\n\r\n`, or `0\r\n\r\n` alone), so the app was
            // sent a whole, shorter body: the retry's body is another request. (Over raw TCP a cut chunked body never runs:
            // see `s120_chunked_body_cut_without_its_last_chunk_never_runs`.)
            r.assert_problem(422, problem::KEY_REUSED);
            replayed.push(true);
            continue;
        }
        assert_eq!(r.status, 201, "{key}: {r:?}");
        replayed.push(r.header("idempotent-replayed").is_some());
    }
    assert!(replayed[0], "h2-same ran before");
    assert!(replayed[3], "h2-after ran before its reset");
    assert!(replayed[4], "h2-mixed ran before");
    assert_eq!(c.runs.load(Ordering::SeqCst), 5, "one run per key");
    timeout(T, layer.wait_idle()).await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A chunked body cut mid-way (no last chunk) by a close or a half-close is not a body: the
/// handler never runs on its prefix, and the key stays free for the whole request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s120_chunked_body_cut_without_its_last_chunk_never_runs() {
    timeout(T, async {
        let layer = mem_layer();
        let c = ctx(0);
        let addr = serve(app(layer.clone(), c.clone(), None)).await;
        for (key, half) in [("k-cut-close", false), ("k-cut-half", true)] {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(
                format!("POST /orders HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nidempotency-key: {key}\r\n\r\n2\r\nbo\r\n")
                    .as_bytes(),
            )
            .await
            .unwrap();
            sleep(Duration::from_millis(30)).await;
            if half {
                s.shutdown().await.unwrap();
                let mut buf = Vec::new();
                let r = timeout(Duration::from_secs(2), read_resp(&mut s, &mut buf, false))
                    .await
                    .expect("an answer or a close");
                if let Some(r) = r {
                    assert!(r.status >= 400, "{r:?}");
                }
            }
            drop(s);
            sleep(Duration::from_millis(30)).await;
            assert_eq!(c.runs.load(Ordering::SeqCst), 0, "{key}: ran on a cut body");
        }
        for key in ["k-cut-close", "k-cut-half"] {
            let r = settle(addr, "/orders", &[("idempotency-key", key)], "body").await;
            assert_eq!(r.status, 201, "{key}: {r:?}");
            assert_eq!(r.header("idempotent-replayed"), None, "{key}: {r:?}");
        }
        assert_eq!(c.runs.load(Ordering::SeqCst), 2);
    })
    .await
    .unwrap();
}

/// A client that sends its request and never reads the answer (a large response, a tiny
/// receive buffer): the handler's task "reads the whole response body (up to the response
/// limit), stores it, then ends", so the key is settled for everyone else at once, and the
/// stalled reader holds nothing another client needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s120_a_client_that_never_reads_its_answer_holds_no_key() {
    timeout(T, async {
        let layer = mem_layer().with_response_limit(16 << 20);
        let runs = Arc::new(AtomicUsize::new(0));
        let r2 = runs.clone();
        let app = Router::new()
            .route(
                "/big",
                post(move |_body: String| {
                    let runs = r2.clone();
                    async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        (StatusCode::CREATED, "y".repeat(8 << 20))
                    }
                }),
            )
            .layer(layer.clone())
            .route("/health", post(fast));
        let addr = serve(app).await;
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        let mut stalled = sock.connect(addr).await.unwrap();
        stalled
            .write_all(request("/big", &[("idempotency-key", "k-big")], "b").as_bytes())
            .await
            .unwrap();
        sleep(Duration::from_millis(300)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert!(health(addr).await < Duration::from_millis(200));
        let t = Instant::now();
        let r = post_once(addr, "/big", &[("idempotency-key", "k-big")], "b").await;
        assert_eq!(
            (r.status, r.header("idempotent-replayed")),
            (201, Some("true")),
            "after {:?} with the first client not reading: {} {:?}",
            t.elapsed(),
            r.status,
            &r.body[..r.body.len().min(300)]
        );
        assert_eq!(r.body.len(), 8 << 20);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        drop(stalled);
    })
    .await
    .unwrap();
}

/// A memory store of 50 entries and 200 new keys at once whose handlers are slow: the store is
/// "full of running requests", so the rest get 503 `…/idempotency-store-unavailable` with
/// `Retry-After: 1` and do not run; every 2xx ran once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s120_a_store_full_of_running_requests_answers_503_and_runs_nothing_more() {
    timeout(T, async {
        let store = MemoryStore::new(50).unwrap();
        let layer = IdempotencyLayer::new(store.clone(), ByCredentials::default())
            .with_require_key(true);
        let runs = Arc::new(AtomicUsize::new(0));
        let active = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let (r2, a2, p2) = (runs.clone(), active.clone(), peak.clone());
        let app = Router::new()
            .route(
                "/orders",
                post(move || {
                    let (runs, active, peak) = (r2.clone(), a2.clone(), p2.clone());
                    async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        let now = active.fetch_add(1, Ordering::SeqCst) + 1;
                        peak.fetch_max(now, Ordering::SeqCst);
                        sleep(Duration::from_millis(2000)).await;
                        active.fetch_sub(1, Ordering::SeqCst);
                        StatusCode::CREATED
                    }
                }),
            )
            .layer(layer.clone());
        let addr = serve(app).await;
        let mut tasks = Vec::new();
        for i in 0..200 {
            tasks.push(tokio::spawn(async move {
                let key = format!("k-full-{i}");
                let t = Instant::now();
                (post_once(addr, "/orders", &[("idempotency-key", key.as_str())], "b").await, t.elapsed())
            }));
        }
        let (mut ok, mut refused, mut slowest_refusal) = (0, 0, Duration::ZERO);
        for t in tasks {
            let (r, took) = t.await.unwrap();
            match r.status {
                201 => ok += 1,
                _ => {
                    r.assert_problem(503, problem::STORE_UNAVAILABLE);
                    assert_eq!(r.header("retry-after"), Some("1"));
                    assert!(!r.body.contains("k-full"), "{r:?}");
                    refused += 1;
                    slowest_refusal = slowest_refusal.max(took);
                }
            }
        }
        assert_eq!(ok + refused, 200);
        assert_eq!(runs.load(Ordering::SeqCst), ok);
        let peak = peak.load(Ordering::SeqCst);
        assert!(
            peak <= 50,
            "{peak} handlers ran at once under keys of a store of 50 entries ({ok} accepted, {refused} refused, store len {})",
            store.len()
        );
        // Refused at once, not after the running handlers (2 s) end.
        assert!(slowest_refusal < Duration::from_millis(1600), "{slowest_refusal:?}");
        timeout(T, layer.wait_idle()).await.unwrap();
        // Room again: completed responses make room for new keys.
        let r = post_once(addr, "/orders", &[("idempotency-key", "k-full-late")], "b").await;
        assert_eq!(r.status, 201, "{r:?}");
    })
    .await
    .unwrap();
}

/// 100 different events at once into a queue with room for 10 and nobody reading: exactly as
/// many 200s as events queued, the rest 503 with `Retry-After`; their redelivery, once there
/// is room, is accepted and queued once.
async fn full_queue<Q: sturdy::webhook::EventQueue + Clone>(
    queue: Q,
    mut count: impl FnMut() -> usize,
    mut drain: impl FnMut(),
) {
    let receiver = WebhookReceiver::new(Stripe::new(SECRET).unwrap(), queue);
    let addr = serve(Router::new().route("/hook", post_service(receiver))).await;
    let mut tasks = Vec::new();
    for i in 0..100 {
        tasks.push(tokio::spawn(async move {
            let wire = stripe_delivery(&format!("{{\"id\":\"evt_s120_full_{i}\"}}"));
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(wire.as_bytes()).await.unwrap();
            let mut buf = Vec::new();
            (i, read_resp(&mut s, &mut buf, false).await.unwrap())
        }));
    }
    let mut refused = Vec::new();
    let mut ok = 0;
    for t in tasks {
        let (i, r) = t.await.unwrap();
        match r.status {
            200 => ok += 1,
            503 => {
                assert!(r.header("retry-after").is_some(), "{r:?}");
                assert!(!r.body.contains(SECRET));
                refused.push(i);
            }
            s => panic!("{s}: {r:?}"),
        }
    }
    assert_eq!(ok, count(), "every 200 is a queued event");
    assert_eq!(ok, 10);
    drain();
    for i in refused {
        let wire = stripe_delivery(&format!("{{\"id\":\"evt_s120_full_{i}\"}}"));
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(wire.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let r = read_resp(&mut s, &mut buf, false).await.unwrap();
        assert_eq!(r.status, 200, "redelivery of {i}: {r:?}");
        drain();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s120_webhook_memory_full_queue_acknowledges_only_what_it_queued() {
    timeout(T, async {
        let (queue, events) = MemoryQueue::new(10);
        let events = Arc::new(std::sync::Mutex::new(events));
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (e1, s1) = (events.clone(), seen.clone());
        let (e2, s2) = (events.clone(), seen.clone());
        full_queue(
            queue,
            move || {
                let mut e = e1.lock().unwrap();
                while let Some(ev) = e.try_recv() {
                    s1.lock().unwrap().push(ev.id);
                }
                s1.lock().unwrap().len()
            },
            move || {
                let mut e = e2.lock().unwrap();
                while let Some(ev) = e.try_recv() {
                    s2.lock().unwrap().push(ev.id);
                }
            },
        )
        .await;
        let mut ids = seen.lock().unwrap().clone();
        ids.sort();
        let n = ids.len();
        ids.dedup();
        assert_eq!(ids.len(), n, "no event queued twice");
        assert_eq!(n, 100);
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s120_webhook_redis_full_backlog_acknowledges_only_what_it_queued() {
    let stream = uniq("backlog");
    timeout(T, async {
        let queue = sturdy::redis::RedisStreamQueue::connect(&redis_url(), stream.clone())
            .await
            .unwrap()
            .with_max_backlog(10);
        let s1 = stream.clone();
        let s2 = stream.clone();
        full_queue(
            queue,
            move || redis_cli(&["XLEN", &s1])[0].parse().unwrap(),
            move || {
                // Make room: trim the stream (no consumer group reads it here).
                redis_cli(&["XTRIM", &s2, "MAXLEN", "0"]);
            },
        )
        .await;
    })
    .await
    .unwrap();
    redis_cleanup(&stream).await;
}

/// A request refused on its head (no key; a declared body over the limit; a webhook without a
/// signature) whose body is itself a whole keyed request: the body is never read as a request
/// of its own on that connection, so nothing runs and nothing is queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s120_a_refused_requests_body_is_never_read_as_a_request() {
    timeout(T, async {
        let c = ctx(0);
        let (queue, mut events) = MemoryQueue::new(10);
        let receiver = WebhookReceiver::new(Stripe::new(SECRET).unwrap(), queue);
        let app = app(mem_layer().with_body_limit(64), c.clone(), None)
            .route("/hook", post_service(receiver));
        let addr = serve(app).await;
        let inner_order = request("/orders", &[("idempotency-key", "k-smuggled")], "s");
        let inner_hook = stripe_delivery(r#"{"id":"evt_s120_smuggled"}"#);
        let cases: Vec<(String, u16)> = vec![
            // No key on a route that requires one.
            (request("/orders", &[], &inner_order), 400),
            // Over the layer's body limit, declared.
            (
                request(
                    "/orders",
                    &[("idempotency-key", "k-outer")],
                    &format!("{inner_order}{}", " ".repeat(100)),
                ),
                413,
            ),
            // A webhook without a signature header.
            (request("/hook", &[], &inner_hook), 400),
        ];
        for (wire, status) in cases {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(wire.as_bytes()).await.unwrap();
            let mut buf = Vec::new();
            let r = read_resp(&mut s, &mut buf, false).await.expect("an answer");
            assert_eq!(r.status, status, "{r:?}");
            // Whatever comes next on this connection is not a second answer.
            let next = timeout(
                Duration::from_millis(300),
                read_resp(&mut s, &mut buf, false),
            )
            .await;
            if let Ok(Some(n)) = next {
                panic!("a second answer on the connection: {n:?}");
            }
        }
        sleep(Duration::from_millis(50)).await;
        assert_eq!(c.runs.load(Ordering::SeqCst), 0);
        assert!(events.try_recv().is_none());
    })
    .await
    .unwrap();
}

/// Redis: 40 connections send the same keyed request at once, a seeded half of them close
/// while the handler runs: one run, every answer 201 or 409 in flight, and every retry gets the
/// stored answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s120_redis_same_key_from_forty_connections_half_closed_mid_handler() {
    let (layer, prefix) = redis_layer("forty").await;
    timeout(T, async {
        let c = ctx(250);
        let addr = serve(app(layer.clone(), c.clone(), None)).await;
        let h = [("idempotency-key", "k-40"), ("authorization", "Bearer t")];
        let mut seed: u64 = 0x5120;
        let mut tasks = Vec::new();
        for _ in 0..40 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let cut = (seed >> 33).is_multiple_of(2);
            tasks.push(tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.unwrap();
                s.write_all(request("/orders", &h, "same").as_bytes())
                    .await
                    .unwrap();
                if cut {
                    sleep(Duration::from_millis(30)).await;
                    return None;
                }
                let mut buf = Vec::new();
                read_resp(&mut s, &mut buf, false).await
            }));
        }
        let mut firsts = 0;
        for t in tasks {
            if let Some(r) = t.await.unwrap() {
                if r.status == 201 {
                    if r.header("idempotent-replayed").is_none() {
                        firsts += 1;
                    }
                } else {
                    r.assert_problem(409, problem::IN_FLIGHT);
                }
            }
        }
        assert!(firsts <= 1);
        let r = settle(addr, "/orders", &h, "same").await;
        assert_eq!(r.status, 201, "{r:?}");
        assert_eq!(r.body, "order 1: same");
        assert_eq!(c.runs.load(Ordering::SeqCst), 1);
        timeout(T, layer.wait_idle()).await.unwrap();
    })
    .await
    .unwrap();
    redis_cleanup(&prefix).await;
}

/// 100 connections send one signed delivery at once, half of them cut mid-body: only whole
/// deliveries are answered 200, one event is queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s120_webhook_half_cut_replays_at_once_queue_one_event() {
    timeout(T, async {
        let (queue, mut events) = MemoryQueue::new(1000);
        let receiver = WebhookReceiver::new(Stripe::new(SECRET).unwrap(), queue);
        let addr = serve(Router::new().route("/hook", post_service(receiver))).await;
        let wire = stripe_delivery(r#"{"id":"evt_s120_half","type":"x","pad":"abcdefghij"}"#);
        let mut tasks = Vec::new();
        for i in 0..100 {
            let w = wire.clone();
            tasks.push(tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.unwrap();
                if i % 2 == 0 {
                    s.write_all(&w.as_bytes()[..w.len() - 7]).await.unwrap();
                    s.shutdown().await.unwrap();
                } else {
                    s.write_all(w.as_bytes()).await.unwrap();
                }
                let mut buf = Vec::new();
                (i, read_resp(&mut s, &mut buf, false).await)
            }));
        }
        for t in tasks {
            let (i, r) = t.await.unwrap();
            if i % 2 == 0 {
                if let Some(r) = r {
                    assert_eq!(r.status, 400, "cut {i}: {r:?}");
                    assert_eq!(r.body, "unreadable body");
                }
            } else {
                let r = r.expect("an answer");
                assert_eq!(r.status, 200, "whole {i}: {r:?}");
            }
        }
        assert_eq!(events.try_recv().unwrap().id, "evt_s120_half");
        assert!(events.try_recv().is_none());
    })
    .await
    .unwrap();
}

/// A short lease (30 ms, renewed every 10 ms) over a handler of 400 ms, with retries hammering
/// the key the whole time from new connections after the first closed: the lock is renewed,
/// every retry is 409 until the outcome is stored, one run.
async fn short_lease_hammered<St: IdempotencyStore + Clone>(store: St) {
    let layer = IdempotencyLayer::new(store, ByCredentials::default())
        .with_require_key(true)
        .with_lease(Duration::from_millis(30))
        .unwrap();
    let c = ctx(400);
    let addr = serve(app(layer.clone(), c.clone(), None)).await;
    let h = [("idempotency-key", "k-short-lease")];
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request("/orders", &h, "x").as_bytes())
        .await
        .unwrap();
    sleep(Duration::from_millis(30)).await;
    drop(s);
    let start = Instant::now();
    let mut n409 = 0;
    loop {
        let r = post_once(addr, "/orders", &h, "x").await;
        if r.status == 409 {
            n409 += 1;
            sleep(Duration::from_millis(5)).await;
            continue;
        }
        assert_eq!(r.status, 201, "{r:?}");
        assert_eq!(
            r.header("idempotent-replayed"),
            Some("true"),
            "ran again after {:?} ({n409} x 409): {r:?}",
            start.elapsed()
        );
        break;
    }
    assert!(n409 > 0);
    assert_eq!(c.runs.load(Ordering::SeqCst), 1);
    timeout(T, layer.wait_idle()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s120_memory_short_lease_is_renewed_under_hammering_retries() {
    timeout(T, short_lease_hammered(MemoryStore::default()))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s120_redis_short_lease_is_renewed_under_hammering_retries() {
    let prefix = uniq("short");
    let store = sturdy::redis::RedisIdempotencyStore::connect(&redis_url())
        .await
        .unwrap()
        .with_prefix(prefix.clone());
    timeout(T, short_lease_hammered(store)).await.unwrap();
    redis_cleanup(&prefix).await;
}

/// The replay carries every header line the handler set, in order and byte for byte (two
/// `Set-Cookie`, a value beyond ASCII), and the body; not the connection-level ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s120_replay_keeps_repeated_and_opaque_headers() {
    timeout(T, async {
        let app = Router::new()
            .route(
                "/h",
                post(|| async {
                    let mut res = axum::response::Response::new(axum::body::Body::from("made"));
                    *res.status_mut() = StatusCode::CREATED;
                    let h = res.headers_mut();
                    h.append("set-cookie", "a=1; Path=/".parse().unwrap());
                    h.append("set-cookie", "b=2; Path=/".parse().unwrap());
                    h.append(
                        "x-opaque",
                        http::HeaderValue::from_bytes(b"caf\xe9 \xff").unwrap(),
                    );
                    res
                }),
            )
            .layer(mem_layer());
        let addr = serve(app).await;
        let h = [("idempotency-key", "k-h")];
        let raw = |wire: String| async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(wire.as_bytes()).await.unwrap();
            s.write_all(b"").await.unwrap();
            let mut out = Vec::new();
            let _ = timeout(Duration::from_millis(500), s.read_to_end(&mut out)).await;
            out
        };
        let mut wire = request("/h", &h, "");
        wire = wire.replacen("\r\n", "\r\nconnection: close\r\n", 1);
        let first = raw(wire.clone()).await;
        let again = raw(wire).await;
        let lines = |b: &[u8]| -> Vec<Vec<u8>> {
            let end = find(b, b"\r\n\r\n").unwrap();
            b[..end]
                .split(|c| *c == b'\n')
                .map(|l| l.strip_suffix(b"\r").unwrap_or(l).to_vec())
                .filter(|l| {
                    let l = String::from_utf8_lossy(l).to_ascii_lowercase();
                    l.starts_with("set-cookie") || l.starts_with("x-opaque")
                })
                .collect()
        };
        assert_eq!(
            lines(&first).len(),
            3,
            "{}",
            String::from_utf8_lossy(&first)
        );
        assert_eq!(
            lines(&first),
            lines(&again),
            "{}",
            String::from_utf8_lossy(&again)
        );
        assert!(again.ends_with(b"made"));
        let text = String::from_utf8_lossy(&again).to_ascii_lowercase();
        assert!(text.contains("idempotent-replayed: true"), "{text}");
    })
    .await
    .unwrap();
}

const SW_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn standard_delivery(id: &str, ts: i64, body: &str) -> String {
    let sig = sturdy::webhook::sign_standard(SW_SECRET, id, ts, body.as_bytes()).unwrap();
    format!(
        "POST /hook HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\nwebhook-id: {id}\r\n\
         webhook-timestamp: {ts}\r\nwebhook-signature: {sig}\r\n\r\n{body}",
        body.len()
    )
}

/// One Standard Webhooks event re-signed 100 times with 100 different timestamps (the sender's
/// retries), all sent at once from 100 connections, into memory and into a Redis stream: every
/// answer 200, one event queued.
async fn resigned_100<Q: sturdy::webhook::EventQueue + Clone>(queue: Q) -> Vec<Resp> {
    let receiver = WebhookReceiver::new(
        sturdy::webhook::StandardWebhooks::new(SW_SECRET).unwrap(),
        queue,
    );
    let addr = serve(Router::new().route("/hook", post_service(receiver))).await;
    let now = now();
    let barrier = Arc::new(tokio::sync::Barrier::new(100));
    let mut tasks = Vec::new();
    for i in 0..100 {
        let b = barrier.clone();
        let wire = standard_delivery("msg_s120_resigned", now - 50 + i, r#"{"n":1}"#);
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            b.wait().await;
            s.write_all(wire.as_bytes()).await.unwrap();
            let mut buf = Vec::new();
            read_resp(&mut s, &mut buf, false).await.unwrap()
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s120_webhook_memory_resigned_copies_at_once_are_queued_once() {
    timeout(T, async {
        let (queue, mut events) = MemoryQueue::new(1000);
        for r in resigned_100(queue).await {
            assert_eq!(r.status, 200, "{r:?}");
        }
        assert_eq!(events.try_recv().unwrap().id, "msg_s120_resigned");
        assert!(events.try_recv().is_none());
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s120_webhook_redis_resigned_copies_at_once_are_queued_once() {
    let stream = uniq("resigned");
    timeout(T, async {
        let queue = sturdy::redis::RedisStreamQueue::connect(&redis_url(), stream.clone())
            .await
            .unwrap();
        for r in resigned_100(queue).await {
            assert_eq!(r.status, 200, "{r:?}");
        }
        let len: u64 = redis_cli(&["XLEN", &stream])[0].parse().unwrap();
        assert_eq!(len, 1);
    })
    .await
    .unwrap();
    redis_cleanup(&stream).await;
}

/// Large deliveries (512 KiB, verified off the workers) replayed 30 times at once while a
/// trickling sender holds another connection: one event, every copy 200, and the server answers
/// other requests meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s120_webhook_large_copies_at_once_keep_the_server_responsive() {
    timeout(T, async {
        let (queue, mut events) = MemoryQueue::new(1000);
        let receiver = WebhookReceiver::new(Stripe::new(SECRET).unwrap(), queue);
        let addr = serve(
            Router::new()
                .route("/hook", post_service(receiver))
                .route("/health", post(fast)),
        )
        .await;
        let body = format!(
            r#"{{"id":"evt_s120_large","pad":"{}"}}"#,
            "p".repeat(512 << 10)
        );
        let wire = stripe_delivery(&body);
        // A trickling sender on the side.
        let trickle = stripe_delivery(r#"{"id":"evt_s120_trickle"}"#);
        let slow = tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            for b in trickle.bytes() {
                s.write_all(&[b]).await.unwrap();
                sleep(Duration::from_millis(2)).await;
            }
            let mut buf = Vec::new();
            read_resp(&mut s, &mut buf, false).await.unwrap()
        });
        let mut tasks = Vec::new();
        for _ in 0..30 {
            let w = wire.clone();
            tasks.push(tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.unwrap();
                s.write_all(w.as_bytes()).await.unwrap();
                let mut buf = Vec::new();
                read_resp(&mut s, &mut buf, false).await.unwrap()
            }));
        }
        let h = health(addr).await;
        for t in tasks {
            let r = t.await.unwrap();
            assert_eq!(r.status, 200, "{r:?}");
        }
        assert!(h < Duration::from_secs(1), "health took {h:?}");
        assert_eq!(slow.await.unwrap().status, 200);
        let mut ids = vec![];
        while let Some(e) = events.try_recv() {
            ids.push(e.id);
        }
        ids.sort();
        assert_eq!(ids, ["evt_s120_large", "evt_s120_trickle"]);
    })
    .await
    .unwrap();
}

/// A response over the response limit, to a client that never reads it: "a handler whose
/// response is larger has run, so it is not run again; its key replays a 500
/// `…/idempotency-response-too-large`". The stalled reader must neither hold the key past the
/// lease nor let a retry run the handler a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s120_an_oversized_answer_to_a_client_that_never_reads_is_not_run_twice() {
    timeout(T, async {
        let layer = mem_layer().with_response_limit(64 << 10);
        let runs = Arc::new(AtomicUsize::new(0));
        let r2 = runs.clone();
        let app = Router::new()
            .route(
                "/big",
                post(move |_body: String| {
                    let runs = r2.clone();
                    async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        (StatusCode::CREATED, "y".repeat(8 << 20))
                    }
                }),
            )
            .layer(layer.clone());
        let addr = serve(app).await;
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        let mut stalled = sock.connect(addr).await.unwrap();
        stalled
            .write_all(request("/big", &[("idempotency-key", "k-over")], "b").as_bytes())
            .await
            .unwrap();
        // Two leases (300 ms each) and more.
        sleep(Duration::from_millis(800)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        let t = Instant::now();
        let r = post_once(addr, "/big", &[("idempotency-key", "k-over")], "b").await;
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(
            runs.load(Ordering::SeqCst),
            1,
            "the handler ran again: {} {:?}",
            r.status,
            &r.body[..r.body.len().min(200)]
        );
        r.assert_problem(500, problem::RESPONSE_TOO_LARGE);
        assert_eq!(r.header("idempotent-replayed"), Some("true"));
        drop(stalled);
        let r = settle(addr, "/big", &[("idempotency-key", "k-over")], "b").await;
        r.assert_problem(500, problem::RESPONSE_TOO_LARGE);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        timeout(T, layer.wait_idle()).await.unwrap();
    })
    .await
    .unwrap();
}

/// `with_cookies(["session_id"])` reads the named cookie wherever the client put it (a second
/// `Cookie` line, as HTTP/2 clients split them; no space after `;`), and only that cookie:
/// one session's stored answer goes to that session alone, never to another or to a cookie
/// whose name merely ends or starts the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s120_named_session_cookie_is_found_on_any_line_and_only_there() {
    timeout(T, async {
        let layer = IdempotencyLayer::new(
            MemoryStore::default(),
            ByCredentials::default().with_cookies(["session_id"]),
        )
        .with_require_key(true);
        let c = ctx(0);
        let addr = serve(app(layer, c.clone(), None)).await;
        let k = ("idempotency-key", "k-cookie");
        let alice = post_once(
            addr,
            "/orders",
            &[k, ("cookie", "analytics=1"), ("cookie", "session_id=alice")],
            "x",
        )
        .await;
        assert_eq!(alice.body, "order 1: x");
        for same in [
            vec![("cookie", "session_id=alice; analytics=2")],
            vec![("cookie", "analytics=3;session_id=alice")],
            vec![("cookie", "session_id=alice"), ("cookie", "analytics=4")],
        ] {
            let mut h = vec![k];
            h.extend(same.iter().copied());
            let r = post_once(addr, "/orders", &h, "x").await;
            assert_eq!(
                (r.status, r.body.as_str(), r.header("idempotent-replayed")),
                (201, "order 1: x", Some("true")),
                "{same:?}"
            );
        }
        for other in [
            vec![("cookie", "session_id=bob")],
            vec![],
            vec![("cookie", "xsession_id=alice")],
            vec![("cookie", "session_id=alice2")],
            vec![("cookie", "session_idx=alice")],
            vec![("cookie", "analytics=1")],
        ] {
            let mut h = vec![k];
            h.extend(other.iter().copied());
            let r = post_once(addr, "/orders", &h, "x").await;
            assert_eq!(r.status, 201, "{other:?}: {r:?}");
            assert_ne!(r.body, "order 1: x", "{other:?} got alice's answer");
        }
        // alice, bob, the anonymous scope (shared by the cookies not named), alice2.
        assert_eq!(c.runs.load(Ordering::SeqCst), 4);
    })
    .await
    .unwrap();
}

/// Redis: cut bodies, bare heads and a connection closed mid-handler leave no lock behind in
/// Redis: nothing for the requests that never started, and for the one that ran, its stored
/// answer only (no lock past the lease).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s120_redis_cut_requests_leave_no_lock_behind() {
    let (layer, prefix) = redis_layer("cut").await;
    timeout(T, async {
        let c = ctx(100);
        let addr = serve(app(layer.clone(), c.clone(), None)).await;
        let wires = [
            "POST /orders HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\nidempotency-key: k-a\r\n\r\n0123",
            "POST /orders HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\nidempotency-key: k-b\r\n\r\n",
            "POST /orders HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nidempotency-key: k-c\r\n\r\n2\r\nab\r\n",
            "POST /orders HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\nidempotency-key: k-d\r\n\r\nab",
        ];
        for w in wires {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(w.as_bytes()).await.unwrap();
            sleep(Duration::from_millis(30)).await;
            drop(s);
        }
        assert_eq!(c.runs.load(Ordering::SeqCst), 1, "only k-d ran");
        timeout(T, layer.wait_idle()).await.unwrap();
        // 300 ms lease: wait past it, then look at what is left.
        sleep(Duration::from_millis(350)).await;
        let keys = redis_keys(&prefix).await;
        assert_eq!(keys.len(), 1, "{keys:?}");
        assert!(keys[0].1 > 3_600_000, "the stored answer, kept for the TTL: {keys:?}");
        let r = post_once(addr, "/orders", &[("idempotency-key", "k-d")], "ab").await;
        assert_eq!(r.header("idempotent-replayed"), Some("true"), "{r:?}");
        for k in ["k-a", "k-b", "k-c"] {
            let r = post_once(addr, "/orders", &[("idempotency-key", k)], "zz").await;
            assert_eq!(r.status, 201, "{k}: {r:?}");
            assert_eq!(r.header("idempotent-replayed"), None);
        }
        assert_eq!(c.runs.load(Ordering::SeqCst), 4);
    })
    .await
    .unwrap();
    redis_cleanup(&prefix).await;
}

/// hyper's own HTTP/1 client, with a streamed body that fails after its first frame (the
/// client aborts the request): no run, the key stays free; the same key over a kept
/// connection then runs once and replays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s120_hyper_client_body_stream_that_fails_midway() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full, StreamBody};
    use hyper::body::Frame;
    timeout(T, async {
        let c = ctx(0);
        let addr = serve(app(mem_layer(), c.clone(), None)).await;
        type BoxErr = Box<dyn std::error::Error + Send + Sync>;
        let stream = futures_util::stream::unfold(0u8, |n| async move {
            match n {
                0 => Some((Ok::<_, BoxErr>(Frame::data(Bytes::from_static(b"ab"))), 1)),
                1 => {
                    sleep(Duration::from_millis(50)).await;
                    Some((Err("the sender gave up".into()), 2))
                }
                _ => None,
            }
        });
        let io = hyper_util::rt::TokioIo::new(TcpStream::connect(addr).await.unwrap());
        let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        let req = http::Request::post("/orders")
            .header("host", "x")
            .header("idempotency-key", "k-hyper")
            .body(StreamBody::new(stream))
            .unwrap();
        let res = send.send_request(req).await;
        assert!(
            res.is_err() || !res.as_ref().unwrap().status().is_success(),
            "{res:?}"
        );
        sleep(Duration::from_millis(50)).await;
        assert_eq!(c.runs.load(Ordering::SeqCst), 0);

        let io = hyper_util::rt::TokioIo::new(TcpStream::connect(addr).await.unwrap());
        let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        let mut bodies = Vec::new();
        for _ in 0..3 {
            send.ready().await.unwrap();
            let req = http::Request::post("/orders")
                .header("host", "x")
                .header("idempotency-key", "k-hyper")
                .body(Full::new(Bytes::from_static(b"abcd")))
                .unwrap();
            let res = send.send_request(req).await.unwrap();
            assert_eq!(res.status(), 201);
            let replayed = res.headers().contains_key("idempotent-replayed");
            let body = res.into_body().collect().await.unwrap().to_bytes();
            bodies.push((replayed, body));
        }
        assert!(!bodies[0].0 && bodies[1].0 && bodies[2].0, "{bodies:?}");
        assert!(bodies.iter().all(|b| b.1 == bodies[0].1));
        assert_eq!(c.runs.load(Ordering::SeqCst), 1);
    })
    .await
    .unwrap();
}
