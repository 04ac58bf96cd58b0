//! Third-round outside tests of the server idempotency layer (docs/guides/idempotency.md):
//! streaming and failing response bodies, multi-valued headers, leases shorter than the
//! handler, a store full of running requests, hostile keys, CatchPanic, a concurrency limit
//! inside the layer; and over real sockets with the memory and the Redis store.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use http::{HeaderValue, Request, StatusCode};
use http_body_util::BodyExt;
use sturdy::idempotency::server::{problem, ByCredentials, IdempotencyLayer, MemoryStore};
use sturdy::redis::RedisIdempotencyStore;
use tower::ServiceExt;

fn req(uri: &str, key: Option<&[u8]>, body: &'static str) -> Request<Body> {
    let mut b = Request::builder()
        .method("POST")
        .uri(uri)
        .header("authorization", "Bearer outsider3");
    if let Some(k) = key {
        b = b.header(
            "idempotency-key",
            HeaderValue::from_bytes(k).expect("a header value"),
        );
    }
    b.body(Body::from(body)).unwrap()
}

async fn send(app: &Router, r: Request<Body>) -> (StatusCode, http::HeaderMap, String) {
    let res = app.clone().oneshot(r).await.unwrap();
    let (p, b) = res.into_parts();
    let b = match b.collect().await {
        Ok(c) => String::from_utf8_lossy(&c.to_bytes()).into_owned(),
        Err(e) => format!("<body error: {e}>"),
    };
    (p.status, p.headers, b)
}

fn problem_type(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["type"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn counter() -> Arc<AtomicUsize> {
    Arc::new(AtomicUsize::new(0))
}

/// A handler that streams three chunks, 1 s apart.
fn streaming_app(runs: Arc<AtomicUsize>, layer: IdempotencyLayer<MemoryStore>) -> Router {
    Router::new()
        .route(
            "/stream",
            post(move || {
                let runs = runs.clone();
                async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    let s = futures_util::stream::unfold(0u8, |i| async move {
                        if i == 3 {
                            return None;
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        Some((
                            Ok::<_, Infallible>(Bytes::from(format!("chunk{i};"))),
                            i + 1,
                        ))
                    });
                    (StatusCode::CREATED, Body::from_stream(s))
                }
            }),
        )
        .layer(layer)
}

#[tokio::test(start_paused = true)]
async fn a_streamed_response_is_stored_whole_when_the_client_leaves_mid_body() {
    let runs = counter();
    let app = streaming_app(
        runs.clone(),
        IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default()),
    );
    // The client takes the head (or leaves before) and drops everything after 1.5 s.
    let _ = tokio::time::timeout(Duration::from_millis(1_500), async {
        let res = app
            .clone()
            .oneshot(req("/stream", Some(b"st1"), "{}"))
            .await
            .unwrap();
        let mut body = res.into_body();
        let _first = body.frame().await;
        std::future::pending::<()>().await;
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (s, h, b) = send(&app, req("/stream", Some(b"st1"), "{}")).await;
    assert_eq!(
        (s, b.as_str()),
        (StatusCode::CREATED, "chunk0;chunk1;chunk2;")
    );
    assert_eq!(h.get("idempotent-replayed").unwrap(), "true");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_response_body_that_fails_midway_is_never_replayed_as_complete() {
    let runs = counter();
    let r2 = runs.clone();
    let app = Router::new()
        .route(
            "/broken",
            post(move || {
                let runs = r2.clone();
                async move {
                    let mut items = vec![Ok::<_, std::io::Error>(Bytes::from_static(b"half"))];
                    if runs.fetch_add(1, Ordering::SeqCst) == 0 {
                        items.push(Err(std::io::Error::other("disk gone")));
                    }
                    let s = futures_util::stream::iter(items);
                    (StatusCode::OK, Body::from_stream(s))
                }
            }),
        )
        .layer(IdempotencyLayer::new(
            MemoryStore::default(),
            ByCredentials::default(),
        ));
    let first = tokio::time::timeout(
        Duration::from_secs(10),
        send(&app, req("/broken", Some(b"br"), "{}")),
    )
    .await
    .expect("first request must not hang");
    eprintln!("first: {first:?}");
    let second = tokio::time::timeout(
        Duration::from_secs(10),
        send(&app, req("/broken", Some(b"br"), "{}")),
    )
    .await
    .expect("retry must not hang");
    eprintln!("second: {second:?}");
    assert_eq!(first.0, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(problem_type(&first.2), problem::RESPONSE_FAILED);
    // "the key was released": the retry runs the handler again, now successfully.
    assert_eq!((second.0, second.2.as_str()), (StatusCode::OK, "half"));
    assert!(second.1.get("idempotent-replayed").is_none());
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn multi_valued_response_headers_are_all_replayed() {
    let app = Router::new()
        .route(
            "/multi",
            post(|| async {
                let mut h = http::HeaderMap::new();
                h.append("set-cookie", HeaderValue::from_static("a=1"));
                h.append("set-cookie", HeaderValue::from_static("b=2"));
                h.append("x-multi", HeaderValue::from_static("one"));
                h.append("x-multi", HeaderValue::from_static("two"));
                (StatusCode::CREATED, h, "ok")
            }),
        )
        .layer(IdempotencyLayer::new(
            MemoryStore::default(),
            ByCredentials::default(),
        ));
    let (s1, h1, b1) = send(&app, req("/multi", Some(b"mv"), "{}")).await;
    let (s2, h2, b2) = send(&app, req("/multi", Some(b"mv"), "{}")).await;
    assert_eq!((s1, b1.as_str()), (StatusCode::CREATED, "ok"));
    assert_eq!((s2, b2.as_str()), (StatusCode::CREATED, "ok"));
    assert_eq!(h2.get("idempotent-replayed").unwrap(), "true");
    for name in ["set-cookie", "x-multi"] {
        let a: Vec<_> = h1.get_all(name).iter().collect();
        let b: Vec<_> = h2.get_all(name).iter().collect();
        assert_eq!(a, b, "{name} replayed differently");
    }
}

#[tokio::test(start_paused = true)]
async fn a_handler_slower_than_its_lease_keeps_its_key() {
    let runs = counter();
    let r2 = runs.clone();
    let layer = IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default())
        .with_lease(Duration::from_millis(300))
        .unwrap();
    let app = Router::new()
        .route(
            "/slow",
            post(move || {
                let runs = r2.clone();
                async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    (StatusCode::CREATED, "done")
                }
            }),
        )
        .layer(layer);
    let r = tokio::time::timeout(
        Duration::from_millis(100),
        app.clone().oneshot(req("/slow", Some(b"ls"), "{}")),
    )
    .await;
    assert!(r.is_err());
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (s, h, b) = send(&app, req("/slow", Some(b"ls"), "{}")).await;
        assert_eq!(s, StatusCode::CONFLICT, "{b}");
        assert_eq!(h.get("retry-after").unwrap(), "1");
        assert_eq!(problem_type(&b), problem::IN_FLIGHT);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (s, h, b) = send(&app, req("/slow", Some(b"ls"), "{}")).await;
    assert_eq!((s, b.as_str()), (StatusCode::CREATED, "done"));
    assert_eq!(h.get("idempotent-replayed").unwrap(), "true");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

fn sleepy_app(runs: Arc<AtomicUsize>, layer: IdempotencyLayer<MemoryStore>) -> Router {
    Router::new()
        .route(
            "/sleepy",
            post(move || {
                let runs = runs.clone();
                async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    (StatusCode::CREATED, "slept")
                }
            }),
        )
        .layer(layer)
}

#[tokio::test(start_paused = true)]
async fn a_store_full_of_running_requests_answers_503_then_makes_room() {
    let runs = counter();
    let app = sleepy_app(
        runs.clone(),
        IdempotencyLayer::new(MemoryStore::new(1).unwrap(), ByCredentials::default()),
    );
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, req("/sleepy", Some(b"a"), "{}")).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (s, h, b) = send(&app, req("/sleepy", Some(b"b"), "{}")).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{b}");
    assert_eq!(h.get("retry-after").unwrap(), "1");
    assert_eq!(problem_type(&b), problem::STORE_UNAVAILABLE);
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler must not run");
    assert_eq!(first.await.unwrap().0, StatusCode::CREATED);
    // The completed response of "a" makes room for "b".
    let (s, _, b) = send(&app, req("/sleepy", Some(b"b"), "{}")).await;
    assert_eq!((s, b.as_str()), (StatusCode::CREATED, "slept"));
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn hostile_keys() {
    let runs = counter();
    let app = Router::new()
        .route(
            "/k",
            post({
                let runs = runs.clone();
                move || {
                    let runs = runs.clone();
                    async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        "ran"
                    }
                }
            }),
        )
        .layer(IdempotencyLayer::new(
            MemoryStore::default(),
            ByCredentials::default(),
        ));
    let long = vec![b'k'; 10 * 1024];
    let max = vec![b'm'; 255];
    let over = vec![b'o'; 256];
    let bad: Vec<&[u8]> = vec![
        b"",
        &long,
        &over,
        b"a b",
        b"tab\there",
        b"caf\xc3\xa9",
        b"\x80\xff",
    ];
    for k in bad {
        let (s, h, b) = send(&app, req("/k", Some(k), "{}")).await;
        assert_eq!(
            (s, problem_type(&b)),
            (StatusCode::BAD_REQUEST, problem::INVALID_KEY.to_owned()),
            "key of {} bytes {:?}",
            k.len(),
            String::from_utf8_lossy(&k[..k.len().min(16)])
        );
        assert_eq!(
            h.get("content-type").unwrap(),
            "application/problem+json",
            "problem json"
        );
    }
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    let (s, _, _) = send(&app, req("/k", Some(&max), "{}")).await;
    assert_eq!(s, StatusCode::OK, "255 visible characters is a key");
    // Identical repeated headers are one key.
    let mut r = req("/k", Some(b"dup"), "{}");
    r.headers_mut()
        .append("idempotency-key", HeaderValue::from_static("dup"));
    let (s, _, _) = send(&app, r).await;
    assert_eq!(s, StatusCode::OK);
    let mut r = req("/k", Some(b"dup"), "{}");
    r.headers_mut()
        .append("idempotency-key", HeaderValue::from_static("dup"));
    let (s, h, _) = send(&app, r).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(h.get("idempotent-replayed").unwrap(), "true");
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn a_panic_under_catch_panic_is_a_500_and_a_retry_runs_again() {
    let runs = counter();
    let r2 = runs.clone();
    let app = Router::new()
        .route(
            "/boom",
            post(move || {
                let runs = r2.clone();
                async move {
                    if runs.fetch_add(1, Ordering::SeqCst) == 0 {
                        panic!("outsider3 panic on purpose");
                    }
                    (StatusCode::CREATED, "second run")
                }
            }),
        )
        .layer(IdempotencyLayer::new(
            MemoryStore::default(),
            ByCredentials::default(),
        ))
        .layer(tower_http::catch_panic::CatchPanicLayer::new());
    let (s, _, _) = send(&app, req("/boom", Some(b"p"), "{}")).await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR);
    let (s, h, b) = send(&app, req("/boom", Some(b"p"), "{}")).await;
    assert_eq!((s, b.as_str()), (StatusCode::CREATED, "second run"));
    assert!(h.get("idempotent-replayed").is_none());
    let (s, h, _) = send(&app, req("/boom", Some(b"p"), "{}")).await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(h.get("idempotent-replayed").unwrap(), "true");
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn the_response_limit_is_a_boundary_and_the_first_client_gets_its_response() {
    let app = Router::new()
        .route("/ten", post(|| async { "0123456789" }))
        .route("/eleven", post(|| async { "0123456789a" }))
        .layer(
            IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default())
                .with_response_limit(10),
        );
    let (s, _, b) = send(&app, req("/ten", Some(b"t"), "{}")).await;
    assert_eq!((s, b.as_str()), (StatusCode::OK, "0123456789"));
    let (s, h, b) = send(&app, req("/ten", Some(b"t"), "{}")).await;
    assert_eq!((s, b.as_str()), (StatusCode::OK, "0123456789"));
    assert_eq!(h.get("idempotent-replayed").unwrap(), "true");
    let (s, _, b) = send(&app, req("/eleven", Some(b"e"), "{}")).await;
    eprintln!("first over the limit: {s} {b}");
    let (s, _, b) = send(&app, req("/eleven", Some(b"e"), "{}")).await;
    assert_eq!(
        (s, problem_type(&b)),
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            problem::RESPONSE_TOO_LARGE.to_owned()
        )
    );
}

#[tokio::test(start_paused = true)]
async fn a_chunked_request_body_over_the_limit_is_413_and_the_handler_does_not_run() {
    let runs = counter();
    let app = sleepy_app(
        runs.clone(),
        IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default()).with_body_limit(16),
    );
    let chunks = futures_util::stream::iter(
        (0..10).map(|_| Ok::<_, Infallible>(Bytes::from_static(b"0123456789"))),
    );
    let r = Request::builder()
        .method("POST")
        .uri("/sleepy")
        .header("idempotency-key", "chunky")
        .body(Body::from_stream(chunks))
        .unwrap();
    let (s, _, b) = send(&app, r).await;
    assert_eq!(
        (s, problem_type(&b)),
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            problem::BODY_TOO_LARGE.to_owned()
        )
    );
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn a_concurrency_limit_inside_the_layer_counts_abandoned_handlers() {
    let running = counter();
    let peak = counter();
    let (r2, p2) = (running.clone(), peak.clone());
    let app = Router::new()
        .route(
            "/work",
            post(move || {
                let (running, peak) = (r2.clone(), p2.clone());
                async move {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    running.fetch_sub(1, Ordering::SeqCst);
                    "worked"
                }
            }),
        )
        .layer(tower::limit::ConcurrencyLimitLayer::new(1))
        .layer(IdempotencyLayer::new(
            MemoryStore::default(),
            ByCredentials::default(),
        ))
        // Turn the handlers into routes once (as `axum::serve` does), so the limit's
        // semaphore is built once, not per request.
        .with_state(());
    for k in ["c1", "c2", "c3"] {
        let _ = tokio::time::timeout(
            Duration::from_millis(100),
            app.clone().oneshot(req("/work", Some(k.as_bytes()), "{}")),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        peak.load(Ordering::SeqCst),
        1,
        "more handlers ran at once than the limit inside the layer allows"
    );
}

// ---- over real sockets ----

async fn serve(app: Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

fn wire_app<St: sturdy::idempotency::server::IdempotencyStore>(
    runs: Arc<AtomicUsize>,
    layer: IdempotencyLayer<St>,
) -> Router {
    Router::new()
        .route(
            "/pay",
            post(move |body: Bytes| {
                let runs = runs.clone();
                async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    (
                        StatusCode::CREATED,
                        [("x-charge", "ch_1")],
                        format!("charged {}", body.len()),
                    )
                }
            }),
        )
        .layer(layer)
}

async fn wire_scenario(addr: std::net::SocketAddr, runs: &AtomicUsize, key: &str) {
    let url = format!("http://{addr}/pay");
    let short = reqwest::Client::builder()
        .timeout(Duration::from_millis(50))
        .build()
        .unwrap();
    let client = reqwest::Client::new();
    let post = |c: &reqwest::Client, body: &'static str, auth: &'static str| {
        c.post(&url)
            .header("idempotency-key", key)
            .header("authorization", auth)
            .body(body)
            .send()
    };
    let r = post(&short, "amount=5", "Bearer w1").await;
    assert!(r.is_err(), "the short client times out");
    let r = post(&client, "amount=5", "Bearer w1").await.unwrap();
    assert_eq!(r.status(), 409);
    assert_eq!(r.headers()["retry-after"], "1");
    assert_eq!(
        problem_type(&r.text().await.unwrap()),
        problem::IN_FLIGHT.to_owned()
    );
    // Another body with the same key: 422 (also while it runs).
    let r = post(&client, "amount=500", "Bearer w1").await.unwrap();
    assert_eq!(r.status(), 422);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = post(&client, "amount=5", "Bearer w1").await.unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    assert_eq!(r.headers()["x-charge"], "ch_1");
    assert_eq!(r.text().await.unwrap(), "charged 8");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran once");
    // Another client scope with the same key runs on its own.
    let r = post(&client, "amount=5", "Bearer w2").await.unwrap();
    assert_eq!(r.status(), 201);
    assert!(r.headers().get("idempotent-replayed").is_none());
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wire_client_timeout_mid_handler_memory_store() {
    let runs = counter();
    let addr = serve(wire_app(
        runs.clone(),
        IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default()),
    ))
    .await;
    tokio::time::timeout(
        Duration::from_secs(10),
        wire_scenario(addr, &runs, "wire-mem"),
    )
    .await
    .unwrap();
}

fn redis_url() -> String {
    std::env::var("STURDY_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:17379/".to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wire_client_timeout_mid_handler_redis_store() {
    let store = RedisIdempotencyStore::connect(&redis_url())
        .await
        .unwrap()
        .with_prefix(format!(
            "outsider3:idem:{}:{}",
            std::process::id(),
            rand_suffix()
        ));
    let runs = counter();
    let addr = serve(wire_app(
        runs.clone(),
        IdempotencyLayer::new(store, ByCredentials::default()),
    ))
    .await;
    tokio::time::timeout(
        Duration::from_secs(10),
        wire_scenario(addr, &runs, "wire-redis"),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_replays_a_large_response_and_refuses_a_huge_key() {
    let store = RedisIdempotencyStore::connect(&redis_url())
        .await
        .unwrap()
        .with_prefix(format!(
            "outsider3:big:{}:{}",
            std::process::id(),
            rand_suffix()
        ));
    let runs = counter();
    let r2 = runs.clone();
    // Just under the 1 MiB default response limit, binary content.
    let payload: Vec<u8> = (0..(1024 * 1024 - 1)).map(|i| (i % 251) as u8).collect();
    let p2 = payload.clone();
    let app = Router::new()
        .route(
            "/big",
            post(move || {
                let (runs, p) = (r2.clone(), p2.clone());
                async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    p
                }
            }),
        )
        .layer(IdempotencyLayer::new(store, ByCredentials::default()));
    let addr = serve(app).await;
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    for i in 0..2 {
        let r = c
            .post(format!("http://{addr}/big"))
            .header("idempotency-key", "big")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let replayed = r.headers().get("idempotent-replayed").is_some();
        assert_eq!(replayed, i == 1);
        assert_eq!(r.bytes().await.unwrap().as_ref(), payload.as_slice());
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let r = c
        .post(format!("http://{addr}/big"))
        .header("idempotency-key", "k".repeat(10 * 1024))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

fn rand_suffix() -> u64 {
    // A per-process random value (std's hash keys), so keys left in Redis by earlier runs
    // never collide with this run's.
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

fn fat_app(runs: Arc<AtomicUsize>, store: MemoryStore) -> Router {
    Router::new()
        .route(
            "/fat",
            post(move || {
                let runs = runs.clone();
                async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    "f".repeat(100 * 1024)
                }
            }),
        )
        .route(
            "/thin",
            post(|body: Bytes| async move { format!("{}", body.len()) }),
        )
        .layer(IdempotencyLayer::new(store, ByCredentials::default()))
}

#[tokio::test(start_paused = true)]
async fn a_response_larger_than_the_whole_store_is_not_run_twice() {
    let runs = counter();
    // Accepted when built: a byte bound (16 KiB) below the response limit (1 MiB).
    let store = MemoryStore::default().with_max_bytes(16 * 1024).unwrap();
    let app = fat_app(runs.clone(), store);
    let (s, _, b) = send(&app, req("/fat", Some(b"fat"), "{}")).await;
    assert_eq!((s, b.len()), (StatusCode::OK, 100 * 1024));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (s, _, b) = send(&app, req("/fat", Some(b"fat"), "{}")).await;
    assert_ne!(
        problem_type(&b),
        problem::IN_FLIGHT,
        "409 'still running' for a handler that has finished ({s})"
    );
    tokio::time::sleep(Duration::from_secs(31)).await;
    let _ = send(&app, req("/fat", Some(b"fat"), "{}")).await;
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the handler ran again after the lease"
    );
}

#[tokio::test(start_paused = true)]
async fn the_memory_store_stays_within_its_byte_bound() {
    let store = MemoryStore::default().with_max_bytes(16 * 1024).unwrap();
    let app = fat_app(counter(), store.clone());
    for i in 0..500 {
        let k = format!("thin-{i}");
        let (s, _, _) = send(&app, req("/thin", Some(k.as_bytes()), "0123456789")).await;
        assert_eq!(s, StatusCode::OK);
        assert!(
            store.heap_bytes() <= 16 * 1024,
            "{} bytes",
            store.heap_bytes()
        );
    }
    // The latest key replays.
    let (s, h, b) = send(&app, req("/thin", Some(b"thin-499"), "0123456789")).await;
    assert_eq!((s, b.as_str()), (StatusCode::OK, "10"));
    assert_eq!(h.get("idempotent-replayed").unwrap(), "true");
}

#[tokio::test(start_paused = true)]
async fn same_key_with_another_method_is_422_and_gets_pass_through() {
    let runs = counter();
    let r2 = runs.clone();
    let r3 = runs.clone();
    let app = Router::new()
        .route(
            "/m",
            post(move || {
                let r = r2.clone();
                async move {
                    r.fetch_add(1, Ordering::SeqCst);
                    "post"
                }
            })
            .patch(move || {
                let r = r3.clone();
                async move {
                    r.fetch_add(1, Ordering::SeqCst);
                    "patch"
                }
            })
            .get(|| async { "get" }),
        )
        .layer(IdempotencyLayer::new(
            MemoryStore::default(),
            ByCredentials::default(),
        ));
    let (s, _, _) = send(&app, req("/m", Some(b"mk"), "{}")).await;
    assert_eq!(s, StatusCode::OK);
    let mut r = req("/m", Some(b"mk"), "{}");
    *r.method_mut() = http::Method::PATCH;
    let (s, _, b) = send(&app, r).await;
    assert_eq!(
        (s, problem_type(&b)),
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            problem::KEY_REUSED.to_owned()
        )
    );
    // Query order matters: another request.
    let (s, _, b) = send(&app, req("/m?a=1", Some(b"mk"), "{}")).await;
    assert_eq!(
        (s, problem_type(&b)),
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            problem::KEY_REUSED.to_owned()
        )
    );
    for _ in 0..2 {
        let mut r = req("/m", Some(b"mk"), "");
        *r.method_mut() = http::Method::GET;
        let (s, h, b) = send(&app, r).await;
        assert_eq!((s, b.as_str()), (StatusCode::OK, "get"));
        assert!(h.get("idempotent-replayed").is_none());
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A Redis of this test's own on a free port, ended when dropped.
struct OwnRedis {
    child: std::process::Child,
    port: u16,
}

impl OwnRedis {
    async fn start(port: u16) -> Self {
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server");
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self { child, port }
    }

    fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_on_arrival_is_503_without_running_and_a_later_retry_runs() {
    let port = free_port();
    let redis = OwnRedis::start(port).await;
    let store = RedisIdempotencyStore::connect(&format!("redis://127.0.0.1:{}/", redis.port))
        .await
        .unwrap()
        .with_prefix("outsider3:down");
    let runs = counter();
    let addr = serve(wire_app(
        runs.clone(),
        IdempotencyLayer::new(store, ByCredentials::default()),
    ))
    .await;
    redis.stop();
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let post = || {
        c.post(format!("http://{addr}/pay"))
            .header("idempotency-key", "down-1")
            .body("amount=5")
            .send()
    };
    let start = tokio::time::Instant::now();
    let r = post().await.unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    assert_eq!(
        problem_type(&r.text().await.unwrap()),
        problem::STORE_UNAVAILABLE.to_owned()
    );
    assert_eq!(runs.load(Ordering::SeqCst), 0, "the handler must not run");
    let _redis = OwnRedis::start(port).await;
    let mut last = None;
    for _ in 0..50 {
        let r = post().await.unwrap();
        if r.status() == 201 {
            last = Some(r.text().await.unwrap());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        last.as_deref(),
        Some("charged 8"),
        "a later retry runs normally"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_a_panic_releases_the_key_and_a_retry_runs() {
    let store = RedisIdempotencyStore::connect(&redis_url())
        .await
        .unwrap()
        .with_prefix(format!("outsider3:panic:{}", rand_suffix()));
    let runs = counter();
    let r2 = runs.clone();
    let app = Router::new()
        .route(
            "/boom",
            post(move || {
                let runs = r2.clone();
                async move {
                    if runs.fetch_add(1, Ordering::SeqCst) == 0 {
                        panic!("outsider3 redis panic on purpose");
                    }
                    (StatusCode::CREATED, "ok")
                }
            }),
        )
        .layer(IdempotencyLayer::new(store, ByCredentials::default()))
        .layer(tower_http::catch_panic::CatchPanicLayer::new());
    let addr = serve(app).await;
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let post = || {
        c.post(format!("http://{addr}/boom"))
            .header("idempotency-key", "p")
            .send()
    };
    assert_eq!(post().await.unwrap().status(), 500);
    let r = post().await.unwrap();
    assert_eq!(
        r.status(),
        201,
        "a retry, even at once, runs the handler again"
    );
    let r = post().await.unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_when_the_response_is_stored_still_answers_the_handlers_response() {
    let port = free_port();
    let redis = OwnRedis::start(port).await;
    let store = RedisIdempotencyStore::connect(&format!("redis://127.0.0.1:{port}/"))
        .await
        .unwrap()
        .with_prefix("outsider3:late");
    let runs = counter();
    let addr = serve(wire_app(
        runs.clone(),
        IdempotencyLayer::new(store, ByCredentials::default()),
    ))
    .await;
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap();
    let pending = tokio::spawn({
        let c = c.clone();
        async move {
            let start = tokio::time::Instant::now();
            let r = c
                .post(format!("http://{addr}/pay"))
                .header("idempotency-key", "late-1")
                .body("amount=5")
                .send()
                .await
                .unwrap();
            (r.status(), r.text().await.unwrap(), start.elapsed())
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    redis.stop();
    let (s, b, took) = pending.await.unwrap();
    eprintln!("answered {s} after {took:?}");
    assert_eq!((s.as_u16(), b.as_str()), (201, "charged 8"));
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn an_unreadable_request_body_is_400_and_leaves_the_key_free() {
    let runs = counter();
    let r2 = runs.clone();
    let app = Router::new()
        .route(
            "/u",
            post(move |b: Bytes| {
                let runs = r2.clone();
                async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    format!("{}", b.len())
                }
            }),
        )
        .layer(IdempotencyLayer::new(
            MemoryStore::default(),
            ByCredentials::default(),
        ));
    let broken = futures_util::stream::iter(vec![
        Ok::<_, std::io::Error>(Bytes::from_static(b"amount=")),
        Err(std::io::Error::other("client went away mid-body")),
    ]);
    let r = Request::post("/u")
        .header("idempotency-key", "ub")
        .body(Body::from_stream(broken))
        .unwrap();
    let (s, _, b) = send(&app, r).await;
    assert_eq!(
        (s, problem_type(&b)),
        (StatusCode::BAD_REQUEST, problem::UNREADABLE_BODY.to_owned())
    );
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    let r = Request::post("/u")
        .header("idempotency-key", "ub")
        .body(Body::from("amount=5"))
        .unwrap();
    let (s, _, b) = send(&app, r).await;
    assert_eq!((s, b.as_str()), (StatusCode::OK, "8"));
}

#[tokio::test(start_paused = true)]
async fn stored_server_errors_no_content_and_the_body_limit_boundary() {
    let runs = counter();
    let (r1, r2) = (runs.clone(), runs.clone());
    let app = Router::new()
        .route(
            "/e",
            post(move || {
                let r = r1.clone();
                async move {
                    r.fetch_add(1, Ordering::SeqCst);
                    (StatusCode::SERVICE_UNAVAILABLE, "down")
                }
            }),
        )
        .route(
            "/t",
            post(move || {
                let r = r2.clone();
                async move {
                    r.fetch_add(1, Ordering::SeqCst);
                    (StatusCode::TOO_MANY_REQUESTS, "slow down")
                }
            }),
        )
        .route("/nc", post(|| async { StatusCode::NO_CONTENT }))
        .route(
            "/len",
            post(|b: Bytes| async move { format!("{}", b.len()) }),
        )
        .layer(
            IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default())
                .with_store_server_errors(true),
        );
    for _ in 0..2 {
        let (s, _, b) = send(&app, req("/e", Some(b"e"), "{}")).await;
        assert_eq!((s, b.as_str()), (StatusCode::SERVICE_UNAVAILABLE, "down"));
        let (s, _, _) = send(&app, req("/t", Some(b"t"), "{}")).await;
        assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    }
    // 503 once (stored, then replayed), 429 twice (never stored).
    assert_eq!(runs.load(Ordering::SeqCst), 3);
    for i in 0..2 {
        let (s, h, b) = send(&app, req("/nc", Some(b"nc"), "{}")).await;
        assert_eq!((s, b.as_str()), (StatusCode::NO_CONTENT, ""));
        assert_eq!(h.get("idempotent-replayed").is_some(), i == 1);
    }
    let mib = 1024 * 1024;
    for (len, want) in [
        (mib, StatusCode::OK),
        (mib + 1, StatusCode::PAYLOAD_TOO_LARGE),
    ] {
        let r = Request::post("/len")
            .header("idempotency-key", format!("len-{len}"))
            .body(Body::from(vec![b'a'; len]))
            .unwrap();
        let (s, _, _) = send(&app, r).await;
        assert_eq!(s, want, "{len} bytes");
    }
}

#[test]
fn a_runtime_shut_down_mid_handler_holds_the_key_until_its_lease_ends() {
    let runs = counter();
    let layer = IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default())
        .with_lease(Duration::from_secs(5))
        .unwrap();
    let app = sleepy_app(runs.clone(), layer);
    let first = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    first.block_on(async {
        let app = app.clone();
        tokio::spawn(async move { send(&app, req("/sleepy", Some(b"sd"), "{}")).await });
        tokio::time::sleep(Duration::from_millis(500)).await;
    });
    drop(first);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let second = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    second.block_on(async {
        let (s, _, b) = send(&app, req("/sleepy", Some(b"sd"), "{}")).await;
        assert_eq!(
            (s, problem_type(&b)),
            (StatusCode::CONFLICT, problem::IN_FLIGHT.to_owned()),
            "the key is held"
        );
        tokio::time::sleep(Duration::from_secs(6)).await;
        let (s, _, b) = send(&app, req("/sleepy", Some(b"sd"), "{}")).await;
        assert_eq!(
            (s, b.as_str()),
            (StatusCode::CREATED, "slept"),
            "after the lease"
        );
    });
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn named_cookie_scopes_are_exact() {
    let runs = counter();
    let r2 = runs.clone();
    let app = Router::new()
        .route(
            "/c",
            post(move || {
                let runs = r2.clone();
                async move { format!("run {}", runs.fetch_add(1, Ordering::SeqCst)) }
            }),
        )
        .layer(IdempotencyLayer::new(
            MemoryStore::default(),
            ByCredentials::default().with_cookies(["session_id"]),
        ));
    let with_cookie = |c: &str| {
        Request::post("/c")
            .header("idempotency-key", "same-key")
            .header("cookie", c)
            .body(Body::from("{}"))
            .unwrap()
    };
    let (_, _, b) = send(&app, with_cookie("session_id=A1; _ga=1")).await;
    assert_eq!(b, "run 0");
    // The analytics cookie changed: the same scope, a replay.
    let (_, h, b) = send(&app, with_cookie("_ga=2; session_id=A1")).await;
    assert_eq!(b, "run 0");
    assert_eq!(h.get("idempotent-replayed").unwrap(), "true");
    // Look-alike cookies are other scopes: never A1's stored response.
    for c in [
        "xsession_id=A1",
        "session_id_x=A1",
        "session_id=A1x",
        "session_id=A",
        "SESSION_ID=A1",
        "",
    ] {
        let (_, h, b) = send(&app, with_cookie(c)).await;
        assert!(
            h.get("idempotent-replayed").is_none() || b != "run 0",
            "cookie {c:?} got the response stored for session_id=A1"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn connection_level_headers_are_not_replayed() {
    let app = Router::new()
        .route(
            "/h",
            post(|| async {
                (
                    StatusCode::CREATED,
                    [
                        ("date", "Mon, 01 Jan 2001 00:00:00 GMT"),
                        ("connection", "close"),
                        ("keep-alive", "timeout=5"),
                        ("x-ok", "1"),
                    ],
                    "made",
                )
            }),
        )
        .layer(IdempotencyLayer::new(
            MemoryStore::default(),
            ByCredentials::default(),
        ));
    let _ = send(&app, req("/h", Some(b"hh"), "{}")).await;
    let (s, h, b) = send(&app, req("/h", Some(b"hh"), "{}")).await;
    assert_eq!((s, b.as_str()), (StatusCode::CREATED, "made"));
    assert_eq!(h.get("idempotent-replayed").unwrap(), "true");
    assert_eq!(h.get("x-ok").unwrap(), "1");
    for name in ["date", "connection", "keep-alive"] {
        assert!(h.get(name).is_none(), "{name} replayed: {:?}", h.get(name));
    }
    if let Some(len) = h.get("content-length") {
        assert_eq!(len, "4");
    }
}
