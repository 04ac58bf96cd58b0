//! s52: cancellation on the server side of idempotency, and the client key across a dropped
//! call, per docs/guides/idempotency.md.
//!
//! - "first with a key | runs to its end, even if its client goes away; its response is stored
//!   24 h"
//! - "client gone while the store is locking the key (before the handler starts) | the handler
//!   does not run; the store's answer is awaited in the background and, if it locked the key,
//!   the key is released | ... a retry with the same key runs normally (or gets 409 for the
//!   moment the release is on its way)"
//! - "client timeout mid-handler | the handler runs to its end in its own task; its response is
//!   stored | ... a retry with the same key gets 409 in flight (`Retry-After: 1`) while the
//!   handler runs, then the stored response with `Idempotent-Replayed: true`; the handler ran
//!   once"
//! - "connection dropped after the handler committed | ... a retry with the same key gets 409
//!   while the handler still runs, then the stored response"
//! - client: "sets one random UUID v4 per logical POST/PATCH; every retry carries the same key".
#![cfg(feature = "full")]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sturdy::core::CallOptions;
use sturdy::idempotency::server::{
    Begin, ByCredentials, Fingerprint, IdempotencyLayer, IdempotencyStore, LockToken, MemoryStore,
    StoredResponse,
};
use sturdy::retry::RetryLayer;
use sturdy::ClientBuilder;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::timeout;
use tower::{BoxError, ServiceExt};

type BoxFut<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'static>>;

struct App {
    addr: SocketAddr,
    runs: Arc<AtomicUsize>,
    done: Arc<AtomicUsize>,
    gate: Arc<Semaphore>,
}

/// An axum app whose POST /orders counts its runs and waits for `gate` before answering 201.
fn router<S: IdempotencyStore>(
    store: S,
) -> (Router, Arc<AtomicUsize>, Arc<AtomicUsize>, Arc<Semaphore>) {
    let runs = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Semaphore::new(0));
    let handler = {
        let runs = runs.clone();
        let done = done.clone();
        let gate = gate.clone();
        move |body: String| {
            let runs = runs.clone();
            let done = done.clone();
            let gate = gate.clone();
            async move {
                let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                let _p = gate.acquire().await.unwrap();
                done.fetch_add(1, Ordering::SeqCst);
                (StatusCode::CREATED, format!("order {n}: {body}"))
            }
        }
    };
    let app = Router::new()
        .route("/orders", post(handler))
        .layer(IdempotencyLayer::new(store, ByCredentials::default()));
    (app, runs, done, gate)
}

async fn serve(app: Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    addr
}

async fn start() -> App {
    let (app, runs, done, gate) = router(MemoryStore::default());
    let addr = serve(app).await;
    App {
        addr,
        runs,
        done,
        gate,
    }
}

async fn wait_until(what: &str, f: impl Fn() -> bool) {
    let t0 = tokio::time::Instant::now();
    while !f() {
        assert!(t0.elapsed() < Duration::from_secs(3), "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn http() -> Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// One POST with `key`; returns status, whether it was replayed, and the body.
async fn send(addr: SocketAddr, key: &str, body: &'static str) -> (StatusCode, bool, String) {
    let req = Request::post(format!("http://{addr}/orders"))
        .header("idempotency-key", key)
        .header("content-type", "text/plain")
        .body(Full::from(body))
        .unwrap();
    let res = timeout(Duration::from_secs(3), http().request(req))
        .await
        .expect("the server hung")
        .unwrap();
    let status = res.status();
    let replayed = res
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true");
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        replayed,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

/// Retries with `key` until something other than an in-flight 409 comes (at most 3 s).
async fn retry_until_settled(
    addr: SocketAddr,
    key: &str,
    body: &'static str,
) -> (StatusCode, bool, String) {
    let t0 = tokio::time::Instant::now();
    loop {
        let r = send(addr, key, body).await;
        if r.0 != StatusCode::CONFLICT {
            return r;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "still 409 after 3 s: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The client's connection is dropped at three points: before its body was complete, mid-handler,
/// and right after the handler finished. Each time, the retry with the same key gets the one
/// execution's outcome (or runs it, when the handler never started), and the handler runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_dropped_at_each_stage_keeps_exactly_one_execution() {
    // (a) Dropped while the body is still arriving: nothing ran, and the key is not held.
    let app = start().await;
    let mut tcp = TcpStream::connect(app.addr).await.unwrap();
    tcp.write_all(
        b"POST /orders HTTP/1.1\r\nhost: x\r\nidempotency-key: s52-a\r\ncontent-type: text/plain\r\ncontent-length: 5\r\n\r\nab",
    )
    .await
    .unwrap();
    tcp.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(tcp);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        app.runs.load(Ordering::SeqCst),
        0,
        "a partial body ran the handler"
    );
    app.gate.add_permits(1000);
    let (status, replayed, body) = retry_until_settled(app.addr, "s52-a", "abcde").await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert!(!replayed);
    assert_eq!(app.runs.load(Ordering::SeqCst), 1);

    // (b) Dropped mid-handler: the handler runs to its end, and its response is replayed.
    let app = start().await;
    let mut tcp = TcpStream::connect(app.addr).await.unwrap();
    tcp.write_all(
        b"POST /orders HTTP/1.1\r\nhost: x\r\nidempotency-key: s52-b\r\ncontent-type: text/plain\r\ncontent-length: 5\r\n\r\nabcde",
    )
    .await
    .unwrap();
    wait_until("the handler started", || {
        app.runs.load(Ordering::SeqCst) == 1
    })
    .await;
    drop(tcp);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (status, _, body) = send(app.addr, "s52-b", "abcde").await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "a retry while the first handler still runs: {body}"
    );
    app.gate.add_permits(1000);
    let (status, replayed, body) = retry_until_settled(app.addr, "s52-b", "abcde").await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert!(
        replayed,
        "the retry ran the handler again instead of replaying: {body}"
    );
    assert_eq!(body, "order 1: abcde");
    assert_eq!(app.runs.load(Ordering::SeqCst), 1);
    assert_eq!(app.done.load(Ordering::SeqCst), 1);

    // (c) Dropped just as the handler finishes (the gate opens, then the client leaves).
    let app = start().await;
    let mut tcp = TcpStream::connect(app.addr).await.unwrap();
    tcp.write_all(
        b"POST /orders HTTP/1.1\r\nhost: x\r\nidempotency-key: s52-c\r\ncontent-type: text/plain\r\ncontent-length: 5\r\n\r\nabcde",
    )
    .await
    .unwrap();
    wait_until("the handler started", || {
        app.runs.load(Ordering::SeqCst) == 1
    })
    .await;
    app.gate.add_permits(1000);
    drop(tcp);
    let (status, replayed, body) = retry_until_settled(app.addr, "s52-c", "abcde").await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert!(replayed, "{body}");
    assert_eq!(app.runs.load(Ordering::SeqCst), 1);
}

/// The composed client against the real server: an attempt timeout (100 ms) cuts the first
/// attempt mid-handler (the handler takes about 400 ms); the retry meets the in-flight 409 with
/// `Retry-After: 1`, waits, and gets the stored response. The handler ran once, and the caller
/// sees the first execution's 201.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn composed_client_attempt_timeout_mid_handler_ends_with_the_stored_response() {
    let app = start().await;
    let gate = app.gate.clone();
    let runs = app.runs.clone();
    tokio::spawn(async move {
        let t0 = tokio::time::Instant::now();
        while runs.load(Ordering::SeqCst) == 0 && t0.elapsed() < Duration::from_secs(3) {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
        gate.add_permits(1000);
    });
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_deadline(Duration::from_secs(4)))
        .with_attempt_timeout(Duration::from_millis(100))
        .build(http());
    let req = Request::post(format!("http://{}/orders", app.addr))
        .header("content-type", "text/plain")
        .body(Full::from("book"))
        .unwrap();
    let res = timeout(Duration::from_secs(6), client.oneshot(req))
        .await
        .expect("the composed call hung")
        .expect("the composed call failed");
    let status = res.status();
    let replayed = res.headers().get("idempotent-replayed").cloned();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(status, StatusCode::CREATED, "{body:?}");
    assert_eq!(body, "order 1: book");
    assert_eq!(replayed.as_ref().map(|v| v.as_bytes()), Some(&b"true"[..]));
    assert_eq!(app.runs.load(Ordering::SeqCst), 1, "the handler ran twice");
}

/// A store whose `begin` is held at a gate, before (`lock_first: false`) or after
/// (`lock_first: true`) the memory store takes the lock.
#[derive(Clone, Debug)]
struct SlowBegin {
    inner: MemoryStore,
    gate: Arc<Semaphore>,
    lock_first: bool,
    begins: Arc<AtomicUsize>,
}

impl IdempotencyStore for SlowBegin {
    fn begin(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        token: LockToken,
        lease: Duration,
    ) -> BoxFut<Result<Begin, BoxError>> {
        let this = self.clone();
        let key = key.to_owned();
        Box::pin(async move {
            this.begins.fetch_add(1, Ordering::SeqCst);
            if this.lock_first {
                let r = this.inner.begin(&key, fingerprint, token, lease).await;
                let _p = this.gate.acquire().await.unwrap();
                r
            } else {
                let _p = this.gate.acquire().await.unwrap();
                this.inner.begin(&key, fingerprint, token, lease).await
            }
        })
    }
    fn renew(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        token: LockToken,
        lease: Duration,
    ) -> BoxFut<Result<bool, BoxError>> {
        self.inner.renew(key, fingerprint, token, lease)
    }
    fn complete(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        token: LockToken,
        response: StoredResponse,
        ttl: Duration,
    ) -> BoxFut<Result<(), BoxError>> {
        self.inner.complete(key, fingerprint, token, response, ttl)
    }
    fn release(&self, key: &str, token: LockToken) -> BoxFut<Result<(), BoxError>> {
        self.inner.release(key, token)
    }
}

/// The request's future dropped after k polls while the store is locking the key: the handler
/// does not run, and a retry with the same key runs normally (after at most a moment of 409).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_dropped_while_the_store_locks_releases_the_key() {
    for lock_first in [false, true] {
        for k in 0..=3 {
            let store_gate = Arc::new(Semaphore::new(0));
            let begins = Arc::new(AtomicUsize::new(0));
            let store = SlowBegin {
                inner: MemoryStore::default(),
                gate: store_gate.clone(),
                lock_first,
                begins: begins.clone(),
            };
            let (app, runs, _done, gate) = router(store);
            gate.add_permits(1000);
            let key = format!("s52-lock-{lock_first}-{k}");
            let req = || {
                Request::post("http://x/orders")
                    .header("idempotency-key", key.as_str())
                    .header("content-type", "text/plain")
                    .body(axum::body::Body::from("pay"))
                    .unwrap()
            };
            let mut fut = tokio_test::task::spawn(app.clone().oneshot(req()));
            for _ in 0..k {
                let _ = fut.poll();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            drop(fut);
            store_gate.add_permits(1000);
            tokio::time::sleep(Duration::from_millis(30)).await;
            assert_eq!(
                runs.load(Ordering::SeqCst),
                0,
                "lock_first={lock_first} k={k}: the handler ran for a request dropped before it started"
            );
            let t0 = tokio::time::Instant::now();
            let (status, body) = loop {
                let res = timeout(Duration::from_secs(3), app.clone().oneshot(req()))
                    .await
                    .expect("hung")
                    .unwrap();
                let status = res.status();
                let body = res.into_body().collect().await.unwrap().to_bytes();
                if status != StatusCode::CONFLICT {
                    break (status, body);
                }
                assert!(
                    t0.elapsed() < Duration::from_secs(2),
                    "lock_first={lock_first} k={k}: the key stayed locked after its request was dropped: {body:?}"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            };
            assert_eq!(
                status,
                StatusCode::CREATED,
                "lock_first={lock_first} k={k}: {body:?}"
            );
            assert_eq!(body, "order 1: pay");
            assert_eq!(runs.load(Ordering::SeqCst), 1);
        }
    }
}

/// Client keys: a dropped call and a new call of the same request are two logical operations
/// (two keys); a retried call keeps its key. An explicit key is kept across a dropped call.
#[tokio::test(start_paused = true)]
async fn client_key_is_kept_across_retries_and_new_for_a_new_call_after_a_drop() {
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let svc = {
        let seen = seen.clone();
        tower::service_fn(move |req: Request<Full<Bytes>>| {
            let key = req
                .headers()
                .get("idempotency-key")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default();
            let n = {
                let mut s = seen.lock().unwrap();
                s.push(key);
                s.len()
            };
            async move {
                // Odd requests fail with 503 (retried); even ones hang for a minute.
                if n % 2 == 1 {
                    Ok::<_, BoxError>(
                        Response::builder()
                            .status(503)
                            .body(Full::<Bytes>::from("busy"))
                            .unwrap(),
                    )
                } else {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    Ok(Response::new(Full::<Bytes>::from("ok")))
                }
            }
        })
    };
    let client = ClientBuilder::new()
        .without_circuit_breaker()
        .with_attempt_timeout(Duration::from_secs(300))
        .build(svc);
    let order = || {
        Request::post("http://api.example.com/orders")
            .body(Full::from("{}"))
            .unwrap()
    };
    // Call 1: 503, then the retry hangs; the call is dropped during it.
    let r = timeout(Duration::from_secs(10), client.clone().oneshot(order())).await;
    assert!(r.is_err());
    // Call 2, the same request: a new logical operation.
    let r = timeout(Duration::from_secs(10), client.clone().oneshot(order())).await;
    assert!(r.is_err());
    // Call 3 with an explicit key, dropped; call 4 with the same key.
    let mut keyed = order();
    keyed
        .extensions_mut()
        .insert(CallOptions::new().with_idempotency_key("order-77"));
    let r = timeout(Duration::from_secs(10), client.clone().oneshot(keyed)).await;
    assert!(r.is_err());
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 6, "{seen:?}");
    assert!(!seen[0].is_empty());
    assert_eq!(seen[0], seen[1], "a retry changed the key: {seen:?}");
    assert_eq!(seen[2], seen[3], "a retry changed the key: {seen:?}");
    assert_ne!(
        seen[0], seen[2],
        "a new call after a dropped one reused its key: {seen:?}"
    );
    assert_eq!(seen[4], "order-77");
    assert_eq!(seen[5], "order-77");
}
