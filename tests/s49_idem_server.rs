//! Round s49b, outside tests of the server `IdempotencyLayer` in axum against
//! docs/guides/idempotency.md and the rustdoc of `sturdy_idempotency::server`:
//!
//! - cancellation at every await: the request dropped while its body is read, while the store
//!   locks the key, while the handler runs, while the response is stored (a store of this
//!   file's own that takes time for each operation, on paused time, dropped at seeded moments):
//!   the handler runs once over the request and its retries, a key is never free while a
//!   started handler's outcome is unknown, and a dropped request whose handler never started
//!   frees its key;
//! - key values: empty, 255/256 characters bare and as a structured-field string, spaces,
//!   tabs, obs-text, thousands of identical lines, two different lines;
//! - a burst of one request: exactly one handler run;
//! - composition in an axum `Router` on 127.0.0.1 under tower-http's `TimeoutLayer` and
//!   `RequestBodyLimitLayer`, with `route_layer` and `Router::nest`.
#![cfg(feature = "full")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use sturdy::core::BoxError;
use sturdy::idempotency::server::{
    problem, Begin, BoxFuture, ByCredentials, Fingerprint, IdempotencyLayer, IdempotencyStore,
    LockToken, MemoryStore, StoredResponse,
};
use tower::ServiceExt;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn post(uri: &str, keys: &[&[u8]], body: impl Into<Body>) -> Request<Body> {
    let mut r = Request::post(uri)
        .header("authorization", "Bearer s49-client")
        .body(body.into())
        .unwrap();
    for k in keys {
        r.headers_mut().append(
            "idempotency-key",
            HeaderValue::from_bytes(k).expect("a value the http crate takes"),
        );
    }
    r
}

async fn read<B>(res: Response<B>) -> (StatusCode, HeaderMap, Bytes)
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let (p, b) = res.into_parts();
    (p.status, p.headers, b.collect().await.unwrap().to_bytes())
}

async fn call(app: &Router, req: Request<Body>) -> (StatusCode, HeaderMap, Bytes) {
    read(app.clone().oneshot(req).await.unwrap()).await
}

fn problem_of(body: &[u8]) -> (String, u64) {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    (
        v["type"].as_str().unwrap_or_default().to_owned(),
        v["status"].as_u64().unwrap_or_default(),
    )
}

/// An app whose handler counts its runs, takes `work`, and answers 201 with the body.
fn app(
    runs: &Arc<AtomicUsize>,
    work: Duration,
    layer: IdempotencyLayer<impl IdempotencyStore>,
) -> Router {
    let runs = runs.clone();
    Router::new()
        .route(
            "/orders",
            axum::routing::post(move |body: Bytes| {
                let runs = runs.clone();
                async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(work).await;
                    (StatusCode::CREATED, [("x-order", "o-s49")], body)
                }
            }),
        )
        .layer(layer)
}

/// The guide's table: "a key that is not 1 to 255 visible ASCII characters | 400,
/// `…/idempotency-key-invalid`"; "two or more different key headers on one request
/// (byte-identical repeats are one key; `k` and `"k"` on two lines are two) | 400"; the module
/// docs: "Keys are 1 to 255 visible ASCII characters, sent bare or as a structured-field
/// string". Each refusal is problem JSON whose `status` is the status sent, and the handler
/// does not run.
#[tokio::test]
async fn s49_idem_key_values_are_judged_as_documented() {
    let runs = Arc::new(AtomicUsize::new(0));
    let layer = IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default());
    let app = app(&runs, Duration::ZERO, layer);
    let k255 = "a".repeat(255);
    let k256 = "b".repeat(256);
    let q255 = format!("\"{}\"", "c".repeat(255));
    let q256 = format!("\"{}\"", "d".repeat(256));
    let invalid: Vec<(&str, Vec<&[u8]>)> = vec![
        ("empty", vec![b""]),
        ("256 bare", vec![k256.as_bytes()]),
        ("256 quoted", vec![q256.as_bytes()]),
        ("empty sf-string", vec![b"\"\""]),
        ("space inside", vec![b"a b"]),
        ("tab inside", vec![b"a\tb"]),
        ("obs-text", vec![b"caf\xe9"]),
        ("two keys", vec![b"k1", b"k2"]),
        ("bare and quoted", vec![b"kq", b"\"kq\""]),
    ];
    for (name, keys) in invalid {
        let before = runs.load(Ordering::SeqCst);
        let (s, h, b) = call(&app, post("/orders", &keys, "{}")).await;
        assert_eq!(
            s,
            StatusCode::BAD_REQUEST,
            "{name}: {:?}",
            String::from_utf8_lossy(&b)
        );
        assert_eq!(h["content-type"], "application/problem+json", "{name}");
        assert_eq!(
            problem_of(&b),
            (problem::INVALID_KEY.to_owned(), 400),
            "{name}"
        );
        assert_eq!(
            runs.load(Ordering::SeqCst),
            before,
            "{name}: the handler ran"
        );
    }
    // Valid: 255 characters bare and quoted, and 2,000 byte-identical lines of one key.
    let same: Vec<&[u8]> = vec![b"k-many-lines"; 2_000];
    let valid: Vec<(&str, Vec<&[u8]>)> = vec![
        ("255 bare", vec![k255.as_bytes()]),
        ("255 quoted", vec![q255.as_bytes()]),
        ("2,000 identical lines", same),
        ("visible punctuation", vec![b"!#$%&'*+-.^_`|~:/?@[]{}<>=,;"]),
    ];
    for (name, keys) in valid {
        let before = runs.load(Ordering::SeqCst);
        let (s, h, b) = call(&app, post("/orders", &keys, name)).await;
        assert_eq!(
            s,
            StatusCode::CREATED,
            "{name}: {:?}",
            String::from_utf8_lossy(&b)
        );
        assert!(h.get("idempotent-replayed").is_none(), "{name}");
        assert_eq!(runs.load(Ordering::SeqCst), before + 1, "{name}");
        let (s, h, _) = call(&app, post("/orders", &keys, name)).await;
        assert_eq!(s, StatusCode::CREATED, "{name}: the repeat");
        assert_eq!(h["idempotent-replayed"], "true", "{name}");
        assert_eq!(runs.load(Ordering::SeqCst), before + 1, "{name}: ran again");
    }
}

/// "Requests with a method other than POST and PATCH ... pass through untouched": a GET or a
/// PUT with an invalid key (or two different ones) goes to the handler, with no 400; and a
/// POST without a key, when none is required, runs every time.
#[tokio::test]
async fn s49_idem_other_methods_pass_through_whatever_their_key() {
    let runs = Arc::new(AtomicUsize::new(0));
    let r2 = runs.clone();
    let app = Router::new()
        .route(
            "/x",
            axum::routing::any(move || {
                let runs = r2.clone();
                async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    "ok"
                }
            }),
        )
        .layer(IdempotencyLayer::new(
            MemoryStore::default(),
            ByCredentials::default(),
        ));
    for method in ["GET", "PUT", "DELETE"] {
        for keys in [vec![&b""[..]], vec![b"a b"], vec![b"k1", b"k2"]] {
            let mut req = post("/x", &keys, "");
            *req.method_mut() = method.parse().unwrap();
            let (s, _, _) = call(&app, req).await;
            assert_eq!(s, StatusCode::OK, "{method} {keys:?}");
        }
    }
    assert_eq!(runs.load(Ordering::SeqCst), 9);
    for _ in 0..2 {
        assert_eq!(call(&app, post("/x", &[], "{}")).await.0, StatusCode::OK);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 11);
}

/// "duplicate concurrent request (same client, same key, same payload) | the store's atomic lock
/// lets exactly one execution start | the others get 409 `…/idempotency-key-in-flight` with
/// `Retry-After: 1`". 64 copies at once on two worker threads, five rounds: one handler run each;
/// every other copy is a 409 in flight (or, if it came after the end, the replay).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s49_idem_burst_of_one_key_runs_the_handler_once() {
    let runs = Arc::new(AtomicUsize::new(0));
    let layer = IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default());
    let app = app(&runs, ms(100), layer);
    for round in 0..5 {
        let key = format!("burst-{round}");
        let gate = Arc::new(tokio::sync::Barrier::new(64));
        let mut tasks = Vec::new();
        for _ in 0..64 {
            let (app, key, gate) = (app.clone(), key.clone(), gate.clone());
            tasks.push(tokio::spawn(async move {
                let req = post("/orders", &[key.as_bytes()], "{\"sku\":1}");
                gate.wait().await;
                read(app.oneshot(req).await.unwrap()).await
            }));
        }
        let (mut created, mut conflict) = (0, 0);
        for t in tasks {
            let (s, h, b) = t.await.unwrap();
            match s {
                StatusCode::CREATED => created += 1,
                StatusCode::CONFLICT => {
                    assert_eq!(h["retry-after"], "1");
                    assert_eq!(problem_of(&b).0, problem::IN_FLIGHT);
                    conflict += 1;
                }
                other => panic!("round {round}: {other}"),
            }
        }
        assert_eq!(created + conflict, 64);
        assert!(created >= 1);
        assert_eq!(runs.load(Ordering::SeqCst), round + 1, "round {round}");
    }
}

/// A body that sends one chunk, then never ends.
fn hanging_body() -> Body {
    let s = futures_util::stream::once(async {
        Ok::<_, std::io::Error>(Bytes::from_static(b"{\"sku\""))
    })
    .chain(futures_util::stream::pending());
    Body::from_stream(s)
}

use futures_util::StreamExt;

/// Cancellation while the body is read: nothing is locked yet (the fingerprint needs the whole
/// body), so a request dropped there leaves its key free: the retry with the whole body runs
/// at once (201, not 409), and the handler runs once.
#[tokio::test(start_paused = true)]
async fn s49_idem_dropped_while_the_body_is_read_leaves_the_key_free() {
    let runs = Arc::new(AtomicUsize::new(0));
    let store = MemoryStore::default();
    let layer = IdempotencyLayer::new(store.clone(), ByCredentials::default());
    let app = app(&runs, ms(10), layer);
    let cut = tokio::time::timeout(
        Duration::from_secs(5),
        app.clone()
            .oneshot(post("/orders", &[b"k-body"], hanging_body())),
    )
    .await;
    assert!(cut.is_err());
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    let (s, h, _) = call(&app, post("/orders", &[b"k-body"], "{\"sku\":1}")).await;
    assert_eq!(s, StatusCode::CREATED);
    assert!(h.get("idempotent-replayed").is_none());
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A `MemoryStore` whose every operation takes time (a remote store's round trip): the
/// operation's effect happens at its end, so a request dropped mid-operation leaves it to the
/// layer's background work.
#[derive(Debug, Clone)]
struct SlowStore {
    inner: MemoryStore,
    rtt: Duration,
}

impl IdempotencyStore for SlowStore {
    fn begin(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        token: LockToken,
        lease: Duration,
    ) -> BoxFuture<Result<Begin, BoxError>> {
        let (inner, rtt, key) = (self.inner.clone(), self.rtt, key.to_owned());
        Box::pin(async move {
            tokio::time::sleep(rtt).await;
            inner.begin(&key, fingerprint, token, lease).await
        })
    }
    fn renew(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        token: LockToken,
        lease: Duration,
    ) -> BoxFuture<Result<bool, BoxError>> {
        let (inner, rtt, key) = (self.inner.clone(), self.rtt, key.to_owned());
        Box::pin(async move {
            tokio::time::sleep(rtt).await;
            inner.renew(&key, fingerprint, token, lease).await
        })
    }
    fn complete(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        token: LockToken,
        response: StoredResponse,
        ttl: Duration,
    ) -> BoxFuture<Result<(), BoxError>> {
        let (inner, rtt, key) = (self.inner.clone(), self.rtt, key.to_owned());
        Box::pin(async move {
            tokio::time::sleep(rtt).await;
            inner
                .complete(&key, fingerprint, token, response, ttl)
                .await
        })
    }
    fn release(&self, key: &str, token: LockToken) -> BoxFuture<Result<(), BoxError>> {
        let (inner, rtt, key) = (self.inner.clone(), self.rtt, key.to_owned());
        Box::pin(async move {
            tokio::time::sleep(rtt).await;
            inner.release(&key, token).await
        })
    }
}

/// The guarantees table, every row about a client that goes away, at every await of a request:
/// a store round trip of 100 ms (begin), a handler of 100 ms, a store round trip of 100 ms
/// (complete). The request is dropped at t = 0, 5, ..., 395 ms. Then:
///
/// - dropped before the handler started: "the handler does not run; the store's answer is
///   awaited in the background and, if it locked the key, the key is released";
/// - dropped later: "the handler runs to its end in its own task; its response is stored";
///
/// and the client's retries (every `Retry-After: 1`) end with 201 and the handler has run
/// exactly once; a 409 is only seen while the first execution's outcome is not yet known.
#[tokio::test(start_paused = true)]
async fn s49_idem_drop_at_every_await_runs_the_handler_once() {
    for cut_ms in (0..400).step_by(5) {
        let runs = Arc::new(AtomicUsize::new(0));
        let store = SlowStore {
            inner: MemoryStore::default(),
            rtt: ms(100),
        };
        let layer = IdempotencyLayer::new(store.clone(), ByCredentials::default());
        let app = app(&runs, ms(100), layer);
        let key = format!("k-cut-{cut_ms}");
        let t0 = tokio::time::Instant::now();
        let first = tokio::time::timeout(
            ms(cut_ms),
            app.clone()
                .oneshot(post("/orders", &[key.as_bytes()], "{\"n\":1}")),
        )
        .await;
        if let Ok(res) = first {
            let (s, _, _) = read(res.unwrap()).await;
            assert_eq!(s, StatusCode::CREATED, "cut {cut_ms}: finished first");
        }
        // The handler never starts after the request was dropped before it.
        tokio::time::sleep(ms(1_000)).await;
        let ran = runs.load(Ordering::SeqCst);
        assert!(ran <= 1, "cut {cut_ms}: ran {ran} times");
        if cut_ms <= 95 {
            assert_eq!(
                ran, 0,
                "cut {cut_ms}: dropped before the handler, yet it ran"
            );
        }
        // Retry until an answer that is not 409.
        let mut answers = Vec::new();
        loop {
            let (s, h, b) = call(&app, post("/orders", &[key.as_bytes()], "{\"n\":1}")).await;
            if s == StatusCode::CONFLICT {
                assert_eq!(problem_of(&b).0, problem::IN_FLIGHT);
                answers.push(409);
                assert!(answers.len() < 40, "cut {cut_ms}: 409 for ever");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            assert_eq!(s, StatusCode::CREATED, "cut {cut_ms}");
            answers.push(201);
            let replayed = h.get("idempotent-replayed").is_some();
            assert_eq!(
                replayed,
                ran == 1,
                "cut {cut_ms}: replayed {replayed}, the first run {ran}"
            );
            break;
        }
        assert_eq!(
            runs.load(Ordering::SeqCst),
            1,
            "cut {cut_ms}: answers {answers:?} after {:?}",
            t0.elapsed()
        );
    }
}

/// "client gone while the store is locking the key ... a retry with the same key runs
/// normally (or gets 409 for the moment the release is on its way)": how long that moment is,
/// with a 100 ms store round trip: the key is free again within a few round trips, never only
/// at the end of the 30 s lease.
#[tokio::test(start_paused = true)]
async fn s49_idem_dropped_during_begin_frees_the_key_within_round_trips() {
    let runs = Arc::new(AtomicUsize::new(0));
    let inner = MemoryStore::default();
    let store = SlowStore {
        inner: inner.clone(),
        rtt: ms(100),
    };
    let layer = IdempotencyLayer::new(store, ByCredentials::default());
    let app = app(&runs, ms(10), layer);
    let cut = tokio::time::timeout(
        ms(50),
        app.clone().oneshot(post("/orders", &[b"k-b"], "{}")),
    )
    .await;
    assert!(cut.is_err());
    tokio::time::sleep(ms(400)).await;
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    assert_eq!(
        inner.len(),
        0,
        "the key is still held 400 ms after the begin answered"
    );
}

/// Composition on a real socket, as the guide advises: the layer in an axum `Router` under
/// tower-http's `TimeoutLayer` (outside, 100 ms) and `RequestBodyLimitLayer` (outside, 64
/// bytes). A 300 ms handler times out for its client (408), runs to its end, and its retry gets
/// 409 with `Retry-After: 1` while it runs, then the stored 201 with `Idempotent-Replayed:
/// true`; the handler ran once. A body over the outer limit never reaches the store: a retry
/// with the same key and a small body runs (201), it is not a 422.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s49_idem_under_tower_http_timeout_and_body_limit_on_a_socket() {
    let runs = Arc::new(AtomicUsize::new(0));
    let layer = IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default());
    let app = app(&runs, ms(300), layer)
        .layer(tower_http::limit::RequestBodyLimitLayer::new(64))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            ms(100),
        ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let url = format!("http://{addr}/orders");
    let client = reqwest::Client::new();
    let send = |key: &str, body: Vec<u8>| {
        client
            .post(&url)
            .header("authorization", "Bearer s49")
            .header("idempotency-key", key)
            .body(body)
            .send()
    };
    let r = send("k-sock", b"{\"n\":1}".to_vec()).await.unwrap();
    assert_eq!(r.status(), 408);
    let r = send("k-sock", b"{\"n\":1}".to_vec()).await.unwrap();
    assert_eq!(r.status(), 409);
    assert_eq!(r.headers()["retry-after"], "1");
    tokio::time::sleep(ms(400)).await;
    let r = send("k-sock", b"{\"n\":1}".to_vec()).await.unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    assert_eq!(r.headers()["x-order"], "o-s49");
    assert_eq!(r.text().await.unwrap(), "{\"n\":1}");
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // Over the outer body limit, sized and streamed.
    let r = send("k-big", vec![b'x'; 1000]).await.unwrap();
    assert_eq!(r.status(), 413);
    // Streamed (chunked, no length): the outer limit fails the body while the layer reads it.
    let status = chunked(addr, "k-big2", &[b'y'; 1000]).await;
    assert!((400..500).contains(&status), "{status}");
    for key in ["k-big", "k-big2"] {
        let r = send(key, b"{}".to_vec()).await.unwrap();
        // The handler takes 300 ms: past the outer timeout, but it ran.
        assert_eq!(r.status(), 408, "{key}");
        tokio::time::sleep(ms(400)).await;
        let r = send(key, b"{}".to_vec()).await.unwrap();
        assert_eq!(r.status(), 201, "{key}");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 3);
    server.abort();
}

/// "The path is the one the client sent: under axum's `Router::nest` ... it is read from axum's
/// `OriginalUri` ... so one key sent to `/us/orders` and then to `/eu/orders` is answered 422";
/// with the layer as a `route_layer` of the nested routers, too.
#[tokio::test]
async fn s49_idem_nest_and_route_layer_see_the_full_path() {
    let runs = Arc::new(AtomicUsize::new(0));
    let store = MemoryStore::default();
    let region = |runs: &Arc<AtomicUsize>| {
        let runs = runs.clone();
        Router::new()
            .route(
                "/orders",
                axum::routing::post(move || {
                    let runs = runs.clone();
                    async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        StatusCode::CREATED
                    }
                }),
            )
            .route_layer(IdempotencyLayer::new(
                store.clone(),
                ByCredentials::default(),
            ))
    };
    let app = Router::new()
        .nest("/us", region(&runs))
        .nest("/eu", region(&runs));
    assert_eq!(
        call(&app, post("/us/orders", &[b"k-n"], "{}")).await.0,
        StatusCode::CREATED
    );
    let (s, _, b) = call(&app, post("/eu/orders", &[b"k-n"], "{}")).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(problem_of(&b), (problem::KEY_REUSED.to_owned(), 422));
    let (s, h, _) = call(&app, post("/us/orders", &[b"k-n"], "{}")).await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(h["idempotent-replayed"], "true");
    // A query is part of the fingerprint, byte for byte.
    let (s, _, _) = call(&app, post("/us/orders?a=1", &[b"k-n"], "{}")).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// One chunked POST on a fresh connection (100-byte chunks); the status, 0 if none came.
async fn chunked(addr: std::net::SocketAddr, key: &str, body: &[u8]) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut out = format!(
        "POST /orders HTTP/1.1\r\nhost: x\r\nauthorization: Bearer s49\r\n\
         idempotency-key: {key}\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    )
    .into_bytes();
    for c in body.chunks(100) {
        out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        out.extend_from_slice(c);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    let _ = s.write_all(&out).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf)
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// The guarantees table: "handler returns 5xx (or 408, 425, 429) | not stored ...; the key is
/// released before the response goes out | the 5xx; a retry, even at once, runs the handler
/// again". With a store whose round trip takes 100 ms, a retry sent the moment the first
/// answer arrived must run the handler, not get 409.
#[tokio::test(start_paused = true)]
async fn s49_idem_unstored_status_releases_before_the_answer_with_a_slow_store() {
    for status in [500u16, 503, 408, 425, 429] {
        let runs = Arc::new(AtomicUsize::new(0));
        let r2 = runs.clone();
        let store = SlowStore {
            inner: MemoryStore::default(),
            rtt: ms(100),
        };
        let app = Router::new()
            .route(
                "/orders",
                axum::routing::post(move || {
                    let runs = r2.clone();
                    async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        StatusCode::from_u16(status).unwrap()
                    }
                }),
            )
            .layer(IdempotencyLayer::new(store, ByCredentials::default()));
        let key = format!("k-unstored-{status}");
        for attempt in 1..=2 {
            let (s, _, b) = call(&app, post("/orders", &[key.as_bytes()], "{}")).await;
            assert_eq!(
                s.as_u16(),
                status,
                "{status}, attempt {attempt}: {:?}",
                String::from_utf8_lossy(&b)
            );
            assert_eq!(runs.load(Ordering::SeqCst), attempt, "{status}");
        }
    }
}

/// The guide: "Run to its end, the execution stores its response, and the client's retry gets
/// it as soon as the handler has finished". With a 100 ms store round trip, a retry sent the
/// moment the first 201 arrived gets the stored response, not a 409.
#[tokio::test(start_paused = true)]
async fn s49_idem_retry_right_after_the_answer_is_replayed_with_a_slow_store() {
    let runs = Arc::new(AtomicUsize::new(0));
    let store = SlowStore {
        inner: MemoryStore::default(),
        rtt: ms(100),
    };
    let layer = IdempotencyLayer::new(store, ByCredentials::default());
    let app = app(&runs, ms(50), layer);
    let (s, _, _) = call(&app, post("/orders", &[b"k-right-after"], "{}")).await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, h, b) = call(&app, post("/orders", &[b"k-right-after"], "{}")).await;
    assert_eq!(s, StatusCode::CREATED, "{:?}", String::from_utf8_lossy(&b));
    assert_eq!(h["idempotent-replayed"], "true");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// "same key, another method, path, query or body | 422": also while the first request with
/// the key is still running (the store's `begin`: "An entry with another fingerprint is a
/// `Begin::Mismatch`, whatever its token").
#[tokio::test(start_paused = true)]
async fn s49_idem_other_payload_while_the_first_runs_is_422() {
    let runs = Arc::new(AtomicUsize::new(0));
    let layer = IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default());
    let app = app(&runs, ms(1_000), layer);
    let first = tokio::spawn({
        let app = app.clone();
        async move {
            call(&app, post("/orders", &[b"k-mis"], "{\"n\":1}"))
                .await
                .0
        }
    });
    tokio::time::sleep(ms(100)).await;
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let (s, _, b) = call(&app, post("/orders", &[b"k-mis"], "{\"n\":2}")).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(problem_of(&b), (problem::KEY_REUSED.to_owned(), 422));
    let (s, _, _) = call(&app, post("/orders?x", &[b"k-mis"], "{\"n\":1}")).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(first.await.unwrap(), StatusCode::CREATED);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// The guide's table and the module docs: a key "sent bare, `k`, or as a structured-field
/// string, `"k"`: the two name the same key on two requests". A retry that quotes the key its
/// first request sent bare (or the other way round) is replayed, and another body under it is
/// 422; the handler runs once.
#[tokio::test]
async fn s49_idem_a_key_bare_then_quoted_is_the_same_key() {
    let runs = Arc::new(AtomicUsize::new(0));
    let layer = IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default());
    let app = app(&runs, Duration::ZERO, layer);
    let (status, _, body) = call(&app, post("/orders", &[b"order-77"], "{\"n\":1}")).await;
    assert_eq!(
        (status, &body[..]),
        (StatusCode::CREATED, &b"{\"n\":1}"[..])
    );
    let (status, headers, body) =
        call(&app, post("/orders", &[b"\"order-77\""], "{\"n\":1}")).await;
    assert_eq!(
        (status, &body[..]),
        (StatusCode::CREATED, &b"{\"n\":1}"[..])
    );
    assert_eq!(headers["idempotent-replayed"], "true");
    let (status, _, body) = call(&app, post("/orders", &[b"\"order-77\""], "{\"n\":2}")).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(problem_of(&body).0.ends_with("/idempotency-key-reused"));
    // Quoted first, bare after.
    let (status, _, _) = call(&app, post("/orders", &[b"\"order-78\""], "{\"n\":3}")).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, headers, _) = call(&app, post("/orders", &[b"order-78"], "{\"n\":3}")).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(headers["idempotent-replayed"], "true");
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}
