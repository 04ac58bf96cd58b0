//! s91 outside round: the server-side idempotency layer for axum (`sturdy::idempotency::server`)
//! with `MemoryStore`, the Redis store on one server and on a Redis Cluster, read against
//! docs/guides/idempotency.md, docs/RELIABILITY.md, README.md and the public rustdoc.
//!
//! Corners covered: an absolute-form request target against the origin form (the fingerprint is
//! the path and query), a handler whose client left and which then panics, answers 5xx or
//! streams an endless body (the detached execution settles the key), a response body that
//! panics, another body under a key that was released or expired, a graceful restart onto a
//! new layer over the same Redis mid-request, a kept service under `LoadShed` + `Timeout`
//! outside and a global concurrency limit inside, the memory store's byte count after expiry on
//! paused time, and every problem answer read literally (RFC 9457 members, content type,
//! `Retry-After`). In-process tests run on paused time; wire and Redis tests in real time with
//! millisecond settings and key prefixes `s91-...`.
#![cfg(feature = "full")]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use futures_util::StreamExt as _;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;
use sturdy::idempotency::server::{
    problem, ByCredentials, IdempotencyLayer, IdempotencyStore, MemoryStore,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::{Service, ServiceBuilder, ServiceExt};

const AUTH: &str = "Bearer s91-client";

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn unique(tag: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let salt = sturdy::idempotency::server::LockToken::random().to_string();
    format!(
        "s91-{tag}-{}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst),
        &salt[..12]
    )
}

/// What one run of the handler does after its delay.
#[derive(Clone, Copy, Debug)]
enum Act {
    /// 201 with `run <n>: <body>` and a few headers.
    Ok,
    /// Panics.
    Panic,
    /// This status, body `run <n>`.
    Status(u16),
    /// 201 with a body that never ends (512-byte chunks).
    Endless,
    /// 201 with a body that yields one chunk, then panics.
    PanicBody,
    /// 204, no body.
    NoContent,
    /// 201 with a body and no headers at all.
    Bare,
    /// 201 with this many bytes.
    Big(usize),
    /// Blocks its thread for this many milliseconds (a stalled process), then 201 as `Ok`.
    Stall(u64),
}

/// The handler's script: each run takes the next step (delay, act); `Ok` after the last.
#[derive(Clone, Default)]
struct Plan {
    steps: Arc<Mutex<VecDeque<(u64, Act)>>>,
    runs: Arc<AtomicUsize>,
    /// Runs that got past their delay.
    finished: Arc<AtomicUsize>,
}

impl Plan {
    fn new(steps: &[(u64, Act)]) -> Self {
        let p = Self::default();
        p.steps.lock().unwrap().extend(steps.iter().copied());
        p
    }
    fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }
    fn finished(&self) -> usize {
        self.finished.load(Ordering::SeqCst)
    }
}

async fn handle(State(p): State<Plan>, body: Bytes) -> Response<Body> {
    let n = p.runs.fetch_add(1, Ordering::SeqCst) + 1;
    let step = p.steps.lock().unwrap().pop_front();
    let (delay, act) = step.unwrap_or((0, Act::Ok));
    if delay > 0 {
        tokio::time::sleep(ms(delay)).await;
    }
    let text = String::from_utf8_lossy(&body).into_owned();
    // A stalled process blocks its thread on purpose.
    #[allow(clippy::disallowed_methods)]
    if let Act::Stall(block) = act {
        let multi = tokio::runtime::Handle::current().runtime_flavor()
            == tokio::runtime::RuntimeFlavor::MultiThread;
        if multi {
            tokio::task::block_in_place(|| std::thread::sleep(ms(block)));
        } else {
            std::thread::sleep(ms(block));
        }
    }
    match act {
        Act::Ok | Act::Stall(_) => Response::builder()
            .status(201)
            .header("content-type", "text/plain")
            .header("location", format!("/orders/o_{n}"))
            .header("set-cookie", "a=1")
            .header("set-cookie", "b=2")
            .body(Body::from(format!("run {n}: {text}")))
            .unwrap(),
        Act::Panic => panic!("s91 handler panics on purpose (run {n})"),
        Act::Status(code) => Response::builder()
            .status(code)
            .body(Body::from(format!("run {n}")))
            .unwrap(),
        Act::Endless => {
            let chunks = futures_util::stream::repeat_with(|| {
                Ok::<_, Infallible>(Bytes::from_static(&[b'e'; 512]))
            });
            Response::builder()
                .status(201)
                .body(Body::from_stream(chunks))
                .unwrap()
        }
        Act::PanicBody => {
            let chunks = futures_util::stream::iter(0..2).map(|i| {
                if i == 0 {
                    Ok::<_, Infallible>(Bytes::from_static(b"part"))
                } else {
                    panic!("s91 response body panics on purpose")
                }
            });
            Response::builder()
                .status(201)
                .body(Body::from_stream(chunks))
                .unwrap()
        }
        Act::NoContent => Response::builder().status(204).body(Body::empty()).unwrap(),
        Act::Bare => Response::builder()
            .status(201)
            .body(Body::from(format!("bare run {n}")))
            .unwrap(),
        Act::Big(len) => Response::builder()
            .status(201)
            .body(Body::from(vec![b'x'; len]))
            .unwrap(),
    }
}

fn app<St: IdempotencyStore + Clone>(layer: IdempotencyLayer<St>, plan: &Plan) -> Router {
    Router::new()
        .route("/orders", post(handle))
        .with_state(plan.clone())
        .layer(layer)
}

fn mem_layer() -> IdempotencyLayer<MemoryStore> {
    IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default())
}

fn req(key: &str, body: &str) -> Request<Body> {
    Request::post("/orders")
        .header("authorization", AUTH)
        .header("idempotency-key", key)
        .body(Body::from(body.to_owned()))
        .unwrap()
}

async fn read<B>(resp: Response<B>) -> (StatusCode, HeaderMap, Bytes)
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (parts.status, parts.headers, bytes)
}

async fn send(app: &Router, r: Request<Body>) -> (StatusCode, HeaderMap, Bytes) {
    read(app.clone().oneshot(r).await.unwrap()).await
}

fn replayed(h: &HeaderMap) -> bool {
    h.get("idempotent-replayed").map(|v| v.as_bytes()) == Some(b"true")
}

/// Reads a problem answer literally: `Content-Type: application/problem+json`, a JSON object
/// with exactly `type`, `title`, `status`, `detail`; `status` the HTTP status; `type` the
/// constant; `Retry-After: 1` on 409 and 503 (and only there).
fn check_problem(status: StatusCode, headers: &HeaderMap, body: &[u8], want: u16, ty: &str) {
    let ctx = String::from_utf8_lossy(body).into_owned();
    assert_eq!(status.as_u16(), want, "{ctx}");
    assert_eq!(
        headers.get_all("content-type").iter().collect::<Vec<_>>(),
        vec!["application/problem+json"],
        "{ctx}"
    );
    let v: serde_json::Value = serde_json::from_slice(body).expect("problem JSON");
    let obj = v.as_object().expect("a JSON object");
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["detail", "status", "title", "type"], "{ctx}");
    assert_eq!(obj["type"], ty, "{ctx}");
    assert_eq!(obj["status"], want, "{ctx}");
    assert!(!obj["title"].as_str().unwrap().is_empty(), "{ctx}");
    assert!(!obj["detail"].as_str().unwrap().is_empty(), "{ctx}");
    let ra: Vec<_> = headers.get_all("retry-after").iter().collect();
    if want == 409 || want == 503 {
        assert_eq!(ra, vec!["1"], "{ctx}");
    } else {
        assert!(ra.is_empty(), "{ctx}");
    }
}

fn redis_url() -> Option<String> {
    std::env::var("STURDY_REDIS_URL").ok()
}

fn cluster_urls() -> Option<Vec<String>> {
    let v = std::env::var("STURDY_REDIS_CLUSTER_URLS").ok()?;
    Some(v.split(',').map(str::to_owned).collect())
}

async fn redis_store(url: &str, prefix: &str) -> sturdy::redis::RedisIdempotencyStore {
    sturdy::redis::RedisIdempotencyStore::connect(url)
        .await
        .unwrap()
        .with_prefix(prefix.to_owned())
}

async fn cluster_store(urls: &[String], prefix: &str) -> sturdy::redis::RedisIdempotencyStore {
    sturdy::redis::RedisIdempotencyStore::connect_cluster(urls.iter().map(String::as_str))
        .await
        .unwrap()
        .with_prefix(prefix.to_owned())
}

async fn serve(app: Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    addr
}

/// One raw HTTP/1.1 exchange (the request should say `Connection: close`): status, headers in
/// order, body (content-length or chunked).
async fn raw(addr: SocketAddr, request: &[u8]) -> (u16, Vec<(String, Vec<u8>)>, Vec<u8>) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("answer within 5 s")
        .unwrap();
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = String::from_utf8_lossy(&out[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next().unwrap()[9..12].parse().unwrap();
    let mut headers = Vec::new();
    for l in lines {
        let (n, v) = l.split_once(':').unwrap();
        headers.push((n.to_ascii_lowercase(), v.trim().as_bytes().to_vec()));
    }
    let rest = &out[split + 4..];
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case(b"chunked"));
    let body = if chunked {
        let mut body = Vec::new();
        let mut at = 0;
        loop {
            let end = at + rest[at..].windows(2).position(|w| w == b"\r\n").unwrap();
            let len =
                usize::from_str_radix(std::str::from_utf8(&rest[at..end]).unwrap().trim(), 16)
                    .unwrap();
            if len == 0 {
                break;
            }
            body.extend_from_slice(&rest[end + 2..end + 2 + len]);
            at = end + 2 + len + 2;
        }
        body
    } else {
        rest.to_vec()
    };
    (status, headers, body)
}

fn header<'a>(h: &'a [(String, Vec<u8>)], name: &str) -> Vec<&'a [u8]> {
    h.iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v.as_slice())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// the fingerprint and the request target
// ---------------------------------------------------------------------------------------------

fn post_raw(target: &str, host: &str, key: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {target} HTTP/1.1\r\nHost: {host}\r\nAuthorization: {AUTH}\r\n\
         Idempotency-Key: {key}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Guide: "The fingerprint is SHA-256 over the method, the path and query ... and the body."
/// A request sent in absolute form (`POST http://host/orders`, as through a proxy) has the path
/// `/orders`: the same key sent in origin form, or in absolute form naming another host, is a
/// repeat of the same request and replays, never 422 and never a second run. Also under
/// `Router::nest` ("The path is the one the client sent").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s91_absolute_form_target_is_the_same_request_as_origin_form() {
    for nested in [false, true] {
        let plan = Plan::default();
        let (app, path) = if nested {
            let inner = Router::new()
                .route("/orders", post(handle))
                .with_state(plan.clone())
                .layer(mem_layer());
            (Router::new().nest("/v1", inner), "/v1/orders")
        } else {
            (app(mem_layer(), &plan), "/orders")
        };
        let addr = serve(app).await;
        let host = addr.to_string();
        let key = unique("abs");

        let first = raw(
            addr,
            &post_raw(&format!("http://{host}{path}"), &host, &key, "hello"),
        )
        .await;
        assert_eq!(first.0, 201, "nested {nested}: {first:?}");
        assert_eq!(first.2, b"run 1: hello");

        let origin = raw(addr, &post_raw(path, &host, &key, "hello")).await;
        assert_eq!(
            (origin.0, origin.2.clone()),
            (201, b"run 1: hello".to_vec()),
            "nested {nested}: origin form after absolute form: {:?}",
            String::from_utf8_lossy(&origin.2)
        );
        assert_eq!(header(&origin.1, "idempotent-replayed"), [b"true"]);

        let other_host = raw(
            addr,
            &post_raw(
                &format!("http://other.example:81{path}"),
                "other.example:81",
                &key,
                "hello",
            ),
        )
        .await;
        assert_eq!(
            (other_host.0, other_host.2.clone()),
            (201, b"run 1: hello".to_vec()),
            "nested {nested}: absolute form naming another host: {:?}",
            String::from_utf8_lossy(&other_host.2)
        );
        assert_eq!(plan.runs(), 1, "nested {nested}");
    }
}

/// Guide: "the path and query (byte for byte ...)". `/orders?` (an empty query) and `/orders`
/// differ in bytes; whichever way the layer reads them, the second must not run the handler a
/// second time unnoticed: it is either the stored response (one request) or 422 (two).
#[tokio::test(start_paused = true)]
async fn s91_empty_query_is_judged_one_way_and_never_runs_twice() {
    let plan = Plan::default();
    let app = app(mem_layer(), &plan);
    let a = send(&app, req("s91-q", "x")).await;
    assert_eq!(a.0, 201);
    let r = Request::post("/orders?")
        .header("authorization", AUTH)
        .header("idempotency-key", "s91-q")
        .body(Body::from("x"))
        .unwrap();
    let b = send(&app, r).await;
    eprintln!("s91 empty query: {} {:?}", b.0, b.2);
    if b.0 == StatusCode::UNPROCESSABLE_ENTITY {
        check_problem(b.0, &b.1, &b.2, 422, problem::KEY_REUSED);
    } else {
        assert_eq!((b.0, &b.2, replayed(&b.1)), (a.0, &a.2, true));
    }
    assert_eq!(plan.runs(), 1);
}

// ---------------------------------------------------------------------------------------------
// a client gone mid-handler, then the handler fails: the detached execution settles the key
// ---------------------------------------------------------------------------------------------

/// The client leaves mid-handler (its request future dropped by a timeout), then the handler
/// ends with `act`. While it runs, a retry is 409 in flight; after it ended:
/// - a panic or a 5xx releases the key ("a retry, even at once, runs the handler again"),
/// - an endless body is cut at the response limit and the key keeps the 500 marker ("its key
///   replays a 500 `…/idempotency-response-too-large`"; "the handler is not run again").
async fn gone_then<St: IdempotencyStore + Clone>(
    layer: IdempotencyLayer<St>,
    act: Act,
    handler_ms: u64,
    gone_ms: u64,
) {
    let plan = Plan::new(&[(handler_ms, act)]);
    let app = app(layer.with_response_limit(4096), &plan);
    let key = unique("gone");
    let first = tokio::time::timeout(ms(gone_ms), app.clone().oneshot(req(&key, "order"))).await;
    assert!(
        first.is_err(),
        "{act:?}: the first client left before the end"
    );
    assert_eq!(plan.runs(), 1);

    let during = send(&app, req(&key, "order")).await;
    check_problem(during.0, &during.1, &during.2, 409, problem::IN_FLIGHT);

    // Past the handler's end (and its settlement).
    tokio::time::sleep(ms(handler_ms * 2 + 200)).await;
    let after = send(&app, req(&key, "order")).await;
    match act {
        Act::Panic | Act::PanicBody | Act::Status(_) => {
            assert_eq!(
                (after.0.as_u16(), replayed(&after.1)),
                (201, false),
                "{act:?}: a retry after the left handler ended runs it again: {:?}",
                String::from_utf8_lossy(&after.2)
            );
            assert_eq!(after.2, Bytes::from("run 2: order"), "{act:?}");
            assert_eq!(plan.runs(), 2, "{act:?}");
        }
        Act::Endless => {
            check_problem(
                after.0,
                &after.1,
                &after.2,
                500,
                problem::RESPONSE_TOO_LARGE,
            );
            assert_eq!(plan.runs(), 1, "{act:?}: never run again");
        }
        _ => unreachable!(),
    }
}

#[tokio::test(start_paused = true)]
async fn s91_memory_client_gone_then_handler_panics_releases_key() {
    gone_then(mem_layer(), Act::Panic, 100, 20).await;
}

#[tokio::test(start_paused = true)]
async fn s91_memory_client_gone_then_handler_500_releases_key() {
    gone_then(mem_layer(), Act::Status(500), 100, 20).await;
    gone_then(mem_layer(), Act::Status(429), 100, 20).await;
}

#[tokio::test(start_paused = true)]
async fn s91_memory_client_gone_then_response_body_panics_releases_key() {
    gone_then(mem_layer(), Act::PanicBody, 100, 20).await;
}

#[tokio::test(start_paused = true)]
async fn s91_memory_client_gone_then_endless_body_keeps_marker() {
    gone_then(mem_layer(), Act::Endless, 100, 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s91_redis_client_gone_then_panic_500_endless() {
    let Some(url) = redis_url() else { return };
    for act in [Act::Panic, Act::Status(503), Act::Endless, Act::PanicBody] {
        let store = redis_store(&url, &unique("gone")).await;
        let layer = IdempotencyLayer::new(store, ByCredentials::default());
        gone_then(layer, act, 300, 60).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s91_cluster_client_gone_then_panic_500_endless() {
    let Some(urls) = cluster_urls() else { return };
    for act in [Act::Panic, Act::Status(502), Act::Endless] {
        let store = cluster_store(&urls, &unique("cgone")).await;
        let layer = IdempotencyLayer::new(store, ByCredentials::default());
        gone_then(layer, act, 300, 60).await;
    }
}

/// A response body that panics while the layer reads it (to store it). Guide: "A panic in the
/// handler is caught in its task; the key is released ... a retry, even at once, runs the
/// handler again". Whatever the first client sees, the key must not stay locked for the lease
/// (30 s): a retry a moment later runs the handler.
#[tokio::test(start_paused = true)]
async fn s91_response_body_that_panics_releases_key() {
    let plan = Plan::new(&[(0, Act::PanicBody)]);
    let app = app(mem_layer(), &plan);
    let a = app.clone();
    let first = tokio::spawn(async move {
        let resp = a.oneshot(req("s91-bp", "order")).await.unwrap();
        read(resp).await
    })
    .await;
    eprintln!(
        "s91 body panic, first: {:?}",
        first.as_ref().map(|f| (f.0, f.2.clone()))
    );
    match &first {
        Ok((status, headers, body)) => {
            // Not stored: if answered, a problem.
            assert!(status.is_server_error(), "{status} {body:?}");
            assert!(!replayed(headers));
        }
        Err(e) => assert!(e.is_panic(), "{e}"),
    }
    tokio::time::sleep(ms(10)).await;
    let retry = send(&app, req("s91-bp", "order")).await;
    assert_eq!(
        (retry.0.as_u16(), retry.2.clone()),
        (201, Bytes::from("run 2: order")),
        "retry after a panicking response body: {:?} {:?}",
        retry.1,
        String::from_utf8_lossy(&retry.2)
    );
    assert_eq!(plan.runs(), 2);
}

// ---------------------------------------------------------------------------------------------
// another body under a released or expired key
// ---------------------------------------------------------------------------------------------

/// A key whose first request ended in a 5xx or a panic is released ("`release`: Drops the lock
/// ..., so a retry can run"; "Expired entries are gone: `begin` treats their key as free"):
/// nothing is stored under it, so a request with another body under it runs, it is not 422.
async fn other_body_after_release<St: IdempotencyStore + Clone>(layer: IdempotencyLayer<St>) {
    let plan = Plan::new(&[(0, Act::Status(500)), (0, Act::Ok), (0, Act::Panic)]);
    let app = app(layer, &plan);
    let key = unique("rel");
    let a = send(&app, req(&key, "first")).await;
    assert_eq!(a.0, 500);
    let b = send(&app, req(&key, "second")).await;
    assert_eq!(
        (b.0.as_u16(), b.2.clone()),
        (201, Bytes::from("run 2: second")),
        "another body after a released 5xx: {:?}",
        String::from_utf8_lossy(&b.2)
    );
    // Now stored: a third body is 422.
    let c = send(&app, req(&key, "third")).await;
    check_problem(c.0, &c.1, &c.2, 422, problem::KEY_REUSED);

    let key2 = unique("rel-panic");
    let a2 = app.clone();
    let k2 = key2.clone();
    let panicked = tokio::spawn(async move { a2.oneshot(req(&k2, "first")).await }).await;
    assert!(panicked.unwrap_err().is_panic());
    let d = send(&app, req(&key2, "second")).await;
    assert_eq!(
        (d.0.as_u16(), d.2.clone()),
        (201, Bytes::from("run 4: second")),
        "another body after a panic: {:?}",
        String::from_utf8_lossy(&d.2)
    );
    assert_eq!(plan.runs(), 4);
}

#[tokio::test(start_paused = true)]
async fn s91_memory_other_body_after_release_runs() {
    other_body_after_release(mem_layer()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s91_redis_other_body_after_release_runs() {
    let Some(url) = redis_url() else { return };
    let store = redis_store(&url, &unique("rel")).await;
    other_body_after_release(IdempotencyLayer::new(store, ByCredentials::default())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s91_cluster_other_body_after_release_runs() {
    let Some(urls) = cluster_urls() else { return };
    let store = cluster_store(&urls, &unique("crel")).await;
    other_body_after_release(IdempotencyLayer::new(store, ByCredentials::default())).await;
}

/// After its TTL, a key is free: another body runs (not 422), and the memory store's byte count
/// and length fall to 0 without traffic ("an expired entry is purged as time passes, is not
/// counted by `len()`"; `heap_bytes`: "Bytes accounted for live entries").
#[tokio::test(start_paused = true)]
async fn s91_memory_ttl_frees_key_and_bytes() {
    let store = MemoryStore::default();
    let layer = IdempotencyLayer::new(store.clone(), ByCredentials::default())
        .with_ttl(Duration::from_secs(10))
        .unwrap();
    let plan = Plan::default();
    let app = app(layer, &plan);
    let a = send(&app, req("s91-ttl", "first")).await;
    assert_eq!(a.0, 201);
    assert_eq!(store.len(), 1);
    assert!(store.heap_bytes() > 0);
    tokio::time::advance(Duration::from_secs(10) - ms(1)).await;
    let early = send(&app, req("s91-ttl", "second")).await;
    check_problem(early.0, &early.1, &early.2, 422, problem::KEY_REUSED);
    tokio::time::advance(ms(2)).await;
    assert_eq!(store.len(), 0);
    assert_eq!(store.heap_bytes(), 0, "bytes of an expired entry");
    let b = send(&app, req("s91-ttl", "second")).await;
    assert_eq!(
        (b.0.as_u16(), b.2),
        (201, Bytes::from("run 2: second")),
        "another body after the TTL"
    );
}

// ---------------------------------------------------------------------------------------------
// replay, exactly
// ---------------------------------------------------------------------------------------------

/// Guide: a repeat gets "the stored response (status, headers except connection-level ones such
/// as `Date` and `Content-Length`, body) with `Idempotent-Replayed: true`". Over the wire: a 204
/// replays as a 204 without a body or a length; a response without any header of its own
/// (no `Content-Type`) replays without one; a full one with its headers in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s91_wire_replay_of_204_bare_and_full_responses() {
    let plan = Plan::new(&[(0, Act::NoContent), (0, Act::Bare), (0, Act::Ok)]);
    let addr = serve(app(mem_layer(), &plan)).await;
    let host = addr.to_string();
    for tag in ["nc", "bare", "full"] {
        let key = unique(tag);
        let first = raw(addr, &post_raw("/orders", &host, &key, "b")).await;
        let again = raw(addr, &post_raw("/orders", &host, &key, "b")).await;
        assert_eq!(again.0, first.0, "{tag}");
        assert_eq!(again.2, first.2, "{tag}");
        let strip = |h: &[(String, Vec<u8>)]| -> Vec<(String, Vec<u8>)> {
            h.iter()
                .filter(|(n, _)| {
                    !matches!(
                        n.as_str(),
                        "date" | "content-length" | "connection" | "idempotent-replayed"
                    )
                })
                .cloned()
                .collect()
        };
        assert_eq!(strip(&again.1), strip(&first.1), "{tag}: headers");
        assert_eq!(header(&again.1, "idempotent-replayed"), [b"true"], "{tag}");
        assert!(header(&first.1, "idempotent-replayed").is_empty(), "{tag}");
        assert_eq!(
            header(&again.1, "content-length"),
            header(&first.1, "content-length"),
            "{tag}: content-length as the first answer had it"
        );
        if tag == "nc" {
            assert_eq!(again.0, 204);
            assert!(again.2.is_empty());
            assert!(header(&again.1, "transfer-encoding").is_empty());
            assert!(header(&again.1, "content-length").is_empty());
        }
        if tag == "bare" {
            assert!(header(&again.1, "content-type").is_empty(), "{:?}", again.1);
        }
    }
    assert_eq!(plan.runs(), 3);
}

// ---------------------------------------------------------------------------------------------
// a server restarting onto a new layer over the same Redis, mid-request
// ---------------------------------------------------------------------------------------------

/// Instance A is shut down gracefully while its handler runs; instance B, a new layer over a
/// new connection to the same Redis and prefix, starts meanwhile. Guide: "with a graceful
/// shutdown ... the handler finishes and its response is stored and sent"; "exactly one
/// execution start, across every instance sharing the store". A retry to B while A's handler
/// runs is 409 in flight, A's client gets the response, and B then replays it; one run.
async fn graceful_restart(
    store_a: impl IdempotencyStore + Clone,
    store_b: impl IdempotencyStore + Clone,
) {
    let plan = Plan::new(&[(400, Act::Ok)]);
    let app_a = app(
        IdempotencyLayer::new(store_a, ByCredentials::default()),
        &plan,
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr_a = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server_a = tokio::spawn(async move {
        axum::serve(listener, app_a)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    let key = unique("restart");
    let host_a = addr_a.to_string();
    let k = key.clone();
    let first =
        tokio::spawn(async move { raw(addr_a, &post_raw("/orders", &host_a, &k, "o")).await });
    tokio::time::sleep(ms(100)).await;
    assert_eq!(plan.runs(), 1);
    stop.send(()).unwrap();

    let addr_b = serve(app(
        IdempotencyLayer::new(store_b, ByCredentials::default()),
        &plan,
    ))
    .await;
    let host_b = addr_b.to_string();
    let during = raw(addr_b, &post_raw("/orders", &host_b, &key, "o")).await;
    let dh: HeaderMap = during
        .1
        .iter()
        .map(|(n, v)| {
            (
                http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                http::HeaderValue::from_bytes(v).unwrap(),
            )
        })
        .collect();
    check_problem(
        StatusCode::from_u16(during.0).unwrap(),
        &dh,
        &during.2,
        409,
        problem::IN_FLIGHT,
    );

    let first = first.await.unwrap();
    assert_eq!((first.0, first.2.as_slice()), (201, &b"run 1: o"[..]));
    tokio::time::timeout(Duration::from_secs(5), server_a)
        .await
        .expect("A stops once its handler ended")
        .unwrap();
    let after = raw(addr_b, &post_raw("/orders", &host_b, &key, "o")).await;
    assert_eq!((after.0, after.2.as_slice()), (201, &b"run 1: o"[..]));
    assert_eq!(header(&after.1, "idempotent-replayed"), [b"true"]);
    assert_eq!(header(&after.1, "set-cookie"), [&b"a=1"[..], b"b=2"]);
    assert_eq!(header(&after.1, "location"), [b"/orders/o_1"]);
    assert_eq!(plan.runs(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s91_redis_graceful_restart_onto_a_new_layer_mid_request() {
    let Some(url) = redis_url() else { return };
    let prefix = unique("restart");
    let a = redis_store(&url, &prefix).await;
    let b = redis_store(&url, &prefix).await;
    graceful_restart(a, b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s91_cluster_graceful_restart_onto_a_new_layer_mid_request() {
    let Some(urls) = cluster_urls() else { return };
    let prefix = unique("crestart");
    let a = cluster_store(&urls, &prefix).await;
    let b = cluster_store(&urls, &prefix).await;
    graceful_restart(a, b).await;
}

/// A hard restart: instance A's runtime is dropped mid-handler (the process dies), and a new
/// layer over the same Redis takes its place. Guide ("worker crash"): "with a shared store
/// (Redis), retries get 409 until the lease ends; then the next retry runs the handler".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s91_redis_hard_restart_holds_key_for_lease_then_runs() {
    let Some(url) = redis_url() else { return };
    let prefix = unique("crash");
    let key = unique("crash-key");
    let lease = ms(600);
    let plan = Plan::new(&[(5_000, Act::Ok)]);
    {
        let (url, prefix, key, plan) = (url.clone(), prefix.clone(), key.clone(), plan.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let store = redis_store(&url, &prefix).await;
                let layer = IdempotencyLayer::new(store, ByCredentials::default())
                    .with_lease(lease)
                    .unwrap();
                let app = app(layer, &plan);
                let fut = app.oneshot(req(&key, "o"));
                let _ = tokio::time::timeout(ms(150), fut).await;
            });
            rt.shutdown_background();
        })
        .join()
        .unwrap();
    }
    let crashed_at = tokio::time::Instant::now();
    assert_eq!(plan.runs(), 1);
    let store = redis_store(&url, &prefix).await;
    let layer = IdempotencyLayer::new(store, ByCredentials::default())
        .with_lease(lease)
        .unwrap();
    let plan_b = Plan::default();
    let app_b = app(layer, &plan_b);
    let during = send(&app_b, req(&key, "o")).await;
    check_problem(during.0, &during.1, &during.2, 409, problem::IN_FLIGHT);
    assert!(crashed_at.elapsed() < lease);
    tokio::time::sleep(lease + ms(200)).await;
    let after = send(&app_b, req(&key, "o")).await;
    assert_eq!((after.0.as_u16(), after.2), (201, Bytes::from("run 1: o")));
    assert_eq!(plan_b.runs(), 1);
}

// ---------------------------------------------------------------------------------------------
// a kept service composed with tower's layers
// ---------------------------------------------------------------------------------------------

/// `LoadShed` and `Timeout` outside, tower's global concurrency limit of 1 inside, one kept
/// service driven with `ready().await?.call(req)`. Guide: "the permit that the limit's
/// `poll_ready` took goes with the execution and is returned when the handler ends". The first
/// call times out mid-handler; while its handler runs, a new call is shed (the permit is with
/// the execution); once it ended, the repeat is the stored response and the handler ran once.
#[tokio::test(start_paused = true)]
async fn s91_kept_service_loadshed_timeout_outside_limit_inside() {
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let handler = tower::service_fn(move |req: Request<Body>| {
        let r = r.clone();
        async move {
            let n = r.fetch_add(1, Ordering::SeqCst) + 1;
            let body = req.into_body().collect().await.unwrap().to_bytes();
            tokio::time::sleep(ms(200)).await;
            Ok::<_, Infallible>(
                Response::builder()
                    .status(201)
                    .body(Body::from(format!(
                        "run {n}: {}",
                        String::from_utf8_lossy(&body)
                    )))
                    .unwrap(),
            )
        }
    });
    let mut svc = ServiceBuilder::new()
        .load_shed()
        .timeout(ms(50))
        .layer(mem_layer())
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(1))
        .service(handler);

    let first = svc.ready().await.unwrap().call(req("s91-kept", "o")).await;
    let err = first.expect_err("timed out mid-handler");
    assert!(err.is::<tower::timeout::error::Elapsed>(), "{err}");
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    let shed = svc
        .ready()
        .await
        .unwrap()
        .call(req("s91-kept-2", "o"))
        .await;
    let err = shed.expect_err("the permit is with the running execution");
    assert!(err.is::<tower::load_shed::error::Overloaded>(), "{err}");

    tokio::time::sleep(ms(300)).await;
    let again = svc
        .ready()
        .await
        .unwrap()
        .call(req("s91-kept", "o"))
        .await
        .unwrap();
    let (status, headers, body) = read(again).await;
    assert_eq!((status.as_u16(), body), (201, Bytes::from("run 1: o")));
    assert!(replayed(&headers));
    let other = svc
        .ready()
        .await
        .unwrap()
        .call(req("s91-kept-3", "o"))
        .await;
    // The permit is back: a new key runs (and times out mid-handler again, here).
    assert!(other.unwrap_err().is::<tower::timeout::error::Elapsed>());
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

// ---------------------------------------------------------------------------------------------
// keys and problems, over the wire
// ---------------------------------------------------------------------------------------------

fn post_lines(key_lines: &[&[u8]], body: &str) -> Vec<u8> {
    let mut r = b"POST /orders HTTP/1.1\r\nHost: x\r\nAuthorization: ".to_vec();
    r.extend_from_slice(AUTH.as_bytes());
    r.extend_from_slice(b"\r\n");
    for k in key_lines {
        r.extend_from_slice(b"Idempotency-Key: ");
        r.extend_from_slice(k);
        r.extend_from_slice(b"\r\n");
    }
    r.extend_from_slice(
        format!(
            "Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    r
}

fn to_map(h: &[(String, Vec<u8>)]) -> HeaderMap {
    h.iter()
        .map(|(n, v)| {
            (
                http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                http::HeaderValue::from_bytes(v).unwrap(),
            )
        })
        .collect()
}

/// Guide: "a key that is not 1 to 255 visible ASCII characters ... 400 `…/idempotency-key-
/// invalid`"; "two or more different key headers on one request ... 400". Over the wire: UTF-8
/// and Latin-1 bytes, a tab inside, 256 characters, a line with a key and a line with another;
/// none runs the handler; the handler still runs for a valid key afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s91_wire_hostile_keys_are_400_invalid_problems() {
    let plan = Plan::default();
    let addr = serve(app(mem_layer(), &plan)).await;
    let long = vec![b'k'; 256];
    let cases: Vec<Vec<&[u8]>> = vec![
        vec!["ключ".as_bytes()],
        vec![b"caf\xe9"],
        vec![b"a\tb"],
        vec![&long],
        vec![b"\"\""],
        vec![b"s91-a", b"s91-b"],
        vec![b"s91-a", b"\"s91-b\""],
        vec![b"s91-a, s91-b"],
    ];
    for lines in cases {
        let (status, headers, body) = raw(addr, &post_lines(&lines, "o")).await;
        check_problem(
            StatusCode::from_u16(status).unwrap(),
            &to_map(&headers),
            &body,
            400,
            problem::INVALID_KEY,
        );
    }
    assert_eq!(plan.runs(), 0);
    let (status, _, _) = raw(addr, &post_lines(&[&vec![b'k'; 255]], "o")).await;
    assert_eq!(status, 201);
    let (status, h, _) = raw(addr, &post_lines(&[b"\"kkk\""], "o")).await;
    assert_eq!(status, 201, "a quoted key");
    let (status, h2, _) = raw(addr, &post_lines(&[b"kkk"], "o")).await;
    assert_eq!(status, 201);
    assert!(header(&h, "idempotent-replayed").is_empty());
    assert_eq!(header(&h2, "idempotent-replayed"), [b"true"]);
    assert_eq!(plan.runs(), 2, "bare and quoted are one key");
}

/// Every problem answer of the table, over the wire, read literally: 400 missing, 413, 409 with
/// `Retry-After: 1`, 422, 503 with `Retry-After: 1` (a store full of running requests: "the
/// handler does not run"), 500 too large (and replayed as such).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s91_wire_every_problem_answer_literally() {
    let store = MemoryStore::new(1).unwrap();
    let layer = IdempotencyLayer::new(store, ByCredentials::default())
        .with_require_key(true)
        .with_body_limit(16)
        .with_response_limit(64);
    let plan = Plan::new(&[(0, Act::Ok), (400, Act::Ok), (0, Act::Big(65))]);
    let addr = serve(app(layer, &plan)).await;
    let check = |got: (u16, Vec<(String, Vec<u8>)>, Vec<u8>), want: u16, ty: &str| {
        check_problem(
            StatusCode::from_u16(got.0).unwrap(),
            &to_map(&got.1),
            &got.2,
            want,
            ty,
        );
    };
    check(
        raw(addr, &post_lines(&[], "o")).await,
        400,
        problem::MISSING_KEY,
    );
    check(
        raw(addr, &post_lines(&[b"s91-p0"], "seventeen bytes!!")).await,
        413,
        problem::BODY_TOO_LARGE,
    );
    let at_limit = raw(addr, &post_lines(&[b"s91-p0"], "sixteen bytes!!!")).await;
    let first = tokio::spawn(async move { raw(addr, &post_lines(&[b"s91-p1"], "o")).await });
    tokio::time::sleep(ms(100)).await;
    check(
        raw(addr, &post_lines(&[b"s91-p1"], "o")).await,
        409,
        problem::IN_FLIGHT,
    );
    check(
        raw(addr, &post_lines(&[b"s91-p1"], "p")).await,
        422,
        problem::KEY_REUSED,
    );
    check(
        raw(addr, &post_lines(&[b"s91-p2"], "o")).await,
        503,
        problem::STORE_UNAVAILABLE,
    );
    let first = first.await.unwrap();
    assert_eq!(first.0, 201);
    // `at_limit` ran before (16 bytes is within the limit): the 1-entry store evicted it.
    assert_eq!(at_limit.0, 201);
    let big = raw(addr, &post_lines(&[b"s91-p3"], "o")).await;
    check(big, 500, problem::RESPONSE_TOO_LARGE);
    let big_again = raw(addr, &post_lines(&[b"s91-p3"], "o")).await;
    assert_eq!(header(&big_again.1, "idempotent-replayed"), [b"true"]);
    check(big_again, 500, problem::RESPONSE_TOO_LARGE);
    assert_eq!(plan.runs(), 3, "the 503, 409, 422, 413 and 400 ran nothing");
}

/// Cluster variant of the hard restart: the lock of a dead instance is held for its lease on
/// the cluster too, then a new layer's retry runs the handler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s91_cluster_hard_restart_holds_key_for_lease_then_runs() {
    let Some(urls) = cluster_urls() else { return };
    let prefix = unique("ccrash");
    let key = unique("ccrash-key");
    let lease = ms(600);
    let plan = Plan::new(&[(5_000, Act::Ok)]);
    {
        let (urls, prefix, key, plan) = (urls.clone(), prefix.clone(), key.clone(), plan.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let store = cluster_store(&urls, &prefix).await;
                let layer = IdempotencyLayer::new(store, ByCredentials::default())
                    .with_lease(lease)
                    .unwrap();
                let fut = app(layer, &plan).oneshot(req(&key, "o"));
                let _ = tokio::time::timeout(ms(150), fut).await;
            });
            rt.shutdown_background();
        })
        .join()
        .unwrap();
    }
    let crashed_at = tokio::time::Instant::now();
    let store = cluster_store(&urls, &prefix).await;
    let layer = IdempotencyLayer::new(store, ByCredentials::default())
        .with_lease(lease)
        .unwrap();
    let plan_b = Plan::default();
    let app_b = app(layer, &plan_b);
    let during = send(&app_b, req(&key, "o")).await;
    check_problem(during.0, &during.1, &during.2, 409, problem::IN_FLIGHT);
    assert!(crashed_at.elapsed() < lease);
    tokio::time::sleep(lease + ms(200)).await;
    let after = send(&app_b, req(&key, "o")).await;
    assert_eq!((after.0.as_u16(), after.2), (201, Bytes::from("run 1: o")));
    assert_eq!((plan.runs(), plan_b.runs()), (1, 1));
}

/// A stalled process: the handler blocks the (current-thread) runtime for five leases, so no
/// renewal goes out and the Redis lock's lease runs out with nobody taking it over. Store docs:
/// "`complete` and `renew` also act when the key is free (the lock's lease ran out and nobody
/// took the key over): the execution is still the only one, and its outcome is worth keeping."
/// The retry gets the stored response; the handler ran once.
async fn stalled_handler_outcome_kept<St: IdempotencyStore + Clone>(store: St) {
    let layer = IdempotencyLayer::new(store, ByCredentials::default())
        .with_lease(ms(60))
        .unwrap();
    let plan = Plan::new(&[(0, Act::Stall(300))]);
    let app = app(layer, &plan);
    let key = unique("stall");
    let first = send(&app, req(&key, "o")).await;
    assert_eq!(
        (first.0.as_u16(), first.2.clone()),
        (201, Bytes::from("run 1: o"))
    );
    let again = send(&app, req(&key, "o")).await;
    assert_eq!(
        (again.0.as_u16(), again.2, replayed(&again.1)),
        (201, Bytes::from("run 1: o"), true),
        "the stalled execution's outcome was kept"
    );
    assert_eq!(plan.runs(), 1);
}

#[tokio::test(flavor = "current_thread")]
async fn s91_redis_stalled_past_lease_outcome_is_kept() {
    let Some(url) = redis_url() else { return };
    stalled_handler_outcome_kept(redis_store(&url, &unique("stall")).await).await;
}

#[tokio::test(flavor = "current_thread")]
async fn s91_cluster_stalled_past_lease_outcome_is_kept() {
    let Some(urls) = cluster_urls() else { return };
    stalled_handler_outcome_kept(cluster_store(&urls, &unique("cstall")).await).await;
}

/// Redis: a response lives for the TTL (`with_ttl`), then the key is free, so another body
/// under it runs; before, it is 422.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s91_redis_ttl_frees_key() {
    let Some(url) = redis_url() else { return };
    let store = redis_store(&url, &unique("ttl")).await;
    let layer = IdempotencyLayer::new(store, ByCredentials::default())
        .with_ttl(ms(400))
        .unwrap();
    let plan = Plan::default();
    let app = app(layer, &plan);
    let key = unique("ttl-key");
    assert_eq!(send(&app, req(&key, "a")).await.0, 201);
    let early = send(&app, req(&key, "b")).await;
    check_problem(early.0, &early.1, &early.2, 422, problem::KEY_REUSED);
    tokio::time::sleep(ms(600)).await;
    let late = send(&app, req(&key, "b")).await;
    assert_eq!((late.0.as_u16(), late.2), (201, Bytes::from("run 2: b")));
}

/// Guide: "requests without a key when none is required, pass through untouched": an unkeyed
/// POST whose response body never ends is streamed as it is, not buffered to the response
/// limit and not turned into a 500; nothing is stored.
#[tokio::test(start_paused = true)]
async fn s91_unkeyed_streaming_response_passes_through() {
    let store = MemoryStore::default();
    let layer =
        IdempotencyLayer::new(store.clone(), ByCredentials::default()).with_response_limit(1024);
    let plan = Plan::new(&[(0, Act::Endless)]);
    let app = app(layer, &plan);
    let r = Request::post("/orders")
        .header("authorization", AUTH)
        .body(Body::from("o"))
        .unwrap();
    let resp = app.clone().oneshot(r).await.unwrap();
    assert_eq!(resp.status(), 201);
    assert!(resp.headers().get("idempotent-replayed").is_none());
    let mut body = resp.into_body();
    let mut got = 0;
    while got < 64 * 1024 {
        let frame = body.frame().await.unwrap().unwrap();
        got += frame.into_data().unwrap().len();
    }
    assert_eq!(store.len(), 0);
}

/// Extremes of the settings: `MemoryStore::new(usize::MAX)`, `with_max_bytes(usize::MAX)`,
/// `with_response_limit(usize::MAX)` and `with_body_limit(usize::MAX)` work as any other bound
/// (no allocation up front, no overflow); `with_response_limit(0)` stores an empty response and
/// keeps the 500 marker for a 1-byte one; `with_body_limit(0)` takes an empty body and answers
/// 413 to one byte.
#[tokio::test(start_paused = true)]
async fn s91_limit_extremes() {
    let store = MemoryStore::new(usize::MAX)
        .unwrap()
        .with_max_bytes(usize::MAX)
        .unwrap();
    let plan = Plan::default();
    let huge = app(
        IdempotencyLayer::new(store.clone(), ByCredentials::default())
            .with_response_limit(usize::MAX)
            .with_body_limit(usize::MAX),
        &plan,
    );
    let a = send(&huge, req("s91-max", "o")).await;
    let b = send(&huge, req("s91-max", "o")).await;
    assert_eq!(
        (a.0.as_u16(), b.0.as_u16(), replayed(&b.1)),
        (201, 201, true)
    );
    assert_eq!(a.2, b.2);
    assert_eq!(store.len(), 1);

    let plan0 = Plan::new(&[(0, Act::NoContent), (0, Act::Bare)]);
    let zero = app(
        IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default())
            .with_response_limit(0)
            .with_body_limit(0),
        &plan0,
    );
    let empty = send(&zero, req("s91-z1", "")).await;
    assert_eq!(empty.0, 204);
    let again = send(&zero, req("s91-z1", "")).await;
    assert_eq!((again.0.as_u16(), replayed(&again.1)), (204, true));
    let one = send(&zero, req("s91-z2", "")).await;
    check_problem(one.0, &one.1, &one.2, 500, problem::RESPONSE_TOO_LARGE);
    let too_big = send(&zero, req("s91-z3", "x")).await;
    check_problem(
        too_big.0,
        &too_big.1,
        &too_big.2,
        413,
        problem::BODY_TOO_LARGE,
    );
    assert_eq!(plan0.runs(), 2);
}

/// `with_store_server_errors(true)`: a 500 whose client left mid-handler is stored and replayed
/// ("stores them ... and replayed like any other"); a status past 599 (999) is not a 5xx and is
/// stored by default.
#[tokio::test(start_paused = true)]
async fn s91_stored_server_error_client_gone_and_status_999() {
    let plan = Plan::new(&[(100, Act::Status(500))]);
    let app5 = app(mem_layer().with_store_server_errors(true), &plan);
    let gone = tokio::time::timeout(ms(20), app5.clone().oneshot(req("s91-500", "o"))).await;
    assert!(gone.is_err());
    tokio::time::sleep(ms(200)).await;
    let again = send(&app5, req("s91-500", "o")).await;
    assert_eq!(
        (again.0.as_u16(), again.2, replayed(&again.1)),
        (500, Bytes::from("run 1"), true)
    );
    assert_eq!(plan.runs(), 1);

    let plan9 = Plan::new(&[(0, Act::Status(999))]);
    let app9 = app(mem_layer(), &plan9);
    let a = send(&app9, req("s91-999", "o")).await;
    let b = send(&app9, req("s91-999", "o")).await;
    assert_eq!(
        (a.0.as_u16(), b.0.as_u16(), replayed(&b.1), plan9.runs()),
        (999, 999, true, 1)
    );
}

/// A tower service whose `call` itself panics (before it returns a future), the first time.
/// Guide: "A panic in the handler is caught in its task; the key is released ... before the
/// panic resumes in the request's future"; "a retry, even at once, runs the handler again".
#[tokio::test(start_paused = true)]
async fn s91_service_call_that_panics_synchronously_releases_key() {
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let inner = tower::service_fn(move |_req: Request<Body>| {
        let n = r.fetch_add(1, Ordering::SeqCst) + 1;
        if n == 1 {
            panic!("s91 call panics before its future");
        }
        async move { Ok::<_, Infallible>(Response::new(Body::from(format!("run {n}")))) }
    });
    let svc = ServiceBuilder::new().layer(mem_layer()).service(inner);
    let s = svc.clone();
    let first =
        tokio::spawn(async move { s.oneshot(req("s91-sync", "o")).await.map(|_| ()) }).await;
    assert!(first.unwrap_err().is_panic());
    tokio::time::sleep(ms(1)).await;
    let again = svc.clone().oneshot(req("s91-sync", "o")).await.unwrap();
    let (status, headers, body) = read(again).await;
    assert_eq!(
        (status.as_u16(), body.clone()),
        (200, Bytes::from("run 2")),
        "a retry after the panic: {headers:?} {:?}",
        String::from_utf8_lossy(&body)
    );
}

/// What the handler receives under a key is the request as sent: the connection's extensions
/// (`ConnectInfo`), an extension an outer layer set, the headers and the body. Over the wire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s91_wire_handler_sees_extensions_headers_and_body() {
    #[derive(Clone)]
    struct Tenant(&'static str);
    async fn h(
        axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<SocketAddr>,
        axum::Extension(t): axum::Extension<Tenant>,
        headers: HeaderMap,
        body: Bytes,
    ) -> String {
        format!(
            "{} {} {} {}",
            peer.ip(),
            t.0,
            headers["x-s91"].to_str().unwrap(),
            String::from_utf8_lossy(&body)
        )
    }
    let app = Router::new()
        .route("/orders", post(h))
        .layer(mem_layer())
        .layer(axum::Extension(Tenant("t-91")));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    let mut r = post_lines(&[b"s91-ext"], "payload");
    // Insert a header of our own after the request line.
    let at = r.windows(2).position(|w| w == b"\r\n").unwrap() + 2;
    r.splice(at..at, b"X-S91: hello\r\n".iter().copied());
    let (status, _, body) = raw(addr, &r).await;
    assert_eq!(
        (status, String::from_utf8_lossy(&body).into_owned()),
        (200, "127.0.0.1 t-91 hello payload".to_owned())
    );
}

/// A stalled execution loses its lock and a retry takes the key over. The handler blocks its
/// task (`block_in_place`) for many leases, so its lock is not renewed; a retry after the lease
/// runs the handler (allowed: "then a retry may take the key over and run the handler again").
/// Then: "if a retry took the key over meanwhile, this run's response is not stored and its end
/// does not free the retry's lock (locks are held by a token per execution)". So while the
/// second run goes on after the first ended, a retry is 409, and afterwards the replay is the
/// second run's response.
#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn s91_redis_stalled_execution_is_fenced_after_takeover() {
    let Some(url) = redis_url() else { return };
    let store = redis_store(&url, &unique("fence")).await;
    let layer = IdempotencyLayer::new(store, ByCredentials::default())
        .with_lease(ms(60))
        .unwrap();
    let plan = Plan::new(&[(0, Act::Stall(500)), (600, Act::Ok)]);
    let app = app(layer, &plan);
    let key = unique("fence-key");
    let a = app.clone();
    let k = key.clone();
    let first = tokio::spawn(async move { send(&a, req(&k, "o")).await });
    tokio::time::sleep(ms(250)).await;
    assert_eq!(plan.runs(), 1);
    let b = app.clone();
    let k = key.clone();
    let second = tokio::spawn(async move { send(&b, req(&k, "o")).await });
    let first = first.await.unwrap();
    assert_eq!(
        (first.0.as_u16(), first.2.clone()),
        (201, Bytes::from("run 1: o"))
    );
    assert_eq!(
        plan.runs(),
        2,
        "the retry took the key over after the lease"
    );
    // The first run has ended; the second still runs: its lock holds.
    let during = send(&app, req(&key, "o")).await;
    check_problem(during.0, &during.1, &during.2, 409, problem::IN_FLIGHT);
    let second = second.await.unwrap();
    assert_eq!(
        (second.0.as_u16(), second.2.clone()),
        (201, Bytes::from("run 2: o"))
    );
    let after = send(&app, req(&key, "o")).await;
    assert_eq!(
        (after.0.as_u16(), after.2, replayed(&after.1)),
        (201, Bytes::from("run 2: o"), true)
    );
    assert_eq!(plan.runs(), 2);
}

/// The guide's row "the server shuts down mid-handler: with a graceful shutdown (axum's
/// `with_graceful_shutdown`) the handler finishes and its response is stored and sent", for a
/// handler whose client has already left ("runs to its end, even if its client goes away").
/// The app does what a `main` does: `serve(..).with_graceful_shutdown(..).await`, then (as
/// the guide now says, after this test found the handler cut off) `wait_idle().await` on a
/// clone of the layer, then returns (its runtime is dropped). A new instance over the same
/// Redis then gets the stored response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s91_redis_graceful_shutdown_after_client_left_keeps_outcome() {
    let Some(url) = redis_url() else { return };
    let prefix = unique("gs-left");
    let key = unique("gs-left-key");
    let lease = ms(600);
    let plan = Plan::new(&[(400, Act::Ok)]);
    let (runs_at_return, finished_at_return) = {
        let (url, prefix, key, plan) = (url.clone(), prefix.clone(), key.clone(), plan.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let out = rt.block_on(async {
                let store = redis_store(&url, &prefix).await;
                let layer = IdempotencyLayer::new(store, ByCredentials::default())
                    .with_lease(lease)
                    .unwrap();
                let idle = layer.clone();
                let app = app(layer, &plan);
                let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                let addr = listener.local_addr().unwrap();
                let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
                let server = tokio::spawn(async move {
                    axum::serve(listener, app)
                        .with_graceful_shutdown(async move {
                            let _ = stopped.await;
                        })
                        .await
                        .unwrap();
                });
                // The client leaves mid-handler.
                let host = addr.to_string();
                let gone = tokio::time::timeout(
                    ms(100),
                    raw(addr, &post_raw("/orders", &host, &key, "o")),
                )
                .await;
                assert!(gone.is_err());
                stop.send(()).unwrap();
                tokio::time::timeout(Duration::from_secs(5), server)
                    .await
                    .unwrap()
                    .unwrap();
                // `serve` returned while the left handler still ran.
                assert_eq!(idle.running(), 1);
                tokio::time::timeout(Duration::from_secs(5), idle.wait_idle())
                    .await
                    .unwrap();
                assert_eq!(idle.running(), 0);
                (plan.runs(), plan.finished())
            });
            // `main` returns: the runtime goes.
            drop(rt);
            out
        })
        .join()
        .unwrap()
    };
    // One run, and (below) its outcome stored before the runtime went.
    assert_eq!(runs_at_return, 1);
    let _ = finished_at_return;
    let store = redis_store(&url, &prefix).await;
    let layer = IdempotencyLayer::new(store, ByCredentials::default())
        .with_lease(lease)
        .unwrap();
    let plan_b = Plan::default();
    let app_b = app(layer, &plan_b);
    let during = send(&app_b, req(&key, "o")).await;
    eprintln!(
        "s91 graceful-left: at once after the app returned: {} {:?}",
        during.0,
        String::from_utf8_lossy(&during.2)
    );
    // Past the first handler's 400 ms and past its lease.
    tokio::time::sleep(lease + ms(300)).await;
    let after = send(&app_b, req(&key, "o")).await;
    assert_eq!(
        (
            after.0.as_u16(),
            after.2.clone(),
            replayed(&after.1),
            plan_b.runs()
        ),
        (201, Bytes::from("run 1: o"), true, 0),
        "the left handler's outcome after a graceful shutdown: {:?}",
        String::from_utf8_lossy(&after.2)
    );
}

/// Redis key layout (sturdy-redis rustdoc): "Each key is one Redis string:
/// `i:<fingerprint>:<lock token>:<call>` while its request runs, then `d:<fingerprint>:<response
/// as JSON>` ... fingerprint, token and call in hex. The Redis key is the prefix, a hash of the
/// client's scope and the idempotency key". Its time to live is the lease while it runs and the
/// TTL after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s91_redis_key_layout_and_expiry_as_documented() {
    let Some(url) = redis_url() else { return };
    let prefix = unique("layout");
    let store = redis_store(&url, &prefix).await;
    let layer = IdempotencyLayer::new(store, ByCredentials::default())
        .with_lease(Duration::from_secs(20))
        .unwrap()
        .with_ttl(Duration::from_secs(3600))
        .unwrap();
    let plan = Plan::new(&[(400, Act::Ok)]);
    let app = app(layer, &plan);
    let a = app.clone();
    let first = tokio::spawn(async move { send(&a, req("s91-layout:{k}", "o")).await });
    tokio::time::sleep(ms(150)).await;
    let keys = match resp(&url, &[b"KEYS", format!("{prefix}:*").as_bytes()]).await {
        Resp::Array(items) => items
            .into_iter()
            .map(|i| match i {
                Resp::Bulk(Some(b)) => String::from_utf8(b).unwrap(),
                other => panic!("{other:?}"),
            })
            .collect::<Vec<_>>(),
        other => panic!("{other:?}"),
    };
    assert_eq!(keys.len(), 1, "{keys:?}");
    let rkey = &keys[0];
    let rest = rkey.strip_prefix(&format!("{prefix}:")).unwrap();
    let (hash, idem) = rest.split_once(':').unwrap();
    assert_eq!(idem, "s91-layout:{k}");
    assert!(
        hash.bytes().all(|b| b.is_ascii_hexdigit()) && hash.len() >= 32,
        "{hash}"
    );
    assert!(!rkey.contains("s91-client"), "no credential in the key");
    let running = resp(&url, &[b"GET", rkey.as_bytes()]).await.bulk();
    let running = String::from_utf8(running).unwrap();
    let parts: Vec<&str> = running.split(':').collect();
    assert_eq!(parts.len(), 4, "{running}");
    assert_eq!(parts[0], "i");
    assert_eq!(parts[1].len(), 64);
    assert_eq!(parts[2].len(), 32);
    assert!(parts[1..]
        .iter()
        .all(|p| p.bytes().all(|b| b.is_ascii_hexdigit())));
    let pttl = resp(&url, &[b"PTTL", rkey.as_bytes()]).await.int();
    assert!(pttl > 10_000 && pttl <= 20_000, "lease PTTL {pttl}");

    let first = first.await.unwrap();
    assert_eq!(first.0, 201);
    let done = resp(&url, &[b"GET", rkey.as_bytes()]).await.bulk();
    assert_eq!(&done[..2], b"d:");
    assert_eq!(&done[2..66], parts[1].as_bytes(), "the same fingerprint");
    assert_eq!(done[66], b':');
    let stored = sturdy::idempotency::server::StoredResponse::from_json(&done[67..])
        .expect("the response as StoredResponse JSON");
    assert_eq!(stored.status, 201);
    assert_eq!(stored.body, Bytes::from("run 1: o"));
    let pttl = resp(&url, &[b"PTTL", rkey.as_bytes()]).await.int();
    assert!(pttl > 3_500_000 && pttl <= 3_600_000, "TTL PTTL {pttl}");
}

/// A Redis reply, as far as these tests read them.
#[derive(Debug)]
enum Resp {
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Self>),
    Other(#[allow(dead_code)] Vec<u8>),
}

impl Resp {
    fn bulk(self) -> Vec<u8> {
        match self {
            Self::Bulk(Some(b)) => b,
            other => panic!("not a bulk string: {other:?}"),
        }
    }
    fn int(self) -> i64 {
        match self {
            Self::Int(i) => i,
            other => panic!("not an integer: {other:?}"),
        }
    }
}

fn parse_resp(buf: &[u8], at: &mut usize) -> Option<Resp> {
    let end = *at + buf[*at..].windows(2).position(|w| w == b"\r\n")?;
    let line = &buf[*at + 1..end];
    let kind = buf[*at];
    *at = end + 2;
    let n = || std::str::from_utf8(line).unwrap().parse::<i64>().unwrap();
    Some(match kind {
        b':' => Resp::Int(n()),
        b'$' => {
            let len = n();
            if len < 0 {
                Resp::Bulk(None)
            } else {
                let len = len as usize;
                if buf.len() < *at + len + 2 {
                    return None;
                }
                let b = buf[*at..*at + len].to_vec();
                *at += len + 2;
                Resp::Bulk(Some(b))
            }
        }
        b'*' => {
            let mut items = Vec::new();
            for _ in 0..n().max(0) {
                items.push(parse_resp(buf, at)?);
            }
            Resp::Array(items)
        }
        _ => Resp::Other(line.to_vec()),
    })
}

/// One command to the standalone Redis at `url`, on a connection of its own.
async fn resp(url: &str, args: &[&[u8]]) -> Resp {
    let hostport = url
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_owned();
    let mut s = TcpStream::connect(hostport).await.unwrap();
    let mut cmd = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        cmd.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        cmd.extend_from_slice(a);
        cmd.extend_from_slice(b"\r\n");
    }
    s.write_all(&cmd).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 65536];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut chunk))
            .await
            .expect("Redis answers")
            .unwrap();
        assert!(n > 0, "Redis closed");
        buf.extend_from_slice(&chunk[..n]);
        let mut at = 0;
        if let Some(r) = parse_resp(&buf, &mut at) {
            return r;
        }
    }
}

/// `MemoryStore` on paused time, through the public store trait and the layer: a lock nobody
/// renews (a crashed execution's) fills a one-entry store, so a new key is 503 ("a store full of
/// running requests answers a new key with 503"; "the handler does not run"); at the end of its
/// lease it expires ("a lock at the end of its lease"), takes no slot and no bytes, and the new
/// key runs. A lock is never refused for bytes: a one-byte bound still takes a 255-byte key's
/// lock; a response larger than the whole bound is not stored (`StoreFull`).
#[tokio::test(start_paused = true)]
async fn s91_memory_unrenewed_lock_fills_then_frees_the_store() {
    use sturdy::idempotency::server::{Begin, LockToken, StoredResponse};
    let store = MemoryStore::new(1).unwrap();
    let fp = [7u8; 32];
    let token = LockToken::random();
    let began = store
        .begin("s91-crashed", fp, token, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(matches!(began, Begin::Started));
    assert_eq!(store.len(), 1);

    let plan = Plan::default();
    let app = app(
        IdempotencyLayer::new(store.clone(), ByCredentials::default()),
        &plan,
    );
    let full = send(&app, req("s91-new", "o")).await;
    check_problem(full.0, &full.1, &full.2, 503, problem::STORE_UNAVAILABLE);
    assert_eq!(plan.runs(), 0);

    tokio::time::advance(Duration::from_secs(30) - ms(1)).await;
    assert_eq!(store.len(), 1, "still within the lease");
    tokio::time::advance(ms(2)).await;
    assert_eq!((store.len(), store.heap_bytes()), (0, 0), "expired lock");
    let ok = send(&app, req("s91-new", "o")).await;
    assert_eq!((ok.0.as_u16(), ok.2), (201, Bytes::from("run 1: o")));

    let tiny = MemoryStore::default().with_max_bytes(1).unwrap();
    let key = "k".repeat(255);
    let t2 = LockToken::random();
    let began = tiny.begin(&key, fp, t2, ms(100)).await.unwrap();
    assert!(
        matches!(began, Begin::Started),
        "a lock is never refused for bytes"
    );
    let response = StoredResponse {
        status: 201,
        headers: vec![],
        body: Bytes::from(vec![b'x'; 64]),
    };
    let stored = tiny
        .complete(&key, fp, t2, response, Duration::from_secs(60))
        .await;
    let err = stored.expect_err("larger than the whole bound");
    assert!(err.is::<sturdy::idempotency::server::StoreFull>(), "{err}");
}

/// Credentials whose bytes are not UTF-8 (obs-text, which HTTP allows in a field value) are
/// distinct credentials: "two requests share a key space only when all of them are equal". No
/// two of these clients may get each other's stored response under one key: `Bearer \x80`,
/// `Bearer \x81`, `Bearer \xff`, the UTF-8 of U+FFFD (what a lossy reading makes of each), the
/// same in `X-API-Key`, and named cookies (`with_cookies`) whose values differ only there.
#[tokio::test(start_paused = true)]
async fn s91_non_utf8_credentials_are_distinct_scopes() {
    use http::HeaderValue;
    for (scope, header) in [
        (ByCredentials::default(), "authorization"),
        (ByCredentials::default(), "x-api-key"),
        (ByCredentials::default(), "cookie"),
        (
            ByCredentials::default().with_cookies(["session_id"]),
            "cookie",
        ),
    ] {
        let plan = Plan::default();
        let app = app(IdempotencyLayer::new(MemoryStore::default(), scope), &plan);
        let values: Vec<Vec<u8>> = if header == "cookie" {
            vec![
                b"session_id=\x80".to_vec(),
                b"session_id=\x81".to_vec(),
                b"session_id=\xff".to_vec(),
                "session_id=\u{FFFD}".as_bytes().to_vec(),
                b"session_id=?".to_vec(),
            ]
        } else {
            vec![
                b"Bearer \x80".to_vec(),
                b"Bearer \x81".to_vec(),
                b"Bearer \xff".to_vec(),
                "Bearer \u{FFFD}".as_bytes().to_vec(),
                b"Bearer ?".to_vec(),
            ]
        };
        for (i, v) in values.iter().enumerate() {
            let r = Request::post("/orders")
                .header(header, HeaderValue::from_bytes(v).unwrap())
                .header("idempotency-key", "s91-bytes")
                .body(Body::from("same"))
                .unwrap();
            let got = send(&app, r).await;
            assert_eq!(
                (got.0.as_u16(), replayed(&got.1)),
                (201, false),
                "{header} value #{i} {:?} got another client's response {:?}",
                String::from_utf8_lossy(v),
                String::from_utf8_lossy(&got.2)
            );
        }
        assert_eq!(plan.runs(), values.len(), "{header}");
    }
}

/// A key header folded over two lines (obs-fold, `Idempotency-Key: s91-a` then a line starting
/// with a space) is never a valid key: whoever refuses it (hyper, or the layer's 400
/// `…/idempotency-key-invalid`), it is a 400 and the handler does not run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s91_wire_folded_key_header_is_refused() {
    let plan = Plan::default();
    let addr = serve(app(mem_layer(), &plan)).await;
    let (status, headers, body) = raw(addr, &post_lines(&[b"s91-a\r\n s91-b"], "o")).await;
    assert_eq!(status, 400, "{:?}", String::from_utf8_lossy(&body));
    if !body.is_empty() {
        check_problem(
            StatusCode::BAD_REQUEST,
            &to_map(&headers),
            &body,
            400,
            problem::INVALID_KEY,
        );
    }
    assert_eq!(plan.runs(), 0);
}

/// A tower service (not axum) behind `BoxCloneService`, whose future fails (`Err`) after its
/// client left: "A handler that panics, fails (`Err`), or answers a status that is not stored
/// releases its key", also when nobody waits for the answer: a retry after it ended runs again.
#[tokio::test(start_paused = true)]
async fn s91_service_err_after_client_left_releases_key() {
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let inner = tower::service_fn(move |_req: Request<Body>| {
        let n = r.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            tokio::time::sleep(ms(100)).await;
            if n == 1 {
                Err::<Response<Body>, tower::BoxError>("s91 inner failure".into())
            } else {
                Ok(Response::new(Body::from(format!("run {n}"))))
            }
        }
    });
    let svc =
        tower::util::BoxCloneService::new(ServiceBuilder::new().layer(mem_layer()).service(inner));
    let gone = tokio::time::timeout(ms(20), svc.clone().oneshot(req("s91-err", "o"))).await;
    assert!(gone.is_err());
    let during = read(svc.clone().oneshot(req("s91-err", "o")).await.unwrap()).await;
    check_problem(during.0, &during.1, &during.2, 409, problem::IN_FLIGHT);
    tokio::time::sleep(ms(200)).await;
    let (status, headers, body) =
        read(svc.clone().oneshot(req("s91-err", "o")).await.unwrap()).await;
    assert_eq!(
        (status.as_u16(), body, replayed(&headers)),
        (200, Bytes::from("run 2"), false)
    );
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// `with_response_limit`: "The largest response body stored": it bounds the body, not the
/// headers. A response with 8 KiB of headers and a 4-byte body under a 16-byte limit is stored
/// and replayed whole; a 17-byte body is the 500 marker.
#[tokio::test(start_paused = true)]
async fn s91_response_limit_counts_the_body_only() {
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let inner = tower::service_fn(move |req: Request<Body>| {
        r.fetch_add(1, Ordering::SeqCst);
        let big = req.headers().contains_key("x-big-body");
        async move {
            let body = if big {
                "x".repeat(17)
            } else {
                "tiny".to_owned()
            };
            Ok::<_, Infallible>(
                Response::builder()
                    .status(201)
                    .header("x-large", "h".repeat(8 * 1024))
                    .body(Body::from(body))
                    .unwrap(),
            )
        }
    });
    let svc = ServiceBuilder::new()
        .layer(mem_layer().with_response_limit(16))
        .service(inner);
    let first = read(svc.clone().oneshot(req("s91-rl", "o")).await.unwrap()).await;
    let again = read(svc.clone().oneshot(req("s91-rl", "o")).await.unwrap()).await;
    assert_eq!(
        (first.0.as_u16(), first.2.clone()),
        (201, Bytes::from("tiny"))
    );
    assert_eq!(
        (again.0.as_u16(), again.2, replayed(&again.1)),
        (201, Bytes::from("tiny"), true)
    );
    assert_eq!(again.1["x-large"].len(), 8 * 1024);
    let mut r = req("s91-rl2", "o");
    r.headers_mut()
        .insert("x-big-body", http::HeaderValue::from_static("1"));
    let over = read(svc.clone().oneshot(r).await.unwrap()).await;
    check_problem(over.0, &over.1, &over.2, 500, problem::RESPONSE_TOO_LARGE);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}
