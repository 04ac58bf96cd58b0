//! s62 outside round: the server side used inside axum apps, read against
//! docs/guides/idempotency.md, docs/guides/webhooks.md, docs/RELIABILITY.md and the rustdoc of
//! `sturdy-idempotency`'s server module, `sturdy-webhook` and `sturdy-redis`.
//!
//! In-process tests drive an axum `Router` with `tower::ServiceExt::oneshot` (timing with a
//! paused clock); wire tests run a real axum server on 127.0.0.1:0 and a real hyper client, in
//! real time. Redis tests use `STURDY_REDIS_URL` with a unique prefix per test.
#![cfg(feature = "full")]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use axum::body::Body;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sturdy::core::clock::ManualClock;
use sturdy::core::WallClock;
use sturdy::idempotency::server::{
    problem, Begin, ByCredentials, Fingerprint, IdempotencyLayer, IdempotencyStore, LockToken,
    MemoryStore, StoredResponse,
};
use sturdy::webhook::{
    sign_github, sign_standard, sign_stripe, BoxFuture as HookFuture, EventQueue, GitHub,
    MemoryQueue, Push, StandardWebhooks, Stripe, WebhookEvent, WebhookReceiver,
};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tower::{BoxError, ServiceExt};

// ---------------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------------

fn keyed(key: &str, path: &str, body: impl Into<Bytes>) -> Request<Body> {
    Request::post(path)
        .header("authorization", "Bearer s62-client")
        .header("idempotency-key", key)
        .body(Body::from(body.into()))
        .unwrap()
}

fn keyed_bytes(key: &[u8], body: &'static str) -> Request<Body> {
    Request::post("/orders")
        .header("authorization", "Bearer s62-client")
        .header("idempotency-key", HeaderValue::from_bytes(key).unwrap())
        .body(Body::from(body))
        .unwrap()
}

async fn bytes_of(resp: Response<Body>) -> (StatusCode, HeaderMap, Bytes) {
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (parts.status, parts.headers, bytes)
}

fn problem_type(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(body)));
    v["type"].as_str().unwrap_or_default().to_owned()
}

async fn assert_problem(resp: Response<Body>, status: u16, type_: &str) -> HeaderMap {
    let (st, headers, body) = bytes_of(resp).await;
    assert_eq!(
        st.as_u16(),
        status,
        "body: {:?}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(
        headers.get("content-type").map(|v| v.as_bytes()),
        Some(&b"application/problem+json"[..]),
        "problem content type"
    );
    assert_eq!(problem_type(&body), type_);
    headers
}

/// A counting, gated handler: `runs` counts starts, `done` counts ends; each run waits for one
/// permit of `gate` (or none when `gate` starts open).
#[derive(Clone)]
struct Counter {
    runs: Arc<AtomicUsize>,
    done: Arc<AtomicUsize>,
    gate: Arc<Semaphore>,
}

impl Counter {
    fn new(open: bool) -> Self {
        Self {
            runs: Arc::new(AtomicUsize::new(0)),
            done: Arc::new(AtomicUsize::new(0)),
            gate: Arc::new(Semaphore::new(if open {
                Semaphore::MAX_PERMITS
            } else {
                0
            })),
        }
    }
    fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }
    fn done(&self) -> usize {
        self.done.load(Ordering::SeqCst)
    }
    fn router<St: IdempotencyStore>(&self, layer: IdempotencyLayer<St>) -> Router {
        let c = self.clone();
        let handler = move |body: Bytes| {
            let c = c.clone();
            async move {
                let n = c.runs.fetch_add(1, Ordering::SeqCst) + 1;
                let _p = c.gate.acquire().await.unwrap();
                c.done.fetch_add(1, Ordering::SeqCst);
                (
                    StatusCode::CREATED,
                    [("x-run", n.to_string())],
                    [b"run:".as_slice(), &body].concat(),
                )
            }
        };
        Router::new()
            .route("/orders", post(handler.clone()))
            .route("/other", post(handler))
            .layer(layer)
    }
    async fn wait_done(&self, n: usize) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while self.done() < n {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("the handler never finished");
    }
}

fn mem_layer() -> IdempotencyLayer<MemoryStore> {
    IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default())
}

/// Everything but the connection-level headers and the replay marker.
fn replayable(h: &HeaderMap) -> Vec<(String, Vec<u8>)> {
    h.iter()
        .filter(|(n, _)| {
            !matches!(
                n.as_str(),
                "date" | "content-length" | "idempotent-replayed" | "transfer-encoding"
            )
        })
        .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect()
}

/// A store over a `MemoryStore` with injectable faults, counting its calls.
#[derive(Debug, Clone, Default)]
struct Faulty {
    inner: MemoryStore,
    begin_delay: Duration,
    begin_err: bool,
    complete_fails: bool,
    /// `complete` fails for a response whose body is longer than this.
    complete_refuse_over: Option<usize>,
    completes: Arc<Mutex<Vec<tokio::time::Instant>>>,
    releases: Arc<AtomicUsize>,
    begins: Arc<AtomicUsize>,
}

impl IdempotencyStore for Faulty {
    fn begin(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        token: LockToken,
        lease: Duration,
    ) -> sturdy::idempotency::server::BoxFuture<Result<Begin, BoxError>> {
        let me = self.clone();
        let key = key.to_owned();
        Box::pin(async move {
            me.begins.fetch_add(1, Ordering::SeqCst);
            if !me.begin_delay.is_zero() {
                tokio::time::sleep(me.begin_delay).await;
            }
            if me.begin_err {
                return Err("s62: store down".into());
            }
            me.inner.begin(&key, fingerprint, token, lease).await
        })
    }
    fn renew(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        token: LockToken,
        lease: Duration,
    ) -> sturdy::idempotency::server::BoxFuture<Result<bool, BoxError>> {
        self.inner.renew(key, fingerprint, token, lease)
    }
    fn complete(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        token: LockToken,
        response: StoredResponse,
        ttl: Duration,
    ) -> sturdy::idempotency::server::BoxFuture<Result<(), BoxError>> {
        self.completes
            .lock()
            .unwrap()
            .push(tokio::time::Instant::now());
        if self.complete_fails {
            return Box::pin(async { Err("s62: store down at complete".into()) });
        }
        if let Some(max) = self.complete_refuse_over {
            if response.body.len() > max {
                return Box::pin(async { Err("s62: too large for this store".into()) });
            }
        }
        self.inner.complete(key, fingerprint, token, response, ttl)
    }
    fn release(
        &self,
        key: &str,
        token: LockToken,
    ) -> sturdy::idempotency::server::BoxFuture<Result<(), BoxError>> {
        self.releases.fetch_add(1, Ordering::SeqCst);
        self.inner.release(key, token)
    }
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

fn unique(tag: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let nanos = sturdy::core::SystemClock
        .now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "s62:{tag}:{}:{nanos}:{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
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

fn wire_req(addr: SocketAddr, key: &str, body: &'static str) -> Request<Full<Bytes>> {
    Request::post(format!("http://{addr}/orders"))
        .header("authorization", "Bearer s62-wire")
        .header("idempotency-key", key)
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

async fn wire_send(
    addr: SocketAddr,
    key: &str,
    body: &'static str,
) -> (StatusCode, HeaderMap, Bytes) {
    let resp = client().request(wire_req(addr, key, body)).await.unwrap();
    let (parts, b) = resp.into_parts();
    (
        parts.status,
        parts.headers,
        b.collect().await.unwrap().to_bytes(),
    )
}

// ---------------------------------------------------------------------------------------------
// idempotency: concurrency, replay, reuse
// ---------------------------------------------------------------------------------------------

/// docs/guides/idempotency.md: "repeat while the first runs | 409, `Retry-After: 1`, problem
/// type `…/idempotency-key-in-flight`" and "duplicate concurrent request ... the store's atomic
/// lock lets exactly one execution start". Eight requests with one key at once: one runs.
#[tokio::test]
async fn idem_concurrent_same_key_one_execution() {
    let c = Counter::new(false);
    let app = c.router(mem_layer());
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            app.oneshot(keyed("conc-1", "/orders", "{}")).await.unwrap()
        }));
    }
    let mut conflicts = 0;
    tokio::time::timeout(Duration::from_secs(5), async {
        while c.runs() == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    c.gate.add_permits(1);
    let mut created = 0;
    for p in tasks {
        let resp = p.await.unwrap();
        if resp.status() == StatusCode::CONFLICT {
            assert_eq!(resp.headers()["retry-after"], "1");
            assert_problem(resp, 409, problem::IN_FLIGHT).await;
            conflicts += 1;
        } else {
            assert_eq!(resp.status(), StatusCode::CREATED);
            created += 1;
        }
    }
    assert_eq!(c.runs(), 1, "exactly one execution");
    assert_eq!(created + conflicts, 8);
    assert!(created >= 1);
}

/// docs/guides/idempotency.md: "repeat, same fingerprint, first completed | the stored response
/// (status, headers except connection-level ones such as `Date` and `Content-Length`, body) with
/// `Idempotent-Replayed: true`; the handler does not run". Non-UTF-8 body bytes (all 256),
/// opaque header bytes, repeated `Set-Cookie` lines in order.
#[tokio::test]
async fn idem_replay_is_byte_identical() {
    let runs = Arc::new(AtomicUsize::new(0));
    let r2 = runs.clone();
    let handler = move || {
        let runs = r2.clone();
        async move {
            runs.fetch_add(1, Ordering::SeqCst);
            let all: Vec<u8> = (0u8..=255).chain((0u8..=255).rev()).collect();
            Response::builder()
                .status(StatusCode::ACCEPTED)
                .header("content-type", "application/octet-stream")
                .header("set-cookie", "a=1; Path=/")
                .header("set-cookie", "b=2; Path=/")
                .header("set-cookie", "c=3")
                .header(
                    "x-opaque",
                    HeaderValue::from_bytes(&[b'o', 0x80, 0xff, b'\t', b'z']).unwrap(),
                )
                .header("etag", "\"v1\"")
                .header("location", "/orders/o_1")
                .body(Body::from(all))
                .unwrap()
        }
    };
    let app = Router::new()
        .route("/orders", post(handler))
        .layer(mem_layer());
    let (s1, h1, b1) = bytes_of(
        app.clone()
            .oneshot(keyed("bytes-1", "/orders", "x"))
            .await
            .unwrap(),
    )
    .await;
    assert!(h1.get("idempotent-replayed").is_none());
    for _ in 0..3 {
        let (s2, h2, b2) = bytes_of(
            app.clone()
                .oneshot(keyed("bytes-1", "/orders", "x"))
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(s2, s1);
        assert_eq!(b2, b1, "body bytes");
        assert_eq!(replayable(&h2), replayable(&h1), "headers");
        assert_eq!(h2["idempotent-replayed"], "true");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// docs/guides/idempotency.md: "same key, another method, path, query or body | 422,
/// `…/idempotency-key-reused`" and "the handler does not run"; the byte-for-byte query.
#[tokio::test]
async fn idem_same_key_other_request_is_422() {
    let c = Counter::new(true);
    let app = c.router(mem_layer().with_methods([http::Method::POST, http::Method::PATCH]));
    let first = app
        .clone()
        .oneshot(keyed("reuse-1", "/orders?a=1&b=2", "{\"n\":1}"))
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let others = [
        keyed("reuse-1", "/orders?a=1&b=2", "{\"n\":2}"),
        keyed("reuse-1", "/orders?b=2&a=1", "{\"n\":1}"),
        keyed("reuse-1", "/orders", "{\"n\":1}"),
        keyed("reuse-1", "/other?a=1&b=2", "{\"n\":1}"),
        keyed("reuse-1", "/orders?a=1&b=2", "{\"n\":1} "),
        keyed("reuse-1", "/orders?a=1&b=2", ""),
        {
            let mut r = keyed("reuse-1", "/orders?a=1&b=2", "{\"n\":1}");
            *r.method_mut() = http::Method::PATCH;
            r
        },
    ];
    for req in others {
        let what = format!("{} {}", req.method(), req.uri());
        let resp = app.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), 422, "{what}");
        assert_problem(resp, 422, problem::KEY_REUSED).await;
    }
    assert_eq!(c.runs(), 1);
}

/// docs/guides/idempotency.md: "a key that is not 1 to 255 visible ASCII characters (sent bare,
/// `k`, or as a structured-field string, `"k"`: the two name the same key on two requests) |
/// 400, `…/idempotency-key-invalid`". Empty, 256, 100 KiB, non-UTF-8, DEL, tab and space inside.
#[tokio::test]
async fn idem_invalid_keys_are_400_and_never_run() {
    let c = Counter::new(true);
    let app = c.router(mem_layer());
    let long256 = "k".repeat(256);
    let huge = "h".repeat(100 * 1024);
    let bad: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        b"\"\"".to_vec(),
        long256.clone().into_bytes(),
        format!("\"{long256}\"").into_bytes(),
        huge.into_bytes(),
        vec![b'a', 0x80, b'b'],
        vec![0xff; 16],
        b"a\tb".to_vec(),
    ];
    for key in bad {
        let resp = app.clone().oneshot(keyed_bytes(&key, "{}")).await.unwrap();
        assert_eq!(
            resp.status(),
            400,
            "key {:?}",
            String::from_utf8_lossy(&key[..key.len().min(40)])
        );
        assert_problem(resp, 400, problem::INVALID_KEY).await;
    }
    assert_eq!(c.runs(), 0);
}

/// docs/guides/idempotency.md: "1 to 255 visible ASCII characters (sent bare, `k`, or as a
/// structured-field string, `"k"`: the two name the same key on two requests)": a 255-character
/// key works bare and quoted (257 bytes on the wire), and the two forms replay each other.
#[tokio::test]
async fn idem_longest_key_bare_and_quoted_are_one_key() {
    let c = Counter::new(true);
    let app = c.router(mem_layer());
    let k255: String = (0..255)
        .map(|i| char::from(b'!' + (i % 94) as u8))
        .filter(|ch| *ch != '"' && *ch != '\\')
        .chain(std::iter::repeat('z'))
        .take(255)
        .collect();
    assert_eq!(k255.len(), 255);
    let first = app
        .clone()
        .oneshot(keyed(&k255, "/orders", "{}"))
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let quoted = format!("\"{k255}\"");
    let again = app
        .clone()
        .oneshot(keyed(&quoted, "/orders", "{}"))
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::CREATED);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(c.runs(), 1);
}

/// docs/guides/idempotency.md: "two or more different key headers on one request (byte-identical
/// repeats are one key; `k` and `"k"` on two lines are two) | 400".
#[tokio::test]
async fn idem_two_key_lines() {
    let c = Counter::new(true);
    let app = c.router(mem_layer());
    let two = |a: &str, b: &str| {
        Request::post("/orders")
            .header("idempotency-key", a)
            .header("idempotency-key", b)
            .body(Body::from("{}"))
            .unwrap()
    };
    let resp = app.clone().oneshot(two("k-a", "k-b")).await.unwrap();
    assert_problem(resp, 400, problem::INVALID_KEY).await;
    let resp = app.clone().oneshot(two("k", "\"k\"")).await.unwrap();
    assert_problem(resp, 400, problem::INVALID_KEY).await;
    let resp = app.clone().oneshot(two("k-same", "k-same")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(c.runs(), 1);
}

/// docs/guides/idempotency.md: "Keys are scoped per client ... one client never gets another's
/// stored response".
#[tokio::test]
async fn idem_other_client_same_key_runs_apart() {
    let c = Counter::new(true);
    let app = c.router(mem_layer());
    let mut r1 = keyed("scope-1", "/orders", "{}");
    r1.headers_mut()
        .insert("authorization", HeaderValue::from_static("Bearer alice"));
    let mut r2 = keyed("scope-1", "/orders", "{}");
    r2.headers_mut()
        .insert("authorization", HeaderValue::from_static("Bearer bob"));
    let (_, h1, _) = bytes_of(app.clone().oneshot(r1).await.unwrap()).await;
    let (_, h2, _) = bytes_of(app.clone().oneshot(r2).await.unwrap()).await;
    assert_eq!(h1["x-run"], "1");
    assert_eq!(h2["x-run"], "2");
    assert!(h2.get("idempotent-replayed").is_none());
}

// ---------------------------------------------------------------------------------------------
// idempotency: cancellation, panics, leases, store faults (paused clock)
// ---------------------------------------------------------------------------------------------

/// docs/guides/idempotency.md, "client timeout mid-handler | the handler runs to its end in its
/// own task; its response is stored | ... a retry with the same key gets 409 in flight
/// (`Retry-After: 1`) while the handler runs, then the stored response with
/// `Idempotent-Replayed: true`; the handler ran once". The request's future is dropped.
#[tokio::test(start_paused = true)]
async fn idem_dropped_mid_handler_runs_once() {
    let c = Counter::new(false);
    let app = c.router(mem_layer());
    let fut = app.clone().oneshot(keyed("drop-1", "/orders", "{}"));
    let cut = tokio::time::timeout(Duration::from_millis(100), fut).await;
    assert!(cut.is_err(), "the handler is gated");
    assert_eq!(c.runs(), 1);
    let resp = app
        .clone()
        .oneshot(keyed("drop-1", "/orders", "{}"))
        .await
        .unwrap();
    assert_eq!(resp.headers()["retry-after"], "1");
    assert_problem(resp, 409, problem::IN_FLIGHT).await;
    c.gate.add_permits(1);
    c.wait_done(1).await;
    let mut last = None;
    for _ in 0..100 {
        let resp = app
            .clone()
            .oneshot(keyed("drop-1", "/orders", "{}"))
            .await
            .unwrap();
        if resp.status() != StatusCode::CONFLICT {
            last = Some(resp);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (st, h, b) = bytes_of(last.expect("still 409 after the handler ended")).await;
    assert_eq!(st, StatusCode::CREATED);
    assert_eq!(h["idempotent-replayed"], "true");
    assert_eq!(&b[..], b"run:{}");
    assert_eq!(c.runs(), 1);
}

/// docs/guides/idempotency.md, "client gone while the store is locking the key (before the
/// handler starts) | the handler does not run; the store's answer is awaited in the background
/// and, if it locked the key, the key is released | ... a retry with the same key runs normally".
#[tokio::test(start_paused = true)]
async fn idem_dropped_during_begin_never_runs_and_frees_key() {
    let store = Faulty {
        begin_delay: Duration::from_secs(1),
        ..Faulty::default()
    };
    let c = Counter::new(true);
    let app = c.router(IdempotencyLayer::new(
        store.clone(),
        ByCredentials::default(),
    ));
    let cut = tokio::time::timeout(
        Duration::from_millis(500),
        app.clone().oneshot(keyed("begin-1", "/orders", "{}")),
    )
    .await;
    assert!(cut.is_err());
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        c.runs(),
        0,
        "the handler must not run for a request dropped in begin"
    );
    assert!(
        store.releases.load(Ordering::SeqCst) >= 1,
        "the lock taken in the background is released"
    );
    let resp = app
        .clone()
        .oneshot(keyed("begin-1", "/orders", "{}"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert!(resp.headers().get("idempotent-replayed").is_none());
    assert_eq!(c.runs(), 1);
}

/// idempotency module docs: "While it runs, its lock is renewed every third of its lease": a
/// handler three leases long keeps its key, and a retry meanwhile gets 409, never a second run.
#[tokio::test(start_paused = true)]
async fn idem_handler_longer_than_lease_keeps_key() {
    let runs = Arc::new(AtomicUsize::new(0));
    let r2 = runs.clone();
    let handler = move || {
        let runs = r2.clone();
        async move {
            runs.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_secs(10)).await;
            (StatusCode::CREATED, "slow")
        }
    };
    let layer = mem_layer().with_lease(Duration::from_secs(3)).unwrap();
    let app = Router::new().route("/orders", post(handler)).layer(layer);
    let first = tokio::spawn(app.clone().oneshot(keyed("lease-1", "/orders", "{}")));
    // At 2.2, 4.4, 6.6 and 8.8 s: past one, two and three leases of 3 s, the handler still runs.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(2_200)).await;
        let resp = app
            .clone()
            .oneshot(keyed("lease-1", "/orders", "{}"))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::CONFLICT);
    }
    let first = first.await.unwrap().unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the lease ran out mid-handler"
    );
}

/// docs/guides/idempotency.md: "its response is stored 24 h" (and `with_ttl`): a replay a
/// minute before the TTL ends, a fresh run a second after.
#[tokio::test(start_paused = true)]
async fn idem_ttl_default_24h() {
    let c = Counter::new(true);
    let app = c.router(mem_layer());
    let r = app
        .clone()
        .oneshot(keyed("ttl-1", "/orders", "{}"))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    tokio::time::advance(Duration::from_secs(24 * 3600 - 60)).await;
    let r = app
        .clone()
        .oneshot(keyed("ttl-1", "/orders", "{}"))
        .await
        .unwrap();
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    tokio::time::advance(Duration::from_secs(61)).await;
    let r = app
        .clone()
        .oneshot(keyed("ttl-1", "/orders", "{}"))
        .await
        .unwrap();
    assert!(r.headers().get("idempotent-replayed").is_none());
    assert_eq!(c.runs(), 2);
}

/// docs/guides/idempotency.md, "handler panics | the panic is caught; the key is released, and
/// the release has completed before the panic resumes in the request's future | ... a retry,
/// even at once, runs the handler again"; with `CatchPanicLayer` outside, "a 500 ... as usual".
#[tokio::test]
async fn idem_panicking_handler_releases_key() {
    let runs = Arc::new(AtomicUsize::new(0));
    let r2 = runs.clone();
    let handler = move || {
        let runs = r2.clone();
        async move {
            if runs.fetch_add(1, Ordering::SeqCst) < 2 {
                panic!("s62 handler panic");
            }
            (StatusCode::CREATED, "ok")
        }
    };
    let app = Router::new()
        .route("/orders", post(handler))
        .layer(mem_layer());
    // Without a catcher: the panic resumes in the request's future.
    let app2 = app.clone();
    let joined =
        tokio::spawn(async move { app2.oneshot(keyed("panic-1", "/orders", "{}")).await }).await;
    assert!(joined.unwrap_err().is_panic());
    // With tower-http's CatchPanicLayer outside: a 500, and at once a retry runs again.
    let caught = tower::ServiceBuilder::new()
        .layer(tower_http::catch_panic::CatchPanicLayer::new())
        .service(app.clone());
    let r = caught
        .clone()
        .oneshot(keyed("panic-1", "/orders", "{}"))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let r = caught
        .oneshot(keyed("panic-1", "/orders", "{}"))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(runs.load(Ordering::SeqCst), 3);
}

/// docs/guides/idempotency.md: "Not stored, so a retry runs the handler again: 5xx
/// (`with_store_server_errors(true)` stores them), and 408, 425 and 429".
#[tokio::test]
async fn idem_unstored_statuses_run_again() {
    for (code, store5xx, stored) in [
        (500u16, false, false),
        (503, false, false),
        (408, false, false),
        (425, false, false),
        (429, false, false),
        (429, true, false),
        (500, true, true),
        (400, false, true),
        (404, false, true),
    ] {
        let runs = Arc::new(AtomicUsize::new(0));
        let r2 = runs.clone();
        let handler = move || {
            let runs = r2.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                (StatusCode::from_u16(code).unwrap(), "answer")
            }
        };
        let app = Router::new()
            .route("/orders", post(handler))
            .layer(mem_layer().with_store_server_errors(store5xx));
        for _ in 0..2 {
            let r = app
                .clone()
                .oneshot(keyed("status-1", "/orders", "{}"))
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), code);
        }
        let expect = if stored { 1 } else { 2 };
        assert_eq!(
            runs.load(Ordering::SeqCst),
            expect,
            "status {code}, store 5xx {store5xx}"
        );
    }
}

/// docs/guides/idempotency.md: "store unreachable, or full of running requests | 503,
/// `Retry-After: 1`, `…/idempotency-store-unavailable`; the handler does not run".
#[tokio::test]
async fn idem_store_full_of_running_is_503() {
    let c = Counter::new(false);
    let app = c.router(IdempotencyLayer::new(
        MemoryStore::new(1).unwrap(),
        ByCredentials::default(),
    ));
    let first = tokio::spawn(app.clone().oneshot(keyed("full-a", "/orders", "{}")));
    tokio::time::timeout(Duration::from_secs(5), async {
        while c.runs() == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .unwrap();
    let resp = app
        .clone()
        .oneshot(keyed("full-b", "/orders", "{}"))
        .await
        .unwrap();
    assert_eq!(resp.headers()["retry-after"], "1");
    assert_problem(resp, 503, problem::STORE_UNAVAILABLE).await;
    assert_eq!(c.runs(), 1);
    c.gate.add_permits(10);
    assert_eq!(first.await.unwrap().unwrap().status(), StatusCode::CREATED);
    // Once the first completed, a new key makes room by evicting it.
    let resp = app
        .clone()
        .oneshot(keyed("full-b", "/orders", "{}"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
}

/// docs/guides/idempotency.md, "store down when the request arrives | 503
/// `…/idempotency-store-unavailable`, `Retry-After: 1`; the handler does not run".
#[tokio::test]
async fn idem_store_down_at_begin_is_503() {
    let store = Faulty {
        begin_err: true,
        ..Faulty::default()
    };
    let c = Counter::new(true);
    let app = c.router(IdempotencyLayer::new(store, ByCredentials::default()));
    let resp = app.oneshot(keyed("down-1", "/orders", "{}")).await.unwrap();
    assert_eq!(resp.headers()["retry-after"], "1");
    let (st, _, body) = bytes_of(resp).await;
    assert_eq!(st, 503);
    assert_eq!(problem_type(&body), problem::STORE_UNAVAILABLE);
    assert!(
        !String::from_utf8_lossy(&body).contains("s62: store down"),
        "the store's error text is not for the client"
    );
    assert_eq!(c.runs(), 0);
}

/// docs/guides/idempotency.md, "store down when the response is stored | tried 3 times (50 ms,
/// then 100 ms apart), then a small 500 marker is tried once in its place ...; if that fails
/// too, the key stays locked until its lease ends | the handler's response; a retry within the
/// lease gets 409; after the lease, the handler runs again".
#[tokio::test(start_paused = true)]
async fn idem_store_down_at_complete() {
    let store = Faulty {
        complete_fails: true,
        ..Faulty::default()
    };
    let c = Counter::new(true);
    let layer = IdempotencyLayer::new(store.clone(), ByCredentials::default())
        .with_lease(Duration::from_secs(30))
        .unwrap();
    let app = c.router(layer);
    let first = app
        .clone()
        .oneshot(keyed("cdown-1", "/orders", "{}"))
        .await
        .unwrap();
    assert_eq!(
        first.status(),
        StatusCode::CREATED,
        "the handler's response"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let times = store.completes.lock().unwrap().clone();
    assert_eq!(times.len(), 4, "3 tries and one marker");
    let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps[0] >= Duration::from_millis(50) && gaps[0] < Duration::from_millis(60),
        "{gaps:?}"
    );
    assert!(
        gaps[1] >= Duration::from_millis(100) && gaps[1] < Duration::from_millis(110),
        "{gaps:?}"
    );
    let r = app
        .clone()
        .oneshot(keyed("cdown-1", "/orders", "{}"))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT, "within the lease");
    assert_eq!(c.runs(), 1);
    tokio::time::sleep(Duration::from_secs(31)).await;
    let r = app
        .clone()
        .oneshot(keyed("cdown-1", "/orders", "{}"))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(c.runs(), 2);
}

/// docs/guides/idempotency.md: "a store that refuses only a large response keeps it: retries
/// get 500 `…/idempotency-response-too-large` and the handler does not run again", and "the
/// first client gets the response".
#[tokio::test(start_paused = true)]
async fn idem_store_refuses_large_response_keeps_marker() {
    let store = Faulty {
        // The marker (a problem JSON of a few hundred bytes) fits; the response does not.
        complete_refuse_over: Some(2_000),
        ..Faulty::default()
    };
    let c = Counter::new(true);
    let app = c.router(IdempotencyLayer::new(store, ByCredentials::default()));
    let big = "b".repeat(5_000);
    let (st, _, body) = bytes_of(
        app.clone()
            .oneshot(keyed("big-1", "/orders", big.clone()))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED);
    assert_eq!(body.len(), 5_004);
    tokio::time::sleep(Duration::from_secs(1)).await;
    for _ in 0..2 {
        let r = app
            .clone()
            .oneshot(keyed("big-1", "/orders", big.clone()))
            .await
            .unwrap();
        assert_problem(r, 500, problem::RESPONSE_TOO_LARGE).await;
    }
    assert_eq!(c.runs(), 1);
}

/// docs/guides/idempotency.md, "response over the response limit (1 MiB) | the handler ran; a
/// 500 marker is stored in its place | 500 `…/idempotency-response-too-large`, also on every
/// retry; the handler is not run again".
#[tokio::test]
async fn idem_response_over_limit() {
    let c = Counter::new(true);
    let app = c.router(mem_layer().with_response_limit(16));
    // "run:" + 13 bytes = 17 > 16
    for _ in 0..3 {
        let r = app
            .clone()
            .oneshot(keyed("rl-1", "/orders", "0123456789abc"))
            .await
            .unwrap();
        assert_problem(r, 500, problem::RESPONSE_TOO_LARGE).await;
    }
    assert_eq!(c.runs(), 1);
    // exactly at the limit: stored
    let r = app
        .clone()
        .oneshot(keyed("rl-2", "/orders", "0123456789ab"))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = app
        .clone()
        .oneshot(keyed("rl-2", "/orders", "0123456789ab"))
        .await
        .unwrap();
    assert_eq!(r.headers()["idempotent-replayed"], "true");
}

/// docs/guides/idempotency.md: "body over the limit (1 MiB, `with_body_limit` ...) | 413,
/// `…/request-body-too-large`"; one byte under passes.
#[tokio::test]
async fn idem_body_limit_edges() {
    let c = Counter::new(true);
    let app = c.router(mem_layer().with_body_limit(100));
    let r = app
        .clone()
        .oneshot(keyed("bl-1", "/orders", vec![b'a'; 100]))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = app
        .clone()
        .oneshot(keyed("bl-2", "/orders", vec![b'a'; 101]))
        .await
        .unwrap();
    assert_problem(r, 413, problem::BODY_TOO_LARGE).await;
    // A chunked body of unknown length over the limit.
    let chunks = futures_util::stream::iter(
        (0..20).map(|_| Ok::<_, std::io::Error>(Bytes::from_static(b"0123456789"))),
    );
    let req = Request::post("/orders")
        .header("idempotency-key", "bl-3")
        .body(Body::from_stream(chunks))
        .unwrap();
    let r = app.clone().oneshot(req).await.unwrap();
    assert_problem(r, 413, problem::BODY_TOO_LARGE).await;
    assert_eq!(c.runs(), 1);
}

/// docs/RELIABILITY.md: "a chunked webhook or idempotent request cut by tower-http's
/// `RequestBodyLimitLayer` outside the layer | ... | 413".
#[tokio::test]
async fn idem_request_body_limit_layer_outside() {
    let c = Counter::new(true);
    let app = c
        .router(mem_layer())
        .layer(tower_http::limit::RequestBodyLimitLayer::new(50));
    let chunks = futures_util::stream::iter(
        (0..20).map(|_| Ok::<_, std::io::Error>(Bytes::from_static(b"0123456789"))),
    );
    let req = Request::post("/orders")
        .header("idempotency-key", "rbl-1")
        .body(Body::from_stream(chunks))
        .unwrap();
    let r = app.clone().oneshot(req).await.unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(c.runs(), 0);
    // The key was not used up: the same key with a small body runs.
    let r = app
        .clone()
        .oneshot(keyed("rbl-1", "/orders", "small"))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
}

/// docs/guides/idempotency.md: "A handler keeps running after its client left ... put the limit
/// inside this layer ... `GlobalConcurrencyLimitLayer` ...: the permit that the limit's
/// `poll_ready` took goes with the execution and is returned when the handler ends". A client
/// cut by tower-http's `TimeoutLayer`: its handler still holds the one permit.
#[tokio::test(start_paused = true)]
async fn idem_global_limit_inside_counts_abandoned_handler() {
    let c = Counter::new(false);
    let handler = {
        let c = c.clone();
        move |body: Bytes| {
            let c = c.clone();
            async move {
                c.runs.fetch_add(1, Ordering::SeqCst);
                if body.as_ref() == b"slow" {
                    let _p = c.gate.acquire().await.unwrap();
                }
                c.done.fetch_add(1, Ordering::SeqCst);
                (StatusCode::CREATED, body)
            }
        }
    };
    let app = Router::new()
        .route("/orders", post(handler))
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(1))
        .layer(mem_layer())
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_millis(100),
        ));
    let r = app
        .clone()
        .oneshot(keyed("gl-1", "/orders", "slow"))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::REQUEST_TIMEOUT);
    assert_eq!(c.runs(), 1);
    // A second request (another key) must wait for the permit: it times out too, not run.
    let r = app
        .clone()
        .oneshot(keyed("gl-2", "/orders", "fast"))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::REQUEST_TIMEOUT);
    assert_eq!(
        c.runs(),
        1,
        "the limit let a second handler run beside the first"
    );
    c.gate.add_permits(1);
    c.wait_done(1).await;
    let r = app
        .clone()
        .oneshot(keyed("gl-2", "/orders", "fast"))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = app
        .clone()
        .oneshot(keyed("gl-1", "/orders", "slow"))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    assert_eq!(c.runs(), 2);
}

/// docs/guides/idempotency.md: "under axum's `Router::nest`, where a layer sees the path without
/// its prefix, it is read from axum's `OriginalUri` ..., so one key sent to `/us/orders` and
/// then to `/eu/orders` is answered 422".
#[tokio::test]
async fn idem_nested_routers_see_full_path() {
    let c = Counter::new(true);
    let store = MemoryStore::default();
    let inner = c.router(IdempotencyLayer::new(store, ByCredentials::default()));
    let app = Router::new().nest("/us", inner.clone()).nest("/eu", inner);
    let r = app
        .clone()
        .oneshot(keyed("nest-1", "/us/orders", "{}"))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = app
        .clone()
        .oneshot(keyed("nest-1", "/eu/orders", "{}"))
        .await
        .unwrap();
    assert_problem(r, 422, problem::KEY_REUSED).await;
    assert_eq!(c.runs(), 1);
}

/// The module docs: "Rejections are responses (`Error = S::Error`), so it fits
/// `axum::Router::layer`"; behind tower's `Buffer`, a request dropped mid-handler still runs once
/// ("runs to its end, even if its client goes away").
#[tokio::test(start_paused = true)]
async fn idem_behind_buffer_drop_runs_once() {
    let c = Counter::new(false);
    let app = c.router(mem_layer());
    let buffered = tower::buffer::Buffer::new(app, 8);
    let cut = tokio::time::timeout(
        Duration::from_millis(50),
        buffered.clone().oneshot(keyed("buf-1", "/orders", "{}")),
    )
    .await;
    assert!(cut.is_err());
    c.gate.add_permits(1);
    c.wait_done(1).await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    let r = buffered
        .clone()
        .oneshot(keyed("buf-1", "/orders", "{}"))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    assert_eq!(c.runs(), 1);
}

// ---------------------------------------------------------------------------------------------
// idempotency on the wire
// ---------------------------------------------------------------------------------------------

/// docs/RELIABILITY.md: "a client that times out while the server's handler runs | ... | once;
/// the retry gets the stored response". Real axum server, hyper client cut by a timeout.
#[tokio::test]
async fn wire_client_timeout_mid_handler() {
    let c = Counter::new(false);
    let addr = serve(c.router(mem_layer())).await;
    let cut = tokio::time::timeout(Duration::from_millis(100), wire_send(addr, "w-1", "pay")).await;
    assert!(cut.is_err());
    let (st, h, _) = wire_send(addr, "w-1", "pay").await;
    assert_eq!(st, StatusCode::CONFLICT);
    assert_eq!(h["retry-after"], "1");
    c.gate.add_permits(1);
    c.wait_done(1).await;
    let mut got = None;
    for _ in 0..200 {
        let (st, h, b) = wire_send(addr, "w-1", "pay").await;
        if st != StatusCode::CONFLICT {
            got = Some((st, h, b));
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (st, h, b) = got.expect("409 forever after the handler ended");
    assert_eq!(st, StatusCode::CREATED);
    assert_eq!(h["idempotent-replayed"], "true");
    assert_eq!(&b[..], b"run:pay");
    assert_eq!(c.runs(), 1);
}

/// docs/guides/idempotency.md, "connection dropped after the handler committed | the execution
/// is not tied to the connection: its response is stored when the handler returns". The
/// request is written on a raw socket that is then closed.
#[tokio::test]
async fn wire_connection_closed_mid_handler() {
    let c = Counter::new(false);
    let addr = serve(c.router(mem_layer())).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"POST /orders HTTP/1.1\r\nhost: x\r\nauthorization: Bearer s62-wire\r\n\
          idempotency-key: w-2\r\ncontent-length: 3\r\n\r\npay",
    )
    .await
    .unwrap();
    tokio::time::timeout(Duration::from_secs(5), async {
        while c.runs() == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .unwrap();
    drop(s);
    tokio::time::sleep(Duration::from_millis(50)).await;
    c.gate.add_permits(1);
    c.wait_done(1).await;
    let mut got = None;
    for _ in 0..200 {
        let (st, h, b) = wire_send(addr, "w-2", "pay").await;
        if st != StatusCode::CONFLICT {
            got = Some((st, h, b));
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (st, h, b) = got.expect("409 forever");
    assert_eq!(st, StatusCode::CREATED);
    assert_eq!(h["idempotent-replayed"], "true");
    assert_eq!(&b[..], b"run:pay");
    assert_eq!(c.runs(), 1);
}

/// docs/guides/idempotency.md: "duplicate concurrent request ... exactly one execution start ...
/// the others get 409" -- on the wire, from separate connections.
#[tokio::test]
async fn wire_concurrent_connections_one_run() {
    let c = Counter::new(false);
    let addr = serve(c.router(mem_layer())).await;
    let first = tokio::spawn(wire_send(addr, "w-3", "x"));
    tokio::time::timeout(Duration::from_secs(5), async {
        while c.runs() == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .unwrap();
    let mut others = Vec::new();
    for _ in 0..6 {
        others.push(tokio::spawn(wire_send(addr, "w-3", "x")));
    }
    for o in others {
        let (st, h, _) = o.await.unwrap();
        assert_eq!(st, StatusCode::CONFLICT);
        assert_eq!(h["retry-after"], "1");
    }
    c.gate.add_permits(1);
    let (st, _, _) = first.await.unwrap();
    assert_eq!(st, StatusCode::CREATED);
    assert_eq!(c.runs(), 1);
}

/// docs/guides/idempotency.md: "a key that is not 1 to 255 visible ASCII characters | 400" on
/// the wire: a key of obs-text bytes, and a header of 60 KB.
#[tokio::test]
async fn wire_hostile_keys() {
    let c = Counter::new(true);
    let addr = serve(c.router(mem_layer())).await;
    for key in [vec![0xe9u8, b'a'], vec![b'k'; 60_000]] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut req =
            b"POST /orders HTTP/1.1\r\nhost: x\r\nconnection: close\r\nidempotency-key: ".to_vec();
        req.extend_from_slice(&key);
        req.extend_from_slice(b"\r\ncontent-length: 2\r\n\r\n{}");
        s.write_all(&req).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(
            Duration::from_secs(5),
            tokio::io::AsyncReadExt::read_to_end(&mut s, &mut out),
        )
        .await
        .unwrap()
        .unwrap();
        let text = String::from_utf8_lossy(&out);
        assert!(
            text.starts_with("HTTP/1.1 400") || text.starts_with("HTTP/1.1 431"),
            "{}",
            &text[..text.len().min(200)]
        );
    }
    assert_eq!(c.runs(), 0);
}

// ---------------------------------------------------------------------------------------------
// idempotency with Redis
// ---------------------------------------------------------------------------------------------

/// docs/guides/idempotency.md: "`RedisIdempotencyStore::connect(url)` shares keys between
/// instances" and "the store's atomic lock lets exactly one execution start, across every
/// instance sharing the store"; the replay from the other instance is byte-identical.
#[tokio::test]
async fn redis_two_instances_one_execution() {
    let Some(url) = redis_url() else { return };
    let prefix = unique("idem");
    let s1 = sturdy::redis::RedisIdempotencyStore::connect(&url)
        .await
        .unwrap()
        .with_prefix(prefix.clone());
    let s2 = sturdy::redis::RedisIdempotencyStore::connect(&url)
        .await
        .unwrap()
        .with_prefix(prefix);
    let c = Counter::new(false);
    let a = c.router(IdempotencyLayer::new(s1, ByCredentials::default()));
    let b = c.router(IdempotencyLayer::new(s2, ByCredentials::default()));
    let first = tokio::spawn(a.clone().oneshot(keyed(
        "r-1",
        "/orders",
        Bytes::from_static(&[0, 0xff, 0x80]),
    )));
    tokio::time::timeout(Duration::from_secs(5), async {
        while c.runs() == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .unwrap();
    let r = b
        .clone()
        .oneshot(keyed(
            "r-1",
            "/orders",
            Bytes::from_static(&[0, 0xff, 0x80]),
        ))
        .await
        .unwrap();
    assert_eq!(r.headers()["retry-after"], "1");
    assert_problem(r, 409, problem::IN_FLIGHT).await;
    c.gate.add_permits(1);
    let (s_a, h_a, b_a) = bytes_of(first.await.unwrap().unwrap()).await;
    assert_eq!(s_a, StatusCode::CREATED);
    let (s_b, h_b, b_b) = bytes_of(
        b.clone()
            .oneshot(keyed(
                "r-1",
                "/orders",
                Bytes::from_static(&[0, 0xff, 0x80]),
            ))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s_b, s_a);
    assert_eq!(b_b, b_a);
    assert_eq!(replayable(&h_b), replayable(&h_a));
    assert_eq!(h_b["idempotent-replayed"], "true");
    assert_eq!(c.runs(), 1);
    let r = b
        .oneshot(keyed(
            "r-1",
            "/orders",
            Bytes::from_static(&[0, 0xff, 0x81]),
        ))
        .await
        .unwrap();
    assert_problem(r, 422, problem::KEY_REUSED).await;
}

/// docs/guides/idempotency.md, "client timeout mid-handler ... the handler ran once", with the
/// Redis store and a real server.
#[tokio::test]
async fn redis_wire_drop_mid_handler() {
    let Some(url) = redis_url() else { return };
    let store = sturdy::redis::RedisIdempotencyStore::connect(&url)
        .await
        .unwrap()
        .with_prefix(unique("idemw"));
    let c = Counter::new(false);
    let addr = serve(
        c.router(
            IdempotencyLayer::new(store, ByCredentials::default())
                .with_lease(Duration::from_millis(300))
                .unwrap(),
        ),
    )
    .await;
    let cut = tokio::time::timeout(Duration::from_millis(100), wire_send(addr, "rw-1", "p")).await;
    assert!(cut.is_err());
    // Three leases pass while the handler runs: renewal keeps the key.
    tokio::time::sleep(Duration::from_millis(900)).await;
    let (st, _, _) = wire_send(addr, "rw-1", "p").await;
    assert_eq!(st, StatusCode::CONFLICT);
    c.gate.add_permits(1);
    c.wait_done(1).await;
    let mut got = None;
    for _ in 0..200 {
        let (st, h, b) = wire_send(addr, "rw-1", "p").await;
        if st != StatusCode::CONFLICT {
            got = Some((st, h, b));
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (st, h, b) = got.expect("409 forever");
    assert_eq!(st, StatusCode::CREATED);
    assert_eq!(h["idempotent-replayed"], "true");
    assert_eq!(&b[..], b"run:p");
    assert_eq!(c.runs(), 1);
}

/// docs/guides/idempotency.md: "a key that is not 1 to 255 visible ASCII characters ... 400"
/// and a 255-character key with every visible character (`:`, `*`, `{`, `}` included) works
/// on Redis, replays, and does not collide with a key that is its prefix.
#[tokio::test]
async fn redis_odd_keys() {
    let Some(url) = redis_url() else { return };
    let store = sturdy::redis::RedisIdempotencyStore::connect(&url)
        .await
        .unwrap()
        .with_prefix(unique("idemk"));
    let c = Counter::new(true);
    let app = c.router(IdempotencyLayer::new(store, ByCredentials::default()));
    let k: String = "a:*{x}?[]".chars().cycle().take(255).collect();
    let short: String = k.chars().take(254).collect();
    for key in [&k, &short] {
        let r = app
            .clone()
            .oneshot(keyed(key, "/orders", "{}"))
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        assert!(r.headers().get("idempotent-replayed").is_none());
    }
    let r = app
        .clone()
        .oneshot(keyed(&k, "/orders", "{}"))
        .await
        .unwrap();
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    assert_eq!(c.runs(), 2);
}

// ---------------------------------------------------------------------------------------------
// webhooks
// ---------------------------------------------------------------------------------------------

const SW_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const STRIPE_SECRET: &str = "whsec_s62_stripe_secret_value";
const GH_SECRET: &str = "It's a Secret to Everybody";

fn at(secs: u64) -> Arc<dyn WallClock> {
    Arc::new(ManualClock::at(UNIX_EPOCH + Duration::from_secs(secs)))
}

fn sw_req(id: &str, ts: &str, body: &[u8], sig: &str) -> Request<Body> {
    Request::post("/hooks")
        .header("webhook-id", id)
        .header("webhook-timestamp", ts)
        .header("webhook-signature", sig)
        .body(Body::from(body.to_vec()))
        .unwrap()
}

fn stripe_req(sig: &str, body: &[u8]) -> Request<Body> {
    Request::post("/hooks")
        .header("stripe-signature", sig)
        .body(Body::from(body.to_vec()))
        .unwrap()
}

async fn status_text(resp: Response<Full<Bytes>>) -> (u16, HeaderMap, String) {
    let (p, b) = resp.into_parts();
    let b = b.collect().await.unwrap().to_bytes();
    (
        p.status.as_u16(),
        p.headers,
        String::from_utf8_lossy(&b).into_owned(),
    )
}

/// The public test vector SW-1 (/work/shared/vectors/STANDARDS.md), as it is, at its own time:
/// accepted; and docs/guides/webhooks.md "a signed timestamp within the tolerance \[5 minutes,
/// both directions\] ... 401 for a stale or future timestamp": the SW-time cases, 300 s in, 301 s
/// out, either way.
#[tokio::test]
async fn hook_standard_vector_and_tolerance_edges() {
    let id = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    let body = br#"{"test": 2432232314}"#;
    let sig = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
    assert_eq!(sign_standard(SW_SECRET, id, 1614265330, body).unwrap(), sig);
    for (now, want) in [
        (1614265330u64, 200u16),
        (1614265330 + 300, 200),
        (1614265330 - 300, 200),
        (1614265330 + 301, 401),
        (1614265330 - 301, 401),
    ] {
        let (q, mut rx) = MemoryQueue::new(10);
        let r =
            WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), q).with_clock(at(now));
        let (st, _, _) = status_text(
            r.oneshot(sw_req(id, "1614265330", body, sig))
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(st, want, "now {now}");
        assert_eq!(rx.try_recv().is_some(), want == 200);
    }
    // SW-neg: every must-reject value.
    for bad in [
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OA=",
        "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=",
        "v1,dawfeoifkpqwoekfpqoekf",
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLawdd",
        "v1,",
        "v1,g0hM9",
    ] {
        let (q, mut rx) = MemoryQueue::new(10);
        let r = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), q)
            .with_clock(at(1614265330));
        let (st, _, text) = status_text(
            r.oneshot(sw_req(id, "1614265330", body, bad))
                .await
                .unwrap(),
        )
        .await;
        assert!(st == 400 || st == 401, "{bad}: {st}");
        assert!(!text.contains("g0hM9SsE"), "the caller sees no signature");
        assert!(rx.try_recv().is_none());
    }
}

/// docs/guides/webhooks.md: "a signed timestamp within the tolerance \[5 minutes, both
/// directions\] ... 401 for a stale or future timestamp" -- timestamps a peer can send: 1970,
/// 9999, i64 bounds, past i64, negative, with a sign, fractional; never 200, never a panic.
#[tokio::test]
async fn hook_standard_extreme_timestamps() {
    let now = 1_800_000_000u64;
    for ts in [
        "0",
        "1",
        "-1",
        "-300",
        "253402300799",
        "9223372036854775807",
        "-9223372036854775808",
        "99999999999999999999999",
        "+1800000000",
        "1800000000.5",
        "0x6B49D200",
        "",
    ] {
        let (q, mut rx) = MemoryQueue::new(10);
        let r =
            WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), q).with_clock(at(now));
        let t: i64 = ts.trim().parse().unwrap_or(0);
        let sig = sign_standard(SW_SECRET, "msg_x", t, b"{}").unwrap();
        let (st, _, _) =
            status_text(r.oneshot(sw_req("msg_x", ts, b"{}", &sig)).await.unwrap()).await;
        assert!(st == 400 || st == 401, "ts {ts:?}: {st}");
        assert!(rx.try_recv().is_none(), "ts {ts:?} queued");
    }
}

/// docs/guides/webhooks.md: the same tolerance edges for Stripe, "Stripe ... signed: timestamp,
/// body", 300 s in either way accepted, 301 s refused with 401.
#[tokio::test]
async fn hook_stripe_tolerance_edges() {
    let ts = 1_700_000_000i64;
    let body = br#"{"id":"evt_s62_1","object":"event"}"#;
    let sig = sign_stripe(STRIPE_SECRET, ts, body);
    for (now, want) in [
        (ts as u64, 200u16),
        (ts as u64 + 300, 200),
        (ts as u64 - 300, 200),
        (ts as u64 + 301, 401),
        (ts as u64 - 301, 401),
    ] {
        let (q, mut rx) = MemoryQueue::new(10);
        let r = WebhookReceiver::new(Stripe::new(STRIPE_SECRET).unwrap(), q).with_clock(at(now));
        let (st, _, _) = status_text(r.oneshot(stripe_req(&sig, body)).await.unwrap()).await;
        assert_eq!(st, want, "now {now}");
        assert_eq!(rx.try_recv().is_some(), want == 200);
    }
    // 1970 and 9999 timestamps, correctly signed.
    for t in [0i64, 253_402_300_799] {
        let (q, mut rx) = MemoryQueue::new(10);
        let r =
            WebhookReceiver::new(Stripe::new(STRIPE_SECRET).unwrap(), q).with_clock(at(ts as u64));
        let (st, _, _) = status_text(
            r.oneshot(stripe_req(&sign_stripe(STRIPE_SECRET, t, body), body))
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(st, 401, "t {t}");
        assert!(rx.try_recv().is_none());
    }
}

/// docs/guides/webhooks.md: the clock itself at the ends of the range: a receiver whose clock
/// reads 1970 or the year 9999 accepts a fresh delivery and keeps its dedup key ("The dedup key
/// is kept at least until the timestamp plus the tolerance plus one second").
#[tokio::test]
async fn hook_clock_at_range_ends() {
    for now in [5u64, 253_402_300_000] {
        let (q, mut rx) = MemoryQueue::new(10);
        let r =
            WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), q).with_clock(at(now));
        let ts = now as i64;
        let sig = sign_standard(SW_SECRET, "msg_edge", ts, b"{}").unwrap();
        for want_event in [true, false] {
            let (st, _, _) = status_text(
                r.clone()
                    .oneshot(sw_req("msg_edge", &ts.to_string(), b"{}", &sig))
                    .await
                    .unwrap(),
            )
            .await;
            assert_eq!(st, 200, "now {now}");
            assert_eq!(rx.try_recv().is_some(), want_event, "now {now}");
        }
    }
}

/// docs/guides/webhooks.md "Cost of hostile input": "only the first `MAX_SIGNATURES` (16) `v1`
/// entries of a Standard Webhooks or Stripe header are considered; the rest are ignored", and
/// "A delivery costs one MAC per configured secret ..., however many signature entries its
/// header lists". 10,000 entries: the valid one first is accepted, the valid one 10,000th is
/// not, and the time stays near one entry's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hook_ten_thousand_signature_entries() {
    let body = vec![b'x'; 1024 * 1024];
    let ts = 1_700_000_000i64;
    let good = sign_standard(SW_SECRET, "msg_many", ts, &body).unwrap();
    let junk = "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=";
    let many_first = std::iter::once(good.as_str())
        .chain(std::iter::repeat_n(junk, 9_999))
        .collect::<Vec<_>>()
        .join(" ");
    let many_last = std::iter::repeat_n(junk, 9_999)
        .chain(std::iter::once(good.as_str()))
        .collect::<Vec<_>>()
        .join(" ");
    let receiver = || {
        let (q, rx) = MemoryQueue::new(10);
        (
            WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), q)
                .with_body_limit(2 * 1024 * 1024)
                .with_clock(at(ts as u64)),
            rx,
        )
    };
    let timed = |sig: String| {
        let body = body.clone();
        async move {
            let (r, _rx) = receiver();
            let t0 = tokio::time::Instant::now();
            let (st, _, _) = status_text(
                r.oneshot(sw_req("msg_many", &ts.to_string(), &body, &sig))
                    .await
                    .unwrap(),
            )
            .await;
            (st, t0.elapsed())
        }
    };
    let (st, _) = timed(many_last.clone()).await;
    assert_eq!(st, 401, "an entry past the 16th is ignored");
    let mut one = Vec::new();
    let mut lots = Vec::new();
    for _ in 0..3 {
        let (st, d) = timed(good.clone()).await;
        assert_eq!(st, 200);
        one.push(d);
        let (st, d) = timed(many_first.clone()).await;
        assert_eq!(st, 200);
        lots.push(d);
    }
    one.sort();
    lots.sort();
    assert!(
        lots[1] < one[1] * 4 + Duration::from_millis(50),
        "1 entry {one:?}, 10,000 entries {lots:?}"
    );
    // Stripe: 10,000 `v1=` entries.
    let sbody = br#"{"id":"evt_many"}"#;
    let sgood = sign_stripe(STRIPE_SECRET, ts, sbody);
    let sgood_v1 = sgood.split(',').nth(1).unwrap().to_owned();
    let junk_hex = format!("v1={}", "ab".repeat(32));
    let s_last = format!(
        "t={ts},{},{sgood_v1}",
        std::iter::repeat_n(junk_hex.as_str(), 9_999)
            .collect::<Vec<_>>()
            .join(",")
    );
    let s_first = format!(
        "t={ts},{sgood_v1},{}",
        std::iter::repeat_n(junk_hex.as_str(), 9_999)
            .collect::<Vec<_>>()
            .join(",")
    );
    for (sig, want) in [(s_last, 401u16), (s_first, 200)] {
        let (q, _rx) = MemoryQueue::new(10);
        let r =
            WebhookReceiver::new(Stripe::new(STRIPE_SECRET).unwrap(), q).with_clock(at(ts as u64));
        let (st, _, _) = status_text(r.oneshot(stripe_req(&sig, sbody)).await.unwrap()).await;
        assert_eq!(st, want);
    }
}

/// docs/guides/webhooks.md: "a duplicate gets 200 and is not queued again" and `EventQueue`'s
/// "of concurrent pushes of one key, exactly one is `Enqueued`": 32 copies at once, one event;
/// a Stripe retry re-signed with a new timestamp is the same event ("Stripe's own retries,
/// which are signed again with a new timestamp, are recognised").
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hook_concurrent_duplicates_processed_once() {
    let ts = 1_700_000_000i64;
    let (q, mut rx) = MemoryQueue::new(100);
    let r = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), q)
        .with_clock(at(ts as u64));
    let sig = sign_standard(SW_SECRET, "msg_dup", ts, b"{}").unwrap();
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let r = r.clone();
        let sig = sig.clone();
        tasks.push(tokio::spawn(async move {
            let resp = r
                .oneshot(sw_req("msg_dup", &ts.to_string(), b"{}", &sig))
                .await
                .unwrap();
            resp.status().as_u16()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert!(rx.try_recv().is_some());
    assert!(rx.try_recv().is_none(), "a duplicate was queued");

    let (q, mut rx) = MemoryQueue::new(100);
    let r = WebhookReceiver::new(Stripe::new(STRIPE_SECRET).unwrap(), q).with_clock(at(ts as u64));
    let body = br#"{"id":"evt_retry","object":"event"}"#;
    for t in [ts - 100, ts - 50, ts] {
        let (st, _, _) = status_text(
            r.clone()
                .oneshot(stripe_req(&sign_stripe(STRIPE_SECRET, t, body), body))
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(st, 200);
    }
    let e = rx.try_recv().unwrap();
    assert_eq!(e.id, "evt_retry");
    assert!(rx.try_recv().is_none());
}

/// A queue whose `push` waits for a gate and then answers as told.
#[derive(Debug, Clone)]
struct GatedQueue {
    gate: Arc<Semaphore>,
    answer: Arc<Mutex<Result<Push, String>>>,
    pushed: Arc<AtomicUsize>,
    finished: Arc<AtomicBool>,
}

impl EventQueue for GatedQueue {
    fn push(&self, _event: WebhookEvent, _ttl: Duration) -> HookFuture<Result<Push, BoxError>> {
        let me = self.clone();
        Box::pin(async move {
            me.pushed.fetch_add(1, Ordering::SeqCst);
            let _p = me.gate.acquire().await.unwrap();
            me.finished.store(true, Ordering::SeqCst);
            let a = me.answer.lock().unwrap().clone();
            a.map_err(BoxError::from)
        })
    }
}

/// docs/guides/webhooks.md: "200 only once the event is queued"; "a full queue gets 503 with
/// `Retry-After`"; RELIABILITY.md "Nothing acknowledged that was not stored" (a queue error:
/// 503 with `Retry-After`, not acknowledged), and the error text reaches no caller.
#[tokio::test]
async fn hook_ack_only_after_push() {
    let ts = 1_700_000_000i64;
    let sig = sign_standard(SW_SECRET, "msg_ack", ts, b"{}").unwrap();
    for (answer, want) in [
        (Ok(Push::Enqueued), 200u16),
        (Ok(Push::Duplicate), 200),
        (Ok(Push::Full), 503),
        (
            Err("s62 queue exploded at redis://:hunter2@db".to_owned()),
            503,
        ),
    ] {
        let q = GatedQueue {
            gate: Arc::new(Semaphore::new(0)),
            answer: Arc::new(Mutex::new(answer.clone())),
            pushed: Arc::new(AtomicUsize::new(0)),
            finished: Arc::new(AtomicBool::new(false)),
        };
        let r = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), q.clone())
            .with_clock(at(ts as u64));
        let mut fut = Box::pin(r.oneshot(sw_req("msg_ack", &ts.to_string(), b"{}", &sig)));
        let early = tokio::time::timeout(Duration::from_millis(50), &mut fut).await;
        assert!(early.is_err(), "answered before the push finished");
        assert_eq!(q.pushed.load(Ordering::SeqCst), 1);
        q.gate.add_permits(1);
        let (st, h, text) = status_text(fut.await.unwrap()).await;
        assert!(q.finished.load(Ordering::SeqCst));
        assert_eq!(st, want, "{answer:?}");
        if want == 503 {
            assert!(h.contains_key("retry-after"), "{answer:?}: no Retry-After");
            assert!(!text.contains("hunter2") && !text.contains("exploded"));
        }
    }
}

/// docs/guides/webhooks.md: "a full queue gets 503 with `Retry-After` and the id is not
/// remembered, so the redelivery is accepted".
#[tokio::test]
async fn hook_full_queue_redelivery_accepted() {
    let ts = 1_700_000_000i64;
    let (q, mut rx) = MemoryQueue::new(1);
    let r = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), q)
        .with_clock(at(ts as u64));
    let send = |id: &'static str| {
        let sig = sign_standard(SW_SECRET, id, ts, b"{}").unwrap();
        r.clone().oneshot(sw_req(id, &ts.to_string(), b"{}", &sig))
    };
    assert_eq!(send("msg_a").await.unwrap().status(), 200);
    let full = send("msg_b").await.unwrap();
    assert_eq!(full.status(), 503);
    assert!(full.headers().contains_key("retry-after"));
    assert_eq!(rx.try_recv().unwrap().id, "msg_a");
    assert_eq!(send("msg_b").await.unwrap().status(), 200);
    assert_eq!(rx.try_recv().unwrap().id, "msg_b");
    assert!(rx.try_recv().is_none());
}

/// docs/guides/webhooks.md: "read up to the limit \[1 MiB, `with_body_limit`\]; past it, 413";
/// "Every rejection answers a short generic text (... `payload too large`)"; one byte under
/// passes; a chunked body with no length too; and a body cut by tower-http's
/// `RequestBodyLimitLayer` outside (RELIABILITY.md: 413).
#[tokio::test]
async fn hook_body_limit_edges() {
    let ts = 1_700_000_000i64;
    let send = |limit: usize, body: Vec<u8>, chunked: bool, outer: Option<usize>| async move {
        let (q, mut rx) = MemoryQueue::new(10);
        let r = WebhookReceiver::new(GitHub::new(GH_SECRET).unwrap(), q)
            .with_body_limit(limit)
            .with_clock(at(ts as u64));
        let sig = sign_github(GH_SECRET, &body);
        let b = if chunked {
            let chunks: Vec<Result<Bytes, std::io::Error>> = body
                .chunks(7)
                .map(|c| Ok(Bytes::copy_from_slice(c)))
                .collect();
            Body::from_stream(futures_util::stream::iter(chunks))
        } else {
            Body::from(body)
        };
        let req = Request::post("/hooks")
            .header("x-hub-signature-256", sig)
            .body(b)
            .unwrap();
        let app = Router::new().route("/hooks", axum::routing::post_service(r));
        let resp = match outer {
            Some(n) => app
                .layer(tower_http::limit::RequestBodyLimitLayer::new(n))
                .oneshot(req)
                .await
                .unwrap(),
            None => app.oneshot(req).await.unwrap(),
        };
        let (st, _, text) = bytes_of(resp).await;
        (
            st.as_u16(),
            String::from_utf8_lossy(&text).into_owned(),
            rx.try_recv().is_some(),
        )
    };
    assert_eq!(send(100, vec![b'a'; 100], false, None).await.0, 200);
    let (st, text, queued) = send(100, vec![b'b'; 101], false, None).await;
    assert_eq!((st, queued), (413, false));
    assert_eq!(text.trim(), "payload too large");
    assert_eq!(send(100, vec![b'c'; 100], true, None).await.0, 200);
    let (st, _, queued) = send(100, vec![b'd'; 101], true, None).await;
    assert_eq!((st, queued), (413, false));
    let (st, _, queued) = send(1 << 20, vec![b'e'; 200], true, Some(50)).await;
    assert_eq!((st, queued), (413, false));
}

/// A `tracing` writer that keeps everything.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Self;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// docs/guides/webhooks.md: "Every rejection answers a short generic text ...; the reason goes
/// to `tracing`. No `Debug` output or log line shows a secret." Neither the secret, the signature
/// the caller sent, nor the signature the secret would have made shows in the answers or the
/// logs (with TRACE on), for bad signatures, stale timestamps and a mangled header.
#[tokio::test]
async fn hook_no_secret_or_signature_leaks() {
    let cap = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(cap.clone())
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let ts = 1_700_000_000i64;
    let body = br#"{"id":"evt_leak"}"#;
    let right = sign_stripe(STRIPE_SECRET, ts, body);
    let right_hex = right.split("v1=").nth(1).unwrap().to_owned();
    let sent_hex = "0123456789abcdef".repeat(4);
    let mut texts = Vec::new();
    let (q, mut rx) = MemoryQueue::new(10);
    let r = WebhookReceiver::new(Stripe::new(STRIPE_SECRET).unwrap(), q).with_clock(at(ts as u64));
    for sig in [
        format!("t={ts},v1={sent_hex}"),
        format!("t={},v1={right_hex}", ts - 10_000),
        format!("t={ts},v1={sent_hex},v1"),
        format!("t=abc,v1={sent_hex}"),
    ] {
        let (st, _, text) =
            status_text(r.clone().oneshot(stripe_req(&sig, body)).await.unwrap()).await;
        assert!(st == 400 || st == 401, "{sig}: {st}");
        texts.push(text);
    }
    assert!(rx.try_recv().is_none());
    // GitHub and Standard Webhooks too.
    let (q, _rx) = MemoryQueue::new(10);
    let gh = WebhookReceiver::new(GitHub::new(GH_SECRET).unwrap(), q);
    let req = Request::post("/h")
        .header("x-hub-signature-256", format!("sha256={sent_hex}"))
        .body(Body::from("Hello, World!"))
        .unwrap();
    texts.push(status_text(gh.clone().oneshot(req).await.unwrap()).await.2);
    let (q, _rx) = MemoryQueue::new(10);
    let sw = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), q)
        .with_clock(at(ts as u64));
    texts.push(
        status_text(
            sw.clone()
                .oneshot(sw_req(
                    "msg_leak",
                    &ts.to_string(),
                    b"{}",
                    "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=",
                ))
                .await
                .unwrap(),
        )
        .await
        .2,
    );
    let sw_right = sign_standard(SW_SECRET, "msg_leak", ts, b"{}").unwrap();
    let gh_right = sign_github(GH_SECRET, b"Hello, World!");
    let logs = String::from_utf8_lossy(&cap.0.lock().unwrap()).into_owned();
    let debug = format!("{r:?} {gh:?} {sw:?}");
    let secrets = [
        STRIPE_SECRET,
        "s62_stripe_secret",
        GH_SECRET,
        SW_SECRET,
        "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        &right_hex,
        &sent_hex,
        &sw_right[3..],
        "Ceo5qEr07ixe2NLpvHk3FH9bwy",
        &gh_right[7..],
    ];
    for s in secrets {
        assert!(!logs.contains(s), "log shows {s:?}:\n{logs}");
        assert!(!debug.contains(s), "Debug shows {s:?}");
        for t in &texts {
            assert!(!t.contains(s), "answer {t:?} shows {s:?}");
            assert!(t.len() < 64, "answer not short: {t:?}");
        }
    }
}

/// docs/guides/webhooks.md: "`webhook-id` (ASCII, 1 to 256 bytes, without a `.`, else 400;
/// spaces and tabs inside are kept)".
#[tokio::test]
async fn hook_standard_id_edges() {
    let ts = 1_700_000_000i64;
    let id256 = "i".repeat(256);
    let id257 = "i".repeat(257);
    for (id, want) in [
        (id256.as_str(), 200u16),
        ("a b\tc", 200),
        (id257.as_str(), 400),
        ("msg.1", 400),
        ("", 400),
    ] {
        let (q, mut rx) = MemoryQueue::new(10);
        let r = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), q)
            .with_clock(at(ts as u64));
        let sig = sign_standard(SW_SECRET, id, ts, b"{}").unwrap();
        let (st, _, _) = status_text(
            r.oneshot(sw_req(id, &ts.to_string(), b"{}", &sig))
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(st, want, "id {:?}", &id[..id.len().min(20)]);
        if want == 200 {
            assert_eq!(rx.try_recv().unwrap().id, id);
        } else {
            assert!(rx.try_recv().is_none());
        }
    }
}

/// Wire: a real axum server with the receiver behind tower-http's `TimeoutLayer`; the sender
/// drops its connection while the push waits; the redelivery is accepted and the event is
/// queued once ("duplicates of one webhook id acknowledged once and processed once").
#[tokio::test]
async fn hook_wire_sender_gone_mid_push() {
    let ts = now_s();
    let (q, mut rx) = MemoryQueue::new(10);
    let slow = SlowPush {
        inner: q,
        first: Arc::new(AtomicBool::new(true)),
    };
    let r = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), slow);
    let app = Router::new().route("/hooks", axum::routing::post_service(r));
    let addr = serve(app).await;
    let sig = sign_standard(SW_SECRET, "msg_wire", ts, b"{}").unwrap();
    let req = || {
        Request::post(format!("http://{addr}/hooks"))
            .header("webhook-id", "msg_wire")
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", sig.clone())
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap()
    };
    let cut = tokio::time::timeout(Duration::from_millis(50), client().request(req())).await;
    assert!(cut.is_err(), "the first push is slow");
    tokio::time::sleep(Duration::from_millis(400)).await;
    for _ in 0..3 {
        let resp = client().request(req()).await.unwrap();
        assert_eq!(resp.status(), 200);
    }
    let first = tokio::time::timeout(Duration::from_secs(1), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.id, "msg_wire");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(rx.try_recv().is_none(), "processed twice");
}

fn now_s() -> i64 {
    sturdy::core::SystemClock
        .now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A `MemoryQueue` whose first push is delayed 200 ms.
#[derive(Debug, Clone)]
struct SlowPush {
    inner: MemoryQueue,
    first: Arc<AtomicBool>,
}

impl EventQueue for SlowPush {
    fn push(&self, event: WebhookEvent, ttl: Duration) -> HookFuture<Result<Push, BoxError>> {
        let slow = self.first.swap(false, Ordering::SeqCst);
        let inner = self.inner.clone();
        Box::pin(async move {
            if slow {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            inner.push(event, ttl).await
        })
    }
}

/// docs/guides/webhooks.md: "`RedisStreamQueue` ... durable and shared by instances. Dedup and
/// append happen in one script"; RELIABILITY.md "A webhook delivery gets 2xx only after Redis
/// answered that the event is in the stream". Two receivers (two instances) on one stream, 16
/// copies of one delivery at once: all 200, one entry, one delivery to the consumer group.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_stream_duplicates_once() {
    let Some(url) = redis_url() else { return };
    let stream = format!("{{{}}}", unique("hooks"));
    let q1 = sturdy::redis::RedisStreamQueue::connect(&url, stream.clone())
        .await
        .unwrap();
    let q2 = sturdy::redis::RedisStreamQueue::connect(&url, stream.clone())
        .await
        .unwrap();
    let mut consumer = sturdy::redis::RedisStreamConsumer::connect(
        &url,
        stream.clone(),
        "g",
        "c1",
        Duration::from_secs(60),
    )
    .await
    .unwrap()
    .with_wait(Duration::from_millis(200));
    let ts = now_s();
    let r1 = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), q1);
    let r2 = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), q2);
    let sig = sign_standard(SW_SECRET, "msg_redis", ts, b"{\"a\":1}").unwrap();
    let mut tasks = Vec::new();
    for i in 0..16 {
        let r = if i % 2 == 0 { r1.clone() } else { r2.clone() };
        let sig = sig.clone();
        tasks.push(tokio::spawn(async move {
            r.oneshot(sw_req("msg_redis", &ts.to_string(), b"{\"a\":1}", &sig))
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    let d = consumer.next().await.unwrap().expect("the event");
    assert_eq!(d.event.id, "msg_redis");
    assert_eq!(&d.event.body[..], b"{\"a\":1}");
    assert_eq!(d.event.timestamp, Some(ts));
    consumer.ack(&d).await.unwrap();
    assert!(
        consumer.next().await.unwrap().is_none(),
        "a duplicate reached the stream"
    );
}

/// docs/guides/webhooks.md: "Every Redis operation is bounded \[1 s\] ...: a Redis that is down
/// or hung gives a clear error, never a hang", and the receiver "fail-closed: 503 with
/// `Retry-After`; the event is not acknowledged" (RELIABILITY.md) -- a hung Redis (a listener
/// that never answers) with a 100 ms timeout.
#[tokio::test]
async fn redis_stream_hung_is_503_fast() {
    let Some(url) = redis_url() else { return };
    // A real queue first, then a proxy-less hung endpoint via a new connection that never answers.
    let hung = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hung_addr = hung.local_addr().unwrap();
    let keep = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (s, _) = hung.accept().await.unwrap();
            held.push(s);
        }
    });
    let _ = url;
    let res = tokio::time::timeout(
        Duration::from_secs(10),
        sturdy::redis::RedisStreamQueue::connect(&format!("redis://{hung_addr}/"), "{s62hung}"),
    )
    .await
    .expect("connect hung past its bound");
    match res {
        Err(e) => {
            let text = e.to_string();
            assert!(!text.is_empty());
        }
        Ok(q) => {
            let r = WebhookReceiver::new(
                StandardWebhooks::new(SW_SECRET).unwrap(),
                q.with_timeout(Duration::from_millis(100)),
            );
            let ts = now_s();
            let sig = sign_standard(SW_SECRET, "msg_hung", ts, b"{}").unwrap();
            let t0 = tokio::time::Instant::now();
            let resp = r
                .oneshot(sw_req("msg_hung", &ts.to_string(), b"{}", &sig))
                .await
                .unwrap();
            assert_eq!(resp.status(), 503);
            assert!(resp.headers().contains_key("retry-after"));
            assert!(t0.elapsed() < Duration::from_secs(2));
        }
    }
    keep.abort();
}

// ---------------------------------------------------------------------------------------------
// second round: pass-through, streamed and failing responses, shutdown, trickled bodies
// ---------------------------------------------------------------------------------------------

/// docs/guides/idempotency.md: "Requests with a method other than POST and PATCH ..., and
/// requests without a key when none is required, pass through untouched": a GET with a blank
/// key and a POST without a key whose body is over the layer's body limit both reach the
/// handler with their whole body; "no key, on a route that requires one | 400".
#[tokio::test]
async fn idem_unkeyed_and_other_methods_pass_untouched() {
    let seen = Arc::new(Mutex::new(Vec::<usize>::new()));
    let s2 = seen.clone();
    let handler = move |body: Bytes| {
        let seen = s2.clone();
        async move {
            seen.lock().unwrap().push(body.len());
            (StatusCode::CREATED, "ok")
        }
    };
    let app = Router::new()
        .route("/orders", post(handler.clone()).get(handler.clone()))
        .layer(mem_layer().with_body_limit(100));
    for _ in 0..2 {
        let get = Request::get("/orders")
            .header("idempotency-key", "")
            .body(Body::from(vec![b'g'; 10]))
            .unwrap();
        assert_eq!(app.clone().oneshot(get).await.unwrap().status(), 201);
        let big = Request::post("/orders")
            .body(Body::from(vec![b'p'; 500]))
            .unwrap();
        assert_eq!(app.clone().oneshot(big).await.unwrap().status(), 201);
    }
    assert_eq!(seen.lock().unwrap().clone(), vec![10, 500, 10, 500]);
    let required = Router::new()
        .route("/orders", post(handler))
        .layer(mem_layer().with_require_key(true));
    let r = required
        .oneshot(Request::post("/orders").body(Body::from("{}")).unwrap())
        .await
        .unwrap();
    assert_problem(r, 400, problem::MISSING_KEY).await;
}

/// docs/guides/idempotency.md: "the stored response (status, headers ..., body)" for a
/// response the handler streams in chunks of unknown length; on the wire, the replay's body
/// is the same bytes and its framing agrees with them.
#[tokio::test]
async fn wire_streamed_response_replayed() {
    let runs = Arc::new(AtomicUsize::new(0));
    let r2 = runs.clone();
    let handler = move || {
        let runs = r2.clone();
        async move {
            runs.fetch_add(1, Ordering::SeqCst);
            let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
                Ok(Bytes::from_static(b"alpha-")),
                Ok(Bytes::from_static(&[0xff, 0x00, 0xfe])),
                Ok(Bytes::from(vec![b'z'; 70_000])),
            ];
            Response::builder()
                .status(201)
                .header("x-stream", "yes")
                .body(Body::from_stream(futures_util::stream::iter(chunks)))
                .unwrap()
        }
    };
    let addr = serve(
        Router::new()
            .route("/orders", post(handler))
            .layer(mem_layer()),
    )
    .await;
    let (s1, h1, b1) = wire_send(addr, "ws-1", "x").await;
    let (s2, h2, b2) = wire_send(addr, "ws-1", "x").await;
    assert_eq!((s1, s2), (StatusCode::CREATED, StatusCode::CREATED));
    assert_eq!(b1.len(), 6 + 3 + 70_000);
    assert_eq!(b2, b1);
    assert_eq!(h1["x-stream"], "yes");
    assert_eq!(h2["x-stream"], "yes");
    assert_eq!(h2["idempotent-replayed"], "true");
    if let Some(cl) = h2.get("content-length") {
        assert_eq!(cl.to_str().unwrap(), b2.len().to_string());
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// `problem::RESPONSE_FAILED`: "500: the handler's response body failed while it was read; the
/// key was released" -- so a retry runs the handler again, and nothing partial is replayed.
#[tokio::test]
async fn idem_failing_response_body_releases_key() {
    let runs = Arc::new(AtomicUsize::new(0));
    let r2 = runs.clone();
    let handler = move || {
        let runs = r2.clone();
        async move {
            let n = runs.fetch_add(1, Ordering::SeqCst);
            let mut chunks: Vec<Result<Bytes, std::io::Error>> =
                vec![Ok(Bytes::from_static(b"partial"))];
            if n == 0 {
                chunks.push(Err(std::io::Error::other("s62 body broke")));
            }
            Response::builder()
                .status(201)
                .body(Body::from_stream(futures_util::stream::iter(chunks)))
                .unwrap()
        }
    };
    let app = Router::new()
        .route("/orders", post(handler))
        .layer(mem_layer());
    let r = app
        .clone()
        .oneshot(keyed("rf-1", "/orders", "{}"))
        .await
        .unwrap();
    let (parts, body) = r.into_parts();
    let collected = body.collect().await;
    if parts.status == StatusCode::INTERNAL_SERVER_ERROR {
        let b = collected.unwrap().to_bytes();
        assert_eq!(problem_type(&b), problem::RESPONSE_FAILED);
        assert!(!String::from_utf8_lossy(&b).contains("s62 body broke"));
    }
    let r = app
        .clone()
        .oneshot(keyed("rf-1", "/orders", "{}"))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert!(r.headers().get("idempotent-replayed").is_none());
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// docs/guides/idempotency.md, "the server shuts down mid-handler | with a graceful shutdown
/// (axum's `with_graceful_shutdown`) the handler finishes and its response is stored and sent".
#[tokio::test]
async fn wire_graceful_shutdown_mid_handler() {
    let store = MemoryStore::default();
    let c = Counter::new(false);
    let app = c.router(IdempotencyLayer::new(
        store.clone(),
        ByCredentials::default(),
    ));
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
    let call = tokio::spawn(wire_send(addr, "gs-1", "bye"));
    tokio::time::timeout(Duration::from_secs(5), async {
        while c.runs() == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .unwrap();
    stop.send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    c.gate.add_permits(1);
    let (st, _, body) = tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(st, StatusCode::CREATED);
    assert_eq!(&body[..], b"run:bye");
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap();
    // Stored: another instance on the same store replays it.
    let other = c.router(IdempotencyLayer::new(store, ByCredentials::default()));
    let mut req = keyed("gs-1", "/orders", "bye");
    req.headers_mut()
        .insert("authorization", HeaderValue::from_static("Bearer s62-wire"));
    let r = other.oneshot(req).await.unwrap();
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    assert_eq!(c.runs(), 1);
}

/// docs/guides/idempotency.md, "the server shuts down mid-handler | ... when the runtime itself
/// is dropped, the task goes with it and the key is held until its lease ends".
#[tokio::test(start_paused = true)]
async fn idem_runtime_dropped_key_held_for_lease() {
    let store = MemoryStore::default();
    let c = Counter::new(false);
    let layer = || {
        IdempotencyLayer::new(store.clone(), ByCredentials::default())
            .with_lease(Duration::from_secs(30))
            .unwrap()
    };
    let other_app = c.router(layer());
    let c2 = c.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            tokio::spawn(other_app.oneshot(keyed("rt-1", "/orders", "{}")));
            while c2.runs() == 0 {
                tokio::task::yield_now().await;
            }
        });
        drop(rt);
    })
    .join()
    .unwrap();
    let app = c.router(layer());
    let r = app
        .clone()
        .oneshot(keyed("rt-1", "/orders", "{}"))
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::CONFLICT,
        "held while the lease lasts"
    );
    tokio::time::advance(Duration::from_secs(31)).await;
    c.gate.add_permits(10);
    let r = app
        .clone()
        .oneshot(keyed("rt-1", "/orders", "{}"))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(c.runs(), 2);
}

/// docs/guides/idempotency.md: keys "sent bare, `k`, or as a structured-field string, `"k"`:
/// the two name the same key" -- also for a key whose string form needs escapes (`a"b` and
/// `"a\"b"`, `a\b` and `"a\\b"`); and "1 to 255 visible ASCII characters": a space is not one.
#[tokio::test]
async fn idem_key_escapes_and_space() {
    let c = Counter::new(true);
    let app = c.router(mem_layer());
    for (bare, quoted) in [(r#"a"b"#, r#""a\"b""#), (r"a\b", r#""a\\b""#)] {
        let r = app
            .clone()
            .oneshot(keyed(bare, "/orders", "{}"))
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED, "{bare}");
        let r = app
            .clone()
            .oneshot(keyed(quoted, "/orders", "{}"))
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED, "{quoted}");
        assert_eq!(
            r.headers().get("idempotent-replayed").map(|v| v.as_bytes()),
            Some(&b"true"[..]),
            "{bare} and {quoted} are one key"
        );
    }
    assert_eq!(c.runs(), 2);
}

/// RELIABILITY.md "an idempotency key | 1 to 255 visible ASCII characters | fixed": a space
/// inside (bare, or inside a structured-field string) is not a visible character.
#[tokio::test]
async fn idem_key_with_space_inside() {
    let c = Counter::new(true);
    let app = c.router(mem_layer());
    for key in ["a b", "\"a b\""] {
        let r = app
            .clone()
            .oneshot(keyed(key, "/orders", "{}"))
            .await
            .unwrap();
        assert_problem(r, 400, problem::INVALID_KEY).await;
    }
    assert_eq!(c.runs(), 0);
}

/// docs/guides/webhooks.md: "A delivery without well-formed, fresh signature headers costs no
/// body read" and "any other gets 403 and is never read": a body that never ends does not hold
/// the answer.
#[tokio::test(start_paused = true)]
async fn hook_bad_headers_answered_without_body() {
    let ts = 1_700_000_000i64;
    let never =
        || Body::from_stream(futures_util::stream::pending::<Result<Bytes, std::io::Error>>());
    let sig = sign_standard(SW_SECRET, "msg_nb", ts - 1_000, b"{}").unwrap();
    let cases: Vec<(Request<Body>, u16, Option<sturdy::webhook::SourceAllowlist>)> = vec![
        (Request::post("/h").body(never()).unwrap(), 400, None),
        (
            Request::post("/h")
                .header("webhook-id", "msg_nb")
                .header("webhook-timestamp", (ts - 1_000).to_string())
                .header("webhook-signature", sig.clone())
                .body(never())
                .unwrap(),
            401,
            None,
        ),
        (
            Request::post("/h")
                .header("webhook-id", "msg_nb")
                .header("webhook-timestamp", ts.to_string())
                .header("webhook-signature", "nonsense")
                .body(never())
                .unwrap(),
            401,
            None,
        ),
        (
            Request::post("/h")
                .header("webhook-id", "msg_nb")
                .header("webhook-timestamp", ts.to_string())
                .header("webhook-signature", sig)
                .body(never())
                .unwrap(),
            403,
            Some(sturdy::webhook::SourceAllowlist::new(["192.0.2.0/24"]).unwrap()),
        ),
    ];
    for (req, want, allow) in cases {
        let (q, _rx) = MemoryQueue::new(10);
        let mut r = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), q)
            .with_clock(at(ts as u64));
        if let Some(a) = allow {
            r = r.with_source_allowlist(a);
        }
        let resp = tokio::time::timeout(Duration::from_secs(5), r.oneshot(req))
            .await
            .unwrap_or_else(|_| panic!("the {want} case waited for the body"))
            .unwrap();
        let st = resp.status().as_u16();
        assert!(
            st == want || (want == 401 && st == 400),
            "want {want}, got {st}"
        );
    }
}

/// docs/guides/webhooks.md: "The timestamp is checked again once the body is in: a body that
/// trickles in past the tolerance gets 401 and is not queued."
#[tokio::test]
async fn hook_trickled_body_past_tolerance() {
    let ts = 1_700_000_000i64;
    for (late, want) in [(Duration::ZERO, 200u16), (Duration::from_secs(302), 401)] {
        let clock = Arc::new(ManualClock::at(UNIX_EPOCH + Duration::from_secs(ts as u64)));
        let (q, mut rx) = MemoryQueue::new(10);
        let r = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), q)
            .with_clock(clock.clone());
        let body = b"{\"slow\":true}";
        let sig = sign_standard(SW_SECRET, "msg_slow", ts, body).unwrap();
        let (tx, chunks) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
        let stream = futures_util::stream::unfold(chunks, |mut rx| async move {
            rx.recv().await.map(|c| (c, rx))
        });
        let req = Request::post("/h")
            .header("webhook-id", "msg_slow")
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", sig)
            .body(Body::from_stream(stream))
            .unwrap();
        let call = tokio::spawn(r.oneshot(req));
        tx.send(Ok(Bytes::copy_from_slice(&body[..5])))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        clock.advance(late);
        tx.send(Ok(Bytes::copy_from_slice(&body[5..])))
            .await
            .unwrap();
        drop(tx);
        let resp = call.await.unwrap().unwrap();
        assert_eq!(resp.status().as_u16(), want, "late {late:?}");
        assert_eq!(rx.try_recv().is_some(), want == 200);
    }
}

/// docs/guides/webhooks.md: "carried header values at most 1 KiB, 4 per name"; GitHub's carried
/// headers "as sent"; and the GH-1 public vector (/work/shared/vectors/STANDARDS.md) verifies.
#[tokio::test]
async fn hook_github_vector_and_carried_headers() {
    assert_eq!(
        sign_github(GH_SECRET, b"Hello, World!"),
        "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    );
    let (q, mut rx) = MemoryQueue::new(10);
    let r = WebhookReceiver::new(GitHub::new(GH_SECRET).unwrap(), q);
    let mut req = Request::post("/h")
        .header(
            "x-hub-signature-256",
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
        )
        .header("x-github-delivery", "d".repeat(1025))
        .header("x-github-hook-id", "h".repeat(1024))
        .body(Body::from("Hello, World!"))
        .unwrap();
    for i in 0..6 {
        req.headers_mut().append(
            "x-github-event",
            HeaderValue::from_str(&format!("ev{i}")).unwrap(),
        );
    }
    let resp = r.oneshot(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let e = rx.try_recv().unwrap();
    assert!(e.headers.get("x-github-delivery").is_none(), "over 1 KiB");
    assert_eq!(e.headers["x-github-hook-id"].len(), 1024);
    let events: Vec<_> = e.headers.get_all("x-github-event").iter().collect();
    assert_eq!(events.len(), 4);
    assert_eq!(events[0], "ev0");
    assert!(e.id.starts_with("sha256:"));
}

/// docs/guides/webhooks.md "Routes": "Events are deduplicated per scheme and route, so two routes
/// sharing a queue never share an id space"; "use the same name for one route in every process".
#[tokio::test]
async fn hook_routes_share_queue_not_ids() {
    let ts = 1_700_000_000i64;
    let (q, mut rx) = MemoryQueue::new(10);
    let mk = |route: &str| {
        WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), q.clone())
            .with_route(route)
            .with_clock(at(ts as u64))
    };
    let sig = sign_standard(SW_SECRET, "msg_rt", ts, b"{}").unwrap();
    for (route, queued) in [("billing", true), ("shipping", true), ("billing", false)] {
        let resp = mk(route)
            .oneshot(sw_req("msg_rt", &ts.to_string(), b"{}", &sig))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let e = rx.try_recv();
        assert_eq!(e.is_some(), queued, "{route}");
        if let Some(e) = e {
            assert_eq!(e.route, route);
        }
    }
}

/// docs/guides/webhooks.md: Stripe is "deduplicated on | the body's `id` (else `sha256:` of
/// `t.body`)" and `MAX_ID_LEN`: "a longer Stripe `id` in the body is not used (the event is
/// deduplicated on a digest instead)"; a nested `id` is not the event's.
#[tokio::test]
async fn hook_stripe_id_edges() {
    let ts = 1_700_000_000i64;
    let id256 = format!("evt_{}", "x".repeat(252));
    let id257 = format!("evt_{}", "x".repeat(253));
    let cases = [
        (format!(r#"{{"id":"{id256}"}}"#), Some(id256.clone())),
        (format!(r#"{{"id":"{id257}"}}"#), None),
        (r#"{"data":{"id":"evt_nested"}}"#.to_owned(), None),
        (r#"{"id":12345}"#.to_owned(), None),
        ("not json at all \u{0}".to_owned(), None),
        (
            r#"{"object":"event","id":"evt_late","data":{"id":"x"}}"#.to_owned(),
            Some("evt_late".to_owned()),
        ),
    ];
    for (body, want) in cases {
        let (q, mut rx) = MemoryQueue::new(10);
        let r =
            WebhookReceiver::new(Stripe::new(STRIPE_SECRET).unwrap(), q).with_clock(at(ts as u64));
        let resp = r
            .oneshot(stripe_req(
                &sign_stripe(STRIPE_SECRET, ts, body.as_bytes()),
                body.as_bytes(),
            ))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{body}");
        let e = rx.try_recv().unwrap();
        match want {
            Some(id) => assert_eq!(e.id, id),
            None => assert!(e.id.starts_with("sha256:"), "{body}: {}", e.id),
        }
        assert_eq!(e.timestamp, Some(ts));
        assert_eq!(&e.body[..], body.as_bytes());
    }
}

// ---------------------------------------------------------------------------------------------
// third round: ambiguity and extremes
// ---------------------------------------------------------------------------------------------

/// docs/guides/idempotency.md: "The fingerprint is SHA-256 over the method, the path and query
/// ... and the body" and "same key, another ... query or body | 422": moving bytes between the
/// query and the body is another request, never a replay of the first.
#[tokio::test]
async fn idem_fingerprint_parts_do_not_run_together() {
    let c = Counter::new(true);
    let app = c.router(mem_layer());
    let r = app
        .clone()
        .oneshot(keyed("fp-1", "/orders?a=1", ""))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    for (path, body) in [
        ("/orders", "?a=1"),
        ("/orders?a", "=1"),
        ("/orders?", "a=1"),
    ] {
        let r = app
            .clone()
            .oneshot(keyed("fp-1", path, body))
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            422,
            "{path} + {body:?} was taken for /orders?a=1 + \"\""
        );
    }
    assert_eq!(c.runs(), 1);
}

/// docs/guides/idempotency.md: "`ByCredentials::default()` reads `Authorization`, ... `X-API-Key`
/// ...; two requests share a key space only when all of them are equal. A request with none of
/// them is in one shared `anonymous` scope." Credentials in another header, or spelling the
/// word `anonymous`, are other clients.
#[tokio::test]
async fn idem_scope_no_collisions() {
    let c = Counter::new(true);
    let app = c.router(IdempotencyLayer::new(
        MemoryStore::default(),
        ByCredentials::default(),
    ));
    let send = |headers: Vec<(&'static str, &'static str)>| {
        let mut req = Request::post("/orders")
            .header("idempotency-key", "scope-x")
            .body(Body::from("{}"))
            .unwrap();
        for (n, v) in headers {
            req.headers_mut().append(n, HeaderValue::from_static(v));
        }
        app.clone().oneshot(req)
    };
    let clients: Vec<Vec<(&'static str, &'static str)>> = vec![
        vec![],
        vec![("authorization", "anonymous")],
        vec![("authorization", "")],
        vec![("x-api-key", "anonymous")],
        vec![("authorization", "k1")],
        vec![("x-api-key", "k1")],
        vec![("authorization", "k1"), ("x-api-key", "k2")],
        vec![("authorization", "k2"), ("x-api-key", "k1")],
        vec![("authorization", "k1k2")],
        vec![("cookie", "k1")],
        vec![("authorization", "k1"), ("authorization", "k2")],
        vec![("authorization", "k1, k2")],
    ];
    for (i, h) in clients.into_iter().enumerate() {
        let what = format!("{h:?}");
        let r = send(h).await.unwrap();
        assert_eq!(r.status(), StatusCode::CREATED, "{what}");
        assert!(
            r.headers().get("idempotent-replayed").is_none(),
            "client #{i} {what} got another client's response"
        );
    }
}

/// docs/guides/idempotency.md: "`.with_cookies(["session_id"])` reads only the named cookies":
/// other cookies and their order do not matter, a cookie whose name only ends the same does.
#[tokio::test]
async fn idem_scope_named_cookie() {
    let c = Counter::new(true);
    let app = c.router(IdempotencyLayer::new(
        MemoryStore::default(),
        ByCredentials::default().with_cookies(["session_id"]),
    ));
    let send = |cookie: &'static str| {
        app.clone().oneshot(
            Request::post("/orders")
                .header("idempotency-key", "ck-1")
                .header("cookie", cookie)
                .body(Body::from("{}"))
                .unwrap(),
        )
    };
    let r = send("session_id=abc; _ga=1").await.unwrap();
    assert!(r.headers().get("idempotent-replayed").is_none());
    let r = send("_ga=2; session_id=abc").await.unwrap();
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    let r = send("xsession_id=abc").await.unwrap();
    assert!(
        r.headers().get("idempotent-replayed").is_none(),
        "xsession_id is another cookie"
    );
    let r = send("session_id=abd").await.unwrap();
    assert!(r.headers().get("idempotent-replayed").is_none());
    assert_eq!(c.runs(), 3);
}

/// docs/guides/idempotency.md: "`with_ttl` and `with_lease` return an error for a zero TTL or a
/// lease under 1 ms ...: invalid settings are reported when the layer is built, never on a
/// request" -- so the largest settings work on a request.
#[tokio::test(start_paused = true)]
async fn idem_largest_ttl_and_lease() {
    assert!(mem_layer().with_ttl(Duration::ZERO).is_err());
    assert!(mem_layer().with_lease(Duration::from_micros(999)).is_err());
    let c = Counter::new(true);
    let layer = mem_layer()
        .with_ttl(Duration::MAX)
        .unwrap()
        .with_lease(Duration::MAX)
        .unwrap();
    let app = c.router(layer);
    for _ in 0..2 {
        let r = app
            .clone()
            .oneshot(keyed("max-1", "/orders", "{}"))
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    tokio::time::advance(Duration::from_secs(86_400 * 365)).await;
    let r = app
        .clone()
        .oneshot(keyed("max-1", "/orders", "{}"))
        .await
        .unwrap();
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    assert_eq!(c.runs(), 1);
}

/// `IdempotencyLayer::with_lease`: "How long a lock outlives its last renewal \[30 s\]. While a
/// handler runs, its lock is renewed every third of the lease"; "a lease under 1 ms" is the only
/// error, so the smallest lease, 1 ms, holds the key while a handler waits.
#[tokio::test(start_paused = true)]
async fn idem_smallest_lease_renewal() {
    let slow = Counter::new(false);
    let app = slow.router(mem_layer().with_lease(Duration::from_millis(1)).unwrap());
    let first = tokio::spawn(app.clone().oneshot(keyed("min-1", "/orders", "{}")));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let r = app
        .clone()
        .oneshot(keyed("min-1", "/orders", "{}"))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);
    slow.gate.add_permits(1);
    assert_eq!(first.await.unwrap().unwrap().status(), StatusCode::CREATED);
    assert_eq!(slow.runs(), 1);
}

/// The same extremes on Redis: `RedisIdempotencyStore`'s lease and TTL are "at least 1 ms, at
/// most about 30 years (`Duration::MAX` included)".
#[tokio::test]
async fn redis_largest_ttl_and_lease() {
    let Some(url) = redis_url() else { return };
    let store = sturdy::redis::RedisIdempotencyStore::connect(&url)
        .await
        .unwrap()
        .with_prefix(unique("idemmax"));
    let c = Counter::new(true);
    let app = c.router(
        IdempotencyLayer::new(store, ByCredentials::default())
            .with_ttl(Duration::MAX)
            .unwrap()
            .with_lease(Duration::MAX)
            .unwrap(),
    );
    for _ in 0..2 {
        let r = app
            .clone()
            .oneshot(keyed("max-r", "/orders", "{}"))
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    assert_eq!(c.runs(), 1);
}

/// docs/guides/idempotency.md, "response the store cannot keep (over a `MemoryStore`'s byte
/// bound) | the handler ran; a 500 marker is stored in its place | the response to the first
/// client; 500 `…/idempotency-response-too-large` on every retry; the handler is not run again".
#[tokio::test(start_paused = true)]
async fn idem_memory_byte_bound() {
    let store = MemoryStore::default().with_max_bytes(4_096).unwrap();
    let c = Counter::new(true);
    let app = c.router(IdempotencyLayer::new(store, ByCredentials::default()));
    let big = "q".repeat(10_000);
    let r = app
        .clone()
        .oneshot(keyed("mb-1", "/orders", big.clone()))
        .await
        .unwrap();
    let (st, _, body) = bytes_of(r).await;
    assert_eq!(st, StatusCode::CREATED);
    assert_eq!(body.len(), 10_004);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let r = app
        .clone()
        .oneshot(keyed("mb-1", "/orders", big))
        .await
        .unwrap();
    assert_problem(r, 500, problem::RESPONSE_TOO_LARGE).await;
    assert_eq!(c.runs(), 1);
}

/// docs/guides/webhooks.md: Standard Webhooks signs "id, timestamp, body" and dedups on
/// `webhook-id`; "Deduplication uses only what the signature covers". A request with two
/// `webhook-id` lines or two `webhook-timestamp` lines must not verify one value and use the
/// other: a captured delivery re-sent with a fresh timestamp line, or a new id line, is refused
/// or a duplicate -- never a new fresh event.
#[tokio::test]
async fn hook_standard_duplicate_header_lines() {
    let now = 1_700_000_000i64;
    let old = now - 3_600;
    let body = b"{\"n\":1}";
    let sig_old = sign_standard(SW_SECRET, "msg_cap", old, body).unwrap();
    let sig_now = sign_standard(SW_SECRET, "msg_cap", now, body).unwrap();
    // Stale timestamp smuggled next to a fresh one.
    for ts_lines in [[now, old], [old, now]] {
        let (q, mut rx) = MemoryQueue::new(10);
        let r = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), q)
            .with_clock(at(now as u64));
        let mut req = Request::post("/h")
            .header("webhook-id", "msg_cap")
            .header("webhook-signature", sig_old.clone())
            .body(Body::from(&body[..]))
            .unwrap();
        for t in ts_lines {
            req.headers_mut()
                .append("webhook-timestamp", HeaderValue::from(t));
        }
        let st = r.oneshot(req).await.unwrap().status().as_u16();
        assert!(st == 400 || st == 401, "timestamps {ts_lines:?}: {st}");
        assert!(rx.try_recv().is_none(), "a stale delivery was queued");
    }
    // A second id line next to the signed one: the event is the signed id's, once.
    let (q, mut rx) = MemoryQueue::new(10);
    let r = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), q)
        .with_clock(at(now as u64));
    let plain = sw_req("msg_cap", &now.to_string(), body, &sig_now);
    assert_eq!(r.clone().oneshot(plain).await.unwrap().status(), 200);
    assert_eq!(rx.try_recv().unwrap().id, "msg_cap");
    for ids in [["msg_new", "msg_cap"], ["msg_cap", "msg_new"]] {
        let mut req = Request::post("/h")
            .header("webhook-timestamp", now.to_string())
            .header("webhook-signature", sig_now.clone())
            .body(Body::from(&body[..]))
            .unwrap();
        for id in ids {
            req.headers_mut()
                .append("webhook-id", HeaderValue::from_static(id));
        }
        let st = r.clone().oneshot(req).await.unwrap().status().as_u16();
        assert!(st == 200 || st == 400 || st == 401, "{ids:?}: {st}");
        if let Some(e) = rx.try_recv() {
            panic!("{ids:?}: the copy was queued again as {:?}", e.id);
        }
    }
}

/// docs/guides/webhooks.md: Stripe signs "timestamp, body", and a stale delivery is refused with
/// 401: a header with two `t=` entries (a fresh one added to a captured stale signature) is
/// refused either way round.
#[tokio::test]
async fn hook_stripe_two_timestamps() {
    let now = 1_700_000_000i64;
    let old = now - 3_600;
    let body = br#"{"id":"evt_cap2"}"#;
    let sig_old = sign_stripe(STRIPE_SECRET, old, body);
    let v1 = sig_old.split(',').nth(1).unwrap().to_owned();
    for header in [
        format!("t={now},t={old},{v1}"),
        format!("t={old},t={now},{v1}"),
        format!("t={old},{v1},t={now}"),
    ] {
        let (q, mut rx) = MemoryQueue::new(10);
        let r =
            WebhookReceiver::new(Stripe::new(STRIPE_SECRET).unwrap(), q).with_clock(at(now as u64));
        let st = r
            .oneshot(stripe_req(&header, body))
            .await
            .unwrap()
            .status()
            .as_u16();
        assert!(st == 400 || st == 401, "{header}: {st}");
        assert!(
            rx.try_recv().is_none(),
            "{header}: a stale delivery was queued"
        );
    }
    // Two Stripe-Signature lines.
    let (q, mut rx) = MemoryQueue::new(10);
    let r = WebhookReceiver::new(Stripe::new(STRIPE_SECRET).unwrap(), q).with_clock(at(now as u64));
    let mut req = stripe_req(&format!("t={now},v1={}", "00".repeat(32)), body);
    req.headers_mut()
        .append("stripe-signature", HeaderValue::from_str(&sig_old).unwrap());
    let st = r.oneshot(req).await.unwrap().status().as_u16();
    assert!(st == 400 || st == 401, "two lines: {st}");
    assert!(rx.try_recv().is_none());
}

/// docs/guides/webhooks.md: "With the age check turned off (`with_tolerance(Duration::MAX)`), a
/// copy passes at any age, so its key is kept as long as the queue keeps a key at all": a 1970
/// delivery is accepted once; the extreme timestamps a peer can sign never panic the receiver.
#[tokio::test]
async fn hook_tolerance_max_extremes() {
    let now = 1_700_000_000u64;
    let (q, mut rx) = MemoryQueue::new(100);
    let r = WebhookReceiver::new(
        StandardWebhooks::new(SW_SECRET)
            .unwrap()
            .with_tolerance(Duration::MAX),
        q,
    )
    .with_clock(at(now));
    for (ts, must_pass) in [
        (0i64, true),
        (1, true),
        (253_402_300_799, true),
        (-1, false),
        (i64::MAX, false),
        (i64::MIN, false),
    ] {
        let id = format!("msg_t{}", ts.unsigned_abs());
        let sig = sign_standard(SW_SECRET, &id, ts, b"{}").unwrap();
        let call = tokio::spawn(r.clone().oneshot(sw_req(&id, &ts.to_string(), b"{}", &sig)));
        let st = call
            .await
            .unwrap_or_else(|e| panic!("ts {ts}: the receiver panicked: {e}"))
            .unwrap()
            .status()
            .as_u16();
        if must_pass {
            assert_eq!(st, 200, "ts {ts}");
            assert!(rx.try_recv().is_some());
            let again = r
                .clone()
                .oneshot(sw_req(&id, &ts.to_string(), b"{}", &sig))
                .await
                .unwrap();
            assert_eq!(again.status(), 200);
            assert!(rx.try_recv().is_none(), "ts {ts}: copy queued again");
        } else {
            assert!(matches!(st, 200 | 400 | 401), "ts {ts}: {st}");
            while rx.try_recv().is_some() {}
        }
    }
}

/// docs/guides/webhooks.md: GitHub's dedup is "while the digest is remembered, that is the dedup
/// TTL"; the Redis queue: "Every Redis operation is bounded ...: a Redis that is down or hung gives
/// a clear error". A dedup TTL under a millisecond (or zero) is a setting, not an outage: the
/// delivery is still acknowledged once queued, never answered 503 forever.
#[tokio::test]
async fn redis_stream_tiny_dedup_ttl() {
    let Some(url) = redis_url() else { return };
    for ttl in [Duration::ZERO, Duration::from_micros(500)] {
        let stream = format!("{{{}}}", unique("ttl"));
        let q = sturdy::redis::RedisStreamQueue::connect(&url, stream.clone())
            .await
            .unwrap();
        let r = WebhookReceiver::new(GitHub::new(GH_SECRET).unwrap(), q).with_dedup_ttl(ttl);
        let req = Request::post("/h")
            .header("x-hub-signature-256", sign_github(GH_SECRET, b"tiny"))
            .body(Body::from("tiny"))
            .unwrap();
        let st = r.oneshot(req).await.unwrap().status().as_u16();
        assert_eq!(st, 200, "dedup ttl {ttl:?}");
    }
}

/// The same tiny dedup TTLs on the in-memory queue.
#[tokio::test]
async fn hook_memory_tiny_dedup_ttl() {
    for ttl in [Duration::ZERO, Duration::from_micros(500), Duration::MAX] {
        let (q, mut rx) = MemoryQueue::new(10);
        let r = WebhookReceiver::new(GitHub::new(GH_SECRET).unwrap(), q).with_dedup_ttl(ttl);
        let req = Request::post("/h")
            .header("x-hub-signature-256", sign_github(GH_SECRET, b"tiny"))
            .body(Body::from("tiny"))
            .unwrap();
        let st = r.oneshot(req).await.unwrap().status().as_u16();
        assert_eq!(st, 200, "dedup ttl {ttl:?}");
        assert!(rx.try_recv().is_some());
    }
}
