//! docs/guides/idempotency.md, the server layer over a real axum server on 127.0.0.1:0: clients
//! that leave mid-handler, concurrent duplicates with the same and different bodies, keys
//! reused for another request, keys at and past 255 characters and outside visible ASCII,
//! multi-MiB responses replayed byte for byte, replays after the TTL, tower's
//! `ConcurrencyLimit(1)` and `LoadShed` inside the layer, in memory and on Redis.
#![cfg(feature = "full")]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use axum::body::Body;
use axum::error_handling::HandleErrorLayer;
use axum::extract::State;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use sturdy::idempotency::server::{
    problem, ByCredentials, IdempotencyLayer, IdempotencyStore, MemoryStore,
};
use sturdy::redis::RedisIdempotencyStore;
use tower::ServiceBuilder;

use crate::mix32_util::{redis_url, unique, within};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Clone, Default)]
struct Counter {
    runs: Arc<AtomicUsize>,
    done: Arc<AtomicUsize>,
    running: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
    /// (key, start, end) of each run.
    spans: Arc<Mutex<Vec<(String, Instant, Instant)>>>,
}

#[derive(Clone)]
struct S {
    c: Counter,
    delay: Duration,
    /// Bytes of the response body (0: a short text).
    size: usize,
}

/// Seeded bytes covering every byte value.
fn noise(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

async fn order(State(s): State<S>, headers: HeaderMap, body: Bytes) -> Response<Body> {
    let start = Instant::now();
    let n = s.c.runs.fetch_add(1, Ordering::SeqCst) + 1;
    let now = s.c.running.fetch_add(1, Ordering::SeqCst) + 1;
    s.c.peak.fetch_max(now, Ordering::SeqCst);
    tokio::time::sleep(s.delay).await;
    s.c.running.fetch_sub(1, Ordering::SeqCst);
    let key = headers
        .get("idempotency-key")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    s.c.spans.lock().unwrap().push((key, start, Instant::now()));
    s.c.done.fetch_add(1, Ordering::SeqCst);
    let out = if s.size == 0 {
        let mut v = format!("order {n}: ").into_bytes();
        v.extend_from_slice(&body);
        v
    } else {
        noise(s.size)
    };
    Response::builder()
        .status(StatusCode::CREATED)
        .header("x-order-id", format!("o_{n}"))
        .header("x-multi", "first")
        .header("x-multi", "second")
        .header("set-cookie", "a=1")
        .header("set-cookie", "b=2")
        .header("content-type", "application/octet-stream")
        .body(Body::from(out))
        .unwrap()
}

fn mem_layer() -> IdempotencyLayer<MemoryStore> {
    IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default())
}

fn app<St: IdempotencyStore + Clone>(
    l: IdempotencyLayer<St>,
    delay: Duration,
    size: usize,
) -> (Router, Counter) {
    let c = Counter::default();
    let app = Router::new()
        .route("/orders", post(order).patch(order))
        .route("/other", post(order))
        .layer(l)
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(S {
            c: c.clone(),
            delay,
            size,
        });
    (app, c)
}

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

fn client() -> HyperClient<HttpConnector, Full<Bytes>> {
    HyperClient::builder(TokioExecutor::new()).build_http()
}

#[derive(Debug)]
struct Got {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Got {
    fn problem_type(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v["type"].as_str().map(str::to_owned))
            .unwrap_or_default()
    }
    fn replayed(&self) -> bool {
        self.headers
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true")
    }
}

async fn call_raw(
    addr: SocketAddr,
    method: Method,
    path: &str,
    key: Option<HeaderValue>,
    body: impl Into<Bytes>,
) -> Got {
    let mut b = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    if let Some(k) = key {
        b = b.header("idempotency-key", k);
    }
    let req = b.body(Full::new(body.into())).unwrap();
    let res = within(30, client().request(req)).await.unwrap();
    let (parts, body) = res.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Got {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

async fn call(addr: SocketAddr, method: Method, path: &str, key: &str, body: &str) -> Got {
    call_raw(
        addr,
        method,
        path,
        Some(HeaderValue::from_str(key).unwrap()),
        body.to_owned(),
    )
    .await
}

async fn wait_done(c: &Counter, n: usize) {
    within(20, async {
        while c.done.load(Ordering::SeqCst) < n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

fn assert_in_flight(g: &Got) {
    assert_eq!(g.status, StatusCode::CONFLICT, "{g:?}");
    assert_eq!(g.headers["retry-after"], "1");
    assert_eq!(g.problem_type(), problem::IN_FLIGHT);
}

/// idempotency.md: "client timeout mid-handler: the handler runs to its end in its own task;
/// its response is stored ... a retry with the same key gets 409 in flight (`Retry-After: 1`)
/// while the handler runs, then the stored response with `Idempotent-Replayed: true`; the
/// handler ran once." The client here hangs up its TCP connection.
#[tokio::test]
async fn mix32_idem_client_hangs_up_mid_handler_runs_once_then_replays() {
    let (app, c) = app(mem_layer(), Duration::from_millis(600), 0);
    let addr = serve(app).await;
    let req = Request::post(format!("http://{addr}/orders"))
        .header("idempotency-key", "hangup-1")
        .body(Full::new(Bytes::from_static(b"card")))
        .unwrap();
    let cut = tokio::time::timeout(Duration::from_millis(100), client().request(req)).await;
    assert!(cut.is_err(), "the client left before the answer");
    within(10, async {
        while c.runs.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let second = call(addr, Method::POST, "/orders", "hangup-1", "card").await;
    assert_in_flight(&second);
    wait_done(&c, 1).await;
    let third = call(addr, Method::POST, "/orders", "hangup-1", "card").await;
    assert_eq!(third.status, StatusCode::CREATED);
    assert!(third.replayed());
    assert_eq!(&third.body[..], b"order 1: card");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(c.runs.load(Ordering::SeqCst), 1);
}

/// "duplicate concurrent request (same client, same key, same payload): ... exactly one
/// execution start"; "the others get 409 ... with `Retry-After: 1`".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mix32_idem_sixteen_concurrent_duplicates_run_once() {
    let (app, c) = app(mem_layer(), Duration::from_millis(500), 0);
    let addr = serve(app).await;
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            tokio::spawn(async move { call(addr, Method::POST, "/orders", "dup", "same").await })
        })
        .collect();
    let mut fresh = 0;
    for t in tasks {
        let g = t.await.unwrap();
        match g.status {
            StatusCode::CREATED if !g.replayed() => fresh += 1,
            StatusCode::CREATED => assert_eq!(&g.body[..], b"order 1: same"),
            _ => assert_in_flight(&g),
        }
    }
    assert_eq!(fresh, 1);
    wait_done(&c, 1).await;
    assert_eq!(c.runs.load(Ordering::SeqCst), 1);
    let again = call(addr, Method::POST, "/orders", "dup", "same").await;
    assert!(again.replayed());
}

/// Same key, different bodies, at once: one execution; the others 409 (in flight) or 422
/// (reused), never a second run or another body's response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mix32_idem_concurrent_same_key_different_bodies_run_once() {
    let (app, c) = app(mem_layer(), Duration::from_millis(500), 0);
    let addr = serve(app).await;
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            tokio::spawn(async move {
                let body = format!("body-{i}");
                (
                    body.clone(),
                    call(addr, Method::POST, "/orders", "dup-diff", &body).await,
                )
            })
        })
        .collect();
    let mut winner = None;
    for t in tasks {
        let (body, g) = t.await.unwrap();
        match g.status {
            StatusCode::CREATED => {
                assert!(winner.is_none(), "two bodies got 201");
                assert_eq!(g.body, format!("order 1: {body}").into_bytes());
                winner = Some(body);
            }
            StatusCode::CONFLICT => assert_in_flight(&g),
            StatusCode::UNPROCESSABLE_ENTITY => assert_eq!(g.problem_type(), problem::KEY_REUSED),
            other => panic!("{other}: {g:?}"),
        }
    }
    let winner = winner.expect("one ran");
    wait_done(&c, 1).await;
    for i in 0..8 {
        let body = format!("body-{i}");
        let g = call(addr, Method::POST, "/orders", "dup-diff", &body).await;
        if body == winner {
            assert!(g.replayed());
        } else {
            assert_eq!(g.status, StatusCode::UNPROCESSABLE_ENTITY, "{g:?}");
            assert_eq!(g.problem_type(), problem::KEY_REUSED);
        }
    }
    assert_eq!(c.runs.load(Ordering::SeqCst), 1);
}

/// "same key, another method, path, query or body: 422"; query byte for byte.
#[tokio::test]
async fn mix32_idem_key_reused_for_another_request_is_422() {
    let (app, c) = app(mem_layer(), Duration::ZERO, 0);
    let addr = serve(app).await;
    let first = call(addr, Method::POST, "/orders?a=1&b=2", "reuse", "x").await;
    assert_eq!(first.status, StatusCode::CREATED);
    for (m, p, b) in [
        (Method::PATCH, "/orders?a=1&b=2", "x"),
        (Method::POST, "/other?a=1&b=2", "x"),
        (Method::POST, "/orders?b=2&a=1", "x"),
        (Method::POST, "/orders", "x"),
        (Method::POST, "/orders?a=1&b=2", "y"),
        (Method::POST, "/orders?a=1&b=2", ""),
    ] {
        let g = call(addr, m.clone(), p, "reuse", b).await;
        assert_eq!(g.status, StatusCode::UNPROCESSABLE_ENTITY, "{m} {p} {b:?}");
        assert_eq!(g.problem_type(), problem::KEY_REUSED);
    }
    let same = call(addr, Method::POST, "/orders?a=1&b=2", "reuse", "x").await;
    assert!(same.replayed());
    assert_eq!(c.runs.load(Ordering::SeqCst), 1);
}

/// "a key that is not 1 to 255 visible ASCII characters: 400 `…/idempotency-key-invalid`".
#[tokio::test]
async fn mix32_idem_keys_at_and_past_the_bounds() {
    let (app, c) = app(mem_layer(), Duration::ZERO, 0);
    let addr = serve(app).await;
    // 255 characters, every visible ASCII character among them (quotes and commas too).
    let visible: String = (0x21u8..=0x7e).map(char::from).collect();
    let k255: String = visible.chars().cycle().take(255).collect();
    for k in [k255.as_str(), "a,b", "\"q\"", "x"] {
        let g = call(addr, Method::POST, "/orders", k, k).await;
        assert_eq!(g.status, StatusCode::CREATED, "{k:?}: {g:?}");
        let again = call(addr, Method::POST, "/orders", k, k).await;
        assert!(again.replayed(), "{k:?}: {again:?}");
    }
    let ran = c.runs.load(Ordering::SeqCst);
    assert_eq!(ran, 4);
    let k256: String = visible.chars().cycle().take(256).collect();
    let bad: Vec<HeaderValue> = vec![
        HeaderValue::from_str(&k256).unwrap(),
        HeaderValue::from_str(&"k".repeat(8000)).unwrap(),
        HeaderValue::from_static(""),
        HeaderValue::from_static("a b"),
        HeaderValue::from_static("a\tb"),
        HeaderValue::from_bytes("ключ".as_bytes()).unwrap(),
        HeaderValue::from_bytes(b"k\x80\xff").unwrap(),
    ];
    for k in bad {
        let g = call_raw(addr, Method::POST, "/orders", Some(k.clone()), "z").await;
        assert_eq!(g.status, StatusCode::BAD_REQUEST, "{k:?}: {g:?}");
        assert_eq!(g.problem_type(), problem::INVALID_KEY, "{k:?}");
    }
    assert_eq!(
        c.runs.load(Ordering::SeqCst),
        ran,
        "no invalid key ran the handler"
    );
}

async fn replay_byte_exact<St: IdempotencyStore + Clone>(l: IdempotencyLayer<St>, size: usize) {
    let (app, c) = app(l, Duration::ZERO, size);
    let addr = serve(app).await;
    let key = format!("big-{size}-{}", unique("k").replace(':', "-"));
    let first = call(addr, Method::POST, "/orders", &key, "b").await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.body.len(), size);
    let again = call(addr, Method::POST, "/orders", &key, "b").await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert!(again.replayed());
    assert!(
        again.body == first.body,
        "replayed body differs ({} bytes)",
        again.body.len()
    );
    for h in ["x-order-id", "content-type"] {
        assert_eq!(again.headers.get(h), first.headers.get(h), "{h}");
    }
    for h in ["x-multi", "set-cookie"] {
        let a: Vec<_> = first.headers.get_all(h).iter().collect();
        let b: Vec<_> = again.headers.get_all(h).iter().collect();
        assert_eq!(a, b, "{h}");
        assert_eq!(a.len(), 2);
    }
    assert_eq!(c.runs.load(Ordering::SeqCst), 1);
}

/// "the stored response (status, headers except connection-level ones ..., body)": 1 MiB
/// exactly (the default bound, "at most 1 MiB"), and 5 MiB under an 8 MiB bound.
#[tokio::test]
async fn mix32_idem_large_responses_replayed_byte_exact_in_memory() {
    replay_byte_exact(mem_layer(), 1024 * 1024).await;
    replay_byte_exact(mem_layer().with_response_limit(8 << 20), 5 << 20).await;
}

/// "response over the response limit (1 MiB): the handler ran; a 500 marker is stored in its
/// place ... also on every retry; the handler is not run again."
#[tokio::test]
async fn mix32_idem_response_one_byte_over_the_limit() {
    let (app, c) = app(mem_layer(), Duration::ZERO, 1024 * 1024 + 1);
    let addr = serve(app).await;
    let first = call(addr, Method::POST, "/orders", "over", "b").await;
    assert!(
        first.status == StatusCode::INTERNAL_SERVER_ERROR
            || (first.status == StatusCode::CREATED && first.body.len() == 1024 * 1024 + 1),
        "{:?}",
        first.status
    );
    for _ in 0..2 {
        let g = call(addr, Method::POST, "/orders", "over", "b").await;
        assert_eq!(g.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(g.problem_type(), problem::RESPONSE_TOO_LARGE);
    }
    assert_eq!(c.runs.load(Ordering::SeqCst), 1);
}

async fn ttl_expiry<St: IdempotencyStore + Clone>(l: IdempotencyLayer<St>) {
    let l = l.with_ttl(Duration::from_millis(300)).unwrap();
    let (app, c) = app(l, Duration::ZERO, 0);
    let addr = serve(app).await;
    let key = unique("ttl").replace(':', "-");
    let first = call(addr, Method::POST, "/orders", &key, "t").await;
    assert_eq!(first.status, StatusCode::CREATED);
    let again = call(addr, Method::POST, "/orders", &key, "t").await;
    assert!(again.replayed());
    // A TTL, not a backoff: the stored response must be gone after it.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let late = call(addr, Method::POST, "/orders", &key, "t").await;
    assert_eq!(late.status, StatusCode::CREATED);
    assert!(!late.replayed(), "replayed after its TTL");
    assert_eq!(&late.body[..], b"order 2: t");
    assert_eq!(c.runs.load(Ordering::SeqCst), 2);
}

/// "Entries expire: ... a response after its TTL": a repeat after `with_ttl` runs anew.
#[tokio::test]
async fn mix32_idem_ttl_expiry_in_memory() {
    ttl_expiry(mem_layer()).await;
}

async fn redis_layer() -> Option<IdempotencyLayer<RedisIdempotencyStore>> {
    let url = redis_url()?;
    let store = RedisIdempotencyStore::connect(&url)
        .await
        .unwrap()
        .with_prefix(unique("idem"));
    Some(IdempotencyLayer::new(store, ByCredentials::default()))
}

#[tokio::test]
async fn mix32_idem_ttl_expiry_on_redis() {
    let Some(l) = redis_layer().await else { return };
    ttl_expiry(l).await;
}

#[tokio::test]
async fn mix32_idem_large_responses_replayed_byte_exact_on_redis() {
    let Some(l) = redis_layer().await else { return };
    replay_byte_exact(l, 1024 * 1024).await;
    let Some(l) = redis_layer().await else { return };
    replay_byte_exact(l.with_response_limit(8 << 20), 5 << 20).await;
}

/// "exactly one execution start, across every instance sharing the store": two axum servers
/// on one Redis prefix, 12 duplicates split between them, and a client that hangs up on one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mix32_idem_two_instances_on_redis_run_a_key_once() {
    let Some(url) = redis_url() else { return };
    let prefix = unique("two");
    let mk = || async {
        IdempotencyLayer::new(
            RedisIdempotencyStore::connect(&url)
                .await
                .unwrap()
                .with_prefix(prefix.clone()),
            ByCredentials::default(),
        )
    };
    let (a, ca) = app(mk().await, Duration::from_millis(500), 0);
    let (b, cb) = app(mk().await, Duration::from_millis(500), 0);
    let (a, b) = (serve(a).await, serve(b).await);
    // The first client hangs up on instance a.
    let req = Request::post(format!("http://{a}/orders"))
        .header("idempotency-key", "shared")
        .body(Full::new(Bytes::from_static(b"p")))
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(100), client().request(req))
            .await
            .is_err()
    );
    let tasks: Vec<_> = (0..12)
        .map(|i| {
            let addr = if i % 2 == 0 { a } else { b };
            tokio::spawn(async move { call(addr, Method::POST, "/orders", "shared", "p").await })
        })
        .collect();
    for t in tasks {
        let g = t.await.unwrap();
        if g.status == StatusCode::CREATED {
            assert!(g.replayed(), "{g:?}");
        } else {
            assert_in_flight(&g);
        }
    }
    wait_done(&ca, 1).await;
    for addr in [a, b] {
        let g = call(addr, Method::POST, "/orders", "shared", "p").await;
        assert!(g.replayed(), "{g:?}");
        assert_eq!(&g.body[..], b"order 1: p");
    }
    assert_eq!(
        ca.runs.load(Ordering::SeqCst) + cb.runs.load(Ordering::SeqCst),
        1
    );
}

/// idempotency.md: "to bound the handlers that run, including those [whose client left], put
/// the limit inside this layer (in axum, `.layer(ConcurrencyLimitLayer::new(n))` before
/// `.layer(idempotency)`): the permit ... goes with the execution and is returned when the
/// handler ends."
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mix32_idem_concurrency_limit_inside_counts_a_handler_whose_client_left() {
    let c = Counter::default();
    let app = Router::new()
        .route("/orders", post(order))
        .layer(tower::limit::ConcurrencyLimitLayer::new(1))
        .layer(mem_layer())
        .with_state(S {
            c: c.clone(),
            delay: Duration::from_millis(500),
            size: 0,
        });
    let addr = serve(app).await;
    let req = Request::post(format!("http://{addr}/orders"))
        .header("idempotency-key", "cl-a")
        .body(Full::new(Bytes::from_static(b"a")))
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(100), client().request(req))
            .await
            .is_err()
    );
    let b = call(addr, Method::POST, "/orders", "cl-b", "b").await;
    assert_eq!(b.status, StatusCode::CREATED, "{b:?}");
    wait_done(&c, 2).await;
    assert_eq!(c.peak.load(Ordering::SeqCst), 1, "two handlers ran at once");
    let spans = c.spans.lock().unwrap().clone();
    let a = spans.iter().find(|s| s.0 == "cl-a").unwrap();
    let b = spans.iter().find(|s| s.0 == "cl-b").unwrap();
    assert!(b.1 >= a.2, "b started before a ended");
    assert_eq!(c.runs.load(Ordering::SeqCst), 2);
}

/// `LoadShed` over `ConcurrencyLimit(1)` inside the layer: a shed request is a 503, which is
/// "not stored, so a retry runs the handler again"; its key is released at once (a retry while
/// the other request still runs is shed again, not a 409), and a later retry runs it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mix32_idem_load_shed_inside_releases_the_key() {
    let c = Counter::default();
    let shed = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(|_: BoxError| async {
            StatusCode::SERVICE_UNAVAILABLE
        }))
        .load_shed()
        .concurrency_limit(1);
    let app = Router::new()
        .route("/orders", post(order))
        .layer(shed)
        .layer(mem_layer())
        .with_state(S {
            c: c.clone(),
            delay: Duration::from_millis(800),
            size: 0,
        });
    let addr = serve(app).await;
    let hold = tokio::spawn(async move { call(addr, Method::POST, "/orders", "ls-a", "a").await });
    within(10, async {
        while c.runs.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let shed1 = call(addr, Method::POST, "/orders", "ls-b", "b").await;
    assert_eq!(shed1.status, StatusCode::SERVICE_UNAVAILABLE, "{shed1:?}");
    let shed2 = call(addr, Method::POST, "/orders", "ls-b", "b").await;
    assert_eq!(
        shed2.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "the shed key stayed locked: {shed2:?}"
    );
    assert_eq!(hold.await.unwrap().status, StatusCode::CREATED);
    let ok = call(addr, Method::POST, "/orders", "ls-b", "b").await;
    assert_eq!(ok.status, StatusCode::CREATED);
    assert!(!ok.replayed());
    let again = call(addr, Method::POST, "/orders", "ls-b", "b").await;
    assert!(again.replayed());
    assert_eq!(c.runs.load(Ordering::SeqCst), 2);
}

/// tower's `Timeout` outside the layer (a 503 from `HandleErrorLayer` when it fires): the
/// handler runs once and the retry gets the stored response, on Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mix32_idem_tower_timeout_outside_on_redis_runs_once() {
    let Some(l) = redis_layer().await else { return };
    let c = Counter::default();
    let router = Router::new()
        .route("/orders", post(order))
        .layer(l)
        .with_state(S {
            c: c.clone(),
            delay: Duration::from_millis(400),
            size: 0,
        });
    let app = Router::new().fallback_service(
        ServiceBuilder::new()
            .layer(HandleErrorLayer::new(|_: BoxError| async {
                StatusCode::SERVICE_UNAVAILABLE
            }))
            .timeout(Duration::from_millis(80))
            .service(router),
    );
    let addr = serve(app).await;
    let first = call(addr, Method::POST, "/orders", "to-r", "t").await;
    assert_eq!(first.status, StatusCode::SERVICE_UNAVAILABLE);
    let second = call(addr, Method::POST, "/orders", "to-r", "t").await;
    assert!(
        second.status == StatusCode::CONFLICT || second.status == StatusCode::SERVICE_UNAVAILABLE,
        "{second:?}"
    );
    if second.status == StatusCode::CONFLICT {
        assert_in_flight(&second);
    }
    wait_done(&c, 1).await;
    let third = call(addr, Method::POST, "/orders", "to-r", "t").await;
    assert_eq!(third.status, StatusCode::CREATED, "{third:?}");
    assert!(third.replayed());
    assert_eq!(c.runs.load(Ordering::SeqCst), 1);
}
