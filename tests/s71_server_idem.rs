//! s71 outside round: the server-side idempotency layer for axum (`sturdy::idempotency::server`)
//! and its stores (memory, Redis), read against docs/guides/idempotency.md, docs/RELIABILITY.md,
//! README.md and the rustdoc of `sturdy-idempotency`'s server module and `sturdy-redis`.
//!
//! In-process tests drive an axum `Router` (or a tower service) with a paused clock; wire tests
//! run a real axum server on 127.0.0.1:0 in real time. Redis tests use `STURDY_REDIS_URL` with a
//! unique key prefix per test.
#![cfg(feature = "full")]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use axum::body::Body;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sturdy::core::events::{Event, IdempotencyRefusal};
use sturdy::core::WallClock;
use sturdy::idempotency::server::{
    problem, Begin, BoxFuture, ByCredentials, Fingerprint, IdempotencyLayer, IdempotencyStore,
    LockToken, MemoryStore, StoredResponse,
};
use tokio::net::TcpListener;
use tower::{BoxError, Layer, Service, ServiceExt};

// ---------------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------------

/// A seeded generator (splitmix64): `rand` is not a dependency of this package's tests.
struct Seeded(u64);

impl Seeded {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// A number in `0..=max`.
    fn upto(&mut self, max: u64) -> u64 {
        self.next() % (max + 1)
    }
}

const AUTH: &str = "Bearer s71-secret-credential";

/// Counts handler runs; the body chooses what the handler does:
/// `sleep:<ms>` sleeps then answers 201, `status:<code>` answers that status, `panic` panics,
/// `big:<n>` answers 201 with n bytes, anything else answers 201 with `run <n>: <body>`.
#[derive(Clone, Default)]
struct Runs {
    started: Arc<AtomicUsize>,
    finished: Arc<AtomicUsize>,
}

impl Runs {
    fn started(&self) -> usize {
        self.started.load(Ordering::SeqCst)
    }
    fn finished(&self) -> usize {
        self.finished.load(Ordering::SeqCst)
    }
}

async fn behave(runs: Runs, body: Bytes) -> Response<Body> {
    let n = runs.started.fetch_add(1, Ordering::SeqCst) + 1;
    let text = String::from_utf8_lossy(&body).into_owned();
    let resp = if let Some(ms) = text.strip_prefix("sleep:") {
        let ms: u64 = ms.trim().parse().unwrap();
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Response::builder()
            .status(201)
            .body(Body::from(format!("run {n}: slept {ms}")))
            .unwrap()
    } else if let Some(code) = text.strip_prefix("status:") {
        Response::builder()
            .status(code.trim().parse::<u16>().unwrap())
            .body(Body::from(format!("run {n}: status")))
            .unwrap()
    } else if text == "panic" {
        panic!("s71 handler panics on purpose");
    } else if let Some(len) = text.strip_prefix("big:") {
        let len: usize = len.trim().parse().unwrap();
        Response::builder()
            .status(201)
            .body(Body::from(vec![b'x'; len]))
            .unwrap()
    } else {
        Response::builder()
            .status(201)
            .header("set-cookie", "a=1; Path=/")
            .header("set-cookie", "b=2; Path=/")
            .header(
                "x-bin",
                HeaderValue::from_bytes(&[b'v', 0x80, 0xff]).unwrap(),
            )
            .header("location", "/orders/o_1")
            .body(Body::from(format!("run {n}: {text}")))
            .unwrap()
    };
    runs.finished.fetch_add(1, Ordering::SeqCst);
    resp
}

fn app_with(layer: IdempotencyLayer<impl IdempotencyStore + Clone>, runs: &Runs) -> Router {
    let r = runs.clone();
    Router::new()
        .route(
            "/orders",
            post(move |body: Bytes| behave(r.clone(), body)).patch({
                let r = runs.clone();
                move |body: Bytes| behave(r.clone(), body)
            }),
        )
        .layer(layer)
}

fn mem_layer() -> IdempotencyLayer<MemoryStore> {
    IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default())
}

fn req(key: Option<&[u8]>, body: impl Into<Bytes>) -> Request<Body> {
    let mut b = Request::post("/orders").header("authorization", AUTH);
    if let Some(k) = key {
        b = b.header("idempotency-key", HeaderValue::from_bytes(k).unwrap());
    }
    b.body(Body::from(body.into())).unwrap()
}

async fn send(app: &Router, r: Request<Body>) -> (StatusCode, HeaderMap, Bytes) {
    let resp = tokio::time::timeout(Duration::from_secs(3600), app.clone().oneshot(r))
        .await
        .expect("the layer answered")
        .unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = tokio::time::timeout(Duration::from_secs(3600), body.collect())
        .await
        .expect("the body ended")
        .unwrap()
        .to_bytes();
    (parts.status, parts.headers, bytes)
}

fn problem_type(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(body)));
    v["type"].as_str().unwrap_or_default().to_owned()
}

/// Checks a problem answer: status, content type, `type`, `status` member.
fn assert_problem(got: &(StatusCode, HeaderMap, Bytes), status: u16, type_: &str) {
    let (st, headers, body) = got;
    assert_eq!(
        st.as_u16(),
        status,
        "body: {:?}",
        String::from_utf8_lossy(body)
    );
    assert_eq!(
        headers.get("content-type").map(HeaderValue::as_bytes),
        Some(&b"application/problem+json"[..])
    );
    assert_eq!(problem_type(body), type_);
    let v: serde_json::Value = serde_json::from_slice(body).unwrap();
    assert_eq!(v["status"].as_u64(), Some(u64::from(status)));
    assert!(v["title"].is_string() && v["detail"].is_string(), "{v}");
}

fn replayed(h: &HeaderMap) -> bool {
    h.get("idempotent-replayed").map(HeaderValue::as_bytes) == Some(b"true")
}

fn unique(tag: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let nanos = sturdy::core::SystemClock
        .now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "s71:{tag}:{}:{nanos}:{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

fn redis_url() -> Option<String> {
    match std::env::var("STURDY_REDIS_URL") {
        Ok(u) if !u.is_empty() => Some(u),
        _ => {
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "STURDY_REDIS_URL is required in CI"
            );
            None
        }
    }
}

async fn serve(app: Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    addr
}

fn client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

fn wire_req(addr: SocketAddr, key: &str, body: &str) -> Request<Full<Bytes>> {
    Request::post(format!("http://{addr}/orders"))
        .header("authorization", AUTH)
        .header("idempotency-key", key)
        .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
        .unwrap()
}

async fn wire_send(addr: SocketAddr, key: &str, body: &str) -> (StatusCode, HeaderMap, Bytes) {
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        client().request(wire_req(addr, key, body)),
    )
    .await
    .expect("answered within 10 s")
    .unwrap();
    let (parts, b) = resp.into_parts();
    (
        parts.status,
        parts.headers,
        b.collect().await.unwrap().to_bytes(),
    )
}

/// A store wrapper: `begin` takes `begin_delay` first; failures can be switched on.
#[derive(Debug, Clone)]
struct Wrapped<St> {
    inner: St,
    begin_delay: Duration,
    fail_begin: Arc<AtomicBool>,
    fail_complete: Arc<AtomicBool>,
    hang: Arc<AtomicBool>,
}

impl<St> Wrapped<St> {
    fn new(inner: St) -> Self {
        Self {
            inner,
            begin_delay: Duration::ZERO,
            fail_begin: Arc::default(),
            fail_complete: Arc::default(),
            hang: Arc::default(),
        }
    }
}

impl<St: IdempotencyStore + Clone> IdempotencyStore for Wrapped<St> {
    fn begin(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        token: LockToken,
        lease: Duration,
    ) -> BoxFuture<Result<Begin, BoxError>> {
        let fail = self.fail_begin.load(Ordering::SeqCst);
        let hang = self.hang.load(Ordering::SeqCst);
        let delay = self.begin_delay;
        if hang {
            // Hung before the command reached the storage: nothing is locked.
            return Box::pin(std::future::pending());
        }
        let inner = self.inner.begin(key, fingerprint, token, lease);
        Box::pin(async move {
            if fail {
                return Err("s71 store down".into());
            }
            tokio::time::sleep(delay).await;
            inner.await
        })
    }
    fn renew(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        token: LockToken,
        lease: Duration,
    ) -> BoxFuture<Result<bool, BoxError>> {
        self.inner.renew(key, fingerprint, token, lease)
    }
    fn complete(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        token: LockToken,
        response: StoredResponse,
        ttl: Duration,
    ) -> BoxFuture<Result<(), BoxError>> {
        if self.fail_complete.load(Ordering::SeqCst) {
            return Box::pin(async { Err("s71 store down at complete".into()) });
        }
        self.inner.complete(key, fingerprint, token, response, ttl)
    }
    fn release(&self, key: &str, token: LockToken) -> BoxFuture<Result<(), BoxError>> {
        self.inner.release(key, token)
    }
}

// ---------------------------------------------------------------------------------------------
// replay: status, headers, body, the marker
// ---------------------------------------------------------------------------------------------

/// Guide: "the stored response (status, headers except connection-level ones such as `Date` and
/// `Content-Length`, body) with `Idempotent-Replayed: true`; the handler does not run".
#[tokio::test(start_paused = true)]
async fn replay_keeps_status_headers_in_order_and_body_bytes() {
    let runs = Runs::default();
    let app = app_with(mem_layer(), &runs);
    let first = send(&app, req(Some(b"k-replay"), "hello")).await;
    assert_eq!(first.0, StatusCode::CREATED);
    assert!(
        first.1.get("idempotent-replayed").is_none(),
        "{:?}",
        first.1
    );
    let again = send(&app, req(Some(b"k-replay"), "hello")).await;
    assert_eq!(runs.started(), 1);
    assert_eq!(again.0, StatusCode::CREATED);
    assert_eq!(again.2, first.2);
    assert!(replayed(&again.1));
    let cookies: Vec<_> = again.1.get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["a=1; Path=/", "b=2; Path=/"]);
    assert_eq!(again.1["x-bin"].as_bytes(), &[b'v', 0x80, 0xff]);
    assert_eq!(again.1["location"], "/orders/o_1");
    if let Some(len) = again.1.get("content-length") {
        assert_eq!(len.to_str().unwrap(), again.2.len().to_string());
    }
}

/// Guide: the replay carries `Idempotent-Replayed: true`. A handler that set the header itself
/// (to `false`, say) must not make the replay carry two values, the first of them `false`.
#[tokio::test(start_paused = true)]
async fn replay_marker_is_one_value_even_if_handler_set_it() {
    let app = Router::new()
        .route(
            "/orders",
            post(|| async {
                (
                    StatusCode::CREATED,
                    [("idempotent-replayed", "false")],
                    "made",
                )
            }),
        )
        .layer(mem_layer());
    let _ = send(&app, req(Some(b"k-own-marker"), "x")).await;
    let again = send(&app, req(Some(b"k-own-marker"), "x")).await;
    let values: Vec<_> = again.1.get_all("idempotent-replayed").iter().collect();
    assert_eq!(values, ["true"], "the replay's marker values");
}

// ---------------------------------------------------------------------------------------------
// keys
// ---------------------------------------------------------------------------------------------

/// Guide: "a key that is not 1 to 255 visible ASCII characters (sent bare, `k`, or as a
/// structured-field string, `"k"` ...) | 400, `…/idempotency-key-invalid`".
#[tokio::test(start_paused = true)]
async fn key_lengths_and_bytes() {
    let runs = Runs::default();
    let app = app_with(mem_layer(), &runs);
    let k255 = "k".repeat(255);
    let q255 = "q".repeat(255);
    let k256 = "k".repeat(256);
    let ok: Vec<Vec<u8>> = vec![
        b"1".to_vec(),
        b"~".to_vec(),
        k255.clone().into_bytes(),
        format!("\"{q255}\"").into_bytes(),
    ];
    for (i, k) in ok.iter().enumerate() {
        let got = send(&app, req(Some(k), format!("ok {i}"))).await;
        assert_eq!(got.0, StatusCode::CREATED, "key of {} bytes", k.len());
    }
    let before = runs.started();
    let bad: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        b"\"\"".to_vec(),
        k256.clone().into_bytes(),
        format!("\"{k256}\"").into_bytes(),
        vec![b'k'; 64 * 1024],
        b"caf\xc3\xa9".to_vec(),
        b"k\x80\xff".to_vec(),
        b"a b".to_vec(),
        b"a\tb".to_vec(),
    ];
    for k in &bad {
        let got = send(&app, req(Some(k), "bad")).await;
        assert_problem(&got, 400, problem::INVALID_KEY);
    }
    assert_eq!(runs.started(), before, "no handler ran for an invalid key");
}

/// Guide: "sent bare, `k`, or as a structured-field string, `"k"`: the two name the same key".
/// A structured-field string with escapes names the unescaped key: `"a\"b"` is `a"b` and
/// `"a\\b"` is `a\b`.
#[tokio::test(start_paused = true)]
async fn quoted_key_with_escapes_names_the_bare_key() {
    let runs = Runs::default();
    let app = app_with(mem_layer(), &runs);
    for (bare, quoted) in [
        (&b"plain"[..], &b"\"plain\""[..]),
        (b"a\\b", b"\"a\\\\b\""),
        (b"a\"b", b"\"a\\\"b\""),
    ] {
        let first = send(&app, req(Some(bare), "same")).await;
        assert_eq!(first.0, StatusCode::CREATED);
        let again = send(&app, req(Some(quoted), "same")).await;
        assert_eq!(
            (again.0, replayed(&again.1)),
            (StatusCode::CREATED, true),
            "{:?} after {:?}",
            String::from_utf8_lossy(quoted),
            String::from_utf8_lossy(bare)
        );
    }
    assert_eq!(runs.started(), 3);
}

/// Keys that look like a quoted key but are not one must never be read as another key (a
/// replay of another operation's response): `"k`, `k"`, `"k"x`, `"k""`, `'k'`. (A
/// structured-field item with parameters, `"k";a=1`, is the string `k` to an RFC 9651 parser.)
#[tokio::test(start_paused = true)]
async fn near_quoted_keys_never_collide_with_the_bare_key() {
    let runs = Runs::default();
    let app = app_with(mem_layer(), &runs);
    let first = send(&app, req(Some(b"k"), "same")).await;
    assert_eq!(first.0, StatusCode::CREATED);
    for k in [
        &b"\"k"[..],
        b"k\"",
        b"\"k\"x",
        b"\"k\"\"",
        b"'k'",
        b"\"k\\\"",
    ] {
        let got = send(&app, req(Some(k), "same")).await;
        assert!(
            !replayed(&got.1),
            "{:?} was answered with the replay of key k",
            String::from_utf8_lossy(k)
        );
        assert!(
            got.0 == StatusCode::CREATED || got.0 == StatusCode::BAD_REQUEST,
            "{:?}: {}",
            String::from_utf8_lossy(k),
            got.0
        );
    }
}

/// Guide: "two or more different key headers on one request (byte-identical repeats are one key;
/// `k` and `"k"` on two lines are two) | 400".
#[tokio::test(start_paused = true)]
async fn two_key_header_lines() {
    let runs = Runs::default();
    let events = Arc::new(Mutex::new(Vec::new()));
    let ev = events.clone();
    let layer = mem_layer().on_event(move |e| {
        if let Event::IdempotencyRefused {
            refusal, status, ..
        } = e
        {
            ev.lock().unwrap().push((*refusal, status.as_u16()));
        }
    });
    let app = app_with(layer, &runs);
    let two = |a: &'static str, b: &'static str| {
        Request::post("/orders")
            .header("authorization", AUTH)
            .header("idempotency-key", a)
            .header("idempotency-key", b)
            .body(Body::from("two"))
            .unwrap()
    };
    let same = send(&app, two("k2", "k2")).await;
    assert_eq!(same.0, StatusCode::CREATED);
    let single = send(&app, req(Some(b"k2"), "two")).await;
    assert!(replayed(&single.1), "k2 twice is the key k2");
    for (a, b) in [("k2", "\"k2\""), ("k2", "j2"), ("", "k2")] {
        let got = send(&app, two(a, b)).await;
        assert_problem(&got, 400, problem::INVALID_KEY);
    }
    assert_eq!(runs.started(), 1);
    let seen = events.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![(IdempotencyRefusal::InvalidKey, 400); 3],
        "each ambiguous key is an IdempotencyRefused event"
    );
}

/// Guide: "The fingerprint is SHA-256 over the method, the path and query (byte for byte ...)";
/// `/orders` and `/orders?` differ in their bytes, as do `?a=1&b=2` and `?b=2&a=1`.
#[tokio::test(start_paused = true)]
async fn fingerprint_path_and_query_byte_for_byte() {
    let runs = Runs::default();
    let app = app_with(mem_layer(), &runs);
    let at = |uri: &str, method: Method| {
        Request::builder()
            .method(method)
            .uri(uri)
            .header("authorization", AUTH)
            .header("idempotency-key", "k-fp")
            .body(Body::from("body"))
            .unwrap()
    };
    assert_eq!(
        send(&app, at("/orders?a=1&b=2", Method::POST)).await.0,
        StatusCode::CREATED
    );
    let swapped = send(&app, at("/orders?b=2&a=1", Method::POST)).await;
    assert_problem(&swapped, 422, problem::KEY_REUSED);
    let patch = send(&app, at("/orders?a=1&b=2", Method::PATCH)).await;
    assert_problem(&patch, 422, problem::KEY_REUSED);
    assert_eq!(runs.started(), 1);

    let runs = Runs::default();
    let app = app_with(mem_layer(), &runs);
    let bare = send(&app, at("/orders", Method::POST)).await;
    assert_eq!(bare.0, StatusCode::CREATED);
    let empty_query = send(&app, at("/orders?", Method::POST)).await;
    assert_problem(&empty_query, 422, problem::KEY_REUSED);
}

// ---------------------------------------------------------------------------------------------
// events
// ---------------------------------------------------------------------------------------------

/// `on_event`: "Calls `f` with an [`Event`] for every request answered with a stored response
/// (`IdempotentReplayed`) and every request refused for its key: 409 in flight, 422 reused, 400
/// missing or invalid (`IdempotencyRefused`)". Nothing for a first run, a 413 or a pass-through.
#[tokio::test(start_paused = true)]
async fn events_one_per_replay_and_refusal() {
    let runs = Runs::default();
    let events = Arc::new(Mutex::new(Vec::new()));
    let ev = events.clone();
    let layer = mem_layer()
        .with_require_key(true)
        .with_body_limit(16)
        .on_event(move |e| {
            let entry = match e {
                Event::IdempotentReplayed { method, status } => {
                    (format!("replayed {method}"), status.as_u16())
                }
                Event::IdempotencyRefused {
                    method,
                    refusal,
                    status,
                } => (format!("{} {method}", refusal.as_str()), status.as_u16()),
                _ => return,
            };
            ev.lock().unwrap().push(entry);
        });
    let app = app_with(layer, &runs);
    let slow = tokio::spawn({
        let app = app.clone();
        async move { send(&app, req(Some(b"e-1"), "sleep:1000")).await }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(send(&app, req(Some(b"e-1"), "sleep:1000")).await.0, 409);
    assert_eq!(slow.await.unwrap().0, 201);
    assert!(replayed(
        &send(&app, req(Some(b"e-1"), "sleep:1000")).await.1
    ));
    assert_eq!(send(&app, req(Some(b"e-1"), "other")).await.0, 422);
    assert_eq!(send(&app, req(None, "none")).await.0, 400);
    assert_eq!(send(&app, req(Some(b"a b"), "x")).await.0, 400);
    assert_eq!(send(&app, req(Some(b"e-2"), "x".repeat(17))).await.0, 413);
    let seen = events.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![
            ("in_flight POST".to_owned(), 409),
            ("replayed POST".to_owned(), 201),
            ("key_reused POST".to_owned(), 422),
            ("missing_key POST".to_owned(), 400),
            ("invalid_key POST".to_owned(), 400),
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// bodies: request and response limits
// ---------------------------------------------------------------------------------------------

/// Guide: "body over the limit (1 MiB, `with_body_limit` ...) | 413, `…/request-body-too-large`".
/// At the limit passes; one past is 413 and leaves the key free (the same key with a small body
/// then runs, it is not a 422).
#[tokio::test(start_paused = true)]
async fn body_limit_edges_and_413_leaves_key_free() {
    let runs = Runs::default();
    let app = app_with(mem_layer().with_body_limit(10), &runs);
    let at = send(&app, req(Some(b"b-at"), "0123456789")).await;
    assert_eq!(at.0, StatusCode::CREATED);
    let over = send(&app, req(Some(b"b-over"), "0123456789A")).await;
    assert_problem(&over, 413, problem::BODY_TOO_LARGE);
    let small = send(&app, req(Some(b"b-over"), "small")).await;
    assert_eq!(small.0, StatusCode::CREATED, "the 413 locked nothing");
    assert!(!replayed(&small.1));

    let runs = Runs::default();
    let app = app_with(mem_layer().with_body_limit(0), &runs);
    assert_eq!(
        send(&app, req(Some(b"b0"), "")).await.0,
        StatusCode::CREATED
    );
    assert_problem(
        &send(&app, req(Some(b"b1"), "x")).await,
        413,
        problem::BODY_TOO_LARGE,
    );
    // Non-UTF-8 bodies are fingerprinted as bytes.
    let app = app_with(mem_layer(), &runs);
    let raw: &[u8] = &[0xff, 0x00, 0xfe];
    assert_eq!(
        send(&app, req(Some(b"b-raw"), raw)).await.0,
        StatusCode::CREATED
    );
    let other: &[u8] = &[0xff, 0x00, 0xfd];
    assert_problem(
        &send(&app, req(Some(b"b-raw"), other)).await,
        422,
        problem::KEY_REUSED,
    );
}

/// A request body that streams without end is refused at the limit (413), not read forever.
#[tokio::test(start_paused = true)]
async fn endless_request_body_is_413_at_the_limit() {
    let runs = Runs::default();
    let app = app_with(mem_layer().with_body_limit(64 * 1024), &runs);
    let endless = futures_util::stream::repeat_with(|| {
        Ok::<_, Infallible>(Frame::data(Bytes::from_static(&[b'z'; 1024])))
    });
    let body = Body::new(http_body_util::StreamBody::new(endless));
    let r = Request::post("/orders")
        .header("authorization", AUTH)
        .header("idempotency-key", "endless")
        .body(body)
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), send(&app, r))
        .await
        .expect("answered");
    assert_problem(&got, 413, problem::BODY_TOO_LARGE);
    assert_eq!(runs.started(), 0);
}

/// `with_response_limit`: "The largest response body stored \[1 MiB\]. A handler whose response
/// is larger has run, so it is not run again: its key keeps a 500 RESPONSE_TOO_LARGE instead."
/// Guide table: "500 `…/idempotency-response-too-large`, also on every retry".
#[tokio::test(start_paused = true)]
async fn response_limit_edges() {
    let runs = Runs::default();
    let app = app_with(mem_layer().with_response_limit(10), &runs);
    let at = send(&app, req(Some(b"r-at"), "big:10")).await;
    assert_eq!((at.0, at.2.len()), (StatusCode::CREATED, 10));
    let at2 = send(&app, req(Some(b"r-at"), "big:10")).await;
    assert!(replayed(&at2.1));
    assert_eq!(at2.2, at.2);

    let over = send(&app, req(Some(b"r-over"), "big:11")).await;
    let again = send(&app, req(Some(b"r-over"), "big:11")).await;
    assert_problem(&again, 500, problem::RESPONSE_TOO_LARGE);
    assert_eq!(runs.started(), 2, "the handler over the limit ran once");
    // The guide's row: "500 `…/idempotency-response-too-large`, also on every retry".
    assert_problem(&over, 500, problem::RESPONSE_TOO_LARGE);

    let runs = Runs::default();
    let app = app_with(mem_layer().with_response_limit(0), &runs);
    let empty = send(&app, req(Some(b"r0"), "big:0")).await;
    assert_eq!(empty.0, StatusCode::CREATED);
    assert!(replayed(&send(&app, req(Some(b"r0"), "big:0")).await.1));
    assert_eq!(runs.started(), 1);
}

/// A streamed response body past the response limit is treated as a Full one: not run again,
/// the marker on retries.
#[tokio::test(start_paused = true)]
async fn streamed_response_over_limit_keeps_marker() {
    let runs = Runs::default();
    let r = runs.clone();
    let app = Router::new()
        .route(
            "/orders",
            post(move || {
                let r = r.clone();
                async move {
                    r.started.fetch_add(1, Ordering::SeqCst);
                    let chunks =
                        futures_util::stream::iter((0..4).map(|_| {
                            Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"abcd")))
                        }));
                    Response::builder()
                        .status(201)
                        .body(Body::new(http_body_util::StreamBody::new(chunks)))
                        .unwrap()
                }
            }),
        )
        .layer(mem_layer().with_response_limit(10));
    let first = send(&app, req(Some(b"s-over"), "x")).await;
    assert_problem(&first, 500, problem::RESPONSE_TOO_LARGE);
    let again = send(&app, req(Some(b"s-over"), "x")).await;
    assert_problem(&again, 500, problem::RESPONSE_TOO_LARGE);
    assert_eq!(runs.started(), 1);
}

// ---------------------------------------------------------------------------------------------
// what is stored: statuses, errors, panics
// ---------------------------------------------------------------------------------------------

/// Guide: "Not stored, so a retry runs the handler again: 5xx (`with_store_server_errors(true)`
/// stores them), and 408, 425 and 429"; rustdoc: "408, 425 and 429 are never stored".
#[tokio::test(start_paused = true)]
async fn statuses_not_stored_and_stored() {
    for store_5xx in [false, true] {
        let runs = Runs::default();
        let app = app_with(mem_layer().with_store_server_errors(store_5xx), &runs);
        for code in [408u16, 425, 429, 500, 503, 599] {
            let key = format!("st-{code}");
            let body = format!("status:{code}");
            let a = send(&app, req(Some(key.as_bytes()), body.clone())).await;
            assert_eq!(a.0.as_u16(), code);
            let before = runs.started();
            let b = send(&app, req(Some(key.as_bytes()), body)).await;
            assert_eq!(b.0.as_u16(), code);
            let stored = store_5xx && code >= 500;
            assert_eq!(
                (runs.started() - before, replayed(&b.1)),
                if stored { (0, true) } else { (1, false) },
                "status {code}, store 5xx {store_5xx}"
            );
        }
        // 4xx other than those are stored.
        let a = send(&app, req(Some(b"st-409"), "status:409")).await;
        let b = send(&app, req(Some(b"st-409"), "status:409")).await;
        assert_eq!(
            (a.0.as_u16(), b.0.as_u16(), replayed(&b.1)),
            (409, 409, true)
        );
    }
}

/// Module docs: "A handler that panics, fails (`Err`), or answers a status that is not stored
/// releases its key before its answer goes out, so a retry that follows at once runs."
#[tokio::test(start_paused = true)]
async fn inner_service_err_releases_key_at_once() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let inner = tower::service_fn(move |_r: Request<Body>| {
        let n = c.fetch_add(1, Ordering::SeqCst);
        async move {
            if n == 0 {
                Err::<Response<Body>, BoxError>("s71 inner failure".into())
            } else {
                Ok(Response::builder()
                    .status(201)
                    .body(Body::from("second"))
                    .unwrap())
            }
        }
    });
    let svc = mem_layer().layer(inner);
    let err = svc.clone().oneshot(req(Some(b"err-1"), "x")).await;
    assert!(err.is_err(), "the inner error comes back as the error");
    let ok = svc.clone().oneshot(req(Some(b"err-1"), "x")).await.unwrap();
    assert_eq!(ok.status(), StatusCode::CREATED);
    let replay = svc.oneshot(req(Some(b"err-1"), "x")).await.unwrap();
    assert!(replayed(replay.headers()));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// Guide: "handler panics | the panic is caught; the key is released ... | a 500 from a
/// panic-catching layer; a retry, even at once, runs the handler again".
#[tokio::test(start_paused = true)]
async fn panic_under_catch_panic_releases_key() {
    let runs = Runs::default();
    let app = app_with(mem_layer(), &runs).layer(tower_http::catch_panic::CatchPanicLayer::new());
    for _ in 0..3 {
        let got = send(&app, req(Some(b"p-1"), "panic")).await;
        assert_eq!(got.0, StatusCode::INTERNAL_SERVER_ERROR);
    }
    assert_eq!(runs.started(), 3);
    // The key is usable for another body? No: it was released, so it is free for any body.
    let ok = send(&app, req(Some(b"p-1"), "fine")).await;
    assert_eq!(ok.0, StatusCode::CREATED);
}

// ---------------------------------------------------------------------------------------------
// time: lease, renewal, TTL (paused clock, memory store)
// ---------------------------------------------------------------------------------------------

/// `with_ttl`: "How long responses are kept". Just before the TTL: replay; just after: runs.
#[tokio::test(start_paused = true)]
async fn ttl_edges_with_paused_time() {
    let runs = Runs::default();
    let app = app_with(
        mem_layer().with_ttl(Duration::from_secs(10)).unwrap(),
        &runs,
    );
    assert_eq!(send(&app, req(Some(b"t-1"), "x")).await.0, 201);
    tokio::time::advance(Duration::from_millis(9_990)).await;
    assert!(replayed(&send(&app, req(Some(b"t-1"), "x")).await.1));
    tokio::time::advance(Duration::from_millis(20)).await;
    let after = send(&app, req(Some(b"t-1"), "other body after ttl")).await;
    assert_eq!(after.0, 201, "after the TTL the key is free, for any body");
    assert_eq!(runs.started(), 2);
}

/// Lease renewal is real: a handler 40 times longer than the lease keeps its key; every retry
/// meanwhile is 409 with `Retry-After: 1`; the handler runs once.
#[tokio::test(start_paused = true)]
async fn lease_renewal_keeps_key_for_a_long_handler() {
    for lease_ms in [1u64, 2, 3, 50] {
        let runs = Runs::default();
        let app = app_with(
            mem_layer()
                .with_lease(Duration::from_millis(lease_ms))
                .unwrap(),
            &runs,
        );
        let long = 40 * lease_ms.max(3);
        let body = format!("sleep:{long}");
        let first = tokio::spawn({
            let app = app.clone();
            let body = body.clone();
            async move { send(&app, req(Some(b"l-1"), body)).await }
        });
        let mut t = 0;
        while t + lease_ms < long {
            tokio::time::sleep(Duration::from_millis(lease_ms)).await;
            t += lease_ms;
            let got = send(&app, req(Some(b"l-1"), body.clone())).await;
            assert_problem(&got, 409, problem::IN_FLIGHT);
            assert_eq!(got.1["retry-after"], "1");
        }
        assert_eq!(first.await.unwrap().0, 201);
        assert!(replayed(&send(&app, req(Some(b"l-1"), body)).await.1));
        assert_eq!(runs.started(), 1, "lease {lease_ms} ms");
    }
}

/// Settings: "`with_ttl` and `with_lease` return an error for a zero TTL or a lease under 1 ms,
/// and `MemoryStore::new(0)` for a store of no entries".
#[test]
fn invalid_settings_fail_at_build() {
    assert!(mem_layer().with_ttl(Duration::ZERO).is_err());
    assert!(mem_layer().with_ttl(Duration::from_nanos(1)).is_ok());
    assert!(mem_layer().with_lease(Duration::from_micros(999)).is_err());
    assert!(mem_layer().with_lease(Duration::from_millis(1)).is_ok());
    assert!(mem_layer().with_lease(Duration::MAX).is_ok());
    assert!(mem_layer().with_ttl(Duration::MAX).is_ok());
    assert!(MemoryStore::new(0).is_err());
    assert!(MemoryStore::default().with_max_bytes(0).is_err());
    let e = mem_layer().with_lease(Duration::ZERO).unwrap_err();
    assert!(e.to_string().contains("lease"), "{e}");
    let e = mem_layer().with_ttl(Duration::ZERO).unwrap_err();
    assert!(e.to_string().to_lowercase().contains("ttl"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// cancellation: the request's future dropped at seeded points
// ---------------------------------------------------------------------------------------------

/// Guide, per failure: the client gone while the store is locking (the handler does not run; a
/// retry runs normally) or mid-handler (the handler runs to its end once, the response is
/// stored; a retry gets 409 while it runs, then the replay). Seeded drop points over both.
#[tokio::test(start_paused = true)]
async fn dropped_at_seeded_points_runs_at_most_once_and_never_frees_early() {
    let mut rng = Seeded(71);
    for round in 0..40 {
        let runs = Runs::default();
        let mut store = Wrapped::new(MemoryStore::default());
        store.begin_delay = Duration::from_millis(20);
        let app = app_with(
            IdempotencyLayer::new(store, ByCredentials::default())
                .with_lease(Duration::from_millis(90))
                .unwrap(),
            &runs,
        );
        let key = format!("drop-{round}");
        let drop_at = rng.upto(140);
        let first = {
            let app = app.clone();
            let key = key.clone();
            tokio::spawn(async move { send(&app, req(Some(key.as_bytes()), "sleep:100")).await })
        };
        tokio::time::sleep(Duration::from_millis(drop_at)).await;
        first.abort();
        let _ = first.await;
        let started = runs.started();
        if started == 1 && runs.finished() == 0 {
            // Mid-handler: the key is never released early.
            let got = send(&app, req(Some(key.as_bytes()), "sleep:100")).await;
            assert_problem(&got, 409, problem::IN_FLIGHT);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let later = send(&app, req(Some(key.as_bytes()), "sleep:100")).await;
        assert_eq!(later.0, 201, "round {round}, dropped at {drop_at} ms");
        assert_eq!(
            replayed(&later.1),
            started == 1,
            "round {round}, dropped at {drop_at} ms: started {started}"
        );
        assert_eq!(runs.started(), 1, "round {round}, dropped at {drop_at} ms");
    }
}

// ---------------------------------------------------------------------------------------------
// store failures
// ---------------------------------------------------------------------------------------------

/// Guide: "store unreachable ... | 503, `Retry-After: 1`, `…/idempotency-store-unavailable`; the
/// handler does not run", and a later retry runs normally once the store answers again.
#[tokio::test(start_paused = true)]
async fn store_down_at_begin_is_503_and_later_runs() {
    let runs = Runs::default();
    let store = Wrapped::new(MemoryStore::default());
    let fail = store.fail_begin.clone();
    let app = app_with(
        IdempotencyLayer::new(store, ByCredentials::default()),
        &runs,
    );
    fail.store(true, Ordering::SeqCst);
    let got = send(&app, req(Some(b"down-1"), "x")).await;
    assert_problem(&got, 503, problem::STORE_UNAVAILABLE);
    assert_eq!(got.1["retry-after"], "1");
    assert_eq!(runs.started(), 0);
    fail.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let ok = send(&app, req(Some(b"down-1"), "x")).await;
    assert_eq!((ok.0, replayed(&ok.1)), (StatusCode::CREATED, false));
}

/// Guide: "store down when the response is stored | tried 3 times ..., then a small 500 marker
/// is tried once ...; if that fails too, the key stays locked until its lease ends | the
/// handler's response; a retry within the lease gets 409; after the lease, the handler runs
/// again".
#[tokio::test(start_paused = true)]
async fn store_down_at_complete_holds_key_for_lease() {
    let runs = Runs::default();
    let store = Wrapped::new(MemoryStore::default());
    let fail = store.fail_complete.clone();
    let app = app_with(
        IdempotencyLayer::new(store, ByCredentials::default())
            .with_lease(Duration::from_secs(2))
            .unwrap(),
        &runs,
    );
    fail.store(true, Ordering::SeqCst);
    let first = send(&app, req(Some(b"c-1"), "x")).await;
    assert_eq!(first.0, 201, "the client gets the handler's response");
    fail.store(false, Ordering::SeqCst);
    let within = send(&app, req(Some(b"c-1"), "x")).await;
    assert_problem(&within, 409, problem::IN_FLIGHT);
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let after = send(&app, req(Some(b"c-1"), "x")).await;
    assert_eq!((after.0, replayed(&after.1)), (StatusCode::CREATED, false));
    assert_eq!(runs.started(), 2);
}

/// A store whose `begin` never answers: under a `TimeoutLayer` outside, the request times out;
/// the handler never runs, and the key is usable once the store answers again.
#[tokio::test(start_paused = true)]
async fn store_hang_under_timeout_layer() {
    let runs = Runs::default();
    let store = Wrapped::new(MemoryStore::default());
    let hang = store.hang.clone();
    hang.store(true, Ordering::SeqCst);
    let app = app_with(
        IdempotencyLayer::new(store, ByCredentials::default()),
        &runs,
    )
    .layer(tower_http::timeout::TimeoutLayer::with_status_code(
        StatusCode::REQUEST_TIMEOUT,
        Duration::from_millis(200),
    ));
    let got = send(&app, req(Some(b"hang-1"), "x")).await;
    assert_eq!(got.0, StatusCode::REQUEST_TIMEOUT);
    assert_eq!(runs.started(), 0);
    hang.store(false, Ordering::SeqCst);
    let ok = send(&app, req(Some(b"hang-1"), "x")).await;
    assert_eq!(ok.0, StatusCode::CREATED);
}

/// The memory store: "a running request's lock is never evicted, and a store full of running
/// requests answers a new key with 503"; a completed response makes room.
#[tokio::test(start_paused = true)]
async fn memory_store_full_of_running_is_503_then_room() {
    let runs = Runs::default();
    let store = MemoryStore::new(2).unwrap();
    let app = app_with(
        IdempotencyLayer::new(store.clone(), ByCredentials::default()),
        &runs,
    );
    let a = tokio::spawn({
        let app = app.clone();
        async move { send(&app, req(Some(b"f-a"), "sleep:100")).await }
    });
    let b = tokio::spawn({
        let app = app.clone();
        async move { send(&app, req(Some(b"f-b"), "sleep:100")).await }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    let full = send(&app, req(Some(b"f-c"), "x")).await;
    assert_problem(&full, 503, problem::STORE_UNAVAILABLE);
    assert_eq!(full.1["retry-after"], "1");
    assert_eq!(runs.started(), 2);
    assert_eq!(a.await.unwrap().0, 201);
    assert_eq!(b.await.unwrap().0, 201);
    assert_eq!(send(&app, req(Some(b"f-c"), "x")).await.0, 201);
    assert_eq!(store.len(), 2);
    // f-a expired first (stored first): it was evicted, so it runs again; f-b... then f-c.
    let a2 = send(&app, req(Some(b"f-a"), "sleep:100")).await;
    assert_eq!((a2.0, replayed(&a2.1)), (StatusCode::CREATED, false));
}

// ---------------------------------------------------------------------------------------------
// composition
// ---------------------------------------------------------------------------------------------

/// `Idempotency` rustdoc, Backpressure: "A request refused at once for its key (missing, invalid,
/// ambiguous) gives back what the inner service reserved in `poll_ready` (a concurrency permit,
/// a `Buffer` slot) at once." With `ConcurrencyLimit(1)` inside: the refused call's future is
/// kept unpolled, and the service is ready again.
#[tokio::test(start_paused = true)]
async fn refused_at_once_gives_back_the_permit() {
    let runs = Runs::default();
    let r = runs.clone();
    let handler = tower::service_fn(move |req: Request<Body>| {
        let r = r.clone();
        async move {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            Ok::<_, Infallible>(behave(r, body).await)
        }
    });
    let inner = tower::limit::ConcurrencyLimit::new(handler, 1);
    let mut svc = mem_layer().with_require_key(true).layer(inner);
    let ambiguous = Request::post("/orders")
        .header("idempotency-key", "a")
        .header("idempotency-key", "b")
        .body(Body::empty())
        .unwrap();
    for r in [req(None, "x"), req(Some(b"a b"), "x"), ambiguous] {
        let kept = tokio::time::timeout(Duration::from_secs(1), svc.ready())
            .await
            .expect("ready: the permit was given back")
            .unwrap()
            .call(r);
        let mut other = svc.clone();
        tokio::time::timeout(Duration::from_secs(1), other.ready())
            .await
            .expect("a clone is ready while the refused future is kept")
            .unwrap();
        drop(other);
        let resp = kept.await.unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    }
    assert_eq!(runs.started(), 0);
}

/// The layer under tower's `Buffer` and a `ConcurrencyLimit(1)` outside it, driven by a kept
/// service with `ready().await?.call(req)` and clones: no hang; the same key at once is 409 or
/// the replay; one run.
#[tokio::test(start_paused = true)]
async fn under_buffer_and_concurrency_limit_one() {
    let runs = Runs::default();
    let app = app_with(mem_layer(), &runs);
    let svc = tower::ServiceBuilder::new()
        .buffer(4)
        .concurrency_limit(1)
        .service(app.into_service::<Body>());
    let mut kept = svc.clone();
    let mut futs = Vec::new();
    for i in 0..6 {
        let mut s = if i % 2 == 0 {
            kept.clone()
        } else {
            svc.clone()
        };
        let r = req(Some(b"buf-1"), "sleep:50");
        futs.push(tokio::spawn(async move {
            let resp = tokio::time::timeout(Duration::from_secs(5), async {
                s.ready().await.unwrap().call(r).await.unwrap()
            })
            .await
            .expect("no hang");
            (resp.status(), replayed(resp.headers()))
        }));
    }
    let mut got = Vec::new();
    for f in futs {
        got.push(f.await.unwrap());
    }
    assert_eq!(runs.started(), 1, "{got:?}");
    // With a limit of one, each waits for the one before: the first runs, the rest replay.
    assert_eq!(got[0], (StatusCode::CREATED, false));
    assert!(
        got[1..].iter().all(|g| *g == (StatusCode::CREATED, true)),
        "{got:?}"
    );
    let resp = tokio::time::timeout(Duration::from_secs(5), async {
        kept.ready()
            .await
            .unwrap()
            .call(req(Some(b"buf-2"), "x"))
            .await
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
}

/// axum's/tower-http's `TimeoutLayer` outside: the client gets 408 mid-handler; the handler
/// runs to its end; a retry gets 409 then the replay.
#[tokio::test(start_paused = true)]
async fn timeout_layer_outside_mid_handler() {
    let runs = Runs::default();
    let app =
        app_with(mem_layer(), &runs).layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_millis(100),
        ));
    let first = send(&app, req(Some(b"to-1"), "sleep:300")).await;
    assert_eq!(first.0, StatusCode::REQUEST_TIMEOUT);
    let during = send(&app, req(Some(b"to-1"), "sleep:300")).await;
    assert_problem(&during, 409, problem::IN_FLIGHT);
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(runs.finished(), 1);
    let replay = send(&app, req(Some(b"to-1"), "sleep:300")).await;
    assert_eq!((replay.0, replayed(&replay.1)), (StatusCode::CREATED, true));
    assert_eq!(runs.started(), 1);
}

// ---------------------------------------------------------------------------------------------
// scope
// ---------------------------------------------------------------------------------------------

/// Guide: "`.with_cookies(["session_id"])` reads only the named cookies"; `ByCredentials`
/// rustdoc: other cookies changing does not change the scope; another session does.
#[tokio::test(start_paused = true)]
async fn cookie_scope_by_name() {
    let runs = Runs::default();
    let layer = IdempotencyLayer::new(
        MemoryStore::default(),
        ByCredentials::default().with_cookies(["session_id"]),
    );
    let app = app_with(layer, &runs);
    let with_cookie = |cookie: &str| {
        Request::post("/orders")
            .header("idempotency-key", "ck-1")
            .header("cookie", cookie)
            .body(Body::from("c"))
            .unwrap()
    };
    assert_eq!(
        send(&app, with_cookie("session_id=abc; _ga=1")).await.0,
        201
    );
    for same in [
        "_ga=2; session_id=abc",
        "session_id=abc",
        "x=1;session_id=abc",
    ] {
        let got = send(&app, with_cookie(same)).await;
        assert!(replayed(&got.1), "{same}: the same session");
    }
    let keyed_cookie = |key: String, cookie: &str| {
        Request::post("/orders")
            .header("idempotency-key", key)
            .header("cookie", cookie)
            .body(Body::from("c"))
            .unwrap()
    };
    for (i, other) in [
        "session_id=abd",
        "session_id=abc2",
        "Session_ID=abc",
        "session_idx=abc",
        "xsession_id=abc",
        "",
    ]
    .into_iter()
    .enumerate()
    {
        let key = format!("ck-other-{i}");
        let first = send(&app, keyed_cookie(key.clone(), "session_id=abc")).await;
        assert_eq!(first.0, 201);
        let got = send(&app, keyed_cookie(key, other)).await;
        assert!(
            !replayed(&got.1),
            "{other}: another scope got the stored response"
        );
    }
}

/// Guide: "two requests share a key space only when all of them are equal"; another client's
/// same key runs on its own.
#[tokio::test(start_paused = true)]
async fn credentials_scope_each_header() {
    let runs = Runs::default();
    let app = app_with(mem_layer(), &runs);
    let with = |name: &str, value: &str| {
        Request::post("/orders")
            .header("idempotency-key", "sc-1")
            .header(name, value)
            .body(Body::from("s"))
            .unwrap()
    };
    let headers = [
        "authorization",
        "proxy-authorization",
        "x-api-key",
        "api-key",
        "x-auth-token",
        "x-access-token",
        "cookie",
    ];
    for h in headers {
        let got = send(&app, with(h, "v1")).await;
        assert!(!replayed(&got.1), "{h}: v1 is its own scope");
    }
    assert_eq!(runs.started(), headers.len());
    for h in headers {
        let got = send(&app, with(h, "v1")).await;
        assert!(replayed(&got.1), "{h}: v1 again");
    }
    let anon = send(&app, req(None, "s")).await;
    assert_eq!(anon.0, 201);
}

// ---------------------------------------------------------------------------------------------
// settings: header, methods, require_key, memory store bounds
// ---------------------------------------------------------------------------------------------

/// `with_header`: "The key header"; `with_methods`: "other requests pass through untouched";
/// `with_require_key`: "Whether a request with one of the methods and no key gets 400".
#[tokio::test(start_paused = true)]
async fn custom_header_and_methods() {
    let runs = Runs::default();
    let r = runs.clone();
    let layer = mem_layer()
        .with_header(http::HeaderName::from_static("x-op-id"))
        .with_methods([Method::PUT])
        .with_require_key(true);
    let app = Router::new()
        .route(
            "/orders",
            axum::routing::put({
                let r = r.clone();
                move |b: Bytes| behave(r.clone(), b)
            })
            .post({
                let r = r.clone();
                move |b: Bytes| behave(r.clone(), b)
            })
            .get(|| async { "listed" }),
        )
        .layer(layer);
    let mk = |method: Method, header: Option<(&str, &str)>| {
        let mut b = Request::builder()
            .method(method)
            .uri("/orders")
            .header("authorization", AUTH);
        if let Some((n, v)) = header {
            b = b.header(n, v);
        }
        b.body(Body::from("m")).unwrap()
    };
    assert_eq!(
        send(&app, mk(Method::PUT, Some(("x-op-id", "op-1"))))
            .await
            .0,
        201
    );
    assert!(replayed(
        &send(&app, mk(Method::PUT, Some(("x-op-id", "op-1"))))
            .await
            .1
    ));
    // The default header names no key here: a PUT with only it has no key (400).
    let only_default = send(&app, mk(Method::PUT, Some(("idempotency-key", "op-1")))).await;
    assert_problem(&only_default, 400, problem::MISSING_KEY);
    // POST is not among the methods: it passes through, with or without a key, every time.
    for _ in 0..2 {
        let p = send(&app, mk(Method::POST, Some(("x-op-id", "op-2")))).await;
        assert_eq!((p.0, replayed(&p.1)), (StatusCode::CREATED, false));
        assert_eq!(send(&app, mk(Method::POST, None)).await.0, 201);
    }
    // GET without a key on a route that requires one for PUT: untouched.
    assert_eq!(send(&app, mk(Method::GET, None)).await.0, 200);
    assert_eq!(runs.started(), 5);
}

/// Guide: "response the store cannot keep (over a `MemoryStore`'s byte bound) | the handler
/// ran; a 500 marker is stored in its place | the response to the first client; 500 ... on every
/// retry; the handler is not run again". And the bound holds: `heap_bytes()` never passes it.
#[tokio::test(start_paused = true)]
async fn memory_store_byte_bound() {
    let runs = Runs::default();
    let bound = 4_000;
    let store = MemoryStore::default().with_max_bytes(bound).unwrap();
    let app = app_with(
        IdempotencyLayer::new(store.clone(), ByCredentials::default()),
        &runs,
    );
    let first = send(&app, req(Some(b"mb-huge"), "big:5000")).await;
    assert_eq!((first.0, first.2.len()), (StatusCode::CREATED, 5000));
    let again = send(&app, req(Some(b"mb-huge"), "big:5000")).await;
    assert_problem(&again, 500, problem::RESPONSE_TOO_LARGE);
    assert_eq!(runs.started(), 1);
    for i in 0..12 {
        let key = format!("mb-{i}");
        let got = send(&app, req(Some(key.as_bytes()), "big:900")).await;
        assert_eq!(got.0, 201);
        assert!(
            store.heap_bytes() <= bound,
            "after {i}: {} > {bound}",
            store.heap_bytes()
        );
        tokio::time::advance(Duration::from_millis(1)).await;
    }
    // The newest one is kept and replayed; the oldest made room.
    assert!(replayed(
        &send(&app, req(Some(b"mb-11"), "big:900")).await.1
    ));
    let oldest = send(&app, req(Some(b"mb-0"), "big:900")).await;
    assert!(!replayed(&oldest.1), "mb-0 was evicted, so it ran again");
}

/// `MemoryStore`: "an expired entry is purged as time passes, is not counted by `len()`".
#[tokio::test(start_paused = true)]
async fn memory_store_len_drops_expired_without_traffic() {
    let runs = Runs::default();
    let store = MemoryStore::default();
    let app = app_with(
        IdempotencyLayer::new(store.clone(), ByCredentials::default())
            .with_ttl(Duration::from_secs(5))
            .unwrap(),
        &runs,
    );
    for i in 0..3 {
        let key = format!("len-{i}");
        assert_eq!(send(&app, req(Some(key.as_bytes()), "x")).await.0, 201);
    }
    assert_eq!(store.len(), 3);
    tokio::time::advance(Duration::from_secs(6)).await;
    assert_eq!(store.len(), 0);
    assert!(store.is_empty());
}

// ---------------------------------------------------------------------------------------------
// secrets: logs and Debug
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Guide: "The scope goes into the store only as a SHA-256 hash, never as the credential";
/// `ByCredentials`: "Only a SHA-256 hash of the credentials is kept, never the credentials".
/// Neither the logs (at TRACE, over every path: run, replay, 409, 422, 400, 503, a panic, a
/// failed store) nor the `Debug` of the layer, the service or the store show a credential.
#[test]
fn no_credential_in_logs_or_debug() {
    let logs = Logs::default();
    let sink = logs.clone();
    let sub = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || sink.clone())
        .finish();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    let debug = tracing::subscriber::with_default(sub, || {
        rt.block_on(async {
            let runs = Runs::default();
            let store = Wrapped::new(MemoryStore::default());
            let fail_begin = store.fail_begin.clone();
            let fail_complete = store.fail_complete.clone();
            let layer = IdempotencyLayer::new(store.clone(), ByCredentials::default());
            let debug = format!("{layer:?} {store:?}");
            let app = app_with(layer, &runs).layer(tower_http::catch_panic::CatchPanicLayer::new());
            let with_cookie = |key: &str, body: &str| {
                Request::post("/orders")
                    .header("authorization", AUTH)
                    .header("cookie", "sid=s71-cookie-secret")
                    .header("x-api-key", "s71-api-key-secret")
                    .header("idempotency-key", key)
                    .body(Body::from(body.to_owned()))
                    .unwrap()
            };
            let slow = tokio::spawn({
                let app = app.clone();
                async move { send(&app, with_cookie("lg-1", "sleep:100")).await }
            });
            tokio::time::sleep(Duration::from_millis(5)).await;
            assert_eq!(send(&app, with_cookie("lg-1", "sleep:100")).await.0, 409);
            assert_eq!(slow.await.unwrap().0, 201);
            assert_eq!(send(&app, with_cookie("lg-1", "sleep:100")).await.0, 201);
            assert_eq!(send(&app, with_cookie("lg-1", "other")).await.0, 422);
            assert_eq!(send(&app, with_cookie("a b", "x")).await.0, 400);
            assert_eq!(send(&app, with_cookie("lg-p", "panic")).await.0, 500);
            fail_begin.store(true, Ordering::SeqCst);
            assert_eq!(send(&app, with_cookie("lg-2", "x")).await.0, 503);
            fail_begin.store(false, Ordering::SeqCst);
            fail_complete.store(true, Ordering::SeqCst);
            assert_eq!(send(&app, with_cookie("lg-3", "x")).await.0, 201);
            tokio::time::sleep(Duration::from_secs(1)).await;
            debug
        })
    });
    let text = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    for secret in [
        "s71-secret-credential",
        "s71-cookie-secret",
        "s71-api-key-secret",
    ] {
        assert!(!text.contains(secret), "{secret} in the logs:\n{text}");
        assert!(!debug.contains(secret), "{secret} in Debug: {debug}");
    }
}

// ---------------------------------------------------------------------------------------------
// over the wire (real time, 127.0.0.1:0)
// ---------------------------------------------------------------------------------------------

/// Guide: "duplicate concurrent request ... exactly one execution start; the others get 409
/// `…/idempotency-key-in-flight` with `Retry-After: 1`". 32 connections at once, one key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wire_32_at_once_one_run() {
    let runs = Runs::default();
    let addr = serve(app_with(mem_layer(), &runs)).await;
    let mut tasks = Vec::new();
    for _ in 0..32 {
        tasks.push(tokio::spawn(async move {
            wire_send(addr, "w32", "sleep:300").await
        }));
    }
    let mut fresh = 0;
    for t in tasks {
        let (st, h, body) = t.await.unwrap();
        match st.as_u16() {
            201 if !replayed(&h) => fresh += 1,
            201 => {}
            409 => {
                assert_eq!(h["retry-after"], "1");
                assert_eq!(problem_type(&body), problem::IN_FLIGHT);
            }
            other => panic!("unexpected {other}: {:?}", String::from_utf8_lossy(&body)),
        }
    }
    assert_eq!((fresh, runs.started()), (1, 1));
}

/// Guide, "client timeout mid-handler": the handler runs to its end in its own task; a retry
/// gets 409 while it runs, then the stored response; the handler ran once. A client that
/// times out at seeded points (before, during, after the handler), then retries until it gets
/// an answer that is not 409.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wire_client_timeouts_at_seeded_points() {
    let runs = Runs::default();
    let addr = serve(app_with(mem_layer(), &runs)).await;
    let mut rng = Seeded(7171);
    for round in 0..8u64 {
        let key = format!("wt-{round}");
        let cut = rng.upto(180);
        let before = runs.started();
        let _ = tokio::time::timeout(
            Duration::from_millis(cut),
            client().request(wire_req(addr, &key, "sleep:120")),
        )
        .await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        let (st, h, _) = loop {
            let got = wire_send(addr, &key, "sleep:120").await;
            if got.0 != StatusCode::CONFLICT {
                break got;
            }
            assert_eq!(got.1["retry-after"], "1");
            assert!(
                tokio::time::Instant::now() < deadline,
                "round {round}: 409 for 3 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(st, StatusCode::CREATED, "round {round}, cut at {cut} ms");
        // Let a handler the cut request may still start (it was on its way) show up.
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(
            runs.started() - before,
            1,
            "round {round}, cut at {cut} ms, replayed {}",
            replayed(&h)
        );
    }
}

/// Over the wire a replay has one `Date` (the server's, not a stored one), a correct
/// `Content-Length`, and the stored headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wire_replay_headers() {
    let runs = Runs::default();
    let addr = serve(app_with(mem_layer(), &runs)).await;
    let first = wire_send(addr, "wr-1", "hello").await;
    assert_eq!(first.0, 201);
    let again = wire_send(addr, "wr-1", "hello").await;
    assert!(replayed(&again.1));
    assert_eq!(again.2, first.2);
    assert_eq!(again.1.get_all("date").iter().count(), 1);
    assert_eq!(
        again.1["content-length"].to_str().unwrap(),
        again.2.len().to_string()
    );
    assert_eq!(again.1.get_all("set-cookie").iter().count(), 2);
    assert_eq!(runs.started(), 1);
}

// ---------------------------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------------------------

/// Sends one RESP command to Redis and returns the raw reply bytes (read until quiet).
async fn resp_command(url: &str, args: &[&[u8]]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let hostport = url
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_owned();
    let mut s = tokio::net::TcpStream::connect(hostport).await.unwrap();
    let mut cmd = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        cmd.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        cmd.extend_from_slice(a);
        cmd.extend_from_slice(b"\r\n");
    }
    s.write_all(&cmd).await.unwrap();
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65536];
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    out
}

/// Redis store: replay byte for byte (non-UTF-8 header value, every byte value in the body),
/// 422 on another body, another client's same key runs on its own, and neither the credential
/// nor the key's scope is written into Redis in clear (guide: "The Redis key is the prefix, a
/// hash of the client's scope and the idempotency key; no credential is stored").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_replay_bytes_scope_and_no_credential_stored() {
    let Some(url) = redis_url() else { return };
    let prefix = unique("bytes");
    let store = sturdy::redis::RedisIdempotencyStore::connect(&url)
        .await
        .unwrap()
        .with_prefix(prefix.clone());
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let all_bytes: Vec<u8> = (0..=255u8).collect();
    let body_out = all_bytes.clone();
    let app = Router::new()
        .route(
            "/orders",
            post(move || {
                let c = c.clone();
                let body_out = body_out.clone();
                async move {
                    c.fetch_add(1, Ordering::SeqCst);
                    Response::builder()
                        .status(202)
                        .header(
                            "x-bin",
                            HeaderValue::from_bytes(&[b'a', 0x80, 0xfe, b'"']).unwrap(),
                        )
                        .header("set-cookie", "x=1")
                        .header("set-cookie", "y=2")
                        .body(Body::from(body_out))
                        .unwrap()
                }
            }),
        )
        .layer(IdempotencyLayer::new(store, ByCredentials::default()));
    let first = send(&app, req(Some(b"rk-1"), "payload")).await;
    assert_eq!((first.0.as_u16(), &first.2[..]), (202, &all_bytes[..]));
    let again = send(&app, req(Some(b"rk-1"), "payload")).await;
    assert!(replayed(&again.1));
    assert_eq!(again.0.as_u16(), 202);
    assert_eq!(&again.2[..], &all_bytes[..]);
    assert_eq!(again.1["x-bin"].as_bytes(), &[b'a', 0x80, 0xfe, b'"']);
    let cookies: Vec<_> = again.1.get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["x=1", "y=2"]);
    assert_problem(
        &send(&app, req(Some(b"rk-1"), "other")).await,
        422,
        problem::KEY_REUSED,
    );
    let other_client = Request::post("/orders")
        .header("authorization", "Bearer someone-else")
        .header("idempotency-key", "rk-1")
        .body(Body::from("payload"))
        .unwrap();
    let o = send(&app, other_client).await;
    assert_eq!((o.0.as_u16(), replayed(&o.1)), (202, false));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let pattern = format!("{prefix}*");
    let keys = resp_command(&url, &[b"KEYS", pattern.as_bytes()]).await;
    let text = String::from_utf8_lossy(&keys).into_owned();
    assert!(text.contains(&prefix), "keys: {text}");
    assert!(
        !text.contains("s71-secret"),
        "credential in a Redis key: {text}"
    );
    assert!(
        !text.contains("someone-else"),
        "credential in a Redis key: {text}"
    );
    for line in text.lines().filter(|l| l.starts_with(&prefix)) {
        let value = resp_command(&url, &[b"GET", line.as_bytes()]).await;
        let v = String::from_utf8_lossy(&value);
        assert!(
            !v.contains("s71-secret") && !v.contains("someone-else"),
            "{v}"
        );
        resp_command(&url, &[b"DEL", line.as_bytes()]).await;
    }
}

/// A TCP proxy to Redis that can be frozen (holds every byte while frozen, in both directions).
async fn freezable_proxy(upstream: String) -> (String, Arc<AtomicBool>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let frozen = Arc::new(AtomicBool::new(false));
    let f = frozen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((down, _)) = listener.accept().await else {
                return;
            };
            let Ok(up) = tokio::net::TcpStream::connect(upstream.clone()).await else {
                return;
            };
            let (dr, dw) = down.into_split();
            let (ur, uw) = up.into_split();
            for (r, w, f) in [
                (
                    Box::new(dr) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                    Box::new(uw) as Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
                    f.clone(),
                ),
                (Box::new(ur), Box::new(dw), f.clone()),
            ] {
                tokio::spawn(async move {
                    let (mut r, mut w) = (r, w);
                    let mut buf = vec![0u8; 16384];
                    loop {
                        let n = match r.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        while f.load(Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        if w.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        }
    });
    (format!("redis://{addr}/"), frozen)
}

/// RELIABILITY: "Redis hung (accepts, never answers) | ... 503 after the timeout; a lock the
/// timed-out `begin` may have taken is released in the background, tried again until Redis
/// answers (up to the lease), so a retry runs once Redis is back". Here the hung `begin` does
/// reach Redis when it thaws (it locks the key late): the background release must free it well
/// before the lease (10 s) would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_hung_is_503_then_runs_once_back() {
    let Some(url) = redis_url() else { return };
    let upstream = url
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_owned();
    let (proxy_url, frozen) = freezable_proxy(upstream).await;
    let store = sturdy::redis::RedisIdempotencyStore::connect(&proxy_url)
        .await
        .unwrap()
        .with_prefix(unique("hung"))
        .with_timeout(Duration::from_millis(200));
    let runs = Runs::default();
    let app = app_with(
        IdempotencyLayer::new(store, ByCredentials::default())
            .with_lease(Duration::from_secs(10))
            .unwrap(),
        &runs,
    );
    // Warm: one request through the proxy.
    assert_eq!(send_real(&app, req(Some(b"warm"), "x")).await.0, 201);
    frozen.store(true, Ordering::SeqCst);
    let t0 = tokio::time::Instant::now();
    let got = send_real(&app, req(Some(b"hung-1"), "x")).await;
    let took = t0.elapsed();
    assert_problem(&got, 503, problem::STORE_UNAVAILABLE);
    assert_eq!(got.1["retry-after"], "1");
    assert!(took < Duration::from_millis(1500), "503 after {took:?}");
    assert_eq!(runs.started(), 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    frozen.store(false, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
    let ok = loop {
        let got = send_real(&app, req(Some(b"hung-1"), "x")).await;
        if got.0 == StatusCode::CREATED {
            break got;
        }
        assert!(
            got.0 == StatusCode::CONFLICT || got.0 == StatusCode::SERVICE_UNAVAILABLE,
            "{}",
            got.0
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "still {} 4 s after Redis came back",
            got.0
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!replayed(&ok.1));
    assert_eq!(runs.started(), 2);
}

/// `send` in real time, each wait bounded by 10 s.
async fn send_real(app: &Router, r: Request<Body>) -> (StatusCode, HeaderMap, Bytes) {
    tokio::time::timeout(Duration::from_secs(10), send(app, r))
        .await
        .expect("answered within 10 s")
}

/// `RedisConnection::connect`: "The message never repeats the URL, which may hold a password."
/// A password Redis does not know, and the store's `Debug`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_password_never_in_error_or_debug() {
    let Some(url) = redis_url() else { return };
    let hostport = url.trim_start_matches("redis://").trim_end_matches('/');
    let bad = format!("redis://s71user:s71-redis-password@{hostport}/");
    match sturdy::redis::RedisIdempotencyStore::connect(&bad).await {
        Ok(store) => {
            let d = format!("{store:?}");
            assert!(!d.contains("s71-redis-password"), "{d}");
        }
        Err(e) => {
            let text = format!("{e} {e:?}");
            assert!(!text.contains("s71-redis-password"), "{text}");
        }
    }
    let store = sturdy::redis::RedisIdempotencyStore::connect(&url)
        .await
        .unwrap()
        .with_prefix(unique("debug"));
    let d = format!("{store:?}");
    assert!(!d.is_empty());
}

// ---------------------------------------------------------------------------------------------
// batch 3: store failures in detail, hostile stored values, pass-through
// ---------------------------------------------------------------------------------------------

/// A memory store whose `renew` and `complete` fail on command.
#[derive(Debug, Clone)]
struct Flaky {
    inner: MemoryStore,
    renew_fails: Arc<AtomicBool>,
    /// How many of the next `complete`s fail.
    complete_fails: Arc<AtomicUsize>,
    completes: Arc<AtomicUsize>,
}

impl Flaky {
    fn new() -> Self {
        Self {
            inner: MemoryStore::default(),
            renew_fails: Arc::default(),
            complete_fails: Arc::default(),
            completes: Arc::default(),
        }
    }
}

impl IdempotencyStore for Flaky {
    fn begin(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        token: LockToken,
        lease: Duration,
    ) -> BoxFuture<Result<Begin, BoxError>> {
        self.inner.begin(key, fingerprint, token, lease)
    }
    fn renew(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        token: LockToken,
        lease: Duration,
    ) -> BoxFuture<Result<bool, BoxError>> {
        if self.renew_fails.load(Ordering::SeqCst) {
            return Box::pin(async { Err("s71 renew fails".into()) });
        }
        self.inner.renew(key, fingerprint, token, lease)
    }
    fn complete(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        token: LockToken,
        response: StoredResponse,
        ttl: Duration,
    ) -> BoxFuture<Result<(), BoxError>> {
        self.completes.fetch_add(1, Ordering::SeqCst);
        let left = self.complete_fails.load(Ordering::SeqCst);
        if left > 0 {
            self.complete_fails.store(left - 1, Ordering::SeqCst);
            return Box::pin(async { Err("s71 complete fails".into()) });
        }
        self.inner.complete(key, fingerprint, token, response, ttl)
    }
    fn release(&self, key: &str, token: LockToken) -> BoxFuture<Result<(), BoxError>> {
        self.inner.release(key, token)
    }
}

/// Guide: "store down while the handler runs | renewal fails ...; the handler keeps running; if
/// a retry took the key over meanwhile, this run's response is not stored and its end does not
/// free the retry's lock (locks are held by a token per execution) | ... a retry may take the key
/// over and run the handler again".
#[tokio::test(start_paused = true)]
async fn renewal_down_past_lease_takeover_is_fenced() {
    let runs = Runs::default();
    let store = Flaky::new();
    store.renew_fails.store(true, Ordering::SeqCst);
    let app = app_with(
        IdempotencyLayer::new(store.clone(), ByCredentials::default())
            .with_lease(Duration::from_millis(300))
            .unwrap(),
        &runs,
    );
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, req(Some(b"rn-1"), "sleep:1000")).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(send(&app, req(Some(b"rn-1"), "sleep:1000")).await.0, 409);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Past the lease: a retry takes the key over.
    let second = tokio::spawn({
        let app = app.clone();
        async move { send(&app, req(Some(b"rn-1"), "sleep:1000")).await }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(runs.started(), 2, "the retry took the key over");
    store.renew_fails.store(false, Ordering::SeqCst);
    let a = first.await.unwrap();
    assert_eq!(a.0, 201);
    assert!(String::from_utf8_lossy(&a.2).starts_with("run 1"));
    // The first run ended; the second still runs: its lock is intact.
    let during = send(&app, req(Some(b"rn-1"), "sleep:1000")).await;
    assert_problem(&during, 409, problem::IN_FLIGHT);
    let b = second.await.unwrap();
    assert!(String::from_utf8_lossy(&b.2).starts_with("run 2"));
    let replay = send(&app, req(Some(b"rn-1"), "sleep:1000")).await;
    assert!(replayed(&replay.1));
    assert_eq!(replay.2, b.2, "the stored response is the second run's");
    assert_eq!(runs.started(), 2);
}

/// Guide: "store down when the response is stored | tried 3 times (50 ms, then 100 ms apart),
/// then a small 500 marker is tried once in its place ...; if that fails too, the key stays
/// locked until its lease ends". Two failures: the response is kept; three: the marker;
/// four: locked for the lease, then the handler runs again.
#[tokio::test(start_paused = true)]
async fn complete_retries_then_marker_then_lock() {
    for fails in [1usize, 2, 3, 4] {
        let runs = Runs::default();
        let store = Flaky::new();
        store.complete_fails.store(fails, Ordering::SeqCst);
        let app = app_with(
            IdempotencyLayer::new(store.clone(), ByCredentials::default())
                .with_lease(Duration::from_secs(5))
                .unwrap(),
            &runs,
        );
        let t0 = tokio::time::Instant::now();
        let first = send(&app, req(Some(b"cm-1"), "hello")).await;
        let took = t0.elapsed();
        assert_eq!(first.0, 201, "fails {fails}");
        assert_eq!(
            store.completes.load(Ordering::SeqCst),
            (fails + 1).min(4),
            "fails {fails}: complete calls"
        );
        let expected_wait = [0u64, 50, 150, 150, 150][fails];
        assert!(
            took >= Duration::from_millis(expected_wait) && took < Duration::from_millis(400),
            "fails {fails}: the answer came after {took:?}"
        );
        let again = send(&app, req(Some(b"cm-1"), "hello")).await;
        match fails {
            1 | 2 => {
                assert!(replayed(&again.1), "fails {fails}");
                assert_eq!(again.2, first.2);
            }
            3 => assert_problem(&again, 500, problem::RESPONSE_TOO_LARGE),
            _ => {
                assert_problem(&again, 409, problem::IN_FLIGHT);
                tokio::time::sleep(Duration::from_secs(5)).await;
                let after = send(&app, req(Some(b"cm-1"), "hello")).await;
                assert_eq!((after.0, replayed(&after.1)), (StatusCode::CREATED, false));
            }
        }
        assert_eq!(runs.started(), if fails == 4 { 2 } else { 1 });
    }
}

/// A store that answers `begin` with a hostile stored response (a corrupt entry, a store of
/// another version): the layer must answer something, never panic.
#[derive(Debug, Clone)]
struct Hostile(StoredResponse);

impl IdempotencyStore for Hostile {
    fn begin(
        &self,
        _key: &str,
        _fingerprint: Fingerprint,
        _token: LockToken,
        _lease: Duration,
    ) -> BoxFuture<Result<Begin, BoxError>> {
        let r = self.0.clone();
        Box::pin(async move { Ok(Begin::Completed(r)) })
    }
    fn renew(
        &self,
        _key: &str,
        _fingerprint: Fingerprint,
        _token: LockToken,
        _lease: Duration,
    ) -> BoxFuture<Result<bool, BoxError>> {
        Box::pin(async { Ok(false) })
    }
    fn complete(
        &self,
        _key: &str,
        _fingerprint: Fingerprint,
        _token: LockToken,
        _response: StoredResponse,
        _ttl: Duration,
    ) -> BoxFuture<Result<(), BoxError>> {
        Box::pin(async { Ok(()) })
    }
    fn release(&self, _key: &str, _token: LockToken) -> BoxFuture<Result<(), BoxError>> {
        Box::pin(async { Ok(()) })
    }
}

#[tokio::test(start_paused = true)]
async fn hostile_stored_responses_never_panic() {
    let cases = vec![
        StoredResponse {
            status: 0,
            headers: vec![],
            body: Bytes::new(),
        },
        StoredResponse {
            status: 99,
            headers: vec![],
            body: Bytes::new(),
        },
        StoredResponse {
            status: 1000,
            headers: vec![],
            body: Bytes::new(),
        },
        StoredResponse {
            status: u16::MAX,
            headers: vec![],
            body: Bytes::new(),
        },
        StoredResponse {
            status: 200,
            headers: vec![("bad name".into(), b"v".to_vec())],
            body: Bytes::new(),
        },
        StoredResponse {
            status: 200,
            headers: vec![(String::new(), b"v".to_vec())],
            body: Bytes::new(),
        },
        StoredResponse {
            status: 200,
            headers: vec![("x-ok".into(), b"a\r\nInjected: 1".to_vec())],
            body: Bytes::new(),
        },
        StoredResponse {
            status: 200,
            headers: vec![("x-ok".into(), vec![0u8; 3])],
            body: Bytes::new(),
        },
    ];
    for case in cases {
        let app = Router::new()
            .route("/orders", post(|| async { "never" }))
            .layer(IdempotencyLayer::new(
                Hostile(case.clone()),
                ByCredentials::default(),
            ));
        let got = tokio::spawn({
            let app = app.clone();
            async move { send(&app, req(Some(b"hs"), "x")).await }
        })
        .await;
        let got = got.unwrap_or_else(|e| panic!("{case:?}: the layer panicked: {e}"));
        assert!(
            !got.1.contains_key("injected"),
            "{case:?}: a header was injected"
        );
        if let Some(len) = got.1.get("content-length") {
            assert_eq!(
                len.to_str().unwrap(),
                got.2.len().to_string(),
                "{case:?}: a stored Content-Length is not the body's"
            );
        }
    }
}

/// `StoredResponse::from_json`: "Reads what `to_json` wrote"; any other input is `None`, never a
/// panic. Seeded responses round-trip.
#[test]
fn stored_response_json_round_trip_and_hostile_input() {
    let mut rng = Seeded(0x5eed);
    for _ in 0..200 {
        let n_headers = rng.upto(4) as usize;
        let headers = (0..n_headers)
            .map(|i| {
                let len = rng.upto(40) as usize;
                (
                    format!("x-h{i}"),
                    (0..len).map(|_| rng.upto(255) as u8).collect(),
                )
            })
            .collect();
        let body_len = rng.upto(300) as usize;
        let r = StoredResponse {
            status: 100 + rng.upto(499) as u16,
            headers,
            body: (0..body_len).map(|_| rng.upto(255) as u8).collect(),
        };
        assert_eq!(StoredResponse::from_json(&r.to_json()), Some(r));
    }
    let deep = "[".repeat(100_000);
    for bad in [
        &b""[..],
        b"null",
        b"{}",
        b"[]",
        b"\xff\xfe",
        deep.as_bytes(),
        br#"{"status":70000,"headers":[],"body":""}"#,
        br#"{"status":-1,"headers":[],"body":""}"#,
        br#"{"status":200,"headers":[["x","\u0100"]],"body":""}"#,
        br#"{"status":200,"headers":[],"body":"\u20ac"}"#,
        br#"{"status":1e400,"headers":[],"body":""}"#,
    ] {
        let got = std::panic::catch_unwind(|| StoredResponse::from_json(bad));
        let got = got
            .unwrap_or_else(|_| panic!("from_json panicked on {:?}", String::from_utf8_lossy(bad)));
        if let Some(r) = got {
            assert!(
                r.body.iter().all(|_| true) && r.status <= 999,
                "{:?} read as {r:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}

/// Guide: "same key, another method, path, query or body | 422": also while the first request
/// with the key still runs (the store contract: "An entry with another fingerprint is a
/// `Begin::Mismatch`, whatever its token").
#[tokio::test(start_paused = true)]
async fn other_body_while_first_runs_is_422() {
    let runs = Runs::default();
    let app = app_with(mem_layer(), &runs);
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, req(Some(b"mm-1"), "sleep:200")).await }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_problem(
        &send(&app, req(Some(b"mm-1"), "sleep:201")).await,
        422,
        problem::KEY_REUSED,
    );
    assert_eq!(first.await.unwrap().0, 201);
    assert_eq!(runs.started(), 1);
}

/// Guide: "Requests with a method other than POST and PATCH ..., and requests without a key when
/// none is required, pass through untouched": no 400 for a GET's invalid key, no 413 for an
/// unkeyed POST past the body limit.
#[tokio::test(start_paused = true)]
async fn pass_through_is_untouched() {
    let runs = Runs::default();
    let r = runs.clone();
    let app = Router::new()
        .route(
            "/orders",
            post(move |b: Bytes| behave(r.clone(), b)).get(|| async { "listed" }),
        )
        .layer(mem_layer().with_body_limit(8));
    for key in [&b"a b"[..], b"\xff\xfe", b""] {
        let get = Request::get("/orders")
            .header("idempotency-key", HeaderValue::from_bytes(key).unwrap())
            .body(Body::empty())
            .unwrap();
        assert_eq!(send(&app, get).await.0, 200);
    }
    let big = send(&app, req(None, "0123456789abcdef")).await;
    assert_eq!(big.0, 201, "an unkeyed POST is not the layer's");
    assert!(String::from_utf8_lossy(&big.2).ends_with("0123456789abcdef"));
}

/// The fingerprint is over the body's bytes, whatever their chunking; a body that fails while it
/// is read gets 400 `…/request-body-unreadable` and locks nothing.
#[tokio::test(start_paused = true)]
async fn body_chunking_and_failing_body() {
    let runs = Runs::default();
    let app = app_with(mem_layer(), &runs);
    let chunked = |parts: &[&'static str]| {
        let frames: Vec<Result<Frame<Bytes>, Infallible>> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes()))))
            .collect();
        Request::post("/orders")
            .header("authorization", AUTH)
            .header("idempotency-key", "ch-1")
            .body(Body::new(http_body_util::StreamBody::new(
                futures_util::stream::iter(frames),
            )))
            .unwrap()
    };
    assert_eq!(send(&app, chunked(&["ab", "c"])).await.0, 201);
    assert!(replayed(&send(&app, chunked(&["a", "bc"])).await.1));
    assert!(replayed(&send(&app, chunked(&["", "abc", ""])).await.1));
    let failing = futures_util::stream::iter(vec![
        Ok(Frame::data(Bytes::from_static(b"ab"))),
        Err(std::io::Error::other("s71 body broke")),
    ]);
    let bad = Request::post("/orders")
        .header("authorization", AUTH)
        .header("idempotency-key", "ch-2")
        .body(Body::new(http_body_util::StreamBody::new(failing)))
        .unwrap();
    assert_problem(&send(&app, bad).await, 400, problem::UNREADABLE_BODY);
    let ok = send(&app, req(Some(b"ch-2"), "fresh")).await;
    assert_eq!((ok.0, replayed(&ok.1)), (StatusCode::CREATED, false));
    assert_eq!(runs.started(), 2);
}

/// Guide: the stored response keeps its headers "except connection-level ones such as `Date`
/// and `Content-Length`". A handler's `Transfer-Encoding`, `Connection` and `Keep-Alive` (which
/// describe one transfer) are not replayed.
#[tokio::test(start_paused = true)]
async fn connection_level_headers_not_replayed() {
    let app = Router::new()
        .route(
            "/orders",
            post(|| async {
                Response::builder()
                    .status(201)
                    .header("transfer-encoding", "chunked")
                    .header("connection", "keep-alive")
                    .header("keep-alive", "timeout=5")
                    .header("date", "Thu, 01 Jan 1970 00:00:00 GMT")
                    .header("x-kept", "yes")
                    .body(Body::from("abc"))
                    .unwrap()
            }),
        )
        .layer(mem_layer());
    let _ = send(&app, req(Some(b"hop-1"), "x")).await;
    let again = send(&app, req(Some(b"hop-1"), "x")).await;
    assert!(replayed(&again.1));
    assert_eq!(again.1["x-kept"], "yes");
    for h in ["transfer-encoding", "connection", "keep-alive", "date"] {
        assert!(!again.1.contains_key(h), "{h} replayed: {:?}", again.1);
    }
}

/// `ByCredentials`: "a request with none of them is in the shared `anonymous` scope"; a request
/// whose credential is the word `anonymous` is not anonymous.
#[tokio::test(start_paused = true)]
async fn credential_spelled_anonymous_is_not_the_anonymous_scope() {
    let runs = Runs::default();
    let app = app_with(mem_layer(), &runs);
    let anon = Request::post("/orders")
        .header("idempotency-key", "an-1")
        .body(Body::from("a"))
        .unwrap();
    assert_eq!(send(&app, anon).await.0, 201);
    for (h, v) in [
        ("authorization", "anonymous"),
        ("cookie", "anonymous"),
        ("x-api-key", ""),
        ("authorization", ""),
    ] {
        let r = Request::post("/orders")
            .header("idempotency-key", "an-1")
            .header(h, v)
            .body(Body::from("a"))
            .unwrap();
        let got = send(&app, r).await;
        assert!(
            !replayed(&got.1) || v.is_empty(),
            "{h}: {v:?} got the anonymous scope's stored response"
        );
    }
}

/// `StoredResponse::headers`: "connection-specific ones are not stored"; the guide: a replay has
/// the stored headers "except connection-level ones such as `Date` and `Content-Length`". A store
/// entry that holds a `Content-Length` anyway (a custom store, a value written by hand or by
/// another program into Redis) is replayed with it: over the wire, a 5-byte body announced as
/// 999,999 bytes: hyper's server task panicked ("payload claims content-length of 5, custom
/// content-length header claims 999999", a debug assertion) and the client got
/// `IncompleteMessage`. Found by this round; a replay drops such headers since.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_content_length_is_not_replayed() {
    let stored = StoredResponse {
        status: 200,
        headers: vec![("content-length".into(), b"999999".to_vec())],
        body: Bytes::from_static(b"short"),
    };
    let app = Router::new()
        .route("/orders", post(|| async { "never" }))
        .layer(IdempotencyLayer::new(
            Hostile(stored),
            ByCredentials::default(),
        ));
    let got = send(&app, req(Some(b"hs"), "x")).await;
    let in_process = got.1.get("content-length").cloned();
    let addr = serve(app).await;
    let wire = tokio::time::timeout(Duration::from_secs(2), async {
        let resp = client()
            .request(wire_req(addr, "hs", "x"))
            .await
            .map_err(|e| format!("{e:?}"))?;
        resp.into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .map_err(|e| format!("{e:?}"))
    })
    .await;
    assert_eq!(
        in_process.as_ref().map(HeaderValue::as_bytes),
        Some(&b"5"[..]),
        "in process: the replay's Content-Length"
    );
    assert!(
        matches!(wire, Ok(Ok(ref b)) if &b[..] == b"short"),
        "over the wire: {wire:?}"
    );
}

async fn redis_store(url: &str, tag: &str) -> sturdy::redis::RedisIdempotencyStore {
    sturdy::redis::RedisIdempotencyStore::connect(url)
        .await
        .unwrap()
        .with_prefix(unique(tag))
}

/// Redis, over the wire, two app instances on one prefix: 32 requests with one key at once, half
/// to each, run the handler once (guide: "exactly one execution start, across every instance
/// sharing the store").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_wire_32_at_once_two_instances_one_run() {
    let Some(url) = redis_url() else { return };
    let prefix = unique("two");
    let runs = Runs::default();
    let mut addrs = Vec::new();
    for _ in 0..2 {
        let store = sturdy::redis::RedisIdempotencyStore::connect(&url)
            .await
            .unwrap()
            .with_prefix(prefix.clone());
        addrs.push(
            serve(app_with(
                IdempotencyLayer::new(store, ByCredentials::default()),
                &runs,
            ))
            .await,
        );
    }
    let mut tasks = Vec::new();
    for i in 0..32 {
        let addr = addrs[i % 2];
        tasks.push(tokio::spawn(async move {
            wire_send(addr, "r32", "sleep:300").await
        }));
    }
    let mut fresh = 0;
    for t in tasks {
        let (st, h, body) = t.await.unwrap();
        match st.as_u16() {
            201 if !replayed(&h) => fresh += 1,
            201 => {}
            409 => assert_eq!(problem_type(&body), problem::IN_FLIGHT),
            other => panic!("unexpected {other}: {:?}", String::from_utf8_lossy(&body)),
        }
    }
    assert_eq!((fresh, runs.started()), (1, 1));
}

/// Redis, over the wire: a client that times out at seeded points, then retries; the handler runs
/// once per key; a handler three leases long keeps its key (renewal is real on Redis too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_wire_timeouts_at_seeded_points_and_renewal() {
    let Some(url) = redis_url() else { return };
    let runs = Runs::default();
    let store = redis_store(&url, "cut").await;
    let addr = serve(app_with(
        IdempotencyLayer::new(store, ByCredentials::default())
            .with_lease(Duration::from_millis(150))
            .unwrap(),
        &runs,
    ))
    .await;
    let mut rng = Seeded(0x71);
    for round in 0..6u64 {
        let key = format!("rc-{round}");
        let cut = rng.upto(200);
        let before = runs.started();
        let _ = tokio::time::timeout(
            Duration::from_millis(cut),
            client().request(wire_req(addr, &key, "sleep:450")),
        )
        .await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
        let got = loop {
            let got = wire_send(addr, &key, "sleep:450").await;
            if got.0 != StatusCode::CONFLICT {
                break got;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "round {round}: 409 for 4 s"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        };
        assert_eq!(got.0, StatusCode::CREATED, "round {round}, cut at {cut} ms");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(runs.started() - before, 1, "round {round}, cut at {cut} ms");
    }
}

/// Redis: "handler panics | ... the release has completed before the panic resumes | ... a
/// retry, even at once, runs the handler again"; "handler returns 5xx | ... the key is released
/// before the response goes out | the 5xx; a retry, even at once, runs the handler again".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_wire_panic_and_5xx_release_before_answer() {
    let Some(url) = redis_url() else { return };
    let store = redis_store(&url, "panic").await;
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let app = Router::new()
        .route(
            "/orders",
            post(move |body: Bytes| {
                let n = c.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n == 0 && &body[..] == b"panic" {
                        panic!("s71 first run panics");
                    }
                    if n == 0 {
                        return (StatusCode::SERVICE_UNAVAILABLE, "busy");
                    }
                    (StatusCode::CREATED, "made")
                }
            }),
        )
        .layer(IdempotencyLayer::new(store, ByCredentials::default()));
    let addr = serve(app).await;
    let first = tokio::time::timeout(
        Duration::from_secs(5),
        client().request(wire_req(addr, "rp-1", "panic")),
    )
    .await
    .expect("answered or closed");
    assert!(first.is_err(), "the connection closes without a response");
    let again = wire_send(addr, "rp-1", "panic").await;
    assert_eq!((again.0, replayed(&again.1)), (StatusCode::CREATED, false));

    calls.store(0, Ordering::SeqCst);
    let busy = wire_send(addr, "rp-2", "x").await;
    assert_eq!(busy.0, StatusCode::SERVICE_UNAVAILABLE);
    let again = wire_send(addr, "rp-2", "x").await;
    assert_eq!((again.0, replayed(&again.1)), (StatusCode::CREATED, false));
}

// ---------------------------------------------------------------------------------------------
// batch 4: scope from repeated header lines, the memory store against a model
// ---------------------------------------------------------------------------------------------

/// `ByCredentials`: "these headers, each with every value"; `with_cookies`: "Reads only these
/// cookies from `Cookie`". A credential on a second header line (HTTP/2 sends each cookie on a
/// line of its own) is read: two clients whose first lines match but whose second differ are two
/// scopes, never one.
#[tokio::test(start_paused = true)]
async fn scope_reads_every_header_line() {
    for (scope, header, shared, a, b) in [
        (
            ByCredentials::default(),
            "authorization",
            "Bearer shared",
            "Bearer client-a",
            "Bearer client-b",
        ),
        (
            ByCredentials::default().with_cookies(["session_id"]),
            "cookie",
            "theme=dark",
            "session_id=a",
            "session_id=b",
        ),
        (
            ByCredentials::default(),
            "cookie",
            "theme=dark",
            "session_id=a",
            "session_id=b",
        ),
    ] {
        let runs = Runs::default();
        let app = app_with(IdempotencyLayer::new(MemoryStore::default(), scope), &runs);
        let two_lines = |second: &str| {
            Request::post("/orders")
                .header("idempotency-key", "lines-1")
                .header(header, shared)
                .header(header, second)
                .body(Body::from("l"))
                .unwrap()
        };
        assert_eq!(send(&app, two_lines(a)).await.0, 201);
        let other = send(&app, two_lines(b)).await;
        assert!(
            !replayed(&other.1),
            "{header}: [{shared:?}, {b:?}] got the stored response of [{shared:?}, {a:?}]"
        );
        assert!(replayed(&send(&app, two_lines(a)).await.1));
    }
}

/// `with_cookies`: "`Cookie` is read even when it is not among the headers."
#[tokio::test(start_paused = true)]
async fn named_cookies_with_custom_headers() {
    let runs = Runs::default();
    let scope = ByCredentials::headers([http::HeaderName::from_static("x-customer-token")])
        .with_cookies(["sid"]);
    let app = app_with(IdempotencyLayer::new(MemoryStore::default(), scope), &runs);
    let with = |token: &str, cookie: &str| {
        Request::post("/orders")
            .header("idempotency-key", "nc-1")
            .header("x-customer-token", token)
            .header("cookie", cookie)
            .header("authorization", "Bearer ignored-here")
            .body(Body::from("n"))
            .unwrap()
    };
    assert_eq!(send(&app, with("t1", "sid=1")).await.0, 201);
    assert!(
        !replayed(&send(&app, with("t1", "sid=2")).await.1),
        "another sid"
    );
    assert!(
        !replayed(&send(&app, with("t2", "sid=1")).await.1),
        "another token"
    );
    assert!(replayed(&send(&app, with("t1", "sid=1; z=9")).await.1));
}

/// `with_max_bytes`: "Clones are one store: the bound applies to all of them, and the entries
/// already held are kept."
#[tokio::test(start_paused = true)]
async fn max_bytes_set_on_a_clone_bounds_the_store() {
    let runs = Runs::default();
    let store = MemoryStore::default();
    let app = app_with(
        IdempotencyLayer::new(store.clone(), ByCredentials::default()),
        &runs,
    );
    for i in 0..6 {
        let key = format!("cl-{i}");
        assert_eq!(
            send(&app, req(Some(key.as_bytes()), "big:1000")).await.0,
            201
        );
        tokio::time::advance(Duration::from_millis(1)).await;
    }
    let held = store.heap_bytes();
    assert!(held > 5_000, "{held}");
    let _bounded = store.clone().with_max_bytes(3_000).unwrap();
    assert_eq!(store.len(), 6, "the entries already held are kept");
    assert_eq!(send(&app, req(Some(b"cl-new"), "big:1000")).await.0, 201);
    assert!(
        store.heap_bytes() <= 3_000,
        "the bound set on a clone: {} bytes held",
        store.heap_bytes()
    );
    assert!(replayed(
        &send(&app, req(Some(b"cl-new"), "big:1000")).await.1
    ));
}

#[derive(Clone, Debug, PartialEq)]
enum Model {
    Locked { token: u128, fp: u8, until: u64 },
    Done { fp: u8, body: u8, until: u64 },
}

/// The store's contract (`IdempotencyStore` rustdoc) against a model, on a `MemoryStore`, with
/// seeded operations and a paused clock: atomic `begin`, leases, TTLs, `renew`/`complete`/
/// `release` only for their token (renew and complete also on a free key). Afterwards every
/// entry expires: `len()` and `heap_bytes()` come back to 0.
#[tokio::test(start_paused = true)]
async fn memory_store_against_a_model() {
    let store = MemoryStore::default();
    let mut model: std::collections::HashMap<u8, Model> = std::collections::HashMap::new();
    let mut rng = Seeded(0x0071_0071);
    let start = tokio::time::Instant::now();
    let now_ms = |start: tokio::time::Instant| start.elapsed().as_millis() as u64;
    let fp_of = |f: u8| -> Fingerprint { [f; 32] };
    let tokens: Vec<u128> = (1..=4).collect();
    let mut trace: Vec<String> = Vec::new();
    for step in 0..3000 {
        // Time moves in even milliseconds; deadlines are odd: never equal to a check time.
        tokio::time::advance(Duration::from_millis(2 * rng.upto(3))).await;
        let now = now_ms(start);
        model.retain(|_, m| match m {
            Model::Locked { until, .. } | Model::Done { until, .. } => *until > now,
        });
        let k = rng.upto(5) as u8;
        let key = format!("model-{k}");
        let mut fp = rng.upto(1) as u8;
        let token = tokens[rng.upto(3) as usize];
        // A token is one execution of one request: its holder never sends another fingerprint.
        if let Some(Model::Locked {
            token: t, fp: f, ..
        }) = model.get(&k)
        {
            if *t == token {
                fp = *f;
            }
        }
        let span = 2 * rng.upto(20) + 1;
        let op = rng.upto(3);
        trace.push(format!(
            "t={now} op={op} k={k} fp={fp} token={token} span={span} model={:?}",
            model.get(&k)
        ));
        match op {
            0 => {
                let got = store
                    .begin(
                        &key,
                        fp_of(fp),
                        LockToken::from_u128(token),
                        Duration::from_millis(span),
                    )
                    .await
                    .unwrap();
                let want = match model.get(&k) {
                    None => {
                        model.insert(
                            k,
                            Model::Locked {
                                token,
                                fp,
                                until: now + span,
                            },
                        );
                        Begin::Started
                    }
                    Some(Model::Locked { fp: f, .. } | Model::Done { fp: f, .. }) if *f != fp => {
                        Begin::Mismatch
                    }
                    Some(Model::Locked { .. }) => Begin::InFlight,
                    Some(Model::Done { body, .. }) => Begin::Completed(StoredResponse {
                        status: 201,
                        headers: vec![],
                        body: Bytes::from(vec![*body]),
                    }),
                };
                assert_eq!(got, want, "step {step}: begin {k} fp {fp} token {token}");
            }
            1 => {
                let got = store
                    .renew(
                        &key,
                        fp_of(fp),
                        LockToken::from_u128(token),
                        Duration::from_millis(span),
                    )
                    .await
                    .unwrap();
                let want = match model.get(&k) {
                    None => {
                        model.insert(
                            k,
                            Model::Locked {
                                token,
                                fp,
                                until: now + span,
                            },
                        );
                        true
                    }
                    Some(Model::Locked {
                        token: t, fp: f, ..
                    }) if *t == token && *f == fp => {
                        model.insert(
                            k,
                            Model::Locked {
                                token,
                                fp,
                                until: now + span,
                            },
                        );
                        true
                    }
                    Some(_) => false,
                };
                assert_eq!(got, want, "step {step}: renew {k} fp {fp} token {token}");
            }
            2 => {
                let body = rng.upto(255) as u8;
                store
                    .complete(
                        &key,
                        fp_of(fp),
                        LockToken::from_u128(token),
                        StoredResponse {
                            status: 201,
                            headers: vec![],
                            body: Bytes::from(vec![body]),
                        },
                        Duration::from_millis(span),
                    )
                    .await
                    .unwrap();
                match model.get(&k) {
                    None => {
                        model.insert(
                            k,
                            Model::Done {
                                fp,
                                body,
                                until: now + span,
                            },
                        );
                    }
                    Some(Model::Locked {
                        token: t, fp: f, ..
                    }) if *t == token && *f == fp => {
                        model.insert(
                            k,
                            Model::Done {
                                fp,
                                body,
                                until: now + span,
                            },
                        );
                    }
                    _ => {}
                }
            }
            _ => {
                store
                    .release(&key, LockToken::from_u128(token))
                    .await
                    .unwrap();
                if matches!(model.get(&k), Some(Model::Locked { token: t, .. }) if *t == token) {
                    model.remove(&k);
                }
            }
        }
        assert_eq!(
            store.len(),
            model.len(),
            "step {step}: len; last ops:\n{}",
            trace[trace.len().saturating_sub(4)..].join("\n")
        );
    }
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(store.len(), 0);
    assert_eq!(
        store.heap_bytes(),
        0,
        "bytes still counted after every entry expired"
    );
}

/// Guide: a repeat of a completed request gets "the stored response ... with
/// `Idempotent-Replayed: true`"; the 500 marker kept for a response over the limit is the stored
/// response ("its key replays a 500").
#[tokio::test(start_paused = true)]
async fn marker_replays_are_marked_replayed() {
    let runs = Runs::default();
    let events = Arc::new(AtomicUsize::new(0));
    let ev = events.clone();
    let layer = mem_layer().with_response_limit(4).on_event(move |e| {
        if let Event::IdempotentReplayed { status, .. } = e {
            assert_eq!(status.as_u16(), 500);
            ev.fetch_add(1, Ordering::SeqCst);
        }
    });
    let app = app_with(layer, &runs);
    let _ = send(&app, req(Some(b"mk-1"), "big:5")).await;
    let again = send(&app, req(Some(b"mk-1"), "big:5")).await;
    assert_problem(&again, 500, problem::RESPONSE_TOO_LARGE);
    assert!(replayed(&again.1), "the marker's replay: {:?}", again.1);
    assert_eq!(events.load(Ordering::SeqCst), 1);
}

/// A structured-field string's escapes do not count against the 255 characters: `"` and 255
/// escaped backslashes (512 bytes) is the key of 255 backslashes, the same key as bare.
#[tokio::test(start_paused = true)]
async fn quoted_key_length_counts_characters() {
    let runs = Runs::default();
    let app = app_with(mem_layer(), &runs);
    let bare = "\\".repeat(255);
    let bare = &bare[..255];
    let quoted = format!("\"{}\"", "\\\\".repeat(255));
    assert_eq!(quoted.len(), 512);
    assert_eq!(send(&app, req(Some(bare.as_bytes()), "q")).await.0, 201);
    let got = send(&app, req(Some(quoted.as_bytes()), "q")).await;
    assert_eq!(
        (got.0, replayed(&got.1)),
        (StatusCode::CREATED, true),
        "{:?}",
        String::from_utf8_lossy(&got.2)
    );
}

/// Guide: "If the request's future is dropped, the task goes on: it reads the whole response body
/// (up to the response limit), stores it, then ends." A slowly streamed body and a client gone
/// mid-body: a retry meanwhile is 409, then the whole body is replayed.
#[tokio::test(start_paused = true)]
async fn slow_streamed_body_client_gone() {
    let runs = Runs::default();
    let r = runs.clone();
    let app = Router::new()
        .route(
            "/orders",
            post(move || {
                let r = r.clone();
                async move {
                    r.started.fetch_add(1, Ordering::SeqCst);
                    let chunks = futures_util::stream::unfold(0u8, |i| async move {
                        if i == 5 {
                            return None;
                        }
                        tokio::time::sleep(Duration::from_millis(60)).await;
                        Some((
                            Ok::<_, Infallible>(Frame::data(Bytes::from(vec![b'0' + i; 3]))),
                            i + 1,
                        ))
                    });
                    Response::builder()
                        .status(201)
                        .body(Body::new(http_body_util::StreamBody::new(chunks)))
                        .unwrap()
                }
            }),
        )
        .layer(mem_layer());
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, req(Some(b"sl-1"), "x")).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    first.abort();
    let _ = first.await;
    let during = send(&app, req(Some(b"sl-1"), "x")).await;
    assert_problem(&during, 409, problem::IN_FLIGHT);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let replay = send(&app, req(Some(b"sl-1"), "x")).await;
    assert!(replayed(&replay.1));
    assert_eq!(&replay.2[..], b"000111222333444");
    assert_eq!(runs.started(), 1);
}

/// RELIABILITY / `with_replication`: "`begin` and `complete` send `WAIT replicas timeout` ... and
/// fail when fewer replicas confirm in time: the layer then answers 503 without running the
/// handler and releases the lock in the background, so a retry runs at once". On a Redis without
/// replicas: 503, and the same key through a store without the requirement (same prefix) runs
/// at once, not 409. Then a stored response's TTL in Redis is the layer's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_replication_unmet_is_503_and_frees_the_lock() {
    let Some(url) = redis_url() else { return };
    let prefix = unique("repl");
    let runs = Runs::default();
    let strict = sturdy::redis::RedisIdempotencyStore::connect(&url)
        .await
        .unwrap()
        .with_prefix(prefix.clone())
        .with_replication(1, Duration::from_millis(50));
    let app = app_with(
        IdempotencyLayer::new(strict, ByCredentials::default())
            .with_lease(Duration::from_secs(20))
            .unwrap(),
        &runs,
    );
    let got = send_real(&app, req(Some(b"rp-1"), "x")).await;
    assert_problem(&got, 503, problem::STORE_UNAVAILABLE);
    assert_eq!(runs.started(), 0);
    let plain = sturdy::redis::RedisIdempotencyStore::connect(&url)
        .await
        .unwrap()
        .with_prefix(prefix.clone());
    let app2 = app_with(
        IdempotencyLayer::new(plain, ByCredentials::default())
            .with_ttl(Duration::from_secs(100))
            .unwrap(),
        &runs,
    );
    let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
    loop {
        let got = send_real(&app2, req(Some(b"rp-1"), "x")).await;
        if got.0 == StatusCode::CREATED {
            break;
        }
        assert_eq!(got.0, StatusCode::CONFLICT);
        assert!(
            tokio::time::Instant::now() < deadline,
            "the lock of the failed begin still held after 1.5 s (lease 20 s)"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(runs.started(), 1);
    let pattern = format!("{prefix}*");
    let keys = resp_command(&url, &[b"KEYS", pattern.as_bytes()]).await;
    let text = String::from_utf8_lossy(&keys).into_owned();
    let key = text
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no key under the prefix: {text}"))
        .to_owned();
    let pttl = resp_command(&url, &[b"PTTL", key.as_bytes()]).await;
    let ms: i64 = String::from_utf8_lossy(&pttl)
        .trim()
        .trim_start_matches(':')
        .parse()
        .unwrap();
    assert!(ms > 90_000 && ms <= 100_000, "PTTL {ms} ms for a 100 s TTL");
    resp_command(&url, &[b"DEL", key.as_bytes()]).await;
}
