//! The server idempotency layer in a real axum app over TCP, against hostile or unlucky clients
//! writing raw HTTP/1.1: slow bodies cut at every point, Content-Length never met, chunked
//! bodies that never end, copies racing with disconnects, a retry the instant after a
//! disconnect, pipelined requests under one key, the key in two header lines, headers near
//! hyper's limits, a half-closed client and a graceful shutdown mid-handler. Each handler counts
//! its runs; docs/guides/idempotency.md says a key's handler runs once.
#![cfg(feature = "full")]

use crate::server11_common;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use server11_common::{eventually, ms, redis_url, serve, unique, Conn, Resp};
use sturdy::idempotency::server::{
    problem, ByCredentials, IdempotencyLayer, IdempotencyStore, MemoryStore,
};

/// What the handler saw: runs started and finished, per key.
#[derive(Default)]
struct Counts {
    started: AtomicUsize,
    finished: AtomicUsize,
    per_key: Mutex<HashMap<String, usize>>,
}

impl Counts {
    fn started(&self) -> usize {
        self.started.load(Ordering::SeqCst)
    }
    fn finished(&self) -> usize {
        self.finished.load(Ordering::SeqCst)
    }
    fn runs_of(&self, key: &str) -> usize {
        self.per_key.lock().unwrap().get(key).copied().unwrap_or(0)
    }
}

/// `/orders`: counts, sleeps `delay`, answers 201 `order #<n>: <body>`. `/stream`: counts,
/// answers 201 at once with a body of three chunks 80 ms apart.
fn app<St: IdempotencyStore + Clone>(
    layer: IdempotencyLayer<St>,
    counts: Arc<Counts>,
    delay: Duration,
) -> Router {
    let c2 = counts.clone();
    Router::new()
        .route(
            "/orders",
            post(move |headers: HeaderMap, body: Bytes| {
                let counts = counts.clone();
                async move {
                    let n = counts.started.fetch_add(1, Ordering::SeqCst) + 1;
                    let key = headers
                        .get("idempotency-key")
                        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                        .unwrap_or_default();
                    *counts.per_key.lock().unwrap().entry(key).or_default() += 1;
                    tokio::time::sleep(delay).await;
                    counts.finished.fetch_add(1, Ordering::SeqCst);
                    (
                        StatusCode::CREATED,
                        format!("order #{n}: {}", String::from_utf8_lossy(&body)),
                    )
                }
            }),
        )
        .route(
            "/stream",
            post(move || {
                let counts = c2.clone();
                async move {
                    counts.started.fetch_add(1, Ordering::SeqCst);
                    let s = futures_util::stream::unfold(0u8, move |i| {
                        let counts = counts.clone();
                        async move {
                            if i == 3 {
                                counts.finished.fetch_add(1, Ordering::SeqCst);
                                return None;
                            }
                            if i > 0 {
                                tokio::time::sleep(ms(80)).await;
                            }
                            let chunk = Bytes::from(format!("chunk{i}:{};", "z".repeat(4000)));
                            Some((Ok::<_, std::io::Error>(chunk), i + 1))
                        }
                    });
                    (StatusCode::CREATED, Body::from_stream(s))
                }
            }),
        )
        .layer(layer)
}

fn memory_layer() -> (MemoryStore, IdempotencyLayer<MemoryStore>) {
    let store = MemoryStore::default();
    (
        store.clone(),
        IdempotencyLayer::new(store, ByCredentials::default()),
    )
}

async fn redis_layer() -> IdempotencyLayer<sturdy::redis::RedisIdempotencyStore> {
    let store = sturdy::redis::RedisIdempotencyStore::connect(&redis_url())
        .await
        .unwrap()
        .with_prefix(unique("idem"));
    IdempotencyLayer::new(store, ByCredentials::default())
}

/// The head of `POST <path>` with client credentials, the key and a Content-Length.
fn head(path: &str, key: &str, len: usize) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nhost: t\r\nauthorization: Bearer c-1\r\nidempotency-key: {key}\r\ncontent-length: {len}\r\n\r\n"
    )
}

fn request(key: &str, body: &str) -> Vec<u8> {
    let mut r = head("/orders", key, body.len()).into_bytes();
    r.extend_from_slice(body.as_bytes());
    r
}

/// Sends the request on a fresh connection and reads the answer.
async fn send(addr: SocketAddr, key: &str, body: &str) -> Resp {
    server11_common::exchange(addr, &request(key, body))
        .await
        .expect("an answer")
}

/// Retries until a 201; every answer before it must be the documented in-flight 409.
async fn settle(addr: SocketAddr, key: &str, body: &str) -> Resp {
    let end = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        let r = send(addr, key, body).await;
        if r.status == 201 {
            return r;
        }
        assert_eq!(r.status, 409, "{key}: {r:?}");
        assert_eq!(r.header("retry-after"), Some("1"));
        assert_eq!(r.problem_type(), problem::IN_FLIGHT);
        assert!(tokio::time::Instant::now() < end, "{key} still in flight");
        tokio::time::sleep(ms(20)).await;
    }
}

/// Guide, request table: nothing runs for a request whose body never arrived whole; "first with
/// a key | runs to its end". A client trickling its body one byte per 3 ms and leaving before the
/// end must leave no run and no key behind: the retry runs at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_body_cut_before_its_end_runs_nothing_and_locks_nothing() {
    let counts = Arc::new(Counts::default());
    let (store, layer) = memory_layer();
    let addr = serve(app(layer, counts.clone(), ms(0))).await;
    let body = r#"{"amount":100,"ccy":"EUR"}"#;
    for cut in [0, 1, body.len() / 2, body.len() - 1] {
        let key = format!("k-cut-{cut}");
        let mut c = Conn::open(addr).await;
        c.write(head("/orders", &key, body.len()).as_bytes())
            .await
            .unwrap();
        c.trickle(&body.as_bytes()[..cut], ms(3)).await.unwrap();
        drop(c);
    }
    tokio::time::sleep(ms(100)).await;
    assert_eq!(counts.started(), 0, "no handler ran on a partial body");
    assert_eq!(
        store.len(),
        0,
        "no key is held for a request that never arrived"
    );
    for cut in [0, 1, body.len() / 2, body.len() - 1] {
        let key = format!("k-cut-{cut}");
        let r = send(addr, &key, body).await;
        assert_eq!(r.status, 201, "{r:?}");
        assert!(!r.replayed());
    }
    assert_eq!(counts.started(), 4);
}

/// Failure table, "connection dropped after the handler committed | ... its response is stored
/// when the handler returns | a transport error; a retry with the same key gets 409 while the
/// handler still runs, then the stored response". The body trickles in; the client leaves once
/// the handler has started and retries at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_body_then_gone_before_the_response_runs_once_and_replays() {
    let counts = Arc::new(Counts::default());
    let (_store, layer) = memory_layer();
    let addr = serve(app(layer, counts.clone(), ms(400))).await;
    let body = r#"{"amount":100}"#;
    let mut c = Conn::open(addr).await;
    c.write(head("/orders", "k-slow", body.len()).as_bytes())
        .await
        .unwrap();
    c.trickle(body.as_bytes(), ms(4)).await.unwrap();
    assert!(eventually(ms(1000), || async { counts.started() == 1 }).await);
    drop(c);
    let r = send(addr, "k-slow", body).await;
    assert_eq!(r.status, 409, "the first still runs: {r:?}");
    assert_eq!(r.header("retry-after"), Some("1"));
    let done = settle(addr, "k-slow", body).await;
    assert!(done.replayed(), "{done:?}");
    assert_eq!(done.text(), format!("order #1: {body}"));
    assert_eq!((counts.started(), counts.finished()), (1, 1));
}

/// A client that leaves the instant its body is sent, and a retry sent at that same instant on
/// another connection, for many keys: whichever way each race goes (the handler started, or the
/// request was dropped while the store locked the key and the lock is released in the
/// background), each key's handler runs exactly once in the end, and every answer before the
/// 201 is the documented 409.
async fn gone_and_retried_at_once<St: IdempotencyStore + Clone>(layer: IdempotencyLayer<St>) {
    let counts = Arc::new(Counts::default());
    let addr = serve(app(layer, counts.clone(), ms(30))).await;
    let body = r#"{"n":1}"#;
    let keys: Vec<String> = (0..24).map(|i| format!("k-instant-{i}")).collect();
    let mut tasks = Vec::new();
    for (i, key) in keys.iter().cloned().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut c = Conn::open(addr).await;
            let req = request(&key, body);
            // Head at once, body one byte at a time, then leave: immediately, or after a
            // few hundred microseconds.
            let split = req.len() - body.len();
            c.write(&req[..split]).await.unwrap();
            c.trickle(&req[split..], Duration::ZERO).await.unwrap();
            if i % 3 == 1 {
                tokio::time::sleep(Duration::from_micros(300)).await;
            }
            if i % 3 == 2 {
                tokio::task::yield_now().await;
            }
            drop(c);
            let first = send(addr, &key, body).await;
            assert!(
                first.status == 409 || first.status == 201,
                "{key}: {first:?}"
            );
            settle(addr, &key, body).await
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for key in &keys {
        assert_eq!(
            counts.runs_of(key),
            1,
            "{key} ran {} times",
            counts.runs_of(key)
        );
    }
    assert!(eventually(ms(1000), || async { counts.finished() == keys.len() }).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_the_instant_the_body_ends_and_retried_at_once_runs_once_per_key_memory() {
    gone_and_retried_at_once(memory_layer().1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_the_instant_the_body_ends_and_retried_at_once_runs_once_per_key_redis() {
    gone_and_retried_at_once(redis_layer().await).await;
}

/// "If the request's future is dropped, the task goes on: it reads the whole response body (up
/// to the response limit), stores it, then ends." Over TCP: the client reads the head and the
/// first bytes of a body streamed in three chunks, then leaves; the retry gets all three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_mid_response_leaves_the_whole_body_stored() {
    let counts = Arc::new(Counts::default());
    let (_store, layer) = memory_layer();
    let addr = serve(app(layer, counts.clone(), ms(0))).await;
    let mut c = Conn::open(addr).await;
    let mut req = head("/stream", "k-stream", 2).into_bytes();
    req.extend_from_slice(b"{}");
    c.write(&req).await.unwrap();
    let h = c.read_head().await.expect("the head");
    assert_eq!(h.status, 201);
    drop(c);
    assert!(eventually(ms(2000), || async { counts.finished() == 1 }).await);
    let end = tokio::time::Instant::now() + Duration::from_secs(2);
    let r = loop {
        let r = server11_common::exchange(addr, &req).await.unwrap();
        if r.status != 409 {
            break r;
        }
        assert!(tokio::time::Instant::now() < end);
        tokio::time::sleep(ms(20)).await;
    };
    assert_eq!(r.status, 201, "{r:?}");
    assert!(r.replayed());
    let text = r.text();
    assert!(
        text.starts_with("chunk0:") && text.contains(";chunk1:") && text.contains(";chunk2:"),
        "the whole body: {} bytes",
        text.len()
    );
    assert_eq!(text.len(), 3 * (7 + 4000 + 1));
    assert_eq!(counts.started(), 1);
}

/// A client that announces more Content-Length than it sends and waits holds nothing: another
/// connection with the same key and the whole body runs at once (not 409), and when the stalled
/// client finally sends the rest, it gets the stored response, replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_length_never_met_locks_nothing_and_the_late_body_is_replayed() {
    let counts = Arc::new(Counts::default());
    let (store, layer) = memory_layer();
    let addr = serve(app(layer, counts.clone(), ms(0))).await;
    let body = r#"{"amount":250,"note":"stalled"}"#;
    let mut stalled = Conn::open(addr).await;
    stalled
        .write(head("/orders", "k-stall", body.len()).as_bytes())
        .await
        .unwrap();
    stalled.write(&body.as_bytes()[..10]).await.unwrap();
    tokio::time::sleep(ms(100)).await;
    assert_eq!(store.len(), 0, "a body still on its way holds no key");
    let r = send(addr, "k-stall", body).await;
    assert_eq!(r.status, 201, "the key was free: {r:?}");
    assert!(!r.replayed());
    stalled.write(&body.as_bytes()[10..]).await.unwrap();
    let late = stalled
        .response_within(Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(late.status, 201, "{late:?}");
    assert!(late.replayed(), "the late copy is a replay");
    assert_eq!(late.body, r.body);
    assert_eq!(counts.started(), 1);
}

/// A chunked body that never ends holds no key and runs nothing; the same key with a whole body
/// runs; the endless one leaving changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_that_never_ends_locks_nothing() {
    let counts = Arc::new(Counts::default());
    let (store, layer) = memory_layer();
    let addr = serve(app(layer, counts.clone(), ms(0))).await;
    let mut endless = Conn::open(addr).await;
    endless
        .write(
            b"POST /orders HTTP/1.1\r\nhost: t\r\nauthorization: Bearer c-1\r\nidempotency-key: k-chunk\r\ntransfer-encoding: chunked\r\n\r\n",
        )
        .await
        .unwrap();
    for _ in 0..10 {
        endless.write(b"2\r\n{}\r\n").await.unwrap();
        tokio::time::sleep(ms(10)).await;
    }
    assert_eq!(store.len(), 0);
    assert_eq!(counts.started(), 0);
    let r = send(addr, "k-chunk", "{}").await;
    assert_eq!(r.status, 201, "{r:?}");
    endless.write(b"2\r\n{}\r\n").await.unwrap();
    drop(endless);
    tokio::time::sleep(ms(100)).await;
    let again = send(addr, "k-chunk", "{}").await;
    assert!(again.replayed(), "{again:?}");
    assert_eq!(counts.started(), 1);
    assert_eq!(store.len(), 1);
}

/// Failure table, "duplicate concurrent request (same client, same key, same payload) | the
/// store's atomic lock lets exactly one execution start". Eight connections send one request at
/// once (their last byte together); half of them leave without reading. The others get 201 (at
/// most one not replayed) or 409; the handler ran once.
async fn racing_copies_with_disconnects<St: IdempotencyStore + Clone>(layer: IdempotencyLayer<St>) {
    let counts = Arc::new(Counts::default());
    let addr = serve(app(layer, counts.clone(), ms(150))).await;
    let body = r#"{"pay":42}"#;
    let req = request("k-race", body);
    let mut conns = Vec::new();
    for _ in 0..8 {
        let mut c = Conn::open(addr).await;
        c.write(&req[..req.len() - 1]).await.unwrap();
        conns.push(c);
    }
    let barrier = Arc::new(tokio::sync::Barrier::new(8));
    let mut tasks = Vec::new();
    for (i, mut c) in conns.into_iter().enumerate() {
        let barrier = barrier.clone();
        let last = req[req.len() - 1];
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            c.write(&[last]).await.unwrap();
            if i % 2 == 0 {
                drop(c);
                return None;
            }
            c.response_within(Duration::from_secs(3)).await
        }));
    }
    let mut fresh = 0;
    for t in tasks {
        if let Some(r) = t.await.unwrap() {
            match r.status {
                201 if !r.replayed() => fresh += 1,
                201 => {}
                409 => assert_eq!(r.problem_type(), problem::IN_FLIGHT),
                _ => panic!("{r:?}"),
            }
        }
    }
    assert!(fresh <= 1);
    let done = settle(addr, "k-race", body).await;
    assert_eq!(done.text(), format!("order #1: {body}"));
    assert_eq!(counts.runs_of("k-race"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_copies_with_disconnects_run_once_memory() {
    racing_copies_with_disconnects(memory_layer().1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_copies_with_disconnects_run_once_redis() {
    racing_copies_with_disconnects(redis_layer().await).await;
}

/// Request table, "same key, another method, path, query or body | 422": two clients race one
/// key with two bodies. One runs; the other is 422 reused (while the first runs, or after),
/// never run, never 409 (409 is for the same fingerprint only); a retry of the other body is
/// still 422 and the first body's retry replays.
async fn racing_different_bodies<St: IdempotencyStore + Clone>(layer: IdempotencyLayer<St>) {
    let counts = Arc::new(Counts::default());
    let addr = serve(app(layer, counts.clone(), ms(150))).await;
    let (a, b) = (r#"{"to":"alice"}"#, r#"{"to":"bobby"}"#);
    let (ra, rb) = (request("k-two", a), request("k-two", b));
    let mut ca = Conn::open(addr).await;
    let mut cb = Conn::open(addr).await;
    ca.write(&ra[..ra.len() - 1]).await.unwrap();
    cb.write(&rb[..rb.len() - 1]).await.unwrap();
    let (x, y) = tokio::join!(
        async {
            ca.write(&ra[ra.len() - 1..]).await.unwrap();
            ca.response_within(Duration::from_secs(3)).await.unwrap()
        },
        async {
            cb.write(&rb[rb.len() - 1..]).await.unwrap();
            cb.response_within(Duration::from_secs(3)).await.unwrap()
        }
    );
    let mut statuses = [x.status, y.status];
    statuses.sort_unstable();
    assert_eq!(statuses, [201, 422], "{x:?} {y:?}");
    let (winner, loser_body) = if x.status == 201 { (a, b) } else { (b, a) };
    let loser = if x.status == 422 { &x } else { &y };
    assert_eq!(loser.problem_type(), problem::KEY_REUSED);
    assert_eq!(send(addr, "k-two", loser_body).await.status, 422);
    let again = send(addr, "k-two", winner).await;
    assert!(again.replayed(), "{again:?}");
    assert_eq!(counts.runs_of("k-two"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_different_bodies_one_runs_the_other_is_422_memory() {
    racing_different_bodies(memory_layer().1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_different_bodies_one_runs_the_other_is_422_redis() {
    racing_different_bodies(redis_layer().await).await;
}

/// Pipelined HTTP/1.1: three requests with one key in one write (the same body twice, then
/// another body). hyper answers them in order: 201, the replay, 422; the handler ran once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_under_one_key_run_once() {
    let counts = Arc::new(Counts::default());
    let (_store, layer) = memory_layer();
    let addr = serve(app(layer, counts.clone(), ms(50))).await;
    let mut c = Conn::open(addr).await;
    let mut all = request("k-pipe", "{\"a\":1}");
    all.extend(request("k-pipe", "{\"a\":1}"));
    all.extend(request("k-pipe", "{\"a\":2}"));
    c.write(&all).await.unwrap();
    let r1 = c.response_within(Duration::from_secs(2)).await.unwrap();
    let r2 = c.response_within(Duration::from_secs(2)).await.unwrap();
    let r3 = c.response_within(Duration::from_secs(2)).await.unwrap();
    assert_eq!((r1.status, r1.replayed()), (201, false), "{r1:?}");
    assert_eq!((r2.status, r2.replayed()), (201, true), "{r2:?}");
    assert_eq!(r2.body, r1.body);
    assert_eq!(r3.status, 422, "{r3:?}");
    assert_eq!(counts.started(), 1);
}

/// Pipelined requests under one key, the client gone while the first runs: the first runs to
/// its end and is stored, the second is never run; a retry gets the stored response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_then_gone_mid_handler_runs_once() {
    let counts = Arc::new(Counts::default());
    let (_store, layer) = memory_layer();
    let addr = serve(app(layer, counts.clone(), ms(200))).await;
    let mut c = Conn::open(addr).await;
    let mut all = request("k-pipe-gone", "{}");
    all.extend(request("k-pipe-gone", "{}"));
    c.write(&all).await.unwrap();
    assert!(eventually(ms(1000), || async { counts.started() == 1 }).await);
    drop(c);
    let r = settle(addr, "k-pipe-gone", "{}").await;
    assert!(r.replayed(), "{r:?}");
    assert_eq!((counts.started(), counts.finished()), (1, 1));
}

/// Request table, "two or more different key headers on one request (identical repeats are one
/// key) | 400": the key in two header lines. Identical lines (in either case of the name) are one
/// key and replay as one; a bare key and the same key as a structured-field string in two lines
/// (one key when each is sent alone) never run again; two different lines are 400 and run
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_in_two_header_lines() {
    let counts = Arc::new(Counts::default());
    let (_store, layer) = memory_layer();
    let addr = serve(app(layer, counts.clone(), ms(0))).await;
    let with_lines = |lines: &str| {
        format!(
            "POST /orders HTTP/1.1\r\nhost: t\r\nauthorization: Bearer c-1\r\n{lines}content-length: 2\r\n\r\n{{}}"
        )
        .into_bytes()
    };
    let ex = |b: Vec<u8>| async move { server11_common::exchange(addr, &b).await.unwrap() };
    let r = ex(with_lines(
        "Idempotency-Key: k-twice\r\nidempotency-key: k-twice\r\n",
    ))
    .await;
    assert_eq!((r.status, r.replayed()), (201, false), "{r:?}");
    let r = ex(with_lines("idempotency-key: k-twice\r\n")).await;
    assert!(r.replayed(), "one key: {r:?}");
    let r = ex(with_lines(
        "idempotency-key: k-twice\r\nidempotency-key: \"k-twice\"\r\n",
    ))
    .await;
    // The bare and the quoted form name one key, yet as two lines they are refused as two
    // different keys: safe either way (never a second run); the guide's "identical repeats"
    // does not say which (see the report).
    assert!(
        (r.status == 400 && r.problem_type() == problem::INVALID_KEY) || r.replayed(),
        "{r:?}"
    );
    assert_eq!(r.status, 400, "today: refused as two different keys");
    let r = ex(with_lines(
        "idempotency-key: k-one\r\nidempotency-key: k-other\r\n",
    ))
    .await;
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(r.problem_type(), problem::INVALID_KEY);
    assert_eq!(counts.started(), 1);
}

/// Headers near hyper's limits: a 255-character key, a 60 KB cookie and 90 more headers are
/// one request that runs once and replays; a head past hyper's limit of headers is refused by
/// hyper before the layer (no run, no key), and the same request in bounds then runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_near_hypers_limit_run_once_and_past_it_lock_nothing() {
    let counts = Arc::new(Counts::default());
    let (store, layer) = memory_layer();
    let addr = serve(app(layer, counts.clone(), ms(0))).await;
    let key: String = (0..255)
        .map(|i| char::from(b'!' + (i % 94) as u8))
        .map(|c| if c == ',' || c == '"' { 'x' } else { c })
        .collect();
    let cookie = format!("session={}", "c".repeat(60_000));
    let build = |extra: usize| {
        let mut h = format!(
            "POST /orders HTTP/1.1\r\nhost: t\r\ncookie: {cookie}\r\nidempotency-key: {key}\r\ncontent-length: 2\r\n"
        );
        for i in 0..extra {
            h.push_str(&format!("x-filler-{i}: {}\r\n", "f".repeat(100)));
        }
        h.push_str("\r\n{}");
        h.into_bytes()
    };
    let r = server11_common::exchange(addr, &build(90)).await.unwrap();
    assert_eq!((r.status, r.replayed()), (201, false), "{r:?}");
    let r = server11_common::exchange(addr, &build(90)).await.unwrap();
    assert!(r.replayed(), "{r:?}");
    // hyper's default limit is 100 headers: 150 is refused before any layer sees the request.
    let mut c = Conn::open(addr).await;
    let _ = c.write(&build(150)).await;
    let refused = c.response_within(Duration::from_secs(2)).await;
    assert!(
        refused.as_ref().is_none_or(|r| r.status == 431),
        "{refused:?}"
    );
    assert_eq!(counts.started(), 1);
    assert_eq!(store.len(), 1);
    // The oversized attempt left the key as it was: replayed again.
    let r = server11_common::exchange(addr, &build(10)).await.unwrap();
    assert!(r.replayed(), "{r:?}");
}

/// Failure table, "the server shuts down mid-handler". A graceful shutdown (axum's
/// `with_graceful_shutdown`) lets the connection of a waiting client finish: it gets the
/// handler's 201 and the store keeps it; a client that left before the shutdown leaves a
/// handler that runs on in its task and stores its response while the runtime lives. A new
/// server on the same store replays both; each handler ran once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_shutdown_mid_handler_answers_the_waiting_client_and_stores() {
    let counts = Arc::new(Counts::default());
    let (store, layer) = memory_layer();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let served = app(layer.clone(), counts.clone(), ms(400));
    let server = tokio::spawn(async move {
        axum::serve(listener, served)
            .with_graceful_shutdown(async move {
                let _ = stop_rx.await;
            })
            .await
    });
    let mut waiting = Conn::open(addr).await;
    waiting.write(&request("k-wait", "{}")).await.unwrap();
    let mut leaving = Conn::open(addr).await;
    leaving.write(&request("k-left", "{}")).await.unwrap();
    assert!(eventually(ms(1000), || async { counts.started() == 2 }).await);
    drop(leaving);
    stop_tx.send(()).unwrap();
    let r = waiting
        .response_within(Duration::from_secs(3))
        .await
        .expect("the waiting client is answered");
    assert_eq!(r.status, 201, "{r:?}");
    tokio::time::timeout(Duration::from_secs(3), server)
        .await
        .expect("the server stops once its connections are done")
        .unwrap()
        .unwrap();
    // The same store behind a new server.
    let counts2 = Arc::new(Counts::default());
    let addr2 = serve(app(layer, counts2.clone(), ms(0))).await;
    let replay = send(addr2, "k-wait", "{}").await;
    assert!(replay.replayed(), "{replay:?}");
    assert_eq!(replay.body, r.body);
    let left = settle(addr2, "k-left", "{}").await;
    assert!(left.replayed(), "{left:?}");
    assert_eq!(counts.started(), 2);
    assert_eq!(counts2.started(), 0);
    assert_eq!(store.len(), 2);
}

/// A client that sends its whole request and then half-closes its socket (`shutdown(Write)`,
/// as `nc -N` does) while the handler runs: hyper may treat that as the client gone. The
/// handler runs to its end once, and the retry gets its stored response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_closed_client_mid_handler_runs_once() {
    use tokio::io::AsyncWriteExt;
    let counts = Arc::new(Counts::default());
    let (_store, layer) = memory_layer();
    let addr = serve(app(layer, counts.clone(), ms(200))).await;
    let mut c = Conn::open(addr).await;
    c.write(&request("k-half", "{}")).await.unwrap();
    assert!(eventually(ms(1000), || async { counts.started() == 1 }).await);
    c.s.shutdown().await.unwrap();
    let got = c.response_within(Duration::from_secs(2)).await;
    if let Some(r) = &got {
        assert_eq!(r.status, 201, "{r:?}");
    }
    let r = settle(addr, "k-half", "{}").await;
    assert!(r.replayed(), "{r:?}");
    assert_eq!((counts.started(), counts.finished()), (1, 1));
}

/// A client that sends its request and then never reads (its receive window closes): the
/// handler's response cannot all go out on that connection. The guide: "Run to its end, the
/// execution stores its response, and the client's retry gets it as soon as the handler has
/// finished"; the key must not stay in flight for as long as the stalled client keeps its
/// connection open. A 6 MB response (response limit raised to 8 MiB) is larger than what the
/// kernel buffers on loopback, both as one body and streamed in chunks.
async fn a_reader_that_never_reads(path: &'static str) {
    let runs = Arc::new(AtomicUsize::new(0));
    let r2 = runs.clone();
    let big = Bytes::from(vec![b'b'; 6 * 1024 * 1024]);
    let b2 = big.clone();
    let layer = IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default())
        .with_response_limit(8 * 1024 * 1024);
    let app = Router::new()
        .route(
            "/whole",
            post(move || {
                runs.fetch_add(1, Ordering::SeqCst);
                let big = big.clone();
                async move { (StatusCode::CREATED, big) }
            }),
        )
        .route(
            "/chunks",
            post(move || {
                r2.fetch_add(1, Ordering::SeqCst);
                let big = b2.clone();
                async move {
                    let parts: Vec<Result<Bytes, std::io::Error>> = big
                        .chunks(64 * 1024)
                        .map(|c| Ok(Bytes::copy_from_slice(c)))
                        .collect();
                    (
                        StatusCode::CREATED,
                        Body::from_stream(futures_util::stream::iter(parts)),
                    )
                }
            }),
        )
        .layer(layer);
    let addr = serve(app).await;
    let mut req = head(path, "k-stuck", 2).into_bytes();
    req.extend_from_slice(b"{}");
    // A socket with a tiny receive buffer that is never read.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut stuck = sock.connect(addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stuck, &req)
        .await
        .unwrap();
    tokio::time::sleep(ms(100)).await;
    let end = tokio::time::Instant::now() + Duration::from_millis(1500);
    let replay = loop {
        let r = server11_common::exchange(addr, &req).await.unwrap();
        if r.status == 201 {
            break Some(r);
        }
        assert_eq!(r.status, 409, "{r:?}");
        if tokio::time::Instant::now() >= end {
            break None;
        }
        tokio::time::sleep(ms(50)).await;
    };
    drop(stuck);
    let replay = replay.expect("the handler has long finished, yet its key is still in flight");
    assert!(replay.replayed());
    assert_eq!(replay.body.len(), 6 * 1024 * 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_a_whole_body_does_not_hold_the_key() {
    a_reader_that_never_reads("/whole").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_a_streamed_body_does_not_hold_the_key() {
    a_reader_that_never_reads("/chunks").await;
}

/// "While the handler runs, the task renews the lock every third of the lease ..., so a handler
/// slower than the lease keeps its key", with Redis and a client gone: lease 90 ms, handler
/// 600 ms, the client leaves once the handler started and a retry goes out every 20 ms. Every
/// retry is 409 until the replay; the handler ran once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_slower_than_its_lease_keeps_its_redis_key_while_retries_hammer() {
    let counts = Arc::new(Counts::default());
    let layer = redis_layer().await.with_lease(ms(90)).unwrap();
    let addr = serve(app(layer, counts.clone(), ms(600))).await;
    let mut c = Conn::open(addr).await;
    c.write(&request("k-lease", "{}")).await.unwrap();
    assert!(eventually(ms(1000), || async { counts.started() == 1 }).await);
    drop(c);
    let r = settle(addr, "k-lease", "{}").await;
    assert!(r.replayed(), "{r:?}");
    assert_eq!((counts.started(), counts.finished()), (1, 1));
}
