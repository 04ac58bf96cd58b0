//! s41: the server half of docs/guides/idempotency.md and its rows in docs/RELIABILITY.md,
//! through `sturdy::idempotency::server`, in process (axum routers and tower stacks driven by
//! hand), on paused time where time matters; then what tells two requests apart (the
//! fingerprint, the client scope), tried with values whose bytes run together when concatenated,
//! and the client layer's methods and header.

#![cfg(feature = "full")]

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use sturdy::core::{BoxError, CallOptions};
use sturdy::idempotency::client::IdempotencyKeyLayer;
use sturdy::idempotency::server::{
    problem, Begin, BoxFuture, ByCredentials, Fingerprint, IdempotencyLayer, IdempotencyStore,
    LockToken, MemoryStore, StoredResponse,
};
use sturdy::ClientBuilder;
use tower::limit::ConcurrencyLimitLayer;
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn post_req(uri: &str, key: Option<&str>, body: impl Into<Body>) -> Request<Body> {
    let mut b = Request::builder()
        .method("POST")
        .uri(uri)
        .header("authorization", "Bearer client-a");
    if let Some(k) = key {
        b = b.header("idempotency-key", k);
    }
    b.body(body.into()).unwrap()
}

async fn read<B>(res: Response<B>) -> (StatusCode, HeaderMap, Bytes)
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let (p, b) = res.into_parts();
    (p.status, p.headers, b.collect().await.unwrap().to_bytes())
}

/// One request to `app`, read to the end.
async fn call(app: &Router, req: Request<Body>) -> (StatusCode, HeaderMap, Bytes) {
    read(app.clone().oneshot(req).await.unwrap()).await
}

fn problem_type(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["type"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Polls `fut` until `cond` holds (the handler has started), failing if `fut` ends first.
async fn poll_until<F: Future + Unpin>(fut: &mut F, cond: impl Fn() -> bool) {
    for _ in 0..10_000 {
        if cond() {
            return;
        }
        tokio::select! {
            biased;
            _ = &mut *fut => panic!("the request ended before the handler started"),
            () = tokio::task::yield_now() => {}
        }
    }
    panic!("the handler never started");
}

fn counting_app(
    runs: &Arc<AtomicUsize>,
    wait: Duration,
    layer: IdempotencyLayer<MemoryStore>,
) -> Router {
    let r = runs.clone();
    Router::new()
        .route(
            "/orders",
            post(move || {
                let r = r.clone();
                async move {
                    let n = r.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(wait).await;
                    (StatusCode::CREATED, format!("order {n}"))
                }
            }),
        )
        .layer(layer)
}

fn layer(store: MemoryStore) -> IdempotencyLayer<MemoryStore> {
    IdempotencyLayer::new(store, ByCredentials::default())
}

/// idempotency.md, table: "repeat, same fingerprint, first completed | the stored response
/// (status, headers except connection-level ones such as `Date` and `Content-Length`, body) with
/// `Idempotent-Replayed: true`". A response with a header repeated on several lines (two
/// `Set-Cookie`, two `X-Multi`) is replayed with every line, in order; its `Date` is not.
#[tokio::test(start_paused = true)]
async fn s41_replay_keeps_repeated_headers_in_order_and_drops_date() {
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let app = Router::new()
        .route(
            "/orders",
            post(move || {
                let r = r.clone();
                async move {
                    r.fetch_add(1, Ordering::SeqCst);
                    Response::builder()
                        .status(StatusCode::ACCEPTED)
                        .header("x-multi", "b")
                        .header("set-cookie", "a=1; Path=/")
                        .header("x-multi", "a")
                        .header("set-cookie", "b=2; Path=/")
                        .header("date", "Mon, 01 Jan 2024 00:00:00 GMT")
                        .header("x-one", "1")
                        .body(Body::from("accepted"))
                        .unwrap()
                }
            }),
        )
        .layer(layer(MemoryStore::default()));
    let (s1, h1, b1) = call(&app, post_req("/orders", Some("k"), "{}")).await;
    let (s2, h2, b2) = call(&app, post_req("/orders", Some("k"), "{}")).await;
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!((s1, s2), (StatusCode::ACCEPTED, StatusCode::ACCEPTED));
    assert_eq!(b1, b2);
    assert!(h1.get("idempotent-replayed").is_none());
    assert_eq!(h2.get("idempotent-replayed").unwrap(), "true");
    let all = |h: &HeaderMap, n: &str| -> Vec<String> {
        h.get_all(n)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(all(&h2, "x-multi"), vec!["b", "a"], "{h2:?}");
    assert_eq!(
        all(&h2, "set-cookie"),
        vec!["a=1; Path=/", "b=2; Path=/"],
        "{h2:?}"
    );
    assert_eq!(all(&h2, "x-one"), vec!["1"]);
    assert!(
        h2.get("date")
            .is_none_or(|d| d != "Mon, 01 Jan 2024 00:00:00 GMT"),
        "the first response's Date was replayed: {h2:?}"
    );
}

/// idempotency.md, "Guarantees, per failure": "the server shuts down mid-handler | ... when the
/// runtime itself is dropped, the task goes with it and the key is held until its lease ends |
/// ... otherwise a closed connection, or 503 `…/idempotency-execution-interrupted`". The runtime
/// that runs the handler's task is dropped mid-handler: the request's future, awaited on another
/// runtime, ends with that 503 (it does not hang), and a retry with the same key gets 409 (the
/// handler does not run again).
#[test]
fn s41_dropped_runtime_answers_interrupted_and_holds_the_key() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = counting_app(&runs, secs(3_600), layer(MemoryStore::default()));
    let rt_a = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut fut = Box::pin(app.clone().oneshot(post_req("/orders", Some("k-rt"), "{}")));
    rt_a.block_on(poll_until(&mut fut, || runs.load(Ordering::SeqCst) == 1));
    drop(rt_a);
    let rt_b = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt_b.block_on(async {
        let res = tokio::time::timeout(secs(10), fut)
            .await
            .expect("the request's future hung after its runtime was dropped")
            .unwrap();
        let (s, h, b) = read(res).await;
        assert_eq!(
            s,
            StatusCode::SERVICE_UNAVAILABLE,
            "{}",
            String::from_utf8_lossy(&b)
        );
        assert_eq!(problem_type(&b), problem::INTERRUPTED);
        assert_eq!(h.get("content-type").unwrap(), "application/problem+json");
        let res = app
            .clone()
            .oneshot(post_req("/orders", Some("k-rt"), "{}"))
            .await
            .unwrap();
        let (s, h, b) = read(res).await;
        assert_eq!(s, StatusCode::CONFLICT, "{}", String::from_utf8_lossy(&b));
        assert_eq!(problem_type(&b), problem::IN_FLIGHT);
        assert_eq!(h.get("retry-after").unwrap(), "1");
        assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran again");
    });
}

/// idempotency.md, "Why a started handler runs to its end": "to bound the handlers that run,
/// including those, put the limit inside this layer ...: the permit that the limit's
/// `poll_ready` took goes with the execution and is returned when the handler ends". A tower
/// stack `IdempotencyLayer` over `ConcurrencyLimit(1)`, driven as a kept service: the first
/// request's caller leaves mid-handler (10 s); the kept service is not ready again until that
/// handler has ended, then the next request runs, and the first key replays.
#[tokio::test(start_paused = true)]
async fn s41_concurrency_limit_inside_counts_a_handler_whose_client_left() {
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let handler = service_fn(move |req: Request<Body>| {
        let r = r.clone();
        async move {
            let n = r.fetch_add(1, Ordering::SeqCst);
            let _ = req.into_body().collect().await;
            tokio::time::sleep(secs(10)).await;
            Ok::<_, Infallible>(
                Response::builder()
                    .status(201)
                    .body(Body::from(format!("order {n}")))
                    .unwrap(),
            )
        }
    });
    let mut svc = ServiceBuilder::new()
        .layer(layer(MemoryStore::default()))
        .layer(ConcurrencyLimitLayer::new(1))
        .service(handler);
    let t0 = tokio::time::Instant::now();
    svc.ready().await.unwrap();
    let mut a = Box::pin(svc.call(post_req("/orders", Some("k-a"), "{}")));
    poll_until(&mut a, || runs.load(Ordering::SeqCst) == 1).await;
    drop(a);
    let early = tokio::time::timeout(secs(5), svc.ready()).await;
    assert!(
        early.is_err(),
        "the kept service was ready while the left client's handler still ran"
    );
    svc.ready().await.unwrap();
    assert!(t0.elapsed() >= secs(10), "ready after {:?}", t0.elapsed());
    let (s, _, b) = read(
        svc.call(post_req("/orders", Some("k-b"), "{}"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((s, &b[..]), (StatusCode::CREATED, &b"order 1"[..]));
    svc.ready().await.unwrap();
    let (s, h, b) = read(
        svc.call(post_req("/orders", Some("k-a"), "{}"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((s, &b[..]), (StatusCode::CREATED, &b"order 0"[..]));
    assert_eq!(h.get("idempotent-replayed").unwrap(), "true");
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// idempotency.md, "Stores": "When the store is full, the completed response that expires first
/// makes room". `MemoryStore::new(2)`: after k1, k2 and k3, k1 (stored first, so it expires
/// first) is gone and runs again, while k2 is still replayed.
#[tokio::test(start_paused = true)]
async fn s41_full_memory_store_evicts_the_response_that_expires_first() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = counting_app(&runs, Duration::ZERO, layer(MemoryStore::new(2).unwrap()));
    for k in ["k1", "k2", "k3"] {
        let (s, _, _) = call(&app, post_req("/orders", Some(k), "{}")).await;
        assert_eq!(s, StatusCode::CREATED);
        tokio::time::advance(secs(1)).await;
    }
    let (_, h, b) = call(&app, post_req("/orders", Some("k2"), "{}")).await;
    assert_eq!(&b[..], b"order 1");
    assert_eq!(
        h.get("idempotent-replayed").unwrap(),
        "true",
        "k2 was evicted before k1"
    );
    let (_, h, b) = call(&app, post_req("/orders", Some("k1"), "{}")).await;
    assert_eq!(&b[..], b"order 3", "k1 should have made room");
    assert!(h.get("idempotent-replayed").is_none());
}

/// idempotency.md, table: "store unreachable, or full of running requests | 503, `Retry-After:
/// 1`, `…/idempotency-store-unavailable`; the handler does not run"; "Stores": "a running
/// request's lock is never evicted".
#[tokio::test(start_paused = true)]
async fn s41_store_full_of_running_requests_answers_503() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = counting_app(&runs, secs(60), layer(MemoryStore::new(1).unwrap()));
    let mut a = Box::pin(app.clone().oneshot(post_req("/orders", Some("k1"), "{}")));
    poll_until(&mut a, || runs.load(Ordering::SeqCst) == 1).await;
    let (s, h, b) = call(&app, post_req("/orders", Some("k2"), "{}")).await;
    assert_eq!(
        s,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        String::from_utf8_lossy(&b)
    );
    assert_eq!(h.get("retry-after").unwrap(), "1");
    assert_eq!(problem_type(&b), problem::STORE_UNAVAILABLE);
    assert_eq!(runs.load(Ordering::SeqCst), 1, "k2's handler ran");
    // k1's lock was not evicted: a retry of k1 is in flight.
    let (s, _, b) = call(&app, post_req("/orders", Some("k1"), "{}")).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(problem_type(&b), problem::IN_FLIGHT);
    let (s, _, b) = read(a.await.unwrap()).await;
    assert_eq!((s, &b[..]), (StatusCode::CREATED, &b"order 0"[..]));
}

/// RELIABILITY.md, "Bounds": "a handler whose client went away | runs to its end; its key is
/// held (lease 30 s, renewed) until its outcome is stored". A 100 s handler whose client left at
/// once: retries at 31 s, 61 s and 95 s get 409 (the handler ran once); after it ends, the stored
/// response.
#[tokio::test(start_paused = true)]
async fn s41_left_handler_holds_its_key_past_three_default_leases() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = counting_app(&runs, secs(100), layer(MemoryStore::default()));
    let t0 = tokio::time::Instant::now();
    let mut a = Box::pin(
        app.clone()
            .oneshot(post_req("/orders", Some("k-long"), "{}")),
    );
    poll_until(&mut a, || runs.load(Ordering::SeqCst) == 1).await;
    drop(a);
    for at in [31, 61, 95] {
        tokio::time::sleep_until(t0 + secs(at)).await;
        let (s, h, b) = call(&app, post_req("/orders", Some("k-long"), "{}")).await;
        assert_eq!(
            s,
            StatusCode::CONFLICT,
            "at {at} s: {}",
            String::from_utf8_lossy(&b)
        );
        assert_eq!(h.get("retry-after").unwrap(), "1");
        assert_eq!(
            runs.load(Ordering::SeqCst),
            1,
            "at {at} s the handler ran again"
        );
    }
    tokio::time::sleep_until(t0 + secs(101)).await;
    let (s, h, b) = call(&app, post_req("/orders", Some("k-long"), "{}")).await;
    assert_eq!((s, &b[..]), (StatusCode::CREATED, &b"order 0"[..]));
    assert_eq!(h.get("idempotent-replayed").unwrap(), "true");
}

/// idempotency.md, table: "body over the limit (1 MiB, `with_body_limit`) | 413"; "A stored
/// response is at most 1 MiB (`with_response_limit`): a handler whose response is larger has
/// run, so it is not run again; its key replays a 500 `…/idempotency-response-too-large`". At
/// the bounds: a body of exactly 1 MiB runs, one byte more is 413 without running; a response
/// of exactly 1 MiB is stored and replayed, one byte more replays the 500 marker.
#[tokio::test(start_paused = true)]
async fn s41_one_mib_bounds_are_inclusive() {
    const MIB: usize = 1024 * 1024;
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let app = Router::new()
        .route(
            "/echo",
            post(move |body: Bytes| {
                let r = r.clone();
                async move {
                    r.fetch_add(1, Ordering::SeqCst);
                    let n: usize = std::str::from_utf8(&body[..body.len().min(16)])
                        .ok()
                        .and_then(|s| s.trim_end_matches('.').parse().ok())
                        .unwrap_or(0);
                    "y".repeat(n)
                }
            }),
        )
        .layer(layer(MemoryStore::default()));
    let body_of = |n: usize| {
        let mut v = vec![b'.'; n];
        v[..1].copy_from_slice(b"0");
        v
    };
    let (s, _, _) = call(&app, post_req("/echo", Some("b-eq"), body_of(MIB))).await;
    assert_eq!(s, StatusCode::OK, "a body of exactly 1 MiB");
    let before = runs.load(Ordering::SeqCst);
    let (s, _, b) = call(&app, post_req("/echo", Some("b-over"), body_of(MIB + 1))).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(problem_type(&b), problem::BODY_TOO_LARGE);
    assert_eq!(runs.load(Ordering::SeqCst), before);

    for (key, n, stored) in [("r-eq", MIB, true), ("r-over", MIB + 1, false)] {
        let body = format!("{n}");
        let (s, _, _) = call(&app, post_req("/echo", Some(key), body.clone())).await;
        let _ = s;
        let before = runs.load(Ordering::SeqCst);
        let (s, h, b) = call(&app, post_req("/echo", Some(key), body)).await;
        assert_eq!(
            runs.load(Ordering::SeqCst),
            before,
            "{key}: the handler ran again"
        );
        if stored {
            assert_eq!(s, StatusCode::OK, "{key}: {}", problem_type(&b));
            assert_eq!(b.len(), n, "{key}");
            assert_eq!(h.get("idempotent-replayed").unwrap(), "true");
        } else {
            assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR, "{key}");
            assert_eq!(problem_type(&b), problem::RESPONSE_TOO_LARGE);
        }
    }
}

/// A store that records every key it is given, over a `MemoryStore`.
#[derive(Debug, Clone)]
struct Recording {
    inner: MemoryStore,
    keys: Arc<Mutex<Vec<String>>>,
}

impl IdempotencyStore for Recording {
    fn begin(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        token: LockToken,
        lease: Duration,
    ) -> BoxFuture<Result<Begin, BoxError>> {
        self.keys.lock().unwrap().push(key.to_owned());
        self.inner.begin(key, fingerprint, token, lease)
    }
    fn renew(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        token: LockToken,
        lease: Duration,
    ) -> BoxFuture<Result<bool, BoxError>> {
        self.keys.lock().unwrap().push(key.to_owned());
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
        self.keys.lock().unwrap().push(key.to_owned());
        self.inner.complete(key, fingerprint, token, response, ttl)
    }
    fn release(&self, key: &str, token: LockToken) -> BoxFuture<Result<(), BoxError>> {
        self.keys.lock().unwrap().push(key.to_owned());
        self.inner.release(key, token)
    }
}

/// idempotency.md, "Client scope": "The scope goes into the store only as a SHA-256 hash, never
/// as the credential." Requests with a bearer token, an API key and a session cookie: no key the
/// store is given holds any of them, two clients get different store keys, and the layer's
/// `Debug` shows none of them either.
#[tokio::test(start_paused = true)]
async fn s41_store_sees_the_scope_only_as_a_hash() {
    let store = Recording {
        inner: MemoryStore::default(),
        keys: Arc::default(),
    };
    let layer = IdempotencyLayer::new(store.clone(), ByCredentials::default());
    let app = Router::new()
        .route("/orders", post(|| async { (StatusCode::CREATED, "ok") }))
        .layer(layer.clone());
    let secrets = ["Bearer s3cr3t-T0KEN", "ak-9f8e7d6c", "sid=AbCdEf123"];
    for (i, auth) in [secrets[0], "Bearer other-client"].into_iter().enumerate() {
        let r = Request::post("/orders")
            .header("authorization", auth)
            .header("x-api-key", secrets[1])
            .header("cookie", secrets[2])
            .header("idempotency-key", "same-key")
            .body(Body::from("{}"))
            .unwrap();
        let (s, _, _) = read(app.clone().oneshot(r).await.unwrap()).await;
        assert_eq!(s, StatusCode::CREATED, "client {i}");
    }
    let keys = store.keys.lock().unwrap().clone();
    assert!(!keys.is_empty());
    for k in &keys {
        for s in secrets
            .iter()
            .chain(["s3cr3t", "9f8e7d6c", "AbCdEf123", "other-client"].iter())
        {
            assert!(!k.contains(s), "store key {k:?} holds {s:?}");
        }
    }
    let distinct: std::collections::BTreeSet<_> = keys.iter().collect();
    assert!(
        distinct.len() >= 2,
        "two clients shared a store key: {keys:?}"
    );
    let dbg = format!("{layer:?}");
    assert!(!dbg.contains("s3cr3t"), "{dbg}");
}

/// idempotency.md, "Client": "one with characters beyond ASCII is sent as its UTF-8 bytes, which
/// many servers refuse (sturdy's own server layer answers 400)". Through `ClientBuilder`, a POST
/// with `CallOptions::with_idempotency_key("ключ-1")` reaches the server with those UTF-8 bytes,
/// and sturdy's server layer answers 400 `…/idempotency-key-invalid`.
#[tokio::test(start_paused = true)]
async fn s41_non_ascii_call_option_key_goes_as_utf8_and_is_refused() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = counting_app(&runs, Duration::ZERO, layer(MemoryStore::default()));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let http = service_fn(move |r: Request<Full<Bytes>>| {
        let app = app.clone();
        let seen = seen2.clone();
        async move {
            seen.lock().unwrap().push(
                r.headers()
                    .get_all("idempotency-key")
                    .iter()
                    .map(|v| v.as_bytes().to_vec())
                    .collect::<Vec<_>>(),
            );
            let (p, b) = r.into_parts();
            let res = app.oneshot(Request::from_parts(p, Body::new(b))).await?;
            let (p, b) = res.into_parts();
            let b = b.collect().await?.to_bytes();
            Ok::<_, BoxError>(Response::from_parts(p, Full::new(b)))
        }
    });
    let client = ClientBuilder::new().build(http);
    let mut r = Request::post("http://api.example.com/orders")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    r.extensions_mut()
        .insert(CallOptions::new().with_idempotency_key("ключ-1"));
    let res = client.oneshot(r).await.unwrap();
    let (p, b) = res.into_parts();
    let b = b.collect().await.unwrap().to_bytes();
    assert_eq!(
        seen.lock().unwrap()[0],
        vec!["ключ-1".as_bytes().to_vec()],
        "the key was not sent as its UTF-8 bytes"
    );
    assert_eq!(p.status, StatusCode::BAD_REQUEST);
    assert_eq!(problem_type(&b), problem::INVALID_KEY);
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

/// idempotency.md: "`with_ttl` and `with_lease` return an error for a zero TTL or a lease under 1
/// ms, and `MemoryStore::new(0)` for a store of no entries"; RELIABILITY.md: "durations set to
/// `Duration::MAX` ...: never a panic". At the edges: a 1 ms lease and a 1 ns TTL are taken,
/// 999 µs and zero refused; `Duration::MAX` for both serves and replays a request.
#[tokio::test(start_paused = true)]
async fn s41_lease_and_ttl_edges() {
    let l = || layer(MemoryStore::default());
    assert!(l().with_lease(Duration::from_millis(1)).is_ok());
    assert!(l().with_lease(Duration::from_micros(999)).is_err());
    assert!(l().with_lease(Duration::ZERO).is_err());
    assert!(l().with_ttl(Duration::from_nanos(1)).is_ok());
    assert!(l().with_ttl(Duration::ZERO).is_err());
    assert!(MemoryStore::new(0).is_err());
    assert!(MemoryStore::new(1).is_ok());
    let max = l()
        .with_lease(Duration::MAX)
        .unwrap()
        .with_ttl(Duration::MAX)
        .unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let app = counting_app(&runs, secs(1), max);
    for _ in 0..2 {
        let (s, _, b) = call(&app, post_req("/orders", Some("k-max"), "{}")).await;
        assert_eq!((s, &b[..]), (StatusCode::CREATED, &b"order 0"[..]));
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// An app under the layer, at any path, whose handler counts its runs and answers
/// `run <n>`.
fn app(runs: &Arc<AtomicUsize>, layer: IdempotencyLayer<MemoryStore>) -> Router {
    let r = runs.clone();
    Router::new()
        .fallback(move || {
            let r = r.clone();
            async move {
                let n = r.fetch_add(1, Ordering::SeqCst);
                (StatusCode::CREATED, format!("run {n}"))
            }
        })
        .layer(layer)
}

async fn send(app: &Router, r: Request<Body>) -> (StatusCode, bool, String) {
    let res = app.clone().oneshot(r).await.unwrap();
    let replayed = res.headers().contains_key("idempotent-replayed");
    let status = res.status();
    let b = res.into_body().collect().await.unwrap().to_bytes();
    (status, replayed, String::from_utf8_lossy(&b).into_owned())
}

fn build(
    method: &str,
    uri: &str,
    headers: &[(&'static str, &'static str)],
    body: &'static str,
) -> Request<Body> {
    let mut b = Request::builder()
        .method(method)
        .uri(uri)
        .header("idempotency-key", "same-key");
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    b.body(Body::from(body)).unwrap()
}

/// idempotency.md, table: "same key, another method, path, query or body | 422"; "The
/// fingerprint is SHA-256 over the method, the path and query ... and the body". Pairs whose
/// path, query and body spell the same bytes when run together (`/ab` + `c` against `/a` +
/// `bc`, `/o?x` + `` against `/o` + `?x`, `/o?a=1` + `&b` against `/o?a=1&b` + ``) are different
/// requests: the second is 422, never the first one's response.
#[tokio::test(start_paused = true)]
async fn s41_fingerprint_parts_do_not_run_together() {
    let pairs: &[((&str, &str, &'static str), (&str, &str, &'static str))] = &[
        (("POST", "/ab", "c"), ("POST", "/a", "bc")),
        (("POST", "/o?x", ""), ("POST", "/o", "?x")),
        (("POST", "/o?a=1", "&b"), ("POST", "/o?a=1&b", "")),
        (("POST", "/o", ""), ("POST", "/o?", "")),
        (("PATCH", "/o", "x"), ("POST", "/o", "x")),
    ];
    for (a, b) in pairs {
        let runs = Arc::new(AtomicUsize::new(0));
        let app = app(
            &runs,
            IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default()),
        );
        let (s, _, body) = send(&app, build(a.0, a.1, &[("authorization", "t")], a.2)).await;
        assert_eq!((s, body.as_str()), (StatusCode::CREATED, "run 0"), "{a:?}");
        let (s, replayed, body) = send(&app, build(b.0, b.1, &[("authorization", "t")], b.2)).await;
        assert!(
            !replayed,
            "{b:?} after {a:?} under one key was answered with the first's response: {s} {body}"
        );
        assert_eq!(
            s,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{b:?} after {a:?}: {body}"
        );
    }
}

/// idempotency.md, "Client scope": "`ByCredentials::default()` reads `Authorization`,
/// `Proxy-Authorization`, `X-API-Key`, `API-Key`, `X-Auth-Token`, `X-Access-Token` and `Cookie`;
/// two requests share a key space only when all of them are equal" and "one client never gets
/// another's stored response". Credentials whose values run together, or the same value in
/// another header, are other clients: each runs its own handler under the same key.
#[tokio::test(start_paused = true)]
async fn s41_scope_values_do_not_run_together() {
    type H = &'static [(&'static str, &'static str)];
    let pairs: &[(H, H)] = &[
        (
            &[("authorization", "a"), ("x-api-key", "bc")],
            &[("authorization", "ab"), ("x-api-key", "c")],
        ),
        (&[("authorization", "k1")], &[("x-api-key", "k1")]),
        (&[("x-auth-token", "k1")], &[("x-access-token", "k1")]),
        (&[("api-key", "k1")], &[("proxy-authorization", "k1")]),
        (&[("cookie", "k1")], &[("authorization", "k1")]),
        (
            &[("authorization", "a,b")],
            &[("authorization", "a"), ("authorization", "b")],
        ),
        (&[("x-api-key", "")], &[]),
    ];
    for (a, b) in pairs {
        let runs = Arc::new(AtomicUsize::new(0));
        let app = app(
            &runs,
            IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default()),
        );
        let (s, _, _) = send(&app, build("POST", "/orders", a, "{}")).await;
        assert_eq!(s, StatusCode::CREATED, "{a:?}");
        let (s, replayed, body) = send(&app, build("POST", "/orders", b, "{}")).await;
        assert!(
            !replayed && runs.load(Ordering::SeqCst) == 2,
            "client {b:?} got client {a:?}'s stored response: {s} {body}"
        );
    }
}

/// idempotency.md, "Client scope": "`.with_cookies(["session_id"])` reads only the named
/// cookies". The same session with other cookies around it (in another order, on two `Cookie`
/// lines) is one client; `xsession_id=` or `session_id` spelled as another cookie's value is
/// not that session.
#[tokio::test(start_paused = true)]
async fn s41_named_cookie_scope() {
    let runs = Arc::new(AtomicUsize::new(0));
    let shared = app(
        &runs,
        IdempotencyLayer::new(
            MemoryStore::default(),
            ByCredentials::default().with_cookies(["session_id"]),
        ),
    );
    let (s, _, _) = send(
        &shared,
        build("POST", "/o", &[("cookie", "session_id=abc; _ga=1")], "{}"),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    for same in [
        &[("cookie", "_ga=2; session_id=abc")][..],
        &[("cookie", "_ga=3"), ("cookie", "session_id=abc")][..],
    ] {
        let (_, replayed, body) = send(&shared, build("POST", "/o", same, "{}")).await;
        assert!(replayed, "{same:?} is the same session: {body}");
    }
    for other in [
        &[("cookie", "session_id=abd; _ga=1")][..],
        &[("cookie", "xsession_id=abc")][..],
        &[("cookie", "_ga=session_id=abc")][..],
        &[("cookie", "_ga=1")][..],
    ] {
        // A fresh store each time: requests without the named cookie share one scope.
        let runs = Arc::new(AtomicUsize::new(0));
        let fresh = app(
            &runs,
            IdempotencyLayer::new(
                MemoryStore::default(),
                ByCredentials::default().with_cookies(["session_id"]),
            ),
        );
        send(
            &fresh,
            build("POST", "/o", &[("cookie", "session_id=abc")], "{}"),
        )
        .await;
        let (_, replayed, body) = send(&fresh, build("POST", "/o", other, "{}")).await;
        assert!(
            !replayed && runs.load(Ordering::SeqCst) == 2,
            "{other:?} was taken for session abc: {body}"
        );
    }
}

#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<(Method, Vec<Vec<u8>>)>>>);

impl Seen {
    fn service(
        &self,
        status: u16,
    ) -> impl tower::Service<
        Request<Full<Bytes>>,
        Response = Response<Full<Bytes>>,
        Error = BoxError,
        Future = impl Send,
    > + Clone
           + Send
           + Sync
           + 'static {
        let me = self.clone();
        service_fn(move |r: Request<Full<Bytes>>| {
            let me = me.clone();
            async move {
                let n = {
                    let mut v = me.0.lock().unwrap();
                    v.push((
                        r.method().clone(),
                        r.headers()
                            .get_all("idempotency-key")
                            .iter()
                            .map(|v| v.as_bytes().to_vec())
                            .collect(),
                    ));
                    v.len()
                };
                let s = if n == 1 { status } else { 200 };
                Ok::<_, BoxError>(
                    Response::builder()
                        .status(s)
                        .body(Full::new(Bytes::new()))
                        .unwrap(),
                )
            }
        })
    }
}

/// idempotency.md, "Client": "`.with_header(name)` and `.with_methods([..])` change the header
/// and the methods". With `.with_methods([Method::PUT])` in a `ClientBuilder`, a POST gets no
/// key (so its 503 is not retried) and a PUT gets one, the same on its retry.
#[tokio::test(start_paused = true)]
async fn s41_client_with_methods_changes_which_calls_get_a_key() {
    let seen = Seen::default();
    let client = ClientBuilder::new()
        .with_idempotency(IdempotencyKeyLayer::new().with_methods([Method::PUT]))
        .build(seen.service(503));
    let r = Request::post("http://api.example.com/o")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let res = client.clone().oneshot(r).await.unwrap();
    assert_eq!(res.status(), 503);
    {
        let v = seen.0.lock().unwrap();
        assert_eq!(v.len(), 1, "the unkeyed POST was sent again");
        assert!(v[0].1.is_empty(), "the POST got a key: {:?}", v[0].1);
    }
    let seen = Seen::default();
    let client = ClientBuilder::new()
        .with_idempotency(IdempotencyKeyLayer::new().with_methods([Method::PUT]))
        .build(seen.service(503));
    let r = Request::put("http://api.example.com/o")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let res = client.oneshot(r).await.unwrap();
    assert_eq!(res.status(), 200);
    let v = seen.0.lock().unwrap();
    assert_eq!(v.len(), 2);
    assert_eq!(v[0].1.len(), 1, "the PUT got no key");
    assert_eq!(v[0].1, v[1].1, "one key for both attempts");
}

/// idempotency.md, "Client": "`.with_header(name)` ... change the header"; a key the caller
/// already put in that header is kept.
#[tokio::test(start_paused = true)]
async fn s41_client_keeps_a_callers_key_in_a_custom_header() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let http = service_fn(move |r: Request<Full<Bytes>>| {
        let seen = seen2.clone();
        async move {
            seen.lock().unwrap().push(
                r.headers()
                    .get_all("x-op-id")
                    .iter()
                    .map(|v| v.as_bytes().to_vec())
                    .collect::<Vec<_>>(),
            );
            Ok::<_, BoxError>(Response::new(Full::new(Bytes::new())))
        }
    });
    let client = ClientBuilder::new()
        .with_idempotency(
            IdempotencyKeyLayer::new().with_header(HeaderName::from_static("x-op-id")),
        )
        .build(http);
    let r = Request::post("http://api.example.com/o")
        .header("x-op-id", "mine-1")
        .body(Full::new(Bytes::new()))
        .unwrap();
    client.oneshot(r).await.unwrap();
    assert_eq!(seen.lock().unwrap()[0], vec![b"mine-1".to_vec()]);
}

/// RELIABILITY.md, "Bounds": "idempotency keys kept in memory | 100,000 keys and 64 MiB; expired
/// keys purged"; idempotency.md, "Stores": "an expired entry is purged as time passes, is not
/// counted by `len()` and takes no slot". The defaults are those numbers; a response stored for
/// 1 s is not counted 2 s later, and in a store of one entry a lock whose lease ran out does not
/// keep a new key out.
#[tokio::test(start_paused = true)]
async fn s41_memory_store_defaults_and_expiry() {
    assert_eq!(MemoryStore::DEFAULT_MAX_ENTRIES, 100_000);
    assert_eq!(MemoryStore::DEFAULT_MAX_BYTES, 64 * 1024 * 1024);
    let store = MemoryStore::default();
    let runs = Arc::new(AtomicUsize::new(0));
    let app = counting_app(
        &runs,
        Duration::ZERO,
        layer(store.clone()).with_ttl(secs(1)).unwrap(),
    );
    let (s, _, _) = call(&app, post_req("/orders", Some("k-ttl"), "{}")).await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(store.len(), 1);
    tokio::time::advance(secs(2)).await;
    assert_eq!(store.len(), 0, "an expired response is still counted");
    assert!(store.is_empty());

    // A lock left by a begin whose execution vanished (no renewal), in a store of one entry.
    let one = MemoryStore::new(1).unwrap();
    let begun = one
        .begin("orphan", [0; 32], LockToken::random(), secs(1))
        .await
        .unwrap();
    assert_eq!(begun, Begin::Started);
    tokio::time::advance(secs(2)).await;
    assert_eq!(one.len(), 0, "an expired lock is still counted");
    let runs = Arc::new(AtomicUsize::new(0));
    let app = counting_app(&runs, Duration::ZERO, layer(one));
    let (s, _, b) = call(&app, post_req("/orders", Some("k-new"), "{}")).await;
    assert_eq!(s, StatusCode::CREATED, "{}", String::from_utf8_lossy(&b));
}

/// A store whose `begin` takes the lock and then reports a timeout (as if the answer was lost),
/// and whose `release` fails until `release_ok` is set; it records when `release` is tried.
#[derive(Debug, Clone)]
struct LostAnswer {
    inner: MemoryStore,
    release_ok: Arc<std::sync::atomic::AtomicBool>,
    releases: Arc<Mutex<Vec<tokio::time::Instant>>>,
}

impl IdempotencyStore for LostAnswer {
    fn begin(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        token: LockToken,
        lease: Duration,
    ) -> BoxFuture<Result<Begin, BoxError>> {
        let fut = self.inner.begin(key, fingerprint, token, lease);
        Box::pin(async move {
            let _ = fut.await?;
            Err::<Begin, BoxError>(Box::new(sturdy::core::Error::new(
                sturdy::core::ErrorKind::Timeout,
                "the store did not answer within 1s",
            )))
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
        self.inner.complete(key, fingerprint, token, response, ttl)
    }
    fn release(&self, key: &str, token: LockToken) -> BoxFuture<Result<(), BoxError>> {
        self.releases
            .lock()
            .unwrap()
            .push(tokio::time::Instant::now());
        if self.release_ok.load(Ordering::SeqCst) {
            self.inner.release(key, token)
        } else {
            Box::pin(async {
                Err::<(), BoxError>(Box::new(sturdy::core::Error::new(
                    sturdy::core::ErrorKind::Connect,
                    "Redis cannot be reached",
                )))
            })
        }
    }
}

/// idempotency.md, "Guarantees, per failure": "store down when the request arrives | 503 ...;
/// the handler does not run; if the store's `begin` may have locked the key before failing (a
/// timeout ...), the lock is released in the background, tried again (50 ms apart, doubling up to
/// 1 s) while the store still fails, until the lease would have freed it | 503; a later retry with
/// the same key runs normally once the store answers again". A `begin` that locked and then timed
/// out, under a 5 s lease, with a release that keeps failing: 503 without running the handler;
/// release tries 50, 100, 200, 400, 800 ms apart, then 1 s apart, none after the lease; then,
/// with the store answering again, a new key runs.
#[tokio::test(start_paused = true)]
async fn s41_lost_begin_answer_release_schedule() {
    let store = LostAnswer {
        inner: MemoryStore::default(),
        release_ok: Arc::default(),
        releases: Arc::default(),
    };
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let app = Router::new()
        .route(
            "/orders",
            post(move || {
                let r = r.clone();
                async move {
                    r.fetch_add(1, Ordering::SeqCst);
                    StatusCode::CREATED
                }
            }),
        )
        .layer(
            IdempotencyLayer::new(store.clone(), ByCredentials::default())
                .with_lease(secs(5))
                .unwrap(),
        );
    let t0 = tokio::time::Instant::now();
    let (s, h, b) = call(&app, post_req("/orders", Some("k-lost"), "{}")).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(h.get("retry-after").unwrap(), "1");
    assert_eq!(problem_type(&b), problem::STORE_UNAVAILABLE);
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    tokio::time::sleep(secs(8)).await;
    let at: Vec<Duration> = store
        .releases
        .lock()
        .unwrap()
        .iter()
        .map(|t| *t - t0)
        .collect();
    assert!(at.len() >= 6, "release tries: {at:?}");
    assert!(
        at.iter().all(|t| *t <= secs(5)),
        "a release tried after the lease: {at:?}"
    );
    let gaps: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
    let mut want = Duration::from_millis(50);
    for (i, g) in gaps.iter().enumerate() {
        assert!(
            *g >= want && *g <= want + Duration::from_millis(5),
            "gap {i} is {g:?}, not {want:?}: tries at {at:?}"
        );
        want = (want * 2).min(secs(1));
    }
    // The store answers again (and the lease has run out): the same key runs.
    store.release_ok.store(true, Ordering::SeqCst);
    let ok_store = IdempotencyLayer::new(store.inner.clone(), ByCredentials::default());
    let runs2 = Arc::new(AtomicUsize::new(0));
    let app2 = counting_app(&runs2, Duration::ZERO, ok_store);
    let (s, _, _) = read(
        app2.oneshot(post_req("/orders", Some("k-lost"), "{}"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
}

/// idempotency.md, "How it works": "If the request's future is dropped, the task goes on: it
/// reads the whole response body (up to the response limit), stores it, then ends. While the
/// handler runs, the task renews the lock every third of the lease"; RELIABILITY.md: "a handler
/// whose client went away | runs to its end; its key is held (lease 30 s, renewed) until its
/// outcome is stored". A handler that answers its head at once and streams its body over 60 s
/// (six chunks, 10 s apart), its client gone at 1 s: the key stays held while the body is read
/// (a retry at 45 s gets 409 and nothing runs twice), and then the whole body is replayed.
#[tokio::test(start_paused = true)]
async fn s41_left_client_slow_response_body_keeps_the_key() {
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let app = Router::new()
        .route(
            "/orders",
            post(move || {
                let r = r.clone();
                async move {
                    r.fetch_add(1, Ordering::SeqCst);
                    let chunks = futures_util::stream::unfold(0u32, |i| async move {
                        if i == 6 {
                            return None;
                        }
                        tokio::time::sleep(secs(10)).await;
                        Some((Ok::<_, Infallible>(Bytes::from(format!("c{i};"))), i + 1))
                    });
                    (StatusCode::CREATED, Body::from_stream(chunks))
                }
            }),
        )
        .layer(layer(MemoryStore::default()));
    let t0 = tokio::time::Instant::now();
    let mut a = Box::pin(
        app.clone()
            .oneshot(post_req("/orders", Some("k-stream"), "{}")),
    );
    poll_until(&mut a, || runs.load(Ordering::SeqCst) == 1).await;
    let _ = tokio::time::timeout(secs(1), &mut a).await;
    drop(a);
    tokio::time::sleep_until(t0 + secs(45)).await;
    let (s, _, b) = call(&app, post_req("/orders", Some("k-stream"), "{}")).await;
    assert_eq!(
        (s, runs.load(Ordering::SeqCst)),
        (StatusCode::CONFLICT, 1),
        "at 45 s, while the left client's body is still read: {}",
        String::from_utf8_lossy(&b)
    );
    tokio::time::sleep_until(t0 + secs(70)).await;
    let (s, h, b) = call(&app, post_req("/orders", Some("k-stream"), "{}")).await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(&b[..], b"c0;c1;c2;c3;c4;c5;");
    assert_eq!(h.get("idempotent-replayed").unwrap(), "true");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// idempotency.md, "Problem types": "The one a client should retry is the in-flight conflict:"
/// followed by the exact answer (`409 Conflict`, `Content-Type: application/problem+json`,
/// `Retry-After: 1` and the JSON body). A repeat while the first request runs gets that answer,
/// body included.
#[tokio::test(start_paused = true)]
async fn s41_in_flight_answer_is_the_documented_one() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = counting_app(&runs, secs(5), layer(MemoryStore::default()));
    let mut a = Box::pin(
        app.clone()
            .oneshot(post_req("/orders", Some("k-doc"), "{}")),
    );
    poll_until(&mut a, || runs.load(Ordering::SeqCst) == 1).await;
    let (s, h, b) = call(&app, post_req("/orders", Some("k-doc"), "{}")).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(h.get("content-type").unwrap(), "application/problem+json");
    assert_eq!(h.get("retry-after").unwrap(), "1");
    let doc = r#"{"type":"https://example.invalid/sturdy/problems/idempotency-key-in-flight","title":"A request is outstanding for this Idempotency-Key","status":409,"detail":"the first request with this key is still running; retry after a while with the same key"}"#;
    let got: serde_json::Value = serde_json::from_slice(&b).unwrap();
    let want: serde_json::Value = serde_json::from_str(doc).unwrap();
    assert_eq!(got, want);
    assert_eq!(problem::IN_FLIGHT, want["type"]);
    let _ = a.await;
}

/// idempotency.md, "Client": "When the server answers 409 with `Retry-After` to a request that
/// carries a key (the first request with that key is still running: sturdy's server layer sends
/// exactly that ...), the retry layer waits and asks again, so the caller gets the stored
/// response"; "Guarantees": "client timeout mid-handler | ... a retry with the same key gets 409
/// in flight (`Retry-After: 1`) while the handler runs, then the stored response with
/// `Idempotent-Replayed: true`; the handler ran once". `ClientBuilder` (1 s attempt timeout for
/// this call) against sturdy's server layer over a 2 s handler, in process.
#[tokio::test(start_paused = true)]
async fn s41_client_against_server_gets_the_stored_response_once() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = counting_app(&runs, secs(2), layer(MemoryStore::default()));
    let statuses = Arc::new(Mutex::new(Vec::new()));
    let st = statuses.clone();
    let http = service_fn(move |r: Request<Full<Bytes>>| {
        let app = app.clone();
        let st = st.clone();
        async move {
            let (p, b) = r.into_parts();
            let res = app.oneshot(Request::from_parts(p, Body::new(b))).await?;
            st.lock().unwrap().push(res.status().as_u16());
            let (p, b) = res.into_parts();
            let b = b.collect().await?.to_bytes();
            Ok::<_, BoxError>(Response::from_parts(p, Full::new(b)))
        }
    });
    let client = ClientBuilder::new().build(http);
    let mut r = Request::post("http://api.example.com/orders")
        .header("authorization", "Bearer client-a")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    r.extensions_mut()
        .insert(CallOptions::new().with_attempt_timeout(secs(1)));
    let res = client.oneshot(r).await.unwrap();
    let (p, b) = res.into_parts();
    let b = b.collect().await.unwrap().to_bytes();
    assert_eq!(
        (p.status, &b[..]),
        (StatusCode::CREATED, &b"order 0"[..]),
        "answers seen: {:?}",
        statuses.lock().unwrap()
    );
    assert_eq!(p.headers.get("idempotent-replayed").unwrap(), "true");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert!(
        statuses.lock().unwrap().contains(&409),
        "{:?}",
        statuses.lock().unwrap()
    );
}
