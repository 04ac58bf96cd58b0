//! docs/guides/idempotency.md and sturdy-idempotency's rustdoc, read literally: the server
//! layer's answer table (keys at their bounds, repeated headers, replayed headers, statuses not
//! stored, response limit), its settings, the client key layer's options, and a handler whose
//! client timed out under tower's `Timeout` and `ConcurrencyLimit`.
#![cfg(feature = "full")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use sturdy::idempotency::client::IdempotencyKeyLayer;
use sturdy::idempotency::server::{problem, ByCredentials, IdempotencyLayer, MemoryStore};
use tower::{Service, ServiceBuilder, ServiceExt};

fn counted(status: StatusCode, runs: Arc<AtomicUsize>) -> Router {
    Router::new().route(
        "/orders",
        post(move |body: String| {
            let runs = runs.clone();
            async move {
                let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                (
                    status,
                    [("x-run", n.to_string())],
                    format!("order {n}: {body}"),
                )
            }
        })
        .get(|| async { "listed" }),
    )
}

fn layer() -> IdempotencyLayer<MemoryStore> {
    IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default())
}

fn post_with(key: Option<&str>, body: &str) -> Request<Body> {
    let mut b = Request::post("/orders").header("authorization", "Bearer c1");
    if let Some(k) = key {
        b = b.header("idempotency-key", k);
    }
    b.body(Body::from(body.to_owned())).unwrap()
}

async fn parts(res: http::Response<Body>) -> (StatusCode, http::HeaderMap, String) {
    let status = res.status();
    let headers = res.headers().clone();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

fn problem_type(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    v["type"].as_str().unwrap_or_default().to_owned()
}

/// "a key that is not 1 to 255 visible ASCII characters | 400, …/idempotency-key-invalid",
/// answered as problem JSON; 255 characters are a key, and the handler runs.
#[tokio::test]
async fn keys_at_their_bounds() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = counted(StatusCode::CREATED, runs.clone()).layer(layer());
    let ok = "k".repeat(255);
    let res = app
        .clone()
        .oneshot(post_with(Some(&ok), "a"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    for bad in [
        "k".repeat(256),
        "a b".to_owned(),
        String::new(),
        "\"\"".to_owned(),
    ] {
        let req = Request::post("/orders")
            .header("authorization", "Bearer c1")
            .header(
                "idempotency-key",
                http::HeaderValue::from_bytes(bad.as_bytes()).unwrap(),
            )
            .body(Body::from("a"))
            .unwrap();
        let (status, headers, body) = parts(app.clone().oneshot(req).await.unwrap()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "key {bad:?}: {body}");
        assert_eq!(
            headers["content-type"], "application/problem+json",
            "key {bad:?}"
        );
        assert_eq!(problem_type(&body), problem::INVALID_KEY, "key {bad:?}");
    }
    // Non-ASCII bytes (UTF-8 of "é").
    let req = Request::post("/orders")
        .header(
            "idempotency-key",
            http::HeaderValue::from_bytes("cl\u{e9}".as_bytes()).unwrap(),
        )
        .body(Body::from("a"))
        .unwrap();
    let (status, _, body) = parts(app.clone().oneshot(req).await.unwrap()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(problem_type(&body), problem::INVALID_KEY);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// "two or more different key headers on one request (byte-identical repeats are one key; `k`
/// and `"k"` on two lines are two) | 400".
#[tokio::test]
async fn repeated_key_headers() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = counted(StatusCode::CREATED, runs.clone()).layer(layer());
    let twice = |a: &str, b: &str| {
        Request::post("/orders")
            .header("idempotency-key", a)
            .header("idempotency-key", b)
            .body(Body::from("x"))
            .unwrap()
    };
    let (s, _, body) = parts(app.clone().oneshot(twice("k1", "k1")).await.unwrap()).await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    // A single-line repeat of the same request replays.
    let (s, h, _) = parts(app.clone().oneshot(twice("k1", "k1")).await.unwrap()).await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(h["idempotent-replayed"], "true");
    for (a, b) in [("k2", "\"k2\""), ("k3", "k4")] {
        let (s, _, body) = parts(app.clone().oneshot(twice(a, b)).await.unwrap()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{a} / {b}");
        assert_eq!(problem_type(&body), problem::INVALID_KEY);
    }
    // Many repeated lines: answered at once, one run in all.
    let mut b = Request::post("/orders");
    for i in 0..2_000 {
        b = b.header("idempotency-key", format!("k-{i}"));
    }
    let (s, _, _) = parts(
        app.clone()
            .oneshot(b.body(Body::from("x")).unwrap())
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// "Requests with a method other than POST and PATCH ... pass through untouched": a GET with an
/// invalid key, and a GET without a key on a route that requires one, reach the handler.
#[tokio::test]
async fn other_methods_pass_through() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = counted(StatusCode::CREATED, runs).layer(layer().with_require_key(true));
    for key in [None, Some("a b")] {
        let mut b = Request::get("/orders");
        if let Some(k) = key {
            b = b.header("idempotency-key", k);
        }
        let (s, h, body) = parts(
            app.clone()
                .oneshot(b.body(Body::empty()).unwrap())
                .await
                .unwrap(),
        )
        .await;
        assert_eq!((s, body.as_str()), (StatusCode::OK, "listed"));
        assert!(h.get("idempotent-replayed").is_none());
    }
    // "no key, on a route that requires one (`with_require_key(true)`) | 400, …/idempotency-key-missing"
    let (s, _, body) = parts(app.clone().oneshot(post_with(None, "x")).await.unwrap()).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(problem_type(&body), problem::MISSING_KEY);
}

/// "the stored response (status, headers except connection-level ones such as `Date` and
/// `Content-Length`, body) with `Idempotent-Replayed: true`; the handler does not run": a
/// header sent twice is replayed twice.
#[tokio::test]
async fn replay_keeps_every_header_value() {
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let app = Router::new()
        .route(
            "/orders",
            post(move || {
                let r = r.clone();
                async move {
                    r.fetch_add(1, Ordering::SeqCst);
                    http::Response::builder()
                        .status(StatusCode::ACCEPTED)
                        .header("set-cookie", "a=1")
                        .header("set-cookie", "b=2")
                        .header("x-order", "o_1")
                        .header("link", "</orders/o_1>; rel=\"self\"")
                        .body(Body::from("made"))
                        .unwrap()
                }
            }),
        )
        .layer(layer());
    let (s1, h1, b1) = parts(
        app.clone()
            .oneshot(post_with(Some("rk"), "x"))
            .await
            .unwrap(),
    )
    .await;
    let (s2, h2, b2) = parts(
        app.clone()
            .oneshot(post_with(Some("rk"), "x"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((s1, s2), (StatusCode::ACCEPTED, StatusCode::ACCEPTED));
    assert_eq!(b1, b2);
    assert_eq!(h2["idempotent-replayed"], "true");
    assert!(h1.get("idempotent-replayed").is_none());
    let cookies: Vec<_> = h2.get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["a=1", "b=2"]);
    assert_eq!(h2["x-order"], "o_1");
    assert_eq!(h2["link"], "</orders/o_1>; rel=\"self\"");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// "Not stored, so a retry runs the handler again: 5xx (`with_store_server_errors(true)` stores
/// them), and 408, 425 and 429".
#[tokio::test]
async fn statuses_not_stored_and_stored_5xx() {
    for (status, store_5xx, stored) in [
        (StatusCode::REQUEST_TIMEOUT, true, false),
        (StatusCode::TOO_EARLY, true, false),
        (StatusCode::TOO_MANY_REQUESTS, true, false),
        (StatusCode::INTERNAL_SERVER_ERROR, false, false),
        (StatusCode::SERVICE_UNAVAILABLE, false, false),
        (StatusCode::INTERNAL_SERVER_ERROR, true, true),
        (StatusCode::BAD_REQUEST, false, true),
        (StatusCode::CONFLICT, false, true),
    ] {
        let runs = Arc::new(AtomicUsize::new(0));
        let app = counted(status, runs.clone()).layer(layer().with_store_server_errors(store_5xx));
        let (s1, _, _) = parts(
            app.clone()
                .oneshot(post_with(Some("sk"), "x"))
                .await
                .unwrap(),
        )
        .await;
        let (s2, h2, _) = parts(
            app.clone()
                .oneshot(post_with(Some("sk"), "x"))
                .await
                .unwrap(),
        )
        .await;
        assert_eq!((s1, s2), (status, status));
        let expect = if stored { 1 } else { 2 };
        assert_eq!(
            runs.load(Ordering::SeqCst),
            expect,
            "{status} store_5xx={store_5xx}"
        );
        assert_eq!(h2.get("idempotent-replayed").is_some(), stored, "{status}");
    }
}

/// "A stored response is at most 1 MiB (`with_response_limit`): a handler whose response is
/// larger has run, so it is not run again; its key replays a 500 …/idempotency-response-too-large".
#[tokio::test]
async fn response_over_the_limit_is_not_run_again() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = counted(StatusCode::CREATED, runs.clone()).layer(layer().with_response_limit(8));
    let (_s1, _, _b1) = parts(
        app.clone()
            .oneshot(post_with(Some("big"), "0123456789"))
            .await
            .unwrap(),
    )
    .await;
    for _ in 0..2 {
        let (s, _, body) = parts(
            app.clone()
                .oneshot(post_with(Some("big"), "0123456789"))
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
        assert_eq!(problem_type(&body), problem::RESPONSE_TOO_LARGE);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// "body over the limit (1 MiB, `with_body_limit`) | 413, …/request-body-too-large": whether the
/// body declares its length or streams it; the handler does not run.
#[tokio::test]
async fn body_over_the_limit() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = counted(StatusCode::CREATED, runs.clone()).layer(layer().with_body_limit(16));
    let (s, _, body) = parts(
        app.clone()
            .oneshot(post_with(Some("b1"), &"x".repeat(17)))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(problem_type(&body), problem::BODY_TOO_LARGE);
    let chunks = futures_util::stream::iter(
        (0..10).map(|_| Ok::<_, std::io::Error>(Bytes::from_static(b"abcd"))),
    );
    let req = Request::post("/orders")
        .header("idempotency-key", "b2")
        .body(Body::from_stream(chunks))
        .unwrap();
    let (s, _, body) = parts(app.clone().oneshot(req).await.unwrap()).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(problem_type(&body), problem::BODY_TOO_LARGE);
    // Exactly at the limit is fine.
    let (s, _, _) = parts(
        app.clone()
            .oneshot(post_with(Some("b3"), &"x".repeat(16)))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// "The fingerprint is SHA-256 over the method, the path and query (byte for byte: `?a=1&b=2`
/// and `?b=2&a=1` are two requests) and the body" and "same key, another method, path, query or
/// body | 422"; "different client, same key | ... it runs on its own".
#[tokio::test]
async fn fingerprint_and_scope() {
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let app = Router::new()
        .route(
            "/orders",
            post(move || {
                let r = r.clone();
                async move {
                    (
                        StatusCode::CREATED,
                        format!("run {}", r.fetch_add(1, Ordering::SeqCst)),
                    )
                }
            }),
        )
        .layer(layer());
    let req = |q: &str, auth: &str| {
        Request::post(format!("/orders{q}"))
            .header("authorization", auth)
            .header("idempotency-key", "fk")
            .body(Body::from("x"))
            .unwrap()
    };
    let (s, _, first) = parts(
        app.clone()
            .oneshot(req("?a=1&b=2", "Bearer c1"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, _, body) = parts(
        app.clone()
            .oneshot(req("?b=2&a=1", "Bearer c1"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(problem_type(&body), problem::KEY_REUSED);
    let (s, _, other) = parts(
        app.clone()
            .oneshot(req("?a=1&b=2", "Bearer c2"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    assert_ne!(
        first, other,
        "another client must not get the first client's response"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// "`.with_cookies(["session_id"])` reads only the named cookies": an analytics cookie that
/// changes between retries keeps the scope, so the retry is replayed.
#[tokio::test]
async fn named_cookies_scope() {
    let runs = Arc::new(AtomicUsize::new(0));
    let scope = ByCredentials::default().with_cookies(["session_id"]);
    let app = counted(StatusCode::CREATED, runs.clone())
        .layer(IdempotencyLayer::new(MemoryStore::default(), scope));
    let req = |cookie: &str| {
        Request::post("/orders")
            .header("cookie", cookie)
            .header("idempotency-key", "ck")
            .body(Body::from("x"))
            .unwrap()
    };
    let (s1, _, _) = parts(
        app.clone()
            .oneshot(req("session_id=s1; _ga=1"))
            .await
            .unwrap(),
    )
    .await;
    let (s2, h2, _) = parts(
        app.clone()
            .oneshot(req("_ga=2; session_id=s1"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((s1, s2), (StatusCode::CREATED, StatusCode::CREATED));
    assert_eq!(h2["idempotent-replayed"], "true");
    // Another session is another scope.
    let (s3, h3, _) = parts(
        app.clone()
            .oneshot(req("session_id=s2; _ga=2"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s3, StatusCode::CREATED);
    assert!(h3.get("idempotent-replayed").is_none());
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// "`with_ttl` and `with_lease` return an error for a zero TTL or a lease under 1 ms, and
/// `MemoryStore::new(0)` for a store of no entries"; the errors name the setting.
#[test]
fn invalid_settings_are_errors() {
    let e = layer().with_ttl(Duration::ZERO).unwrap_err().to_string();
    assert!(e.to_lowercase().contains("ttl"), "{e}");
    let e = layer()
        .with_lease(Duration::from_micros(999))
        .unwrap_err()
        .to_string();
    assert!(e.contains("lease"), "{e}");
    assert!(layer().with_lease(Duration::from_millis(1)).is_ok());
    let e = MemoryStore::new(0).unwrap_err().to_string();
    assert!(!e.is_empty());
}

/// "client timeout mid-handler | the handler runs to its end in its own task; its response is
/// stored | ... a retry with the same key gets 409 in flight (`Retry-After: 1`) while the handler
/// runs, then the stored response with `Idempotent-Replayed: true`; the handler ran once" —
/// with a `ConcurrencyLimit(1)` inside the layer (as the guide says to place it) and tower's
/// `Timeout` outside, driven by a kept service.
#[tokio::test(start_paused = true)]
async fn client_timeout_mid_handler_under_limit_and_timeout() {
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let app = Router::new()
        .route(
            "/orders",
            post(move || {
                let r = r.clone();
                async move {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    r.fetch_add(1, Ordering::SeqCst);
                    (StatusCode::CREATED, "done")
                }
            }),
        )
        .layer(tower::limit::ConcurrencyLimitLayer::new(1))
        .layer(layer());
    let mut svc = ServiceBuilder::new()
        .timeout(Duration::from_secs(1))
        .service(app);
    let err = ServiceExt::<Request<Body>>::ready(&mut svc)
        .await
        .unwrap()
        .call(post_with(Some("tk"), "x"))
        .await
        .unwrap_err();
    assert!(err.is::<tower::timeout::error::Elapsed>());
    // The key is held, not released as if never run.
    let res = ServiceExt::<Request<Body>>::ready(&mut svc)
        .await
        .unwrap()
        .call(post_with(Some("tk"), "x"))
        .await
        .unwrap();
    let (s, h, body) = parts(res).await;
    assert_eq!(s, StatusCode::CONFLICT, "{body}");
    assert_eq!(h["retry-after"], "1");
    assert_eq!(problem_type(&body), problem::IN_FLIGHT);
    tokio::time::sleep(Duration::from_secs(6)).await;
    let res = ServiceExt::<Request<Body>>::ready(&mut svc)
        .await
        .unwrap()
        .call(post_with(Some("tk"), "x"))
        .await
        .unwrap();
    let (s, h, body) = parts(res).await;
    assert_eq!((s, body.as_str()), (StatusCode::CREATED, "done"));
    assert_eq!(h["idempotent-replayed"], "true");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// The client key layer: "one random UUID v4 per logical POST/PATCH"; "A key you set yourself is
/// kept"; "`.with_header(name)` and `.with_methods([..])` change the header and the methods".
#[tokio::test]
async fn client_key_layer_options() {
    let seen = Arc::new(std::sync::Mutex::new(
        Vec::<(Method, http::HeaderMap)>::new(),
    ));
    let s = seen.clone();
    let inner = tower::service_fn(move |req: Request<Full<Bytes>>| {
        s.lock()
            .unwrap()
            .push((req.method().clone(), req.headers().clone()));
        async { Ok::<_, std::convert::Infallible>(http::Response::new(Full::<Bytes>::default())) }
    });
    let svc = ServiceBuilder::new()
        .layer(IdempotencyKeyLayer::new())
        .service(inner.clone());
    for m in [
        Method::POST,
        Method::PATCH,
        Method::GET,
        Method::PUT,
        Method::DELETE,
    ] {
        svc.clone()
            .oneshot(
                Request::builder()
                    .method(m)
                    .uri("http://a.test/x")
                    .body(Full::default())
                    .unwrap(),
            )
            .await
            .unwrap();
    }
    svc.clone()
        .oneshot(
            Request::post("http://a.test/x")
                .header("idempotency-key", "mine")
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    let mut r = Request::post("http://a.test/x")
        .body(Full::default())
        .unwrap();
    r.extensions_mut()
        .insert(sturdy::core::CallOptions::new().with_idempotency_key("opt-key"));
    svc.clone().oneshot(r).await.unwrap();
    let custom = ServiceBuilder::new()
        .layer(
            IdempotencyKeyLayer::new()
                .with_header(http::HeaderName::from_static("x-request-key"))
                .with_methods([Method::PUT]),
        )
        .service(inner);
    for m in [Method::PUT, Method::POST] {
        custom
            .clone()
            .oneshot(
                Request::builder()
                    .method(m)
                    .uri("http://a.test/x")
                    .body(Full::default())
                    .unwrap(),
            )
            .await
            .unwrap();
    }
    let seen = seen.lock().unwrap();
    let key = |i: usize, h: &str| seen[i].1.get(h).map(|v| v.to_str().unwrap().to_owned());
    for i in [0, 1] {
        let k = key(i, "idempotency-key").expect("POST/PATCH get a key");
        let u: Vec<&str> = k.split('-').collect();
        assert_eq!(
            u.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12],
            "{k}"
        );
        assert!(u[2].starts_with('4'), "UUID v4: {k}");
    }
    assert_ne!(key(0, "idempotency-key"), key(1, "idempotency-key"));
    for i in [2, 3, 4] {
        assert_eq!(key(i, "idempotency-key"), None, "{}", seen[i].0);
    }
    assert_eq!(key(5, "idempotency-key").as_deref(), Some("mine"));
    assert_eq!(key(6, "idempotency-key").as_deref(), Some("opt-key"));
    assert!(key(7, "x-request-key").is_some());
    assert_eq!(key(7, "idempotency-key"), None);
    assert_eq!(key(8, "x-request-key"), None);
}

/// A GET route with the layer under `Buffer` driven by a kept service.
#[tokio::test]
async fn under_buffer_kept_service() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = counted(StatusCode::CREATED, runs.clone())
        .route("/ping", get(|| async { "pong" }))
        .layer(layer());
    let mut svc = tower::buffer::Buffer::new(app, 1);
    for _ in 0..3 {
        let res = ServiceExt::<Request<Body>>::ready(&mut svc)
            .await
            .unwrap()
            .call(post_with(Some("bk"), "x"))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::CREATED);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}
