//! The server idempotency layer read literally from docs/guides/idempotency.md and the crate
//! docs: client scopes, key forms, refusals while a request runs, and releases that a dropped
//! request must not cancel.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::BodyExt;
use sturdy::core::BoxError;
use sturdy::idempotency::server::{
    problem, Begin, BoxFuture, ByCredentials, Fingerprint, IdempotencyLayer, IdempotencyStore,
    LockToken, MemoryStore, StoredResponse,
};
use tower::ServiceExt;

/// An app whose handler counts its runs and answers 201 with the run number, after `delay`.
fn counting_app(
    layer: IdempotencyLayer<impl IdempotencyStore + Clone>,
    delay: Duration,
) -> (Router, Arc<AtomicUsize>) {
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let app = Router::new()
        .route(
            "/orders",
            post(move |body: Bytes| {
                let r = r.clone();
                async move {
                    let n = r.fetch_add(1, Ordering::SeqCst) + 1;
                    tokio::time::sleep(delay).await;
                    (StatusCode::CREATED, format!("run {n}: {}", body.len()))
                }
            }),
        )
        .layer(layer);
    (app, runs)
}

fn order(key: &str, headers: &[(&str, &str)], body: &'static str) -> Request<Body> {
    let mut b = Request::post("/orders").header("idempotency-key", key);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Body::from(body)).unwrap()
}

async fn send(app: &Router, req: Request<Body>) -> (StatusCode, HeaderMap, String) {
    let res = app.clone().oneshot(req).await.unwrap();
    let (parts, body) = res.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

fn problem_type(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    v["type"].as_str().unwrap_or_default().to_owned()
}

/// "two requests share a key space only when all of them are equal": the same credential
/// value under another header, or one value split over two of the headers, is another client.
/// Each pair below differs in at least one header, so the second request must run on its own
/// (never get the first client's stored response).
#[tokio::test]
async fn durable26_credentials_under_other_headers_are_other_scopes() {
    let pairs: Vec<(Vec<(&str, &str)>, Vec<(&str, &str)>)> = vec![
        (vec![("x-api-key", "K1")], vec![("authorization", "K1")]),
        (vec![("x-api-key", "K1")], vec![("api-key", "K1")]),
        (vec![("x-auth-token", "K1")], vec![("x-access-token", "K1")]),
        (vec![("cookie", "K1")], vec![("authorization", "K1")]),
        (
            vec![("authorization", "Bearer a")],
            vec![("proxy-authorization", "Bearer a")],
        ),
        (
            vec![("authorization", "a"), ("x-api-key", "b")],
            vec![("authorization", "a"), ("api-key", "b")],
        ),
        (
            vec![("authorization", "a"), ("x-api-key", "b")],
            vec![("authorization", "ab")],
        ),
        (
            vec![("authorization", "a"), ("x-api-key", "b")],
            vec![("authorization", "a"), ("authorization", "b")],
        ),
        (vec![], vec![("authorization", "anonymous")]),
        (vec![], vec![("cookie", "anonymous")]),
    ];
    let mut shared = Vec::new();
    for (i, (a, b)) in pairs.iter().enumerate() {
        let (app, runs) = counting_app(
            IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default()),
            Duration::ZERO,
        );
        let key = format!("k-scope-{i}");
        let (s1, _, _) = send(&app, order(&key, a, "{}")).await;
        assert_eq!(s1, StatusCode::CREATED);
        let (s2, h2, body2) = send(&app, order(&key, b, "{}")).await;
        if h2.contains_key("idempotent-replayed") || runs.load(Ordering::SeqCst) != 2 {
            shared.push(format!("{a:?} / {b:?}: {s2} {body2}"));
        }
    }
    assert!(
        shared.is_empty(),
        "clients with different credential headers shared a key space:\n{}",
        shared.join("\n")
    );
}

/// `with_cookies`: "reads only the named cookies (by name, each with its value)". Two clients
/// with the same text spread over different cookie names are two clients.
#[tokio::test]
async fn durable26_named_cookies_are_scoped_by_name_and_value() {
    let pairs: [(&str, &str); 4] = [
        ("session_id=x", "sid=x"),
        ("a=b1", "ab=1"),
        ("a=1; ab=2", "a=1a; b=2"),
        ("session_id=s1", "session_id=s2"),
    ];
    let mut shared = Vec::new();
    for (i, (a, b)) in pairs.iter().enumerate() {
        let (app, runs) = counting_app(
            IdempotencyLayer::new(
                MemoryStore::default(),
                ByCredentials::default().with_cookies(["session_id", "sid", "a", "ab", "b"]),
            ),
            Duration::ZERO,
        );
        let key = format!("k-cookie-{i}");
        send(&app, order(&key, &[("cookie", a)], "{}")).await;
        let (s2, h2, _) = send(&app, order(&key, &[("cookie", b)], "{}")).await;
        if h2.contains_key("idempotent-replayed") || runs.load(Ordering::SeqCst) != 2 {
            shared.push(format!("{a:?} / {b:?}: {s2}"));
        }
    }
    assert!(shared.is_empty(), "shared scopes: {shared:?}");

    // And the named cookie alone decides: other cookies, or the cookie on another line, do
    // not make another client.
    let (app, runs) = counting_app(
        IdempotencyLayer::new(
            MemoryStore::default(),
            ByCredentials::default().with_cookies(["session_id"]),
        ),
        Duration::ZERO,
    );
    send(
        &app,
        order("k-c", &[("cookie", "session_id=s; _ga=1")], "{}"),
    )
    .await;
    let (_, h, _) = send(
        &app,
        order(
            "k-c",
            &[("cookie", "_ga=2"), ("cookie", "session_id=s")],
            "{}",
        ),
    )
    .await;
    assert_eq!(
        h.get("idempotent-replayed").map(|v| v.as_bytes()),
        Some(&b"true"[..])
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// "Keys are 1 to 255 visible ASCII characters, sent bare or as a structured-field string": the
/// key `k` sent bare and as `"k"` is one key (the second is a replay), escapes included, and a
/// string of 255 characters is a valid key even though its quotes make the header 257 bytes.
#[tokio::test]
async fn durable26_a_bare_key_and_its_string_form_are_one_key() {
    let (app, runs) = counting_app(
        IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default()),
        Duration::ZERO,
    );
    let long = "k".repeat(255);
    let quoted_long = format!("\"{long}\"");
    for (bare, quoted) in [
        ("order-1", "\"order-1\""),
        ("a\"b", "\"a\\\"b\""),
        ("a\\b", "\"a\\\\b\""),
        (long.as_str(), quoted_long.as_str()),
    ] {
        let before = runs.load(Ordering::SeqCst);
        let (s, _, b) = send(&app, order(bare, &[], "{}")).await;
        assert_eq!(s, StatusCode::CREATED, "{bare}: {b}");
        let (s, h, b) = send(&app, order(quoted, &[], "{}")).await;
        assert_eq!(s, StatusCode::CREATED, "{quoted}: {b}");
        assert!(
            h.contains_key("idempotent-replayed"),
            "{bare} then {quoted} ran twice"
        );
        assert_eq!(runs.load(Ordering::SeqCst), before + 1);
    }
    // 256 characters, bare or quoted, is not a key.
    let k256 = "k".repeat(256);
    for k in [k256.clone(), format!("\"{k256}\"")] {
        let (s, _, b) = send(&app, order(&k, &[], "{}")).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert_eq!(problem_type(&b), problem::INVALID_KEY);
    }
}

/// A key that is not visible ASCII: 400 `…/idempotency-key-invalid`, the handler never runs.
#[tokio::test]
async fn durable26_invalid_keys_are_400_invalid() {
    let (app, runs) = counting_app(
        IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default()),
        Duration::ZERO,
    );
    let bad: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        b"a b".to_vec(),
        b"a\tb".to_vec(),
        "café".as_bytes().to_vec(),
        vec![0xff, 0xfe],
        b"\"\"".to_vec(),
        vec![b'x'; 100_000],
    ];
    for k in bad {
        let mut req = Request::post("/orders").body(Body::from("{}")).unwrap();
        req.headers_mut().insert(
            "idempotency-key",
            http::HeaderValue::from_bytes(&k).unwrap(),
        );
        let (s, h, b) = send(&app, req).await;
        assert_eq!(
            s,
            StatusCode::BAD_REQUEST,
            "{:?}",
            String::from_utf8_lossy(&k)
        );
        assert_eq!(problem_type(&b), problem::INVALID_KEY);
        assert_eq!(h["content-type"], "application/problem+json");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

/// "same key, another method, path, query or body | 422": also while the first is still
/// running (the store's answer to another fingerprint is a mismatch "whatever its token"), and
/// the same payload meanwhile is 409 with `Retry-After: 1`.
#[tokio::test]
async fn durable26_another_payload_while_the_first_runs_is_422_not_409() {
    let (app, runs) = counting_app(
        IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default()),
        Duration::from_millis(1000),
    );
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, order("k-run", &[], "{\"a\":1}")).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (s, h, b) = send(&app, order("k-run", &[], "{\"a\":1}")).await;
    assert_eq!(s, StatusCode::CONFLICT, "{b}");
    assert_eq!(h["retry-after"], "1");
    assert_eq!(problem_type(&b), problem::IN_FLIGHT);
    let (s, _, b) = send(&app, order("k-run", &[], "{\"a\":2}")).await;
    assert_eq!(
        (s, problem_type(&b)),
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            problem::KEY_REUSED.to_owned()
        )
    );
    assert_eq!(first.await.unwrap().0, StatusCode::CREATED);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// Methods not made idempotent pass through untouched, even with a key a POST used, and
/// `with_methods` replaces the set.
#[tokio::test]
async fn durable26_other_methods_pass_through_untouched() {
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let app = Router::new()
        .route(
            "/orders",
            axum::routing::put(move || {
                let r = r.clone();
                async move {
                    r.fetch_add(1, Ordering::SeqCst);
                    StatusCode::OK
                }
            })
            .post(|| async { StatusCode::CREATED }),
        )
        .layer(
            IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default())
                .with_require_key(true),
        );
    for _ in 0..3 {
        let mut req = order("k-put", &[], "{}");
        *req.method_mut() = Method::PUT;
        let res = app.clone().oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert!(res.headers().get("idempotent-replayed").is_none());
    }
    // No key on a PUT, with keys required: PUT is not one of the methods, so it runs.
    let req = Request::put("/orders").body(Body::empty()).unwrap();
    assert_eq!(
        app.clone().oneshot(req).await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(runs.load(Ordering::SeqCst), 4);
}

/// A store whose `release` takes a while, as a remote store under load may.
#[derive(Debug, Clone)]
struct SlowRelease {
    inner: MemoryStore,
    delay: Duration,
    releases: Arc<AtomicUsize>,
}

impl IdempotencyStore for SlowRelease {
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
        let inner = self.inner.clone();
        let key = key.to_owned();
        let delay = self.delay;
        let releases = self.releases.clone();
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            let r = inner.release(&key, token).await;
            releases.fetch_add(1, Ordering::SeqCst);
            r
        })
    }
}

/// A handler that answers 503 (or panics) releases its key "before the response goes out".
/// When the client goes away while that release is on its way (its request future dropped,
/// as hyper does on a closed connection), the release must still happen: the key was never
/// stored, so leaving it locked would refuse every retry with 409 until the lease ends.
#[tokio::test]
async fn durable26_a_release_on_its_way_is_not_cancelled_by_a_client_that_leaves() {
    for what in ["fail", "panic"] {
        let releases = Arc::new(AtomicUsize::new(0));
        let store = SlowRelease {
            inner: MemoryStore::default(),
            delay: Duration::from_millis(150),
            releases: releases.clone(),
        };
        let runs = Arc::new(AtomicUsize::new(0));
        let r = runs.clone();
        let answered = Arc::new(tokio::sync::Notify::new());
        let a2 = answered.clone();
        let app = Router::new()
            .route(
                "/orders",
                post(move |body: Bytes| {
                    let r = r.clone();
                    let a2 = a2.clone();
                    async move {
                        let n = r.fetch_add(1, Ordering::SeqCst);
                        a2.notify_one();
                        if n == 0 && body.as_ref() == b"panic" {
                            panic!("first run panics");
                        }
                        if n == 0 {
                            return (StatusCode::SERVICE_UNAVAILABLE, "down");
                        }
                        (StatusCode::CREATED, "made")
                    }
                }),
            )
            .layer(
                IdempotencyLayer::new(store, ByCredentials::default())
                    .with_lease(Duration::from_secs(30))
                    .unwrap(),
            );
        let body: &'static str = if what == "panic" { "panic" } else { "fail" };
        // The client leaves 30 ms after the handler answered: the release is on its way.
        let fut = app.clone().oneshot(order("k-rel", &[], body));
        let mut fut = Box::pin(fut);
        tokio::select! {
            _ = &mut fut => panic!("{what}: answered before the handler ran"),
            _ = answered.notified() => {}
        }
        let left = tokio::time::timeout(Duration::from_millis(30), &mut fut).await;
        assert!(left.is_err(), "{what}: answered before the release ended");
        drop(fut);
        // Long after the release would have ended.
        tokio::time::sleep(Duration::from_millis(400)).await;
        let (s, h, b) = send(&app, order("k-rel", &[], body)).await;
        assert_eq!(
            (s, releases.load(Ordering::SeqCst)),
            (StatusCode::CREATED, 1),
            "{what}: the retry after the client left got {s} {b} ({:?})",
            h.get("retry-after")
        );
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }
}

/// The layer inside an axum Router under tower-http's TimeoutLayer, a Buffer and a
/// ConcurrencyLimit of 1, driven as a kept service with `ready().await?.call(req)`: a client
/// cut by the timeout mid-handler does not free the key; the retry waits (409) and then gets
/// the stored response, and the handler ran once. The composed service is Send + Sync + Clone.
#[tokio::test]
async fn durable26_kept_service_under_timeout_buffer_and_limit_one() {
    use tower::{Service, ServiceBuilder};
    let (app, runs) = counting_app(
        IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default()),
        Duration::from_millis(300),
    );
    #[allow(deprecated)]
    let timeout = tower_http::timeout::TimeoutLayer::new(Duration::from_millis(100));
    let svc = ServiceBuilder::new()
        .layer(timeout)
        .buffer(16)
        .concurrency_limit(1)
        .service(app);
    fn assert_send_sync_clone<T: Send + Sync + Clone>(_: &T) {}
    assert_send_sync_clone(&svc);
    let mut kept = svc.clone();
    let res = kept
        .ready()
        .await
        .unwrap()
        .call(order("k-kept", &[], "{}"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::REQUEST_TIMEOUT);
    let res = kept
        .ready()
        .await
        .unwrap()
        .call(order("k-kept", &[], "{}"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CONFLICT);
    assert_eq!(res.headers()["retry-after"], "1");
    tokio::time::sleep(Duration::from_millis(700)).await;
    let res = kept
        .ready()
        .await
        .unwrap()
        .call(order("k-kept", &[], "{}"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(res.headers()["idempotent-replayed"], "true");
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"run 1: 2");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// Two identical requests at once over a real socket: exactly one runs; the other is 409
/// `Retry-After: 1` with the guide's problem JSON, and a later retry is the replay.
#[tokio::test]
async fn durable26_two_identical_requests_at_once_over_the_wire() {
    let (app, runs) = counting_app(
        IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default()),
        Duration::from_millis(200),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let raw = "POST /orders HTTP/1.1\r\nhost: x\r\nidempotency-key: k-wire\r\nauthorization: Bearer w\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}";
    let (a, b) = tokio::join!(exchange(addr, raw), async {
        tokio::time::sleep(Duration::from_millis(30)).await;
        exchange(addr, raw).await
    });
    // Whichever arrived first ran; the other was refused.
    let (a, b) = if a.starts_with("HTTP/1.1 409") {
        (b, a)
    } else {
        (a, b)
    };
    assert!(a.starts_with("HTTP/1.1 201"), "{a}");
    assert!(b.starts_with("HTTP/1.1 409"), "{b}");
    let lower = b.to_ascii_lowercase();
    assert!(lower.contains("\r\nretry-after: 1\r\n"), "{b}");
    assert!(
        lower.contains("content-type: application/problem+json"),
        "{b}"
    );
    assert!(b.ends_with("{\"type\":\"https://example.invalid/sturdy/problems/idempotency-key-in-flight\",\"title\":\"A request is outstanding for this Idempotency-Key\",\"status\":409,\"detail\":\"the first request with this key is still running; retry after a while with the same key\"}"), "{b}");
    let c = exchange(addr, raw).await;
    assert!(c.starts_with("HTTP/1.1 201"), "{c}");
    assert!(
        c.to_ascii_lowercase().contains("idempotent-replayed: true"),
        "{c}"
    );
    assert!(c.ends_with("run 1: 2"), "{c}");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    server.abort();
}

async fn exchange(addr: std::net::SocketAddr, raw: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(raw.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// "A handler that panics, fails (`Err`), or answers a status that is not stored releases its
/// key before its answer goes out, so a retry that follows at once runs": a tower service that
/// fails its first call.
#[tokio::test]
async fn durable26_a_failing_inner_service_releases_its_key() {
    use tower::ServiceBuilder;
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let inner = tower::service_fn(move |_req: Request<Body>| {
        let n = r.fetch_add(1, Ordering::SeqCst);
        async move {
            if n == 0 {
                return Err::<http::Response<Body>, BoxError>("backend gone".into());
            }
            Ok(http::Response::builder()
                .status(201)
                .body(Body::from("made"))
                .unwrap())
        }
    });
    let svc = ServiceBuilder::new()
        .layer(IdempotencyLayer::new(
            MemoryStore::default(),
            ByCredentials::default(),
        ))
        .service(inner);
    let first = svc.clone().oneshot(order("k-err", &[], "{}")).await;
    assert!(first.is_err());
    let second = svc
        .clone()
        .oneshot(order("k-err", &[], "{}"))
        .await
        .unwrap();
    assert_eq!(second.status(), StatusCode::CREATED);
    let third = svc.oneshot(order("k-err", &[], "{}")).await.unwrap();
    assert_eq!(third.headers()["idempotent-replayed"], "true");
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// "same key, another method, path, query or body | 422": the fingerprint covers the path and
/// query and the body apart, so moving bytes from the body into the query (or back) is another
/// request, never a replay of the first one's response.
#[tokio::test]
async fn durable26_bytes_moved_between_query_and_body_are_another_request() {
    let cases: [(&str, &'static str, &str, &'static str); 3] = [
        ("/orders?a=", "b", "/orders?a=b", ""),
        ("/orders", "?x=1", "/orders?x=1", ""),
        ("/orders?q=1", "", "/orders?q=", "1"),
    ];
    for (i, (uri_a, body_a, uri_b, body_b)) in cases.into_iter().enumerate() {
        let (app, runs) = counting_app(
            IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default()),
            Duration::ZERO,
        );
        let key = format!("k-move-{i}");
        let req = |uri: &str, body: &'static str| {
            Request::post(uri)
                .header("idempotency-key", key.as_str())
                .body(Body::from(body))
                .unwrap()
        };
        let (s, _, _) = send(&app, req(uri_a, body_a)).await;
        assert_eq!(s, StatusCode::CREATED);
        let (s, h, b) = send(&app, req(uri_b, body_b)).await;
        assert!(
            !h.contains_key("idempotent-replayed"),
            "{uri_a} + {body_a:?} then {uri_b} + {body_b:?}: replayed the first response ({s} {b})"
        );
        assert_eq!(
            (s, problem_type(&b)),
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                problem::KEY_REUSED.to_owned()
            ),
            "{uri_a} + {body_a:?} then {uri_b} + {body_b:?}"
        );
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }
}

/// The guide's recommended composition, "put the limit inside this layer (in axum,
/// `.layer(ConcurrencyLimitLayer::new(n))` before `.layer(idempotency)`)", with the table's row
/// "repeat while the first runs | 409, `Retry-After: 1`": the repeat (and a request with an
/// invalid key, which never runs a handler) should be answered at once, not wait for the
/// running handler's permit.
#[tokio::test]
async fn durable26_a_repeat_under_a_limit_inside_the_layer_is_409_at_once() {
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let app = Router::new()
        .route(
            "/orders",
            post(move || {
                let r = r.clone();
                async move {
                    r.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                    (StatusCode::CREATED, "made")
                }
            }),
        )
        .layer(tower::limit::ConcurrencyLimitLayer::new(1))
        .layer(IdempotencyLayer::new(
            MemoryStore::default(),
            ByCredentials::default(),
        ));
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, order("k-lim", &[], "{}")).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let t = tokio::time::Instant::now();
    let (s, h, _) = send(&app, order("k-lim", &[], "{}")).await;
    let took = t.elapsed();
    let t = tokio::time::Instant::now();
    let (s_bad, _, _) = send(&app, order("not a key", &[], "{}")).await;
    let took_bad = t.elapsed();
    first.await.unwrap();
    assert_eq!(
        (s, s_bad),
        (StatusCode::CONFLICT, StatusCode::BAD_REQUEST),
        "repeat: {s} {:?} after {took:?}; invalid key: {s_bad} after {took_bad:?}",
        h.get("idempotent-replayed")
    );
    assert!(
        took < Duration::from_millis(1000) && took_bad < Duration::from_millis(1000),
        "answers waited for the running handler's permit: {took:?}, {took_bad:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A `Content-Length` that lies (2^62 bytes announced, 2 sent) under a body limit the app set to
/// `usize::MAX`: no allocation sized by the peer's claim, no panic.
#[tokio::test]
async fn durable26_a_lying_content_length_under_an_unbounded_limit() {
    let (app, runs) = counting_app(
        IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default())
            .with_body_limit(usize::MAX),
        Duration::ZERO,
    );
    let mut req = order("k-len", &[], "{}");
    req.headers_mut()
        .insert("content-length", (1u64 << 62).to_string().parse().unwrap());
    let (s, _, b) = send(&app, req).await;
    assert!(s == StatusCode::CREATED || s.is_client_error(), "{s} {b}");
    assert!(runs.load(Ordering::SeqCst) <= 1);
}

/// Dropping a request at every point of its way (locking the key in Redis, reading the body,
/// running the handler, storing the response): once things settle, a retry with the same key
/// is answered 201, and for each key the handler ran exactly once (the retry ran it, or got the
/// first run's stored response). No key is left locked, none is run twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable26_a_request_dropped_at_any_moment_leaves_one_run_per_key_redis() {
    let url =
        std::env::var("STURDY_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:17379/".into());
    let n = sturdy::core::WallClock::now(&sturdy::core::clock::SystemClock)
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let store = sturdy::redis::RedisIdempotencyStore::connect(&url)
        .await
        .unwrap()
        .with_prefix(format!("durable26-drop-{n}"));
    let runs = Arc::new(std::sync::Mutex::new(std::collections::HashMap::<
        String,
        u32,
    >::new()));
    let r = runs.clone();
    let app = Router::new()
        .route(
            "/orders",
            post(move |headers: HeaderMap| {
                let r = r.clone();
                async move {
                    let key = headers["idempotency-key"].to_str().unwrap().to_owned();
                    *r.lock().unwrap().entry(key).or_insert(0) += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    (StatusCode::CREATED, "made")
                }
            }),
        )
        .layer(
            IdempotencyLayer::new(store, ByCredentials::default())
                .with_lease(Duration::from_secs(30))
                .unwrap(),
        );
    let mut keys = Vec::new();
    for step in 0..60u64 {
        let key = format!("k-drop-{step}");
        let fut = app.clone().oneshot(order(&key, &[], "{}"));
        let _ = tokio::time::timeout(Duration::from_micros(step * 500), fut).await;
        keys.push(key);
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut bad = Vec::new();
    for key in &keys {
        let (s, _, b) = send(&app, order(key, &[], "{}")).await;
        let n = runs.lock().unwrap().get(key).copied().unwrap_or(0);
        if s != StatusCode::CREATED || n != 1 {
            bad.push(format!("{key}: {s} {b} after {n} runs"));
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// `MemoryStore::with_max_bytes`: "Clones are one store: the bound applies to all of them, and
/// the entries already held are kept." A bound set through one clone holds for a layer built
/// on another: an 8 KiB response is larger than a 4 KiB bound, so it is not stored; its first
/// client gets it and retries get 500 `…/idempotency-response-too-large`, the handler not run
/// again. An entry stored before the bound was set is still replayed.
#[tokio::test]
async fn durable26_a_byte_bound_set_on_a_clone_binds_every_clone() {
    let store = MemoryStore::default();
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let app = Router::new()
        .route(
            "/orders",
            post(move |body: Bytes| {
                let r = r.clone();
                async move {
                    r.fetch_add(1, Ordering::SeqCst);
                    let n = if body.as_ref() == b"big" {
                        8 * 1024
                    } else {
                        10
                    };
                    (StatusCode::CREATED, "x".repeat(n))
                }
            }),
        )
        .layer(IdempotencyLayer::new(
            store.clone(),
            ByCredentials::default(),
        ));
    let (s, _, _) = send(&app, order("k-small", &[], "small")).await;
    assert_eq!(s, StatusCode::CREATED);
    let _bounded = store.clone().with_max_bytes(4 * 1024).unwrap();
    let (s, _, b) = send(&app, order("k-big", &[], "big")).await;
    assert_eq!((s, b.len()), (StatusCode::CREATED, 8 * 1024));
    let (s, _, b) = send(&app, order("k-big", &[], "big")).await;
    assert_eq!(
        (s, problem_type(&b)),
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            problem::RESPONSE_TOO_LARGE.to_owned()
        ),
        "the bound set on a clone did not hold for the layer's store"
    );
    let (s, h, _) = send(&app, order("k-small", &[], "small")).await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(h["idempotent-replayed"], "true");
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    assert!(store.heap_bytes() <= 4 * 1024, "{}", store.heap_bytes());
}

/// "once the store has locked the key, the handler runs in a tokio task of its own
/// (`tokio::spawn`, inside the current `tracing` span)": the handler sees the request's span
/// as its current span, also when its client left, and also for a replay's absence of a run.
#[tokio::test]
async fn durable26_the_handler_runs_inside_the_requests_tracing_span() {
    use tracing::Instrument;
    let subscriber = tracing_subscriber::fmt()
        .with_writer(std::io::sink)
        .with_max_level(tracing::Level::TRACE)
        .finish();
    let _guard = crate::logs13_common::set_default(subscriber);
    let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let s2 = seen.clone();
    let app = Router::new()
        .route(
            "/orders",
            post(move || {
                let s2 = s2.clone();
                async move {
                    let name = tracing::Span::current()
                        .metadata()
                        .map(|m| m.name().to_owned())
                        .unwrap_or_else(|| "<none>".to_owned());
                    s2.lock().unwrap().push(name);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    (StatusCode::CREATED, "made")
                }
            }),
        )
        .layer(IdempotencyLayer::new(
            MemoryStore::default(),
            ByCredentials::default(),
        ));
    let res = app
        .clone()
        .oneshot(order("k-span", &[], "{}"))
        .instrument(tracing::info_span!("order_request_d26"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    // A client that leaves mid-handler: the handler still ran in the span.
    let fut = app
        .clone()
        .oneshot(order("k-span-2", &[], "{}"))
        .instrument(tracing::info_span!("order_request_d26"));
    let _ = tokio::time::timeout(Duration::from_millis(10), fut).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        *seen.lock().unwrap(),
        ["order_request_d26", "order_request_d26"]
    );
}

/// "the store's atomic lock lets exactly one execution start, across every instance sharing
/// the store": two app instances on their own Redis connections, 24 identical requests at once
/// (same client, key and payload): one runs; every other one gets 409 with `Retry-After: 1`
/// or, once the first is done, its stored response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable26_identical_requests_at_once_on_two_instances_run_once() {
    let url =
        std::env::var("STURDY_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:17379/".into());
    let n = sturdy::core::WallClock::now(&sturdy::core::clock::SystemClock)
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let prefix = format!("durable26-twins-{n}");
    let mut apps = Vec::new();
    let mut counters = Vec::new();
    for _ in 0..2 {
        let store = sturdy::redis::RedisIdempotencyStore::connect(&url)
            .await
            .unwrap()
            .with_prefix(prefix.clone());
        let (app, runs) = counting_app(
            IdempotencyLayer::new(store, ByCredentials::default()),
            Duration::from_millis(100),
        );
        apps.push(app);
        counters.push(runs);
    }
    let tasks: Vec<_> = (0..24)
        .map(|i| {
            let app = apps[i % 2].clone();
            tokio::spawn(async move {
                send(
                    &app,
                    order("k-twins", &[("authorization", "Bearer t")], "{}"),
                )
                .await
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        let (s, h, b) = t.await.unwrap();
        match s {
            StatusCode::CREATED => assert!(b.starts_with("run 1"), "{b}"),
            StatusCode::CONFLICT => {
                assert_eq!(h["retry-after"], "1");
                assert_eq!(problem_type(&b), problem::IN_FLIGHT);
            }
            other => panic!("{other}: {b}"),
        }
        statuses.push(s.as_u16());
    }
    let total: usize = counters.iter().map(|c| c.load(Ordering::SeqCst)).sum();
    assert_eq!(total, 1, "{statuses:?}");
    assert!(statuses.contains(&201));
}

/// "Requests with a method other than POST and PATCH ..., and requests without a key when none
/// is required, pass through untouched": their bodies are not held to the layer's body limit
/// (1 MiB) nor buffered: a 1.5 MiB unkeyed POST reaches the handler whole, and a streamed
/// unkeyed body reaches it before its end.
#[tokio::test]
async fn durable26_unkeyed_requests_pass_through_untouched() {
    let app = Router::new()
        .route(
            "/orders",
            post(|body: Bytes| async move { (StatusCode::OK, body.len().to_string()) }),
        )
        .route(
            "/stream",
            post(|body: Body| async move {
                let mut s = body.into_data_stream();
                use futures_util::StreamExt;
                let first = s.next().await.unwrap().unwrap();
                (StatusCode::OK, format!("first {}", first.len()))
            }),
        )
        .layer(IdempotencyLayer::new(
            MemoryStore::default(),
            ByCredentials::default(),
        ));
    let big = vec![b'x'; 1536 * 1024];
    let req = Request::post("/orders")
        .body(Body::from(big.clone()))
        .unwrap();
    let (s, _, b) = send(&app, req).await;
    assert_eq!((s, b.as_str()), (StatusCode::OK, "1572864"));
    let mut req = Request::put("/orders").body(Body::from(big)).unwrap();
    req.headers_mut().insert(
        "idempotency-key",
        http::HeaderValue::from_static("k-put-big"),
    );
    let res = app.clone().oneshot(req).await.unwrap();
    assert_eq!(
        res.status(),
        StatusCode::METHOD_NOT_ALLOWED,
        "PUT has no route"
    );

    // A body whose first chunk comes and whose end never does.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tx.send(Ok(Bytes::from_static(b"hello"))).await.unwrap();
    let stream =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) });
    let req = Request::post("/stream")
        .body(Body::from_stream(stream))
        .unwrap();
    let res = tokio::time::timeout(Duration::from_secs(2), send(&app, req))
        .await
        .expect("an unkeyed body was buffered by the layer");
    assert_eq!(res.2, "first 5");
    drop(tx);
}

/// The 500 marker is what the key keeps ("its key replays a 500
/// `…/idempotency-response-too-large`"), and a repeat of a completed request gets "the stored
/// response ... with `Idempotent-Replayed: true`": the marker's replays say they are replays,
/// with the problem JSON's content type.
#[tokio::test]
async fn durable26_the_too_large_marker_is_replayed_as_a_replay() {
    let (app, runs) = counting_app(
        IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default())
            .with_response_limit(4),
        Duration::ZERO,
    );
    let (s, _, _) = send(&app, order("k-mark", &[], "{}")).await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR);
    for _ in 0..2 {
        let (s, h, b) = send(&app, order("k-mark", &[], "{}")).await;
        assert_eq!(
            (s, problem_type(&b)),
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                problem::RESPONSE_TOO_LARGE.to_owned()
            )
        );
        assert_eq!(h["content-type"], "application/problem+json");
        assert_eq!(
            h.get("idempotent-replayed").map(|v| v.as_bytes()),
            Some(&b"true"[..]),
            "the stored marker's replay does not say it is one"
        );
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}
