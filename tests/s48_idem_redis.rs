//! The server idempotency layer over `RedisIdempotencyStore` when Redis hangs, resets or is cut
//! off, from the outside:
//!
//! - sturdy-redis crate docs: "Every operation has a timeout \[1 s\], and connecting one of 2 s: a
//!   Redis that is down or hung gives a clear error, never a hang."
//! - `RedisIdempotencyStore::with_timeout`: "The timeout of each operation \[1 s\]."
//! - server module docs: "store unavailable or full | 503, `Retry-After: 1`,
//!   `problem::STORE_UNAVAILABLE`; the handler does not run".
//! - idempotency guide, "Guarantees, per failure": store down when the request arrives (the lock
//!   `begin` may have taken is released in the background, "a later retry with the same key runs
//!   normally once the store answers again"), store down when the response is stored ("the
//!   handler's response; a retry within the lease gets 409"), client gone while the store is
//!   locking the key.
//! - RELIABILITY.md: "On one server no command is sent twice", "an idempotent request runs only
//!   after Redis answered that its lock is taken".
//!
//! Redis is the shared test server behind a proxy of this file's own (loopback, port 0) that can
//! hold answers back, cut a connection before or after passing a command on, or refuse
//! everything; and fake Redis servers of this file's own that accept and never answer, answer
//! the handshake and then stall, or reset. Real time, millisecond-scale timeouts, generous
//! margins. Unique key prefixes; nothing is sent to the shared server that slows it.
#![cfg(feature = "full")]

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, StatusCode};
use http_body_util::BodyExt;
use sturdy::core::{Error as SturdyError, ErrorKind};
use sturdy::idempotency::server::{problem, ByCredentials, IdempotencyLayer};
use sturdy::redis::RedisIdempotencyStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt};

// ---------------------------------------------------------------------------------------------
// A proxy in front of the shared Redis.

const PASS: u8 = 0;
/// Commands go on to Redis (and run); the answers are held until the mode is `PASS` again.
const HOLD: u8 = 1;
/// The next command goes on to Redis, then the client's connection is reset (answer lost).
const CUT_AFTER: u8 = 2;
/// The next command is not passed on; the client's connection is reset.
const CUT_BEFORE: u8 = 3;
/// Redis is "down": every connection is reset at once, nothing is passed on.
const DOWN: u8 = 4;
/// As `CUT_AFTER`, then Redis is down (`DOWN`) instead of back.
const CUT_AFTER_THEN_DOWN: u8 = 5;

fn redis_addr() -> Option<String> {
    let url = std::env::var("STURDY_REDIS_URL").ok()?;
    let rest = url.strip_prefix("redis://")?;
    Some(rest.trim_end_matches('/').to_string())
}

fn unique(tag: &str) -> String {
    let nanos = sturdy::core::WallClock::now(&sturdy::core::clock::SystemClock)
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("s48:{tag}:{nanos}")
}

struct Proxy {
    url: String,
    mode: Arc<AtomicU8>,
}

impl Proxy {
    async fn start(upstream: String) -> Self {
        let mode = Arc::new(AtomicU8::new(PASS));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let m = mode.clone();
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let _ = client.set_zero_linger();
                if m.load(Ordering::SeqCst) == DOWN {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                tokio::spawn(pipe(client, server, m.clone()));
            }
        });
        Self {
            url: format!("redis://{addr}/"),
            mode,
        }
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }
}

async fn pipe(client: TcpStream, server: TcpStream, mode: Arc<AtomicU8>) {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let m = mode.clone();
    let d = mode.clone();
    let up = async move {
        let mut buf = vec![0u8; 16384];
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => n,
            };
            match m.load(Ordering::SeqCst) {
                CUT_BEFORE | DOWN => {
                    let _ =
                        m.compare_exchange(CUT_BEFORE, PASS, Ordering::SeqCst, Ordering::SeqCst);
                    return false;
                }
                CUT_AFTER | CUT_AFTER_THEN_DOWN => {
                    let _ = sw.write_all(&buf[..n]).await;
                    // Let Redis run it (its answer is held, see `down`); the mode goes back to
                    // `PASS` once this connection is gone.
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    return true;
                }
                _ => {
                    if sw.write_all(&buf[..n]).await.is_err() {
                        return false;
                    }
                }
            }
        }
    };
    let down = async move {
        let mut buf = vec![0u8; 16384];
        loop {
            let n = match sr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            loop {
                match d.load(Ordering::SeqCst) {
                    HOLD | CUT_AFTER | CUT_AFTER_THEN_DOWN => {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    DOWN => return,
                    _ => break,
                }
            }
            if cw.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    // Either direction ending closes both (the client's side with a reset).
    let cut = tokio::select! {
        cut = up => cut,
        () = down => false,
    };
    if cut {
        let _ = mode.compare_exchange(CUT_AFTER, PASS, Ordering::SeqCst, Ordering::SeqCst);
        let _ = mode.compare_exchange(
            CUT_AFTER_THEN_DOWN,
            DOWN,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Fake Redis servers.

/// Splits complete RESP commands off the front of `buf`.
fn take_commands(buf: &mut Vec<u8>) -> Vec<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    while let Some((cmd, used)) = parse_one(buf) {
        buf.drain(..used);
        out.push(cmd);
    }
    out
}

fn line_at(buf: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let rel = buf.get(at..)?.windows(2).position(|w| w == b"\r\n")?;
    Some((&buf[at..at + rel], at + rel + 2))
}

fn parse_one(buf: &[u8]) -> Option<(Vec<Vec<u8>>, usize)> {
    if buf.first()? != &b'*' {
        let (line, next) = line_at(buf, 0)?;
        return Some((
            line.split(|b| *b == b' ').map(<[u8]>::to_vec).collect(),
            next,
        ));
    }
    let (line, mut at) = line_at(buf, 1)?;
    let n: usize = std::str::from_utf8(line).ok()?.parse().ok()?;
    let mut parts = Vec::with_capacity(n);
    for _ in 0..n {
        if buf.get(at)? != &b'$' {
            return None;
        }
        let (l, next) = line_at(buf, at + 1)?;
        let len: usize = std::str::from_utf8(l).ok()?.parse().ok()?;
        if buf.len() < next + len + 2 {
            return None;
        }
        parts.push(buf[next..next + len].to_vec());
        at = next + len + 2;
    }
    Some((parts, at))
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fake {
    /// Accepts, never reads, never answers.
    Silent,
    /// Resets each connection as soon as it is accepted.
    Reset,
    /// Answers the connection handshake (CLIENT, SELECT, AUTH, PING), then never answers again.
    HandshakeThenStall,
    /// Answers the handshake, then resets the connection at the first other command.
    HandshakeThenReset,
}

/// A fake Redis on 127.0.0.1:0; the URL and a count of commands other than the handshake seen.
async fn fake(kind: Fake) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let others = Arc::new(AtomicUsize::new(0));
    let seen = others.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let _ = s.set_zero_linger();
            match kind {
                Fake::Silent => held.push(s),
                Fake::Reset => drop(s),
                Fake::HandshakeThenStall | Fake::HandshakeThenReset => {
                    let seen = seen.clone();
                    tokio::spawn(async move {
                        let mut buf = Vec::new();
                        let mut chunk = [0u8; 4096];
                        let mut stalled = false;
                        loop {
                            let n = match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            buf.extend_from_slice(&chunk[..n]);
                            for cmd in take_commands(&mut buf) {
                                let name = cmd
                                    .first()
                                    .map(|c| String::from_utf8_lossy(c).to_uppercase())
                                    .unwrap_or_default();
                                let reply: &[u8] = match name.as_str() {
                                    "CLIENT" | "SELECT" | "AUTH" => b"+OK\r\n",
                                    "PING" => b"+PONG\r\n",
                                    "HELLO" => b"-ERR unknown command 'HELLO'\r\n",
                                    _ => {
                                        seen.fetch_add(1, Ordering::SeqCst);
                                        if kind == Fake::HandshakeThenReset {
                                            return;
                                        }
                                        stalled = true;
                                        b""
                                    }
                                };
                                if !stalled && s.write_all(reply).await.is_err() {
                                    return;
                                }
                            }
                        }
                    });
                }
            }
        }
    });
    (format!("redis://{addr}/"), others)
}

// ---------------------------------------------------------------------------------------------
// The app.

type App = axum::Router;

fn app(
    store: RedisIdempotencyStore,
    runs: Arc<AtomicUsize>,
    on_run: Option<(Arc<AtomicU8>, u8)>,
) -> App {
    let layer = IdempotencyLayer::new(store, ByCredentials::default())
        .with_lease(Duration::from_secs(20))
        .unwrap();
    axum::Router::new()
        .route(
            "/orders",
            axum::routing::post(move |body: String| {
                let runs = runs.clone();
                let on_run = on_run.clone();
                async move {
                    let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                    if let Some((mode, to)) = on_run {
                        mode.store(to, Ordering::SeqCst);
                    }
                    (StatusCode::CREATED, format!("run {n}: {body}"))
                }
            }),
        )
        .layer(layer)
}

fn order(key: &str) -> Request<axum::body::Body> {
    Request::post("/orders")
        .header("authorization", "Bearer s48")
        .header("idempotency-key", key)
        .body(axum::body::Body::from("book"))
        .unwrap()
}

async fn body_text(res: http::Response<axum::body::Body>) -> (StatusCode, http::HeaderMap, String) {
    let (parts, body) = res.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

/// Asserts the 503 of the module docs: `Retry-After: 1`, the store-unavailable problem type.
fn assert_store_unavailable(status: StatusCode, headers: &http::HeaderMap, body: &str, ctx: &str) {
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{ctx}: {body}");
    assert_eq!(
        headers.get("retry-after").map(|v| v.to_str().unwrap()),
        Some("1"),
        "{ctx}: {headers:?}"
    );
    assert!(
        body.contains(problem::STORE_UNAVAILABLE),
        "{ctx}: not the store-unavailable problem: {body}"
    );
}

/// Retries `key` until it is answered 201 (409 and 503 are the transient answers the guide
/// allows while a release is on its way), within `within`.
async fn retry_until_created(
    app: &App,
    key: &str,
    within: Duration,
) -> (StatusCode, String, Vec<StatusCode>) {
    let t0 = Instant::now();
    let mut seen = Vec::new();
    loop {
        let res = tokio::time::timeout(Duration::from_secs(3), app.clone().oneshot(order(key)))
            .await
            .expect("a retry hung")
            .unwrap();
        let (status, _, body) = body_text(res).await;
        seen.push(status);
        if status != StatusCode::CONFLICT && status != StatusCode::SERVICE_UNAVAILABLE {
            return (status, body, seen);
        }
        if t0.elapsed() > within {
            return (status, body, seen);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn proxied_store(tag: &str, timeout: Duration) -> Option<(Proxy, RedisIdempotencyStore)> {
    let Some(up) = redis_addr() else {
        eprintln!("STURDY_REDIS_URL unset: skipped");
        return None;
    };
    let proxy = Proxy::start(up).await;
    let store = RedisIdempotencyStore::connect(&proxy.url)
        .await
        .expect("connect through the proxy")
        .with_prefix(unique(tag))
        .with_timeout(timeout);
    Some((proxy, store))
}

// ---------------------------------------------------------------------------------------------
// Redis hung when the request arrives.

#[tokio::test]
async fn a_hung_begin_is_a_503_within_the_timeout_and_a_later_retry_runs_once() {
    let Some((proxy, store)) = proxied_store("hung-begin", Duration::from_millis(200)).await else {
        return;
    };
    let runs = Arc::new(AtomicUsize::new(0));
    let app = app(store, runs.clone(), None);
    // Warm up: the connection and the script are known.
    let (status, _, _) = body_text(app.clone().oneshot(order("warm")).await.unwrap()).await;
    assert_eq!(status, StatusCode::CREATED);
    runs.store(0, Ordering::SeqCst);

    proxy.set(HOLD);
    let t0 = Instant::now();
    let res = tokio::time::timeout(Duration::from_secs(4), app.clone().oneshot(order("k1")))
        .await
        .expect("the layer hung on a hung Redis")
        .unwrap();
    let took = t0.elapsed();
    let (status, headers, body) = body_text(res).await;
    assert_store_unavailable(status, &headers, &body, &format!("hung begin ({took:?})"));
    assert!(
        took >= Duration::from_millis(150),
        "answered before the timeout: {took:?}"
    );
    assert!(
        took <= Duration::from_millis(1000),
        "the 200 ms timeout did not bound it: {took:?}"
    );
    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "the handler ran without a lock"
    );

    // Redis answers again: the lock the hung `begin` took (it ran in Redis) is released in the
    // background, so a retry runs once (lease 20 s: not the lease running out).
    tokio::time::sleep(Duration::from_millis(100)).await;
    proxy.set(PASS);
    let (status, body, seen) = retry_until_created(&app, "k1", Duration::from_secs(3)).await;
    assert_eq!(status, StatusCode::CREATED, "after {seen:?}: {body}");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let res = app.clone().oneshot(order("k1")).await.unwrap();
    assert_eq!(res.headers().get("idempotent-replayed").unwrap(), "true");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran twice");
}

#[tokio::test]
async fn a_request_dropped_while_begin_hangs_leaves_the_key_free_once_redis_answers() {
    let Some((proxy, store)) = proxied_store("dropped-begin", Duration::from_millis(200)).await
    else {
        return;
    };
    let runs = Arc::new(AtomicUsize::new(0));
    let app = app(store, runs.clone(), None);
    let _ = app.clone().oneshot(order("warm")).await.unwrap();
    runs.store(0, Ordering::SeqCst);

    proxy.set(HOLD);
    // The client goes away at seeded moments while `begin` hangs.
    for (i, ms) in [1u64, 30, 120, 190].into_iter().enumerate() {
        let key = format!("drop-{i}");
        let r =
            tokio::time::timeout(Duration::from_millis(ms), app.clone().oneshot(order(&key))).await;
        assert!(r.is_err(), "answered within {ms} ms although Redis hangs");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "a handler ran without a lock"
    );
    proxy.set(PASS);
    for i in 0..4 {
        let key = format!("drop-{i}");
        let (status, body, seen) = retry_until_created(&app, &key, Duration::from_secs(3)).await;
        assert_eq!(status, StatusCode::CREATED, "{key}: after {seen:?}: {body}");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 4);
}

// ---------------------------------------------------------------------------------------------
// Connections cut around `begin`.

#[tokio::test]
async fn a_connection_cut_after_begin_was_written_is_a_503_and_the_retry_runs_once() {
    for (mode, name) in [(CUT_AFTER, "after"), (CUT_BEFORE, "before")] {
        let Some((proxy, store)) =
            proxied_store(&format!("cut-{name}"), Duration::from_millis(300)).await
        else {
            return;
        };
        let runs = Arc::new(AtomicUsize::new(0));
        let app = app(store, runs.clone(), None);
        let _ = app.clone().oneshot(order("warm")).await.unwrap();
        runs.store(0, Ordering::SeqCst);

        proxy.set(mode);
        let t0 = Instant::now();
        let res = tokio::time::timeout(Duration::from_secs(4), app.clone().oneshot(order("k")))
            .await
            .expect("the layer hung on a cut connection")
            .unwrap();
        let took = t0.elapsed();
        let (status, headers, body) = body_text(res).await;
        assert_store_unavailable(status, &headers, &body, &format!("cut {name} ({took:?})"));
        assert!(took <= Duration::from_millis(1200), "cut {name}: {took:?}");
        assert_eq!(
            runs.load(Ordering::SeqCst),
            0,
            "cut {name}: ran without a lock"
        );

        let (status, body, seen) = retry_until_created(&app, "k", Duration::from_secs(3)).await;
        assert_eq!(
            status,
            StatusCode::CREATED,
            "cut {name}: after {seen:?}: {body}"
        );
        let _ = app.clone().oneshot(order("k")).await.unwrap();
        assert_eq!(
            runs.load(Ordering::SeqCst),
            1,
            "cut {name}: the handler ran twice"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Redis hung or down while the response is stored.

#[tokio::test]
async fn a_store_hung_while_the_response_is_stored_still_answers_and_never_runs_twice() {
    let Some((proxy, store)) = proxied_store("hung-complete", Duration::from_millis(150)).await
    else {
        return;
    };
    let runs = Arc::new(AtomicUsize::new(0));
    let app = app(store, runs.clone(), Some((proxy.mode.clone(), HOLD)));
    let t0 = Instant::now();
    let res = tokio::time::timeout(Duration::from_secs(4), app.clone().oneshot(order("k")))
        .await
        .expect("the layer hung while storing on a hung Redis")
        .unwrap();
    let took = t0.elapsed();
    let (status, _, body) = body_text(res).await;
    // "the handler's response": three tries and a marker, each bounded by 150 ms, 150 ms apart.
    assert_eq!(status, StatusCode::CREATED, "{took:?}: {body}");
    assert!(
        took <= Duration::from_millis(2000),
        "storing was not bounded: {took:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    proxy.set(PASS);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The stores ran in Redis (their answers were held), so a retry gets 409 or the stored
    // response, never a second run.
    for _ in 0..3 {
        let res = tokio::time::timeout(Duration::from_secs(3), app.clone().oneshot(order("k")))
            .await
            .expect("hung")
            .unwrap();
        let (status, _, body) = body_text(res).await;
        assert!(
            status == StatusCode::CONFLICT || status == StatusCode::CREATED,
            "{status}: {body}"
        );
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran twice");
}

#[tokio::test]
async fn a_store_down_while_the_response_is_stored_keeps_the_key_locked_within_the_lease() {
    let Some((proxy, store)) = proxied_store("down-complete", Duration::from_millis(150)).await
    else {
        return;
    };
    let runs = Arc::new(AtomicUsize::new(0));
    let app = app(store, runs.clone(), Some((proxy.mode.clone(), DOWN)));
    let t0 = Instant::now();
    let res = tokio::time::timeout(Duration::from_secs(4), app.clone().oneshot(order("k")))
        .await
        .expect("the layer hung while storing on a down Redis")
        .unwrap();
    let took = t0.elapsed();
    let (status, _, body) = body_text(res).await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "the handler's response was not sent ({took:?}): {body}"
    );
    assert!(took <= Duration::from_millis(2000), "{took:?}");
    proxy.set(PASS);
    // "a retry within the lease gets 409" (lease 20 s).
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let res = tokio::time::timeout(Duration::from_secs(3), app.clone().oneshot(order("k")))
            .await
            .expect("hung")
            .unwrap();
        let (status, headers, body) = body_text(res).await;
        statuses.push(status);
        if status == StatusCode::CONFLICT {
            assert_eq!(headers.get("retry-after").unwrap(), "1", "{body}");
            assert!(body.contains(problem::IN_FLIGHT), "{body}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the handler ran again within the lease: {statuses:?}"
    );
    assert!(
        statuses.iter().all(|s| *s == StatusCode::CONFLICT),
        "{statuses:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Composition: a kept service under Buffer and ConcurrencyLimit(1) over a hung store.

#[tokio::test]
async fn a_kept_service_under_a_limit_of_one_is_not_wedged_by_a_hung_store() {
    let Some((proxy, store)) = proxied_store("kept", Duration::from_millis(150)).await else {
        return;
    };
    let runs = Arc::new(AtomicUsize::new(0));
    let app = app(store, runs.clone(), None);
    let _ = app.clone().oneshot(order("warm")).await.unwrap();
    runs.store(0, Ordering::SeqCst);
    let mut svc = ServiceBuilder::new()
        .buffer(8)
        .concurrency_limit(1)
        .service(app.clone());

    proxy.set(HOLD);
    let t0 = Instant::now();
    let mut calls = Vec::new();
    for i in 0..3 {
        let fut = svc.ready().await.unwrap().call(order(&format!("kept-{i}")));
        calls.push(tokio::spawn(fut));
    }
    for (i, c) in calls.into_iter().enumerate() {
        let res = tokio::time::timeout(Duration::from_secs(4), c)
            .await
            .unwrap_or_else(|_| panic!("call {i} hung"))
            .unwrap()
            .unwrap();
        let (status, headers, body) = body_text(res).await;
        assert_store_unavailable(status, &headers, &body, &format!("kept call {i}"));
    }
    let took = t0.elapsed();
    assert!(
        took <= Duration::from_millis(2500),
        "three calls one at a time: {took:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 0);

    proxy.set(PASS);
    // The same kept service works again.
    for i in 0..3 {
        let key = format!("kept-{i}");
        let t1 = Instant::now();
        let status = loop {
            let res = tokio::time::timeout(
                Duration::from_secs(3),
                svc.ready().await.unwrap().call(order(&key)),
            )
            .await
            .expect("the kept service hung")
            .unwrap();
            let status = res.status();
            if status == StatusCode::CREATED || t1.elapsed() > Duration::from_secs(3) {
                break status;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(status, StatusCode::CREATED, "{key}");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 3);
}

// ---------------------------------------------------------------------------------------------
// Fake Redis servers: connecting and operating within the documented bounds.

fn no_url(text: &str, url: &str) {
    let hostport = url.trim_start_matches("redis://").trim_end_matches('/');
    assert!(
        !text.contains(hostport),
        "the message repeats the URL: {text}"
    );
}

#[tokio::test]
async fn connecting_the_store_to_a_redis_that_never_answers_ends_within_two_seconds() {
    for kind in [Fake::Silent, Fake::Reset] {
        let (url, _) = fake(kind).await;
        let t0 = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(4), RedisIdempotencyStore::connect(&url))
            .await
            .unwrap_or_else(|_| panic!("{kind:?}: connect hung past 4 s"));
        let took = t0.elapsed();
        let Err(err) = r else {
            panic!("{kind:?}: connected to a Redis that never answers")
        };
        let text = format!("{err:#}");
        assert!(
            took <= Duration::from_millis(2600),
            "{kind:?}: {took:?}: {text}"
        );
        no_url(&text, &url);
        assert!(text.contains("Redis"), "{kind:?}: {text}");
        if let Some(e) = sturdy::core::find::<SturdyError>(&*err) {
            let want = if kind == Fake::Silent {
                ErrorKind::Timeout
            } else {
                ErrorKind::Connect
            };
            assert_eq!(e.kind(), &want, "{kind:?}: {text}");
        }
    }
}

#[tokio::test]
async fn a_redis_that_stalls_after_the_handshake_gives_503_within_the_default_second() {
    let (url, others) = fake(Fake::HandshakeThenStall).await;
    let t0 = Instant::now();
    let store = tokio::time::timeout(Duration::from_secs(4), RedisIdempotencyStore::connect(&url))
        .await
        .expect("connect hung");
    let connected = t0.elapsed();
    assert!(connected <= Duration::from_millis(2600), "{connected:?}");
    let Ok(store) = store else {
        // Refusing a server that never answers a command is fine too, within the bound.
        return;
    };
    let runs = Arc::new(AtomicUsize::new(0));
    let app = app(store, runs.clone(), None);
    let t1 = Instant::now();
    let res = tokio::time::timeout(Duration::from_secs(4), app.clone().oneshot(order("k")))
        .await
        .expect("the layer hung past 4 s on a stalled Redis (default timeout 1 s)")
        .unwrap();
    let took = t1.elapsed();
    let (status, headers, body) = body_text(res).await;
    assert_store_unavailable(status, &headers, &body, &format!("stalled ({took:?})"));
    assert!(took >= Duration::from_millis(900), "{took:?}");
    assert!(
        took <= Duration::from_millis(1800),
        "default timeout [1 s]: {took:?}"
    );
    assert!(
        others.load(Ordering::SeqCst) >= 1,
        "no command reached the fake"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_redis_that_resets_at_the_first_command_gives_503_at_once() {
    let (url, _) = fake(Fake::HandshakeThenReset).await;
    let Ok(store) = RedisIdempotencyStore::connect(&url).await else {
        return;
    };
    let store = store.with_timeout(Duration::from_millis(500));
    let runs = Arc::new(AtomicUsize::new(0));
    let app = app(store, runs.clone(), None);
    for i in 0..3 {
        let t0 = Instant::now();
        let res = tokio::time::timeout(Duration::from_secs(4), app.clone().oneshot(order("k")))
            .await
            .unwrap_or_else(|_| panic!("request {i} hung"))
            .unwrap();
        let took = t0.elapsed();
        let (status, headers, body) = body_text(res).await;
        assert_store_unavailable(
            status,
            &headers,
            &body,
            &format!("reset, request {i} ({took:?})"),
        );
        assert!(took <= Duration::from_millis(1500), "request {i}: {took:?}");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

/// `RedisStreamConsumer::connect`: "each Redis operation bounded by 1 s (connecting by 2 s)",
/// and the webhook guide: "Every Redis operation is bounded [1 s, `with_timeout` on the queue and
/// on the consumer]: a Redis that is down or hung gives a clear error, never a hang."
#[tokio::test]
async fn webhook_backends_on_a_redis_that_stalls_after_the_handshake_end_in_time() {
    use sturdy::redis::{RedisStreamConsumer, RedisStreamQueue};
    let (url, _) = fake(Fake::HandshakeThenStall).await;
    let t0 = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_millis(4500),
        RedisStreamConsumer::connect(&url, "{s48-stall}", "g", "w", Duration::from_secs(60)),
    )
    .await
    .expect("RedisStreamConsumer::connect hung past 4.5 s");
    let took = t0.elapsed();
    let Err(err) = r else {
        panic!("joined a group on a Redis that never answers")
    };
    let text = format!("{err:#}");
    assert!(
        took <= Duration::from_millis(3500),
        "connect 2 s + one operation 1 s: {took:?}: {text}"
    );
    no_url(&text, &url);

    let (url, _) = fake(Fake::HandshakeThenStall).await;
    let Ok(q) = RedisStreamQueue::connect(&url, "{s48-stall}").await else {
        return;
    };
    let q = q.with_timeout(Duration::from_millis(200));
    let t1 = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(3), q.dead_letter_count())
        .await
        .expect("dead_letter_count hung");
    let took = t1.elapsed();
    let err = r.expect_err("a count from a Redis that never answers");
    assert!(took <= Duration::from_millis(900), "{took:?}: {err}");
    no_url(&format!("{err:#}"), &url);
}

// ---------------------------------------------------------------------------------------------
// Redis down while the handler runs.

/// Guide: "store down while the handler runs | renewal fails and is tried again every third of
/// the lease; the handler keeps running" and "nothing, unless the store stays down past the
/// lease". An outage shorter than the lease: the handler runs once, its response is stored, and a
/// duplicate meanwhile is refused (409 or 503), never run.
#[tokio::test]
async fn an_outage_shorter_than_the_lease_while_the_handler_runs_loses_nothing() {
    let Some((proxy, store)) = proxied_store("renew", Duration::from_millis(100)).await else {
        return;
    };
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let mode = proxy.mode.clone();
    let layer = IdempotencyLayer::new(store, ByCredentials::default())
        .with_lease(Duration::from_millis(600))
        .unwrap();
    let app: App = axum::Router::new()
        .route(
            "/orders",
            axum::routing::post(move |body: String| {
                let r = r.clone();
                let mode = mode.clone();
                async move {
                    let n = r.fetch_add(1, Ordering::SeqCst) + 1;
                    mode.store(DOWN, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    mode.store(PASS, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(600)).await;
                    (StatusCode::CREATED, format!("run {n}: {body}"))
                }
            }),
        )
        .layer(layer);
    let t0 = Instant::now();
    let first = tokio::spawn(app.clone().oneshot(order("k")));
    // A duplicate while the store is down, then while it is back (the handler ends at 900 ms).
    for at in [150u64, 500, 700] {
        tokio::time::sleep_until(t0 + Duration::from_millis(at)).await;
        let res = tokio::time::timeout(Duration::from_secs(3), app.clone().oneshot(order("k")))
            .await
            .expect("a duplicate hung")
            .unwrap();
        let status = res.status();
        assert!(
            status == StatusCode::CONFLICT || status == StatusCode::SERVICE_UNAVAILABLE,
            "a duplicate at {at} ms: {status}"
        );
    }
    let res = tokio::time::timeout(Duration::from_secs(4), first)
        .await
        .expect("the first request hung")
        .unwrap()
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let (status, headers, _) = body_text(app.clone().oneshot(order("k")).await.unwrap()).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(
        headers
            .get("idempotent-replayed")
            .map(|v| v.to_str().unwrap()),
        Some("true")
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran twice");
}

// ---------------------------------------------------------------------------------------------
// with_replication on a server without replicas.

async fn direct_conn() -> Option<sturdy::redis::RedisConnection> {
    let url = std::env::var("STURDY_REDIS_URL").ok()?;
    Some(
        sturdy::redis::RedisConnection::connect(&url)
            .await
            .expect("the test Redis"),
    )
}

/// `with_replication`: "fail when fewer replicas confirm in time: the layer then answers 503
/// without running the handler and releases the lock in the background, so a retry runs at
/// once"; RELIABILITY.md: "Every operation ends within its timeout ... (plus the replication wait
/// below, when one is set)". The test server has no replica: each request is a 503 within the
/// timeout plus the wait, and the key is free for a store without replication afterwards.
#[tokio::test]
async fn replication_that_cannot_be_confirmed_is_a_503_in_time_and_frees_the_key() {
    let Some(conn) = direct_conn().await else {
        eprintln!("STURDY_REDIS_URL unset: skipped");
        return;
    };
    let prefix = unique("repl");
    let strict = RedisIdempotencyStore::new(conn.clone())
        .with_prefix(prefix.clone())
        .with_timeout(Duration::from_millis(300))
        .with_replication(1, Duration::from_millis(100));
    let plain = RedisIdempotencyStore::new(conn).with_prefix(prefix);
    let runs = Arc::new(AtomicUsize::new(0));
    let strict_app = app(strict, runs.clone(), None);
    let plain_app = app(plain, runs.clone(), None);
    let t0 = Instant::now();
    let res = tokio::time::timeout(
        Duration::from_secs(4),
        strict_app.clone().oneshot(order("k")),
    )
    .await
    .expect("hung")
    .unwrap();
    let took = t0.elapsed();
    let (status, headers, body) = body_text(res).await;
    assert_store_unavailable(status, &headers, &body, &format!("no replica ({took:?})"));
    assert!(
        took <= Duration::from_millis(1200),
        "300 ms + 100 ms: {took:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    let (status, body, seen) = retry_until_created(&plain_app, "k", Duration::from_secs(2)).await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "the lock was not released: {seen:?}: {body}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A replication wait of zero: "waiting up to `timeout` for them" is no wait at all. Redis's own
/// `WAIT n 0` blocks for ever, and holds every later command on the same connection behind it:
/// the connection is shared by its clones, so a store without replication on it must keep
/// working.
#[tokio::test]
async fn a_zero_replication_wait_neither_hangs_nor_wedges_the_shared_connection() {
    let Some(conn) = direct_conn().await else {
        eprintln!("STURDY_REDIS_URL unset: skipped");
        return;
    };
    let prefix = unique("repl0");
    let strict = RedisIdempotencyStore::new(conn.clone())
        .with_prefix(prefix.clone())
        .with_timeout(Duration::from_millis(300))
        .with_replication(1, Duration::ZERO);
    let plain = RedisIdempotencyStore::new(conn)
        .with_prefix(prefix)
        .with_timeout(Duration::from_millis(500));
    let runs = Arc::new(AtomicUsize::new(0));
    let strict_app = app(strict, runs.clone(), None);
    let plain_app = app(plain, runs.clone(), None);
    let t0 = Instant::now();
    let res = tokio::time::timeout(
        Duration::from_secs(4),
        strict_app.clone().oneshot(order("a")),
    )
    .await
    .expect("a zero replication wait hung the request")
    .unwrap();
    let took = t0.elapsed();
    let (status, headers, body) = body_text(res).await;
    assert_store_unavailable(status, &headers, &body, &format!("zero wait ({took:?})"));
    assert!(took <= Duration::from_millis(1000), "{took:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    // The shared connection still serves other keys and other stores.
    let t1 = Instant::now();
    let res = tokio::time::timeout(
        Duration::from_secs(4),
        plain_app.clone().oneshot(order("b")),
    )
    .await
    .expect("hung")
    .unwrap();
    let (status, _, body) = body_text(res).await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "a store sharing the connection failed after a zero replication wait ({:?}): {body}",
        t1.elapsed()
    );
}

/// RELIABILITY.md, Redis hung, webhook handling: "the error comes after the timeout (for
/// `next()`, the wait for a new event comes on top)"; and the consumer works again once Redis
/// answers.
#[tokio::test]
async fn a_consumer_next_on_a_hung_redis_errs_after_the_timeout_plus_the_wait() {
    use sturdy::redis::RedisStreamConsumer;
    let Some(up) = redis_addr() else {
        eprintln!("STURDY_REDIS_URL unset: skipped");
        return;
    };
    let proxy = Proxy::start(up).await;
    let name = format!("{{{}}}", unique("next"));
    let mut c =
        RedisStreamConsumer::connect(&proxy.url, name.as_str(), "g", "w", Duration::from_secs(60))
            .await
            .expect("join through the proxy")
            .with_timeout(Duration::from_millis(150))
            .with_wait(Duration::from_millis(100));
    assert!(c.next().await.unwrap().is_none());
    proxy.set(HOLD);
    let t0 = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(4), c.next())
        .await
        .expect("next() hung on a hung Redis");
    let took = t0.elapsed();
    let err = r.expect_err("an event from a hung Redis");
    let text = format!("{err:#}");
    assert!(
        took <= Duration::from_millis(1000),
        "timeout 150 ms + wait 100 ms: {took:?}: {text}"
    );
    no_url(&text, &proxy.url);
    proxy.set(PASS);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t1 = Instant::now();
    let mut last = String::new();
    while t1.elapsed() < Duration::from_secs(2) {
        match tokio::time::timeout(Duration::from_secs(2), c.next()).await {
            Ok(Ok(None)) => {
                last.clear();
                break;
            }
            other => last = format!("{other:?}"),
        }
    }
    assert!(last.is_empty(), "the consumer did not recover: {last}");
}

// ---------------------------------------------------------------------------------------------
// Many requests at once, hostile timeouts, and the background release's end.

/// "Every operation ends within its timeout": thirty requests with their own keys while Redis
/// hangs are each answered 503 within about one timeout, not one after another.
#[tokio::test]
async fn thirty_requests_on_a_hung_redis_each_end_within_about_one_timeout() {
    let Some((proxy, store)) = proxied_store("many", Duration::from_millis(200)).await else {
        return;
    };
    let runs = Arc::new(AtomicUsize::new(0));
    let app = app(store, runs.clone(), None);
    let _ = app.clone().oneshot(order("warm")).await.unwrap();
    runs.store(0, Ordering::SeqCst);
    proxy.set(HOLD);
    let t0 = Instant::now();
    let calls: Vec<_> = (0..30)
        .map(|i| {
            let app = app.clone();
            tokio::spawn(async move {
                let res = app.oneshot(order(&format!("many-{i}"))).await.unwrap();
                (res.status(), Instant::now())
            })
        })
        .collect();
    for (i, c) in calls.into_iter().enumerate() {
        let (status, at) = tokio::time::timeout(Duration::from_secs(4), c)
            .await
            .unwrap_or_else(|_| panic!("request {i} hung"))
            .unwrap();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "request {i}");
        assert!(
            at - t0 <= Duration::from_millis(1200),
            "request {i} answered after {:?}",
            at - t0
        );
    }
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    proxy.set(PASS);
    for i in [0, 17, 29] {
        let key = format!("many-{i}");
        let (status, body, seen) = retry_until_created(&app, &key, Duration::from_secs(3)).await;
        assert_eq!(status, StatusCode::CREATED, "{key}: after {seen:?}: {body}");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 3);
}

/// Guide: the lock a failed `begin` may have taken "is released in the background, tried again
/// (50 ms apart, doubling up to 1 s) while the store still fails, until the lease would have
/// freed it". On a Redis that never answers, the tries stop once the lease (400 ms) has passed.
#[tokio::test]
async fn the_background_release_stops_once_the_lease_has_passed() {
    let (url, others) = fake(Fake::HandshakeThenStall).await;
    let Ok(store) = RedisIdempotencyStore::connect(&url).await else {
        return;
    };
    let store = store.with_timeout(Duration::from_millis(100));
    let layer = IdempotencyLayer::new(store, ByCredentials::default())
        .with_lease(Duration::from_millis(400))
        .unwrap();
    let app: App = axum::Router::new()
        .route(
            "/orders",
            axum::routing::post(|| async { StatusCode::CREATED }),
        )
        .layer(layer);
    let res = tokio::time::timeout(Duration::from_secs(3), app.oneshot(order("k")))
        .await
        .expect("hung")
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let at_1500 = others.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let at_3000 = others.load(Ordering::SeqCst);
    assert_eq!(
        at_1500, at_3000,
        "releases still sent long past the 400 ms lease"
    );
    assert!(at_3000 <= 12, "{at_3000} commands for one request");
}

/// Hostile timeouts: `with_timeout(Duration::ZERO)` neither panics nor hangs, and the handler
/// does not run without a lock.
#[tokio::test]
async fn a_zero_operation_timeout_neither_panics_nor_runs_the_handler_unlocked() {
    let Some(conn) = direct_conn().await else {
        eprintln!("STURDY_REDIS_URL unset: skipped");
        return;
    };
    let store = RedisIdempotencyStore::new(conn)
        .with_prefix(unique("zero"))
        .with_timeout(Duration::ZERO);
    let runs = Arc::new(AtomicUsize::new(0));
    let app = app(store, runs.clone(), None);
    for i in 0..3 {
        let res = tokio::time::timeout(
            Duration::from_secs(3),
            app.clone().oneshot(order(&format!("z{i}"))),
        )
        .await
        .expect("a zero timeout hung")
        .unwrap();
        let (status, headers, body) = body_text(res).await;
        if status == StatusCode::SERVICE_UNAVAILABLE {
            assert_store_unavailable(status, &headers, &body, "zero timeout");
        } else {
            assert_eq!(status, StatusCode::CREATED, "{body}");
        }
    }
    assert!(runs.load(Ordering::SeqCst) <= 3);
}

// ---------------------------------------------------------------------------------------------
// The webhook consumer's waits.

fn event(id: &str) -> sturdy::webhook::WebhookEvent {
    sturdy::webhook::WebhookEvent::new("standard", id, bytes::Bytes::from_static(b"{\"n\":48}"))
}

/// `with_wait`: "It asks Redis every 5 ms at first, then less often, at most 100 ms apart, so a
/// new event waits about 100 ms at most to be seen".
#[tokio::test]
async fn a_waiting_next_sees_a_new_event_within_about_100_ms() {
    use sturdy::redis::{RedisStreamConsumer, RedisStreamQueue};
    use sturdy::webhook::EventQueue;
    let Ok(url) = std::env::var("STURDY_REDIS_URL") else {
        eprintln!("STURDY_REDIS_URL unset: skipped");
        return;
    };
    let name = format!("{{{}}}", unique("seen"));
    let q = RedisStreamQueue::connect(&url, name.as_str())
        .await
        .unwrap();
    let mut c =
        RedisStreamConsumer::connect(&url, name.as_str(), "g", "w", Duration::from_secs(60))
            .await
            .unwrap()
            .with_wait(Duration::from_millis(3000));
    for (i, after) in [700u64, 1500].into_iter().enumerate() {
        let q2 = q.clone();
        let pushed = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(after)).await;
            q2.push(event(&format!("e{i}")), Duration::from_secs(60))
                .await
                .unwrap();
            Instant::now()
        });
        let got = tokio::time::timeout(Duration::from_secs(4), c.next())
            .await
            .expect("next() hung")
            .unwrap()
            .unwrap_or_else(|| {
                panic!("event {i} pushed at {after} ms was not seen in the 3 s wait")
            });
        let seen_at = Instant::now();
        let pushed_at = pushed.await.unwrap();
        let lag = seen_at.saturating_duration_since(pushed_at);
        assert!(
            lag <= Duration::from_millis(300),
            "event {i} seen {lag:?} after its push"
        );
        c.ack(&got).await.unwrap();
    }
}

impl Clone for Proxy {
    fn clone(&self) -> Self {
        Self {
            url: self.url.clone(),
            mode: self.mode.clone(),
        }
    }
}

/// `RedisStreamConsumer::next`: "Cancelling it (a `select!` or a timeout around it) loses
/// nothing: an event taken by a read whose answer was dropped stays pending for this consumer
/// and is delivered again after the claim delay, counted as a delivery." The read's answer is
/// held (Redis ran it), the caller gives up, Redis answers again.
#[tokio::test]
async fn a_next_cancelled_while_redis_hangs_loses_nothing() {
    use sturdy::redis::{RedisStreamConsumer, RedisStreamQueue};
    use sturdy::webhook::EventQueue;
    let Some(up) = redis_addr() else {
        eprintln!("STURDY_REDIS_URL unset: skipped");
        return;
    };
    let proxy = Proxy::start(up.clone()).await;
    let name = format!("{{{}}}", unique("cancel"));
    let q = RedisStreamQueue::connect(&format!("redis://{up}/"), name.as_str())
        .await
        .unwrap();
    let mut c = RedisStreamConsumer::connect(
        &proxy.url,
        name.as_str(),
        "g",
        "w",
        Duration::from_millis(300),
    )
    .await
    .unwrap()
    .with_timeout(Duration::from_millis(500))
    .with_wait(Duration::from_millis(50));
    assert!(c.next().await.unwrap().is_none());
    q.push(event("lost?"), Duration::from_secs(60))
        .await
        .unwrap();
    proxy.set(HOLD);
    let r = tokio::time::timeout(Duration::from_millis(60), c.next()).await;
    assert!(r.is_err(), "answered although Redis hangs: {r:?}");
    tokio::time::sleep(Duration::from_millis(20)).await;
    proxy.set(PASS);
    let t0 = Instant::now();
    let mut got = None;
    while t0.elapsed() < Duration::from_secs(3) {
        match tokio::time::timeout(Duration::from_secs(2), c.next()).await {
            Ok(Ok(Some(d))) => {
                got = Some(d);
                break;
            }
            Ok(Ok(None) | Err(_)) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(_) => panic!("next() hung"),
        }
    }
    let d = got.expect("the event taken by the cancelled read was lost");
    assert_eq!(&d.event.body[..], b"{\"n\":48}");
    assert_eq!(
        d.deliveries, 2,
        "the cancelled read is counted as a delivery"
    );
    assert!(
        t0.elapsed() >= Duration::from_millis(150),
        "redelivered before the 300 ms claim delay: {:?}",
        t0.elapsed()
    );
    c.ack(&d).await.unwrap();
    assert!(
        c.next().await.unwrap().is_none(),
        "delivered twice after its ack"
    );
}

/// `sturdy::redis::connect`: "Any `timeout` is accepted, `Duration::MAX` too." Zero and a
/// nanosecond neither panic nor hang, against a live Redis and one that never answers.
#[tokio::test]
async fn connect_with_a_zero_or_tiny_timeout_neither_panics_nor_hangs() {
    let (silent, _) = fake(Fake::Silent).await;
    let mut urls = vec![silent];
    if let Ok(url) = std::env::var("STURDY_REDIS_URL") {
        urls.push(url);
    }
    for url in &urls {
        for t in [Duration::ZERO, Duration::from_nanos(1)] {
            let t0 = Instant::now();
            let r = tokio::time::timeout(Duration::from_secs(3), sturdy::redis::connect(url, t))
                .await
                .unwrap_or_else(|_| panic!("connect with {t:?} hung"));
            assert!(
                t0.elapsed() <= Duration::from_millis(1500),
                "{t:?}: {:?}",
                t0.elapsed()
            );
            if let Err(e) = r {
                no_url(&format!("{e:#}"), url);
            }
        }
    }
}

/// Guide, store down when the request arrives: "if the store's `begin` may have locked the key
/// before failing (... a connection broken after the command was sent), the lock is released in
/// the background, tried again (50 ms apart, doubling up to 1 s) while the store still fails,
/// until the lease would have freed it | 503; a later retry with the same key runs normally once
/// the store answers again". The `begin` runs in Redis and its answer is lost, then Redis is down
/// for 1.5 s (every release fails), then back: within about the 1 s backoff the key is free,
/// long before the 20 s lease.
#[tokio::test]
async fn a_lock_left_by_a_lost_begin_is_released_once_redis_is_back_from_an_outage() {
    let Some((proxy, store)) = proxied_store("outage", Duration::from_millis(200)).await else {
        return;
    };
    let runs = Arc::new(AtomicUsize::new(0));
    let app = app(store, runs.clone(), None);
    let _ = app.clone().oneshot(order("warm")).await.unwrap();
    runs.store(0, Ordering::SeqCst);
    proxy.set(CUT_AFTER_THEN_DOWN);
    let res = tokio::time::timeout(Duration::from_secs(3), app.clone().oneshot(order("k")))
        .await
        .expect("hung")
        .unwrap();
    let (status, headers, body) = body_text(res).await;
    assert_store_unavailable(status, &headers, &body, "lost begin");
    assert_eq!(proxy.mode.load(Ordering::SeqCst), DOWN);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Still down: a retry is refused, never run.
    let res = app.clone().oneshot(order("k")).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    proxy.set(PASS);
    let t0 = Instant::now();
    let (status, body, seen) = retry_until_created(&app, "k", Duration::from_millis(2500)).await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "the lock was still held {:?} after Redis came back: {seen:?}: {body}",
        t0.elapsed()
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}
